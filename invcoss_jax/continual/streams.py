"""The data streams of one continual stage, drawn together for every composite step.

A stage reads its current data (one stream; one per modality for `joint`) and one stream per buffer source
(an earlier stage's replay set). Each stream yields a fixed number of samples per step; streams whose
examples have the same shape are concatenated into one sub-batch, so a step has one sub-batch per image
shape and role (e.g. a 3D current sub-batch and a 2D buffer sub-batch) and compiles once.

The streams are checkpointed together as one item (`get_state`/`set_state` bytes, which grain's orbax
handler stores), and buffer mixup draws from a generator seeded by (seed, stage, step, source), so a resumed
stage sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import numpy as np

from invcoss_jax.continual import losses


@dataclasses.dataclass
class Stream:
  """One data stream: `batch_size` samples of shape `image_shape` per step."""
  name: str  # e.g. 'current/xray', 'buffer/stage_1_xray'
  iterator: Any  # a grain DatasetIterator (or anything with __next__, get_state, set_state)
  batch_size: int
  image_shape: tuple[int, ...]
  mixup: bool = False


def group_by_shape(streams: Sequence[Stream]) -> list[list[int]]:
  """Indices of streams sharing an image shape, groups in order of first appearance."""
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, s in enumerate(streams):
    groups.setdefault(tuple(s.image_shape), []).append(i)
  return list(groups.values())


class StageStreams:
  """The current and buffer streams of a stage; `next_batch(step)` -> dict(current=(...), buffer=(...))."""

  def __init__(self, current: Sequence[Stream], buffer: Sequence[Stream], *, seed: int, stage_index: int):
    if not current:
      raise ValueError("a continual stage needs at least one current data stream")
    names = [s.name for s in (*current, *buffer)]
    if len(set(names)) != len(names):
      raise ValueError(f"stream names must be unique, got {names}")
    self.current = list(current)
    self.buffer = list(buffer)
    self.seed = int(seed)
    self.stage_index = int(stage_index)
    self.current_groups = group_by_shape(self.current)
    self.buffer_groups = group_by_shape(self.buffer)

  @property
  def group_sizes(self) -> dict[str, tuple[int, ...]]:
    return dict(current=tuple(sum(self.current[i].batch_size for i in g) for g in self.current_groups),
                buffer=tuple(sum(self.buffer[i].batch_size for i in g) for g in self.buffer_groups))

  def _draw(self, stream: Stream, step: int, source_index: int) -> np.ndarray:
    x = np.asarray(next(stream.iterator)["image"], np.float32)
    if tuple(x.shape[1:]) != tuple(stream.image_shape):
      raise ValueError(f"stream {stream.name}: expected examples of shape {tuple(stream.image_shape)}, got "
                       f"{tuple(x.shape[1:])}")
    if stream.mixup:
      rng = np.random.default_rng([self.seed, self.stage_index, int(step), source_index])
      x, _, _ = losses.intra_modal_mixup(x, rng)
    return x

  def next_batch(self, step: int) -> dict[str, tuple[np.ndarray, ...]]:
    """The local sub-batches of train step `step` (1-based), grouped by shape."""
    cur = [self._draw(s, step, i) for i, s in enumerate(self.current)]
    buf = [self._draw(s, step, 1000 + i) for i, s in enumerate(self.buffer)]
    return dict(current=tuple(np.concatenate([cur[i] for i in g]) for g in self.current_groups),
                buffer=tuple(np.concatenate([buf[i] for i in g]) for g in self.buffer_groups))

  # --- checkpointing through grain's orbax handler (non-DatasetIterator items use bytes) ---

  def get_state(self) -> bytes:
    states = {}
    for s in (*self.current, *self.buffer):
      st = s.iterator.get_state()
      states[s.name] = ({"bytes": st.decode()} if isinstance(st, (bytes, bytearray)) else {"json": st})
    return json.dumps(states, sort_keys=True).encode()

  def set_state(self, state: bytes) -> None:
    states = json.loads(state.decode() if isinstance(state, (bytes, bytearray)) else state)
    names = {s.name for s in (*self.current, *self.buffer)}
    if set(states) != names:
      raise ValueError(f"the checkpoint's data streams {sorted(states)} differ from this stage's {sorted(names)}: "
                       "the stage was started with another method or buffer configuration")
    for s in (*self.current, *self.buffer):
      st = states[s.name]
      s.iterator.set_state(st["bytes"].encode() if "bytes" in st else st["json"])

  def start_prefetch(self) -> None:
    for s in (*self.current, *self.buffer):
      fn = getattr(s.iterator, "start_prefetch", None)
      if fn is not None:
        fn()

  def close(self) -> None:
    for s in (*self.current, *self.buffer):
      fn = getattr(s.iterator, "close", None)
      if fn is not None:
        fn()


def split_batch(total: int, weights: Sequence[float], unit: int) -> list[int]:
  """Splits `total` samples into len(weights) parts, each a positive multiple of `unit`, proportional to the
  weights (largest remainders). The result sums to max(total rounded up to `unit`, unit * len(weights))."""
  if not weights:
    return []
  if unit < 1 or any(w < 0 for w in weights) or sum(weights) <= 0:
    raise ValueError(f"split_batch: expected unit >= 1 and non-negative weights with a positive sum, got "
                     f"unit={unit}, weights={list(weights)}")
  units = max(-(-int(total) // unit), len(weights))
  w = np.asarray(weights, np.float64) / float(sum(weights))
  extra = units - len(weights)  # every part gets one unit first
  raw = w * extra
  parts = np.floor(raw).astype(int)
  left = extra - int(parts.sum())
  order = np.argsort(-(raw - parts), kind="stable")
  parts[order[:left]] += 1
  return [int(unit * (p + 1)) for p in parts]
