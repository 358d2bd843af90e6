"""Reading clinical text (the `report` modality) into records `(text, label or None, "file:line")`.

Three layouts (`data.text.layout`):
* `mimic`: a folder of MIMIC-CXR style reports (`files/pXX/pXXXXXXXX/sXXXXXXXX.txt`, any depth), one
  record per file holding its FINDINGS and IMPRESSION sections (the whole text when it has neither);
* `table`: a CSV or JSON-lines file with named columns (`data.text.text_columns` joined, an optional
  `data.text.label_column`), one record per row;
* `pubmed`: the PubMed 200k/20k RCT files (`###<id>` lines, then `LABEL<TAB>sentence` lines), one
  record per sentence labelled with its role in the abstract; train.txt / dev.txt / test.txt are the
  native splits.

Files are decoded as UTF-8 strictly: a report with stray Latin-1 bytes is an error naming the file and
line rather than silently altered text. Every problem is a `DataError` naming "file:line"; with
`lenient=True` the record is skipped and counted in the `SkipLog` instead (in a table or a PubMed file
only the row or line holding a bad byte; a MIMIC report is one record, skipped whole). Report text must be
text: a JSON number, boolean, object or array where a text column is expected is refused, and a text over
`MAX_TEXT_CHARS` characters is an error (CSV fields up to that length are read: Python's csv module alone
stops at 131,072). Texts are returned with runs of whitespace collapsed to one space (tokenizers ignore
them anyway, and records then compare equal across line-wrapping styles). Plain Python only: nothing here
needs the tokenizer.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from typing import Any, Mapping, NamedTuple, Sequence

import ml_collections

from invcoss_jax.data import catalog
from invcoss_jax.data.errors import DataError, MissingDataError, SkipLog

LAYOUTS = ("auto", "mimic", "table", "pubmed")
TABLE_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".json")
# PubMed 200k RCT sentence roles; their order here is the class id.
PUBMED_LABELS = ("BACKGROUND", "OBJECTIVE", "METHODS", "RESULTS", "CONCLUSIONS")
PUBMED_SPLIT_FILES = {"train": "train.txt", "val": "dev.txt", "test": "test.txt"}
LABEL_RULES = ("", "normal_vs_abnormal")
MIMIC_SECTIONS = ("findings", "impression")
# MIMIC-CXR's top-level headers (its section parser's names): inside FINDINGS or IMPRESSION only these start
# another section; any other upper-case "NAME:" line there ("LUNGS: Clear.") is a sub-heading of the section.
TOP_LEVEL_SECTIONS = frozenset({
    "findings", "impression", "indication", "indications", "history", "clinical history", "comparison",
    "comparisons", "technique", "examination", "exam", "reason for examination", "reason for exam",
    "clinical information", "wet read", "notification", "recommendation", "recommendations",
    "recommendation(s)", "final report", "procedure", "conclusion", "addendum", "study", "type of examination"})

# The longest text (a report, a joined row, a sentence) read, in characters: a thousand times a long report,
# far below what would exhaust memory. Also the CSV field limit (csv's own default is 131,072).
MAX_TEXT_CHARS = 1 << 24
# Bytes that are not UTF-8, kept as lone surrogates (errors='surrogateescape') when decoding leniently, so that
# the rows holding them are found and skipped one by one.
_UNDECODED = re.compile("[\udc80-\udcff]")
_QUOTE_HINT = ": a quoted field opened on this line is never closed (an unbalanced \")"

# A section header at the start of a line: "FINDINGS:", "IMPRESSION :", "WET READ:", "PA AND LATERAL:".
_HEADER = re.compile(r"^[ \t]*([A-Za-z][A-Za-z0-9 /&(),'-]{0,60}?)[ \t]*:")


class TextRecord(NamedTuple):
  """One example: its text, class id (None when unlabelled) and where it came from ("file:line")."""
  text: str
  label: int | None
  source: str


def _clean(text: str) -> str:
  return " ".join(text.split())


def _where(path: str, line: int) -> str:
  return f"{path}:{line}"


def _length_problem(text: str) -> str:
  """'' when `text` is within MAX_TEXT_CHARS, else what is wrong."""
  if len(text) <= MAX_TEXT_CHARS:
    return ""
  return (f"a text of {len(text):,} characters: expected at most {MAX_TEXT_CHARS:,} (a report, not a file "
          "pasted into a field?)")


def _undecoded_problem(text: str) -> str:
  """'' when `text` was valid UTF-8, else what is wrong (its first byte that was not)."""
  m = _UNDECODED.search(text)
  if m is None:
    return ""
  return (f"byte 0x{ord(m.group()) - 0xdc00:02x} is not UTF-8: expected UTF-8 text (re-encode the file, e.g. "
          "iconv -f latin1 -t utf-8)")


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise DataError(path, f"cannot read the file ({type(e).__name__}: {e}); expected a readable text "
                    "file") from e


def read_text_file(path: str | os.PathLike) -> str:
  """The file's text, decoded as UTF-8 strictly (a leading byte-order mark is dropped); undecodable
  bytes are a DataError naming the file and the line they are on."""
  path = os.fspath(path)
  raw = _read_bytes(path)
  try:
    return raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise DataError(_where(path, line), f"byte 0x{raw[e.start]:02x} at offset {e.start} is not "
                    "UTF-8: expected UTF-8 text (re-encode the file, e.g. iconv -f latin1 -t utf-8)") from e


# ----------------------------------------------------------------------------------------------------
# MIMIC-CXR reports.


def report_sections(text: str) -> dict[str, tuple[int, str]]:
  """{section name (lower case): (line of its header, its text)} of a report.

  A header is a line starting with `NAME:`; FINDINGS and IMPRESSION are recognised in any case, other
  headers only in upper case (MIMIC writes them so), which keeps sentences like "Note: ..." inside
  their section. Inside FINDINGS or IMPRESSION only a top-level header (`TOP_LEVEL_SECTIONS`) ends the
  section: "LUNGS: Clear." there is a sub-heading and stays in the text. A section runs until the next
  header; a repeated section is concatenated.
  """
  sections: dict[str, tuple[int, list[str]]] = {}
  current = None
  for lineno, line in enumerate(text.splitlines(), start=1):
    m = _HEADER.match(line)
    if m:
      name = m.group(1).strip()
      upper = name.upper() == name and any(c.isalpha() for c in name)
      if upper and current in MIMIC_SECTIONS and name.lower() not in TOP_LEVEL_SECTIONS:
        upper = False  # a sub-heading of FINDINGS / IMPRESSION: part of its text
      if name.lower() in MIMIC_SECTIONS or upper:
        current = name.lower()
        if current not in sections:
          sections[current] = (lineno, [])
        sections[current][1].append(line[m.end():])
        continue
    if current is not None:
      sections[current][1].append(line)
  return {k: (lineno, _clean(" ".join(parts))) for k, (lineno, parts) in sections.items()}


def read_mimic_report(path: str | os.PathLike) -> tuple[str, int]:
  """(text, line) of a MIMIC-CXR style report: its FINDINGS and IMPRESSION sections (in that order) or,
  when it has neither, its whole text; `line` is where that text starts. An empty result is a
  DataError naming the file and line: a report without text would train on [CLS] [SEP] alone."""
  path = os.fspath(path)
  text = read_text_file(path)
  if _length_problem(text):
    raise DataError(_where(path, 1), _length_problem(text))
  sections = report_sections(text)
  kept = [sections[s] for s in MIMIC_SECTIONS if s in sections]
  if kept:
    out = _clean(" ".join(t for _, t in kept))
    line = kept[0][0]
    if not out:
      names = " and ".join(s.upper() for s in MIMIC_SECTIONS if s in sections)
      raise DataError(_where(path, line), f"the {names} section(s) are empty: expected report text after "
                      "the header")
    return out, line
  out = _clean(text)
  if not out:
    raise DataError(_where(path, 1), "empty report: expected FINDINGS/IMPRESSION sections or any text")
  first = next(i for i, ln in enumerate(text.splitlines(), start=1) if ln.strip())
  return out, first


def read_mimic_folder(root: str | os.PathLike, *, files: Sequence[str] | None = None,
                      skips: SkipLog | None = None) -> list[TextRecord]:
  """One unlabelled record per `.txt` report under `root` (recursively, sorted); `files` restricts it
  to those. With `skips` (lenient) a bad report is logged and skipped instead of raising."""
  root = os.fspath(root)
  files = catalog.find_files(root, (".txt",)) if files is None else list(files)
  out = []
  for f in files:
    try:
      text, line = read_mimic_report(f)
    except DataError as e:
      if skips is None:
        raise
      skips.skip(e.path or f, e.problem)
      continue
    out.append(TextRecord(text, None, _where(f, line)))
  return out


# ----------------------------------------------------------------------------------------------------
# CSV / JSON-lines tables.


def parse_label_map(label_map: Any) -> dict[str, int]:
  """`data.text.label_map`: a tuple of "value=id" strings or a mapping value -> id."""
  if isinstance(label_map, (Mapping, ml_collections.ConfigDict)):
    items = list(label_map.items())
  else:
    items = []
    for entry in label_map:
      if not isinstance(entry, str) or "=" not in entry:
        raise DataError(None, f"data.text.label_map entry {entry!r}: expected 'value=id' (e.g. 'normal=0')")
      value, _, cid = entry.rpartition("=")
      items.append((value, cid))
  out = {}
  for value, cid in items:
    try:
      cid = int(cid)
    except (TypeError, ValueError):
      raise DataError(None, f"data.text.label_map: class id {cid!r} of {value!r} is not an integer") from None
    if cid < 0:
      raise DataError(None, f"data.text.label_map: class id {cid} of {value!r}: expected >= 0")
    out[str(value).strip()] = cid
  return out


def _decoded(path: str, skips: SkipLog | None) -> str:
  """The file's text. Strict: bytes that are not UTF-8 are an error naming the line. Lenient: they are
  kept as lone surrogates (surrogateescape), and the rows holding them are skipped one by one
  (`_undecoded_problem`), not the whole file."""
  if skips is None:
    return read_text_file(path)
  return _read_bytes(path).decode("utf-8-sig", errors="surrogateescape")


def _csv_error(e: csv.Error) -> str:
  # Strict quoting reports a quote never closed at the end of the file: the row it opens is the one to fix.
  return f"{e}{_QUOTE_HINT if 'end of data' in str(e) else ''}"


def _row_problem(skips: SkipLog | None, where: str, problem: str) -> None:
  if skips is None:
    raise DataError(where, problem)
  skips.skip(where, problem)


def _csv_rows(path: str, text: str, needed: Sequence[str], label_column: str, skips: SkipLog | None):
  """(line, {column: value}) of every data row of a CSV file; the header must hold `needed`.

  Strict quoting: a quote that is never closed is an error naming the line it opens (not the rest of the
  file read silently into one field)."""
  # Process-wide, only ever raised: fields up to the text limit are read.
  csv.field_size_limit(max(csv.field_size_limit(), MAX_TEXT_CHARS))
  reader = csv.reader(io.StringIO(text, newline=""), strict=True)
  try:
    header = [h.strip() for h in next(reader)]
  except StopIteration:
    raise DataError(_where(path, 1), "empty CSV file: expected a header row of column names") from None
  except csv.Error as e:
    raise DataError(_where(path, 1), f"malformed CSV header ({_csv_error(e)}): expected a row of column "
                    "names") from None
  bad = _undecoded_problem("".join(header))
  if bad:
    raise DataError(_where(path, 1), f"the header: {bad}")
  for c in needed:
    if c not in header:
      raise DataError(_where(path, 1), f"no column {c!r} ({_option(c, label_column)}): the header has "
                      f"columns {header}")
  start = reader.line_num + 1
  while True:
    try:
      fields = next(reader)
    except StopIteration:
      return
    except csv.Error as e:
      raise DataError(_where(path, start), f"malformed CSV row ({_csv_error(e)})") from None
    line, start = start, reader.line_num + 1
    if not fields or (len(fields) == 1 and not fields[0].strip()):
      continue  # a blank line
    bad = _undecoded_problem("".join(fields))
    if bad:
      _row_problem(skips, _where(path, line), bad)
      continue
    if len(fields) != len(header):
      _row_problem(skips, _where(path, line), f"row has {len(fields)} fields: expected {len(header)} "
                   f"like the header {header}")
      continue
    yield line, dict(zip(header, fields))


def _jsonl_rows(path: str, text: str, needed: Sequence[str], label_column: str,
                skips: SkipLog | None):
  """(line, {key: value as text}) of every object of a JSON-lines file; each must hold `needed`."""
  for line, raw in enumerate(text.splitlines(), start=1):
    if not raw.strip():
      continue
    where = _where(path, line)
    bad = _undecoded_problem(raw)
    if bad:
      _row_problem(skips, where, bad)
      continue
    try:
      row = json.loads(raw)
    except json.JSONDecodeError as e:
      _row_problem(skips, where, f"not JSON ({e.msg} at column {e.colno}): expected one JSON object per "
                   "line (JSON lines)")
      continue
    if not isinstance(row, dict):
      _row_problem(skips, where, f"a JSON {type(row).__name__}: expected one JSON object per line "
                   "(JSON lines)")
      continue
    missing = [c for c in needed if c not in row]
    if missing:
      _row_problem(skips, where, f"no key {missing[0]!r} ({_option(missing[0], label_column)}): this row has "
                   f"keys {list(row)}")
      continue
    # Text is a JSON string (null: empty); a class is a string or a number. Anything else would be read as
    # its JSON spelling ("42", "{\"a\": 1}", "true") and trained on as if it were a report.
    wrong = [(c, row[c]) for c in needed if row[c] is not None and not isinstance(row[c], str) and (
        c != label_column or isinstance(row[c], (bool, dict, list)))]
    if wrong:
      c, v = wrong[0]
      expected = ("a class value as a JSON string or number" if c == label_column else
                  "the report text as a JSON string (or null)")
      _row_problem(skips, where, f"key {c!r} holds a JSON {_json_kind(v)} ({json.dumps(v)[:40]}): expected "
                   f"{expected}")
      continue
    yield line, {str(k): "" if v is None else (v if isinstance(v, str) else json.dumps(v)) for k, v in row.items()}


def _json_kind(value: Any) -> str:
  if isinstance(value, bool):
    return "boolean"
  if isinstance(value, (int, float)):
    return "number"
  return "object" if isinstance(value, dict) else "array" if isinstance(value, list) else type(value).__name__



def _option(column: str, label_column: str) -> str:
  return "data.text.label_column" if column == label_column else "data.text.text_columns"


def read_table(path: str | os.PathLike, *, text_columns: Sequence[str], label_column: str = "",
               label_rule: str = "", label_map: Any = (),
               skips: SkipLog | None = None) -> list[TextRecord]:
  """One record per row of a CSV (header row) or JSON-lines file: `text_columns` joined with a space.

  Labels (when `label_column` is set): `label_rule='normal_vs_abnormal'` gives 0 to the value "normal"
  (any case, stripped) and 1 to anything else; `label_map` maps values to ids; otherwise the sorted
  unique values (numerically when they are all integers) are the classes 0..K-1. A column missing
  from the CSV header is a DataError listing the columns present (an option error: also when lenient).
  A row with empty text, an empty or unmapped label, or the wrong number of fields is an error naming
  the file and line, or with `skips` (lenient) a logged skip.
  """
  path = os.fspath(path)
  text_columns = tuple(str(c) for c in text_columns)
  if not text_columns:
    raise DataError(None, "data.text.text_columns is empty: expected the column(s) holding the text")
  if label_rule not in LABEL_RULES:
    raise DataError(None, f"data.text.label_rule={label_rule!r}: expected one of {LABEL_RULES}")
  mapping = parse_label_map(label_map) if label_map else None
  if (label_rule or mapping) and not label_column:
    raise DataError(None, "data.text.label_rule / label_map need data.text.label_column: expected the "
                    "column holding the class")
  if label_rule and mapping:
    raise DataError(None, "data.text.label_rule and data.text.label_map are both set: expected one")
  text = _decoded(path, skips)
  needed = text_columns + ((label_column,) if label_column else ())
  reader = _csv_rows if path.lower().endswith(".csv") else _jsonl_rows
  rows = reader(path, text, needed, label_column, skips)
  kept: list[tuple[str, str, str]] = []  # (text, raw label value, where)
  for line, row in rows:
    where = _where(path, line)
    joined = _clean(" ".join(row[c] for c in text_columns))
    value = row[label_column].strip() if label_column else ""
    if _length_problem(joined):
      _row_problem(skips, where, _length_problem(joined))
    elif not joined:
      _row_problem(skips, where, f"empty text in column(s) {list(text_columns)}: expected report text")
    elif label_column and not value:
      _row_problem(skips, where, f"empty label in column {label_column!r}: expected a class value")
    elif mapping is not None and value not in mapping:
      _row_problem(skips, where, f"label {value!r} (column {label_column!r}) is not in "
                   f"data.text.label_map: expected one of {sorted(mapping)}")
    else:
      kept.append((joined, value, where))
  if not label_column:
    return [TextRecord(t, None, w) for t, _, w in kept]
  if label_rule == "normal_vs_abnormal":
    ids = {v: 0 if v.lower() == "normal" else 1 for _, v, _ in kept}
  elif mapping is not None:
    ids = mapping
  else:
    ids = {v: i for i, v in enumerate(table_classes([v for _, v, _ in kept]))}
  return [TextRecord(t, ids[v], w) for t, v, w in kept]


def table_classes(values: Sequence[str]) -> list[str]:
  """The sorted unique class values (numerically when they are all integers): class i is the i-th."""
  unique = set(values)
  try:
    return sorted(unique, key=int)
  except ValueError:
    return sorted(unique)


# ----------------------------------------------------------------------------------------------------
# PubMed RCT sentence classification.


def _read_pubmed(path: str, skips: SkipLog | None) -> list[tuple[int, TextRecord]]:
  """(abstract number, record) of every sentence of a PubMed RCT file."""
  text = _decoded(path, skips)
  out = []
  abstract = -1
  for line, raw in enumerate(text.splitlines(), start=1):
    if not raw.strip():
      continue
    if raw.startswith("###"):
      abstract += 1
      continue
    where = _where(path, line)
    problem = _undecoded_problem(raw) or _length_problem(raw)
    if not problem and "\t" not in raw:
      problem = (f"no tab in {raw[:60]!r}: expected 'LABEL<TAB>sentence' (or a '###<id>' line starting "
                 "an abstract)")
    elif not problem:
      label, _, sentence = raw.partition("\t")
      label = label.strip()
      sentence = _clean(sentence)
      if label not in PUBMED_LABELS:
        problem = f"unknown label {label!r}: expected one of {list(PUBMED_LABELS)}"
      elif not sentence:
        problem = f"empty sentence after the label {label}: expected text"
    if problem:
      if skips is None:
        raise DataError(where, problem)
      skips.skip(where, problem)
      continue
    out.append((max(abstract, 0), TextRecord(sentence, PUBMED_LABELS.index(label), where)))
  return out


def read_pubmed(path: str | os.PathLike, *, skips: SkipLog | None = None) -> list[TextRecord]:
  """One record per sentence of a PubMed RCT file (`###<id>`, then `LABEL<TAB>sentence` lines), labelled
  0..4 = BACKGROUND, OBJECTIVE, METHODS, RESULTS, CONCLUSIONS. A line without a tab or with another
  label is a DataError naming the file and line (with `skips`: a logged skip)."""
  return [r for _, r in _read_pubmed(os.fspath(path), skips)]


def _starts_with_hashes(path: str) -> bool:
  try:
    with open(path, "rb") as f:
      for raw in f:
        if raw.strip():
          return raw.startswith(b"###")
  except OSError:
    return False
  return False


# ----------------------------------------------------------------------------------------------------
# Layouts and splits.


def text_layout(cfg: ml_collections.ConfigDict) -> str:
  """The layout of the (resolved) config's data.path: data.text.layout, or for 'auto' a .csv/.jsonl
  file -> table; a folder with train.txt/dev.txt/test.txt starting with '###' (or such a file) ->
  pubmed; otherwise a folder of .txt reports (or one report) -> mimic."""
  layout = str(cfg.text.layout or "auto")
  if layout not in LAYOUTS:
    raise DataError(None, f"data.text.layout={layout!r}: expected one of {LAYOUTS}")
  if layout != "auto":
    return layout
  path = cfg.path
  if os.path.isfile(path):
    if path.lower().endswith(TABLE_SUFFIXES):
      return "table"
    return "pubmed" if _starts_with_hashes(path) else "mimic"
  if any(_starts_with_hashes(os.path.join(path, f)) for f in PUBMED_SPLIT_FILES.values()):
    return "pubmed"
  return "mimic"


def _split(records: list, split: str, cfg, what: str) -> list:
  idx = catalog.split_indices(len(records), split, tuple(cfg.split_fractions), int(cfg.split_seed),
                              what=what)
  return [records[i] for i in idx]


def read_split(cfg: ml_collections.ConfigDict, split: str, skips: SkipLog) -> list[TextRecord]:
  """The records of `split` of a resolved text config (lenient skips go to `skips`).

  Tables and single files are split with data.split_fractions / split_seed (catalog.split_indices, over
  the records kept; not stratified, so a row's split does not depend on the label options); a single
  PubMed file is split by abstract, so that no abstract has sentences in two splits. A PubMed folder
  has native splits (val = dev.txt). A MIMIC folder uses `path/<split>/` folders when present (like
  images), else the fractions over its patients (`pXXXXXXXX` folders; reports outside one count alone).
  """
  path = catalog.require_path(cfg.path, "text files (a .csv/.jsonl table, a folder of .txt reports, "
                              "or PubMed train/dev/test.txt)")
  lenient = skips if cfg.lenient else None
  layout = text_layout(cfg)
  what = f"data.path={path!r}"
  if layout == "table":
    if not os.path.isfile(path) or not path.lower().endswith(TABLE_SUFFIXES):
      raise DataError(path, f"data.text.layout='table': expected a {'/'.join(TABLE_SUFFIXES)} file")
    t = cfg.text
    records = read_table(path, text_columns=tuple(t.text_columns), label_column=str(t.label_column),
                         label_rule=str(t.label_rule), label_map=t.label_map, skips=lenient)
    return _split(records, split, cfg, what)
  if layout == "pubmed":
    if os.path.isfile(path):
      sentences = _read_pubmed(path, lenient)
      abstracts = sorted({a for a, _ in sentences})
      keep = set(_split(abstracts, split, cfg, what))
      return [r for a, r in sentences if a in keep]
    names = list(PUBMED_SPLIT_FILES.values()) if split in ("all", "") else (
        [PUBMED_SPLIT_FILES[split]] if split in PUBMED_SPLIT_FILES else None)
    if names is None:
      raise DataError(None, f"data.split={split!r}: expected one of {list(PUBMED_SPLIT_FILES) + ['all']} "
                      "(PubMed: train.txt, dev.txt, test.txt)")
    out = []
    for name in names:
      f = os.path.join(path, name)
      if not os.path.isfile(f):
        raise MissingDataError(None, f"data.path={path!r} has no {name}: expected the PubMed RCT split files "
                               f"{list(PUBMED_SPLIT_FILES.values())}")
      out.extend(r for _, r in _read_pubmed(f, lenient))
    return out
  if os.path.isfile(path):
    records = read_mimic_folder(os.path.dirname(path), files=[path], skips=lenient)
    return _split(records, split, cfg, what)
  root, native = catalog.split_root(path, split, tuple(cfg.split_fractions))
  files = catalog.find_files(root, (".txt",))
  if not files:
    raise MissingDataError(None, f"data.path={root!r} holds no .txt reports: expected MIMIC-CXR style "
                           "files/pXX/pXXXXXXXX/sXXXXXXXX.txt (data.text.layout='mimic')")
  records = read_mimic_folder(root, files=files, skips=lenient)
  if native:
    return records
  # Split by patient (the pXXXXXXXX folder of MIMIC-CXR, else each report alone): the studies of one
  # patient share findings, and one in train with another in test would leak.
  groups = [_patient(r.source.rpartition(":")[0], root) for r in records]
  keep = set(_split(sorted(set(groups)), split, cfg, what))
  return [r for r, g in zip(records, groups) if g in keep]


def _patient(path: str, root: str) -> str:
  """The patient folder (the innermost `p<digits>` folder) of a report, else the report itself."""
  parts = os.path.relpath(path, root).split(os.sep)
  for k in range(len(parts) - 2, -1, -1):
    if re.fullmatch(r"p\d+", parts[k]):
      return os.path.join(*parts[:k + 1])
  return os.path.join(*parts)


def num_text_classes(cfg: ml_collections.ConfigDict) -> int:
  """Classes of a resolved text config's labels (0 when unlabelled): 5 for PubMed, 2 for
  normal_vs_abnormal, max id + 1 of a label_map, else the unique values of the label column."""
  layout = text_layout(cfg)
  if layout == "pubmed":
    return len(PUBMED_LABELS)
  if layout != "table" or not cfg.text.label_column:
    return 0
  if cfg.text.label_rule == "normal_vs_abnormal":
    return 2
  if cfg.text.label_map:
    return max(parse_label_map(cfg.text.label_map).values()) + 1
  skips = SkipLog(f"data.path={cfg.path!r} (counting classes)")
  records = read_table(cfg.path, text_columns=tuple(cfg.text.text_columns),
                       label_column=str(cfg.text.label_column), skips=skips if cfg.lenient else None)
  return len({r.label for r in records})
