"""The MAE parameter tree across stages: encoder side vs decoder side, hand-over, tree <-> flat arrays.

The encoder side (`encoder` trunk, `cls_token`, `patch_embed_{2,3}d`, learned position tables, ...) is what a
stage passes on; the decoder side (`decoder*`, `mask_token`) is re-initialised at every stage when
`config.continual.reinit_decoder` is set (MedCoSS).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from invcoss_jax import npz_io
from invcoss_jax.io_utils import atomic_savez
from invcoss_jax.train import optim


def is_decoder_key(name: str) -> bool:
  """Top-level parameter names of the MAE decoder (the pixel heads included) and of the MLM head: MedCoSS
  re-initialises both at every stage and carries only the encoder side and the tokenizers."""
  return name.startswith("decoder") or name == "mask_token" or name.startswith("mlm_")


def split_params(params: Mapping[str, Any]) -> tuple[dict, dict]:
  """(encoder side, decoder side) as two dicts over the top-level keys."""
  enc = {k: v for k, v in params.items() if not is_decoder_key(k)}
  dec = {k: v for k, v in params.items() if is_decoder_key(k)}
  return enc, dec


def merge_params(encoder_side: Mapping[str, Any], decoder_side: Mapping[str, Any]) -> dict:
  return {**dict(decoder_side), **dict(encoder_side)}


TEXT_KEYS = ("token_embed", "pos_embed_1d", "text_embed_norm")  # the text tokenizer (the MLM head: decoder side)


def leaf_rank_suffix(path: str) -> int | None:
  """2 or 3 when a leaf belongs to the 2D/3D tokenizer or head (name ends in _2d / _3d), 0 for the text
  tokenizer (a stage's rank is len(example shape) - 1, so (L,) token ids are rank 0), else None."""
  top = path.split("/")[0]
  if top.endswith("_2d"):
    return 2
  if top.endswith("_3d"):
    return 3
  if top in TEXT_KEYS:
    return 0
  return None


def hand_over(previous: Mapping[str, Any], fresh: Mapping[str, Any], *, reinit_decoder: bool,
              where: str) -> dict:
  """Stage T's starting parameters: stage T-1's encoder side (and decoder unless `reinit_decoder`), with
  `fresh` (a new initialisation) for the decoder and for any leaf the previous tree lacks (e.g. a 3D
  tokenizer when the previous model was pre-trained on 2D only). Shapes must agree."""
  prev_flat = flatten(previous)
  out = {}
  for path, value in flatten(fresh).items():
    take_prev = path in prev_flat and not (reinit_decoder and is_decoder_key(path.split("/")[0]))
    if take_prev:
      p = prev_flat[path]
      if tuple(np.shape(p)) != tuple(np.shape(value)):
        raise ValueError(f"{where}: parameter {path} has shape {tuple(np.shape(p))} but the model of this stage "
                         f"expects {tuple(np.shape(value))} (config.model must be the same for every stage)")
      out[path] = p
    else:
      out[path] = value
  return unflatten(out)


def flatten(tree: Any) -> dict[str, Any]:
  """{'encoder/block_0/attn/query/kernel': leaf, ...} of a nested dict of arrays."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat[optim.path_name(path)] = leaf
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    parts = path.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = leaf
  return out


def save_tree_npz(path: str, **trees: Any) -> int:
  """Several parameter trees in one npz (keys '<tree>::<leaf path>'), atomically; returns the file size."""
  import os
  arrays = {}
  for name, tree in trees.items():
    for leaf_path, leaf in flatten(tree).items():
      arrays[f"{name}::{leaf_path}"] = np.asarray(jax.device_get(leaf))
  atomic_savez(path, **arrays)
  return os.path.getsize(path)


def load_tree_npz(path: str) -> dict[str, dict]:
  """The trees written by `save_tree_npz`, as {tree name: nested dict of NumPy arrays}."""
  import os
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: the stage that should have written it did not finish")
  per_tree: dict[str, dict] = {}
  for key, value in npz_io.load_npz(path).items():
    if "::" not in key:
      raise ValueError(f"{path}: key {key!r} is not '<tree>::<leaf path>'")
    name, leaf_path = key.split("::", 1)
    per_tree.setdefault(name, {})[leaf_path] = value
  return {name: unflatten(flat) for name, flat in per_tree.items()}
