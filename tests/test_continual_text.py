"""The report stage inside a continual sequence, on the real Indiana reports: token-wise mixup, distillation
and features that ignore padding, text sub-batches in the composite step equal to separate model calls, the
MLM Fisher for EWC, and a report -> X-ray run that keeps a real k-means text buffer (and only that), trains
on it in stage 2 behind the data-free guard, resumes exactly, and feeds the forgetting matrix a text task."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from invcoss_jax import data as data_lib
from invcoss_jax import models
from invcoss_jax.continual import buffers, ewc, losses, step
from invcoss_jax.continual import text as text_lib
from invcoss_jax.continual.params import split_params
from invcoss_jax.defaults import load_config_file
from invcoss_jax.measure import features as measure_features
from invcoss_jax.train import mlm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("INVCOSS_SHARED_DATA") or os.path.join(os.path.dirname(REPO), "shared", "data")
REPORTS = os.path.join(SHARED, "report", "indiana_reports.csv")
pytestmark = pytest.mark.skipif(not os.path.isfile(REPORTS), reason=f"needs the Indiana reports at {REPORTS} "
                                "(../shared/data is not part of a clone; CI has it)")
LENGTH = 32


def report_section(tokenizer: str = "") -> ml_collections.ConfigDict:
  d = data_lib.data_config()
  d.name, d.path, d.lenient = "indiana_reports", REPORTS, True
  d.text.max_length, d.text.vocab_size, d.text.tokenizer = LENGTH, 500, tokenizer
  return d


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
  d = data_lib.ensure_tokenizer(report_section(), tmp_path_factory.mktemp("tok"))
  cfg = models.model_config("micro")
  cfg.update(dict(width=32, depth=2, num_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2,
                  patch_size_2d=(8, 8), patch_size_3d=(8, 8, 8)))
  cfg.update(data_lib.tokenization.model_text_fields(str(d.text.tokenizer)))
  model = models.build_mae(cfg)
  init = jax.jit(lambda k: models.init_mae_params(model, k, [(16, 16, 3), (LENGTH,)]))
  params = init(jax.random.key(0))
  teacher = jax.tree.map(lambda p, q: p + 0.05 * q, params, init(jax.random.key(1)))
  batch = next(iter(data_lib.make_eval_iterator(d, batch_size=8)))
  x = data_lib.data_config()
  x.name, x.image_size = "demo_xray", 16
  xray = np.asarray(next(iter(data_lib.make_eval_iterator(x, batch_size=4)))["image"], np.float32)
  return model, params, teacher, d, {k: np.asarray(batch[k]) for k in ("tokens", "attention_mask", "word_ids")}, xray


def test_token_mixup_takes_every_token_from_the_sample_or_its_partner(text_setup):
  *_, texts, _ = text_setup
  t, a = texts["tokens"], texts["attention_mask"]
  mixed, attn, lam, keep = losses.token_mixup(t, a, np.random.default_rng(3))
  again = losses.token_mixup(t, a, np.random.default_rng(3))
  np.testing.assert_array_equal(mixed, again[0])
  for i in range(len(t)):
    np.testing.assert_array_equal(mixed[i][keep[i]], t[i][keep[i]])
    np.testing.assert_array_equal(attn[i][keep[i]], a[i][keep[i]])
    partner = [j for j in range(len(t)) if np.array_equal(mixed[i][~keep[i]], t[j][~keep[i]])
               and np.array_equal(attn[i][~keep[i]], a[j][~keep[i]])]
    assert partner, f"sample {i}: the replaced tokens come from no single partner"
  assert 0.0 <= lam.min() and lam.max() <= 1.0
  # About lam_i of each sample's positions stay its own (binomial over 32 positions: sd <= 0.09).
  assert np.mean(np.abs(keep.mean(axis=1) - lam)) < 0.12


def test_distillation_and_features_leave_text_padding_out(text_setup):
  model, params, teacher, _, texts, _ = text_setup
  b = {"tokens": jnp.asarray(texts["tokens"]), "attention_mask": jnp.asarray(texts["attention_mask"])}
  s = np.asarray(jax.jit(lambda p: step.encode_tokens(model, p, b, None, mask_ratio=0.75, train=False))(params))
  t = np.asarray(jax.jit(lambda p: step.encode_tokens(model, p, b, None, mask_ratio=0.75, train=False))(teacher))
  valid = np.asarray(step.text_valid(b))
  assert s.shape == (8, 1 + LENGTH, 32) and valid[:, 0].all() and (valid[:, 1:] == texts["attention_mask"]).all()
  ref = np.sum(np.mean((s.astype(np.float64) - t) ** 2, axis=-1) * valid) / valid.sum()
  got = float(losses.feature_distillation(jnp.asarray(s), jnp.asarray(t), jnp.asarray(valid)))
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  garbage = np.where(valid[..., None] > 0, s, 1e3)  # what the padding positions hold does not matter
  assert float(losses.feature_distillation(jnp.asarray(garbage), jnp.asarray(t), jnp.asarray(valid))) == \
      pytest.approx(got, rel=1e-6)
  # Buffer features of a text do not depend on how much padding follows it (attention and the mean skip it).
  pad = int(model.cfg.pad_id)
  longer = np.concatenate([texts["tokens"], np.full((8, 16), pad, texts["tokens"].dtype)], axis=1)
  f1 = measure_features.encoder_features(model, params, [texts], kind="all_tokens")
  f2 = measure_features.encoder_features(model, params, [{"tokens": longer}], kind="all_tokens")
  np.testing.assert_allclose(f1, f2, atol=1e-5)
  assert np.abs(f1 - measure_features.encoder_features(model, params, [texts], kind="cls")).max() > 1e-4


def test_composite_step_with_text_equals_separate_calls(text_setup):
  model, params, teacher, d, texts, xray = text_setup
  mask = mlm.masker_for(str(d.text.tokenizer))(texts, np.random.default_rng(0))
  assert mask["mlm_mask"].sum() > 0 and (mask["mlm_mask"] <= texts["attention_mask"]).all()
  cur_text = {k: jnp.asarray(v) for k, v in mask.items()}
  buf_text = {k: jnp.asarray(texts[k]) for k in ("tokens", "attention_mask")}
  spec = step.LossSpec(distill_weight=0.7)
  consts = {"teacher": split_params(teacher)[0]}

  def composite(batch):
    noises = step.draw_noises(jax.random.key(7), batch, model.cfg)
    return noises, jax.jit(lambda p: step.composite_loss(model, spec, p, {}, batch, noises, consts,
                                                          jax.random.key(3)))(params)

  # A report stage with an X-ray buffer: MLM on current text, distillation of images.
  noises, (total, terms) = composite({"current": (cur_text,), "buffer": (jnp.asarray(xray),)})
  assert noises["current"] == (None,)
  mlm_ref = float(jax.jit(lambda p: step.mlm_forward(model, p, cur_text, train=False)[0])(params))
  enc = lambda p, x, n: np.asarray(jax.jit(lambda p: step.encode_tokens(model, p, x, n, mask_ratio=0.75,
                                                                         train=False))(p), np.float64)
  distill = np.mean((enc(params, jnp.asarray(xray), noises["buffer"][0])
                     - enc(teacher, jnp.asarray(xray), noises["buffer"][0])) ** 2)
  np.testing.assert_allclose(terms["task"], mlm_ref, rtol=1e-5)
  np.testing.assert_allclose(terms["distill"], distill, rtol=1e-4)
  np.testing.assert_allclose(total, mlm_ref + 0.7 * distill, rtol=1e-5)
  # An X-ray stage with the text buffer: MAE on images, distillation over CLS and real tokens of the texts.
  noises, (total, terms) = composite({"current": (jnp.asarray(xray),), "buffer": (buf_text,)})
  mae = float(jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(xray), mask_ratio=0.75,
                                            noise=noises["current"][0])["loss"])(params))
  valid = np.asarray(step.text_valid(buf_text))
  per = np.mean((enc(params, buf_text, None) - enc(teacher, buf_text, None)) ** 2, axis=-1)
  text_distill = np.sum(per * valid) / valid.sum()
  assert text_distill > 1e-8
  np.testing.assert_allclose(terms["distill"], text_distill, rtol=1e-4)
  np.testing.assert_allclose(total, mae + 0.7 * text_distill, rtol=1e-5)


def test_ewc_fisher_of_a_report_stage_is_the_mlm_gradient_square(text_setup):
  model, params, _, d, texts, _ = text_setup
  masker = mlm.masker_for(str(d.text.tokenizer))
  host = jax.device_get(params)
  fisher, used = ewc.empirical_fisher(model, host, [texts], mask_ratio=0.75, rng=jax.random.key(5),
                                      num_examples=3, batch_size=4, masker=masker)
  assert used == 3
  # Reference: the same masks (the chunk's seed), one example at a time.
  seed = int(jax.device_get(jax.random.randint(jax.random.fold_in(jax.random.key(5), 0), (), 0, 2 ** 31 - 1)))
  chunk = {k: np.concatenate([v[:3], v[2:3]]) for k, v in texts.items()}
  x = masker(chunk, np.random.default_rng(seed))
  enc, dec = split_params(host)

  def loss(e, i):
    out = model.apply({"params": {**dec, **e}}, *(jnp.asarray(x[k][i:i + 1]) for k in
                                                 ("tokens", "attention_mask", "mlm_mask", "labels")),
                      train=False, method=models.MAE.mlm)
    return out["loss"]

  grads = [jax.jit(jax.grad(loss), static_argnums=1)(enc, i) for i in range(3)]
  ref = jax.tree.map(lambda *g: sum(np.square(np.asarray(t, np.float64)) for t in g) / 3, *grads)
  # float32 gradients squared: an entry 1e-6 of the largest carries the largest's rounding, so the absolute
  # tolerance scales with the array (one CI run missed rtol on a 2.6e-7 entry by 5e-10).
  want = ref["token_embed"]["embedding"]
  np.testing.assert_allclose(fisher["token_embed"]["embedding"], want, rtol=1e-3, atol=1e-6 * np.abs(want).max())
  assert float(np.sum(fisher["token_embed"]["embedding"])) > 0
  assert float(np.abs(fisher["patch_embed_2d"]["kernel"]).max()) == 0.0  # text never reaches the 2D tokenizer
  assert "mlm_head" not in fisher  # the MLM head is re-initialised with the decoder: not anchored


# ---------------------------------------------------------------------------------------------------------
# A report -> X-ray sequence.


def tf_value(event) -> float:
  from tensorboard.util import tensor_util
  return float(tensor_util.make_ndarray(event.tensor_proto))

STEPS = 3


def sequence_config(method: str) -> ml_collections.ConfigDict:
  c = load_config_file(os.path.join(REPO, f"configs/continual.py:demo,report,{method}"))
  c.continual.order = ("report", "xray")
  c.model.update(dict(width=32, depth=2, num_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2))
  c.continual.datasets.xray.image_size = 16
  c.continual.datasets.report.text.vocab_size = 500
  c.continual.datasets.report.text.max_length = LENGTH
  c.total_steps = STEPS
  c.train.global_batch_size = 4
  c.checkpoint.every_steps = 100
  c.logging.log_every_steps = 1
  c.continual.synthesize_last_stage = False
  c.inversion.generator = "none"
  c.inversion.num_samples = 8
  for s in (c.inversion.schedule_2d, c.inversion.schedule_3d):
    s.batch_size, s.steps, s.init_steps, s.latent_dim = 4, 2, 2, 8
  c.continual.kmeans.batch_size = 256
  return c


@pytest.fixture(scope="module")
def invcoss_run(tmp_path_factory):
  from invcoss_jax.continual import sequence as job
  workdir = tmp_path_factory.mktemp("report_seq") / "invcoss"
  seen = []

  def after(stage, info):
    seen.append(stage.name)

  return workdir, job.run(sequence_config("invcoss"), workdir, after_stage=after), seen


def test_report_then_xray_keeps_a_real_kmeans_text_buffer_and_nothing_else(invcoss_run):
  workdir, out, seen = invcoss_run
  assert not out["stopped"] and seen == ["stage_1_report", "stage_2_xray"]
  s1 = workdir / "stage_1_report"
  tok = json.loads((workdir / "continual.json").read_text())["config"]["continual"]["datasets"]["report"]
  assert tok["text"]["tokenizer"] == str(s1 / "tokenizer.json")
  # Every stage's model carries the sequence's vocabulary (the X-ray stage too: it distils the text buffer).
  for s in ("stage_1_report", "stage_2_xray"):
    cfg = json.loads((workdir / s / "config.json").read_text())
    assert cfg["model"]["tokenizer"] == str(s1 / "tokenizer.json") and cfg["model"]["vocab_size"] > 100
  info = json.loads((s1 / "buffer.json").read_text())
  train = text_lib.stage_texts(sequence_config("invcoss").continual.datasets.report)
  n = len(train)
  clusters, per_cluster = buffers.kmeans_plan(n, 0.01, 0.05)
  assert info["kind"] == "real_text" and info["clusters"] == clusters
  assert 0 < info["num_examples"] <= clusters * per_cluster <= int(0.05 * n)
  lines = [json.loads(line) for line in (s1 / "buffer" / "texts.jsonl").read_text().splitlines()]
  # The chosen reports of the training split, verbatim, with their source lines.
  assert [(r["text"], r["source"]) for r in lines] == [(train[i].text, train[i].source) for i in info["indices"]]
  # No statistics and no synthetic set for text; the storage log names the exception.
  assert not (s1 / "statistics.npz").exists() and not (s1 / "synthetic").exists()
  storage = json.loads((workdir / "storage.json").read_text())
  assert storage["stage_1_report"]["retained_kind"] == "real_text_buffer"
  assert "cannot be inverted" in storage["stage_1_report"]["exception"]
  assert storage["stage_2_xray"]["retained_kind"] == "statistics+synthetic" and "exception" not in storage[
      "stage_2_xray"]


def test_the_xray_stage_distils_the_text_buffer_and_moves_the_text_embedding(invcoss_run):
  workdir, out, _ = invcoss_run
  from invcoss_jax.train import checkpoint as ckpt_lib
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(workdir / "stage_2_xray"), size_guidance={"tensors": 0})
  acc.Reload()
  distill = [tf_value(e) for e in acc.Tensors("train/loss_distill")]
  assert len(distill) == STEPS and min(distill) > 0
  p1 = ckpt_lib.load_trained_stage(str(workdir / "stage_1_report"))[2]
  p2 = ckpt_lib.load_trained_stage(str(workdir / "stage_2_xray"))[2]
  # The hand-over carried the text tokenizer and the buffer's gradients trained it on.
  e1, e2 = np.asarray(p1["token_embed"]["embedding"]), np.asarray(p2["token_embed"]["embedding"])
  assert e1.shape == e2.shape and 0 < np.abs(e1 - e2).max() < 0.1
  assert not np.allclose(np.asarray(p1["mlm_head"]["kernel"]), np.asarray(p2["mlm_head"]["kernel"]))


def test_the_text_stage_resumes_exactly_and_its_data_is_retired(invcoss_run, tmp_path):
  from invcoss_jax.continual import sequence as job
  from invcoss_jax.continual.guard import DataFreeViolation
  workdir, straight, _ = invcoss_run
  c = sequence_config("invcoss")
  # The same vocabulary as the straight run (a trained WordPiece vocabulary can differ between trainings on
  # the same texts, huggingface/tokenizers#1794: a reproducible run names its tokenizer file).
  c.continual.datasets.report.text.tokenizer = str(workdir / "stage_1_report" / "tokenizer.json")
  first = job.run(c, tmp_path / "r", stop_at=(1, 2))
  assert first["stopped"]
  tried = []

  def after(stage, info):  # once stage 1 ended, the reports are off limits; its buffer is not
    if stage.name == "stage_1_report":
      with pytest.raises(DataFreeViolation):
        open(REPORTS).close()
      open(tmp_path / "r" / "stage_1_report" / "buffer" / "texts.jsonl").close()
      tried.append(stage.name)

  rest = job.run(c, tmp_path / "r", after_stage=after)
  assert tried == ["stage_1_report"]
  resumed = {**first["losses"]["stage_1_report"], **rest["losses"]["stage_1_report"]}
  assert resumed == straight["losses"]["stage_1_report"]
  assert rest["losses"]["stage_2_xray"] == straight["losses"]["stage_2_xray"]


def test_forgetting_matrix_scores_every_stage_on_the_text_task(invcoss_run, tmp_path):
  from invcoss_jax import jobs
  from invcoss_jax.evaluate.config import task_config
  workdir, _, _ = invcoss_run
  c = load_config_file(os.path.join(REPO, "configs/evaluate.py:forgetting"))
  c.evaluate.forgetting.tasks = ("indiana_abnormal",)
  c.evaluate.tasks.indiana_abnormal = task_config("indiana_abnormal")
  c.evaluate.tasks.indiana_abnormal.steps = c.evaluate.tasks.indiana_abnormal.eval_every = 4
  c.evaluate.tasks.indiana_abnormal.data.text.max_length = LENGTH
  c.evaluate.seeds = (0,)
  c.evaluate.forgetting.runs = (f"InvCoSS={workdir}",)
  jobs.run(c, tmp_path / "fg")
  rows = (tmp_path / "fg" / "forgetting.csv").read_text().splitlines()
  assert rows[0].startswith("method,stage,modality,indiana_abnormal/acc")
  assert [r.split(",")[2] for r in rows[1:]] == ["report", "xray"]
  assert all(0.0 < float(r.split(",")[5]) <= 1.0 for r in rows[1:])  # AUC of each stage


def test_paper_orders_with_the_report_stage_are_presets():
  orders = {a: tuple(load_config_file(os.path.join(REPO, f"configs/continual.py:{a}")).continual.order)
            for a in ("", "alt", "demo", "demo,alt", "demo,report", "demo,report,alt")}
  assert orders[""] == orders["demo,report"] == ("report", "xray", "ct", "mri", "path")
  assert orders["alt"] == orders["demo,report,alt"] == ("path", "mri", "report", "ct", "xray")
  assert orders["demo"] == ("xray", "ct", "mri", "path") and orders["demo,alt"] == ("path", "mri", "ct", "xray")
