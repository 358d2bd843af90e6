"""`config.mode = 'compile'`: ahead-of-time planning. Lowers and compiles, without running, the MAE
pre-training step and the inversion step at the configured (by default the paper's) shapes on a mesh
of `config.compile.num_devices` devices, and prints per-device memory (`compiled.memory_analysis()`)
and FLOPs per step (`compiled.cost_analysis()`), so a user knows before paying for hardware whether a
configuration fits.

  python -m invcoss_jax.main --config=configs/xray.py --config.mode=compile --workdir=/tmp/plan

Nothing is allocated: parameters, optimiser state and batches are `jax.ShapeDtypeStruct`s carrying the
shardings the real jobs use (`parallel.mesh`, `config.mesh`). The programs are the real ones:
`train.pretrain.make_train_step` + `train.core.jit_step` and `inversion.engine.BatchOptimizer`.

More devices than the backend has: on CPU the job re-runs itself in a child process with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (the flag is read when JAX starts its backend, so it
cannot be changed in a process that has already used JAX). Memory from the CPU backend is the CPU compiler's
buffer assignment, an upper bound for an accelerator: XLA:CPU does not schedule for memory as the GPU/TPU
compilers do, and rematerialisation does not lower it. On an accelerator host compile there for that
backend's own figures, or set `config.compile.target` to a TPU
topology to compile deviceless with XLA's TPU compiler (docs/performance.md compares the two).

FLOPs: XLA counts the body of a while loop once, so the inversion program (`BatchOptimizer`'s compiled
mode: one `fori_loop` over the inner steps, what GPUs and TPUs run) reports the FLOPs of one inner step,
which is what the table shows (tests/test_scale_compile.py checks this). Memory is per device;
`peak` = arguments + outputs + temporaries - aliased (donated) bytes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from invcoss_jax import data as data_lib, io_utils, models
from invcoss_jax.inversion import engine, statistics
from invcoss_jax.inversion.config import inversion_spec
from invcoss_jax.models.flops import mae_train_step_flops, vit_mae_forward_flops  # noqa: F401  (the FLOP model)
from invcoss_jax.parallel import mesh as mesh_lib
from invcoss_jax.parallel.config import PROGRAMS, compile_config
from invcoss_jax.train import core, optim
from invcoss_jax.train.checkpoint import config_to_dict
from invcoss_jax.train.core import abstract_train_state, jit_step
from invcoss_jax.train.pretrain import make_train_step

# name -> config.model overrides; '' compiles config.model as it is.
VARIANTS = {
    "f32": dict(dtype="float32", remat=False),
    "f32+remat": dict(dtype="float32", remat=True),
    "bf16": dict(dtype="bfloat16", remat=False),
    "bf16+remat": dict(dtype="bfloat16", remat=True),
}
REPORT_FILE = "compile_report.json"
GIB = 2.0**30


# ----------------------------------------------------------------------------------------------------------
# The programs, abstractly.


def _key_struct():
  return jax.eval_shape(lambda: jax.random.key(0))


def _pretrain_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  shape = tuple(int(s) for s in config.compile.pretrain_image_shape)
  if shape:
    return shape
  return tuple(int(s) for s in data_lib.image_shape(config.data))


def lower_pretrain(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """(lowered pre-training step, facts) for config.model / config.train on `mesh`; nothing is allocated."""
  shape = _pretrain_shape(config)
  run_cfg = copy.deepcopy(config)
  if int(run_cfg.total_steps) <= 0:
    run_cfg.total_steps = 1000  # the schedule's constants do not change the program
  length = optim.run_length(run_cfg, None)
  tx, schedule = optim.make_optimizer(config.train, length)
  micro_batch = int(config.train.global_batch_size) // length.grad_accum_steps
  mesh_lib.check_global_batch(mesh, micro_batch, "config.train.global_batch_size / grad_accum_steps")
  model = models.build_mae(config.model)

  # The state pre-training restores into (core.abstract_train_state): its structure and shardings, the mesh's
  # rules included, without allocating (the mesh's devices may be compile-only).
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  with jax.set_mesh(mesh):
    state, shardings = abstract_train_state(
        lambda r: models.init_mae_params(model, r, [shape]), tx, key, mesh, rules=config.mesh)
    step = jit_step(make_train_step(model, tx, schedule, mask_ratio=float(config.train.mask_ratio),
                                    grad_accum_steps=length.grad_accum_steps), shardings, mesh)
    batch = {"image": jax.ShapeDtypeStruct((micro_batch, *shape), jnp.float32,
                                           sharding=mesh_lib.data_sharding(mesh))}
    lowered = step.lower(state, batch)
  facts = dict(image_shape=list(shape), global_batch=micro_batch,
               per_device_batch=micro_batch // mesh_lib.num_batch_shards(mesh),
               num_params=int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))),
               analytic_matmul_flops=mae_train_step_flops(config.model, shape, micro_batch,
                                                          float(config.train.mask_ratio)))
  return lowered, facts


def _pool_size(config: ml_collections.ConfigDict, batch: int) -> int:
  host = inversion_spec(config.inversion).host
  size = host.pool_size if host.pool_size > 0 else host.num_samples
  if size <= 0:
    size = int(config.compile.pool_size)
  return max(size, batch)


def lower_inversion(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, image_shape: Sequence[int]):
  """(lowered batch optimisation of config.inversion's schedule for `image_shape`, facts) on `mesh`."""
  shape = tuple(int(s) for s in image_shape)
  rank = engine.spatial_rank_of(shape)
  inv = inversion_spec(config.inversion)
  sched = engine.schedule_for(inv, rank)
  batch, latent_dim = int(sched.batch_size), int(sched.latent_dim)
  steps = max(int(sched.init_steps), int(sched.steps))
  shards = mesh_lib.num_batch_shards(mesh)
  if batch % shards:
    raise ValueError(f"config.inversion.schedule_{rank}d.batch_size={batch} must be divisible by the {shards} "
                     f"batch shards of the mesh {dict(mesh.shape)}")
  model = models.build_mae(config.model)
  generator = engine.build_generator(inv.program, shape)
  out_act = engine.output_activation(inv.program, rank)
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  params = jax.eval_shape(lambda k: models.init_mae_params(model, k, [shape]), key)
  blocks, tokens = jax.eval_shape(lambda p, x: statistics.encoder_forward(model, p, x), params,
                                  jax.ShapeDtypeStruct((1, *shape), jnp.float32))
  moments = jax.ShapeDtypeStruct((len(blocks), *blocks[0].shape[1:]), jnp.float32)
  feature_dim = int(tokens.shape[-1])
  stats = statistics.FeatureStats(count=jax.ShapeDtypeStruct((), jnp.float32), mean=moments, var=moments)
  opt_vars, gen_state = jax.eval_shape(
      lambda k: engine.init_variables(generator, shape, batch, latent_dim, k), key)
  frozen = dict(params=params, stats=stats,
                pool=jax.ShapeDtypeStruct((_pool_size(config, batch), feature_dim), jnp.float32),
                pool_count=jax.ShapeDtypeStruct((), jnp.int32))
  shardings = engine.inversion_shardings(mesh, config.mesh, opt_vars, gen_state, frozen)
  args = [core.abstract_state(t, s) for t, s in zip((opt_vars, gen_state, frozen), shardings)]
  rep = mesh_lib.replicated(mesh)
  key_struct = _key_struct()
  args.append(jax.ShapeDtypeStruct(key_struct.shape, key_struct.dtype, sharding=rep))
  args.append(jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))  # attempt
  args.append(jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))  # num_steps (traced)
  optimizer = engine.BatchOptimizer(model, generator, inv.program, out_act, steps, shape, feature_dim, "compiled")
  with jax.set_mesh(mesh):
    lowered = engine.inversion_program(optimizer, whole_loop=True).lower(*args)
  facts = dict(image_shape=list(shape), global_batch=batch, per_device_batch=batch // shards, steps=steps,
               generator=inv.program.generator,
               num_params=int(sum(math.prod(x.shape) for x in jax.tree.leaves(params))),
               generator_params=int(sum(math.prod(x.shape) for x in jax.tree.leaves(opt_vars["generator"]))))
  return lowered, facts


# ----------------------------------------------------------------------------------------------------------
# Compilation and the report.


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else {}
  cost = cost or {}
  return dict(flops=float(cost.get("flops", float("nan"))),
              transcendentals=float(cost.get("transcendentals", 0.0)),
              bytes_accessed=float(cost.get("bytes accessed", float("nan"))))


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = dict(argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
             temp_bytes=int(m.temp_size_in_bytes), alias_bytes=int(m.alias_size_in_bytes),
             code_bytes=int(m.generated_code_size_in_bytes))
  out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
  return out


def compile_program(config: ml_collections.ConfigDict, program: str, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Lowers and compiles one program on `mesh`; returns its row of the report."""
  t0 = time.perf_counter()
  if program == "pretrain":
    lowered, facts = lower_pretrain(config, mesh)
  elif program in ("invert_2d", "invert_3d"):
    lowered, facts = lower_inversion(config, mesh, config.compile[f"invert_image_shape_{program[-2:]}"])
  else:
    raise ValueError(f"config.compile.programs: unknown program {program!r}; expected some of {list(PROGRAMS)}")
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  devices = int(mesh.devices.size)
  row = dict(program=program, devices=devices, mesh={k: int(v) for k, v in mesh.shape.items()},
             shard_params=bool(config.mesh.shard_params), dtype=str(config.model.dtype),
             remat=bool(config.model.remat), model=str(config.model.get("preset", "")), **facts,
             lower_s=t1 - t0, compile_s=t2 - t1, backend=mesh.devices.flat[0].platform,
             device_kind=mesh.devices.flat[0].device_kind, **_memory(compiled),
             **{f"{k}_per_device": v for k, v in _cost(compiled).items()})
  row["flops_per_step_total"] = row["flops_per_device"] * devices
  budget = float(config.compile.device_memory_gib) * GIB
  row["fits"] = bool(row.get("peak_bytes", math.inf) <= budget)
  return row


def _device_counts(compile_cfg: ml_collections.ConfigDict) -> list[int]:
  n = compile_cfg.num_devices
  counts = [int(n)] if isinstance(n, int) else [int(x) for x in n]
  if not counts or min(counts) < 1:
    raise ValueError(f"config.compile.num_devices must be a positive count or a list of them, got {n!r}")
  return counts


def _check_programs(compile_cfg: ml_collections.ConfigDict) -> None:
  for program in compile_cfg.programs:
    if program not in PROGRAMS:
      raise ValueError(f"config.compile.programs: unknown program {program!r}; expected some of {list(PROGRAMS)}")


def _variants(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
  names = [str(v) for v in config.compile.variants]
  if not names:
    return [("", config)]
  out = []
  for name in names:
    if name not in VARIANTS:
      raise ValueError(f"config.compile.variants: unknown variant {name!r}; expected some of {list(VARIANTS)}")
    c = copy.deepcopy(config)
    c.model.update(VARIANTS[name])
    out.append((name, c))
  return out


def target_devices(compile_cfg: ml_collections.ConfigDict) -> list:
  """The devices to compile for: this backend's, or the compile-only devices of `config.compile.target`."""
  target = str(compile_cfg.get("target", "") or "")
  if not target:
    return list(jax.devices())
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(target, platform="tpu").devices)
  except Exception as e:  # libtpu missing, or a name it does not know
    raise ValueError(f"config.compile.target={target!r}: cannot describe this TPU topology ({e}); expected a name "
                     "such as 'v5p:2x2x1' or 'v5e:2x2', with libtpu installed (pip install 'jax[tpu]')") from e


def compile_all(config: ml_collections.ConfigDict, workdir: str | None = None) -> list[dict[str, Any]]:
  """Every (device count, variant, program) row, compiled in this process (it needs the devices). Each row
  is printed as it is done and, with `workdir`, the report so far is rewritten there (a long sweep keeps
  what it finished)."""
  counts = _device_counts(config.compile)
  _check_programs(config.compile)
  variants = _variants(config)
  devices = target_devices(config.compile)
  if max(counts) > len(devices):
    raise ValueError(f"config.compile.num_devices asks for {max(counts)} devices; the target has {len(devices)}")
  rows = []
  for n in counts:
    mesh = mesh_lib.make_mesh(config.mesh, devices=devices[:n])
    for _, cfg in variants:
      for program in config.compile.programs:
        row = compile_program(cfg, str(program), mesh)
        print(format_table([row], header=not rows), flush=True)
        rows.append(row)
        if workdir is not None:
          _write_report(workdir, rows)
  return rows


def _gib(x) -> str:
  return "-" if x is None else f"{x / GIB:.2f}"


def format_table(rows: Sequence[dict[str, Any]], header: bool = True) -> str:
  """A Markdown table of the report rows (memory per device in GiB, FLOPs per step)."""
  cols = ("program", "dev", "mesh", "dtype", "remat", "batch (per dev)", "shape", "args GiB", "temp GiB",
          "out-alias GiB", "peak GiB/dev", "fits", "TFLOP/step/dev", "compile s")
  lines = []
  if header:
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
  for r in rows:
    mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items()) + ("+fsdp-params" if r["shard_params"] else "")
    vals = (r["program"], r["devices"], mesh, "bf16" if r["dtype"] == "bfloat16" else "f32",
            "yes" if r["remat"] else "no", f"{r['global_batch']} ({r['per_device_batch']})",
            "x".join(str(s) for s in r["image_shape"]), _gib(r.get("argument_bytes")), _gib(r.get("temp_bytes")),
            _gib(r.get("output_bytes", 0) - r.get("alias_bytes", 0)), _gib(r.get("peak_bytes")),
            "yes" if r["fits"] else "NO", f"{r['flops_per_device'] / 1e12:.3f}", f"{r['compile_s']:.1f}")
    lines.append("| " + " | ".join(str(v) for v in vals) + " |")
  return "\n".join(lines)


def _run_in_child(config: ml_collections.ConfigDict, workdir: str, num_devices: int) -> list[dict[str, Any]]:
  """Runs the job in a fresh CPU process with `num_devices` simulated devices; returns its rows."""
  config_file = os.path.join(workdir, "compile_config.json")
  io_utils.atomic_write_json(config_file, config_to_dict(config))
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={num_devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "invcoss_jax.jobs.compile", config_file, workdir]
  proc = subprocess.run(cmd, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"the compile job's child process ({' '.join(cmd)}) failed with exit status "
                       f"{proc.returncode}; its output above names the error")
  with open(os.path.join(workdir, REPORT_FILE)) as f:
    return json.load(f)["rows"]


def _write_report(workdir: str, rows: list[dict[str, Any]]) -> str:
  path = os.path.join(workdir, REPORT_FILE)
  io_utils.atomic_write_json(path, dict(rows=rows, table=format_table(rows)))
  return path


def with_compile_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose `compile` section is `compile_config()` updated by the given one (so a config
  built before the section existed still works); unknown fields raise."""
  out = copy.deepcopy(config)
  section = compile_config()
  given = config.get("compile")
  for k, v in (dict(given) if given is not None else {}).items():
    if k not in section:
      raise ValueError(f"config.compile.{k} is not an option of the compile job; expected some of {sorted(section)}")
    section[k] = tuple(v) if isinstance(v, list) else v
  with out.unlocked():
    out.compile = section
  return out


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The `compile` job: compiles every program for every device count and variant, prints the table, writes
  `workdir/compile_report.json` and returns its rows (one dict per program, device count and variant)."""
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config = with_compile_defaults(config)
  needed = max(_device_counts(config.compile))
  _check_programs(config.compile)
  _variants(config)  # checks the names before any compilation
  available = len(jax.devices())
  if needed > available and not config.compile.target:
    if jax.default_backend() != "cpu":
      raise ValueError(f"config.compile.num_devices asks for {needed} devices but this {jax.default_backend()} "
                       f"host has {available}; compile for at most {available} here, or plan larger meshes on "
                       f"CPU (JAX_PLATFORMS=cpu), where the job simulates the devices")
    rows = _run_in_child(config, workdir, needed)
  else:
    rows = compile_all(config, workdir)
  print(format_table(rows), flush=True)
  return rows


def _child_main(argv: Sequence[str]) -> None:
  """`python -m invcoss_jax.jobs.compile CONFIG_JSON WORKDIR` (what `run` starts in a child process)."""
  if len(argv) != 3:
    raise SystemExit(f"usage: python -m invcoss_jax.jobs.compile CONFIG_JSON WORKDIR, got {argv[1:]}")
  with open(argv[1]) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config = with_compile_defaults(config)
  compile_all(config, argv[2])


if __name__ == "__main__":
  _child_main(sys.argv)
