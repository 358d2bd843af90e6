"""Conversion rules between PyTorch state-dict tensors and Flax parameters, and the tensor transforms they use.

A `Rule` ties a group of PyTorch keys to a group of Flax parameter paths with a transform in each direction,
so one rule serves import (`to_flax`), export (`to_torch`) and the shape check of an import (the model's
current parameters mapped `to_torch` give the shapes the checkpoint must have).

Layout facts the transforms rely on:
- `nn.Linear.weight` is (out, in); a Flax `Dense` kernel is (in, out).
- A patch-embedding `ConvNd.weight` (D, C, *patch) equals a `Dense` on patch vectors flattened in
  (*patch, C) order (`models.patchify`), kernel (prod(patch) * C, D).
- timm's fused `attn.qkv` and `nn.MultiheadAttention.in_proj_*` stack the q, k, v projections along the output
  axis, each head-major (head, head_dim); Flax `MultiHeadDotProductAttention` keeps q/k/v kernels as
  (D, heads, head_dim) and the output kernel as (heads, head_dim, D).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

Path = tuple[str, ...]
Arrays = Sequence[np.ndarray]


def _same_shape(checkpoint: tuple[int, ...], expected: tuple[int, ...]) -> bool:
  return tuple(checkpoint) == tuple(expected)


@dataclasses.dataclass(frozen=True)
class Rule:
  """`torch_keys` <-> `flax_paths`. `to_flax(torch arrays) -> flax arrays`; `to_torch(flax arrays) -> torch
  arrays`. A rule with no Flax paths only validates its tensors (e.g. a fixed sin-cos table). `compatible`
  decides whether a checkpoint shape fits the expected one (equality unless a rule says otherwise)."""
  torch_keys: tuple[str, ...]
  flax_paths: tuple[Path, ...]
  to_flax: Callable[[Arrays], list[np.ndarray]]
  to_torch: Callable[[Arrays], list[np.ndarray]]
  compatible: Callable[[tuple[int, ...], tuple[int, ...]], bool] = _same_shape
  expect: str = ""  # how the expected shape reads in an error, when it is not simply `to_torch`'s shape


def join(*parts: str) -> str:
  return ".".join(p for p in parts if p)


def fpath(prefix: Path, *names: str) -> Path:
  return tuple(prefix) + tuple(names)


# --- single-tensor rules ------------------------------------------------------------------------------------

def copy(torch_key: str, flax_path: Path) -> Rule:
  return Rule((torch_key,), (flax_path,), lambda a: [a[0]], lambda f: [f[0]])


def linear(torch_prefix: str, flax_prefix: Path) -> list[Rule]:
  """nn.Linear (weight (out, in), bias) <-> Dense (kernel (in, out), bias)."""
  return [Rule((join(torch_prefix, "weight"),), (fpath(flax_prefix, "kernel"),),
               lambda a: [a[0].T], lambda f: [f[0].T]),
          copy(join(torch_prefix, "bias"), fpath(flax_prefix, "bias"))]


def layer_norm(torch_prefix: str, flax_prefix: Path) -> list[Rule]:
  return [copy(join(torch_prefix, "weight"), fpath(flax_prefix, "scale")),
          copy(join(torch_prefix, "bias"), fpath(flax_prefix, "bias"))]


def conv_patch_embed(torch_prefix: str, flax_prefix: Path, patch_size: Sequence[int], channels: int) -> list[Rule]:
  """ConvNd(C, D, kernel=stride=patch) <-> Dense on patchified pixels."""
  patch_size = tuple(int(p) for p in patch_size)
  n = len(patch_size)

  def to_flax(a: Arrays) -> list[np.ndarray]:
    w = a[0]  # (D, C, *patch) -> (*patch, C, D) -> (prod(patch) * C, D)
    return [w.transpose(*range(2, 2 + n), 1, 0).reshape(-1, w.shape[0])]

  def to_torch(f: Arrays) -> list[np.ndarray]:
    k = f[0]
    w = k.reshape(*patch_size, channels, k.shape[-1])
    return [w.transpose(n + 1, n, *range(n))]

  return [Rule((join(torch_prefix, "weight"),), (fpath(flax_prefix, "kernel"),), to_flax, to_torch),
          copy(join(torch_prefix, "bias"), fpath(flax_prefix, "bias"))]


# --- attention ----------------------------------------------------------------------------------------------

_QKV = ("query", "key", "value")


def fused_qkv(weight_key: str, bias_key: str, flax_attn: Path, num_heads: int) -> list[Rule]:
  """A fused (3 * D, D) projection and its (3 * D,) bias <-> Flax query/key/value kernels and biases."""

  def w_to_flax(a: Arrays) -> list[np.ndarray]:
    w = a[0]
    if w.ndim != 2 or w.shape[0] % 3:
      raise ValueError(f"expected a fused (3 * D, D) q/k/v weight, got shape {w.shape}")
    d_in = w.shape[1]
    return [p.T.reshape(d_in, num_heads, -1) for p in np.split(w, 3, axis=0)]

  def w_to_torch(f: Arrays) -> list[np.ndarray]:
    return [np.concatenate([k.reshape(k.shape[0], -1).T for k in f], axis=0)]

  def b_to_flax(a: Arrays) -> list[np.ndarray]:
    return [p.reshape(num_heads, -1) for p in np.split(a[0], 3)]

  def b_to_torch(f: Arrays) -> list[np.ndarray]:
    return [np.concatenate([b.reshape(-1) for b in f])]

  return [Rule((weight_key,), tuple(fpath(flax_attn, n, "kernel") for n in _QKV), w_to_flax, w_to_torch),
          Rule((bias_key,), tuple(fpath(flax_attn, n, "bias") for n in _QKV), b_to_flax, b_to_torch)]


def attn_out(torch_prefix: str, flax_attn: Path, num_heads: int) -> list[Rule]:
  """Output projection nn.Linear(D, D) <-> Flax `out` kernel (heads, head_dim, D)."""

  def to_flax(a: Arrays) -> list[np.ndarray]:
    w = a[0]
    return [w.T.reshape(num_heads, -1, w.shape[0])]

  def to_torch(f: Arrays) -> list[np.ndarray]:
    k = f[0]
    return [k.reshape(-1, k.shape[-1]).T]

  return [Rule((join(torch_prefix, "weight"),), (fpath(flax_attn, "out", "kernel"),), to_flax, to_torch),
          copy(join(torch_prefix, "bias"), fpath(flax_attn, "out", "bias"))]


# --- transformer blocks -------------------------------------------------------------------------------------

def timm_block(torch_prefix: str, flax_prefix: Path, num_heads: int, layer_scale: bool) -> list[Rule]:
  """timm `Block` (MAE encoder and decoder, MedCoSS decoder, timm ViT) <-> our `Block`."""
  attn = fpath(flax_prefix, "attn")
  rules = (layer_norm(join(torch_prefix, "norm1"), fpath(flax_prefix, "norm1"))
           + fused_qkv(join(torch_prefix, "attn.qkv.weight"), join(torch_prefix, "attn.qkv.bias"), attn, num_heads)
           + attn_out(join(torch_prefix, "attn.proj"), attn, num_heads)
           + layer_norm(join(torch_prefix, "norm2"), fpath(flax_prefix, "norm2"))
           + linear(join(torch_prefix, "mlp.fc1"), fpath(flax_prefix, "fc1"))
           + linear(join(torch_prefix, "mlp.fc2"), fpath(flax_prefix, "fc2")))
  if layer_scale:
    rules += [copy(join(torch_prefix, "ls1.gamma"), fpath(flax_prefix, "ls1", "gamma")),
              copy(join(torch_prefix, "ls2.gamma"), fpath(flax_prefix, "ls2", "gamma"))]
  return rules


def torch_encoder_layer(torch_prefix: str, flax_prefix: Path, num_heads: int, layer_scale: bool) -> list[Rule]:
  """MedCoSS's `TransformerEncoderLayer` (pre-norm, `nn.MultiheadAttention`, `gamma_1/2`) <-> our `Block`."""
  attn = fpath(flax_prefix, "attn")
  rules = (layer_norm(join(torch_prefix, "norm1"), fpath(flax_prefix, "norm1"))
           + fused_qkv(join(torch_prefix, "self_attn.in_proj_weight"), join(torch_prefix, "self_attn.in_proj_bias"),
                       attn, num_heads)
           + attn_out(join(torch_prefix, "self_attn.out_proj"), attn, num_heads)
           + layer_norm(join(torch_prefix, "norm2"), fpath(flax_prefix, "norm2"))
           + linear(join(torch_prefix, "linear1"), fpath(flax_prefix, "fc1"))
           + linear(join(torch_prefix, "linear2"), fpath(flax_prefix, "fc2")))
  if layer_scale:
    rules += [copy(join(torch_prefix, "gamma_1"), fpath(flax_prefix, "ls1", "gamma")),
              copy(join(torch_prefix, "gamma_2"), fpath(flax_prefix, "ls2", "gamma"))]
  return rules
