"""Held-out examples of a stage (images, or token ids of texts) and the frozen encoder's features of any set."""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from invcoss_jax import data as data_lib
from invcoss_jax.measure import features as measure_features


@dataclasses.dataclass(frozen=True)
class Split:
  """The inputs (images in the model layout, preprocessed, no augmentation; (N, L) int32 token ids for text)
  and labels (None without) of one split."""
  images: np.ndarray
  labels: np.ndarray | None


def load_split(data_cfg: ml_collections.ConfigDict, split: str, max_examples: int = -1,
               batch_size: int = 256) -> Split:
  """The first `max_examples` (<= 0: all) examples of `split`, in the input layer's deterministic order."""
  d = ml_collections.ConfigDict(data_cfg.to_dict())
  d.split = split
  images, labels = [], []
  count = 0
  for batch in data_lib.make_eval_iterator(d, batch_size=batch_size, split=split, process_index=0,
                                           process_count=1):
    images.append(np.asarray(batch["tokens"], np.int32) if "tokens" in batch else
                  np.asarray(batch["image"], np.float32))
    if "label" in batch:
      labels.append(np.asarray(batch["label"]).reshape(len(images[-1]), -1)[:, 0].astype(np.int64))
    count += len(images[-1])
    if 0 < max_examples <= count:
      break
  if not images:
    raise ValueError(f"data {d.name!r} ({d.path!r}) split {split!r} holds no examples; the retention benchmark "
                     "needs held-out examples of every stage (config.retention.fit_split / test_split)")
  x = np.concatenate(images)
  y = np.concatenate(labels) if labels and len(labels) == len(images) else None
  if max_examples > 0:
    x = x[:max_examples]
    y = y[:max_examples] if y is not None else None
  return Split(x, y)


def encoder_features(model, params, images: np.ndarray, *, kind: str = "mean", batch_size: int = 256
                     ) -> np.ndarray:
  """(N, D) float32 features of `images` (or of (N, L) integer token ids) from the encoder of `params` (eval
  mode, no masking; text padding left out), in batches of `batch_size` through the one compiled feature
  function (measure.features)."""
  images = np.asarray(images)
  text = images.ndim == 2 and np.issubdtype(images.dtype, np.integer)
  images = images.astype(np.int32 if text else np.float32)
  if (images.ndim < 4 and not text) or len(images) == 0:
    raise ValueError(f"encoder features: expected a non-empty batch of images or of token ids, got shape "
                     f"{images.shape}")
  batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
  return measure_features.encoder_features(model, params, batches, kind=kind, option="config.retention.feature")


def random_sample(images: np.ndarray, n: int, seed: int) -> np.ndarray:
  """`n` rows of `images` drawn without replacement (all of them when there are fewer)."""
  n = min(int(n), len(images))
  idx = np.sort(np.random.default_rng(seed).choice(len(images), size=n, replace=False))
  return images[idx]
