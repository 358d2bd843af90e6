r"""Step throughput, compile time, memory and model FLOPs utilisation of the JAX pre-training and inversion
steps, next to the same steps in PyTorch (benchmarks/torch_reference.py), measured in one session.

  python benchmarks/bench.py --models=base --dims=2d --programs=pretrain,invert --torch \
      --out=benchmarks/results/cpu_base.json

First the f32 matmul peak of the current device is measured (JAX, and PyTorch for reference); then for each
(model, dimension, program) both implementations are built, warmed up, and timed in interleaved rounds
(JAX, PyTorch, JAX, PyTorch, ...), so a machine whose load changes affects both alike; the table reports the
medians over the rounds. images/s is examples per optimisation step time (inversion: synthetic images in the
batch per inner step). FLOPs per step are XLA's count for the compiled JAX step (the same model runs in
PyTorch); MFU = FLOPs per step / median step time / the highest matmul peak measured in the session (at the
start and after every JAX round), a conservative figure: a peak measured low never inflates it. Both
implementations first run `--warmup` untimed steps. Memory: the device's peak bytes in use
on GPU/TPU, the compiled program's planned peak (arguments + outputs + temporaries - aliased) on CPU.

The JAX steps are the package's own: `train.pretrain.make_train_step` + `train.core.jit_step` and
`inversion.engine.BatchOptimizer` in the inner-loop mode the engine picks for the backend (a timed call runs
`--steps` inner steps); its compile time is that of the inner step lowered and compiled ahead of time. Inputs are
real demo images (X-rays for 2D, the demo CT for 3D) at the requested size.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # torch_reference
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's package

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from invcoss_jax.io_utils import atomic_write_json  # noqa: E402

GIB = 2.0**30


@dataclasses.dataclass
class Case:
  model: str
  dim: str  # '2d' | '3d'
  program: str  # 'pretrain' | 'invert'
  batch: int
  image_shape: tuple[int, ...]


@dataclasses.dataclass
class Built:
  """A ready step: run(n) runs n optimisation steps and returns the seconds they took (work finished)."""
  run: Callable[[int], float]
  flops_per_step: float = float("nan")
  compile_s: float = float("nan")
  memory_bytes: float = float("nan")
  memory_source: str = ""


# ----------------------------------------------------------------------------------------------------------
# Configuration of a case


def model_config(preset: str, dtype: str, remat: bool, patch_3d: int):
  from invcoss_jax import models
  mc = models.model_config(preset)
  mc.dtype, mc.remat = dtype, remat
  mc.patch_size_3d = (patch_3d,) * 3
  return mc


def inversion_config(args, case: Case):
  from invcoss_jax.inversion.config import inversion_config as defaults
  inv = defaults()
  sched = inv.schedule_2d if case.dim == "2d" else inv.schedule_3d
  sched.batch_size = case.batch
  inv.pool_size = max(case.batch, int(args.pool_size))
  if args.invunet_channels:
    inv.invunet.channels = tuple(int(c) for c in args.invunet_channels.split(","))
  return inv


def real_images(case: Case) -> np.ndarray:
  """A batch of real demo images at the case's shape (X-rays for 2D, CT windows for 3D)."""
  from invcoss_jax import data as data_lib
  from invcoss_jax.data.config import data_config
  d = data_config()
  if case.dim == "2d":
    d.name = "demo_xray"
    d.image_size = case.image_shape[0]
  else:
    d.name = "demo_ct"
    d.volume_shape = tuple(case.image_shape[:3])
  images = np.asarray(next(data_lib.make_train_iterator(d, global_batch_size=case.batch, seed=0))["image"],
                      np.float32)
  if images.shape != (case.batch, *case.image_shape):
    raise ValueError(f"the demo data gave {images.shape}, expected {(case.batch, *case.image_shape)}")
  return images


# ----------------------------------------------------------------------------------------------------------
# Peaks


def best_seconds(step: Callable[[], Any], reps: int) -> float:
  """Shortest of `reps` timed calls of `step` after one untimed call; `step` must finish its work (JAX results
  are waited for)."""
  jax.block_until_ready(step())
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(step())
    best = min(best, time.perf_counter() - t)
  return best


def jax_matmul_peak(n: int, reps: int, dtype: str = "float32") -> float:
  """Best matmul FLOP/s of the default JAX device over `reps` timed (n x n) @ (n x n) products in `dtype`,
  accumulated in float32 (for bf16 that is both what accelerators do and, on XLA:CPU, the fast kernel: a
  bf16-output product ran at 1/4 of the speed on an AVX512_BF16 CPU, so the peak would read low)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  return 2.0 * n**3 / best_seconds(lambda: f(a, a), reps)


def pretrain_matmul_shapes(mc, image_shape, batch: int, mask_ratio: float = 0.75):
  """The products of one MAE pre-training step: dense layers as (M, K, N) and attention as (B, heads, T, head_dim),
  forward only (the backward pass repeats each as two products of the same size)."""
  import math
  from invcoss_jax import models
  cfg = models.ViTConfig.from_config(mc)
  rank = len(image_shape) - 1
  ps = cfg.patch_size(rank)
  num_patches = math.prod(models.grid_shape(image_shape[:-1], ps))
  patch_dim = math.prod(ps) * cfg.channels(rank)
  enc, dec = 1 + int(num_patches * (1 - mask_ratio)), 1 + num_patches
  dense = [(batch * num_patches, patch_dim, cfg.width)]
  attention = []
  for tokens, width, depth, heads in ((enc, cfg.width, cfg.depth, cfg.num_heads),
                                      (dec, cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads)):
    hidden = int(width * cfg.mlp_ratio)
    m = batch * tokens
    dense += [(m, width, 3 * width), (m, width, width), (m, width, hidden), (m, hidden, width)] * depth
    attention += [(batch, heads, tokens, width // heads)] * depth
  dense += [(batch * enc, cfg.width, cfg.decoder_width), (batch * dec, cfg.decoder_width, patch_dim)]
  return dense, attention


def matmul_parts_time(dense, attention, reps: int = 3) -> dict[str, float]:
  """Seconds (median of `reps`) of the step's products alone, forward and backward, each kind in one jitted
  program: dense layers (y = xW, dx = dy W^T, dW = x^T dy) and attention (QK^T, PV and their gradients)."""
  key = jax.random.PRNGKey(0)
  dense_args = [(jax.random.normal(key, (m, k)), jax.random.normal(key, (k, n)), jax.random.normal(key, (m, n)))
                for m, k, n in dense]
  att_args = [jax.random.normal(key, (b, t, h, d)) for b, h, t, d in attention]

  @jax.jit
  def dense_fn(args):
    return sum(jnp.sum((x @ w)[:1]) + jnp.sum((dy @ w.T)[:1]) + jnp.sum((x.T @ dy)[:1]) for x, w, dy in args)

  @jax.jit
  def attention_fn(args):
    def forward(qs):
      return sum(jnp.sum(jnp.einsum("bqhk,bkhd->bqhd", jnp.einsum("bqhd,bkhd->bhqk", q, q).transpose(0, 2, 1, 3),
                                    q)) for q in qs)
    return jax.grad(forward)(args)

  out = {}
  for name, fn, args in (("dense", dense_fn, dense_args), ("attention", attention_fn, att_args)):
    jax.block_until_ready(fn(args))
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      jax.block_until_ready(fn(args))
      times.append(time.perf_counter() - t)
    out[name] = statistics.median(times)
  out["dense_flops"] = float(sum(3 * 2 * m * k * n for m, k, n in dense))
  out["attention_flops"] = float(sum(3 * 2 * 2 * b * h * t * t * d for b, h, t, d in attention))
  return out


def torch_matmul_peak(n: int, reps: int, dtype: str = "float32") -> float:
  import torch
  a = torch.randn(n, n).to(getattr(torch, dtype))
  return 2.0 * n**3 / best_seconds(lambda: a @ a, reps)


# ----------------------------------------------------------------------------------------------------------
# JAX steps


def _memory(compiled, devices) -> tuple[float, str]:
  stats = [d.memory_stats() for d in devices] if devices[0].platform != "cpu" else []
  if stats and stats[0] and "peak_bytes_in_use" in stats[0]:
    return float(max(s["peak_bytes_in_use"] for s in stats)), "device peak"
  m = compiled.memory_analysis()
  return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes), "XLA plan"


def jax_pretrain(case: Case, args, images: np.ndarray) -> tuple[Built, Any]:
  import ml_collections
  from invcoss_jax import models
  from invcoss_jax.parallel import mesh as mesh_lib
  from invcoss_jax.parallel.config import mesh_config
  from invcoss_jax.train import optim
  from invcoss_jax.train.config import train_config
  from invcoss_jax.train.core import create_train_state, jit_step
  from invcoss_jax.train.pretrain import make_train_step

  config = ml_collections.ConfigDict(dict(total_steps=1000, train=train_config()))
  config.train.global_batch_size = case.batch
  tx, sched = optim.make_optimizer(config.train, optim.run_length(config, None))
  mc = model_config(case.model, args.dtype, args.remat, args.patch_3d)
  model = models.build_mae(mc)
  mesh = mesh_lib.make_mesh(mesh_config())
  with jax.set_mesh(mesh):
    state, shardings = create_train_state(lambda r: models.init_mae_params(model, r, [case.image_shape]), tx,
                                          jax.random.PRNGKey(0), mesh)
    step = jit_step(make_train_step(model, tx, sched, mask_ratio=0.75), shardings, mesh)
    batch = mesh_lib.put_batch(mesh, {"image": images})
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
  params = jax.device_get(state.params)  # the PyTorch model starts from the same weights
  holder = {"state": state}

  def run(n: int) -> float:
    with jax.set_mesh(mesh):
      t = time.perf_counter()
      for _ in range(n):
        holder["state"], metrics = compiled(holder["state"], batch)
      jax.block_until_ready(metrics["loss"])
      return time.perf_counter() - t

  run(1)
  memory, source = _memory(compiled, list(mesh.devices.flat))
  flops = float(compiled.cost_analysis()["flops"]) * mesh.devices.size
  return Built(run, flops, compile_s, memory, source), (mc, params)


def jax_invert(case: Case, args, images: np.ndarray) -> tuple[Built, Any]:
  from invcoss_jax import models
  from invcoss_jax.inversion import engine, statistics

  mc = model_config(case.model, args.dtype, args.remat, args.patch_3d)
  model = models.build_mae(mc)
  params = models.init_mae_params(model, jax.random.PRNGKey(0), [case.image_shape])
  stats = statistics.compute_statistics(model, params, [images])
  inv = inversion_config(args, case)
  rank = 2 if case.dim == "2d" else 3
  generator = engine.build_generator(inv, case.image_shape)
  out_act = engine.output_activation(inv, rank)
  latent_dim = int((inv.schedule_2d if rank == 2 else inv.schedule_3d).latent_dim)
  feature_dim = int(stats.mean.shape[-1])
  opt_vars, gen_state = engine.init_variables(generator, case.image_shape, case.batch, latent_dim,
                                              jax.random.PRNGKey(1))
  frozen = dict(params=params, stats=statistics.FeatureStats(count=jnp.float32(stats.count),
                                                             mean=jnp.asarray(stats.mean, jnp.float32),
                                                             var=jnp.asarray(stats.var, jnp.float32)),
                pool=jnp.zeros((int(inv.pool_size), feature_dim), jnp.float32), pool_count=jnp.int32(0))
  steps = int(args.steps)
  # The engine's own optimiser in the mode it picks for this backend ('stepwise' on CPU, 'compiled' elsewhere).
  mode = engine.inner_loop_mode(inv)
  optimizer = engine.BatchOptimizer(model, generator, inv, out_act, steps, case.image_shape, feature_dim, mode)
  call_args = (opt_vars, gen_state, frozen, jax.random.key(2), 0)

  def call(num_steps):
    out = optimizer(*call_args, num_steps)
    jax.block_until_ready(out["totals"])

  call(1)  # compiles (and runs 2 inner steps)

  def run(n: int) -> float:
    # A call with `steps` updates runs steps + 1 inner steps (the last one only evaluates: a forward and
    # backward pass all the same); n is rounded up to whole calls and the time scaled back to n steps.
    calls = max(1, -(-n // (steps + 1)))
    t = time.perf_counter()
    for _ in range(calls):
      call(steps)
    return (time.perf_counter() - t) * n / (calls * (steps + 1))

  run(steps)
  from invcoss_jax.inversion.engine import inversion_program
  # Compile time: the inner step lowered and compiled ahead of time (the step the calls above compiled; the
  # difference of a first and a second call was noise when a step takes longer than its compilation).
  t = time.perf_counter()
  one_step = inversion_program(optimizer, whole_loop=False).lower(
      opt_vars, gen_state, frozen, jax.random.key(2), jnp.int32(0), jnp.int32(steps)).compile()
  compile_s = time.perf_counter() - t
  memory, source = _memory(one_step, jax.devices()[:1])
  flops = float(one_step.cost_analysis()["flops"])  # one inner step
  return Built(run, flops, compile_s, memory, source), (mc, params, stats, inv, latent_dim)


# ----------------------------------------------------------------------------------------------------------
# PyTorch steps


def torch_pretrain(case: Case, args, images: np.ndarray, jax_side) -> Built:
  import torch
  import torch_reference as tr
  from invcoss_jax import models
  from invcoss_jax.train.config import train_config

  mc, params = jax_side
  model = tr.MAE(models.ViTConfig.from_config(mc), case.image_shape)
  tr.load_flax_params(model, params)
  tcfg = train_config()
  tcfg.global_batch_size = case.batch
  step = tr.make_pretrain_step(model, tcfg, 0.75, getattr(torch, args.dtype))
  x = tr.to_channels_first(images)
  gen = torch.Generator().manual_seed(0)
  num = int(np.prod(model.grid))

  def run(n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
      step(x, torch.rand(case.batch, num, generator=gen))
    return time.perf_counter() - t

  run(1)
  return Built(run)


def torch_invert(case: Case, args, images: np.ndarray, jax_side) -> Built:
  import torch
  import torch_reference as tr
  from invcoss_jax import models

  mc, params, stats, inv, latent_dim = jax_side
  teacher = tr.MAE(models.ViTConfig.from_config(mc), case.image_shape)
  tr.load_flax_params(teacher, params)
  torch.manual_seed(0)
  rank = len(case.image_shape) - 1
  from invcoss_jax.inversion import engine
  generator = tr.InvUNet(case.image_shape, latent_dim, tuple(inv.invunet.channels), inv.invunet.activation,
                         engine.output_activation(inv, rank))
  latents = torch.randn(case.batch, latent_dim)
  step = tr.make_inversion_step(teacher, generator, latents, torch.from_numpy(np.asarray(stats.mean, np.float32)),
                                torch.from_numpy(np.asarray(stats.var, np.float32)),
                                torch.zeros(int(inv.pool_size), int(stats.mean.shape[-1])), inv,
                                compute_dtype=getattr(torch, args.dtype))

  def run(n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
      step()
    return time.perf_counter() - t

  run(1)
  return Built(run)


# ----------------------------------------------------------------------------------------------------------
# The session


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo ('' where there is none)."""
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  return ""


def conditions() -> dict[str, Any]:
  import torch
  cpu = cpu_model()
  return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), host=platform.node(),
              cpu=cpu, cpu_count=os.cpu_count(), jax=jax.__version__, torch=torch.__version__,
              torch_threads=torch.get_num_threads(), backend=jax.default_backend(),
              device=jax.devices()[0].device_kind, num_devices=jax.device_count(),
              xla_flags=os.environ.get("XLA_FLAGS", ""), loadavg_start=os.getloadavg())


def measure_case(case: Case, args, start_peaks: list[float]) -> dict[str, Any]:
  images = real_images(case)
  build_jax = jax_pretrain if case.program == "pretrain" else jax_invert
  build_torch = torch_pretrain if case.program == "pretrain" else torch_invert
  j, side = build_jax(case, args, images)
  t = build_torch(case, args, images, side) if args.torch else None
  # Both reach their steady state first: the first steps after building run slower (allocator growth, first
  # touches of fresh pages); on this CPU XLA's took 3-4 steps, PyTorch's 1-2.
  if int(args.warmup) > 0:
    j.run(int(args.warmup))
    if t is not None:
      t.run(int(args.warmup))
  jax_times, torch_times, peaks = [], [], []
  for _ in range(int(args.rounds)):  # interleaved: JAX, peak, PyTorch, JAX, peak, PyTorch, ...
    jax_times.append(j.run(int(args.steps)) / int(args.steps))
    # The peak is re-measured every round, after JAX's steps: measured right after PyTorch's steps it once came
    # out as low as 322 against 436 GFLOP/s on the same idle CPU.
    peaks.append(jax_matmul_peak(args.matmul_size, 5, args.peak_dtype))
    if t is not None:
      torch_times.append(t.run(int(args.steps)) / int(args.steps))
  jt = statistics.median(jax_times)
  # MFU is conservative: against the highest peak measured in the session (at the start and in every round), so
  # a peak measured low never inflates it.
  peak = max(start_peaks + peaks)
  parts = {}
  if args.breakdown and case.program == "pretrain":
    # How much of the step is matrix products, and how fast XLA runs them alone at the step's shapes.
    dense, attention = pretrain_matmul_shapes(side[0], case.image_shape, case.batch)
    parts = matmul_parts_time(dense, attention)
    parts.update(dense_share=parts["dense"] / jt, attention_share=parts["attention"] / jt,
                 dense_mfu=parts["dense_flops"] / parts["dense"] / peak,
                 attention_mfu=parts["attention_flops"] / parts["attention"] / peak)
    print(f"  breakdown: dense products alone {parts['dense']:.3f} s ({parts['dense_share']:.0%} of the step, "
          f"{parts['dense_mfu']:.0%} of peak), attention products alone {parts['attention']:.3f} s "
          f"({parts['attention_share']:.0%}, {parts['attention_mfu']:.0%} of peak)", flush=True)
  mfu = lambda times: j.flops_per_step / statistics.median(times) / peak
  row = dict(dataclasses.asdict(case), image_shape=list(case.image_shape), dtype=args.dtype, remat=args.remat,
             steps_per_round=int(args.steps), rounds=int(args.rounds), warmup_steps=int(args.warmup),
             jax_step_s=jax_times,
             jax_images_per_s=case.batch / jt, flops_per_step=j.flops_per_step, round_peak_flops=peaks,
             mfu_peak_flops=peak, jax_mfu=mfu(jax_times), compile_s=j.compile_s, memory_bytes=j.memory_bytes,
             memory_source=j.memory_source, matmul_breakdown=parts)
  if torch_times:
    tt = statistics.median(torch_times)
    row.update(torch_step_s=torch_times, torch_images_per_s=case.batch / tt, torch_mfu=mfu(torch_times),
               speedup=tt / jt)
  return row


def format_table(rows: list[dict[str, Any]]) -> str:
  cols = ("model", "dim", "program", "batch", "shape", "JAX img/s", "PyTorch img/s", "JAX/PyTorch", "JAX MFU",
          "PyTorch MFU", "GFLOP/step", "compile s", "memory GiB")
  out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
  for r in rows:
    f = lambda k, fmt: (fmt.format(r[k]) if k in r else "-")
    out.append("| " + " | ".join([
        r["model"], r["dim"], r["program"], str(r["batch"]), "x".join(map(str, r["image_shape"])),
        f("jax_images_per_s", "{:.2f}"), f("torch_images_per_s", "{:.2f}"), f("speedup", "{:.2f}x"),
        f("jax_mfu", "{:.1%}"), f("torch_mfu", "{:.1%}"), f"{r['flops_per_step'] / 1e9:.1f}",
        f"{r['compile_s']:.1f}", f"{r['memory_bytes'] / GIB:.2f} ({r['memory_source']})"]) + " |")
  return "\n".join(out)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", default="micro,tiny,small,base", help="comma-separated presets")
  p.add_argument("--dims", default="2d,3d")
  p.add_argument("--programs", default="pretrain,invert")
  p.add_argument("--image_size", type=int, default=224, help="2D side")
  p.add_argument("--volume_shape", default="16,192,192", help="3D (D,H,W)")
  p.add_argument("--patch_3d", type=int, default=16)
  p.add_argument("--batch_pretrain_2d", type=int, default=8)
  p.add_argument("--batch_pretrain_3d", type=int, default=4)
  p.add_argument("--batch_invert_2d", type=int, default=8)
  p.add_argument("--batch_invert_3d", type=int, default=4)
  p.add_argument("--invunet_channels", default="", help="override config.inversion.invunet.channels")
  p.add_argument("--pool_size", type=int, default=256, help="L_rep's feature pool")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--remat", action="store_true")
  p.add_argument("--steps", type=int, default=3, help="steps per timed round")
  p.add_argument("--warmup", type=int, default=4, help="untimed steps of each implementation before the rounds")
  p.add_argument("--breakdown", action="store_true",
                 help="pre-training: also time the step's dense and attention products alone (JAX)")
  p.add_argument("--rounds", type=int, default=3, help="interleaved JAX/PyTorch rounds; medians are reported")
  p.add_argument("--matmul_size", type=int, default=2048)
  p.add_argument("--peak_dtype", default="float32", choices=("float32", "bfloat16"),
                 help="dtype of the matmul peak MFU is measured against (bf16 on GPU/TPU)")
  p.add_argument("--torch", action="store_true", help="also time the PyTorch implementation")
  p.add_argument("--out", default="", help="JSON file for the results")
  args = p.parse_args(argv)
  if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
    p.error("--steps and --rounds must be >= 1, --warmup >= 0")
  return args


def cases(args) -> list[Case]:
  vol = tuple(int(s) for s in args.volume_shape.split(","))
  shapes = {"2d": (args.image_size, args.image_size, 3), "3d": (*vol, 1)}
  out = []
  for model in args.models.split(","):
    for dim in args.dims.split(","):
      for program in args.programs.split(","):
        if dim not in shapes or program not in ("pretrain", "invert"):
          raise SystemExit(f"unknown --dims {dim!r} or --programs {program!r}")
        out.append(Case(model, dim, program, int(getattr(args, f"batch_{program}_{dim}")), shapes[dim]))
  return out


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  info = conditions()
  jax_peaks, torch_peaks = [], []
  for _ in range(int(args.rounds)):  # interleaved too
    jax_peaks.append(jax_matmul_peak(args.matmul_size, 5, args.peak_dtype))
    if args.torch:
      torch_peaks.append(torch_matmul_peak(args.matmul_size, 5, args.peak_dtype))
  peak = statistics.median(jax_peaks)
  print(f"{args.peak_dtype} matmul peak ({args.matmul_size}^2, median of {args.rounds} rounds, best of 5 each): "
        f"JAX {peak / 1e9:.1f} GFLOP/s" + (f", PyTorch {statistics.median(torch_peaks) / 1e9:.1f} GFLOP/s"
                                           if torch_peaks else ""), flush=True)
  rows = []

  def result() -> dict[str, Any]:
    return dict(conditions=dict(info, loadavg_end=os.getloadavg()), args=vars(args),
                matmul_peak_flops=dict(jax=jax_peaks, torch=torch_peaks, jax_median=peak), rows=rows)

  for case in cases(args):
    rows.append(measure_case(case, args, jax_peaks))
    print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    if args.out:  # after every row: a long grid stopped half-way keeps what it measured
      atomic_write_json(args.out, result())
  print(format_table(rows))
  return result()


if __name__ == "__main__":
  main()
