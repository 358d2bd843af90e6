"""Model presets and the defaults of `config.model`."""

from __future__ import annotations

import ml_collections

# Encoder (width, depth, heads) and MAE decoder (width, depth, heads) per preset. `base` is ViT-B/16 with the
# MAE decoder of the paper (512 wide, 8 blocks, 16 heads). `micro` is for tests and CPU demos only.
PRESETS = {
    "micro": dict(width=64, depth=4, num_heads=4, decoder_width=64, decoder_depth=1, decoder_heads=4),
    "tiny": dict(width=192, depth=12, num_heads=3, decoder_width=128, decoder_depth=2, decoder_heads=4),
    "small": dict(width=384, depth=12, num_heads=6, decoder_width=256, decoder_depth=4, decoder_heads=8),
    "base": dict(width=768, depth=12, num_heads=12, decoder_width=512, decoder_depth=8, decoder_heads=16),
}


def model_config(preset: str = "base") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"config.model preset {preset!r} is unknown; expected one of {sorted(PRESETS)}")
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.update(PRESETS[preset])
  c.mlp_ratio = 4.0
  c.patch_size_2d = (16, 16)
  c.patch_size_3d = (16, 16, 16)
  c.channels_2d = 3
  c.channels_3d = 1
  c.pos_embed = "sincos"  # 'sincos' (fixed, any grid) or 'learned' (interpolated to the grid)
  c.learned_pos_grid_2d = (14, 14)  # grid of the learned table (224 / 16); resized to other grids
  c.learned_pos_grid_3d = (1, 12, 12)  # 16x192x192 / 16
  c.layer_scale_init = 0.0  # > 0 enables LayerScale (MedCoSS uses 1e-3)
  c.drop_path = 0.0  # stochastic depth, rate grows linearly to this value over the blocks
  c.drop_path_schedule = "linear"  # 'linear' (MAE, timm) or 'constant': drop_path in every block (MedCoSS)
  c.final_norm = True  # LayerNorm after the last encoder block (MAE has one, MedCoSS does not)
  c.norm_pix_loss = True
  c.ln_eps = 1e-6
  c.decoder_ln_eps = 0.0  # decoder LayerNorm eps; 0 = ln_eps (MedCoSS: encoder 1e-5, decoder 1e-6)
  # MedCoSS features (off for MAE; see invcoss_jax.interop.MEDCOSS_MODEL for the exact MedCoSS settings):
  c.embed_norm = False  # LayerNorm after patch + position embedding, before masking and the CLS token
  c.temporal_pos_len = 0  # > 0: learned temporal table; row 0 at eval, a random row per batch in training
  c.decoder_cls_pos = False  # learned decoder position of the CLS token (MAE's sin-cos row is zero)
  c.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (parameters and the loss stay float32)
  c.remat = False  # rematerialise each transformer block in the backward pass
  # Text (the report stage): the size of the text embedding's id space, i.e. the number of tokens of its
  # vocabulary, specials and added tokens included (row i of token_embed embeds token id i); 0 = no text
  # tokenizer. It is not chosen: the report stage sets it from the tokenizer it trains or loads
  # (config.data.text.tokenizer). config.data.text.vocab_size is another thing, the most tokens of a vocabulary
  # the stage trains (data/config.py); a small corpus yields fewer. The vocabulary itself is recorded with the
  # checkpoint (vocabulary.json, train/vocabulary.py).
  c.vocab_size = 0
  c.text_max_len = 512  # rows of the learned 1D position table (MedCoSS: 512; reports use 112)
  c.pad_id = 0  # the tokenizer's [PAD] id (first special token; BERT vocabularies too)
  c.tokenizer = ""  # the vocabulary file of the text embedding (set by the report stage; read by text tasks)
  return c


def num_params(params) -> int:
  import jax
  return int(sum(x.size for x in jax.tree.leaves(params)))


def demo_model_config() -> ml_collections.ConfigDict:
  """The micro ViT of every `:demo` preset, with 8x8 (2D) and 8^3 (3D) patches: 16 tokens at 32x32 and 32 at
  16x32x32, small enough for a 2-core CPU."""
  c = model_config("micro")
  c.patch_size_2d = (8, 8)
  c.patch_size_3d = (8, 8, 8)
  return c
