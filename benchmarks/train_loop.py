r"""The training loop of the evidence benchmarks at the hardware's speed: steps/s of a `configs/retention.py`
stage through the trainer core's `Loop`, with the input pipeline of earlier versions (examples handed over one by
one by grain's read threads, batched after them) or the current one (whole batches built by the threads), and
one or `--steps_per_dispatch` steps per dispatch (`core.jit_block`), measured in one session.

  python benchmarks/train_loop.py --preset=quick --modality=xray --steps=300 --rounds=3 \
      --out=benchmarks/results/train_loop.json

Each variant runs `--steps` train steps of the stage's MAE (batch `config.train.global_batch_size`) from the same
state in interleaved rounds (so a change of machine load affects every variant), after one warm-up run that
compiles its programs; the table gives the median steps/s, the fraction of the loop's wall time spent waiting for
the next batch (`data`), and the ratio to the first variant. The step alone (the same compiled step on one batch
already on the device, no input pipeline) is the ceiling; the step alone at 4x the batch says whether training
4 seeds together (vmap over independent states) could raise throughput on this hardware.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's package

import grain  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from invcoss_jax import data as data_lib, models  # noqa: E402
from invcoss_jax.data import pipeline  # noqa: E402
from invcoss_jax.defaults import load_config_file  # noqa: E402
from invcoss_jax.io_utils import atomic_write_json  # noqa: E402
from invcoss_jax.parallel import mesh as mesh_lib  # noqa: E402
from invcoss_jax.train import core, optim, pretrain  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def per_example_iterator(d, batch: int, seed: int):
  """The training pipeline before whole batches: examples read one by one, batched after the read threads."""
  d = data_lib.resolve(d)
  source, fn = pipeline._source_and_transform(d, d.split)  # pylint: disable=protected-access
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None).random_map(pipeline._Augment(fn))  # pylint: disable=protected-access
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=max(int(d.read_threads), 1),
                                                   prefetch_buffer_size=max(int(d.prefetch_buffer_size), 1)))
              .batch(batch, drop_remainder=True))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="quick")
  p.add_argument("--modality", default="xray")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps_per_dispatch", type=int, default=8)
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  config = load_config_file(os.path.join(REPO, "configs", f"retention.py:{a.preset}"))
  d = config.continual.datasets[a.modality]
  batch = int(config.train.global_batch_size)
  mesh = mesh_lib.make_mesh(config.mesh)
  model = models.build_mae(config.model)
  shape = tuple(data_lib.image_shape(d))
  tx, schedule = optim.make_optimizer(config.train, optim.run_length(config, data_lib.num_examples(d)))
  step = pretrain.make_train_step(model, tx, schedule, mask_ratio=float(config.train.mask_ratio))
  k = int(a.steps_per_dispatch)
  variants = {
      "per-example pipeline, 1 step/dispatch": ("per_example", 1),
      "whole-batch pipeline, 1 step/dispatch": ("batched", 1),
      f"whole-batch pipeline, {k} steps/dispatch": ("batched", k),
  }
  with jax.set_mesh(mesh):
    state0, shardings = core.create_train_state(lambda r: models.init_mae_params(model, r, [shape]), tx,
                                                jax.random.PRNGKey(0), mesh)
    host0 = jax.device_get(state0)
    one = core.jit_step(step, shardings, mesh)
    block = core.jit_block(step, shardings, mesh)

    def run(kind: str, per_dispatch: int, steps: int) -> tuple[float, float]:
      it = per_example_iterator(d, batch, 0) if kind == "per_example" else data_lib.make_train_iterator(
          d, global_batch_size=batch, seed=0)
      waited = [0.0]

      def next_batch(s):
        t = time.perf_counter()
        local = next(it)
        waited[0] += time.perf_counter() - t
        return mesh_lib.put_batch(mesh, {"image": np.asarray(local["image"], np.float32)})

      state = jax.device_put(host0, shardings)
      loop = core.Loop(step_fn=one, next_batch=next_batch, what="bench", log_every=10 ** 9, log_first=False,
                       steps_per_dispatch=per_dispatch, block_fn=block if per_dispatch > 1 else None)
      t = time.perf_counter()
      state, *_ = loop.run(state, None, 0, steps)
      jax.block_until_ready(state)
      wall = time.perf_counter() - t
      return steps / wall, waited[0] / wall

    for kind, per_dispatch in variants.values():  # warm-up: compiles, fills the page cache
      run(kind, per_dispatch, 2 * max(per_dispatch, 8))
    rates = {name: [] for name in variants}
    waits = {name: [] for name in variants}
    ceiling = []
    b = mesh_lib.put_batch(mesh, {"image": np.random.default_rng(0).random((batch,) + shape, np.float32)})
    for _ in range(a.rounds):
      for name, (kind, per_dispatch) in variants.items():
        r, w = run(kind, per_dispatch, a.steps)
        rates[name].append(r)
        waits[name].append(w)
      state = jax.device_put(host0, shardings)
      t = time.perf_counter()
      for _ in range(a.steps):
        state, _ = one(state, b)
      jax.block_until_ready(state)
      ceiling.append(a.steps / (time.perf_counter() - t))
    # Seeds trained together (vmap over independent states) would run 4x the examples per dispatch: the step
    # alone at 4x the batch says whether this hardware gains throughput from it.
    wide = mesh_lib.put_batch(mesh, {"image": np.random.default_rng(1).random((4 * batch,) + shape, np.float32)})
    images_per_sec = {batch: [], 4 * batch: []}
    for _ in range(a.rounds):
      for size, x in ((batch, b), (4 * batch, wide)):
        state = jax.device_put(host0, shardings)
        state, _ = one(state, x)
        jax.block_until_ready(state)
        n = max(1, a.steps * batch // size)
        t = time.perf_counter()
        for _ in range(n):
          state, _ = one(state, x)
        jax.block_until_ready(state)
        images_per_sec[size].append(n * size / (time.perf_counter() - t))
  first = statistics.median(rates[next(iter(variants))])
  rows = [dict(variant=name, steps_per_sec=statistics.median(rates[name]), rounds=rates[name],
               data_wait_fraction=statistics.median(waits[name]),
               ratio=statistics.median(rates[name]) / first) for name in variants]
  rows.append(dict(variant="the step alone (one batch on the device, no pipeline)",
                   steps_per_sec=statistics.median(ceiling), rounds=ceiling, data_wait_fraction=0.0,
                   ratio=statistics.median(ceiling) / first))
  scaling = {str(k): statistics.median(v) for k, v in images_per_sec.items()}
  result = dict(step_alone_images_per_sec_by_batch=scaling,
                batch_x4_throughput_ratio=scaling[str(4 * batch)] / scaling[str(batch)], preset=a.preset, modality=a.modality, batch=batch, image_shape=list(shape), steps=a.steps,
                rounds=a.rounds, machine=f"{os.cpu_count()} CPUs, {jax.devices()[0].platform}", rows=rows,
                command="python benchmarks/train_loop.py " + " ".join(argv if argv is not None else sys.argv[1:]))
  print(f"| variant | steps/s (median of {a.rounds}) | waiting for data | ratio |\n|---|---|---|---|")
  for r in rows:
    print(f"| {r['variant']} | {r['steps_per_sec']:.1f} | {100 * r['data_wait_fraction']:.0f} % | {r['ratio']:.2f}x |")
  print(f"step alone: {scaling[str(batch)]:.0f} images/s at batch {batch}, {scaling[str(4 * batch)]:.0f} at "
        f"{4 * batch} ({result['batch_x4_throughput_ratio']:.2f}x)")
  if a.out:
    atomic_write_json(a.out, result)
  return result


if __name__ == "__main__":
  main()
