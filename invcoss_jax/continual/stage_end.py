"""The end of a stage: everything that needs the stage's data happens here, before the data is retired.

1. the statistics pass (App. B.2; every sequential method, so the storage log can compare),
2. what the method keeps of the stage: a real buffer (er: random; medcoss: k-means), the Fisher information
   (ewc), the synthetic set (invcoss, invert_with='own'),
3. the storage log and `stage_info.json` (done), written last.
A report stage has no statistics and is not inverted (text is discrete): invcoss keeps MedCoSS's real k-means
text buffer instead, the documented exception (continual/text.py) its storage log names.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
from absl import logging

from invcoss_jax import faults, npz_io
from invcoss_jax.continual import buffers, ewc
from invcoss_jax.continual import text as text_lib
from invcoss_jax.continual.config import REAL_BUFFER_METHODS, SYNTHETIC_METHODS
from invcoss_jax.continual import params as params_lib
from invcoss_jax.continual.stages import (BUFFER_DIR, BUFFER_INFO, EWC_FILE, PACKNET_FILE, REPLAY_DIR,
                                          Stage, folder_bytes, stage_key, write_info)
from invcoss_jax.data import registry as data_registry
from invcoss_jax.io_utils import atomic_write_json
from invcoss_jax.train import mlm, writers
from invcoss_jax.workdir import SYNTHETIC_DIR


def finish_stage(cfg, stage: Stage, model, params, n_current: list[int], shapes: list[tuple[int, ...]],
                 total_steps: int, *, prev: Stage | None, last: bool, writer=None) -> dict[str, Any]:
  """Statistics, then what the method keeps of the stage; writes stage_info.json (done) last. `cfg` is the
  stage's config (`stages.stage_config`: the job config with the stage's data and length)."""
  from invcoss_jax import data as data_lib
  from invcoss_jax.inversion import stage as inv_stage
  from invcoss_jax.inversion import statistics
  from invcoss_jax.parallel import mesh as mesh_lib

  c = cfg.continual
  method = str(c.method)
  d = stage.data[0]
  seq = method != "joint"
  text = seq and data_registry.is_text(d)
  stats_file = inv_stage.statistics_path(stage.workdir, cfg.inversion)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  if (seq and not text and (bool(c.statistics_after_stage) or method in SYNTHETIC_METHODS)
      and not inv_stage.has_statistics(stage.workdir, cfg.inversion)):
    inv_stage.write_statistics(model, params, cfg.data, cfg.inversion, stage.workdir, mesh)

  keeps_buffer = method in REAL_BUFFER_METHODS or (text and method in SYNTHETIC_METHODS)
  if keeps_buffer and not last and not os.path.isfile(os.path.join(stage.workdir, BUFFER_INFO)):
    if text:
      text_lib.write_text_buffer(cfg, stage, model, params)
    else:
      _write_real_buffer(cfg, stage, model, params, n_current[0])

  if method == "ewc" and not last and not os.path.isfile(os.path.join(stage.workdir, EWC_FILE)):
    host = jax.device_get(params)
    enc, _ = params_lib.split_params(host)
    batches = data_lib.make_eval_iterator(d, batch_size=int(c.ewc.fisher_batch_size), process_index=0,
                                          process_count=1)
    masker = mlm.masker_for(str(d.text.tokenizer), float(cfg.train.mlm_probability)) if text else None
    fisher, used = ewc.empirical_fisher(model, host, batches, mask_ratio=float(cfg.train.mask_ratio),
                                        rng=stage_key(cfg, stage.index, 3),
                                        num_examples=int(c.ewc.fisher_num_examples),
                                        batch_size=int(c.ewc.fisher_batch_size), masker=masker)
    previous = params_lib.load_tree_npz(os.path.join(prev.workdir, EWC_FILE))["fisher"] if prev else None
    fisher = ewc.online_update(previous, fisher, float(c.ewc.gamma))
    params_lib.save_tree_npz(os.path.join(stage.workdir, EWC_FILE), anchor=enc, fisher=fisher)
    logging.info("%s: EWC Fisher information from %d examples", stage.name, used)

  synth_summary = os.path.join(stage.workdir, inv_stage.SUMMARY_FILE)
  wants_synthetic = (method in SYNTHETIC_METHODS and c.invert_with == "own" and not text
                     and (not last or bool(c.synthesize_last_stage)))
  if wants_synthetic and not os.path.isfile(synth_summary):
    # From the parameters just trained and the statistics as stored (what a later reader of the stage sees).
    inv_writer = writer if writer is not None else writers.create_writer(stage.workdir)
    inv_stage.invert_stage(model, params, statistics.load_statistics(stats_file), cfg.inversion,
                           stage_data=cfg.data, seed=int(cfg.seed) + 1009 * stage.index, workdir=stage.workdir,
                           mesh=mesh, mesh_cfg=cfg.mesh, writer=inv_writer, stage_dir=stage.workdir,
                           stats_file=stats_file, optimise=method == "invcoss")

  storage = stage_storage(cfg, stage, n_current, shapes)
  if writer is not None:
    writer.write_scalars(total_steps, {f"storage/{k}": float(v) for k, v in storage.items()
                                       if isinstance(v, (int, float))})
  info = dict(name=stage.name, index=stage.index, modalities=list(stage.modalities), method=method,
              num_examples=n_current, image_shapes=[list(s) for s in shapes], steps=int(total_steps),
              data=[dict(name=str(x.name), path=str(x.path), split=str(x.split)) for x in stage.data],
              storage=storage, done=True)
  faults.point(f"stage_end:{stage.name}")
  write_info(stage, info)
  logging.info("%s finished: retains %d bytes (%s)", stage.name, storage["retained_bytes"], storage["retained_kind"])
  return info


def _write_real_buffer(cfg, stage: Stage, model, params, n: int) -> None:
  """er: a random buffer_fraction of the stage; medcoss: the k-means buffer (main_buffer_kmean.py)."""
  from invcoss_jax import data as data_lib
  c = cfg.continual
  d = stage.data[0]
  fraction = float(c.buffer_fraction)

  def eval_batches(batch_size):
    return data_lib.make_eval_iterator(d, batch_size=batch_size, process_index=0, process_count=1)

  if c.method == "er":
    idx = buffers.random_indices(n, fraction, seed=int(cfg.seed) + stage.index)
    extra = {}
  else:
    feats = buffers.encoder_features(model, jax.device_get(params), eval_batches(int(c.kmeans.batch_size)),
                                     kind=str(c.kmeans.feature))
    idx, km = buffers.kmeans_indices(feats, cluster_fraction=float(c.kmeans.cluster_fraction), fraction=fraction,
                                     seed=int(cfg.seed) + stage.index, n_init=int(c.kmeans.n_init),
                                     max_iter=int(c.kmeans.max_iter))
    extra = dict(clusters=int(km.n_clusters), inertia=float(km.inertia_))
  images = buffers.gather_examples(eval_batches(int(c.kmeans.batch_size)), idx)
  if jax.process_index() == 0:
    npz_io.write_shards(os.path.join(stage.workdir, BUFFER_DIR), images, int(cfg.inversion.shard_size))
    atomic_write_json(os.path.join(stage.workdir, BUFFER_INFO), dict(
        method=str(c.method), num_examples=int(len(images)), fraction=fraction, indices=[int(i) for i in idx],
        image_shape=list(images.shape[1:]), **extra))


def stage_storage(cfg, stage: Stage, n_current: list[int], shapes) -> dict[str, Any]:
  """Bytes the stage leaves for later stages, per kind (uncompressed files on disk), and what a real replay
  buffer of cfg.continual.buffer_fraction would take (float32 model layout) - the analogue of Fig. 6a."""
  method = str(cfg.continual.method)
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
  kinds = {"invcoss": ("statistics",), "noise": ("statistics",), "er": ("real_buffer",),
           "medcoss": ("real_buffer",), "ewc": ("ewc",),
           "packnet": ("packnet",)}.get(method, ())
  if method in SYNTHETIC_METHODS and str(cfg.continual.invert_with) == "own":
    # 'own' keeps the stage's synthetic set for every later stage (as large as a real buffer); only 'latest'
    # keeps nothing but the statistics between stages.
    kinds = ("statistics", "synthetic")
  text = method != "joint" and data_registry.is_text(stage.data[0])
  if text and method in SYNTHETIC_METHODS:
    kinds = ("real_buffer",)
  out["retained_kind"] = "+".join(kinds) or "none"
  out["retained_bytes"] = int(sum(out[f"{k}_bytes"] for k in kinds))
  if text and "real_buffer" in kinds:
    out["retained_kind"] = "real_text_buffer"
    if method in SYNTHETIC_METHODS:
      out["exception"] = text_lib.EXCEPTION
  return out
