"""Vocabularies of the `report` modality (HuggingFace `tokenizers`) and fixed-length encoding of texts.

A tokenizer is BERT-style: BERT normalisation (lower case, accents stripped, control characters
removed), BERT pre-tokenisation (words split on whitespace and punctuation), a WordPiece (or BPE)
model whose continuation pieces start with `##`, and the specials [PAD] [UNK] [CLS] [SEP] [MASK].
It is trained on the train split of the corpus (`ensure_tokenizer`, written once into the workdir so
that a restarted job keeps its vocabulary) or read from a `tokenizer.json` or a BERT `vocab.txt`
(Bio_ClinicalBERT's, for example). Nothing is ever downloaded.

Training is not reproducible across processes: `tokenizers` (0.23) assigns the ids of continuation pieces in
hash-map order, and ties in merge counts then pick different merges, so two trainings on the same corpus give
vocabularies that differ in a few pieces (huggingface/tokenizers#1794, fix proposed in #2066). A stage therefore
keeps the vocabulary it trained (`<workdir>/tokenizer.json`, reused on restart), and runs that are compared
(seeds, methods) should share one file through `data.text.tokenizer`.

`encode` gives every text `max_length` ids: [CLS], the text's tokens (truncated), [SEP], then [PAD];
`word_ids` numbers the words of the text (0, 1, ...; the pieces of one word share its number) for
whole-word masking, -1 on [CLS], [SEP] and [PAD].
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import ml_collections
import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from invcoss_jax.config_checks import ConfigError
from invcoss_jax.data import text_io
from invcoss_jax.data.config import data_config
from invcoss_jax.data.errors import DataError, MissingDataError, SkipLog, logger
from invcoss_jax.data.registry import resolve
from invcoss_jax.io_utils import atomic_path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_SPECIAL_KEYS = ("pad", "unk", "cls", "sep", "mask")
TOKENIZER_FILE = "tokenizer.json"
KINDS = ("wordpiece", "bpe")
PREFIX = "##"  # continuation pieces, for both kinds (so one decoder and one word numbering serve both)
# The longest word (after BERT normalisation and pre-tokenisation) trained on: WordPiece's own limit
# (max_input_chars_per_word), which encodes a longer word as one [UNK]. Training time grows with the square of
# a word's length (a 5 MB base64 blob without spaces took hours), so longer words are left out beforehand.
MAX_WORD_CHARS = 100
# A run of more characters than this without whitespace is no text (a pasted blob): left out of training
# whole, and encoded as one [UNK] without being normalised (the tokenizer takes about a second per megabyte).
MAX_CHUNK_CHARS = 10_000
# Where a text is cut into chunks before those checks: only characters the BERT normaliser keeps as spaces
# (Python's str.split() also cuts at control characters such as \x1f, which the normaliser deletes, joining
# the words around them).
_SPACES = re.compile(r"[ \t\n\r]+")


def _bert_parts(tok: Tokenizer, lowercase: bool) -> Tokenizer:
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                              lowercase=bool(lowercase))
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  # No cleanup: decode(encode(text)) is then exactly the normalised words joined by single spaces.
  tok.decoder = decoders.WordPiece(prefix=PREFIX, cleanup=False)
  return tok


def _post_processor(tok: Tokenizer) -> Tokenizer:
  ids = special_ids(tok)
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", ids["cls"]), ("[SEP]", ids["sep"])])
  return tok


def _without_long_words(texts: Sequence[str], lowercase: bool, sources: Sequence[str] | None
                        ) -> list[str]:
  """`texts` with every word longer than MAX_WORD_CHARS (and every run of over MAX_CHUNK_CHARS without
  whitespace) left out, logged with a count and where the first was; a text without one is kept as it is."""
  bert = _bert_parts(Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")), lowercase)
  out, dropped, longest, first = [], 0, 0, None
  for k, text in enumerate(texts):
    # A whitespace-separated chunk is at least as long as each word cut from it: only long chunks need the
    # tokenizer's own normalisation and pre-tokenisation to find the words that are too long.
    chunks = _SPACES.split(text) if len(text) > MAX_WORD_CHARS else []
    if all(len(c) <= MAX_WORD_CHARS for c in chunks):
      out.append(text)
      continue
    kept = []
    for chunk in chunks:
      if len(chunk) <= MAX_WORD_CHARS:
        kept.append(chunk)
        continue
      words = [chunk] if len(chunk) > MAX_CHUNK_CHARS else [
          w for w, _ in bert.pre_tokenizer.pre_tokenize_str(bert.normalizer.normalize_str(chunk))]
      for word in words:
        if len(word) <= MAX_WORD_CHARS:
          kept.append(word)
        else:
          dropped += 1
          longest = max(longest, len(word))
          if first is None:
            first = sources[k] if sources is not None else f"text {k}"
    out.append(" ".join(kept))
  if dropped:
    logger.warning("%d word(s) longer than %d characters (the longest %s characters; the first in %s) left out "
                   "of the tokenizer's training texts: WordPiece encodes such a word as [UNK], and training on it "
                   "would take time growing with the square of its length", dropped, MAX_WORD_CHARS,
                   f"{longest:,}", first)
  return out


def train_tokenizer(texts: Sequence[str], vocab_size: int, *, kind: str = "wordpiece",
                    lowercase: bool = True, sources: Sequence[str] | None = None) -> Tokenizer:
  """A BERT-style tokenizer trained on `texts`, with at most `vocab_size` tokens (specials included; a
  small corpus may yield fewer: every word of it is then a single token).

  Words longer than MAX_WORD_CHARS are left out of training (see `_without_long_words`; `sources` names
  where each text came from, for that warning). Every vocabulary holds the 5 specials and the corpus's
  alphabet (each character, and its ## continuation) whatever `vocab_size` says: a smaller `vocab_size` is
  a DataError giving the least it can be."""
  if kind not in KINDS:
    raise DataError(None, f"tokenizer kind {kind!r}: expected one of {KINDS}")
  vocab_size = int(vocab_size)
  if vocab_size <= len(SPECIAL_TOKENS):
    raise DataError(None, f"data.text.vocab_size={vocab_size}: expected more than the "
                    f"{len(SPECIAL_TOKENS)} special tokens")
  texts = list(texts)
  if not texts:
    raise DataError(None, "no texts to train the tokenizer on: expected at least one")
  if kind == "wordpiece":
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix=PREFIX))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        continuing_subword_prefix=PREFIX, show_progress=False)
  else:
    tok = Tokenizer(models.BPE(unk_token="[UNK]", continuing_subword_prefix=PREFIX))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  continuing_subword_prefix=PREFIX, show_progress=False)
  _bert_parts(tok, lowercase)
  texts = _without_long_words(texts, lowercase, sources)
  tok.train_from_iterator(texts, trainer, length=len(texts))
  size = tok.get_vocab_size(with_added_tokens=True)
  if size > vocab_size:
    raise DataError(None, f"data.text.vocab_size={vocab_size}: expected at least {size} (the "
                    f"{len(SPECIAL_TOKENS)} special tokens and {size - len(SPECIAL_TOKENS)} tokens of this corpus's "
                    f"alphabet: its characters, alone and as {PREFIX} continuations, which every {kind} "
                    "vocabulary holds before any learnt piece)")
  return _post_processor(tok)


def _read_vocab(path: str) -> dict[str, int]:
  """A BERT vocab.txt: one token per line, its id the line number - 1."""
  vocab: dict[str, int] = {}
  lines = text_io.read_text_file(path).split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  for i, line in enumerate(lines):
    token = line.rstrip("\r")
    if not token:
      raise DataError(f"{path}:{i + 1}", "empty line: expected one token per line (a BERT vocab.txt)")
    if token in vocab:
      raise DataError(f"{path}:{i + 1}", f"token {token!r} repeats line {vocab[token] + 1}: expected each "
                      "token once")
    vocab[token] = i
  return vocab


def load_tokenizer(path: str | os.PathLike, *, lowercase: bool = True) -> Tokenizer:
  """A tokenizer from a `tokenizer.json` (`Tokenizer.from_file`, kept as saved) or a BERT `vocab.txt`
  (any other name: WordPiece over that vocabulary with BERT normalisation, lower-cased per
  `lowercase`; a cased vocabulary such as bert-base-cased wants lowercase=False)."""
  path = os.fspath(path)
  if not path:
    raise DataError(None, "data.text.tokenizer is empty: expected a tokenizer.json or vocab.txt (or call "
                    "invcoss_jax.data.tokenization.ensure_tokenizer to train one)")
  if not os.path.isfile(path):
    raise MissingDataError(None, f"data.text.tokenizer={path!r} does not exist: expected a tokenizer.json or "
                           "a BERT vocab.txt")
  if path.lower().endswith(".json"):
    try:
      tok = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises plain Exception on a bad file
      raise DataError(path, f"cannot read the tokenizer ({type(e).__name__}: {e}); expected a "
                      "tokenizers tokenizer.json") from e
  else:
    tok = _bert_parts(Tokenizer(models.WordPiece(_read_vocab(path), unk_token="[UNK]",
                                                 continuing_subword_prefix=PREFIX,
                                                 max_input_chars_per_word=100)), lowercase)
  missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
  if missing:
    raise DataError(path, f"the vocabulary lacks {missing}: expected the special tokens "
                    f"{list(SPECIAL_TOKENS)}")
  if not path.lower().endswith(".json"):
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # matched whole in raw text, skipped by decode
    _post_processor(tok)
  return tok


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
  """Ids of the specials: {'pad', 'unk', 'cls', 'sep', 'mask'}."""
  out = {}
  for key, token in zip(_SPECIAL_KEYS, SPECIAL_TOKENS):
    i = tokenizer.token_to_id(token)
    if i is None:
      raise DataError(None, f"the tokenizer has no {token} token: expected {list(SPECIAL_TOKENS)}")
    out[key] = int(i)
  return out


def vocab_size(tokenizer: Tokenizer) -> int:
  """Size of the id space (added tokens included): every id is below it."""
  return int(tokenizer.get_vocab_size(with_added_tokens=True))


def model_text_fields(path: str) -> dict[str, object]:
  """What config.model needs of the text embedding's vocabulary at `path` (loaded once): vocab_size, pad_id
  and the file itself (`tokenizer`), so the vocabulary travels with every checkpoint of the model."""
  tok = load_tokenizer(str(path))
  return dict(vocab_size=vocab_size(tok), pad_id=special_ids(tok)["pad"], tokenizer=str(path))


def set_model_vocabulary(model_cfg: ml_collections.ConfigDict, path: str) -> dict[str, object]:
  """Writes `model_text_fields(path)` into config.model (in place) and returns them; a config.model.vocab_size
  already set to another size is refused (0 takes the tokenizer's)."""
  fields = model_text_fields(path)
  given = int(model_cfg.vocab_size)
  if given and given != fields["vocab_size"]:
    raise ConfigError(f"config.model.vocab_size={given}, but the tokenizer {path} has {fields['vocab_size']} "
                      "tokens: leave it 0 to take the tokenizer's")
  model_cfg.update(fields)
  return fields


def without_padding(tokenizer: Tokenizer) -> Tokenizer:
  """The tokenizer without its own truncation/padding (a tokenizer.json may carry them; a copy then):
  `encode_into` places [CLS], [SEP] and [PAD] itself."""
  if tokenizer.truncation is None and tokenizer.padding is None:
    return tokenizer
  tok = Tokenizer.from_str(tokenizer.to_str())
  tok.no_truncation()
  tok.no_padding()
  return tok


def encode_into(tok: Tokenizer, ids: dict[str, int], text: str, max_length: int,
                tokens: np.ndarray, mask: np.ndarray, words: np.ndarray) -> None:
  """One text into the (max_length,) rows `tokens`, `mask`, `words` (see `encode`); `tok` from
  `without_padding`, `ids` its `special_ids`. A run of over MAX_CHUNK_CHARS without whitespace is one [UNK]."""
  if len(text) > MAX_CHUNK_CHARS:
    chunks = _SPACES.split(text)
    if any(len(c) > MAX_CHUNK_CHARS for c in chunks):
      text = " ".join(c if len(c) <= MAX_CHUNK_CHARS else SPECIAL_TOKENS[1] for c in chunks)
  enc = tok.encode(text, add_special_tokens=False)
  body = enc.ids[:max_length - 2]
  n = len(body)
  tokens[0] = ids["cls"]
  tokens[1:n + 1] = body
  tokens[n + 1] = ids["sep"]
  tokens[n + 2:] = ids["pad"]
  mask[:n + 2] = 1
  mask[n + 2:] = 0
  words[:] = -1
  words[1:n + 1] = [-1 if w is None else w for w in enc.word_ids[:n]]


def encode(tokenizer: Tokenizer, texts: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
  """int32 arrays (N, max_length): 'tokens' ([CLS] text [SEP] [PAD]...; a longer text is truncated,
  [SEP] staying last), 'attention_mask' (1 on [CLS], the text and [SEP]) and 'word_ids' (the word of
  each token, numbered from 0 per text, pieces of a word sharing it; -1 on specials and padding)."""
  if isinstance(texts, str):
    raise TypeError("encode takes a sequence of texts: wrap a single text in a list")
  max_length = int(max_length)
  if max_length < 2:
    raise ValueError(f"max_length={max_length}: expected >= 2 (room for [CLS] and [SEP])")
  tok = without_padding(tokenizer)
  ids = special_ids(tok)
  n = len(texts)
  out = {k: np.zeros((n, max_length), np.int32) for k in ("tokens", "attention_mask", "word_ids")}
  for i, text in enumerate(texts):
    encode_into(tok, ids, text, max_length, out["tokens"][i], out["attention_mask"][i],
                out["word_ids"][i])
  return out


def _copy(data_cfg) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg))
  if "text" not in out:
    out.text = data_config().text
  return out


def ensure_tokenizer(data_cfg: ml_collections.ConfigDict, workdir: str | os.PathLike
                     ) -> ml_collections.ConfigDict:
  """A copy of the data section whose `text.tokenizer` names a usable tokenizer.

  * `data.text.tokenizer` set: it is loaded once (a missing or broken file fails here, not in a worker).
  * empty, `workdir/tokenizer.json` exists: reused, so a restarted job keeps the vocabulary its
    checkpoints were trained with (even if vocab_size changed since).
  * empty otherwise: trained on the texts of the *train* split (never val/test) with
    `data.text.vocab_size` and `tokenizer_kind`, and written atomically to `workdir/tokenizer.json`.
  A section of another format is returned unchanged (as a copy).
  """
  out = _copy(data_cfg)
  cfg = resolve(out)
  if cfg.format != "text":
    return out
  t = cfg.text
  if t.tokenizer:
    load_tokenizer(t.tokenizer, lowercase=bool(t.lowercase))
    return out
  path = os.path.abspath(os.path.join(os.fspath(workdir), TOKENIZER_FILE))
  if os.path.exists(path):
    tok = load_tokenizer(path)
    logger.info("%s: reusing the tokenizer (%d tokens) of an earlier run", path, vocab_size(tok))
  else:
    skips = SkipLog(f"data.name={cfg.name} (texts of split 'train' at {cfg.path}, for the tokenizer)")
    records = text_io.read_split(cfg, "train", skips)
    skips.log_summary()
    if not records:
      raise DataError(cfg.path, "no texts in split 'train': expected some to train the tokenizer on")
    tok = train_tokenizer([r.text for r in records], int(t.vocab_size), kind=str(t.tokenizer_kind),
                          lowercase=bool(t.lowercase), sources=[r.source for r in records])
    with atomic_path(path) as tmp:
      tok.save(tmp)
    logger.info("%s: trained a %s tokenizer of %d tokens on %d texts of split 'train'", path,
                t.tokenizer_kind, vocab_size(tok), len(records))
  out.text.tokenizer = path
  return out
