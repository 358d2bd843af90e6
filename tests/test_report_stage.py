"""The report stage end to end on the real Indiana reports: its tokenizer trained into the workdir, masked
language modelling that learns, and exact resumption (whole-word masks drawn per step)."""

import json
import os

import numpy as np
import pytest

from invcoss_jax import jobs
from invcoss_jax.defaults import load_config_file
from invcoss_jax.jobs.pretrain import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("INVCOSS_SHARED_DATA") or os.path.join(os.path.dirname(REPO), "shared", "data")
REPORTS = os.path.join(SHARED, "report", "indiana_reports.csv")
pytestmark = pytest.mark.skipif(not os.path.isfile(REPORTS), reason=f"needs the Indiana reports at {REPORTS} "
                                "(../shared/data is not part of a clone; CI has it)")


def demo(steps=40):
  c = load_config_file(os.path.join(REPO, "configs/report.py:demo"))
  c.total_steps, c.checkpoint.every_steps, c.logging.log_every_steps = steps, 10, 5
  c.data.text.vocab_size = 2000
  c.train.base_lr = 1e-2
  return c


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("report") / "straight"
  return workdir, jobs.run(demo(), workdir)


def test_the_stage_trains_its_tokenizer_and_learns_masked_words(straight):
  workdir, out = straight
  from invcoss_jax.data import tokenization
  tok = tokenization.load_tokenizer(str(workdir / "tokenizer.json"))
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["vocab_size"] == tokenization.vocab_size(tok) <= 2000
  assert config["data"]["text"]["tokenizer"] == str(workdir / "tokenizer.json")
  losses = out["losses"]
  first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(36, 41)])
  assert first == pytest.approx(np.log(config["model"]["vocab_size"]), rel=0.25)  # uniform at initialisation
  assert last < 0.8 * first, (first, last)
  assert not os.path.exists(workdir / "statistics.npz")  # text is not inverted


def test_a_resumed_report_stage_equals_an_uninterrupted_one(straight, tmp_path):
  """With the same vocabulary: `tokenizers` trains WordPiece in hash-map order, so two trainings on one
  corpus can differ (huggingface/tokenizers#1794); a stage keeps its own, and runs to be compared share one."""
  path, out = straight
  c = demo()
  c.data.text.tokenizer = str(path / "tokenizer.json")
  workdir = tmp_path / "resumed"
  pretrain(c, workdir, stop_at_step=20)
  rest = pretrain(c, workdir)
  assert sorted(rest["losses"]) == list(range(21, 41))
  for s in range(21, 41):
    assert rest["losses"][s] == pytest.approx(out["losses"][s], rel=1e-5, abs=1e-6)


def test_the_report_checkpoint_fine_tunes_to_normal_vs_abnormal_above_the_majority_rate(straight, tmp_path):
  """The stage's vocabulary travels with its checkpoint (config.model.tokenizer) to the text task."""
  workdir, _ = straight
  c = load_config_file(os.path.join(REPO, "configs/evaluate.py:indiana_abnormal"))
  c.init_from = str(workdir)
  c.evaluate.seeds = (0,)
  t = c.evaluate.tasks.indiana_abnormal
  # 50 steps (one validation pass, at the end): accuracy 0.91 against a majority rate of 0.64 and AUC 0.96 on the
  # test split (150 steps, three validation passes: 0.95 and 0.98), far from both bounds below at a third of the cost.
  t.steps, t.eval_every, t.lr, t.batch_size = 50, 50, 1e-3, 32
  out = jobs.run(c, tmp_path / "eval")
  from invcoss_jax import data as data_lib
  labels = np.concatenate([b["label"] for b in data_lib.make_eval_iterator(
      _tokenized(t.data, workdir), batch_size=256, split="test", process_index=0, process_count=1)])
  majority = max(np.mean(labels), 1 - np.mean(labels))
  acc = out["per_seed"]["0"]["acc"] if "0" in out["per_seed"] else out["per_seed"][0]["acc"]
  assert acc > majority + 0.05, (acc, majority)
  assert out["per_seed"][next(iter(out["per_seed"]))]["auc"] > 0.7


def _tokenized(data_cfg, workdir):
  d = data_cfg.copy_and_resolve_references()
  d.text.tokenizer = str(workdir / "tokenizer.json")
  return d
