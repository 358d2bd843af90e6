r"""Training input-pipeline throughput with and without `data.window_cache_size`, measured in one session.

  python benchmarks/input_pipeline.py --preset=full --modalities=ct,mri --out=benchmarks/results/input_pipeline.json

The datasets are those of `configs/retention.py:<preset>` (the real CT/MRI of ../shared/data). For each
modality both iterators (cache off, cache on) are built and warmed up for `--warmup` batches (the cached one's
first epoch fills its cache, as a training run's does), then timed in interleaved rounds of `--batches` batches
so that a change of machine load affects both; the table gives the median batches/s over rounds and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's package

from invcoss_jax.data.pipeline import make_train_iterator  # noqa: E402
from invcoss_jax.defaults import load_config_file  # noqa: E402
from invcoss_jax.io_utils import atomic_write_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rate(it, batches: int) -> float:
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches / (time.perf_counter() - t)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="full")
  p.add_argument("--modalities", default="ct,mri")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--cache", type=int, default=4096, help="window_cache_size of the cached iterator")
  p.add_argument("--warmup", type=int, default=20)
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  config = load_config_file(os.path.join(REPO, "configs", f"retention.py:{a.preset}"))
  rows = []
  for m in [s.strip() for s in a.modalities.split(",") if s.strip()]:
    iters = {}
    for name, size in (("uncached", 0), ("cached", a.cache)):
      d = config.continual.datasets[m].copy_and_resolve_references()
      d.window_cache_size = size
      iters[name] = make_train_iterator(d, global_batch_size=a.batch_size, seed=0, process_index=0,
                                        process_count=1)
      rate(iters[name], a.warmup)
    rates = {k: [] for k in iters}
    for _ in range(a.rounds):
      for k, it in iters.items():
        rates[k].append(rate(it, a.batches))
    med = {k: statistics.median(v) for k, v in rates.items()}
    rows.append(dict(modality=m, batch_size=a.batch_size, batches_per_s=med, rounds=rates,
                     ratio=med["cached"] / med["uncached"]))
    print(f"{m}: uncached {med['uncached']:.2f} batches/s, cached {med['cached']:.2f} "
          f"({rows[-1]['ratio']:.1f}x)", flush=True)
  result = dict(preset=a.preset, cache=a.cache, warmup=a.warmup, batches=a.batches, rows=rows)
  if a.out:
    atomic_write_json(a.out, result)
  return result


if __name__ == "__main__":
  main()
