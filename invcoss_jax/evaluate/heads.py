"""Downstream heads on ViT encoder tokens: a classifier and a UNETR-style decoder (2D and 3D).

Both take encoder tokens `(B, 1 + L, D)` with the CLS token first and the patch tokens in raster
order of the patch grid (no masking at fine-tuning time).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


class ClassificationHead(nn.Module):
  """LayerNorm + linear on the mean of the patch tokens (CLS excluded), as MedCoSS's `fc_norm` head.

  `mlp_dim > 0` inserts a hidden GELU layer (MedCoSS's RICORD head is LN + MLP).
  """
  num_classes: int
  mlp_dim: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
    x = jnp.mean(tokens[:, 1:].astype(jnp.float32), axis=1)
    x = nn.LayerNorm(epsilon=1e-6, name="fc_norm")(x)
    if self.mlp_dim:
      x = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="hidden")(x))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                      kernel_init=nn.initializers.truncated_normal(0.01))(x)
    return logits.astype(jnp.float32)


def _norm() -> nn.Module:
  # MONAI's "instance" norm: per-example, per-channel statistics, no affine parameters.
  return nn.InstanceNorm(epsilon=1e-5, use_scale=False, use_bias=False)


class ResBlock(nn.Module):
  """MONAI UnetResBlock: conv-norm-lrelu-conv-norm plus a 1x1 projection when channels change."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k = (3,) * (x.ndim - 2)
    y = nn.Conv(self.features, k, use_bias=False, dtype=self.dtype)(x)
    y = nn.leaky_relu(_norm()(y), 0.01)
    y = _norm()(nn.Conv(self.features, k, use_bias=False, dtype=self.dtype)(y))
    if x.shape[-1] != self.features:
      x = _norm()(nn.Conv(self.features, (1,) * (x.ndim - 2), use_bias=False, dtype=self.dtype)(x))
    return nn.leaky_relu(x + y, 0.01)


class UpSample(nn.Module):
  """Exact `factors`-fold upsampling by a transposed convolution with kernel = stride = `factors`.

  Such a convolution maps every input voxel to its own output block by one linear map, so it is
  computed as a Dense layer to prod(factors) x features channels followed by a depth-to-space
  reshape. It equals `nn.ConvTranspose(features, factors, strides=factors, padding='VALID')` with the
  kernel flipped along its spatial axes (tests check this) and is much faster than XLA's 3D
  transposed convolution on CPU.
  """
  features: int
  factors: tuple[int, ...]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    nd = x.ndim - 2
    factors = tuple(self.factors)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (*factors, x.shape[-1], self.features),
                        jnp.float32)
    # (B, *S, C) x (*f, C, F) -> (B, *S, *f, F) -> interleave each spatial axis with its factor.
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=[[x.ndim - 1], [nd]])
    b, spatial = x.shape[0], x.shape[1:-1]
    perm = [0] + [a for i in range(nd) for a in (1 + i, 1 + nd + i)] + [1 + 2 * nd]
    y = jnp.transpose(y, perm)
    return y.reshape(b, *(s * f for s, f in zip(spatial, factors)), self.features)


def upsampling_plan(patch_size: Sequence[int]) -> list[tuple[int, ...]]:
  """Per-stage upsampling factors from the patch grid to full resolution, finest stage first.

  Each stage doubles every axis that still has a factor left; an axis with a smaller patch is only
  upsampled in the finest stages. `len(plan)` is the number of decoder levels (4 for patch 16).
  """
  logs = []
  for p in patch_size:
    if p < 2 or p & (p - 1):
      raise ValueError(f"UNETR: patch size {tuple(patch_size)} must be powers of two >= 2 per axis")
    logs.append(int(math.log2(p)))
  return [tuple(2 if j < l else 1 for l in logs) for j in range(max(logs))]


def feature_blocks(depth: int, num_levels: int, blocks: Sequence[int] = ()) -> list[int]:
  """1-based encoder blocks feeding the decoder: `blocks` if given, else evenly spaced (3, 6, 9, 12
  for depth 12 and patch 16). The last one is the bottleneck."""
  if blocks:
    blocks = [int(b) for b in blocks]
    if len(blocks) != num_levels or not all(1 <= b <= depth for b in blocks):
      raise ValueError(f"evaluate.unetr_blocks={blocks}: need {num_levels} block numbers in [1, {depth}] "
                       f"(one per decoder level of the patch size)")
    return blocks
  return [max(1, math.ceil(depth * (i + 1) / num_levels)) for i in range(num_levels)]


class UNETR(nn.Module):
  """UNETR decoder (Hatamizadeh et al. 2022; MONAI layout, as in MedCoSS) for 2D and 3D inputs.

  `block_tokens[i]` are the tokens of the i-th selected encoder block; with k = len(upsampling_plan)
  levels, tokens 0..k-2 become skip features (upsampled to levels 1..k-1 by transposed convolutions)
  and tokens k-1 are the bottleneck. Level 0 skip features come from the image itself. Returns logits
  `(B, *spatial, num_classes)` in float32.
  """
  num_classes: int
  patch_size: tuple[int, ...]
  feature_size: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jnp.ndarray, block_tokens: Sequence[jnp.ndarray]) -> jnp.ndarray:
    spatial = images.shape[1:-1]
    if len(self.patch_size) != len(spatial):
      raise ValueError(f"UNETR: patch size {self.patch_size} does not match images {images.shape}")
    plan = upsampling_plan(self.patch_size)
    k = len(plan)
    if len(block_tokens) != k:
      raise ValueError(f"UNETR: patch size {self.patch_size} needs {k} encoder blocks, got {len(block_tokens)}")
    grid = tuple(s // p for s, p in zip(spatial, self.patch_size))
    if any(s % p for s, p in zip(spatial, self.patch_size)):
      raise ValueError(f"UNETR: image size {spatial} is not a multiple of the patch size {self.patch_size}")
    f = self.feature_size

    def to_grid(tokens):  # drop CLS, patch tokens back onto the grid
      b, n, d = tokens.shape
      if n - 1 != math.prod(grid):
        raise ValueError(f"UNETR: {n - 1} patch tokens, grid {grid} needs {math.prod(grid)}")
      return tokens[:, 1:].reshape(b, *grid, d).astype(self.dtype)

    skips = [ResBlock(f, self.dtype, name="encoder1")(images.astype(self.dtype))]
    for level in range(1, k):  # skip features at level `level`: upsample from the grid (level k)
      x = UpSample(f * 2**level, plan[k - 1], self.dtype, name=f"encoder{level + 1}_init")(
          to_grid(block_tokens[level - 1]))
      for j in range(k - 2, level - 1, -1):
        x = UpSample(f * 2**level, plan[j], self.dtype, name=f"encoder{level + 1}_up{j}")(x)
        x = ResBlock(f * 2**level, self.dtype, name=f"encoder{level + 1}_res{j}")(x)
      skips.append(x)
    x = to_grid(block_tokens[k - 1])
    for level in range(k - 1, -1, -1):
      x = UpSample(f * 2**level, plan[level], self.dtype, name=f"decoder{level + 2}_up")(x)
      x = jnp.concatenate([x, skips[level]], axis=-1)
      x = ResBlock(f * 2**level, self.dtype, name=f"decoder{level + 2}_res")(x)
    logits = nn.Conv(self.num_classes, (1,) * len(spatial), dtype=self.dtype, name="out")(x)
    return logits.astype(jnp.float32)
