"""invcoss: the paper's method. A stage keeps its statistics and a synthetic set inverted from its model
(`synthetic/`, as many images as a real buffer: `continual.buffer_fraction` of the stage, or
`inversion.num_samples`); later stages distil it to the frozen previous model. `continual.invert_with`:
'own' inverts stage t once, at its end, from f_t (Sec. 3.2); 'latest' re-inverts every earlier set at the
start of stage T from f_{T-1} and the stored statistics into `stage_T/replay/` (Algorithm 1). A report stage
is not inverted (text is discrete): it keeps MedCoSS's real k-means text buffer, the documented exception.

`Synthetic` is the family of sets made from the model; `optimise=False` replays the generator's output at
initialisation instead (the `noise` control, noise.py)."""

from __future__ import annotations

import os

from absl import logging

from invcoss_jax import data as data_lib
from invcoss_jax import npz_io
from invcoss_jax.continual import buffers, methods
from invcoss_jax.continual.stages import REPLAY_DIR, finished_info, read_record, stage_key
from invcoss_jax.inversion import engine, statistics
from invcoss_jax.inversion import stage as inv_stage
from invcoss_jax.io_utils import atomic_write_json
from invcoss_jax.train import writers
from invcoss_jax.workdir import SYNTHETIC_DIR


class Synthetic(methods.Method):
  """Keeps the stage's statistics and a synthetic set; replays the sets of every earlier stage."""
  keeps = "statistics and a synthetic set"
  replays = "synthetic"
  teacher = True
  statistics = True  # the set is inverted from (and judged against) the stage's statistics
  text_buffer = "kmeans"
  optimise = True  # False: the generator's output at initialisation, nothing optimised (noise)

  def end_stage(self, end):
    c = end.cfg.continual
    if end.text or str(c.invert_with) != "own" or (end.last and not bool(c.synthesize_last_stage)):
      return
    if os.path.isfile(os.path.join(end.stage.workdir, inv_stage.SUMMARY_FILE)):
      return  # inverted before a resume
    # From the parameters just trained and the statistics as stored (what a later reader of the stage sees).
    writer = end.writer if end.writer is not None else writers.create_writer(end.stage.workdir)
    inv_stage.invert_stage(end.model, end.params, statistics.load_statistics(end.stats_file), end.cfg.inversion,
                           stage_data=end.cfg.data, buffer_fraction=float(end.cfg.continual.buffer_fraction),
                           seed=int(end.cfg.seed) + 1009 * end.stage.index,
                           workdir=end.stage.workdir, mesh=end.mesh, mesh_cfg=end.cfg.mesh, writer=writer,
                           stage_dir=end.stage.workdir, stats_file=end.stats_file, optimise=self.optimise)

  def replay_set(self, cfg, stage, source, earlier, model, params, mesh):
    if str(cfg.continual.invert_with) == "latest":
      folder = os.path.join(stage.workdir, REPLAY_DIR, source.name)
      prev_shapes = [tuple(s) for s in finished_info(earlier[-1])["image_shapes"]]
      return folder, self.synthesize_latest(cfg, stage, source, finished_info(source), folder, model, params, mesh,
                                            prev_shapes)
    summary = os.path.join(source.workdir, inv_stage.SUMMARY_FILE)
    if not os.path.isfile(summary):
      raise FileNotFoundError(f"{summary} not found: {source.name} ended without its synthetic set "
                              "(config.continual.invert_with='own' synthesises it at the end of every stage)")
    return os.path.join(source.workdir, SYNTHETIC_DIR), int(read_record(summary)["num_samples"])

  def synthesize_latest(self, cfg, stage, t, info: dict, folder: str, model, params, mesh,
                        prev_shapes: list[tuple[int, ...]]) -> int:
    """Algorithm 1, lines 3-8: stage t's synthetic set from the newest model f_{T-1} and t's statistics.

    L_task runs through f_{T-1}'s decoder, which stage T-1 re-initialised and trained on its own data only: its
    pixel head of stage t's dimensionality was never trained when stage T-1 had the other one (2D vs 3D), and
    L_task is then switched off for this set (an untrained head would only add noise to the objective)."""
    marker = folder + ".json"
    if os.path.isfile(marker) and os.path.isdir(folder):
      return int(read_record(marker)["num_samples"])
    inv = engine.resolve_grey(cfg.inversion, str(data_lib.resolve(t.data[0]).modality))
    shape = tuple(int(s) for s in info["image_shapes"][0])
    if float(inv.loss_weights.get("task", 0.0)) != 0.0 and len(shape) not in {len(s) for s in prev_shapes}:
      logging.warning("%s: re-inverting %s from %s, whose %dD pixel head was never trained (its stage was %dD): "
                      "L_task is off for this set", stage.name, t.name, "f_{T-1}", len(shape) - 1,
                      len(prev_shapes[0]) - 1)
      inv.loss_weights.task = 0.0
    stats = statistics.load_statistics(os.path.join(t.workdir, inv.stats_file))
    n = int(inv.num_samples) if int(inv.num_samples) > 0 else buffers.buffer_size(
        int(info["num_examples"][0]), float(cfg.continual.buffer_fraction))
    key = stage_key(cfg, 0x5E7, stage.index, t.index)
    if self.optimise:
      images, report = engine.synthesize_with_report(model, params, stats, inv, image_shape=shape, rng=key,
                                                     num_samples=n, mesh=mesh, mesh_cfg=cfg.mesh)
    else:  # the control: the generator's output, not optimised
      images, report = engine.generator_at_init(inv, image_shape=shape, rng=key, num_samples=n), dict(end={})
    npz_io.write_shards(folder, images, int(inv.shard_size))
    atomic_write_json(marker, dict(num_samples=int(len(images)), source_stage=t.name, model="previous stage",
                                   task_weight=float(inv.loss_weights.get("task", 0.0)),
                                   end={k: v for k, v in report["end"].items()}))
    return int(len(images))

  def retains(self, c, text):
    if text:
      return ("real_buffer",)  # the real text buffer (continual/text.py)
    # 'own' keeps the stage's synthetic set for every later stage (as large as a real buffer); only 'latest'
    # keeps nothing but the statistics between stages.
    return ("statistics", "synthetic") if str(c.invert_with) == "own" else ("statistics",)


methods.register(Synthetic("invcoss"))
