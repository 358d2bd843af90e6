"""The data streams of one continual stage, drawn together for every composite step.

A stage reads its current data (one stream; one per modality for `joint`) and one stream per buffer source
(an earlier stage's replay set). Each stream yields a fixed number of samples per step; streams whose
examples have the same shape are concatenated into one sub-batch, so a step has one sub-batch per example
shape and role (e.g. a 3D current sub-batch and a 2D buffer sub-batch) and compiles once.

An image sub-batch is a float32 array (B, ..., C). A text sub-batch (examples of shape (L,): token ids) is a
dict of int32 (B, L) arrays: current text carries the MLM inputs (`tokens` corrupted, `attention_mask`,
`mlm_mask`, `labels`; the stream's `masker` draws the whole-word masks), buffer text `tokens` and
`attention_mask` after token-wise mixup.

The streams are checkpointed together as one item (`get_state`/`set_state` bytes, which grain's orbax
handler stores), and buffer mixup and text masking draw from generators seeded by (seed, stage, step,
source), so a resumed stage sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Sequence

import numpy as np

from invcoss_jax.continual import losses


@dataclasses.dataclass
class Stream:
  """One data stream: `batch_size` samples of shape `image_shape` per step ((L,) for text)."""
  name: str  # e.g. 'current/xray', 'buffer/stage_1_xray'
  iterator: Any  # a grain DatasetIterator (or anything with __next__, get_state, set_state)
  batch_size: int
  image_shape: tuple[int, ...]
  mixup: bool = False
  # Text current data: (batch of tokens/attention_mask/word_ids, rng) -> the MLM inputs (train.mlm.mlm_inputs).
  masker: Callable[[dict, np.random.Generator], dict] | None = None

  @property
  def is_text(self) -> bool:
    return len(self.image_shape) == 1


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

  def _draw(self, stream: Stream, step: int, source_index: int) -> np.ndarray | dict[str, np.ndarray]:
    batch = next(stream.iterator)
    rng = lambda: np.random.default_rng([self.seed, self.stage_index, int(step), source_index])
    if stream.is_text:
      return self._draw_text(stream, batch, rng)
    x = np.asarray(batch["image"], np.float32)
    if tuple(x.shape[1:]) != tuple(stream.image_shape):
      raise ValueError(f"stream {stream.name}: expected examples of shape {tuple(stream.image_shape)}, got "
                       f"{tuple(x.shape[1:])}")
    if stream.mixup:
      x, _, _ = losses.intra_modal_mixup(x, rng())
    return x

  @staticmethod
  def _draw_text(stream: Stream, batch: dict, rng: Callable[[], np.random.Generator]) -> dict[str, np.ndarray]:
    """`rng()`: the step's generator, made only for a stream that draws (masks or mixup)."""
    if "tokens" not in batch:
      raise ValueError(f"stream {stream.name}: expected a text batch (tokens, attention_mask, word_ids), got "
                       f"keys {sorted(batch)}")
    tokens = np.asarray(batch["tokens"], np.int32)
    if tuple(tokens.shape[1:]) != tuple(stream.image_shape):
      raise ValueError(f"stream {stream.name}: expected texts of {stream.image_shape[0]} tokens, got "
                       f"{tuple(tokens.shape[1:])}")
    attention = np.asarray(batch["attention_mask"], np.int32)
    if stream.masker is not None:
      return stream.masker(dict(tokens=tokens, attention_mask=attention, word_ids=np.asarray(batch["word_ids"])),
                           rng())
    if stream.mixup:
      tokens, attention, _, _ = losses.token_mixup(tokens, attention, rng())
    return dict(tokens=tokens, attention_mask=attention)

  def next_batch(self, step: int) -> dict[str, tuple[Any, ...]]:
    """The local sub-batches of train step `step` (1-based), grouped by shape."""
    cur = [self._draw(s, step, i) for i, s in enumerate(self.current)]
    buf = [self._draw(s, step, 1000 + i) for i, s in enumerate(self.buffer)]
    return dict(current=tuple(_concat([cur[i] for i in g]) for g in self.current_groups),
                buffer=tuple(_concat([buf[i] for i in g]) for g in self.buffer_groups))

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


def _concat(parts: list) -> Any:
  """One sub-batch of the parts of a shape group (arrays, or dicts of arrays for text)."""
  if isinstance(parts[0], dict):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return np.concatenate(parts)


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
