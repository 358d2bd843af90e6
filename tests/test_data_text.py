"""The text input layer (modality 'report'): readers, the tokenizer, splits, labels and the pipeline, on
the real Indiana University chest X-ray reports of ../shared/data and on tiny files written here."""

import csv
import os
import pickle

import numpy as np
import pytest

from invcoss_jax import data
from invcoss_jax.data import text_io, tokenization

from conftest import make_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L = 112


def indiana_csv() -> str:
  env = os.environ.get("INVCOSS_SHARED_DATA")
  root = env if env else os.path.join(os.path.dirname(REPO), "shared", "data")
  return os.path.join(root, "report", "indiana_reports.csv")


@pytest.fixture(scope="module")
def csv_path():
  path = indiana_csv()
  if not os.path.isfile(path):
    pytest.skip(f"{path} is absent: these tests read the real Indiana reports of ../shared/data "
                "(or $INVCOSS_SHARED_DATA/report/indiana_reports.csv)")
  return path


@pytest.fixture(scope="module")
def csv_rows(csv_path):
  """Every data row of the CSV as (line where it starts, row dict), read independently of text_io."""
  out = []
  with open(csv_path, encoding="utf-8", newline="") as f:
    reader = csv.reader(f)
    header = next(reader)
    start = reader.line_num + 1
    for fields in reader:
      out.append((start, dict(zip(header, fields))))
      start = reader.line_num + 1
  return out


def report_cfg(path, **kw):
  return make_cfg("indiana_reports", path=str(path), **kw)


@pytest.fixture(scope="module")
def tokenized(csv_path, tmp_path_factory):
  """(config with the trained tokenizer, the tokenizer) for the lenient, labelled Indiana task."""
  cfg = report_cfg(csv_path, lenient=True, **{"text.label_column": "Problems",
                                              "text.label_rule": "normal_vs_abnormal"})
  cfg = tokenization.ensure_tokenizer(cfg, tmp_path_factory.mktemp("workdir"))
  return cfg, tokenization.load_tokenizer(cfg.text.tokenizer)


def records(cfg, split):
  return data.make_source(cfg, split).records


def words_of(tok, text):
  return [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))]


def check_example(tok, text, tokens, mask, word_ids, max_length=L):
  """[CLS] text [SEP] [PAD]..., attention on the real tokens, word numbering of the BERT words."""
  ids = tokenization.special_ids(tok)
  n = int(mask.sum())
  assert tokens.shape == mask.shape == word_ids.shape == (max_length,)
  assert tokens[0] == ids["cls"] and tokens[n - 1] == ids["sep"]
  np.testing.assert_array_equal(mask[:n], 1)
  np.testing.assert_array_equal(mask[n:], 0)
  np.testing.assert_array_equal(tokens[n:], ids["pad"])
  assert np.all(tokens < tokenization.vocab_size(tok)) and np.all(tokens >= 0)
  assert word_ids[0] == -1 and word_ids[n - 1] == -1 and np.all(word_ids[n:] == -1)
  body, wid = tokens[1:n - 1], word_ids[1:n - 1]
  assert not np.isin(body, [ids["cls"], ids["sep"], ids["pad"], ids["unk"]]).any()
  pieces = [tok.id_to_token(int(t)) for t in body]
  # Word numbers start at 0 and advance by one at every piece that does not continue a word.
  assert wid[0] == 0
  for j in range(1, len(pieces)):
    assert wid[j] == wid[j - 1] + (0 if pieces[j].startswith("##") else 1), (pieces[j - 1], pieces[j])
  # The pieces of word k spell the k-th normalised word (the last may be cut by truncation).
  words = words_of(tok, text)
  for k in np.unique(wid):
    spelled = "".join(p[2:] if p.startswith("##") else p for p, w in zip(pieces, wid) if w == k)
    assert spelled == words[k] or (k == wid[-1] and words[k].startswith(spelled))
  return n


# ----------------------------------------------------------------------------------------------------
# The tokenizer on the real reports.


def test_tokenizer_round_trips_the_real_reports(tokenized):
  cfg, tok = tokenized
  texts = [r.text for r in records(cfg, "test")[:40]]
  enc = tokenization.encode(tok, texts, L)
  assert {k: (v.dtype, v.shape) for k, v in enc.items()} == {
      k: (np.dtype(np.int32), (len(texts), L)) for k in ("tokens", "attention_mask", "word_ids")}
  checked = 0
  for i, text in enumerate(texts):
    n = check_example(tok, text, enc["tokens"][i], enc["attention_mask"][i], enc["word_ids"][i])
    if n < L:  # not truncated: decoding gives back the normalised text, word for word
      assert tok.decode(enc["tokens"][i][:n].tolist()) == " ".join(words_of(tok, text))
      checked += 1
  assert checked >= 30
  # The vocabulary of the small corpus holds every word whole; a smaller one splits words into
  # pieces, which share their word's number.
  small = tokenization.train_tokenizer([r.text for r in records(cfg, "train")], 600)
  assert tokenization.vocab_size(small) <= 600
  enc = tokenization.encode(small, texts, L)
  pieces = 0
  for i, text in enumerate(texts):
    check_example(small, text, enc["tokens"][i], enc["attention_mask"][i], enc["word_ids"][i])
    pieces += sum(small.id_to_token(int(t)).startswith("##") for t in enc["tokens"][i])
  assert pieces > 50


def test_a_long_report_is_truncated_with_sep_last(tokenized):
  cfg, tok = tokenized
  long = [r.text for r in records(cfg, "train")
          if len(tok.encode(r.text, add_special_tokens=False).ids) > L - 2]
  assert len(long) >= 10  # the CSV has reports of up to ~270 tokens
  enc = tokenization.encode(tok, long[:5], L)
  ids = tokenization.special_ids(tok)
  for i, text in enumerate(long[:5]):
    assert check_example(tok, text, enc["tokens"][i], enc["attention_mask"][i], enc["word_ids"][i]) == L
    assert enc["tokens"][i][-1] == ids["sep"]
    body = tok.encode(text, add_special_tokens=False).ids
    np.testing.assert_array_equal(enc["tokens"][i][1:L - 1], body[:L - 2])
  short = tokenization.encode(tok, long[:1], 8)
  assert short["tokens"].shape == (1, 8) and short["tokens"][0, -1] == ids["sep"]
  assert short["attention_mask"].sum() == 8


def test_bpe_tokenizer_encodes_like_the_contract(tokenized):
  cfg, _ = tokenized
  texts = [r.text for r in records(cfg, "val")[:20]]
  bpe = tokenization.train_tokenizer(texts, 300, kind="bpe")
  enc = tokenization.encode(bpe, texts, L)
  for i, text in enumerate(texts):
    check_example(bpe, text, enc["tokens"][i], enc["attention_mask"][i], enc["word_ids"][i])


# ----------------------------------------------------------------------------------------------------
# Splits, skips and labels of the real CSV.


def test_splits_are_disjoint_and_cover_the_kept_rows(tokenized, csv_rows):
  cfg, _ = tokenized
  empty = [line for line, r in csv_rows if not (r["findings"].strip() or r["impression"].strip())]
  assert len(csv_rows) == 3851 and len(empty) == 25
  parts = {s: [r.source for r in records(cfg, s)] for s in ("train", "val", "test")}
  sets = {s: set(v) for s, v in parts.items()}
  assert sum(len(v) for v in parts.values()) == len(set().union(*sets.values())) == 3851 - 25
  expected = {f"{indiana_csv()}:{line}" for line, _ in csv_rows} - {f"{indiana_csv()}:{e}" for e in empty}
  assert set().union(*sets.values()) == expected
  assert abs(len(parts["train"]) - 0.8 * 3826) <= 1 and abs(len(parts["val"]) - 0.1 * 3826) <= 1
  assert data.num_examples(cfg, "all") == 3826
  assert records(cfg, "train") == records(cfg, "train")  # deterministic
  other = [r.source for r in records(report_cfg(cfg.path, lenient=True, split_seed=1), "test")]
  assert set(other) != sets["test"]


def test_empty_reports_are_errors_naming_the_line_or_counted_skips(csv_path, csv_rows):
  empty = [line for line, r in csv_rows if not (r["findings"].strip() or r["impression"].strip())]
  with pytest.raises(data.DataError, match=f"indiana_reports.csv:{empty[0]}: empty text") as e:
    data.make_source(report_cfg(csv_path), "train")
  assert e.value.path == f"{csv_path}:{empty[0]}"
  source = data.make_source(report_cfg(csv_path, lenient=True), "all")
  assert len(source.skips) == 25 and len(source) == 3826
  assert sorted(source.skips.skipped) == sorted(f"{csv_path}:{line}" for line in empty)


def test_normal_vs_abnormal_labels_follow_the_problems_column(tokenized, csv_rows):
  cfg, _ = tokenized
  problems = {f"{indiana_csv()}:{line}": r["Problems"] for line, r in csv_rows}
  assert sum(p.strip().lower() == "normal" for p in problems.values()) == 1379
  kept = [r for s in ("train", "val", "test") for r in records(cfg, s)]
  for r in kept:
    assert r.label == (0 if problems[r.source].strip().lower() == "normal" else 1)
  empty_normal = sum(1 for _, r in csv_rows if not (r["findings"].strip() or r["impression"].strip())
                     and r["Problems"].strip().lower() == "normal")
  assert sum(r.label == 0 for r in kept) == 1379 - empty_normal
  assert data.num_classes(cfg) == 2
  assert data.num_classes(report_cfg(cfg.path, lenient=True)) == 0  # pre-training: unlabelled
  # Without a rule the sorted distinct Problems values are the classes.
  many = report_cfg(cfg.path, lenient=True, **{"text.label_column": "Problems"})
  values = {problems[r.source].strip() for r in kept}
  assert data.num_classes(many) == len(values)
  first = records(many, "train")[0]
  assert first.label == sorted(values).index(problems[first.source].strip())


# ----------------------------------------------------------------------------------------------------
# The pipeline.


def test_pipeline_yields_the_contract_and_resumes_exactly(tokenized):
  cfg, tok = tokenized
  assert data.image_shape(cfg) == (L,)
  it = data.make_train_iterator(cfg, global_batch_size=8, seed=3, process_index=0, process_count=1)
  batch = next(it)
  assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
      "tokens": (np.dtype(np.int32), (8, L)), "attention_mask": (np.dtype(np.int32), (8, L)),
      "word_ids": (np.dtype(np.int32), (8, L)), "label": (np.dtype(np.int32), (8,))}
  assert set(np.unique(batch["label"])) <= {0, 1}
  for _ in range(2):
    next(it)
  state = it.get_state()
  after = [next(it) for _ in range(2)]
  again = data.make_train_iterator(cfg, global_batch_size=8, seed=3, process_index=0, process_count=1)
  again.set_state(state)
  for a, b in zip(after, [next(again) for _ in range(2)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  other = next(data.make_train_iterator(cfg, global_batch_size=8, seed=4, process_index=0, process_count=1))
  assert not np.array_equal(other["tokens"], batch["tokens"])
  # Evaluation: the split once, in file order, the last batch ragged; examples equal encode().
  test = records(cfg, "test")
  batches = list(data.make_eval_iterator(cfg, batch_size=100, split="test", process_index=0,
                                         process_count=1))
  assert [len(b["label"]) for b in batches] == [100] * (len(test) // 100) + [len(test) % 100]
  ref = tokenization.encode(tok, [r.text for r in test[:100]], L)
  for k in ref:
    np.testing.assert_array_equal(batches[0][k], ref[k])
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), [r.label for r in test])
  # Two processes read disjoint halves.
  halves = [list(data.make_eval_iterator(cfg, batch_size=500, split="test", process_index=p,
                                         process_count=2)) for p in (0, 1)]
  assert sum(len(b["label"]) for h in halves for b in h) == len(test)


def test_the_pipeline_needs_a_tokenizer(csv_path):
  cfg = report_cfg(csv_path, lenient=True)
  assert data.num_examples(cfg, "val") > 0  # counting needs none
  with pytest.raises(data.DataError, match="ensure_tokenizer"):
    data.make_train_iterator(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)
  cfg.text.tokenizer = "/nonexistent/tokenizer.json"
  with pytest.raises(FileNotFoundError, match="/nonexistent/tokenizer.json"):
    data.make_eval_iterator(cfg, batch_size=4, split="val", process_index=0, process_count=1)


def test_text_source_pickles_without_its_tokenizer(tokenized):
  cfg, _ = tokenized
  source = data.make_source(cfg, "val")
  first = source[0]
  assert source._tokenizer is not None  # pylint: disable=protected-access
  blob = pickle.dumps(source)
  assert len(blob) < 200_000  # records and a path: no tokenizer, no encoded arrays
  copy = pickle.loads(blob)
  assert copy._tokenizer is None  # pylint: disable=protected-access
  for k in first:
    np.testing.assert_array_equal(copy[0][k], first[k])


# ----------------------------------------------------------------------------------------------------
# Tokenizer files.


def test_ensure_tokenizer_reuses_the_workdir_tokenizer(csv_path, tmp_path):
  cfg = report_cfg(csv_path, lenient=True, **{"text.vocab_size": 2000})
  first = tokenization.ensure_tokenizer(cfg, tmp_path)
  path = tmp_path / "tokenizer.json"
  assert first.text.tokenizer == str(path) and cfg.text.tokenizer == ""  # a copy
  stamp = path.stat().st_mtime_ns
  vocab = tokenization.load_tokenizer(path).get_vocab()
  assert len(vocab) == 2000
  # A restarted job (here even with another vocab_size) gets the same vocabulary, file untouched.
  cfg.text.vocab_size = 500
  second = tokenization.ensure_tokenizer(cfg, tmp_path)
  assert second.text.tokenizer == str(path) and path.stat().st_mtime_ns == stamp
  assert tokenization.load_tokenizer(second.text.tokenizer).get_vocab() == vocab
  assert not [n for n in os.listdir(tmp_path) if n != "tokenizer.json"]  # no temporary left
  # A named tokenizer is only checked; a missing one is an error; other formats are left alone.
  assert tokenization.ensure_tokenizer(second, tmp_path / "elsewhere").text.tokenizer == str(path)
  cfg.text.tokenizer = str(tmp_path / "missing.json")
  with pytest.raises(FileNotFoundError, match="missing.json"):
    tokenization.ensure_tokenizer(cfg, tmp_path)
  xray = make_cfg("demo_xray")
  assert tokenization.ensure_tokenizer(xray, tmp_path).to_dict() == xray.to_dict()


def test_load_tokenizer_reads_a_bert_vocab_txt(tokenized, tmp_path):
  cfg, tok = tokenized
  vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
  assert [i for _, i in vocab] == list(range(len(vocab)))
  (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
  from_txt = tokenization.load_tokenizer(tmp_path / "vocab.txt")
  assert tokenization.special_ids(from_txt) == tokenization.special_ids(tok)
  texts = [r.text for r in records(cfg, "val")[:50]]
  a, b = tokenization.encode(tok, texts, L), tokenization.encode(from_txt, texts, L)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert from_txt.decode(b["tokens"][0].tolist()) == tok.decode(a["tokens"][0].tolist())
  # The pipeline reads it too.
  cfg_txt = report_cfg(cfg.path, lenient=True, **{"text.tokenizer": str(tmp_path / "vocab.txt")})
  batch = next(data.make_eval_iterator(cfg_txt, batch_size=4, split="val", process_index=0,
                                       process_count=1))
  np.testing.assert_array_equal(batch["tokens"], a["tokens"][:4])
  # A vocabulary without the specials, or with a repeated token, is an error naming the file.
  (tmp_path / "bad.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nlung\n", encoding="utf-8")
  with pytest.raises(data.DataError, match=r"bad.txt: the vocabulary lacks \['\[MASK\]'\]"):
    tokenization.load_tokenizer(tmp_path / "bad.txt")
  (tmp_path / "dup.txt").write_text("[PAD]\nlung\nlung\n", encoding="utf-8")
  with pytest.raises(data.DataError, match="dup.txt:3: token 'lung' repeats line 2"):
    tokenization.load_tokenizer(tmp_path / "dup.txt")


# ----------------------------------------------------------------------------------------------------
# Bad input, each naming the file and the line (tiny files).


def test_bad_reports_name_the_file_and_line(tmp_path):
  folder = tmp_path / "files" / "p10" / "p10000001"
  folder.mkdir(parents=True)
  (folder / "s1.txt").write_text("FINDINGS: Clear lungs.\n", encoding="utf-8")
  bad = folder / "s2.txt"
  bad.write_bytes(b"FINDINGS:\n Opacity in the right lower lobe.\n IMPRESSION: Pneumonia, caf\xe9.\n")
  with pytest.raises(data.DataError, match=r"s2.txt:3: byte 0xe9 at offset \d+ is not UTF-8"):
    text_io.read_mimic_report(bad)
  empty = folder / "s3.txt"
  empty.write_text("  \n\n", encoding="utf-8")
  with pytest.raises(data.DataError, match="s3.txt:1: empty report"):
    text_io.read_mimic_report(empty)
  headers_only = folder / "s4.txt"
  headers_only.write_text("INDICATION: cough\nFINDINGS:\n\nIMPRESSION:\n", encoding="utf-8")
  with pytest.raises(data.DataError, match="s4.txt:2: the FINDINGS and IMPRESSION section"):
    text_io.read_mimic_report(headers_only)
  cfg = make_cfg("folder", format="text", modality="report", path=str(tmp_path))
  with pytest.raises(data.DataError, match="s2.txt:3"):
    data.make_source(cfg, "all")
  cfg.lenient = True
  source = data.make_source(cfg, "all")
  assert [r.text for r in source.records] == ["Clear lungs."]
  assert len(source.skips) == 3 and any(k.endswith("s2.txt:3") for k in source.skips.skipped)


def test_a_missing_csv_column_lists_the_columns_present(tmp_path):
  f = tmp_path / "reports.csv"
  f.write_text("uid,findings,Problems\n1,Clear lungs.,normal\n", encoding="utf-8")
  cfg = make_cfg("folder", format="text", modality="report", path=str(f))
  with pytest.raises(data.DataError, match=r"reports.csv:1: no column 'impression' "
                     r"\(data.text.text_columns\): the header has columns \['uid', 'findings', 'Problems'\]"):
    data.make_source(cfg, "all")
  cfg.text.text_columns = ("findings",)
  cfg.text.label_column = "problems"
  with pytest.raises(data.DataError, match=r"no column 'problems' \(data.text.label_column\)"):
    data.make_source(cfg, "all")
  cfg.text.label_column = "Problems"
  assert data.make_source(cfg, "all").records == [("Clear lungs.", 0, f"{f}:2")]
  f.write_text("uid,findings,Problems\n1,Clear lungs.,normal\n2,Effusion.\n", encoding="utf-8")
  with pytest.raises(data.DataError, match="reports.csv:3: row has 2 fields: expected 3"):
    data.make_source(cfg, "all")
  f.write_bytes(b"uid,findings,Problems\n1,Clear lungs.,normal\n2,Effusion \xff.,Effusion\n")
  with pytest.raises(data.DataError, match="reports.csv:3: byte 0xff"):
    data.make_source(cfg, "all")


def test_jsonl_tables_with_label_maps(tmp_path):
  f = tmp_path / "reports.jsonl"
  rows = ['{"findings": "Clear lungs.", "impression": "Normal.", "y": "b"}', "",
          '{"findings": "Effusion.", "impression": null, "y": "a"}',
          '{"findings": "Edema.", "impression": "", "y": "c"}']
  f.write_text("\n".join(rows) + "\n", encoding="utf-8")
  got = text_io.read_table(f, text_columns=("findings", "impression"), label_column="y")
  assert got == [("Clear lungs. Normal.", 1, f"{f}:1"), ("Effusion.", 0, f"{f}:3"), ("Edema.", 2, f"{f}:4")]
  got = text_io.read_table(f, text_columns=("findings",), label_column="y", label_map=("a=1", "b=0", "c=1"))
  assert [r.label for r in got] == [0, 1, 1]
  with pytest.raises(data.DataError,
                     match=r"reports.jsonl:4: label 'c' \(column 'y'\) is not in data.text.label_map"):
    text_io.read_table(f, text_columns=("findings",), label_column="y", label_map={"a": 0, "b": 1})
  # A mapping given in the config is read as its 'value=id' entries.
  cfg = data.data_config().to_dict()
  cfg.update(name="folder", format="text", modality="report", path=str(f))
  cfg["text"].update(label_column="y", label_map={"a": 2, "b": 0, "c": 1})
  assert [r.label for r in data.make_source(cfg, "all").records] == [0, 2, 1]
  assert data.num_classes(cfg) == 3
  (tmp_path / "bad.jsonl").write_text('{"findings": "x", "impression": "y"}\n[1, 2]\n', encoding="utf-8")
  with pytest.raises(data.DataError, match="bad.jsonl:2: a JSON list: expected one JSON object per line"):
    text_io.read_table(tmp_path / "bad.jsonl", text_columns=("findings", "impression"))


PUBMED = {"train.txt": "###111\nBACKGROUND\tAsthma is common .\nMETHODS\tWe enrolled 40 adults .\n\n"
                       "###222\nOBJECTIVE\tTo test X .\nRESULTS\tX helped ( p < 0.05 ) .\n"
                       "CONCLUSIONS\tX works .\n\n",
          "dev.txt": "###333\nRESULTS\tNo effect .\n\n",
          "test.txt": "###444\nBACKGROUND\tPain hurts .\nCONCLUSIONS\tUse Y .\n"}


def write_pubmed(folder, files=PUBMED):
  folder.mkdir(exist_ok=True)
  for name, text in files.items():
    (folder / name).write_text(text, encoding="utf-8")
  return folder


def test_pubmed_rct_files_are_sentences_with_their_roles(tmp_path):
  folder = write_pubmed(tmp_path / "pubmed")
  got = text_io.read_pubmed(folder / "train.txt")
  assert [(r.text, r.label) for r in got] == [
      ("Asthma is common .", 0), ("We enrolled 40 adults .", 2), ("To test X .", 1),
      ("X helped ( p < 0.05 ) .", 3), ("X works .", 4)]
  assert got[0].source == f"{folder / 'train.txt'}:2"
  cfg = make_cfg("folder", format="text", modality="report", path=str(folder))
  assert text_io.text_layout(data.resolve(cfg)) == "pubmed"
  assert [r.text for r in data.make_source(cfg, "val").records] == ["No effect ."]
  assert data.num_examples(cfg, "test") == 2 and data.num_examples(cfg, "all") == 8
  assert data.num_classes(cfg) == 5


def test_bad_pubmed_lines_name_the_file_and_line(tmp_path):
  folder = write_pubmed(tmp_path / "pubmed", dict(PUBMED, **{
      "dev.txt": "###333\nRESULTS\tNo effect .\nMETHODS  Randomised trial .\n"}))
  with pytest.raises(data.DataError, match=r"dev.txt:3: no tab in 'METHODS  Randomised trial .': expected "
                     "'LABEL<TAB>sentence'"):
    text_io.read_pubmed(folder / "dev.txt")
  (folder / "test.txt").write_text("###444\nBACKGROUND\tPain hurts .\n\nDISCUSSION\tUse Y .\n",
                                   encoding="utf-8")
  with pytest.raises(data.DataError, match=r"test.txt:4: unknown label 'DISCUSSION': expected one of "
                     r"\['BACKGROUND', 'OBJECTIVE', 'METHODS', 'RESULTS', 'CONCLUSIONS'\]"):
    text_io.read_pubmed(folder / "test.txt")
  cfg = make_cfg("folder", format="text", modality="report", path=str(folder), lenient=True)
  source = data.make_source(cfg, "test")
  assert [r.text for r in source.records] == ["Pain hurts ."] and len(source.skips) == 1


def test_a_mimic_folder_keeps_findings_and_impression(tmp_path, workdir):
  reports = {
      "files/p10/p10000001/s5000001.txt":
          "                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n"
          " INDICATION:  ___F with cough  // eval for pneumonia\n\n COMPARISON:  None.\n\n"
          " FINDINGS: \n\n There is no focal consolidation, pleural effusion or pneumothorax.\n"
          " Note: the heart size is normal.\n\n IMPRESSION: \n\n No acute cardiopulmonary process.\n",
      "files/p10/p10000001/s5000002.txt":
          "WET READ: cardiomegaly\n\nfindings: Enlarged cardiac silhouette.\nNOTIFICATION: called Dr. ___.\n",
      "files/p11/p11000002/s5000003.txt":
          "PA and lateral chest radiographs were obtained.\nThe lungs are clear.\n",
  }
  for rel, text in reports.items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(text, encoding="utf-8")
  got = text_io.read_mimic_folder(tmp_path)
  assert [r.text for r in got] == [
      "There is no focal consolidation, pleural effusion or pneumothorax. Note: the heart size is "
      "normal. No acute cardiopulmonary process.",
      "Enlarged cardiac silhouette.",
      "PA and lateral chest radiographs were obtained. The lungs are clear."]
  assert [r.label for r in got] == [None] * 3
  assert got[0].source.endswith("s5000001.txt:8") and got[2].source.endswith("s5000003.txt:1")
  # The auto layout reads the folder; splits keep a patient's studies together.
  cfg = make_cfg("folder", format="text", modality="report", path=str(tmp_path),
                 split_fractions=(0.5, 0.5), **{"text.vocab_size": 100})
  assert text_io.text_layout(data.resolve(cfg)) == "mimic"
  train, val = records(cfg, "train"), records(cfg, "val")
  assert sorted(len(x) for x in (train, val)) == [1, 2]
  assert {os.path.dirname(r.source) for r in (train if len(train) == 2 else val)} == {
      str(tmp_path / "files/p10/p10000001")}
  cfg = tokenization.ensure_tokenizer(cfg, workdir)
  batch = next(data.make_train_iterator(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1))
  assert batch["tokens"].shape == (2, L) and "label" not in batch
  tok = tokenization.load_tokenizer(cfg.text.tokenizer)
  texts = {r.text for r in train}
  for i in range(2):
    n = int(batch["attention_mask"][i].sum())
    assert tok.decode(batch["tokens"][i][:n].tolist()) in {" ".join(words_of(tok, t)) for t in texts}


# ----------------------------------------------------------------------------------------------------
# Registry and options.


def test_registry_and_options(csv_path):
  with pytest.raises(data.DataError, match="data.path is empty: expected the Indiana University"):
    data.resolve(make_cfg("indiana_reports"))
  r = data.resolve(report_cfg(csv_path, **{"text.text_columns": ()}))
  assert (r.format, r.modality, r.spatial_dims) == ("text", "report", 1)
  assert tuple(r.split_fractions) == (0.8, 0.1, 0.1)
  assert tuple(r.text.text_columns) == ("findings", "impression")  # filled from the registry
  assert data.image_shape(report_cfg(csv_path, **{"text.max_length": 64})) == (64,)
  for bad, match in [(dict(modality="xray"), "format 'text' with modality 'report'"),
                     (dict(spatial_dims=2), "spatial_dims=2 with data.modality='report'"),
                     ({"text.layout": "csv"}, "data.text.layout='csv'"),
                     ({"text.max_length": 2}, "max_length=2"),
                     ({"text.label_rule": "abnormal"}, "label_rule='abnormal'")]:
    with pytest.raises(data.DataError, match=match):
      data.resolve(report_cfg(csv_path, **bad))
  with pytest.raises(data.DataError, match="format 'text' with modality 'report'"):
    data.resolve(make_cfg("folder", format="npz", modality="report", path=csv_path))


def test_sub_headings_inside_findings_stay_in_the_section(tmp_path):
  """'LUNGS: Clear.' under FINDINGS is part of the findings; only a top-level MIMIC header (COMPARISON,
  IMPRESSION, ...) ends the section."""
  from invcoss_jax.data import text_io
  report = ("EXAMINATION: CHEST (PA AND LAT)\nINDICATION: cough.\nFINDINGS:\nLUNGS: Clear.\nHEART: Normal size.\n"
            "IMPRESSION:\nLINES/TUBES: None.\nNo acute process.\nRECOMMENDATION(S): None.\n")
  sections = text_io.report_sections(report)
  assert sections["findings"] == (3, "LUNGS: Clear. HEART: Normal size.")
  assert sections["impression"] == (6, "LINES/TUBES: None. No acute process.")
  assert sections["indication"][1] == "cough." and "lungs" not in sections and "heart" not in sections
  assert "recommendation(s)" in sections  # a top-level header still ends the impression
  path = tmp_path / "s1.txt"
  path.write_text(report)
  text, line = text_io.read_mimic_report(path)
  assert text == "LUNGS: Clear. HEART: Normal size. LINES/TUBES: None. No acute process." and line == 3
  # Outside FINDINGS / IMPRESSION any upper-case header still starts a section (MIMIC writes them so).
  assert text_io.report_sections("WET READ: none.\nCOMPARISON: None.\n")["wet read"][1] == "none."


def test_format_text_implies_the_report_modality(csv_path):
  from invcoss_jax.data import registry
  d = data.data_config()
  d.name, d.format, d.path, d.modality = "folder", "text", str(csv_path), ""
  assert registry.resolve(d).modality == "report" and registry.is_text(d)
  d.modality = "xray"
  with pytest.raises(data.DataError, match="format 'text' with modality 'report'"):
    registry.resolve(d)
