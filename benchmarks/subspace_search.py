r"""The principal-subspace prior's settings on one seed of the `content` benchmark's X-ray stage (issue 26).

For each variant `name:K:weight:residual_weight` the stage's pixel statistics are recomputed with K principal
components (`inversion.pixel_components`), the replay set (5 % of the stage, 235 images, the stage's inversion
seed) is inverted with `configs/retention.py:content,priors` plus `loss_weights.pixel_pca=weight` and
`pixel_pca_residual_weight`, and judged against as many held-out `val` X-rays by the three classifier
two-sample tests (`benchmarks/inversion_ceiling.judge`). A search on one seed (the judges' spread between seeds is
about 0.03 at n = 235): the chosen setting is then run on 4 seeds by `benchmarks/retention_ablation.py`.

  .venv/bin/python benchmarks/subspace_search.py --seed=0 --variants=K32_w10_r30:32:10:30 \
      --out=benchmarks/results/subspace_search_seed0.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import inversion_ceiling as ceiling  # noqa: E402
from invcoss_jax import data as data_lib  # noqa: E402
from invcoss_jax.defaults import load_config_file  # noqa: E402
from invcoss_jax.inversion import statistics  # noqa: E402
from invcoss_jax.io_utils import atomic_write_json  # noqa: E402
from invcoss_jax.retention import features  # noqa: E402
from invcoss_jax.train.checkpoint import load_trained_stage  # noqa: E402


def parse_variant(text: str) -> tuple[str, int, float, float]:
  parts = text.split(":")
  if len(parts) != 4:
    raise ValueError(f"--variants: {text!r} is not name:K:weight:residual_weight")
  return parts[0], int(parts[1]), float(parts[2]), float(parts[3])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--root", default=os.path.join(REPO, "workdirs", "retention_content", "runs"))
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--variants", required=True, help="comma-separated name:K:weight:residual_weight")
  ap.add_argument("--cnn_steps", type=int, default=300)
  ap.add_argument("--out", required=True)
  args = ap.parse_args(argv)
  variants = [parse_variant(v) for v in args.variants.split(",") if v]
  stage = os.path.join(args.root, f"seed_{args.seed}", "seqssl", "stage_1_xray")
  stage_cfg, model, params = load_trained_stage(stage)
  inv = load_config_file(os.path.join(REPO, "configs", "retention.py") + ":content,priors").inversion
  shape = tuple(int(s) for s in data_lib.image_shape(stage_cfg.data))
  stored = statistics.load_statistics(os.path.join(stage, "statistics.npz"))
  num = int(round(0.05 * data_lib.num_examples(stage_cfg.data)))
  held = features.random_sample(features.load_split(stage_cfg.data, "val").images, num, args.seed + 31)
  rows = []
  for name, k, weight, residual_weight in variants:
    fresh = statistics.compute_statistics(model, params, data_lib.make_eval_iterator(stage_cfg.data, batch_size=256),
                                          pixel=True, pixel_components=k)
    c = inv.copy_and_resolve_references()
    c.pixel_statistics, c.pixel_components = True, k
    c.loss_weights.pixel_pca, c.pixel_pca_residual_weight = weight, residual_weight
    t = time.time()
    images, report, _ = ceiling.invert(model, params, stored.replace(pixel=fresh.pixel), c, shape,
                                       seed=args.seed + 1009 * ceiling.STAGE_INDEX, num_samples=num)
    row = dict(variant=name, components=k, weight=weight, residual_weight=residual_weight, set_size=num,
               inversion_seconds=time.time() - t, end_terms=report["end"],
               judges=ceiling.judge(images, held, args.seed, args.cnn_steps))
    rows.append(row)
    j = row["judges"]
    print(f"{name}: logistic {j['logistic']:.3f} statistics {j['statistics']:.3f} cnn {j['cnn']:.3f} "
          f"TV {j['tv']:.4f} ({row['inversion_seconds']:.0f} s)", flush=True)
    atomic_write_json(args.out, dict(seed=args.seed, stage=stage, command=" ".join(sys.argv), rows=rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
