"""The `stats` and `invert` jobs.

stats:  one pass of a trained stage over its whole dataset -> `workdir/statistics.npz` and
        `workdir/statistics.json` (its size next to that of a 1/5/10 % real replay buffer).
invert: `config.init_from` = a trained stage's workdir -> `workdir/synthetic/shard_*.npz` (key `images`,
        float32, model layout; read back by the input layer with format='npz', preprocessed=True,
        path=<that folder>), `workdir/synthetic_grid.png`, TensorBoard curves of every loss term and
        `workdir/inversion.json` (the achieved L_norm and the per-batch losses).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from invcoss_jax.inversion import engine, losses, statistics
from invcoss_jax import faults
from invcoss_jax.io_utils import atomic_path, atomic_savez, atomic_write_json, remove_stale

SYNTHETIC_DIR = "synthetic"
GRID_FILE = "synthetic_grid.png"
SUMMARY_FILE = "inversion.json"
STATS_SUMMARY_FILE = "statistics.json"


def _mesh(config: ml_collections.ConfigDict):
  from invcoss_jax.parallel import mesh as mesh_lib
  return mesh_lib.make_mesh(config.mesh)


def statistics_path(workdir: str | os.PathLike, inv_cfg: ml_collections.ConfigDict) -> str:
  return os.path.join(os.fspath(workdir), inv_cfg.stats_file)


def run_stats(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, params=None
              ) -> statistics.FeatureStats:
  """Statistics pass of the stage in `workdir` over `config.data` (its whole `split`).

  With `params` None the stage's latest checkpoint is loaded (its model config from `workdir/config.json`);
  otherwise `params` belong to `build_mae(config.model)` (the `pretrain` job passes its final parameters).
  """
  from invcoss_jax import data as data_lib
  from invcoss_jax import models

  workdir = os.fspath(workdir)
  mesh = _mesh(config)
  if params is None:
    from invcoss_jax.train.checkpoint import load_trained_stage
    _, model, params = load_trained_stage(workdir)
  else:
    model = models.build_mae(config.model)
  inv = config.inversion
  batches = data_lib.make_eval_iterator(config.data, batch_size=int(inv.stats_batch_size),
                                        process_index=jax.process_index(), process_count=jax.process_count())
  stats = statistics.compute_statistics(model, params, batches, mesh=mesh)
  path = statistics_path(workdir, inv)
  file_bytes = statistics.save_statistics(path, stats)
  nbytes = statistics.statistics_nbytes(stats)
  buffers = {f"{f:g}": statistics.replay_buffer_nbytes(config.data, float(f)) for f in inv.buffer_fractions}
  summary = dict(
      file=os.path.basename(path), count=int(stats.count), num_blocks=int(stats.mean.shape[0]),
      tokens=int(stats.mean.shape[1]), width=int(stats.mean.shape[2]), statistics_bytes=nbytes,
      file_bytes=file_bytes, dataset=str(config.data.name), num_examples=int(data_lib.num_examples(config.data)),
      image_shape=list(data_lib.image_shape(config.data)), replay_buffer_bytes=buffers,
      replay_buffer_layout="float32 model input, uncompressed",
      buffer_over_statistics={k: v / nbytes for k, v in buffers.items()})
  atomic_write_json(os.path.join(workdir, STATS_SUMMARY_FILE), summary)
  logging.info("statistics of %d examples -> %s: %d bytes; a real replay buffer would take %s",
               summary["count"], path, nbytes,
               ", ".join(f"{float(k) * 100:g} %: {v} bytes ({v / nbytes:.1f}x)" for k, v in buffers.items()))
  return stats


def num_synthetic_samples(inv_cfg: ml_collections.ConfigDict, stage_data_cfg) -> int:
  """config.inversion.num_samples, or buffer_fraction of the stage's dataset (at least 1)."""
  if int(inv_cfg.num_samples) > 0:
    return int(inv_cfg.num_samples)
  from invcoss_jax import data as data_lib
  frac = float(inv_cfg.buffer_fraction)
  if not 0.0 < frac <= 1.0:
    raise ValueError(f"config.inversion.buffer_fraction must be in (0, 1], got {frac}")
  return max(1, int(frac * data_lib.num_examples(stage_data_cfg)))


def image_grid(images: np.ndarray, max_images: int, pad: int = 2) -> np.ndarray:
  """(rows*h, cols*w, 3) uint8 grid; 3D volumes show their middle slice, each image scaled by its range."""
  x = np.asarray(images[:max_images], np.float32)
  if x.ndim == 5:
    x = x[:, x.shape[1] // 2]
  lo = x.min(axis=(1, 2, 3), keepdims=True)
  hi = x.max(axis=(1, 2, 3), keepdims=True)
  x = np.clip((x - lo) / np.maximum(hi - lo, 1e-6), 0.0, 1.0)
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  n, h, w, _ = x.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.float32)
  for i in range(n):
    r, c = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = x[i, ..., :3]
  return (grid * 255.0 + 0.5).astype(np.uint8)


def write_png(path: str, rgb: np.ndarray) -> None:
  from PIL import Image
  with atomic_path(path) as tmp:
    Image.fromarray(rgb).save(tmp, format="PNG")


def write_shards(folder: str, images: np.ndarray, shard_size: int) -> list[str]:
  """Replaces `folder` by npz shards `shard_00000.npz`, ... (key `images`), all written before the swap."""
  if shard_size < 1:
    raise ValueError(f"config.inversion.shard_size must be >= 1, got {shard_size}")
  parent = os.path.dirname(os.path.abspath(folder))
  os.makedirs(parent, exist_ok=True)
  for stale in (".tmp-", ".old-"):  # left by a writer killed before its swap or clean-up
    remove_stale(parent, stale + os.path.basename(folder) + "-")
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(folder) + "-", dir=parent)
  try:
    names = []
    for i, start in enumerate(range(0, len(images), shard_size)):
      name = f"shard_{i:05d}.npz"
      atomic_savez(os.path.join(tmp, name), images=np.asarray(images[start:start + shard_size], np.float32))
      names.append(name)
    faults.point("atomic:" + os.path.basename(folder))
    old = None
    if os.path.exists(folder):
      old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(folder) + "-", dir=parent)
      os.replace(folder, os.path.join(old, "x"))
    os.replace(tmp, folder)
    if old:
      shutil.rmtree(old)
    return names
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


def _batches(images: np.ndarray, batch_size: int):
  for start in range(0, len(images), batch_size):
    yield images[start:start + batch_size]


def run_invert(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Inverts the stage in `config.init_from` into `workdir` (see the module doc); returns the summary."""
  from invcoss_jax import data as data_lib
  from invcoss_jax.train.checkpoint import load_trained_stage
  from invcoss_jax.train.writers import create_writer

  workdir = os.fspath(workdir)
  stage_dir = str(config.get("init_from", "") or "")
  if not stage_dir:
    raise ValueError("config.init_from must name the workdir of a trained stage (its checkpoint and "
                     "statistics.npz) for config.mode='invert'")
  stage_cfg, model, params = load_trained_stage(stage_dir)
  inv = engine.resolve_grey(config.inversion, str(data_lib.resolve(stage_cfg.data).modality))
  stats_file = statistics_path(stage_dir, inv)
  stats = statistics.load_statistics(stats_file)
  image_shape = tuple(int(s) for s in data_lib.image_shape(stage_cfg.data))
  num_samples = num_synthetic_samples(inv, stage_cfg.data)
  mesh = _mesh(config)

  os.makedirs(workdir, exist_ok=True)
  writer = create_writer(workdir)
  try:
    images, report = engine.synthesize_with_report(
        model, params, stats, inv, image_shape=image_shape, rng=jax.random.key(int(config.seed)),
        num_samples=num_samples, mesh=mesh, mesh_cfg=config.mesh, writer=writer)
    # The achieved L_norm of the whole synthetic set against the stored statistics.
    synth_stats = statistics.compute_statistics(model, params, _batches(images, int(inv.stats_batch_size)),
                                                mesh=mesh)
    achieved = float(losses.l_norm(jnp.asarray(synth_stats.mean, jnp.float32),
                                   jnp.asarray(synth_stats.var, jnp.float32),
                                   jnp.asarray(stats.mean), jnp.asarray(stats.var)))
    writer.write_scalars(sum(b["steps"] for b in report["batches"]), {"inversion/l_norm_synthetic_set": achieved})
  finally:
    writer.flush()
    writer.close()

  shards = write_shards(os.path.join(workdir, SYNTHETIC_DIR), images, int(inv.shard_size))
  write_png(os.path.join(workdir, GRID_FILE), image_grid(images, int(inv.grid_size)))
  summary = {k: v for k, v in report.items() if k != "features"}
  summary.update(
      stage=os.path.abspath(stage_dir), statistics=os.path.abspath(stats_file), image_shape=list(image_shape),
      grey=str(inv.grey), l_norm_synthetic_set=achieved, l_norm_start=report["start"].get("norm"), l_norm_end=report["end"].get("norm"),
      shards=shards, synthetic_dir=SYNTHETIC_DIR,
      input_layer=dict(format="npz", preprocessed=True, path=os.path.join(os.path.abspath(workdir), SYNTHETIC_DIR)))
  atomic_write_json(os.path.join(workdir, SUMMARY_FILE), summary)
  logging.info("inversion of %s: %d samples in %d shards under %s; L_norm per batch %s -> %s, whole set %.4g",
               stage_dir, len(images), len(shards), os.path.join(workdir, SYNTHETIC_DIR),
               summary["l_norm_start"], summary["l_norm_end"], achieved)
  return summary
