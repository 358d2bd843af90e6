"""Masked language modelling for the report stage: whole-word masking at 15 % and the MLM loss.

MedCoSS pre-trains its text modality with BERT's whole-word masking (HuggingFace's
`DataCollatorForWholeWordMask`, probability 0.15; `../shared/notes/medcoss_facts.md`). `whole_word_mask` is
that algorithm on the `word_ids` the text pipeline gives (continuation pieces share their word's id, special
tokens and padding are -1): the words of an example are shuffled and taken whole while they fit in
round(0.15 x its real length) tokens. `corrupt` then replaces 80 % of the chosen tokens by [MASK], 10 % by a
random token and keeps 10 % (BERT). Both run on the host (NumPy, seeded per batch) before the compiled step;
the loss is a pure JAX function of the logits.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from invcoss_jax.models.vit_mae import mlm_loss  # noqa: F401  (the loss lives with MAE.mlm)
from invcoss_jax.data import tokenization


MAX_PREDICTIONS = 512  # BERT's cap on predicted tokens per example


def prediction_budget(length: int, probability: float = 0.15, max_predictions: int = MAX_PREDICTIONS) -> int:
  """Tokens `whole_word_mask` chooses at most in an example of `length` real tokens. With the padded length
  it is a static bound on every example of a batch, so the MLM head can gather that many positions before
  the vocabulary projection (`MAE.mlm(max_predictions=...)`) and score exactly the chosen ones."""
  return min(int(max_predictions), max(1, int(round(int(length) * float(probability)))))


def whole_word_mask(word_ids: np.ndarray, attention_mask: np.ndarray, rng: np.random.Generator,
                    probability: float = 0.15, max_predictions: int = MAX_PREDICTIONS) -> np.ndarray:
  """(B, L) bool: the tokens chosen for prediction, whole words at a time (see the module docstring)."""
  word_ids = np.asarray(word_ids)
  attention_mask = np.asarray(attention_mask)
  if word_ids.shape != attention_mask.shape or word_ids.ndim != 2:
    raise ValueError(f"word_ids {word_ids.shape} and attention_mask {attention_mask.shape}: expected equal "
                     "(batch, length) shapes")
  out = np.zeros(word_ids.shape, bool)
  for b in range(word_ids.shape[0]):
    ids = word_ids[b]
    words: dict[int, list[int]] = {}
    for i, w in enumerate(ids):
      if w >= 0:
        words.setdefault(int(w), []).append(i)
    candidates = list(words.values())
    rng.shuffle(candidates)
    n_real = int(attention_mask[b].sum())
    budget = prediction_budget(n_real, probability, max_predictions)
    chosen = 0
    for positions in candidates:
      if chosen >= budget:
        break
      if chosen + len(positions) > budget:
        continue  # a whole word or nothing
      out[b, positions] = True
      chosen += len(positions)
  return out


def corrupt(tokens: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *, mask_id: int,
            vocab_size: int, keep_ids: tuple[int, ...] = ()) -> np.ndarray:
  """BERT's corruption of the chosen tokens: 80 % [MASK], 10 % a random token (never one of `keep_ids`,
  e.g. the special tokens), 10 % unchanged."""
  tokens = np.asarray(tokens)
  mask = np.asarray(mask, bool)
  out = tokens.copy()
  u = rng.random(tokens.shape)
  to_mask = mask & (u < 0.8)
  to_random = mask & (u >= 0.8) & (u < 0.9)
  out[to_mask] = mask_id
  allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(keep_ids, np.int64))
  out[to_random] = rng.choice(allowed, size=int(to_random.sum()))
  return out.astype(tokens.dtype)


def mlm_inputs(batch: dict[str, np.ndarray], rng: np.random.Generator, *, mask_id: int, vocab_size: int,
               keep_ids: tuple[int, ...] = (), probability: float = 0.15) -> dict[str, np.ndarray]:
  """A text batch (tokens, attention_mask, word_ids) -> the MLM step's inputs: corrupted `tokens`, the
  `attention_mask`, `mlm_mask` (1 = to predict) and `labels` (the original ids)."""
  mask = whole_word_mask(batch["word_ids"], batch["attention_mask"], rng, probability)
  tokens = np.asarray(batch["tokens"], np.int32)
  return dict(tokens=corrupt(tokens, mask, rng, mask_id=mask_id, vocab_size=vocab_size, keep_ids=keep_ids),
              attention_mask=np.asarray(batch["attention_mask"], np.int32), mlm_mask=mask.astype(np.int32),
              labels=tokens)


def masker_for(tokenizer: str, probability: float = 0.15) -> Callable[[dict, np.random.Generator], dict]:
  """(text batch, rng) -> `mlm_inputs` with the [MASK] id, vocabulary and special tokens of the tokenizer
  file `tokenizer` (loaded once); random replacements never draw a special token."""
  tok = tokenization.load_tokenizer(str(tokenizer))
  ids = tokenization.special_ids(tok)
  return functools.partial(mlm_inputs, mask_id=int(ids["mask"]), vocab_size=int(tokenization.vocab_size(tok)),
                           keep_ids=tuple(int(ids[k]) for k in ("pad", "unk", "cls", "sep", "mask")),
                           probability=float(probability))
