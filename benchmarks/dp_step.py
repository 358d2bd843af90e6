r"""The cost of a DP-SGD step against the plain step (issue 25: at most 3x on the micro ViT on CPU).

  python benchmarks/dp_step.py                       # the demo micro ViT, 32x32 X-rays, batch 32
  python benchmarks/dp_step.py --batch=64 --microbatch=16 --out=dp.json

Both steps are the package's own (`train.pretrain.make_train_step`, the DP one with a `privacy.accounting`
plan), jitted on one device, on the same real demo X-rays. The DP step holds the padded Poisson batch
(`max_batch_size`, 0 = the plan's automatic size: the expected batch + 4 standard deviations), so the ratio is
reported per step and per padded row. Rounds are interleaved (plain, DP, plain, ...); medians are reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import types

import jax
import numpy as np


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="micro")
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--batch", type=int, default=32, help="the expected (DP) and actual (plain) batch")
  p.add_argument("--microbatch", default="0", help="comma-separated privacy.microbatch_size values (0: whole)")
  p.add_argument("--max_batch", type=int, default=0, help="privacy.max_batch_size (0: automatic)")
  p.add_argument("--steps", type=int, default=5, help="steps per timed round")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--out", default="")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  import ml_collections  # pylint: disable=g-import-not-at-top
  from invcoss_jax import data as data_lib, models  # pylint: disable=g-import-not-at-top
  from invcoss_jax.defaults import base_config  # pylint: disable=g-import-not-at-top
  from invcoss_jax.privacy import accounting, dp_sgd, sampling  # pylint: disable=g-import-not-at-top
  from invcoss_jax.train import core, optim  # pylint: disable=g-import-not-at-top
  from invcoss_jax.train.pretrain import make_train_step  # pylint: disable=g-import-not-at-top

  c = base_config()
  c.model = models.model_config(args.preset)
  c.model.patch_size_2d = (8, 8)
  c.data.name, c.data.image_size = "demo_xray", args.image_size
  c.train.global_batch_size = args.batch
  c.total_steps = 1000
  n = data_lib.num_examples(c.data)
  length = optim.run_length(c, n)
  tx, schedule = optim.make_optimizer(c.train, length)
  model = models.build_mae(c.model)
  shape = (args.image_size, args.image_size, 3)
  params = models.init_mae_params(model, jax.random.PRNGKey(0), [shape])
  state = core.train_state_init(tx)(params, jax.random.PRNGKey(1))
  it = data_lib.make_train_iterator(c.data, global_batch_size=args.batch, seed=0)
  images = np.asarray(next(it)["image"], np.float32)

  def timed(step, batch):
    fn = jax.jit(step)
    s = fn(state, batch)[0]  # compile
    jax.block_until_ready(s)
    t0 = time.perf_counter()
    out = fn(state, batch)
    jax.block_until_ready(out)

    def run():
      t = time.perf_counter()
      st = state
      for _ in range(args.steps):
        st, m = fn(st, batch)
      jax.block_until_ready((st, m))
      return (time.perf_counter() - t) / args.steps
    return run, time.perf_counter() - t0

  plain, _ = timed(make_train_step(model, tx, schedule, mask_ratio=0.75), {"image": images})
  variants = {}
  for micro in [int(m) for m in args.microbatch.split(",")]:
    c.privacy.update(noise_multiplier=1.0, microbatch_size=micro, max_batch_size=args.max_batch)
    plan = accounting.plan_dp_sgd(c.privacy, expected_batch_size=args.batch, dataset_size=n, steps=length.total_steps)
    rows = plan.max_batch_size
    # The batch the loader would build for a draw of exactly the expected size (privacy.sampling.PoissonBatches).
    place = sampling.PoissonBatches.rows(
        types.SimpleNamespace(micro=plan.microbatch_size, size=rows), min(args.batch, rows))
    padded = np.zeros((rows,) + shape, np.float32)
    padded[place] = images[:len(place)]
    padding = np.ones(rows, bool)
    padding[place] = False
    batch = {"image": padded, dp_sgd.PADDING_KEY: padding}
    run, _ = timed(make_train_step(model, tx, schedule, mask_ratio=0.75, privacy=plan), batch)
    variants[micro] = (run, plan)

  times = {"plain": []} | {f"dp_micro{m}": [] for m in variants}
  for _ in range(args.rounds):
    times["plain"].append(plain())
    for m, (run, _) in variants.items():
      times[f"dp_micro{m}"].append(run())
  med = {k: float(np.median(v)) for k, v in times.items()}
  rows = {f"dp_micro{m}": p.max_batch_size for m, (_, p) in variants.items()}
  result = dict(
      preset=args.preset, image_size=args.image_size, batch=args.batch, dataset_size=n,
      seconds_per_step=med, rows={"plain": args.batch, **rows},
      dp_over_plain={k: med[k] / med["plain"] for k in rows},
      dp_over_plain_per_row={k: (med[k] / rows[k]) / (med["plain"] / args.batch) for k in rows},
      conditions=dict(machine=platform.machine(), processor=platform.processor(), cpus=os.cpu_count(),
                      load=os.getloadavg(), jax=jax.__version__, backend=jax.default_backend(),
                      date=time.strftime("%Y-%m-%d")))
  for k in rows:
    print(f"{k}: {med[k] * 1e3:.1f} ms/step ({rows[k]} rows) vs plain {med['plain'] * 1e3:.1f} ms/step "
          f"({args.batch} rows): {result['dp_over_plain'][k]:.2f}x per step, "
          f"{result['dp_over_plain_per_row'][k]:.2f}x per row")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
