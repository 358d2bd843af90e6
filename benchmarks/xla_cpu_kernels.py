"""Micro-benchmarks behind docs/performance.md 2c and 2d: which matrix products and convolutions XLA:CPU runs
fast, next to PyTorch on the same cores.

  python benchmarks/xla_cpu_kernels.py [--out=kernels.json]

Products at the ViT-B MLP's shape (8 images x 197 tokens = 1576 rows, 768 -> 3072) in the forms a training step
uses: forward `x @ w`, input gradient `g @ w.T`, weight gradient `x.T @ g`, with bf16 operands and a float32 or
bf16 result, and in float32. Convolutions at the 3D InvUNet's first level (4 x 16x192x192 x 16 channels, 3^3
kernel): XLA's 3D convolution, the same as a sum of three 2D convolutions over the depth taps, and PyTorch's
Conv3d. Each figure is the best of `--reps` timed calls after a warm-up call (GFLOP/s of the products counted).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's package

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from bench import best_seconds  # noqa: E402  (benchmarks/ is this script's directory)
from invcoss_jax.io_utils import atomic_write_json  # noqa: E402


def product_cases() -> dict[str, tuple[Callable, str]]:
  """name -> (f(x, w, g), dtype of the operands): the three products of a Dense layer's training step."""
  nn_ = (((1,), (0,)), ((), ()))
  nt = (((1,), (1,)), ((), ()))
  tn = (((0,), (0,)), ((), ()))
  f32 = jnp.float32
  return {
      "x @ w, bf16 -> f32": (lambda x, w, g: lax.dot_general(x, w, nn_, preferred_element_type=f32), "bfloat16"),
      "x @ w, bf16 -> bf16": (lambda x, w, g: lax.dot_general(x, w, nn_), "bfloat16"),
      "g @ w.T, bf16 -> f32": (lambda x, w, g: lax.dot_general(g, w, nt, preferred_element_type=f32), "bfloat16"),
      "x.T @ g, bf16 -> f32": (lambda x, w, g: lax.dot_general(x, g, tn, preferred_element_type=f32), "bfloat16"),
      "x @ w, f32": (lambda x, w, g: lax.dot_general(x, w, nn_), "float32"),
      "g @ w.T, f32": (lambda x, w, g: lax.dot_general(g, w, nt), "float32"),
      "x.T @ g, f32": (lambda x, w, g: lax.dot_general(x, g, tn), "float32"),
  }


def conv3d_native(x, k):
  return lax.conv_general_dilated(x, k, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def conv3d_as_depth_sum(x, k):
  """The same 'SAME' 3D convolution as three 2D convolutions, one per depth tap."""
  b, d, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
  out = 0.0
  for dz in range(3):
    plane = xp[:, dz:dz + d].reshape(b * d, h, w, c)
    out = out + lax.conv_general_dilated(plane, k[dz], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return out.reshape(b, d, h, w, k.shape[-1])


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=int, default=1576)
  p.add_argument("--width", type=int, default=768)
  p.add_argument("--hidden", type=int, default=3072)
  p.add_argument("--volume", default="4,16,192,192,16", help="B,D,H,W,C of the convolution's input")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  rows = []

  m, k, n = args.rows, args.width, args.hidden
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  base = dict(x=jax.random.normal(keys[0], (m, k)), w=jax.random.normal(keys[1], (k, n)),
              g=jax.random.normal(keys[2], (m, n)))
  flops = 2.0 * m * k * n
  for name, (fn, dtype) in product_cases().items():
    ops = [base[a].astype(dtype) for a in ("x", "w", "g")]
    fn = jax.jit(fn)
    s = best_seconds(lambda: fn(*ops), args.reps)
    rows.append(dict(kind="product", name=name, seconds=s, gflops=flops / s / 1e9))

  b, d, h, w, c = (int(v) for v in args.volume.split(","))
  x = jax.random.normal(keys[0], (b, d, h, w, c))
  kern = jax.random.normal(keys[1], (3, 3, 3, c, c)) * 0.1
  conv_flops = 2.0 * b * d * h * w * c * c * 27
  err = float(jnp.max(jnp.abs(conv3d_as_depth_sum(x, kern) - conv3d_native(x, kern))))
  for name, fn in (("XLA conv3d", conv3d_native), ("XLA 3 x conv2d (depth taps)", conv3d_as_depth_sum)):
    forward = jax.jit(fn)
    backward = jax.jit(jax.grad(lambda x, k: jnp.sum(fn(x, k) ** 2), argnums=(0, 1)))
    fwd = best_seconds(lambda: forward(x, kern), args.reps)
    both = best_seconds(lambda: backward(x, kern), args.reps)
    rows.append(dict(kind="conv3d", name=name, seconds=fwd, gflops=conv_flops / fwd / 1e9,
                     seconds_fwd_bwd=both, gflops_fwd_bwd=3 * conv_flops / both / 1e9))
  if args.torch:
    import torch
    tx = torch.randn(b, c, d, h, w, requires_grad=True)
    conv = torch.nn.Conv3d(c, c, 3, padding=1, bias=False)

    fwd = best_seconds(lambda: conv(tx), args.reps)
    both = best_seconds(lambda: (conv(tx) ** 2).sum().backward(), args.reps)
    rows.append(dict(kind="conv3d", name=f"PyTorch Conv3d ({torch.get_num_threads()} threads)", seconds=fwd,
                     gflops=conv_flops / fwd / 1e9, seconds_fwd_bwd=both, gflops_fwd_bwd=3 * conv_flops / both / 1e9))

  print(f"products ({m} x {k} x {n}), GFLOP/s:")
  for r in rows:
    if r["kind"] == "product":
      print(f"  {r['name']:24s} {r['gflops']:8.1f}")
  print(f"3D convolution ({args.volume}, 3^3 kernel; depth-sum max difference {err:.1e}), GFLOP/s forward / "
        "forward+backward:")
  for r in rows:
    if r["kind"] == "conv3d":
      print(f"  {r['name']:32s} {r['gflops']:7.1f} / {r['gflops_fwd_bwd']:7.1f}")
  result = dict(args=vars(args), jax=jax.__version__, conv3d_depth_sum_max_abs_diff=err, rows=rows)
  if args.out:
    atomic_write_json(args.out, result)
  return result


if __name__ == "__main__":
  main()
