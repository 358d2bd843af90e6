"""A checkpoint knows its vocabulary: the fingerprint of the token list its text embedding was trained with.

Row i of `token_embed` is the embedding of token id i, so a checkpoint is only meaningful with the exact token
list (in id order) it was trained with. A vocabulary of another size fails deep inside orbax (`Requested shape
(4005,) ... stored shape (4006,)`); one of the same size with its ids in another order is silently accepted and
trains or evaluates nonsense. Every text-bearing stage (a report stage, and every stage of a sequence with a
report stage: all carry the text embedding) therefore records `vocabulary.json` beside its config.json
(the vocabulary file, its size and the sha256 of its token list) before its first checkpoint, and resuming it,
fine-tuning it on a text task and loading it into a continual sequence check the vocabulary at hand against it.
A mismatch is one error naming both fingerprints and both files (`VocabularyError`, a `DataError`).

A stage trained before this file existed has none: it is not checked (its config.json still records the size).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

from invcoss_jax.data import tokenization
from invcoss_jax.data.errors import DataError
from invcoss_jax import io_utils
from invcoss_jax.io_utils import atomic_write_json

VOCAB_FILE = "vocabulary.json"


class VocabularyError(DataError):
  """A vocabulary that is not the one a checkpoint's text embedding was trained with."""


@functools.lru_cache(maxsize=16)
def _fingerprint(path: str, mtime_ns: int, size: int) -> tuple[str, int]:
  del mtime_ns, size  # the cache key: a file rewritten in place is read again
  vocab = tokenization.load_tokenizer(path).get_vocab(with_added_tokens=True)
  tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
  return hashlib.sha256(json.dumps(tokens, ensure_ascii=False).encode("utf-8")).hexdigest(), len(tokens)


def fingerprint(tokenizer: str | os.PathLike) -> dict[str, Any]:
  """{'tokenizer': the file, 'sha256': of its token list in id order, 'size': tokens} of a tokenizer.json
  or BERT vocab.txt."""
  path = os.path.abspath(os.fspath(tokenizer))
  st = os.stat(path)
  sha, size = _fingerprint(path, st.st_mtime_ns, st.st_size)
  return dict(tokenizer=path, sha256=sha, size=size)


def recorded(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """The vocabulary the stage in `workdir` was trained with: its vocabulary.json, or for a stage from before
  that file its config.json's model.vocab_size and model.tokenizer (the file's fingerprint if it still
  exists); None for a stage without text."""
  workdir = os.fspath(workdir)
  path = os.path.join(workdir, VOCAB_FILE)
  if os.path.isfile(path):
    return io_utils.read_json(path, lambda message: DataError(None, message))
  config = os.path.join(workdir, "config.json")
  if not os.path.isfile(config):
    return None
  with open(config) as f:
    try:
      model = json.load(f).get("model", {})
    except json.JSONDecodeError:
      return None
  size, tokenizer = int(model.get("vocab_size", 0) or 0), str(model.get("tokenizer", "") or "")
  if size <= 0:
    return None
  out = dict(tokenizer=tokenizer, sha256=None, size=size)
  if tokenizer and os.path.isfile(tokenizer):
    try:
      out = fingerprint(tokenizer)
      out["size"] = size  # the size trained with; the file may have changed since
    except (DataError, OSError):
      pass
  return out


def _short(fp: dict[str, Any]) -> str:
  sha = f"sha256 {str(fp['sha256'])[:12]}, " if fp.get("sha256") else ""
  return f"{sha}{fp.get('size')} tokens, {fp.get('tokenizer') or 'file not recorded'}"


def check(workdir: str | os.PathLike, tokenizer: str | os.PathLike, what: str) -> dict[str, Any]:
  """Raises VocabularyError when the trained stage in `workdir` recorded another vocabulary than
  `tokenizer`'s (`what` names the use: 'resuming it', 'fine-tuning it', ...); returns `tokenizer`'s
  fingerprint."""
  now = fingerprint(tokenizer)
  old = recorded(workdir)
  if old is None:
    return now
  differs = int(old.get("size", -1)) != now["size"] or (old.get("sha256") and old["sha256"] != now["sha256"])
  if differs:
    raise VocabularyError(now["tokenizer"], f"this vocabulary ({_short(now)}) is not the one the stage in "
                          f"{workdir} was trained with ({_short(old)}): {what} would read token ids through "
                          "the wrong rows of its text embedding. Use that stage's vocabulary (with "
                          "data.text.tokenizer empty a stage reuses its own), or another --workdir")
  return now


def record(workdir: str | os.PathLike, tokenizer: str | os.PathLike) -> dict[str, Any]:
  """Writes the stage's vocabulary.json (`tokenizer`'s fingerprint); call it before the stage's first
  checkpoint, and `check` once it has one."""
  now = fingerprint(tokenizer)
  atomic_write_json(os.path.join(os.fspath(workdir), VOCAB_FILE), now)
  return now


def has_checkpoint(workdir: str | os.PathLike) -> bool:
  """Whether the stage in `workdir` has a checkpoint (finished or not: its parameters exist)."""
  folder = os.path.join(os.fspath(workdir), "checkpoints")
  return os.path.isdir(folder) and any(n.split(".")[0].isdigit() for n in os.listdir(folder))


def check_or_record(workdir: str | os.PathLike, tokenizer: str | os.PathLike, what: str = "resuming it"
                    ) -> dict[str, Any]:
  """`check` for a stage with a checkpoint, `record` for one about to write its first."""
  if has_checkpoint(workdir):
    return check(workdir, tokenizer, what)
  return record(workdir, tokenizer)
