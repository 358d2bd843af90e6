"""Grain pipelines over the sources: training (infinite, shuffled, augmented) and evaluation (one pass).

    train: source --[process shard]--> seed, shuffle, repeat, random_map --> batch
                 --> to_iter_dataset (read threads) --> [mp_prefetch workers]
    eval:  source --[process shard]--> map --> batch --> to_iter_dataset --> [mp_prefetch]

A training batch is formed on the indexable dataset, so a read thread (or worker) builds whole batches:
batch i holds stream positions [i*B, (i+1)*B) whichever thread or worker builds it, and augmentation
randomness is seeded by the example's position in the stream, so the batches do not depend on
`read_threads` or `num_workers`. (Per-example reading with batching after the threads gave the same
batches at half the rate: grain's per-element hand-over between threads dominated a 32x32 batch of 64.)
Under `data.lenient` a skipped record is None and must be dropped before batching, so lenient pipelines
batch after the threads. The iterators are grain `DatasetIterator`s: `get_state()` /
`set_state()` resume exactly, and orbax saves them with `grain.checkpoint.CheckpointSave` /
`CheckpointRestore`.
"""

from __future__ import annotations

from typing import Any

import grain
import ml_collections
import numpy as np

from invcoss_jax.data.datasets import make_source
from invcoss_jax.data.errors import DataError, SkipLog
from invcoss_jax.data.preprocessing import make_preprocessor
from invcoss_jax.data.registry import resolve
from invcoss_jax.data.sources import LruCache


class _Augment(grain.transforms.RandomMap):
  def __init__(self, fn):
    self.fn = fn

  def random_map(self, element, rng: np.random.Generator):
    return self.fn(element, rng)


class _Preprocess(grain.transforms.Map):
  def __init__(self, fn):
    self.fn = fn

  def map(self, element):
    return self.fn(element, None)


class _PreparedSource:
  """A source whose examples went through the deterministic part of the preprocessing (`fn.prepare`,
  e.g. the resampling of a 3D window), the last `size` of them kept: after the first epoch a small 3D
  dataset costs no resampling. The random part (`fn.augment`) still runs per example and epoch, so the
  examples are identical to the uncached pipeline's."""

  def __init__(self, source, prepare, size: int):
    self.source, self.prepare = source, prepare
    self._cache = LruCache(size)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int):
    def load():
      record = self.source[i]
      if record is None:
        return None
      example = self.prepare(record)
      for a in example.values():
        a.setflags(write=False)  # shared by every epoch's copy: nothing downstream may write into it
      return example
    return self._cache.get(int(i), load)

  def __getattr__(self, name):  # skips, has_labels, ... of the wrapped source
    if name in ("source", "prepare", "_cache"):
      raise AttributeError(name)
    return getattr(self.source, name)


def _source_and_transform(cfg, split: str):
  """The split's source and its per-example transform `fn(record, rng=None)`; with
  data.window_cache_size > 0 and a transform with a deterministic part, that part is cached."""
  source = make_source(cfg, split)
  if cfg.format == "text":
    source.tokenizer()  # an empty or unreadable data.text.tokenizer fails here, not in a worker
  fn = make_preprocessor(cfg)
  size = int(cfg.window_cache_size)
  if size < 0:
    raise ValueError(f"data.window_cache_size={size}: expected >= 0 (examples kept per process; 0 = off)")
  if size > 0 and hasattr(fn, "prepare"):
    return _PreparedSource(source, fn.prepare, size), fn.augment
  return source, fn


class _ReportSkipsIterator(grain.DatasetIterator):
  """Passes batches through; at the end of the pass logs how many files lenient loading skipped."""

  def __init__(self, parent: grain.DatasetIterator, skips: SkipLog):
    super().__init__(parent)
    self._skips = skips

  def __next__(self):
    try:
      return next(self._parent)
    except StopIteration:
      self._skips.log_summary()
      raise

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


class _ReportSkips(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, skips: SkipLog):
    super().__init__(parent)
    self._skips = skips

  def __iter__(self) -> grain.DatasetIterator:
    return _ReportSkipsIterator(self._parent.__iter__(), self._skips)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only when the caller does not say)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}: expected 0 <= index < process_count={process_count}")
  return int(process_index), int(process_count)


def _shard(source, cfg, process_index: int, process_count: int, split: str) -> grain.MapDataset:
  ds = grain.MapDataset.source(source)
  ds = ds[process_index::process_count]  # disjoint, covering: example i goes to process i % count
  if len(ds) == 0:
    raise DataError(cfg.path, f"split {split!r} has {len(source)} example(s): too few for "
                    f"{process_count} processes (process {process_index} gets none)")
  return ds


def _to_iter(ds: grain.MapDataset, cfg, batch_size: int = 1) -> grain.IterDataset:
  """`batch_size`: how many examples an element of `ds` holds; data.prefetch_buffer_size counts examples,
  so as many elements are read ahead as hold that many (at least one per read thread)."""
  threads = max(int(cfg.read_threads), 1)
  ahead = max(threads, -(-max(int(cfg.prefetch_buffer_size), 1) // int(batch_size)))  # one per thread at least
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=ahead))
  if int(cfg.num_workers) > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags; outside absl.app.run (notebooks, scripts, tests)
      # nothing parsed them and grain would raise UnparsedFlagAccessError: use the defaults.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(cfg.num_workers), per_worker_buffer_size=int(cfg.worker_buffer_size)))
  return it


def make_train_iterator(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                        process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """Infinite iterator of local batches (global_batch_size // process_count examples).

  Each process reads its own disjoint shard of the examples, reshuffled every epoch; augmentation
  (when data.augment) is random per example and epoch; everything is a function of `seed`.
  """
  cfg = resolve(data_cfg)
  pi, pc = _process(process_index, process_count)
  if global_batch_size <= 0 or global_batch_size % pc:
    raise ValueError(f"global_batch_size={global_batch_size}: expected a positive multiple of the "
                     f"process count {pc}")
  source, fn = _source_and_transform(cfg, cfg.split)
  ds = _shard(source, cfg, pi, pc, cfg.split).seed(int(seed)).shuffle().repeat(None)
  augment = bool(cfg.augment) and (not bool(cfg.preprocessed) or bool(cfg.augment_preprocessed))
  ds = ds.random_map(_Augment(fn)) if augment else ds.map(_Preprocess(fn))
  local_batch = global_batch_size // pc
  if cfg.lenient:
    return iter(_to_iter(ds, cfg).batch(local_batch, drop_remainder=True))
  return _BatchIndexedIterator(iter(_to_iter(ds.batch(local_batch, drop_remainder=True), cfg, local_batch)),
                               local_batch)


class _BatchIndexedIterator(grain.DatasetIterator):
  """A training iterator whose batches were formed before the read threads: its state counts batches and
  says so (`unit`), and a state counting examples (saved by the per-example pipeline of earlier versions,
  always at a batch boundary) is converted, so their checkpoints resume on the same batch."""

  def __init__(self, parent: grain.DatasetIterator, batch_size: int):
    super().__init__(parent)
    self._batch_size = int(batch_size)

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {**self._parent.get_state(), "unit": "batch"}

  def set_state(self, state: dict[str, Any]) -> None:
    state = dict(state)
    if state.pop("unit", None) != "batch":
      if set(state) != {"next_index"} or int(state["next_index"]) % self._batch_size:
        raise DataError(None, f"a data iterator state {state} saved by an earlier version with "
                        f"data.num_workers > 0 or another batch size (expected next_index a multiple of "
                        f"{self._batch_size}): resume it with that version, or start the run again")
      state = {"next_index": int(state["next_index"]) // self._batch_size}
    self._parent.set_state(state)


def make_eval_iterator(data_cfg: ml_collections.ConfigDict, *, batch_size: int, split: str | None = None,
                       process_index: int | None = None,
                       process_count: int | None = None) -> grain.DatasetIterator:
  """One pass over this process's shard of `split` (default data.split) in a fixed order, without
  augmentation, in batches of `batch_size` with the last batch ragged (not dropped)."""
  cfg = resolve(data_cfg)
  split = cfg.split if split is None else split
  pi, pc = _process(process_index, process_count)
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size}: expected a positive batch size")
  source, fn = _source_and_transform(cfg, split)
  ds = _shard(source, cfg, pi, pc, split).map(_Preprocess(fn))
  if not cfg.lenient:
    return iter(_to_iter(ds.batch(batch_size, drop_remainder=False), cfg, batch_size))
  return iter(_ReportSkips(_to_iter(ds, cfg).batch(batch_size, drop_remainder=False), source.skips))
