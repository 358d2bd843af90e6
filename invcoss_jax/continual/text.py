"""The report stage in a continual sequence: one vocabulary for the whole sequence and the real text buffer.

Text is discrete and cannot be inverted, so InvCoSS keeps MedCoSS's real k-means buffer for it (paper
Sec. 3.2; `../shared/notes/medcoss_facts.md`): at the end of a report stage, k-means with int(N x 1 %)
clusters on the encoder features of its training texts, the texts nearest to each centroid, 5 % of the stage
in all. That is the one documented exception to "no real data of an earlier stage is kept": the stage's
storage log says so (`storage.retained_kind` 'real_text_buffer', `storage.exception`).

- `prepare_sequence`: every stage's model needs the text tokenizer (`token_embed` is carried through image
  stages and distilled on the text buffer), so the vocabulary is settled before the first stage: trained on
  the first text stage's training split into its workdir (`tokenizer.json`, reused on resume) or the user's
  file, and config.model's vocab_size / pad_id / tokenizer are set for every stage.
- `write_text_buffer`: the chosen texts as `buffer/texts.jsonl` (one {"text", "source"} object per line),
  read back through the text input layer with the same tokenizer (`text_buffer_section`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from invcoss_jax import data as data_lib
from invcoss_jax.config_checks import ConfigError
from invcoss_jax.continual import buffers
from invcoss_jax.continual.stages import BUFFER_DIR, BUFFER_INFO, Stage
from invcoss_jax.data import registry, text_io, tokenization
from invcoss_jax.data.config import data_config
from invcoss_jax.data.errors import SkipLog
from invcoss_jax.io_utils import atomic_path, atomic_write_json
from invcoss_jax.measure import features

TEXT_BUFFER_FILE = "texts.jsonl"
EXCEPTION = ("text cannot be inverted: a real k-means buffer of the stage's texts is kept (paper Sec. 3.2, as "
             "MedCoSS); it is the only real data of an earlier stage any later stage reads")


def prepare_sequence(config: ml_collections.ConfigDict, order: tuple[str, ...],
                     first_text_workdir: str) -> ml_collections.ConfigDict:
  """A copy of `config` whose text datasets all name one tokenizer and whose model has its vocabulary.

  `first_text_workdir`: the workdir of the first stage that reads text (its training split trains the
  vocabulary unless data.text.tokenizer names a file). `config` itself when no stage reads text."""
  text = [m for m in order if registry.is_text(config.continual.datasets[m])]
  if not text:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  os.makedirs(first_text_workdir, exist_ok=True)
  first = tokenization.ensure_tokenizer(config.continual.datasets[text[0]], first_text_workdir)
  path = str(first.text.tokenizer)
  for m in text:
    given = str(config.continual.datasets[m].text.tokenizer or "")
    if m != text[0] and given and os.path.abspath(given) != os.path.abspath(path):
      raise ConfigError(f"config.continual.datasets.{m}.text.tokenizer={given!r} differs from {path!r} of "
                       f"{text[0]}: the stages of a sequence share one text embedding, so one vocabulary")
    config.continual.datasets[m].text.tokenizer = path
  fields = tokenization.set_model_vocabulary(config.model, path)
  logging.info("continual: text stages %s share the tokenizer %s (%d tokens)", text, path, fields["vocab_size"])
  return config


def stage_texts(data_cfg: ml_collections.ConfigDict) -> list:
  """The training texts of a report stage (`text_io.TextRecord`s), in the order its eval iterator reads them."""
  cfg = registry.resolve(data_cfg)
  skips = SkipLog(f"data.name={cfg.name} (texts of split {cfg.split!r} for the text buffer)")
  return text_io.read_split(cfg, str(cfg.split), skips)


def write_text_buffer(cfg, stage: Stage, model, params, *, select: str = "kmeans") -> dict[str, Any]:
  """The real text buffer of a finished report stage: `select` 'random' (er) or 'kmeans' (medcoss, invcoss;
  the method's `text_buffer`) over the encoder features of its training texts; returns what buffer.json
  records."""
  c = cfg.continual
  d = stage.data[0]
  fraction = float(c.buffer_fraction)
  if select not in ("random", "kmeans"):
    raise ValueError(f"text buffer of method {c.method!r}: select must be 'random' or 'kmeans', got {select!r}")
  records = stage_texts(d)
  n = len(records)
  if select == "random":
    idx = buffers.random_indices(n, fraction, seed=int(cfg.seed) + stage.index)
    extra: dict[str, Any] = {}
  else:
    batches = data_lib.make_eval_iterator(d, batch_size=int(c.kmeans.batch_size), process_index=0, process_count=1)
    feats = features.encoder_features(model, jax.device_get(params), batches, kind=str(c.kmeans.feature))
    if len(feats) != n:
      raise ValueError(f"{stage.name}: the eval pass read {len(feats)} texts but the split has {n}: the text "
                       "buffer would pick the wrong reports")
    idx, km = buffers.kmeans_indices(feats, cluster_fraction=float(c.kmeans.cluster_fraction), fraction=fraction,
                                     seed=int(cfg.seed) + stage.index, n_init=int(c.kmeans.n_init),
                                     max_iter=int(c.kmeans.max_iter))
    extra = dict(clusters=int(km.n_clusters), inertia=float(km.inertia_))
  info = dict(method=str(c.method), kind="real_text", num_examples=int(len(idx)), fraction=fraction,
              indices=[int(i) for i in idx], example_shape=[int(d.text.max_length)], exception=EXCEPTION, **extra)
  if jax.process_index() == 0:
    folder = os.path.join(stage.workdir, BUFFER_DIR)
    os.makedirs(folder, exist_ok=True)
    with atomic_path(os.path.join(folder, TEXT_BUFFER_FILE)) as tmp:
      with open(tmp, "w", encoding="utf-8") as f:
        for i in idx:
          f.write(json.dumps(dict(text=records[i].text, source=records[i].source), ensure_ascii=False) + "\n")
    atomic_write_json(os.path.join(stage.workdir, BUFFER_INFO), info)
  logging.info("%s: text buffer of %d of %d reports (%s)", stage.name, len(idx), n, c.method)
  return info


def text_buffer_section(source_data: ml_collections.ConfigDict, folder: str) -> ml_collections.ConfigDict:
  """The data section reading a stage's text buffer (`folder`/texts.jsonl) with the stage's tokenizer."""
  r = registry.resolve(source_data)
  d = data_config()
  d.name, d.format, d.modality = "folder", "text", "report"
  d.path = os.path.abspath(os.path.join(folder, TEXT_BUFFER_FILE))
  d.split, d.split_fractions = "all", ()
  d.text.update(r.text.to_dict())
  d.text.layout = "table"
  d.text.text_columns = ("text",)
  d.text.label_column, d.text.label_rule, d.text.label_map = "", "", ()
  d.num_workers = int(r.num_workers)
  return d
