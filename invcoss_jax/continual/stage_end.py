"""The end of a stage: everything that needs the stage's data happens here, before the data is retired.

1. the statistics pass (App. B.2; every sequential method, so the storage log can compare),
2. a report stage's real text buffer for a replaying method (text cannot be inverted: continual/text.py),
3. what the method keeps of the stage (`Method.end_stage`, continual/methods/): a real buffer (er: random;
   medcoss: k-means), the Fisher information (ewc), the synthetic set (invcoss, invert_with='own'),
4. the storage log and `stage_info.json` (done), written last.
A report stage has no statistics and is not inverted (text is discrete): invcoss keeps MedCoSS's real k-means
text buffer instead, the documented exception (continual/text.py) its storage log names.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import ml_collections
from absl import logging

from invcoss_jax import data as data_lib
from invcoss_jax import faults
from invcoss_jax.continual import buffers, methods
from invcoss_jax.continual import text as text_lib
from invcoss_jax.continual.stages import (BUFFER_DIR, BUFFER_INFO, EWC_FILE, PACKNET_FILE, REPLAY_DIR, Stage,
                                          folder_bytes, write_info)
from invcoss_jax.data import registry as data_registry
from invcoss_jax.inversion import stage as inv_stage
from invcoss_jax.parallel import mesh as mesh_lib
from invcoss_jax.workdir import SYNTHETIC_DIR


@dataclasses.dataclass(frozen=True)
class StageEnd:
  """A stage whose training ended, as `Method.end_stage` sees it (its data still readable)."""
  cfg: ml_collections.ConfigDict  # the stage's config (`stages.stage_config`)
  stage: Stage
  model: Any
  params: Any  # the trained parameters
  n_current: list[int]  # examples of each of its datasets
  prev: Stage | None  # the stage before it
  last: bool  # the sequence's last stage (no later stage reads what it keeps)
  text: bool  # a report stage of a sequential method
  mesh: Any
  writer: Any  # the stage's writer, or None
  stats_file: str  # its statistics (inversion/stage.statistics_path)

  def eval_batches(self, batch_size: int):
    """One pass over the stage's (first) dataset in order, unaugmented, on this process."""
    return data_lib.make_eval_iterator(self.stage.data[0], batch_size=batch_size, process_index=0,
                                       process_count=1)


def finish_stage(cfg, stage: Stage, model, params, n_current: list[int], shapes: list[tuple[int, ...]],
                 total_steps: int, *, prev: Stage | None, last: bool, writer=None) -> dict[str, Any]:
  """Statistics, then what the method keeps of the stage; writes stage_info.json (done) last. `cfg` is the
  stage's config (`stages.stage_config`: the job config with the stage's data and length)."""
  c = cfg.continual
  method = methods.get(c.method)
  d = stage.data[0]
  text = method.sequential and data_registry.is_text(d)
  stats_file = inv_stage.statistics_path(stage.workdir, cfg.inversion)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  if (method.sequential and not text and (bool(c.statistics_after_stage) or method.statistics)
      and not inv_stage.has_statistics(stage.workdir, cfg.inversion)):
    inv_stage.write_statistics(model, params, cfg.data, cfg.inversion, stage.workdir, mesh)

  if (text and method.text_buffer and not last
      and not os.path.isfile(os.path.join(stage.workdir, BUFFER_INFO))):
    text_lib.write_text_buffer(cfg, stage, model, params, select=method.text_buffer)
  method.end_stage(StageEnd(cfg=cfg, stage=stage, model=model, params=params, n_current=list(n_current), prev=prev,
                            last=last, text=text, mesh=mesh, writer=writer, stats_file=stats_file))

  storage = stage_storage(cfg, stage, n_current, shapes)
  if writer is not None:
    writer.write_scalars(total_steps, {f"storage/{k}": float(v) for k, v in storage.items()
                                       if isinstance(v, (int, float))})
  info = dict(name=stage.name, index=stage.index, modalities=list(stage.modalities), method=method.name,
              num_examples=n_current, image_shapes=[list(s) for s in shapes], steps=int(total_steps),
              data=[dict(name=str(x.name), path=str(x.path), split=str(x.split)) for x in stage.data],
              storage=storage, done=True)
  faults.point(f"stage_end:{stage.name}")
  write_info(stage, info)
  logging.info("%s finished: retains %d bytes (%s)", stage.name, storage["retained_bytes"], storage["retained_kind"])
  return info


def stage_storage(cfg, stage: Stage, n_current: list[int], shapes) -> dict[str, Any]:
  """Bytes the stage leaves for later stages, per kind (uncompressed files on disk), and what a real replay
  buffer of cfg.continual.buffer_fraction would take (float32 model layout) - the analogue of Fig. 6a."""
  method = methods.get(cfg.continual.method)
  w = stage.workdir
  out = dict(
      statistics_bytes=folder_bytes(os.path.join(w, cfg.inversion.stats_file)),
      real_buffer_bytes=folder_bytes(os.path.join(w, BUFFER_DIR)),
      synthetic_bytes=folder_bytes(os.path.join(w, SYNTHETIC_DIR)) + folder_bytes(os.path.join(w, REPLAY_DIR)),
      ewc_bytes=folder_bytes(os.path.join(w, EWC_FILE)),
      packnet_bytes=folder_bytes(os.path.join(w, PACKNET_FILE)),
      real_buffer_equivalent_bytes=int(sum(
          buffers.buffer_size(n, float(cfg.continual.buffer_fraction)) * math.prod(s) * 4
          for n, s in zip(n_current, shapes))))
  text = method.sequential and data_registry.is_text(stage.data[0])
  kinds = tuple(method.retains(cfg.continual, text))
  out["retained_kind"] = "+".join(kinds) or "none"
  out["retained_bytes"] = int(sum(out[f"{k}_bytes"] for k in kinds))
  if text and "real_buffer" in kinds:
    out["retained_kind"] = "real_text_buffer"
    if method.replays == "synthetic":  # a data-free method keeps real texts: the documented exception
      out["exception"] = text_lib.EXCEPTION
  return out
