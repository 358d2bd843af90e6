"""What inversion keeps of a trained stage, computed from its parameters in memory and written into a workdir.

- `write_statistics`: one pass over the stage's data -> `statistics.npz` and `statistics.json` (its size next
  to that of a 1/5/10 % real replay buffer).
- `invert_stage`: the synthetic set from the stage's model and statistics -> `synthetic/shard_*.npz` (key
  `images`, float32, model layout; read back by the input layer with format='npz', preprocessed=True),
  `synthetic_grid.png`, TensorBoard curves of every loss term and `inversion.json` (the achieved L_norm and the
  per-batch losses).
The `stats` and `invert` jobs (invcoss_jax/jobs/inversion.py) load a stage from disk and call these; a
continual stage calls them at its end on the parameters it has just trained.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from invcoss_jax import data as data_lib, npz_io
from invcoss_jax.config_checks import ConfigError, fraction_count
from invcoss_jax.inversion import engine, losses, statistics
from invcoss_jax.inversion.config import inversion_spec
from invcoss_jax.io_utils import atomic_write_json
from invcoss_jax.train.writers import image_grid, write_png
from invcoss_jax.workdir import SYNTHETIC_DIR

GRID_FILE = "synthetic_grid.png"
SUMMARY_FILE = "inversion.json"
STATS_SUMMARY_FILE = "statistics.json"


def statistics_path(workdir: str | os.PathLike, inv) -> str:
  """`inv`: config.inversion or its InversionSpec (as every function here)."""
  return os.path.join(os.fspath(workdir), inversion_spec(inv).host.stats_file)


def has_statistics(workdir: str | os.PathLike, inv) -> bool:
  """Whether the stage's statistics file exists with everything `inv` asks for (the pixel statistics
  when `pixel_statistics`: a stage copied from a run without them gets its statistics pass again)."""
  path = statistics_path(workdir, inv)
  if not os.path.isfile(path):
    return False
  host = inversion_spec(inv).host
  if not host.pixel_statistics:
    return True
  pixel = statistics.load_statistics(path).pixel
  if pixel is None:
    return False
  return not host.pixel_components or ("pca_var" in pixel and len(pixel["pca_var"]) == host.pixel_components)


def write_statistics(model, params, data_cfg: ml_collections.ConfigDict, inv, workdir: str | os.PathLike,
                     mesh, *, dp=None, seed: int = 0) -> statistics.FeatureStats:
  """Statistics pass of `model`/`params` over `data_cfg` (its whole split) into `workdir`.

  `dp`: a DP statistics plan (privacy.accounting.StatisticsPlan: clip_norm, noise_multiplier, dataset_size, the
  stage's composed epsilon, statistics_epsilon, delta): the pass is `statistics.compute_dp_statistics`, its noise
  key from `seed` (config.seed), and the file and statistics.json record its (epsilon, delta)."""
  workdir = os.fspath(workdir)
  host = inversion_spec(inv).host
  batches = data_lib.make_eval_iterator(data_cfg, batch_size=host.stats_batch_size,
                                        process_index=jax.process_index(), process_count=jax.process_count())
  privacy = None
  if dp is None:
    stats = statistics.compute_statistics(
        model, params, batches, mesh=mesh, pixel=host.pixel_statistics,
        pixel_components=host.pixel_components if host.pixel_statistics else 0,
        pixel_components_grid=inversion_spec(inv).program.pixel_components_grid)
  else:
    if host.pixel_statistics and host.pixel_components:
      raise ConfigError("config.inversion.pixel_components > 0 keeps the covariance of the images, which the DP "
                        "statistics pass does not privatise: set it to 0 with config.privacy on")
    stats, details = statistics.compute_dp_statistics(
        model, params, batches, num_examples=int(dp.dataset_size), clip_norm=float(dp.clip_norm),
        noise_multiplier=float(dp.noise_multiplier), key=statistics.statistics_noise_key(seed), mesh=mesh,
        pixel=host.pixel_statistics)
    # Computed on the data without noise (like DP-SGD's dp_clipped_fraction metric): logged, never written.
    logging.info("DP statistics: %.1f %% of the examples' contributions clipped to %g", 100 *
                 details.pop("clipped_fraction"), float(dp.clip_norm))
    privacy = dict(dp=True, epsilon=float(dp.epsilon), delta=float(dp.delta),
                   statistics_epsilon=float(dp.statistics_epsilon), noise_multiplier=float(dp.noise_multiplier),
                   clip_norm=float(dp.clip_norm), **details)
  path = statistics_path(workdir, inv)
  file_bytes = statistics.save_statistics(path, stats, dp=privacy)
  nbytes = statistics.statistics_nbytes(stats)
  buffers = {f"{f:g}": statistics.replay_buffer_nbytes(data_cfg, float(f)) for f in host.buffer_fractions}
  summary = dict(
      file=os.path.basename(path), count=int(stats.count), num_blocks=int(stats.mean.shape[0]),
      tokens=int(stats.mean.shape[1]), width=int(stats.mean.shape[2]), pixel_statistics=stats.pixel is not None,
      statistics_bytes=nbytes,
      file_bytes=file_bytes, dataset=str(data_cfg.name), num_examples=int(data_lib.num_examples(data_cfg)),
      image_shape=list(data_lib.image_shape(data_cfg)), replay_buffer_bytes=buffers,
      replay_buffer_layout="float32 model input, uncompressed",
      buffer_over_statistics={k: v / nbytes for k, v in buffers.items()})
  if privacy is not None:
    summary["privacy"] = privacy
  atomic_write_json(os.path.join(workdir, STATS_SUMMARY_FILE), summary)
  logging.info("statistics of %d examples -> %s: %d bytes; a real replay buffer would take %s",
               summary["count"], path, nbytes,
               ", ".join(f"{float(k) * 100:g} %: {v} bytes ({v / nbytes:.1f}x)" for k, v in buffers.items()))
  return stats


def num_synthetic_samples(inv, stage_data_cfg, buffer_fraction: float) -> int:
  """config.inversion.num_samples, or `buffer_fraction` (config.continual.buffer_fraction: as many as a real
  replay buffer) of the stage's dataset (at least 1)."""
  num_samples = inversion_spec(inv).host.num_samples
  if num_samples > 0:
    return num_samples
  return fraction_count("config.continual.buffer_fraction", buffer_fraction, data_lib.num_examples(stage_data_cfg))


def _batches(images: np.ndarray, batch_size: int):
  for start in range(0, len(images), batch_size):
    yield images[start:start + batch_size]


def invert_stage(model, params, stats: statistics.FeatureStats, inv, *, stage_data: ml_collections.ConfigDict,
                 buffer_fraction: float, seed: int, workdir: str | os.PathLike, mesh,
                 mesh_cfg: ml_collections.ConfigDict, writer, stage_dir: str, stats_file: str,
                 optimise: bool = True) -> dict[str, Any]:
  """Inverts the stage of `model`/`params` (trained on `stage_data`, statistics `stats`) into `workdir`;
  returns the summary also written as `inversion.json`. `inv` is config.inversion (read once here into its
  InversionSpec, with the grey setting resolved for the stage's modality); without
  config.inversion.num_samples the set holds `buffer_fraction` (config.continual.buffer_fraction) of the
  stage's examples.

  `optimise=False` writes the generator's output at initialisation instead, with the same layout, size and
  summary (the `noise` method: everything of invcoss but the inversion, so that a benchmark can tell what the
  inversion itself contributes)."""
  workdir = os.fspath(workdir)
  inv = engine.resolve_grey(inversion_spec(inv), str(data_lib.resolve(stage_data).modality))
  image_shape = tuple(int(s) for s in data_lib.image_shape(stage_data))
  num_samples = num_synthetic_samples(inv, stage_data, buffer_fraction)
  os.makedirs(workdir, exist_ok=True)
  if optimise:
    images, report = engine.synthesize_with_report(
        model, params, stats, inv, image_shape=image_shape, rng=jax.random.key(int(seed)),
        num_samples=num_samples, mesh=mesh, mesh_cfg=mesh_cfg, writer=writer)
  else:
    images = engine.generator_at_init(inv, image_shape=image_shape, rng=jax.random.key(int(seed)),
                                      num_samples=num_samples)
    if images is None:
      raise ValueError("the noise control replays the generator's output at initialisation; "
                       "config.inversion.generator='none' has no generator (pick invunet, cmi or cmi_large)")
    report = dict(num_samples=int(len(images)), generator=inv.program.generator, optimised=False, batches=[],
                  start={}, end={})
  # The achieved L_norm of the whole synthetic set against the stored statistics.
  synth_stats = statistics.compute_statistics(model, params, _batches(images, inv.host.stats_batch_size), mesh=mesh)
  achieved = float(losses.l_norm(jnp.asarray(synth_stats.mean, jnp.float32), jnp.asarray(synth_stats.var, jnp.float32),
                                 jnp.asarray(stats.mean), jnp.asarray(stats.var)))
  writer.write_scalars(sum(b["steps"] for b in report["batches"]), {"inversion/l_norm_synthetic_set": achieved})
  writer.flush()

  shards = npz_io.write_shards(os.path.join(workdir, SYNTHETIC_DIR), images, inv.host.shard_size)
  write_png(os.path.join(workdir, GRID_FILE), image_grid(images, inv.host.grid_size))
  summary = {k: v for k, v in report.items() if k != "features"}
  summary.update(
      stage=os.path.abspath(stage_dir), statistics=os.path.abspath(stats_file), image_shape=list(image_shape),
      grey=inv.program.grey, optimised=bool(optimise), l_norm_synthetic_set=achieved, l_norm_start=report["start"].get("norm"),
      l_norm_end=report["end"].get("norm"), shards=shards, synthetic_dir=SYNTHETIC_DIR,
      input_layer=dict(format="npz", preprocessed=True, path=os.path.join(os.path.abspath(workdir), SYNTHETIC_DIR)))
  atomic_write_json(os.path.join(workdir, SUMMARY_FILE), summary)
  logging.info("inversion of %s: %d samples in %d shards under %s; L_norm per batch %s -> %s, whole set %.4g",
               stage_dir, len(images), len(shards), os.path.join(workdir, SYNTHETIC_DIR),
               summary["l_norm_start"], summary["l_norm_end"], achieved)
  return summary
