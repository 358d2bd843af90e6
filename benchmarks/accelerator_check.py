r"""The accelerator check: one run, inside a time budget, that writes one JSON to commit (issue 24 item 4).

  python benchmarks/accelerator_check.py                      # all sections, 420 s budget
  bash benchmarks/accelerator_check.sh --budget=420           # on the GPU machine (wheels, data, shim; README)
  python benchmarks/accelerator_check.py --budget=240 --out=benchmarks/results/accelerator_check_cpu.json

Sections, in order; each runs only if the budget has at least its `--min_seconds` left (else it is recorded as
skipped, with the reason); the tests and the bench cases leave the later sections their `--min_seconds`, and a
child process never runs past the budget, so the run ends at most one in-process piece of work (a bench case, an
attention shape) after the budget:

  facts      devices, platform, device kind and memory, versions, XLA/JAX/CUDA variables, nvidia-smi, which of the
             package's dependencies import;
  tests      the pytest subset that touches sharding and compiled steps (junit XML: counts and each test's own
             seconds). Pass `cpu4`: on 4 simulated CPU devices (the tests' conftest), everywhere. Pass `device`
             (GPU/TPU only, at the same time as `cpu4`): the single-device compiled-step tests on the accelerator;
  bench      benchmarks/bench.py's own measure_case for MAE pre-training and 2D inversion in bf16 and f32
             (images/s, MFU against the matmul peak measured in the same dtype, compile seconds, memory).
             GPU/TPU: ViT-B/16 at 224, pre-training batch 256, inversion batch 64; CPU: the micro ViT at 32x32
             (the machinery only; CPU ViT-B figures are benchmarks/results/cpu_base_2d*.json);
  attention  jax.nn.dot_product_attention with implementation None, 'xla' and (GPU) 'cudnn' against the models'
             own attention (flax.linen.dot_product_attention, which nn.MultiHeadDotProductAttention calls) at
             ViT-B shapes in bf16: forward and forward+backward seconds, TFLOP/s, difference to the model's output,
             whether the compiled program holds a cuDNN fused-attention call (the model's Block too);
  retention  configs/retention.py:quick with a ViT-S trunk (width 384, depth 12, 6 heads; decoder 256/4/8), one
             seed, seqssl and invcoss, `--retention_steps` per stage: wall time, the figures it logs and its
             retention.json. CPU: the `tiny` preset (embedded demo data) instead, only the machinery.

The JSON is rewritten (atomically) after every section, so a run stopped from outside keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import glob
import importlib.util
import json
import os
import platform as platform_lib
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHIM_DIR = os.path.join(HERE, "accelerator_shim")
CARRY_DIR = os.path.join(REPO, "workdirs", "accelerator_carry")  # benchmarks/accelerator_prep.sh fills it
sys.path.insert(0, HERE)  # bench, the shim
sys.path.insert(0, REPO)  # the checkout's package

SECTIONS = ("facts", "tests", "bench", "attention", "retention")

# The tests that touch sharding and compiled steps. cpu4: the conftest's 4 simulated CPU devices (about 55 s on a
# 2-core CPU); device: compiled-step tests that run on one accelerator device (test_train_step asks for 4).
CPU4_TESTS = ("tests/test_parallel_mesh.py", "tests/test_scale_mesh.py", "tests/test_scale_compile.py",
              "tests/test_train_blocks.py", "tests/test_eval_finetune_layout.py", "tests/test_train_step.py")
CONFTEST_XLA_FLAGS = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
DEVICE_TESTS = ("tests/test_train_blocks.py", "tests/test_continual_step.py", "tests/test_scale_bench.py")

# Per-platform defaults ('gpu' also stands for TPUs): sizes for one 80-141 GB device, and tiny ones for a CPU.
DEFAULTS = {
    "gpu": dict(bench_model="base", bench_image_size=224, bench_batch_pretrain=256, bench_batch_invert=64,
                bench_invunet_channels="", bench_pool_size=256, bench_steps=10, bench_rounds=3, bench_warmup=3,
                matmul_size=8192, attn_batch=256, attn_reps=20, retention_preset="quick", retention_steps=300,
                tests_timeout=120.0,
                min_seconds=dict(tests=40.0, bench=60.0, attention=10.0, retention=60.0)),
    "cpu": dict(bench_model="micro", bench_image_size=32, bench_batch_pretrain=8, bench_batch_invert=4,
                bench_invunet_channels="8,16,32", bench_pool_size=8, bench_steps=2, bench_rounds=2,
                bench_warmup=1, matmul_size=256, attn_batch=2, attn_reps=3, retention_preset="tiny",
                retention_steps=0, tests_timeout=120.0,
                min_seconds=dict(tests=60.0, bench=15.0, attention=5.0, retention=70.0)),
}
# The larger model of the retention section (ViT-S, the patch of configs/retention.py's micro ViT: 8x8 at 32x32).
VIT_S = dict(width=384, depth=12, num_heads=6, decoder_width=256, decoder_depth=4, decoder_heads=8)
# Dense bf16 datasheet peaks (FLOP/s, no sparsity), for a second MFU figure beside the measured peak's.
DATASHEET_BF16 = {"H100": 989.4e12, "H200": 989.4e12}
TARGET_MFU = 0.5  # ViT-B MAE pre-training in bf16 on an H100/H200 (issue 24)


class Budget:
  def __init__(self, seconds: float):
    self.total, self.start = float(seconds), time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def remaining(self) -> float:
    return self.total - self.elapsed()


# ----------------------------------------------------------------------------------------------------------
# Helpers


def platform_key(backend: str) -> str:
  return "cpu" if backend == "cpu" else "gpu"


def git_commit() -> dict[str, Any]:
  """The checkout's commit; on the GPU machine (no .git there) the one benchmarks/accelerator_prep.sh recorded."""
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    if head.returncode == 0:
      dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
      return dict(commit=head.stdout.strip(), source="git",
                  modified_tracked_files=len(dirty.stdout.splitlines()) if dirty.returncode == 0 else None)
  except (OSError, subprocess.SubprocessError):
    pass
  recorded = os.path.join(CARRY_DIR, "git_commit.json")
  if os.path.isfile(recorded):
    with open(recorded) as f:
      return dict(json.load(f), source=os.path.relpath(recorded, REPO))
  return dict(commit="unknown", source="none")


def child_env(platforms: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of a child process: the checkout's package importable, clu's TensorFlow-free writer where
  TensorFlow is missing (accelerator_shim), and no GPU memory preallocated (this process already holds some)."""
  shim = load_shim()
  env = dict(os.environ)
  paths = [REPO] + ([SHIM_DIR] if shim.needed() else [])
  env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  env["PYTHONUNBUFFERED"] = "1"
  if platforms is not None:
    env["JAX_PLATFORMS"] = platforms
  env.update(extra or {})
  return env


def tail(text: str, n: int = 3000) -> str:
  return text if len(text) <= n else "..." + text[-n:]


def run_child(cmd: list[str], env: dict[str, str], timeout: float, log_path: str) -> dict[str, Any]:
  """Runs `cmd` in the checkout with its output in `log_path`; stops it (its process group) after `timeout`."""
  t = time.perf_counter()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = False
    try:
      proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
      timed_out = True
      os.killpg(proc.pid, 9)
      proc.wait()
  with open(log_path, errors="replace") as f:
    out = f.read()
  return dict(command=" ".join(shlex.quote(c) for c in cmd), returncode=proc.returncode, timed_out=timed_out,
              timeout_s=round(timeout, 1), seconds=time.perf_counter() - t, output=out)


def load_shim():
  """benchmarks/accelerator_shim/sitecustomize.py under the name accelerator_shim_loader (not as sitecustomize)."""
  if "accelerator_shim_loader" not in sys.modules:
    spec = importlib.util.spec_from_file_location("accelerator_shim_loader",
                                                  os.path.join(SHIM_DIR, "sitecustomize.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["accelerator_shim_loader"] = mod
  return sys.modules["accelerator_shim_loader"]


# ----------------------------------------------------------------------------------------------------------
# Sections


def _safe(fn: Callable[[], Any]) -> Any:
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except  (a fact this jax version does not offer)
    return f"unavailable: {type(e).__name__}: {e}"[:300]


def section_facts(args, budget: Budget, ctx: dict[str, Any]) -> dict[str, Any]:
  import jax
  import jaxlib
  devices = jax.devices()
  d0 = devices[0]
  mem = None
  try:
    mem = d0.memory_stats()
  except Exception:  # pylint: disable=broad-except  (CPU devices have none)
    mem = None
  versions = {}
  for name in ("flax", "optax", "orbax.checkpoint", "numpy", "scipy", "ml_collections", "grain", "clu",
               "jax_privacy", "torch"):
    try:
      mod = __import__(name, fromlist=["__version__"])
      versions[name] = str(getattr(mod, "__version__", "?"))
    except Exception as e:  # pylint: disable=broad-except
      versions[name] = f"not importable: {type(e).__name__}: {e}"[:300]
  deps = {m: importlib.util.find_spec(m) is not None
          for m in ("ml_collections", "grain", "clu", "jax_privacy", "dp_accounting", "tensorflow", "torch",
                    "tokenizers", "nibabel", "pydicom", "xdist")}
  smi = None
  if d0.platform == "gpu":
    try:
      r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,"
                          "clocks.max.sm,power.limit,temperature.gpu", "--format=csv"],
                         capture_output=True, text=True, timeout=20)
      smi = (r.stdout or r.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
      smi = f"{type(e).__name__}: {e}"
  env = {k: v for k, v in sorted(os.environ.items())
         if k.startswith(("XLA_", "JAX_", "CUDA_", "NVIDIA_", "TF_", "NCCL_", "LIBTPU", "TPU_"))}
  import bench
  cpu = bench.cpu_model()
  return dict(
      devices=[str(d) for d in devices], num_devices=len(devices), platform=d0.platform,
      backend=jax.default_backend(), device_kind=d0.device_kind,
      platform_version=_safe(lambda: str(d0.client.platform_version)),
      memory_stats=({k: v for k, v in mem.items() if isinstance(v, (int, float))} if mem else None),
      jax=jax.__version__, jaxlib=jaxlib.__version__, versions=versions, python=sys.version.split()[0],
      python_executable=sys.executable,
      default_matmul_precision=_safe(lambda: str(jax.config.jax_default_matmul_precision)),
      environment=env, nvidia_smi=smi, dependencies_found=deps, clu_writer_shim=ctx["shim_installed"],
      host=platform_lib.node(), cpu=cpu, cpu_count=os.cpu_count(), loadavg=list(os.getloadavg()))


def parse_junit(path: str) -> dict[str, Any]:
  root = ET.parse(path).getroot()
  cases = []
  for tc in root.iter("testcase"):
    outcome, message = "passed", ""
    for tag in ("failure", "error", "skipped"):
      el = tc.find(tag)
      if el is not None:
        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
        message = (el.get("message") or el.text or "")[:500]
        break
    cases.append(dict(test=f"{tc.get('classname', '')}::{tc.get('name', '')}", outcome=outcome,
                      seconds=round(float(tc.get("time") or 0.0), 3), **({"message": message} if message else {})))
  counts = {k: sum(1 for c in cases if c["outcome"] == k) for k in ("passed", "failed", "error", "skipped")}
  cases.sort(key=lambda c: -c["seconds"])
  return dict(counts=counts, tests=cases)


def section_tests(args, budget: Budget, ctx: dict[str, Any]) -> dict[str, Any]:
  plat = ctx["platform_key"]
  timeout = min(float(args.tests_timeout),
                max(budget.remaining() - ctx["reserve"]("tests"), float(args.min_seconds["tests"])))
  tmp = tempfile.mkdtemp(prefix="accelerator_check_tests_")
  passes = {"cpu4": (list(args.test_files.split(",")), "cpu")}
  if plat != "cpu":
    passes["device"] = (list(args.device_test_files.split(",")), ctx["facts"]["platform"])
  procs = {}
  for name, (files, platforms) in passes.items():
    xml = os.path.join(tmp, f"{name}.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", f"--junitxml={xml}", *files]
    if name == "cpu4" and plat != "cpu" and (os.cpu_count() or 1) >= 8 and importlib.util.find_spec("xdist"):
      cmd[3:3] = ["-n", "4"]  # the accelerator host's CPU cores while the device pass runs
    # cpu4: the conftest's own XLA flags (4 simulated devices), whatever this process was given.
    extra = {"XLA_FLAGS": CONFTEST_XLA_FLAGS} if name == "cpu4" else {}
    procs[name] = (cmd, child_env(platforms, extra), xml)
  # The passes run at the same time (one on CPU cores, one on the device); each is stopped at `timeout`.
  import concurrent.futures as cf
  with cf.ThreadPoolExecutor(len(procs)) as pool:
    futures = {name: pool.submit(run_child, cmd, env, timeout, os.path.join(tmp, f"{name}.log"))
               for name, (cmd, env, xml) in procs.items()}
    results = {name: f.result() for name, f in futures.items()}
  out = {}
  for name, res in results.items():
    xml = procs[name][2]
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?) in [\d.]+s.*$", res["output"], re.M)
    entry = dict(command=res["command"], returncode=res["returncode"], timed_out=res["timed_out"],
                 seconds=round(res["seconds"], 1), jax_platforms=procs[name][1].get("JAX_PLATFORMS"),
                 pytest_summary=summary[-1] if summary else None)
    if os.path.isfile(xml):
      entry.update(parse_junit(xml))
    if res["returncode"] != 0 or not os.path.isfile(xml):
      entry["output_tail"] = tail(res["output"])
    out[name] = entry
  shutil.rmtree(tmp, ignore_errors=True)  # the logs and XML files: what matters of them is in `out`
  ok = all(e["returncode"] == 0 for e in out.values())
  return dict(passes=out, timeout_s=round(timeout, 1), status="ok" if ok else "failed")


def bench_args(args, program: str, dtype: str):
  import bench
  argv = [f"--models={args.bench_model}", "--dims=2d", f"--programs={program}",
          f"--image_size={args.bench_image_size}", f"--batch_pretrain_2d={args.bench_batch_pretrain}",
          f"--batch_invert_2d={args.bench_batch_invert}", f"--pool_size={args.bench_pool_size}",
          f"--dtype={dtype}", f"--peak_dtype={dtype}", f"--steps={args.bench_steps}",
          f"--rounds={args.bench_rounds}", f"--warmup={args.bench_warmup}", f"--matmul_size={args.matmul_size}"]
  if args.bench_invunet_channels:
    argv.append(f"--invunet_channels={args.bench_invunet_channels}")
  return bench.parse_args(argv)


def datasheet_peak(device_kind: str) -> float | None:
  for name, peak in DATASHEET_BF16.items():
    if name in device_kind:
      return peak
  return None


def section_bench(args, budget: Budget, ctx: dict[str, Any]) -> dict[str, Any]:
  import bench
  cases = [tuple(c.split(":")) for c in args.bench_cases.split(",") if c]
  start_peaks: dict[str, list[float]] = {}
  rows, skipped, errors = [], [], []
  estimate = float(args.min_seconds["bench"])
  sheet = datasheet_peak(ctx["facts"]["device_kind"]) if ctx["platform_key"] != "cpu" else None
  reserve = ctx["reserve"]("bench")
  for program, dtype in cases:
    left = budget.remaining() - reserve
    if left < estimate:
      skipped.append(dict(program=program, dtype=dtype,
                          reason=f"budget: {left:.0f} s left after the later sections' least ({reserve:.0f} s), "
                                 f"a case needs about {estimate:.0f} s"))
      continue
    t = time.perf_counter()
    try:
      bargs = bench_args(args, program, dtype)
      if dtype not in start_peaks:
        start_peaks[dtype] = [bench.jax_matmul_peak(bargs.matmul_size, 5, dtype)]
      case = bench.cases(bargs)[0]
      row = bench.measure_case(case, bargs, start_peaks[dtype])
      row["case_seconds"] = time.perf_counter() - t
      row["jax_step_s_median"] = statistics.median(row["jax_step_s"])
      if sheet and dtype == "bfloat16":
        row["datasheet_peak_flops"] = sheet
        row["jax_mfu_vs_datasheet"] = row["flops_per_step"] / row["jax_step_s_median"] / sheet
      rows.append(row)
      print(f"  bench {program} {dtype}: {row['jax_images_per_s']:.2f} img/s, MFU {row['jax_mfu']:.1%} "
            f"(peak {row['mfu_peak_flops'] / 1e12:.2f} TFLOP/s), compile {row['compile_s']:.1f} s", flush=True)
    except Exception as e:  # pylint: disable=broad-except  (out of memory, a missing kernel: the next case runs)
      errors.append(dict(program=program, dtype=dtype, error=f"{type(e).__name__}: {e}"[:2000],
                         traceback=tail(traceback.format_exc(), 4000), seconds=time.perf_counter() - t))
      print(f"  bench {program} {dtype}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    estimate = max(estimate, time.perf_counter() - t)
    gc.collect()
  target = None
  if ctx["platform_key"] != "cpu":
    pre = [r for r in rows if r["program"] == "pretrain" and r["dtype"] == "bfloat16"]
    target = dict(what=f"ViT-B MAE pre-training, bf16, MFU >= {TARGET_MFU:.0%} of the measured bf16 matmul peak",
                  mfu=pre[0]["jax_mfu"] if pre else None,
                  met=(pre[0]["jax_mfu"] >= TARGET_MFU) if pre else None,
                  applies=any(n in ctx["facts"]["device_kind"] for n in ("H100", "H200")))
  if rows:
    status = "partial" if errors or skipped else "ok"
  else:
    status = "failed" if errors else "skipped"
  return dict(status=status, model=args.bench_model, image_size=args.bench_image_size,
              start_peak_flops=start_peaks, rows=rows, skipped_cases=skipped, errors=errors, target=target,
              memory_note="device rows: the process's peak bytes in use since it started (cumulative over the "
                          "cases, in the order run); CPU rows: XLA's plan of the compiled step")


def _time_fn(fn, inputs, reps: int) -> tuple[float, float]:
  """(median seconds, compile seconds) of jitted `fn(*inputs)` over `reps` calls after the first."""
  import jax
  t = time.perf_counter()
  jax.block_until_ready(fn(*inputs))
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    times.append(time.perf_counter() - t)
  return statistics.median(times), compile_s


def _has_cudnn_attention(compiled_text: str) -> bool:
  return bool(re.search(r"cudnn\$fmha|__cudnn\$fmha|cudnn.*fmha|fmha.*cudnn", compiled_text, re.I))


def section_attention(args, budget: Budget, ctx: dict[str, Any]) -> dict[str, Any]:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  on_gpu = ctx["facts"]["platform"] == "gpu"
  impls: dict[str, Callable] = {
      "model: flax.linen.dot_product_attention": lambda q, k, v: nn.dot_product_attention(q, k, v,
                                                                                          dtype=jnp.bfloat16),
      "jax.nn.dot_product_attention(implementation=None)": lambda q, k, v: jax.nn.dot_product_attention(q, k, v),
      "jax.nn.dot_product_attention(implementation='xla')":
          lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
      "jax.nn.dot_product_attention(implementation='cudnn')":
          lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),
  }
  shapes = [tuple(int(x) for x in s.split("x")) for s in args.attn_shapes.split(",")]
  results = []
  for tokens, heads, head_dim in shapes:
    if budget.remaining() <= 0:
      results.append(dict(shape=[args.attn_batch, tokens, heads, head_dim], skipped="budget spent"))
      continue
    b = int(args.attn_batch)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (b, tokens, heads, head_dim), jnp.float32).astype(jnp.bfloat16)
               for kk in keys)
    fwd_flops = 4.0 * b * heads * tokens * tokens * head_dim  # QK^T and PV
    reference = None
    rows = {}
    for name, f in impls.items():
      if "cudnn" in name and not on_gpu:
        rows[name] = dict(status="skipped", reason="needs a GPU (cuDNN)")
        continue
      try:
        fwd = jax.jit(f)
        loss = lambda q_, k_, v_, f=f: jnp.sum(f(q_, k_, v_).astype(jnp.float32))
        fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        fwd_s, fwd_compile = _time_fn(fwd, (q, k, v), int(args.attn_reps))
        bwd_s, bwd_compile = _time_fn(fwd_bwd, (q, k, v), int(args.attn_reps))
        out = np.asarray(fwd(q, k, v), np.float32)
        if name.startswith("model"):
          reference = out
        text = fwd_bwd.lower(q, k, v).compile().as_text() or ""
        rows[name] = dict(status="ok", forward_s=fwd_s, forward_backward_s=bwd_s,
                          forward_tflops=fwd_flops / fwd_s / 1e12,
                          forward_backward_tflops=3 * fwd_flops / bwd_s / 1e12,
                          compile_s=fwd_compile + bwd_compile,
                          max_abs_diff_to_model=(None if reference is None else
                                                 float(np.max(np.abs(out - reference)))),
                          cudnn_fused_attention_in_program=_has_cudnn_attention(text))
      except Exception as e:  # pylint: disable=broad-except  (cuDNN absent or shape unsupported: say why)
        rows[name] = dict(status="error", error=f"{type(e).__name__}: {e}"[:2000])
    model_key = "model: flax.linen.dot_product_attention"
    if rows.get(model_key, {}).get("status") == "ok":
      for r in rows.values():
        if r.get("status") == "ok":
          r["forward_backward_speedup_vs_model"] = rows[model_key]["forward_backward_s"] / r["forward_backward_s"]
    results.append(dict(shape=[b, tokens, heads, head_dim], layout="(batch, tokens, heads, head_dim)",
                        dtype="bfloat16", forward_flops=fwd_flops, implementations=rows))
  # Does the model's own block compile to a cuDNN fused attention? (XLA may rewrite the einsum-softmax-einsum.)
  block_fmha = None
  try:
    from invcoss_jax.models.vit_mae import Block
    tokens, heads, head_dim = shapes[0]
    blk = Block(num_heads=heads, dtype=jnp.bfloat16)
    x = jnp.zeros((2, tokens, heads * head_dim), jnp.float32)
    params = blk.init(jax.random.PRNGKey(0), x)
    grad = jax.jit(jax.grad(lambda p, x_: jnp.sum(blk.apply(p, x_).astype(jnp.float32))))
    block_fmha = _has_cudnn_attention(grad.lower(params, x).compile().as_text() or "")
  except Exception as e:  # pylint: disable=broad-except
    block_fmha = f"{type(e).__name__}: {e}"[:500]
  return dict(
      results=results, repetitions=int(args.attn_reps),
      model_attention="invcoss_jax/models/vit_mae.py Block: flax.linen.MultiHeadDotProductAttention with its "
                      "default attention_fn, flax.linen.dot_product_attention (einsum QK^T, softmax in f32, "
                      "einsum PV, compiled by XLA); no jax.nn.dot_product_attention or cuDNN call is asked for",
      model_block_uses_cudnn_fused_attention=block_fmha)


def _retention_figures(log: str, workdir: str) -> dict[str, Any]:
  figures = dict(
      units_done=re.findall(r"retention \[\d+/\d+\] (.*? done in \d+ s)", log),
      measured=re.findall(r"retention: (seed \d+ \S+ \S+ measured: \{.*?\})", log),
      stage_steps=re.findall(r"\] (stage_\S+: \d+ steps \(.*?\)), mesh", log),
      steps_per_sec=[float(x) for x in re.findall(r"train/steps_per_sec=([\d.eE+-]+)", log)])
  path = os.path.join(workdir, "retention.json")
  if os.path.isfile(path):
    with open(path) as f:
      text = f.read()
    try:
      figures["retention_json"] = json.loads(text)
    except json.JSONDecodeError:  # NaN and Infinity are valid for Python's json; anything else: keep the text
      figures["retention_json_text"] = tail(text, 20000)
  return figures


def retention_command(args, ctx: dict[str, Any], workdir: str) -> list[str]:
  preset = args.retention_preset
  cmd = [sys.executable, "-m", "invcoss_jax.main", f"--config=configs/retention.py:{preset}", f"--workdir={workdir}",
         "--config.retention.methods=('seqssl','invcoss')", "--config.retention.seeds=(0,)"]
  if preset != "tiny":
    steps = int(args.retention_steps)
    cmd += [f"--config.total_steps={steps}", f"--config.logging.log_every_steps={max(1, steps // 2)}",
            f"--config.checkpoint.every_steps={steps}"]
    if args.retention_model == "vit_s":
      cmd += [f"--config.model.{k}={v}" for k, v in VIT_S.items()]
  cmd += [f for f in args.retention_flags.split() if f]
  return cmd


def section_retention(args, budget: Budget, ctx: dict[str, Any]) -> dict[str, Any]:
  if args.retention_preset == "quick":
    from invcoss_jax.defaults import shared_data_dir
    root = shared_data_dir()
    need = [os.path.join(root, "xray", "pneumoniamnist.npz"), os.path.join(root, "pathology", "he_tiles_64px.npz")]
    missing = [p for p in need if not os.path.isfile(p)]
    if missing:
      return dict(status="skipped", reason=f"the quick preset's data is absent: {missing} (set "
                                           "$INVCOSS_SHARED_DATA; benchmarks/accelerator_prep.sh copies it)")
  workdir = args.retention_workdir or tempfile.mkdtemp(prefix="accelerator_check_retention_")
  cmd = retention_command(args, ctx, workdir)
  timeout = budget.remaining()
  res = run_child(cmd, child_env(), timeout, os.path.join(workdir, "retention_check.log"))
  figures = _retention_figures(res["output"], workdir)
  if not args.retention_workdir:  # checkpoints of a throwaway run (the figures are in the JSON)
    shutil.rmtree(workdir, ignore_errors=True)
  status = "ok" if res["returncode"] == 0 else ("timed out" if res["timed_out"] else "failed")
  return dict(status=status, preset=args.retention_preset,
              model=(VIT_S if args.retention_preset != "tiny" and args.retention_model == "vit_s" else
                     "the preset's own"),
              steps_per_stage=int(args.retention_steps) if args.retention_preset != "tiny" else "the preset's",
              command=res["command"], wall_s=res["seconds"], returncode=res["returncode"],
              timed_out=res["timed_out"], timeout_s=res["timeout_s"], workdir=workdir, figures=figures,
              **({"output_tail": tail(res["output"])} if res["returncode"] != 0 else {}))


SECTION_FNS = dict(facts=section_facts, tests=section_tests, bench=section_bench, attention=section_attention,
                   retention=section_retention)


# ----------------------------------------------------------------------------------------------------------
# The run


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole check")
  p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
  p.add_argument("--out", default="", help="JSON path (default $OUT/accelerator_check.json where $OUT is set, "
                                           "else benchmarks/results/accelerator_check_<platform>.json)")
  p.add_argument("--min_seconds", default="", help="section:seconds,... the least budget left to start a section "
                                                   "(defaults by platform)")
  p.add_argument("--test_files", default=",".join(CPU4_TESTS))
  p.add_argument("--device_test_files", default=",".join(DEVICE_TESTS))
  p.add_argument("--bench_cases", default="pretrain:bfloat16,invert:bfloat16,pretrain:float32,invert:float32",
                 help="program:dtype,... in the order run (bf16 pre-training first: it carries the target)")
  p.add_argument("--attn_shapes", default="197x12x64,50x12x64,197x16x32",
                 help="tokens x heads x head_dim: ViT-B's 197 tokens, MAE's visible 50, the decoder's 16 heads")
  p.add_argument("--retention_model", default="vit_s", choices=("vit_s", "preset"))
  p.add_argument("--retention_flags", default="", help="more --config.* flags for the retention run")
  p.add_argument("--retention_workdir", default="")
  for name, kind in (("bench_model", str), ("bench_image_size", int), ("bench_batch_pretrain", int),
                     ("bench_batch_invert", int), ("bench_invunet_channels", str), ("bench_pool_size", int),
                     ("bench_steps", int), ("bench_rounds", int), ("bench_warmup", int), ("matmul_size", int),
                     ("attn_batch", int), ("attn_reps", int), ("retention_preset", str), ("retention_steps", int),
                     ("tests_timeout", float)):
    p.add_argument(f"--{name}", type=kind, default=None, help="default by platform: " + ", ".join(
        f"{k} {DEFAULTS[k][name]!r}" for k in DEFAULTS))
  args = p.parse_args(argv)
  unknown = set(args.sections.split(",")) - set(SECTIONS)
  if unknown:
    p.error(f"--sections: unknown {sorted(unknown)}; expected some of {SECTIONS}")
  return args


def fill_defaults(args, plat: str) -> None:
  for name, value in DEFAULTS[plat].items():
    if name == "min_seconds":
      given = dict(kv.split(":") for kv in args.min_seconds.split(",") if kv) if args.min_seconds else {}
      args.min_seconds = dict(value, **{k: float(v) for k, v in given.items()})
    elif getattr(args, name) is None:
      setattr(args, name, value)


def default_out(plat: str) -> str:
  if os.environ.get("OUT"):
    return os.path.join(os.environ["OUT"], "accelerator_check.json")
  return os.path.join(HERE, "results", f"accelerator_check_{plat}.json")


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  budget = Budget(args.budget)
  selected = args.sections.split(",")
  shim = load_shim()
  ctx: dict[str, Any] = dict(shim_installed=shim.install())

  def reserve(name: str) -> float:
    """The least seconds of the selected sections after `name` that the budget can hold at all: a section
    running a loop (bench cases) or a child (tests) leaves them that much."""
    later = SECTIONS[SECTIONS.index(name) + 1:]
    mins = [float(args.min_seconds[s]) for s in later if s in selected]
    return sum(m for m in mins if m <= args.budget)

  ctx["reserve"] = reserve
  from invcoss_jax.io_utils import atomic_write_json
  result: dict[str, Any] = dict(
      command=" ".join(shlex.quote(a) for a in [sys.executable, os.path.relpath(__file__, os.getcwd())] +
                       list(sys.argv[1:] if argv is None else argv)),
      git=git_commit(), started=datetime.datetime.now().isoformat(timespec="seconds"), budget_s=args.budget,
      section_order=list(SECTIONS), sections={})
  out = args.out

  def write():
    result["elapsed_s"] = budget.elapsed()
    result["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    atomic_write_json(out, result)

  for name in SECTIONS:
    if name != "facts" and name not in selected:
      result["sections"][name] = dict(status="not selected", seconds=0.0)
      continue
    left = budget.remaining()
    need = 0.0 if name == "facts" else float(args.min_seconds[name])
    if name != "facts" and left < need:
      reason = f"budget: {max(left, 0.0):.0f} s of {args.budget:.0f} s left, the section needs at least {need:.0f} s"
      if name == "retention" and ctx["platform_key"] == "cpu":
        reason = f"CPU path: too slow for the budget ({reason})"
      result["sections"][name] = dict(status="skipped", seconds=0.0, reason=reason)
      print(f"[{name}] skipped: {result['sections'][name]['reason']}", flush=True)
    else:
      print(f"[{name}] starts, {left:.0f} s of the budget left", flush=True)
      t = time.perf_counter()
      try:
        data = SECTION_FNS[name](args, budget, ctx)
        status = data.pop("status", "ok")
      except Exception as e:  # pylint: disable=broad-except  (the next section still runs)
        data, status = dict(error=f"{type(e).__name__}: {e}"[:2000], traceback=tail(traceback.format_exc(), 6000)), \
            "error"
      data.update(status=status, seconds=time.perf_counter() - t)
      result["sections"][name] = data
      print(f"[{name}] {status} in {data['seconds']:.1f} s", flush=True)
    if name == "facts":  # the platform decides the sizes, the defaults and the output's name
      facts = result["sections"]["facts"]
      if facts["status"] != "ok":  # the rest still runs, on what jax itself says
        import jax
        d0 = jax.devices()[0]
        facts.update(backend=jax.default_backend(), platform=d0.platform, device_kind=d0.device_kind)
      ctx["facts"] = facts
      ctx["platform_key"] = platform_key(facts["backend"])
      fill_defaults(args, ctx["platform_key"])
      result["platform"] = ctx["platform_key"]
      result["settings"] = {k: v for k, v in vars(args).items()}
      out = out or default_out(ctx["platform_key"])
    write()
  result["summary"] = summarize(result)
  write()
  print(f"wrote {out} ({budget.elapsed():.0f} s)", flush=True)
  return result


def summarize(result: dict[str, Any]) -> dict[str, Any]:
  s = result["sections"]
  summary: dict[str, Any] = dict(sections={k: dict(status=v["status"], seconds=round(v.get("seconds", 0.0), 1))
                                           for k, v in s.items()},
                                 device=s["facts"].get("device_kind"), platform=result.get("platform"))
  if s.get("tests", {}).get("passes"):
    summary["tests"] = {k: v.get("counts", v.get("pytest_summary")) for k, v in s["tests"]["passes"].items()}
  if s.get("bench", {}).get("rows"):
    summary["bench"] = [dict(program=r["program"], dtype=r["dtype"], model=r["model"], batch=r["batch"],
                             images_per_s=round(r["jax_images_per_s"], 3), mfu=round(r["jax_mfu"], 4),
                             peak_tflops=round(r["mfu_peak_flops"] / 1e12, 3), compile_s=round(r["compile_s"], 1))
                        for r in s["bench"]["rows"]]
    summary["target"] = s["bench"].get("target")
  if s.get("attention", {}).get("results"):
    summary["attention_forward_backward_ms"] = {
        "x".join(map(str, r["shape"])): {k: (round(v["forward_backward_s"] * 1e3, 3) if v.get("status") == "ok"
                                             else v.get("status")) for k, v in r["implementations"].items()}
        for r in s["attention"]["results"] if "implementations" in r}
  if "wall_s" in s.get("retention", {}):
    summary["retention_wall_s"] = round(s["retention"]["wall_s"], 1)
  return summary


if __name__ == "__main__":
  main()
