"""The `audit` job: how much a stage's synthetic data (and, for reference, a real replay buffer) reveals
about the stage's training images. Definitions and how to read the report: docs/privacy_audit.md.

`run(config, workdir)` with `config.init_from` = a trained stage's workdir writes into `workdir`:
  audit.json            every number below, with the options that produced it, and the independent judges
                        of the synthetic set (`judges`, `judges_info`; config.audit.judges)
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

from invcoss_jax.audit import distances, figures, forward, memorisation, report, spectrum
from invcoss_jax.audit import evaluators as audit_evaluators  # noqa: F401 (registers the membership evaluator)
from invcoss_jax.config_checks import ConfigError, fraction_count
from invcoss_jax.data import registry as data_registry
from invcoss_jax.io_utils import atomic_write, atomic_write_json
from invcoss_jax.measure import features
from invcoss_jax.measure.evaluators import get_evaluator
from invcoss_jax.retention import evaluators as retention_evaluators  # noqa: F401 (registers the judges)
from invcoss_jax import data as data_lib, workdir as workdir_lib
from invcoss_jax.retention import judges
from invcoss_jax.train.checkpoint import load_trained_stage
from invcoss_jax.workdir import SYNTHETIC_DIR

AUDIT_FILE = "audit.json"
SUMMARY_FILE = "audit.md"
SPACES = ("pixel", "feature")
HELDOUT = "heldout"
# Streams folded into the audit seed, so member and held-out masks are drawn independently.
_MEMBER_STREAM, _HELDOUT_STREAM = 0xA0D1, 0xA0D2
# The judges' own random stream: enabling them changes no other number of the audit.
_JUDGES_STREAM = 0xA0D3
# Sets of the judges section, in the report's order.
JUDGED = ("synthetic", "er_buffer", "real_vs_real", "smoothed_noise")
PRDC_K = 5  # nearest neighbours of the PRDC manifolds (judges.judge_set's default)


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


def _read_batches(data_cfg: ml_collections.ConfigDict, indices: np.ndarray, batch_size: int,
                  split: str | None = None, source=None) -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
  """(indices, preprocessed examples) batches of the given examples of a split, without augmentation."""
  source = data_lib.make_source(data_cfg, split) if source is None else source
  preprocess = data_lib.make_preprocessor(data_cfg)
  for start in range(0, len(indices), batch_size):
    idx = indices[start:start + batch_size]
    yield idx, [preprocess(source[int(i)], None) for i in idx]


def read_examples(data_cfg: ml_collections.ConfigDict, indices: np.ndarray, batch_size: int,
                  split: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(indices, images float32) batches of the given examples of a split, preprocessed without augmentation."""
  for idx, examples in _read_batches(data_cfg, indices, batch_size, split):
    yield idx, np.stack([np.asarray(e["image"], np.float32) for e in examples])


def gather(data_cfg: ml_collections.ConfigDict, indices: np.ndarray, batch_size: int) -> np.ndarray:
  parts = [x for _, x in read_examples(data_cfg, indices, batch_size)]
  return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


def _class_labels(labels: list[np.ndarray], option: str) -> np.ndarray | None:
  """(N,) int64 class labels, or None (logged) when an example's label is not one class (e.g. multi-label)."""
  if any(np.size(v) != 1 for v in labels):
    logging.warning("audit judges: %s holds labels that are not one class per example (e.g. multi-label): "
                    "no judge net", option)
    return None
  return np.asarray([int(np.asarray(v).reshape(())) for v in labels], np.int64)


def gather_grey_labelled(data_cfg: ml_collections.ConfigDict, indices: np.ndarray, batch_size: int
                         ) -> tuple[np.ndarray | None, np.ndarray | None]:
  """The given examples as the judges see them, grey (N, H, W, 1) float32 (the central slice of a volume),
  with their class labels (N,); (None, None) when the split has no class labels."""
  source = data_lib.make_source(data_cfg, None)
  if not getattr(source, "has_labels", False):
    return None, None
  images, labels = [], []
  for _, examples in _read_batches(data_cfg, indices, batch_size, source=source):
    x = np.stack([np.asarray(e["image"], np.float32) for e in examples])
    images.append(judges.to_grey(x).astype(np.float32)[..., None])  # one batch in float64 at a time
    labels += [e["label"] for e in examples]
  y = _class_labels(labels, f"{data_lib.resolve(data_cfg).path} (split {data_cfg.split!r})")
  return (None, None) if y is None else (np.concatenate(images), y)


def read_labels(data_cfg: ml_collections.ConfigDict, indices: np.ndarray) -> np.ndarray | None:
  """The class labels (N,) of the given examples (raw records, nothing preprocessed); None without labels."""
  source = data_lib.make_source(data_cfg, None)
  if not getattr(source, "has_labels", False):
    return None
  return _class_labels([source[int(i)]["label"] for i in indices],
                       f"{data_lib.resolve(data_cfg).path} (split {data_cfg.split!r})")


def example_keys(seed: int, stream: int, indices: np.ndarray) -> np.ndarray:
  """One PRNG key per example, folded from its index: its masks do not depend on the batch it is in."""
  base = jax.random.fold_in(jax.random.PRNGKey(seed), stream)
  return np.asarray(jax.vmap(lambda i: jax.random.fold_in(base, i))(np.asarray(indices, np.uint32)))


# ----------------------------------------------------------------------------------------------------
# The job.


def _check_options(a: ml_collections.ConfigDict, buffer_fraction: float) -> None:
  if int(a.batch_size) < 1:
    raise ValueError(f"config.audit.batch_size must be >= 1, got {a.batch_size}")
  if not 0.0 < float(a.memorisation_quantile) < 1.0:
    raise ValueError(f"config.audit.memorisation_quantile must be in (0, 1), got {a.memorisation_quantile}")
  if bool(a.draw_buffer) and not a.buffer_path:
    fraction_count("config.continual.buffer_fraction", buffer_fraction, 1)  # in (0, 1]
  if int(a.num_pairs) < 1:
    raise ValueError(f"config.audit.num_pairs must be >= 1, got {a.num_pairs}")
  j = a.judges
  if j.enabled:
    if int(j.folds) < 2:
      raise ValueError(f"config.audit.judges.folds must be >= 2, got {j.folds}")
    for key in ("cnn_steps", "judge_net_steps"):
      if int(j[key]) < 0:
        raise ValueError(f"config.audit.judges.{key} must be >= 0 (0 skips it), got {j[key]}")
    if not float(j.noise_sigma) >= 0:
      raise ValueError(f"config.audit.judges.noise_sigma must be >= 0 pixels, got {j.noise_sigma}")


def check_config(config: ml_collections.ConfigDict) -> None:
  """config.init_from names a trained stage; checked before anything is written."""
  if not str(config.init_from or ""):
    raise ConfigError("config.init_from must name the workdir of a trained stage (its checkpoint and "
                      "config.json) for config.mode='audit'")
  workdir_lib.check_stage_workdir(str(config.init_from))


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Audits the stage in `config.init_from`; writes audit.json, audit.md and the figures into `workdir`
  (process 0) and returns what audit.json holds."""
  workdir = os.fspath(workdir)
  stage_dir = str(config.init_from or "")
  if not stage_dir:
    raise ValueError("config.init_from must name the workdir of a trained stage (its checkpoint and "
                     "config.json) for config.mode='audit'")
  a = config.audit
  buffer_fraction = float(config.continual.buffer_fraction)  # the buffer of method er, as the continual job's
  _check_options(a, buffer_fraction)
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

  sets = _query_sets(a, buffer_fraction, stage_cfg.data, train_data, heldout_data, stage_dir, n_train, shape, rng)
  feature_fn = forward.make_feature_fn(model, str(a.feature), bool(a.normalize_features))
  mask_ratio = float(a.mia_mask_ratio) if float(a.mia_mask_ratio) >= 0 else float(stage_cfg.train.mask_ratio)
  loss_fn = forward.make_loss_fn(model, mask_ratio, int(a.mia_num_masks))
  for s in sets.values():
    # Query vectors live on the device for the whole pass: no copy per training batch.
    s["vectors"] = {"pixel": jnp.asarray(distances.flatten_samples(s["images"])),
                    "feature": jnp.asarray(features.batched(feature_fn, params, s["images"], int(a.batch_size)))}
  members = subset(n_train, int(a.max_members), rng)
  stream = _stream_training(a, train_data, sets, members, feature_fn, loss_fn, params)

  heldout = sets[HELDOUT]
  # The loss-threshold attack: training (members) vs held-out (non-members) images.
  attack = get_evaluator("membership")(
      loss_fn, heldout["images"], example_keys(int(a.seed), _HELDOUT_STREAM, heldout["indices"]),
      stream["member_losses"], batch_size=int(a.batch_size), num_bootstrap=int(a.num_bootstrap),
      ci_level=float(a.ci_level), seed=int(a.seed), tpr_at_fpr=tuple(a.tpr_at_fpr), mask_ratio=mask_ratio,
      num_masks=int(a.mia_num_masks))
  mia = attack.run(params)
  heldout_losses = attack.heldout_losses

  # Distances (pixel ones as RMS differences per value), memorisation, high-frequency energy of every set.
  pixel_scale = 1.0 / np.sqrt(float(np.prod(shape)))
  to_train = {key: st.distance.astype(np.float64) * (pixel_scale if key[1] == "pixel" else 1.0)
              for key, st in stream["neighbours"].items()}
  thresholds = {sp: memorisation.memorisation_threshold(to_train[(HELDOUT, sp)], float(a.memorisation_quantile))
                for sp in SPACES}
  train_hf = stream["member_hf"]
  results = {name: _set_results(a, name, s, heldout, to_train, train_hf.mean(), pixel_scale)
             for name, s in sets.items()}
  judged = _judge_sets(a, train_data, heldout_data, sets, n_train, shape) if a.judges.enabled else None
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
  if judged is not None:
    out["judges"], out["judges_info"] = judged
  if jax.process_index() == 0:
    _write_outputs(a, workdir, out, sets, stream, to_train, thresholds, heldout_losses)
  logging.info("audit of %s: MIA AUC %.3f %s; memorisation (pixel) %s", stage_dir, mia["auc"], mia["ci"],
               {k: v["pixel"]["memorisation"]["rate"] for k, v in out["sets"].items()})
  return out


def _query_sets(a, buffer_fraction: float, stage_data, train_data, heldout_data, stage_dir: str, n_train: int,
                shape: tuple[int, ...], rng: np.random.Generator) -> dict[str, dict[str, Any]]:
  """The sets held in memory: held-out queries, the synthetic set and the replay buffer (if any), each
  dict(images, indices (within its source), size (of its source), source (words)). Without
  config.audit.buffer_path the buffer is drawn as method er keeps one: `buffer_fraction`
  (config.continual.buffer_fraction) of the training split, unless config.audit.draw_buffer is False."""
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
  elif bool(a.draw_buffer):
    size = fraction_count("config.continual.buffer_fraction", buffer_fraction, n_train)  # as continual's er
    drawn = np.sort(rng.choice(n_train, size=size, replace=False))  # method `er`: uniform over the split
    idx = drawn[subset(size, int(a.max_buffer), rng)]
    sets["er_buffer"] = dict(images=gather(train_data, idx, bs), indices=idx, size=size,
                             source=f"{size} training images drawn uniformly (method er, "
                                    f"{buffer_fraction:g} of the split)")
  for name, s in sets.items():
    logging.info("audit: %s: %d samples in memory (%s)", name, len(s["images"]), s["source"])
  return sets


def _stream_training(a, train_data, sets, members: np.ndarray, feature_fn, loss_fn, params) -> dict[str, Any]:
  """One pass over the training split: every training image is a reference of every set's nearest-neighbour
  search (pixel and feature space); the `members` also get their attack loss and spectra."""
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
    refs = {"pixel": x, "feature": features.batched(feature_fn, params, x, bs)}
    batch_thumbs = figures.thumbnail(x, int(a.thumbnail_size))
    for (name, sp), old in neighbours.items():
      new = distances.update_neighbours(old, sets[name]["vectors"][sp], refs[sp], ref_offset=offset, **chunking)
      changed = new.index != old.index
      thumbs[(name, sp)][changed] = batch_thumbs[new.index[changed] - offset]
      neighbours[(name, sp)] = new
    rows = np.asarray([r for r in range(len(x)) if offset + r in member_pos], np.int64)
    if rows.size:
      member_losses[[member_pos[int(offset + r)] for r in rows]] = features.batched(
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


def _finite_or_none(d: dict[str, float]) -> dict[str, float | None]:
  """NaN (an undefined judge, e.g. the CNN test at cnn_steps 0) as None: audit.json stays standard JSON."""
  return {k: (float(v) if np.isfinite(v) else None) for k, v in d.items()}


def _judge_sets(a, train_data, heldout_data, sets: dict, n_train: int, shape: tuple[int, ...]
                ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
  """Independent judges (invcoss_jax/retention/judges.py) of the synthetic set, the replay buffer, a sample of
  training images (real vs real) and smoothed noise, each against the same n held-out real images; (the
  judges {set: {key: value}}, what they were computed from).

  n = min(set sizes, held-out count, `judges.max_images`); each set is a seeded random subsample of n. The
  judge net (KID, PRDC) is trained on the training split's class labels, on a uniform random sample of the
  training images that leaves out the real-vs-real sample and a replay buffer drawn here (a split sorted by
  class is sampled across all its classes); without labels (or at judge_net_steps 0) there is no judge net."""
  import time
  j = a.judges
  seed, bs = int(a.seed), int(a.batch_size)
  rng = np.random.default_rng([seed, _JUDGES_STREAM])
  held_all = sets[HELDOUT]["images"]
  candidates = {name: sets[name]["images"] for name in ("synthetic", "er_buffer") if name in sets}
  sizes = [len(held_all), n_train] + [len(x) for x in candidates.values()]
  if int(j.max_images) > 0:
    sizes.append(int(j.max_images))
  n = int(min(sizes))
  info: dict[str, Any] = dict(n=n, folds=int(j.folds), cnn_steps=int(j.cnn_steps), noise_sigma=float(j.noise_sigma),
                              prdc_k=PRDC_K, seed=seed,
                              reference=f"{n} of the held-out images in memory, drawn at random")
  if n < max(int(j.folds), PRDC_K + 1):
    info["skipped"] = (f"n = {n} images per set (the smallest of the sets and the held-out images): too few for "
                       f"{int(j.folds)} folds and PRDC with k = {PRDC_K}; expected at least "
                       f"{max(int(j.folds), PRDC_K + 1)}")
    logging.warning("audit judges skipped: %s", info["skipped"])
    return {}, info
  start = time.time()
  held = held_all[subset(len(held_all), n, rng)]
  judged = {name: x[subset(len(x), n, rng)] for name, x in candidates.items()}
  real_idx = subset(n_train, n, rng)  # training images: disjoint from the held-out split (checked above)
  real = gather(train_data, real_idx, bs)
  judged["real_vs_real"] = real
  judged["smoothed_noise"] = judges.smoothed_noise_like(real, n, seed=seed + 41, sigma=float(j.noise_sigma))
  info["sources"] = dict(
      synthetic=f"{n} of the synthetic set's {len(candidates['synthetic'])} samples in memory, at random",
      real_vs_real=f"{n} training images drawn uniformly at random (split {train_data.split!r})",
      smoothed_noise=f"{n} images of Gaussian noise blurred by {float(j.noise_sigma):g} pixels, with the mean "
                     "and std of the real-vs-real images")
  if "er_buffer" in candidates:
    info["sources"]["er_buffer"] = f"{n} of the replay buffer's {len(candidates['er_buffer'])} samples in memory"

  net, net_info = _train_judge_net(a, train_data, heldout_data, sets, n_train, shape, real_idx, rng)
  info["judge_net"] = net_info
  kw = dict(feature_fn=None if net is None else net.features, seed=seed, folds=int(j.folds),
            cnn_steps=int(j.cnn_steps), prdc_k=PRDC_K)
  out = {name: _finite_or_none(get_evaluator("judges")(judged[name], held, **kw).run(None))
         for name in JUDGED if name in judged}
  held_keys = {np.asarray(h, np.float32).tobytes() for h in held}
  out["real_vs_real"]["heldout_duplicates"] = int(sum(np.asarray(r, np.float32).tobytes() in held_keys
                                                      for r in real))
  # The time is logged, not stored: an audit run twice writes the same audit.json.
  logging.info("audit judges (n = %d, %.0f s): C2ST AUCs %s", n, time.time() - start,
               {k: [v["c2st_logistic_auc"], v["c2st_statistics_auc"], v["c2st_cnn_auc"]] for k, v in out.items()})
  return out, info


def _train_judge_net(a, train_data, heldout_data, sets: dict, n_train: int, shape: tuple[int, ...],
                     real_idx: np.ndarray, rng: np.random.Generator):
  """(the judge net or None, what it was trained on): a `judges.JudgeNet` trained supervised on the class
  labels of a uniform random sample of the training split, leaving out `real_idx` and a buffer drawn here."""
  j = a.judges
  steps = int(j.judge_net_steps)
  if steps == 0:
    return None, dict(trained=False, reason="config.audit.judges.judge_net_steps = 0")
  excluded = [real_idx]
  if "er_buffer" in sets and not a.buffer_path:  # drawn from the training split here
    excluded.append(np.asarray(sets["er_buffer"]["indices"]))
  pool = np.setdiff1d(np.arange(n_train), np.concatenate(excluded))
  pixels = int(np.prod(shape[-3:-1]))  # the judges see one grey 2D image (a volume's central slice)
  cap = min(int(j.judge_net_max_train), max(int(j.judge_net_max_values) // pixels, 1))
  idx = pool[subset(len(pool), cap, rng)]
  images, labels = gather_grey_labelled(train_data, idx, int(a.batch_size))
  if labels is None:
    return None, dict(trained=False, reason="the training split has no class labels (one per example)")
  classes = np.unique(labels)
  if len(classes) < 2:
    return None, dict(trained=False, reason=f"the sampled training images hold one class ({classes.tolist()})")
  net = judges.train_judge_features(images, labels, seed=int(a.seed), steps=steps)
  info: dict[str, Any] = dict(trained=True, steps=steps, num_train=int(len(idx)),
                              class_counts={str(c): int(np.sum(labels == c)) for c in classes})
  held_labels = read_labels(heldout_data, np.asarray(sets[HELDOUT]["indices"]))
  if held_labels is not None and set(np.unique(held_labels)) <= set(classes.tolist()):
    info["heldout_accuracy"] = net.accuracy(sets[HELDOUT]["images"], held_labels)
    info["heldout_majority_class_rate"] = float(np.max(np.unique(held_labels, return_counts=True)[1])
                                                / len(held_labels))
  return net, info


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
  section = data_registry.npz_shards_section(stage_data, folder, split="all")
  n = data_lib.num_examples(section)
  idx = subset(n, cap, rng)
  images = gather(section, idx, batch_size)
  if images.shape[1:] != shape:
    raise ValueError(f"{folder}: samples of shape {images.shape[1:]}, expected the stage's {shape}")
  return dict(images=images, indices=idx, size=n, source=folder)
