r"""Does report pre-training help a text task? The report stage (MLM on the Indiana reports' training split),
then normal-vs-abnormal fine-tuning from it and from scratch, over seeds, on the held-out test split.

  python benchmarks/report_stage.py --workdir=/tmp/report_bench --steps=600 --seeds=0,1,2 \
      --out=benchmarks/results/report_stage.json
  python benchmarks/report_stage.py --workdir=/tmp/report_bench --steps=600 --seeds=0,1,2 --protocol=linear \
      --out=benchmarks/results/report_stage_linear.json

Both arms use the same task settings (steps, lr, batch) and the micro trunk of `configs/report.py:demo`;
intervals are 95 % Student-t over seeds (`invcoss_jax.retention.metrics.mean_ci`). Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's package

from invcoss_jax import jobs  # noqa: E402
from invcoss_jax.defaults import load_config_file  # noqa: E402
from invcoss_jax.io_utils import atomic_write_json  # noqa: E402
from invcoss_jax.retention.metrics import mean_ci  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--steps", type=int, default=600, help="report pre-training steps")
  p.add_argument("--finetune_steps", type=int, default=150)
  p.add_argument("--finetune_lr", type=float, default=1e-3)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--protocol", default="finetune", choices=("finetune", "linear"),
                 help="linear: a probe on the frozen encoder (what pre-training alone gives)")
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  seeds = tuple(int(s) for s in a.seeds.split(","))
  stage = os.path.join(a.workdir, "report_stage")
  c = load_config_file(os.path.join(REPO, "configs/report.py:demo"))
  c.total_steps = a.steps
  c.checkpoint.every_steps = max(a.steps // 2, 1)
  c.logging.log_every_steps = max(a.steps // 10, 1)
  pre = jobs.run(c, stage)
  losses = pre["losses"]
  rows, per_seed_of = {}, {}
  for arm, init_from in (("report pre-trained", stage), ("from scratch", "")):
    e = load_config_file(os.path.join(REPO, f"configs/evaluate.py:indiana_abnormal,{a.protocol}"))
    e.init_from = init_from
    e.evaluate.seeds = seeds
    t = e.evaluate.tasks.indiana_abnormal
    t.steps, t.eval_every, t.lr = a.finetune_steps, max(a.finetune_steps // 3, 1), a.finetune_lr
    rec = jobs.run(e, os.path.join(a.workdir, f"eval_{a.protocol}_" + arm.split()[0]))
    per_seed = per_seed_of[arm] = rec["per_seed"]
    rows[arm] = {k: mean_ci([per_seed[s][k] for s in per_seed]) for k in ("acc", "auc", "f1")}
  # Paired per seed: both arms fine-tune with the same seed (head initialisation, data order).
  pre, scratch = per_seed_of["report pre-trained"], per_seed_of["from scratch"]
  rows["pre-trained - scratch (paired)"] = {k: mean_ci([pre[s][k] - scratch[s][k] for s in pre])
                                           for k in ("acc", "auc", "f1")}
  result = dict(steps=a.steps, seeds=list(seeds), mlm_loss_first=losses[min(losses)] if losses else None,
                mlm_loss_last=losses[max(losses)] if losses else None, finetune_steps=a.finetune_steps,
                finetune_lr=a.finetune_lr, protocol=a.protocol, results=rows)
  for arm, r in rows.items():
    print(f"{arm:32s} " + "  ".join(f"{k} {v['mean']:.3f} ± {v['ci']:.3f}" for k, v in r.items()))
  if a.out:
    atomic_write_json(a.out, result)
  return result


if __name__ == "__main__":
  main()
