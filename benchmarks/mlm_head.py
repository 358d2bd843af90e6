r"""The report stage's train step with the MLM head on the corrupted positions only, against every position.

Both steps are the package's own (`train.pretrain.make_text_train_step` with and without the masking
probability) on the same model, parameters and batches: real Indiana reports (../shared/data/report), a
WordPiece vocabulary trained on them at each `--vocab` size, whole-word masking at 15 %. Steps are timed in
interleaved rounds (full, gathered, full, ...) after `--warmup` untimed steps; the medians and the
gathered/full speed ratio are reported, with the two steps' losses on the first batch (equal to float
tolerance) as a check that both score the same tokens.

  python benchmarks/mlm_head.py --vocab=2000,8192 --out=benchmarks/results/mlm_head.json
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's package

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from invcoss_jax import models  # noqa: E402
from invcoss_jax.data import tokenization  # noqa: E402
from invcoss_jax.io_utils import atomic_write_json  # noqa: E402
from invcoss_jax.train import core, mlm, pretrain  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORTS = os.path.join(os.path.dirname(REPO), "shared", "data", "report", "indiana_reports.csv")


def reports(path: str) -> list[str]:
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  return [" ".join(r[k] for k in ("indication", "findings", "impression") if r.get(k)) for r in rows]


def measure(model, params, batches, probability, steps: int):
  tx = optax.adamw(1e-4)
  schedule = optax.constant_schedule(1e-4)
  step = jax.jit(pretrain.make_text_train_step(model, tx, schedule, probability=probability), donate_argnums=0)
  params = jax.tree.map(jax.numpy.copy, params)  # the step donates its state
  state = core.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params),
                         rng=jax.random.PRNGKey(0))
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, metrics = step(state, batches[i % len(batches)])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return times, state


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--vocab", default="2000,8192")
  p.add_argument("--batch", type=int, default=32, help="configs/report.py:demo's global batch")
  p.add_argument("--max_length", type=int, default=112)
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--steps", type=int, default=20, help="timed steps per round")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  if not os.path.isfile(REPORTS):
    raise SystemExit(f"error: {REPORTS} not found: this benchmark needs ../shared/data (the Indiana reports)")
  texts = reports(REPORTS)
  out = dict(machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                          jax=jax.__version__, backend=jax.default_backend(),
                          loadavg_before=os.getloadavg()),
             settings=vars(a), rows=[])
  for vocab in (int(v) for v in a.vocab.split(",")):
    with tempfile.TemporaryDirectory() as tmp:
      tok = tokenization.train_tokenizer(texts, vocab)
      path = os.path.join(tmp, "tokenizer.json")
      tok.save(path)
      tok = tokenization.load_tokenizer(path)
      ids = tokenization.special_ids(tok)
      v = tokenization.vocab_size(tok)
      enc = tokenization.encode(tok, texts, a.max_length)
    rng = np.random.default_rng(0)
    batches = []
    for i in range(8):
      sel = rng.choice(len(texts), a.batch, replace=False)
      b = {k: enc[k][sel] for k in ("tokens", "attention_mask", "word_ids")}
      batches.append(mlm.mlm_inputs(b, rng, mask_id=int(ids["mask"]), vocab_size=v,
                                    keep_ids=tuple(int(ids[k]) for k in ("pad", "unk", "cls", "sep", "mask"))))
    cfg = models.ViTConfig(width=a.width, depth=a.depth, num_heads=4, decoder_width=a.width, decoder_depth=1,
                           decoder_heads=4, vocab_size=v, text_max_len=a.max_length)
    model = models.build_mae(cfg)
    params = models.init_mae_params(model, jax.random.PRNGKey(0), [(a.max_length,)])
    arms = {"full": None, "gathered": 0.15}
    for name, prob in arms.items():  # warm-up (compile) outside the timed rounds
      measure(model, params, batches, prob, a.warmup)
    times = {k: [] for k in arms}
    for _ in range(a.rounds):
      for name, prob in arms.items():
        t, _ = measure(model, params, batches, prob, a.steps + 1)
        times[name] += t[1:]  # the first call of a fresh jit wrapper re-traces
    losses = {}
    for name, prob in arms.items():
      loss_fn = pretrain.mlm_loss(model, prob)
      losses[name] = float(loss_fn(params, batches[0], None, jax.random.PRNGKey(1))[0])
    med = {k: float(np.median(v)) for k, v in times.items()}
    row = dict(vocab=v, median_step_s=med, steps_per_s={k: 1 / t for k, t in med.items()},
               speedup=med["full"] / med["gathered"], loss_first_batch=losses,
               predicted_per_example=float(np.mean([b["mlm_mask"].sum(1).mean() for b in batches])),
               budget=mlm.prediction_budget(a.max_length, 0.15))
    print(f"vocab {v}: full {1 / med['full']:.1f} steps/s, gathered {1 / med['gathered']:.1f} steps/s, "
          f"speed-up {row['speedup']:.2f}x; loss {losses['full']:.5f} / {losses['gathered']:.5f}", flush=True)
    out["rows"].append(row)
  out["machine"]["loadavg_after"] = os.getloadavg()
  if a.out:
    atomic_write_json(a.out, out)
  return out


if __name__ == "__main__":
  main()
