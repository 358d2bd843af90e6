"""Dimension-free ViT-MAE: one transformer trunk, per-dimension tokenizers and MAE output heads.

As in MedCoSS, 2D images (B, H, W, 3) and 3D volumes (B, D, H, W, 1) share the encoder blocks, the CLS token
and the decoder blocks; only the patch embedding (`patch_embed_2d` / `patch_embed_3d`) and the pixel head
(`decoder_pred_2d` / `decoder_pred_3d`) depend on the dimension. Text (B, L) token ids are the 1D modality: a
token embedding (`token_embed`) with learned 1D positions (`pos_embed_1d`) feeds the same trunk, padding is
masked out of attention, and a masked-language-model head (`mlm_head`) predicts the corrupted tokens
(`MAE.mlm`; the whole-word masking is `invcoss_jax.train.mlm`). Each encoder block sows its output tokens into
the `intermediates` collection, where feature statistics and distillation read them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from invcoss_jax.models import patching, pos_embed

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Hashable model hyper-parameters (built from `config.model`)."""
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  patch_size_2d: tuple[int, int] = (16, 16)
  patch_size_3d: tuple[int, int, int] = (16, 16, 16)
  channels_2d: int = 3
  channels_3d: int = 1
  pos_embed: str = "sincos"
  learned_pos_grid_2d: tuple[int, int] = (14, 14)
  learned_pos_grid_3d: tuple[int, int, int] = (1, 12, 12)
  layer_scale_init: float = 0.0
  drop_path: float = 0.0
  drop_path_schedule: str = "linear"
  final_norm: bool = True
  norm_pix_loss: bool = True
  ln_eps: float = 1e-6
  decoder_ln_eps: float = 0.0
  embed_norm: bool = False
  temporal_pos_len: int = 0
  decoder_cls_pos: bool = False
  dtype: str = "float32"
  remat: bool = False
  vocab_size: int = 0  # text tokenizer's vocabulary (0: no text modality); set from the stage's tokenizer
  pad_id: int = 0  # [PAD]: kept out of attention when no attention mask is given (fine-tuning reads ids only)
  text_max_len: int = 512  # rows of the learned 1D position table (MedCoSS: 512); reports use up to 112

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> "ViTConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in c.items():
      if k in names:
        kwargs[k] = tuple(v) if isinstance(v, (list, tuple)) else v
    if kwargs.get("pos_embed", "sincos") not in ("sincos", "learned"):
      raise ValueError(f"config.model.pos_embed must be 'sincos' or 'learned', got {kwargs['pos_embed']!r}")
    if kwargs.get("dtype", "float32") not in ("float32", "bfloat16"):
      raise ValueError(f"config.model.dtype must be 'float32' or 'bfloat16', got {kwargs['dtype']!r}")
    if kwargs.get("drop_path_schedule", "linear") not in ("linear", "constant"):
      raise ValueError("config.model.drop_path_schedule must be 'linear' or 'constant', "
                       f"got {kwargs['drop_path_schedule']!r}")
    return cls(**kwargs)

  @property
  def compute_dtype(self):
    return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32

  def patch_size(self, spatial_rank: int) -> tuple[int, ...]:
    return self.patch_size_2d if spatial_rank == 2 else self.patch_size_3d

  def channels(self, spatial_rank: int) -> int:
    return self.channels_2d if spatial_rank == 2 else self.channels_3d

  @property
  def decoder_eps(self) -> float:
    return self.decoder_ln_eps if self.decoder_ln_eps > 0 else self.ln_eps


def is_text(inputs: Array) -> bool:
  """Token ids (B, L) of integer dtype are text; images and volumes are float (B, ..., C)."""
  return inputs.ndim == 2 and jnp.issubdtype(inputs.dtype, jnp.integer)


def spatial_rank(images: Array) -> int:
  if is_text(images):
    return 1
  if images.ndim == 4:
    return 2
  if images.ndim == 5:
    return 3
  raise ValueError(f"expected images (B,H,W,C) or volumes (B,D,H,W,C), got shape {tuple(images.shape)}")


_dense_init = nn.initializers.xavier_uniform()


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample."""
  rate: float

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class LayerScale(nn.Module):
  init_value: float

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],), jnp.float32)
    return x * gamma.astype(x.dtype)


class Block(nn.Module):
  """Pre-norm transformer block (attention and MLP residual branches)."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  layer_scale_init: float = 0.0
  ln_eps: float = 1e-6
  dtype: Any = jnp.float32
  sow_tokens: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False, attn_mask: Array | None = None) -> Array:
    width = x.shape[-1]
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, kernel_init=_dense_init, deterministic=True,
        name="attn")(y, mask=attn_mask)
    if self.layer_scale_init > 0:
      y = LayerScale(self.layer_scale_init, name="ls1")(y)
    x = x + DropPath(self.drop_path)(y, train)
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm2")(x)
    y = nn.Dense(int(width * self.mlp_ratio), dtype=self.dtype, kernel_init=_dense_init, name="fc1")(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(width, dtype=self.dtype, kernel_init=_dense_init, name="fc2")(y)
    if self.layer_scale_init > 0:
      y = LayerScale(self.layer_scale_init, name="ls2")(y)
    x = x + DropPath(self.drop_path)(y, train)
    if self.sow_tokens:
      self.sow("intermediates", "tokens", x)
    return x


class Transformer(nn.Module):
  """A stack of blocks named `block_{i}`, optionally followed by a LayerNorm `norm`."""
  depth: int
  num_heads: int
  mlp_ratio: float
  drop_path: float = 0.0
  drop_path_schedule: str = "linear"
  layer_scale_init: float = 0.0
  ln_eps: float = 1e-6
  final_norm: bool = True
  dtype: Any = jnp.float32
  remat: bool = False
  sow_tokens: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False, attn_mask: Array | None = None) -> Array:
    """`attn_mask` (B, 1, 1, L) bool: keys each query may attend to (text padding is False); None: all."""
    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    for i in range(self.depth):
      # 'linear' grows to drop_path at the last block (MAE, timm); 'constant' uses it everywhere (MedCoSS).
      rate = self.drop_path
      if self.drop_path_schedule == "linear":
        rate = self.drop_path * i / max(self.depth - 1, 1)
      x = block_cls(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, drop_path=rate,
                    layer_scale_init=self.layer_scale_init, ln_eps=self.ln_eps, dtype=self.dtype,
                    sow_tokens=self.sow_tokens, name=f"block_{i}")(x, train, attn_mask)
    if self.final_norm:
      x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm")(x)
    return x


def random_masking(x: Array, noise: Array, mask_ratio: float) -> tuple[Array, Array, Array]:
  """Per-sample random masking by argsort of `noise` (B, L): keeps the `L * (1 - mask_ratio)` tokens with
  the smallest noise. Returns (kept tokens, mask with 1 = masked in the original order, ids_restore)."""
  b, l, _ = x.shape
  len_keep = int(l * (1 - mask_ratio))
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  ids_keep = ids_shuffle[:, :len_keep]
  x_kept = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
  mask = jnp.concatenate([jnp.zeros((b, len_keep)), jnp.ones((b, l - len_keep))], axis=1)
  mask = jnp.take_along_axis(mask, ids_restore, axis=1)
  return x_kept, mask, ids_restore


def normalized_pixel_targets(patches: Array, eps: float = 1e-6) -> Array:
  """Per-patch standardisation of the target pixels (MAE's norm_pix_loss; unbiased variance as in PyTorch)."""
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + eps)


def mlm_loss(logits: Array, labels: Array, mask: Array) -> Array:
  """Mean cross-entropy (float32) of `logits` (B, L, V) against `labels` (B, L) over the positions where
  `mask` (B, L) is 1; unmasked positions contribute nothing (the report stage's objective, `MAE.mlm`)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels.astype(jnp.int32))
  m = mask.astype(jnp.float32)
  return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)


def masked_mse(pred: Array, target: Array, mask: Array, *, per_sample: bool = False) -> Array:
  """Mean over patch dims of the squared error, averaged over masked patches only (float32): the MAE loss
  (and L_task of inversion). `per_sample`: (B,), each sample's mean over its own masked patches (what the
  membership attack scores)."""
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
  mask = mask.astype(jnp.float32)
  axis = 1 if per_sample else None
  return jnp.sum(per_patch * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


class MAE(nn.Module):
  """Masked auto-encoder with a dimension-free ViT encoder."""
  cfg: ViTConfig

  def _pos(self, name: str, grid: Sequence[int], width: int, base_grid: Sequence[int]) -> Array:
    if self.cfg.pos_embed == "sincos":
      return jnp.asarray(pos_embed.sincos_grid(width, grid))[None]
    table = self.param(name, nn.initializers.normal(0.02), (*base_grid, width), jnp.float32)
    if tuple(base_grid) != tuple(grid):
      method = "bicubic" if len(grid) == 2 else "trilinear"
      table = jax.image.resize(table, (*grid, width), method=method)
    return table.reshape(1, -1, width)

  def _temporal_pos(self, rank: int, train: bool) -> Array:
    """MedCoSS's temporal position (one frame): row 0 at eval, one random row per batch in training."""
    cfg = self.cfg
    table = self.param(f"temporal_pos_embed_{rank}d", nn.initializers.normal(0.02),
                       (cfg.temporal_pos_len, cfg.width), jnp.float32)
    row = jax.random.randint(self.make_rng("dropout"), (), 0, cfg.temporal_pos_len) if train else 0
    return table[row]

  def tokenize(self, images: Array, train: bool = False) -> tuple[Array, tuple[int, ...]]:
    """Patch embedding plus position embedding (and, as configured, MedCoSS's temporal position and the
    LayerNorm after the tokenizer): images -> (B, L, width), grid."""
    cfg = self.cfg
    rank = spatial_rank(images)
    if images.shape[-1] != cfg.channels(rank):
      raise ValueError(f"{rank}D inputs must have {cfg.channels(rank)} channel(s) (config.model.channels_{rank}d), "
                       f"got shape {tuple(images.shape)}")
    ps = cfg.patch_size(rank)
    grid = patching.grid_shape(images.shape[1:-1], ps)
    patches = patching.patchify(images.astype(cfg.compute_dtype), ps)
    x = nn.Dense(cfg.width, dtype=cfg.compute_dtype, kernel_init=_dense_init, name=f"patch_embed_{rank}d")(patches)
    base = cfg.learned_pos_grid_2d if rank == 2 else cfg.learned_pos_grid_3d
    x = x + self._pos(f"pos_embed_{rank}d", grid, cfg.width, base).astype(x.dtype)
    if cfg.temporal_pos_len > 0:
      x = x + self._temporal_pos(rank, train).astype(x.dtype)
    if cfg.embed_norm:
      # One LayerNorm shared by the 2D and 3D tokenizers, before masking and the CLS token (MedCoSS).
      x = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=cfg.compute_dtype, name="embed_norm")(x)
    return x, grid

  @nn.compact
  def tokenize_text(self, tokens: Array) -> Array:
    """Token embedding plus learned 1D position embedding (and, with config.model.embed_norm, the text
    tokenizer's own LayerNorm, as MedCoSS's `token_embed.embeddings_norm`): ids (B, L) -> (B, L, width)."""
    cfg = self.cfg
    if cfg.vocab_size <= 0:
      raise ValueError("text input, but config.model.vocab_size is 0: set it to the stage tokenizer's vocabulary "
                       "size (the report stage does)")
    if tokens.shape[1] > cfg.text_max_len:
      raise ValueError(f"text of {tokens.shape[1]} tokens: longer than config.model.text_max_len="
                       f"{cfg.text_max_len} (the rows of the 1D position table)")
    x = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=nn.initializers.normal(0.02), dtype=cfg.compute_dtype,
                 name="token_embed")(tokens)
    pos = self.param("pos_embed_1d", nn.initializers.normal(0.02), (cfg.text_max_len, cfg.width), jnp.float32)
    x = x + pos[None, :tokens.shape[1]].astype(x.dtype)
    if cfg.embed_norm:
      x = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=cfg.compute_dtype, name="text_embed_norm")(x)
    return x

  @nn.compact
  def encode(self, images: Array, *, mask_ratio: float = 0.0, train: bool = False,
             noise: Array | None = None, attention_mask: Array | None = None) -> tuple[Array, Array, Array]:
    """Returns (tokens (B, 1 + L_keep, width) with CLS first, mask (B, L), ids_restore (B, L)).

    Text ids (B, L) are never dropped (masked language modelling corrupts the ids instead, and `mask_ratio`
    does not apply); `attention_mask` (B, L), 1 for real tokens, keeps padding out of every attention (default:
    the ids that are not config.model.pad_id)."""
    cfg = self.cfg
    attn = None
    if is_text(images):
      x = self.tokenize_text(images)
      b, l, _ = x.shape
      mask = jnp.zeros((b, l))
      ids_restore = jnp.broadcast_to(jnp.arange(l), (b, l))
      keys = images != cfg.pad_id if attention_mask is None else jnp.asarray(attention_mask) > 0
      attn = jnp.concatenate([jnp.ones((b, 1), bool), keys], axis=1)[:, None, None, :]  # CLS is always a key
    else:
      x, _ = self.tokenize(images, train=train)
      b, l, _ = x.shape
      if mask_ratio > 0.0 or noise is not None:
        if noise is None:
          noise = jax.random.uniform(self.make_rng("masking"), (b, l))
        x, mask, ids_restore = random_masking(x, noise, mask_ratio)
      else:
        mask = jnp.zeros((b, l))
        ids_restore = jnp.broadcast_to(jnp.arange(l), (b, l))
    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, cfg.width), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.width)), x], axis=1)
    x = Transformer(depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, drop_path=cfg.drop_path,
                    drop_path_schedule=cfg.drop_path_schedule, layer_scale_init=cfg.layer_scale_init,
                    ln_eps=cfg.ln_eps, final_norm=cfg.final_norm, dtype=cfg.compute_dtype, remat=cfg.remat,
                    sow_tokens=True, name="encoder")(x, train, attn)
    return x, mask, ids_restore

  @nn.compact
  def mlm(self, tokens: Array, attention_mask: Array, mlm_mask: Array, labels: Array, *,
          train: bool = False, max_predictions: int | None = None) -> dict[str, Array]:
    """Masked language modelling: the encoder reads the corrupted ids `tokens` (B, L); the head predicts the
    original ids `labels` at the positions of `mlm_mask` (B, L, 1 = corrupted). Returns dict(loss (mean
    cross-entropy over corrupted positions, float32), logits (B, P, vocab) float32, mask (B, P), positions
    (B, P) int32, tokens (the encoder output (B, 1 + L, width), CLS first: what continual training distils)).

    Without `max_predictions` P = L: every position goes through the head. With it (static; at least the
    number of corrupted positions of every example, `train.mlm.prediction_budget` of the padded length) the
    corrupted positions are gathered first and only P = max_predictions of them reach the vocabulary
    projection, which dominates the step at a large vocabulary; the loss is the same up to float summation
    order. Were an example to have more corrupted positions than P, the extra ones (the last by position)
    would go unscored."""
    cfg = self.cfg
    x, _, _ = self.encode(tokens, train=train, attention_mask=attention_mask)
    h, mask = x[:, 1:], mlm_mask
    positions = jnp.broadcast_to(jnp.arange(h.shape[1], dtype=jnp.int32), mask.shape)
    if max_predictions is not None and int(max_predictions) < h.shape[1]:
      # Corrupted positions first, in position order (a stable sort of the negated mask), then the rest as
      # padding whose mask is 0.
      positions = jnp.argsort(-mask.astype(jnp.int32), axis=1, stable=True)[:, :int(max_predictions)]
      positions = positions.astype(jnp.int32)
      h = jnp.take_along_axis(h, positions[..., None], axis=1)
      mask = jnp.take_along_axis(mask, positions, axis=1)
      labels = jnp.take_along_axis(labels, positions, axis=1)
    # BERT's prediction head: transform (dense, GELU, LayerNorm), then the vocabulary projection.
    h = nn.Dense(cfg.width, dtype=cfg.compute_dtype, kernel_init=_dense_init, name="mlm_transform")(h)
    h = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=cfg.compute_dtype, name="mlm_norm")(nn.gelu(h, approximate=False))
    logits = nn.Dense(cfg.vocab_size, dtype=cfg.compute_dtype, kernel_init=_dense_init, name="mlm_head")(h)
    logits = logits.astype(jnp.float32)
    return dict(loss=mlm_loss(logits, labels, mask), logits=logits, mask=mask.astype(jnp.float32),
                positions=positions, tokens=x)

  @nn.compact
  def decode(self, tokens: Array, ids_restore: Array, grid: Sequence[int], train: bool = False) -> Array:
    """Predicts the pixels of every patch: (B, L, prod(patch) * C) in float32."""
    cfg = self.cfg
    rank = len(grid)
    dw = cfg.decoder_width
    x = nn.Dense(dw, dtype=cfg.compute_dtype, kernel_init=_dense_init, name="decoder_embed")(tokens)
    b, l = ids_restore.shape
    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, dw), jnp.float32)
    n_mask = l + 1 - x.shape[1]
    body = jnp.concatenate([x[:, 1:], jnp.broadcast_to(mask_token.astype(x.dtype), (b, n_mask, dw))], axis=1)
    body = jnp.take_along_axis(body, ids_restore[..., None], axis=1)
    base = cfg.learned_pos_grid_2d if rank == 2 else cfg.learned_pos_grid_3d
    body = body + self._pos(f"decoder_pos_embed_{rank}d", grid, dw, base).astype(body.dtype)
    cls = x[:, :1]
    if cfg.decoder_cls_pos:
      # MedCoSS's learned decoder table has a (trained) row for the CLS token; MAE's sin-cos row is zero.
      cls_pos = self.param(f"decoder_cls_pos_{rank}d", nn.initializers.zeros, (1, 1, dw), jnp.float32)
      cls = cls + cls_pos.astype(cls.dtype)
    x = jnp.concatenate([cls, body], axis=1)
    x = Transformer(depth=cfg.decoder_depth, num_heads=cfg.decoder_heads, mlp_ratio=cfg.mlp_ratio,
                    ln_eps=cfg.decoder_eps, final_norm=True, dtype=cfg.compute_dtype, remat=cfg.remat,
                    name="decoder")(x, train)
    ps = cfg.patch_size(rank)
    out = int(np.prod(ps)) * cfg.channels(rank)
    pred = nn.Dense(out, dtype=cfg.compute_dtype, kernel_init=_dense_init, name=f"decoder_pred_{rank}d")(x)
    return pred[:, 1:].astype(jnp.float32)

  def loss(self, images: Array, pred: Array, mask: Array) -> tuple[Array, Array]:
    """(loss, target): normalised-pixel (or raw-pixel) MSE on masked patches, float32."""
    rank = spatial_rank(images)
    target = patching.patchify(images.astype(jnp.float32), self.cfg.patch_size(rank))
    if self.cfg.norm_pix_loss:
      target = normalized_pixel_targets(target)
    return masked_mse(pred, target, mask), target

  def __call__(self, images: Array, *, mask_ratio: float = 0.75, train: bool = False,
               noise: Array | None = None) -> dict[str, Array]:
    rank = spatial_rank(images)
    grid = patching.grid_shape(images.shape[1:-1], self.cfg.patch_size(rank))
    tokens, mask, ids_restore = self.encode(images, mask_ratio=mask_ratio, train=train, noise=noise)
    pred = self.decode(tokens, ids_restore, grid, train=train)
    loss, target = self.loss(images, pred, mask)
    return dict(loss=loss, pred=pred, target=target, mask=mask, ids_restore=ids_restore)

  def reconstruct(self, images: Array, pred: Array, mask: Array) -> Array:
    """Images with masked patches replaced by the prediction (de-normalised with each patch's own statistics
    when the loss is normalised), for visualisation."""
    rank = spatial_rank(images)
    ps = self.cfg.patch_size(rank)
    grid = patching.grid_shape(images.shape[1:-1], ps)
    patches = patching.patchify(images.astype(jnp.float32), ps)
    if self.cfg.norm_pix_loss:
      mean = patches.mean(-1, keepdims=True)
      std = jnp.sqrt(patches.var(-1, keepdims=True, ddof=1) + 1e-6)
      pred = pred * std + mean
    mixed = jnp.where(mask[..., None] > 0, pred, patches)
    return patching.unpatchify(mixed, grid, ps, images.shape[-1])


def build_mae(model_cfg: ml_collections.ConfigDict | ViTConfig) -> MAE:
  cfg = model_cfg if isinstance(model_cfg, ViTConfig) else ViTConfig.from_config(model_cfg)
  return MAE(cfg=cfg)


def init_mae_params(model: MAE, rng: jax.Array, image_shapes: Sequence[Sequence[int]]) -> Any:
  """Creates the parameters of the trunk and of every tokenizer/head used by `image_shapes`.

  Each shape is a per-example shape, e.g. `[(224, 224, 3), (16, 192, 192, 1)]` creates both the 2D and the 3D
  tokenizers and heads, so one parameter tree carries through 2D and 3D stages; a rank-1 shape `(L,)` is text
  (token ids) and creates the text tokenizer and the MLM head (config.model.vocab_size > 0).
  """
  dummies = [jnp.zeros((1, *s), jnp.int32 if len(s) == 1 else jnp.float32) for s in image_shapes]

  def _all(m: MAE, *xs):
    return [m.mlm(x, jnp.ones_like(x), jnp.ones_like(x), x, train=False) if is_text(x) else
            m(x, mask_ratio=0.75, train=False) for x in xs]

  def _init(key):
    rngs = {"params": key, "masking": jax.random.fold_in(key, 1), "dropout": jax.random.fold_in(key, 2)}
    return model.init(rngs, *dummies, method=_all)["params"]

  # Jitted: run eagerly, flax would compile every initialiser on its own (tens of seconds on a CPU).
  return jax.jit(_init)(rng)


def block_tokens(intermediates: Any) -> list[Array]:
  """The tokens each encoder block sowed, ordered by block: a list of (B, 1 + L_keep, width)."""
  enc = intermediates["encoder"] if "encoder" in intermediates else intermediates["intermediates"]["encoder"]
  keys = sorted((k for k in enc if k.startswith("block_")), key=lambda k: int(k.split("_")[1]))
  return [enc[k]["tokens"][0] for k in keys]
