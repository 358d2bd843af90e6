"""State-dict layouts we read: MAE (`models_mae.py`), timm `VisionTransformer` and MedCoSS (`Unified_Model`).

`plan(layout, state_dict, cfg, param_paths)` lists the rules that fill the model's parameters from a
checkpoint, the checkpoint keys deliberately left out (with the reason), and which parts of the model the
checkpoint must fill completely. Which parts are loaded follows what both sides have: the encoder trunk
always; a tokenizer / pixel head of dimension r when the checkpoint has one and the model has one; the MAE
decoder when the checkpoint has one. Everything else keeps its current value.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import numpy as np

from invcoss_jax.interop import positions, rules
from invcoss_jax.interop.rules import Path, Rule
from invcoss_jax.models.vit_mae import ViTConfig

LAYOUTS = ("mae", "timm", "medcoss")

# config.model settings under which our MAE computes exactly what each source model computes. LayerNorm
# eps and the drop-path schedule cannot be read from a state dict, so they are listed here.
MAE_MODEL = dict(pos_embed="sincos", final_norm=True, ln_eps=1e-6, decoder_ln_eps=0.0, layer_scale_init=0.0,
                 embed_norm=False, temporal_pos_len=0, decoder_cls_pos=False, drop_path_schedule="linear")
MEDCOSS_MODEL = dict(
    width=768, depth=12, num_heads=12, mlp_ratio=4.0, decoder_width=512, decoder_depth=8, decoder_heads=16,
    patch_size_2d=(16, 16), patch_size_3d=(16, 16, 16), channels_2d=3, channels_3d=1,
    pos_embed="learned", learned_pos_grid_2d=(14, 14), learned_pos_grid_3d=(1, 12, 12),
    layer_scale_init=1e-3, drop_path=0.1, drop_path_schedule="constant", final_norm=False,
    ln_eps=1e-5, decoder_ln_eps=1e-6, embed_norm=True, temporal_pos_len=8, decoder_cls_pos=True,
    norm_pix_loss=True)


def model_overrides(layout: str) -> dict:
  """The `config.model` settings that make our model compute what a `layout` checkpoint's model computes
  (timm ViTs are configured like MAE's encoder)."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout {layout!r} is unknown; expected one of {LAYOUTS}")
  return dict(MEDCOSS_MODEL if layout == "medcoss" else MAE_MODEL)


@dataclasses.dataclass
class Plan:
  rules: list[Rule]
  ignored: dict[str, str]  # checkpoint key -> why it is not loaded
  filled: list[Path]  # parameter-path prefixes the checkpoint must fill completely
  hints: list[str]  # config settings that disagree with the checkpoint


def detect_layout(state_dict: Mapping[str, np.ndarray]) -> str:
  keys = set(state_dict)
  if any(k.startswith("fused_encoder.layers.") for k in keys):
    return "medcoss"
  if any(re.match(r"^blocks\.\d+\.attn\.qkv\.weight$", k) for k in keys):
    return "mae" if any(k.startswith("decoder_") for k in keys) else "timm"
  raise ValueError("cannot tell the checkpoint layout (neither MAE/timm 'blocks.N.attn.qkv.weight' nor "
                   f"MedCoSS 'fused_encoder.layers.N'); first keys: {sorted(keys)[:12]}; pass layout=...")


def _count(keys, pattern: str) -> int:
  idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
  return max(idx) + 1 if idx else 0


def _encoder_trunk(cfg: ViTConfig, block_fn, prefix: str) -> list[Rule]:
  out = []
  for i in range(cfg.depth):
    out += block_fn(f"{prefix}.{i}", ("encoder", f"block_{i}"), cfg.num_heads, cfg.layer_scale_init > 0)
  return out


def _decoder_trunk(cfg: ViTConfig) -> list[Rule]:
  out = rules.linear("decoder_embed", ("decoder_embed",)) + [rules.copy("mask_token", ("mask_token",))]
  for i in range(cfg.decoder_depth):
    out += rules.timm_block(f"decoder_blocks.{i}", ("decoder", f"block_{i}"), cfg.decoder_heads, False)
  return out + rules.layer_norm("decoder_norm", ("decoder", "norm"))


def _tokenizer_prefixes(rank: int) -> list[Path]:
  return [(f"patch_embed_{rank}d",), (f"pos_embed_{rank}d",), (f"temporal_pos_embed_{rank}d",), ("embed_norm",)]


def _head_prefixes(rank: int) -> list[Path]:
  return [(f"decoder_pred_{rank}d",), (f"decoder_pos_embed_{rank}d",), (f"decoder_cls_pos_{rank}d",)]


_TRUNK = [("encoder",), ("cls_token",)]
_DECODER = [("decoder_embed",), ("mask_token",), ("decoder",)]


def _base_grid(cfg: ViTConfig, rank: int) -> tuple[int, ...]:
  return tuple(cfg.learned_pos_grid_2d if rank == 2 else cfg.learned_pos_grid_3d)


def _mae_timm(layout: str, sd: Mapping[str, np.ndarray], cfg: ViTConfig, have: set[str]) -> Plan:
  rs: list[Rule] = []
  ignored: dict[str, str] = {}
  filled = list(_TRUNK)
  learned = cfg.pos_embed == "learned"
  w = sd.get("patch_embed.proj.weight")
  rank = w.ndim - 2 if w is not None and w.ndim in (4, 5) else None
  model_rank = rank if rank is not None and f"patch_embed_{rank}d" in have else None

  if rank is not None and model_rank is None:
    ignored.update({k: f"the model has no {rank}D tokenizer (create it with a {rank}D shape in init_mae_params)"
                    for k in sd if k.startswith("patch_embed.")})
  if model_rank is not None:
    filled += _tokenizer_prefixes(rank)
    rs += rules.conv_patch_embed("patch_embed.proj", (f"patch_embed_{rank}d",), cfg.patch_size(rank),
                                 cfg.channels(rank))
  if "pos_embed" in sd:
    prank = rank if rank is not None else 2
    base = _base_grid(cfg, prank)
    grid = base if (learned and model_rank is not None) else positions.token_grid(sd["pos_embed"].shape[-2], prank,
                                                                                  base)[0]
    rs.append(positions.encoder_pos("cls_token", "pos_embed", model_rank, width=cfg.width, learned=learned,
                                    base_grid=base, grid=grid))
  else:
    rs.append(rules.copy("cls_token", ("cls_token",)))
  rs += _encoder_trunk(cfg, rules.timm_block, "blocks")
  if cfg.final_norm:
    rs += rules.layer_norm("norm", ("encoder", "norm"))
  if layout == "timm":
    ignored.update({k: "classification head (not part of the MAE)" for k in sd if k.startswith("head.")})
  elif any(k.startswith("decoder_") for k in sd):
    filled += _DECODER
    rs += _decoder_trunk(cfg)
    if model_rank is not None:
      filled += _head_prefixes(rank)
      rs += rules.linear("decoder_pred", (f"decoder_pred_{rank}d",))
      base = _base_grid(cfg, rank)
      grid = base if learned else positions.token_grid(sd["decoder_pos_embed"].shape[-2], rank, base)[0] \
          if "decoder_pos_embed" in sd else base
      rs.append(positions.decoder_pos("decoder_pos_embed", rank, width=cfg.decoder_width, learned=learned,
                                      cls_pos=cfg.decoder_cls_pos, base_grid=base, grid=grid))
    else:
      ignored.update({k: "pixel head of a dimension the model does not have" for k in sd
                      if k.startswith(("decoder_pred.", "decoder_pos_embed"))})
  return Plan(rs, ignored, filled, _hints(layout, sd, cfg, rank))


_MEDCOSS_TEXT = ("token_embed.", "mlm_head.", "decoder_pos_embed_1D.")
_MEDCOSS_MLM = ("mlm_head.", "decoder_pos_embed_1D.")  # re-initialised at every stage by MedCoSS and by us
_MEDCOSS_UNUSED = ("video_embed.embeddings_pos.", "video_embed.embeddings_type.")
_MEDCOSS_CONV = {2: "video_embed.embeddings", 3: "video_embed.embeddings_3D"}
_MEDCOSS_TAG = {2: "2D", 3: "3D"}


def _medcoss_text(sd: Mapping[str, np.ndarray], cfg: ViTConfig, have: set[str]
                  ) -> tuple[list[Rule], list[Path], dict[str, str]]:
  """MedCoSS's text tokenizer (Uni-Perceiver's `TokenBaseEmbedding`) into ours: rules, filled, ignored."""
  if "token_embed" not in have or "token_embed.embeddings.weight" not in sd:
    why = ("text modality (this model has no text tokenizer: set config.model.vocab_size from the vocabulary the "
           "checkpoint was trained with, e.g. Bio_ClinicalBERT's vocab.txt)")
    return [], [], {k: why for k in sd if k.startswith(_MEDCOSS_TEXT)}
  ignored = {k: "MLM head: re-initialised at every stage (MedCoSS does the same)" for k in sd
             if k.startswith(_MEDCOSS_MLM)}
  rs = [positions.token_table("token_embed.embeddings.weight", vocab_size=cfg.vocab_size, width=cfg.width),
        positions.text_positions("token_embed.embeddings_pos.position_embeddings.weight",
                                 "token_embed.embeddings_token_type.weight", rows=cfg.text_max_len, width=cfg.width)]
  filled: list[Path] = [("token_embed",), ("pos_embed_1d",)]
  if cfg.embed_norm and "token_embed.embeddings_norm.weight" in sd:
    rs += rules.layer_norm("token_embed.embeddings_norm", ("text_embed_norm",))
    filled.append(("text_embed_norm",))
  return rs, filled, ignored


def _medcoss(sd: Mapping[str, np.ndarray], cfg: ViTConfig, have: set[str]) -> Plan:
  text_rules, filled_text, ignored = _medcoss_text(sd, cfg, have)
  rs: list[Rule] = [rules.copy("cls_token", ("cls_token",))] + text_rules
  ignored.update({k: "not used by MedCoSS's forward pass" for k in sd if k.startswith(_MEDCOSS_UNUSED)})
  filled = list(_TRUNK) + filled_text
  learned = cfg.pos_embed == "learned"
  ckpt_ranks = [r for r in (2, 3) if f"{_MEDCOSS_CONV[r]}.weight" in sd]
  loaded = [r for r in ckpt_ranks if f"patch_embed_{r}d" in have]
  for r in ckpt_ranks:
    tag, st = _MEDCOSS_TAG[r], f"video_embed.embeddings_st_pos_{_MEDCOSS_TAG[r]}"
    if r not in loaded:
      why = f"the model has no {r}D tokenizer (create it with a {r}D shape in init_mae_params)"
      ignored.update({k: why for k in sd if k.startswith((f"{_MEDCOSS_CONV[r]}.", f"{st}.",
                                                            f"decoder_pred_{tag}.", f"decoder_pos_embed_{tag}"))})
      continue
    filled += _tokenizer_prefixes(r)
    rs += rules.conv_patch_embed(_MEDCOSS_CONV[r], (f"patch_embed_{r}d",), cfg.patch_size(r), cfg.channels(r))
    rs.append(positions.raster_table(f"{st}.spatial_pos_embed.weight", r, width=cfg.width, learned=learned,
                                     base_grid=_base_grid(cfg, r)))
    if cfg.temporal_pos_len > 0:
      rs.append(rules.copy(f"{st}.temporal_pos_embed.weight", (f"temporal_pos_embed_{r}d",)))
  if loaded and cfg.embed_norm:
    rs += rules.layer_norm("video_embed.embeddings_norm", ("embed_norm",))
  rs += _encoder_trunk(cfg, rules.torch_encoder_layer, "fused_encoder.layers")
  if any(k.startswith("decoder_blocks.") for k in sd):
    filled += _DECODER
    rs += _decoder_trunk(cfg)
    for r in loaded:
      tag = _MEDCOSS_TAG[r]
      filled += _head_prefixes(r)
      rs += rules.linear(f"decoder_pred_{tag}", (f"decoder_pred_{r}d",))
      base = _base_grid(cfg, r)
      rs.append(positions.decoder_pos(f"decoder_pos_embed_{tag}", r, width=cfg.decoder_width, learned=learned,
                                      cls_pos=cfg.decoder_cls_pos, base_grid=base, grid=base))
  return Plan(rs, ignored, filled, _hints("medcoss", sd, cfg, loaded[0] if loaded else None))


def plan(layout: str, state_dict: Mapping[str, np.ndarray], cfg: ViTConfig, param_paths: set[Path]) -> Plan:
  have = {p[0] for p in param_paths}
  if layout == "medcoss":
    return _medcoss(state_dict, cfg, have)
  if layout in ("mae", "timm"):
    return _mae_timm(layout, state_dict, cfg, have)
  raise ValueError(f"layout {layout!r} is unknown; expected 'auto' or one of {LAYOUTS}")


def _hints(layout: str, sd: Mapping[str, np.ndarray], cfg: ViTConfig, rank: int | None) -> list[str]:
  """Config settings that disagree with what the checkpoint shows (reported when a load fails)."""
  keys = list(sd)
  out = []
  medcoss = layout == "medcoss"
  depth = _count(keys, r"^fused_encoder\.layers\.(\d+)\." if medcoss else r"^blocks\.(\d+)\.")
  if depth != cfg.depth:
    out.append(f"the checkpoint has {depth} encoder blocks: config.model.depth={cfg.depth}")
  if "cls_token" in sd and sd["cls_token"].shape[-1] != cfg.width:
    out.append(f"the checkpoint's width is {sd['cls_token'].shape[-1]}: config.model.width={cfg.width}")
  dec_depth = _count(keys, r"^decoder_blocks\.(\d+)\.")
  if dec_depth and dec_depth != cfg.decoder_depth:
    out.append(f"the checkpoint has {dec_depth} decoder blocks: config.model.decoder_depth={cfg.decoder_depth}")
  if "mask_token" in sd and sd["mask_token"].shape[-1] != cfg.decoder_width:
    out.append(f"the checkpoint's decoder width is {sd['mask_token'].shape[-1]}: "
               f"config.model.decoder_width={cfg.decoder_width}")
  has_norm = "norm.weight" in sd
  if has_norm != cfg.final_norm:
    out.append(f"the checkpoint {'has' if has_norm else 'has no'} final encoder LayerNorm: "
               f"config.model.final_norm={cfg.final_norm}")
  has_ls = any(k.endswith(("ls1.gamma", "gamma_1")) for k in keys)
  if has_ls != (cfg.layer_scale_init > 0):
    out.append(f"the checkpoint {'has' if has_ls else 'has no'} LayerScale: "
               f"config.model.layer_scale_init={cfg.layer_scale_init}")
  if medcoss:
    has_en = "video_embed.embeddings_norm.weight" in sd
    if has_en != cfg.embed_norm:
      out.append(f"the checkpoint {'has' if has_en else 'has no'} LayerNorm after the tokenizer: "
                 f"config.model.embed_norm={cfg.embed_norm}")
    temporal = [v.shape[0] for k, v in sd.items() if k.endswith("temporal_pos_embed.weight")]
    if temporal and temporal[0] != cfg.temporal_pos_len:
      out.append(f"the checkpoint's temporal table has {temporal[0]} rows: "
                 f"config.model.temporal_pos_len={cfg.temporal_pos_len}")
    if cfg.pos_embed != "learned":
      out.append("MedCoSS position tables are learned: config.model.pos_embed='learned'")
  conv = {2: sd.get(_MEDCOSS_CONV[2] + ".weight"), 3: sd.get(_MEDCOSS_CONV[3] + ".weight")} if medcoss else \
      {rank: sd.get("patch_embed.proj.weight")}
  for r, wt in conv.items():
    if r is None or wt is None:
      continue
    if tuple(wt.shape[2:]) != tuple(cfg.patch_size(r)) or wt.shape[1] != cfg.channels(r):
      out.append(f"the checkpoint's {r}D patch embedding has patch {tuple(wt.shape[2:])} and {wt.shape[1]} "
                 f"channel(s): config.model.patch_size_{r}d={tuple(cfg.patch_size(r))}, "
                 f"channels_{r}d={cfg.channels(r)}")
  if out:
    out.append(f"num_heads and LayerNorm eps are not stored in a state dict; model_overrides({layout!r}) lists "
               "the settings of the reference model")
  return out
