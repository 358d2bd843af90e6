"""The `audit` job: how much a stage's synthetic data (and, for reference, a real replay buffer) reveals
about the stage's training images. Definitions and how to read the report: docs/privacy_audit.md.

`run(config, workdir)` with `config.init_from` = a trained stage's workdir writes into `workdir`:
  audit.json            every number below, with the options that produced it
  audit.md              a readable summary
  closest_pairs_*.png   per set: the queries closest to a training image, next to that image
  nn_distances.png      nearest-training distances of every set against the memorisation threshold
  spectra.png           mean radial power spectra; mia_losses.png: loss distributions of the attack

One pass streams the stage's training split (every training image is a reference); the held-out queries,
the synthetic set and the replay buffer sit in memory (each capped by `config.audit.max_*`).
"""

from __future__ import annotations

import glob
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from invcoss_jax.audit import distances, figures, forward, membership, memorisation, report, spectrum
from invcoss_jax.data import registry as data_registry
from invcoss_jax.io_utils import atomic_write, atomic_write_json
from invcoss_jax.workdir import SYNTHETIC_DIR

AUDIT_FILE = "audit.json"
SUMMARY_FILE = "audit.md"
SPACES = ("pixel", "feature")
HELDOUT = "heldout"
# Streams folded into the audit seed, so member and held-out masks are drawn independently.
_MEMBER_STREAM, _HELDOUT_STREAM = 0xA0D1, 0xA0D2


# ----------------------------------------------------------------------------------------------------
# Data sections and sets.


def stage_data_section(stage_data: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict,
                       option: str) -> ml_collections.ConfigDict:
  """The stage's `config.data` with the non-empty fields of `overrides` (`config.audit.*_data`) replaced."""
  out = ml_collections.ConfigDict(stage_data.to_dict())
  for key, value in overrides.items():
    if value in ("", None):
      continue
    if key not in out:
      raise ValueError(f"{option}.{key}: the stage's data section has no field {key!r}; expected one of "
                       f"{sorted(out.keys())}")
    if isinstance(out[key], ml_collections.ConfigDict):
      out[key].update(value.to_dict() if hasattr(value, "to_dict") else dict(value))
    else:
      out[key] = value
  return out


def shard_folder(path: str, option: str) -> str:
  """`path` itself when it holds .npz shards, else `path/synthetic` (the workdir of an `invert` run)."""
  if not path or not os.path.isdir(path):
    raise FileNotFoundError(f"{option}={path!r} is not a folder: expected a folder of .npz shards (key "
                            f"'images') or the workdir of an `invert` run (with synthetic/ inside)")
  if glob.glob(os.path.join(path, "*.npz")):
    return path
  sub = os.path.join(path, SYNTHETIC_DIR)
  if os.path.isdir(sub) and glob.glob(os.path.join(sub, "*.npz")):
    return sub
  raise FileNotFoundError(f"{option}={path!r} holds no .npz shards (nor does {sub!r}): run "
                          f"`--config.mode=invert` first, or point {option} at the shards")


def check_heldout_is_unseen(train: ml_collections.ConfigDict, heldout: ml_collections.ConfigDict) -> None:
  """The held-out split must not be (or contain) the training split: it stands for unseen patients."""
  from invcoss_jax import data as data_lib
  t, h = data_lib.resolve(train), data_lib.resolve(heldout)
  same_files = (t.format, os.path.abspath(t.path)) == (h.format, os.path.abspath(h.path))
  if same_files and (t.split == h.split or "all" in (t.split, h.split)):
    raise ValueError(f"config.audit.heldout_data reads split {h.split!r} of {h.path!r}, which overlaps the "
                     f"training split {t.split!r}: expected images the stage never saw (e.g. "
                     f"--config.audit.heldout_data.split=val, or a path to other patients' images)")


def subset(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
  """All of range(n) when cap <= 0 or cap >= n, else `cap` indices drawn without replacement (sorted)."""
  if cap <= 0 or cap >= n:
    return np.arange(n)
  return np.sort(rng.choice(n, size=cap, replace=False))


def read_examples(data_cfg: ml_collections.ConfigDict, indices: np.ndarray, batch_size: int,
                  split: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(indices, images float32) batches of the given examples of a split, preprocessed without augmentation."""
  from invcoss_jax import data as data_lib
  source = data_lib.make_source(data_cfg, split)
  preprocess = data_lib.make_preprocessor(data_cfg)
  for start in range(0, len(indices), batch_size):
    idx = indices[start:start + batch_size]
    yield idx, np.stack([np.asarray(preprocess(source[int(i)], None)["image"], np.float32) for i in idx])


def gather(data_cfg: ml_collections.ConfigDict, indices: np.ndarray, batch_size: int) -> np.ndarray:
  parts = [x for _, x in read_examples(data_cfg, indices, batch_size)]
  return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


def _pad(x: np.ndarray, rows: int) -> np.ndarray:
  if len(x) == rows:
    return x
  return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])


def batched(fn, params, images: np.ndarray, batch_size: int, *extra: np.ndarray) -> np.ndarray:
  """fn(params, images[, extra...]) over fixed-size (padded) batches, rows concatenated on the host."""
  out = []
  for start in range(0, len(images), batch_size):
    n = len(images[start:start + batch_size])
    args = [_pad(a[start:start + batch_size], batch_size) for a in (images, *extra)]
    out.append(np.asarray(jax.device_get(fn(params, *args)))[:n])
  return np.concatenate(out)


def example_keys(seed: int, stream: int, indices: np.ndarray) -> np.ndarray:
  """One PRNG key per example, folded from its index: its masks do not depend on the batch it is in."""
  base = jax.random.fold_in(jax.random.PRNGKey(seed), stream)
  return np.asarray(jax.vmap(lambda i: jax.random.fold_in(base, i))(np.asarray(indices, np.uint32)))


# ----------------------------------------------------------------------------------------------------
# The job.


def _check_options(a: ml_collections.ConfigDict) -> None:
  if int(a.batch_size) < 1:
    raise ValueError(f"config.audit.batch_size must be >= 1, got {a.batch_size}")
  if not 0.0 < float(a.memorisation_quantile) < 1.0:
    raise ValueError(f"config.audit.memorisation_quantile must be in (0, 1), got {a.memorisation_quantile}")
  if float(a.buffer_fraction) > 1.0:
    raise ValueError(f"config.audit.buffer_fraction must be <= 1 (a fraction of the training split), got "
                     f"{a.buffer_fraction}")
  if int(a.num_pairs) < 1:
    raise ValueError(f"config.audit.num_pairs must be >= 1, got {a.num_pairs}")


def _membership_inference(a, loss_fn, params, heldout: dict, member_losses: np.ndarray, mask_ratio: float
                          ) -> tuple[dict[str, Any], np.ndarray]:
  """The loss-threshold attack: training (members) vs held-out (non-members) images; (its figures, the
  held-out losses)."""
  heldout_losses = batched(loss_fn, params, heldout["images"], int(a.batch_size),
                           example_keys(int(a.seed), _HELDOUT_STREAM, heldout["indices"])).astype(np.float64)
  member_scores, nonmember_scores = -member_losses, -heldout_losses
  mia = membership.bootstrap_auc(member_scores, nonmember_scores, num_bootstrap=int(a.num_bootstrap),
                                 level=float(a.ci_level), seed=int(a.seed))
  mia.update(tpr_at_fpr={f"{f:g}": membership.tpr_at_fpr(member_scores, nonmember_scores, float(f))
                         for f in a.tpr_at_fpr},
             mean_loss_members=float(member_losses.mean()), mean_loss_nonmembers=float(heldout_losses.mean()),
             mask_ratio=mask_ratio, num_masks=int(a.mia_num_masks))
  return mia, heldout_losses


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Audits the stage in `config.init_from`; writes audit.json, audit.md and the figures into `workdir`
  (process 0) and returns what audit.json holds."""
  from invcoss_jax import data as data_lib
  from invcoss_jax.train.checkpoint import load_trained_stage

  workdir = os.fspath(workdir)
  stage_dir = str(config.init_from or "")
  if not stage_dir:
    raise ValueError("config.init_from must name the workdir of a trained stage (its checkpoint and "
                     "config.json) for config.mode='audit'")
  a = config.audit
  _check_options(a)
  if os.path.isdir(workdir) and not os.path.exists(os.path.join(workdir, AUDIT_FILE)) and any(
      n.endswith((".png", ".npz", ".json")) and n not in ("workdir.json", "config.json") for n in os.listdir(workdir)):
    logging.warning("%s holds outputs of an audit that did not finish: auditing again from the start (the "
                    "audit keeps no partial state; every output is replaced)", workdir)
  rng = np.random.default_rng(int(a.seed))

  stage_cfg, model, params = load_trained_stage(stage_dir)
  train_data = stage_data_section(stage_cfg.data, a.train_data, "config.audit.train_data")
  heldout_data = stage_data_section(stage_cfg.data, a.heldout_data, "config.audit.heldout_data")
  check_heldout_is_unseen(train_data, heldout_data)
  shape = tuple(int(s) for s in data_lib.image_shape(train_data))
  if tuple(data_lib.image_shape(heldout_data)) != shape:
    raise ValueError(f"config.audit.heldout_data gives images of shape {data_lib.image_shape(heldout_data)}, "
                     f"the training split {shape}: both must have the model's input shape")
  n_train = data_lib.num_examples(train_data)

  sets = _query_sets(a, stage_cfg.data, train_data, heldout_data, stage_dir, n_train, shape, rng)
  feature_fn = forward.make_feature_fn(model, str(a.feature), bool(a.normalize_features))
  mask_ratio = float(a.mia_mask_ratio) if float(a.mia_mask_ratio) >= 0 else float(stage_cfg.train.mask_ratio)
  loss_fn = forward.make_loss_fn(model, mask_ratio, int(a.mia_num_masks))
  for s in sets.values():
    # Query vectors live on the device for the whole pass: no copy per training batch.
    s["vectors"] = {"pixel": jnp.asarray(distances.flatten_samples(s["images"])),
                    "feature": jnp.asarray(batched(feature_fn, params, s["images"], int(a.batch_size)))}
  members = subset(n_train, int(a.max_members), rng)
  stream = _stream_training(a, train_data, sets, members, feature_fn, loss_fn, params)

  heldout = sets[HELDOUT]
  mia, heldout_losses = _membership_inference(a, loss_fn, params, heldout, stream["member_losses"], mask_ratio)

  # Distances (pixel ones as RMS differences per value), memorisation, high-frequency energy of every set.
  pixel_scale = 1.0 / np.sqrt(float(np.prod(shape)))
  to_train = {key: st.distance.astype(np.float64) * (pixel_scale if key[1] == "pixel" else 1.0)
              for key, st in stream["neighbours"].items()}
  thresholds = {sp: memorisation.memorisation_threshold(to_train[(HELDOUT, sp)], float(a.memorisation_quantile))
                for sp in SPACES}
  train_hf = stream["member_hf"]
  results = {name: _set_results(a, name, s, heldout, to_train, train_hf.mean(), pixel_scale)
             for name, s in sets.items()}
  out = dict(
      stage=os.path.abspath(stage_dir), workdir=os.path.abspath(workdir), image_shape=list(shape),
      train=dict(source=f"{data_lib.resolve(train_data).path} (split {train_data.split!r})", num_examples=n_train),
      heldout=dict(source=heldout["source"], num_examples=int(heldout["size"])),
      membership_inference=mia,
      memorisation_thresholds=dict(quantile=float(a.memorisation_quantile), **thresholds),
      high_frequency=dict(cutoff=float(a.hf_cutoff), training=dict(
          mean=float(train_hf.mean()), median=float(np.median(train_hf)), num_samples=int(train_hf.size))),
      sets={k: v for k, v in results.items() if k != HELDOUT},
      heldout_reference=results[HELDOUT],
      units=dict(pixel="root-mean-square difference per value, in the model's input range",
                 feature=f"Euclidean distance between {'L2-normalised ' if a.normalize_features else ''}"
                         f"'{a.feature}' encoder features"),
      config=a.to_dict())
  if jax.process_index() == 0:
    _write_outputs(a, workdir, out, sets, stream, to_train, thresholds, heldout_losses)
  logging.info("audit of %s: MIA AUC %.3f %s; memorisation (pixel) %s", stage_dir, mia["auc"], mia["ci"],
               {k: v["pixel"]["memorisation"]["rate"] for k, v in out["sets"].items()})
  return out


def _query_sets(a, stage_data, train_data, heldout_data, stage_dir: str, n_train: int,
                shape: tuple[int, ...], rng: np.random.Generator) -> dict[str, dict[str, Any]]:
  """The sets held in memory: held-out queries, the synthetic set and the replay buffer (if any), each
  dict(images, indices (within its source), size (of its source), source (words))."""
  from invcoss_jax import data as data_lib
  bs = int(a.batch_size)
  n_heldout = data_lib.num_examples(heldout_data)
  idx = subset(n_heldout, int(a.max_heldout), rng)
  sets = {HELDOUT: dict(images=gather(heldout_data, idx, bs), indices=idx, size=n_heldout,
                        source=f"{data_lib.resolve(heldout_data).path} (split {heldout_data.split!r})")}
  synthetic_dir = shard_folder(str(a.synthetic_path or os.path.join(stage_dir, SYNTHETIC_DIR)),
                               "config.audit.synthetic_path")
  sets["synthetic"] = _npz_set(stage_data, synthetic_dir, int(a.max_synthetic), rng, bs, shape)
  if a.buffer_path:
    sets["er_buffer"] = _npz_set(stage_data, shard_folder(str(a.buffer_path), "config.audit.buffer_path"),
                                 int(a.max_buffer), rng, bs, shape)
  elif float(a.buffer_fraction) > 0:
    size = max(1, int(round(float(a.buffer_fraction) * n_train)))
    drawn = np.sort(rng.choice(n_train, size=size, replace=False))  # method `er`: uniform over the split
    idx = drawn[subset(size, int(a.max_buffer), rng)]
    sets["er_buffer"] = dict(images=gather(train_data, idx, bs), indices=idx, size=size,
                             source=f"{size} training images drawn uniformly (method er, "
                                    f"{float(a.buffer_fraction):g} of the split)")
  for name, s in sets.items():
    logging.info("audit: %s: %d samples in memory (%s)", name, len(s["images"]), s["source"])
  return sets


def _stream_training(a, train_data, sets, members: np.ndarray, feature_fn, loss_fn, params) -> dict[str, Any]:
  """One pass over the training split: every training image is a reference of every set's nearest-neighbour
  search (pixel and feature space); the `members` also get their attack loss and spectra."""
  from invcoss_jax import data as data_lib
  bs, cutoff, bins = int(a.batch_size), float(a.hf_cutoff), int(a.spectrum_bins)
  chunking = dict(query_chunk=int(a.query_chunk), ref_chunk=int(a.ref_chunk),
                  max_block_elements=int(a.max_block_elements))
  member_pos = {int(i): p for p, i in enumerate(members)}
  member_losses = np.full((len(members),), np.nan, np.float64)
  member_hf, member_profiles = [], []
  neighbours = {(n, sp): distances.init_neighbours(len(s["images"])) for n, s in sets.items() for sp in SPACES}
  thumb_shape = figures.thumbnail(sets[HELDOUT]["images"][:1], int(a.thumbnail_size)).shape[1:]
  # The current nearest training image of every query, as a thumbnail (for the closest-pairs figures).
  thumbs = {key: np.zeros((len(sets[key[0]]["images"]), *thumb_shape), np.float32) for key in neighbours}
  offset = 0
  for batch in data_lib.make_eval_iterator(train_data, batch_size=bs, process_index=0, process_count=1):
    x = np.asarray(batch["image"], np.float32)
    refs = {"pixel": x, "feature": batched(feature_fn, params, x, bs)}
    batch_thumbs = figures.thumbnail(x, int(a.thumbnail_size))
    for (name, sp), old in neighbours.items():
      new = distances.update_neighbours(old, sets[name]["vectors"][sp], refs[sp], ref_offset=offset, **chunking)
      changed = new.index != old.index
      thumbs[(name, sp)][changed] = batch_thumbs[new.index[changed] - offset]
      neighbours[(name, sp)] = new
    rows = np.asarray([r for r in range(len(x)) if offset + r in member_pos], np.int64)
    if rows.size:
      member_losses[[member_pos[int(offset + r)] for r in rows]] = batched(
          loss_fn, params, x[rows], bs, example_keys(int(a.seed), _MEMBER_STREAM, offset + rows))
      member_hf.append(spectrum.high_frequency_energy_ratio(x[rows], cutoff))
      member_profiles.append(spectrum.radial_profile(x[rows], bins)[1])
    offset += len(x)
  if offset != data_lib.num_examples(train_data) or np.isnan(member_losses).any():
    raise RuntimeError(f"the training split yielded {offset} examples, fewer than it has")
  logging.info("audit: streamed %d training images", offset)
  return dict(neighbours=neighbours, thumbs=thumbs, member_losses=member_losses,
              member_hf=np.concatenate(member_hf), member_profile=np.concatenate(member_profiles).mean(0))


def _set_results(a, name: str, s: dict, heldout: dict, to_train: dict, train_hf_mean: float,
                 pixel_scale: float) -> dict[str, Any]:
  """Distances, memorisation rates and high-frequency energy of one set (the held-out set: its distances and
  energy only, it defines the threshold)."""
  chunking = dict(query_chunk=int(a.query_chunk), ref_chunk=int(a.ref_chunk),
                  max_block_elements=int(a.max_block_elements))
  r: dict[str, Any] = dict(source=s["source"], num_samples=int(len(s["images"])), set_size=int(s["size"]))
  for sp in SPACES:
    d = to_train[(name, sp)]
    entry: dict[str, Any] = dict(to_train=distances.summarize_distances(d))
    if name != HELDOUT:
      to_heldout = distances.nearest_neighbours(s["vectors"][sp], heldout["vectors"][sp], **chunking).distance
      to_heldout = to_heldout.astype(np.float64) * (pixel_scale if sp == "pixel" else 1.0)
      entry["to_heldout"] = distances.summarize_distances(to_heldout)
      entry["median_ratio_train_over_heldout"] = float(np.median(d / np.maximum(to_heldout, 1e-12)))
      entry["memorisation"] = memorisation.bootstrap_memorisation(
          d, to_train[(HELDOUT, sp)], float(a.memorisation_quantile), num_bootstrap=int(a.num_bootstrap),
          level=float(a.ci_level), seed=int(a.seed))
    r[sp] = entry
  hf = spectrum.high_frequency_energy_ratio(s["images"], float(a.hf_cutoff))
  r["high_frequency"] = dict(mean=float(hf.mean()), median=float(np.median(hf)),
                             relative_to_training=float(hf.mean() / max(train_hf_mean, 1e-30)))
  return r


def _write_outputs(a, workdir: str, out: dict, sets: dict, stream: dict, to_train: dict, thresholds: dict,
                   heldout_losses: np.ndarray) -> None:
  """The figures, then audit.json and audit.md (all atomic); records the figure names in `out`."""
  os.makedirs(workdir, exist_ok=True)
  paths = figures.figure_paths(workdir, list(sets))
  k = int(a.num_pairs)
  for name, s in sets.items():
    panels = []
    for sp in SPACES:
      order = np.argsort(to_train[(name, sp)], kind="stable")[:k]
      panels.append(dict(name=sp, queries=figures.thumbnail(s["images"][order], int(a.thumbnail_size)),
                         neighbours=stream["thumbs"][(name, sp)][order], distances=to_train[(name, sp)][order],
                         indices=stream["neighbours"][(name, sp)].index[order],
                         query_indices=np.asarray(s["indices"])[order]))
    figures.closest_pairs(paths[f"closest_pairs_{name}"], panels,
                          f"{name}: closest pairs to a training image (left query, right training image)")
  figures.distance_histograms(paths["distances"], {sp: {n: to_train[(n, sp)] for n in sets} for sp in SPACES},
                              thresholds, float(a.memorisation_quantile))
  bins = int(a.spectrum_bins)
  centres = spectrum.radial_profile(sets[HELDOUT]["images"][:1], bins)[0]
  profiles = {"training": stream["member_profile"]}
  profiles.update({n: spectrum.radial_profile(s["images"], bins)[1].mean(0) for n, s in sets.items()})
  figures.spectra(paths["spectra"], centres, profiles, float(a.hf_cutoff))
  mia = out["membership_inference"]
  figures.membership_losses(paths["membership"], stream["member_losses"], heldout_losses, mia["auc"], mia["ci"])
  out["figures"] = {key: os.path.basename(v) for key, v in paths.items()}
  atomic_write_json(os.path.join(workdir, AUDIT_FILE), out)
  atomic_write(os.path.join(workdir, SUMMARY_FILE), report.markdown(out))


def _npz_set(stage_data, folder: str, cap: int, rng: np.random.Generator, batch_size: int,
             shape: tuple[int, ...]) -> dict[str, Any]:
  from invcoss_jax import data as data_lib
  section = data_registry.npz_shards_section(stage_data, folder, split="all")
  n = data_lib.num_examples(section)
  idx = subset(n, cap, rng)
  images = gather(section, idx, batch_size)
  if images.shape[1:] != shape:
    raise ValueError(f"{folder}: samples of shape {images.shape[1:]}, expected the stage's {shape}")
  return dict(images=images, indices=idx, size=n, source=folder)
