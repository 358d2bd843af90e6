"""Poisson-sampled batches of a data section for DP-SGD, padded to a fixed size.

Step t's batch holds each example of the split independently with probability q (jax-privacy's
CyclicPoissonSampling, one cycle), truncated to a uniformly random `max_batch_size` of them when more are drawn
(accounted by the 'pld' accountant), then padded to `max_batch_size` rows with zeros; the batch's
`dp_sgd.PADDING_KEY` marks the padding rows. The real examples fill the first vmap chunks of `microbatch_size`
(chunk k holds rows k, k + n, k + 2n, ... of n chunks: optax's column-major micro-batching), so the step skips
the chunks that hold padding alone. Everything is a function of (seed, step): the sample, the order,
each example's augmentation; a resumed run draws the same batches with no iterator state to save.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import ml_collections
import numpy as np

from invcoss_jax import data as data_lib
from invcoss_jax.data import registry
from invcoss_jax.privacy.dp_sgd import PADDING_KEY

# Streams of the run's seed: the sample of a step, and its examples' augmentation.
_SAMPLE_STREAM = 0xD9_5A
_AUGMENT_STREAM = 0xD9_A6


class PoissonBatches:
  """`batch(step)` -> this process's rows of step `step`'s padded Poisson batch (a dict of NumPy arrays with
  `PADDING_KEY`); the global batch has `max_batch_size` rows, split evenly over `process_count` processes."""

  def __init__(self, data_cfg: ml_collections.ConfigDict, *, seed: int, sampling_rate: float, max_batch_size: int,
               microbatch_size: int = 0, process_index: int = 0, process_count: int = 1):
    cfg = registry.resolve(data_cfg)
    self.source = data_lib.make_source(cfg, cfg.split)
    if cfg.format == "text":
      self.source.tokenizer()  # an unreadable data.text.tokenizer fails here, not in a step
    self.fn = data_lib.make_preprocessor(cfg)
    self.augment = bool(cfg.augment) and (not bool(cfg.preprocessed) or bool(cfg.augment_preprocessed))
    self.seed, self.q, self.size = int(seed), float(sampling_rate), int(max_batch_size)
    if self.size % process_count:
      raise ValueError(f"max_batch_size={self.size}: expected a multiple of the {process_count} processes")
    self.micro = int(microbatch_size) or self.size
    if self.size % self.micro:
      raise ValueError(f"max_batch_size={self.size}: expected a multiple of microbatch_size={self.micro}")
    self.local = self.size // process_count
    self.offset = process_index * self.local
    self.num_examples = len(self.source)
    self.threads = max(int(cfg.read_threads), 1)
    self._template: dict[str, np.ndarray] | None = None

  def indices(self, step: int) -> np.ndarray:
    """The examples of step `step`'s global batch (at most max_batch_size, in drawn order)."""
    from jax_privacy import batch_selection  # pylint: disable=g-import-not-at-top  (dp_sgd._JAX_PRIVACY)
    strategy = batch_selection.CyclicPoissonSampling(sampling_prob=self.q, iterations=1,
                                                     truncated_batch_size=self.size)
    rng = np.random.default_rng([self.seed, _SAMPLE_STREAM, int(step)])
    return np.asarray(next(strategy.batch_iterator(self.num_examples, rng=rng)), np.int64)

  def rows(self, count: int) -> np.ndarray:
    """The rows of the first `count` examples: example i in slot i % m of chunk i // m (m = microbatch_size),
    i.e. row i // m + n * (i % m) of the n = max_batch_size / m chunks."""
    i = np.arange(int(count))
    return i // self.micro + (self.size // self.micro) * (i % self.micro)

  def _example(self, index: int, step: int) -> dict[str, np.ndarray] | None:
    record = self.source[int(index)]
    if record is None:  # a file lenient loading skipped: not in the batch
      return None
    rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, int(step), int(index)]) if self.augment else None
    return self.fn(record, rng)

  def _zeros(self) -> dict[str, np.ndarray]:
    if self._template is None:
      for i in range(self.num_examples):
        example = self._example(i, 0)
        if example is not None:
          self._template = {k: np.zeros_like(np.asarray(v)) for k, v in example.items()}
          break
      else:
        raise ValueError("no readable example in the data: nothing to sample")
    return self._template

  def batch(self, step: int) -> dict[str, Any]:
    chosen = self.indices(step)
    rows = np.full(self.size, -1, np.int64)
    rows[self.rows(len(chosen))] = chosen
    mine = rows[self.offset:self.offset + self.local]
    with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
      examples = list(pool.map(lambda i: None if i < 0 else self._example(i, step), mine))
    zeros = self._zeros()
    padding = np.array([e is None for e in examples])
    out = {k: np.stack([zeros[k] if e is None else np.asarray(e[k]) for e in examples]) for k in zeros}
    out[PADDING_KEY] = padding
    return out
