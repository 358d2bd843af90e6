"""PyTorch <-> Flax: hand-written PyTorch reference models with random weights give the same outputs as our MAE.

The references follow facebookresearch/mae `models_mae.py` (timm `Block`, fixed 2D sin-cos tables, `norm`),
timm `VisionTransformer.forward_features`, and MedCoSS `Unified_Model` (`TransformerEncoderLayer` with
`nn.MultiheadAttention` and layer scale, `VideoBaseEmbedding` with `Divide_ST_POS` and a LayerNorm, learned
decoder tables with a CLS row). The only change to the references is a `noise` argument to `random_masking`,
so both sides mask the same patches. Sizes are tiny; weights and inputs are random (a numeric comparison).
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn
from safetensors.torch import load_file as torch_load_safetensors  # noqa: E402
from safetensors.torch import save_file as torch_save_safetensors  # noqa: E402

from invcoss_jax import interop, models  # noqa: E402

RTOL = 1e-5
PATCH = 8


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def to_np(t):
  return t.detach().cpu().numpy()


# --- MAE's fixed 2D sin-cos table (util/pos_embed.py) -------------------------------------------------------

def mae_1d_sincos(embed_dim, pos):
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000 ** omega
  out = np.einsum("m,d->md", pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def mae_2d_sincos(embed_dim, grid_size, cls_token=False):
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
  emb = np.concatenate([mae_1d_sincos(embed_dim // 2, grid[0]), mae_1d_sincos(embed_dim // 2, grid[1])], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
  return emb


# --- timm building blocks ------------------------------------------------------------------------------------

class Attention(tnn.Module):
  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = tnn.Linear(dim, dim * 3, bias=True)
    self.proj = tnn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(tnn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = tnn.Linear(dim, hidden), tnn.GELU(), tnn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class LayerScale(tnn.Module):
  def __init__(self, dim, init_values):
    super().__init__()
    self.gamma = tnn.Parameter(init_values * torch.ones(dim))

  def forward(self, x):
    return x * self.gamma


class Block(tnn.Module):
  def __init__(self, dim, num_heads, mlp_ratio, eps, init_values=None):
    super().__init__()
    self.norm1 = tnn.LayerNorm(dim, eps=eps)
    self.attn = Attention(dim, num_heads)
    self.ls1 = LayerScale(dim, init_values) if init_values else tnn.Identity()
    self.norm2 = tnn.LayerNorm(dim, eps=eps)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.ls2 = LayerScale(dim, init_values) if init_values else tnn.Identity()

  def forward(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(tnn.Module):
  def __init__(self, patch, in_chans, dim, rank):
    super().__init__()
    conv = tnn.Conv2d if rank == 2 else tnn.Conv3d
    self.proj = conv(in_chans, dim, kernel_size=patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


def random_masking(x, mask_ratio, noise):
  n, l, d = x.shape
  len_keep = int(l * (1 - mask_ratio))
  ids_shuffle = torch.argsort(noise, dim=1)
  ids_restore = torch.argsort(ids_shuffle, dim=1)
  x_masked = torch.gather(x, dim=1, index=ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, d))
  mask = torch.ones([n, l])
  mask[:, :len_keep] = 0
  return x_masked, torch.gather(mask, dim=1, index=ids_restore), ids_restore


def patchify(imgs, patch):
  """MAE's patchify ('nchpwq->nhwpqc') and MedCoSS's 3D variant ('ncdkhpwq->ndhwkpqc')."""
  if imgs.ndim == 4:
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // patch, patch, w // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, -1, patch ** 2 * c)
  n, c, d, h, w = imgs.shape
  x = imgs.reshape(n, c, d // patch, patch, h // patch, patch, w // patch, patch)
  return torch.einsum("ncdkhpwq->ndhwkpqc", x).reshape(n, -1, patch ** 3 * c)


def mae_loss(imgs, pred, mask, patch):
  target = patchify(imgs, patch)
  mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
  target = (target - mean) / (var + 1.e-6) ** .5
  loss = ((pred - target) ** 2).mean(dim=-1)
  return (loss * mask).sum() / mask.sum()


# --- models_mae.MaskedAutoencoderViT (2D, and the same with a Conv3d patch embedding) -------------------------

class TorchMAE(tnn.Module):
  def __init__(self, img_size, in_chans, dim, depth, heads, dec_dim, dec_depth, dec_heads, mlp_ratio=4.0,
               eps=1e-6, init_values=None):
    super().__init__()
    rank = len(img_size)
    self.rank = rank
    self.patch_embed = PatchEmbed(PATCH, in_chans, dim, rank)
    num_patches = int(np.prod([s // PATCH for s in img_size]))
    self.cls_token = tnn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = tnn.Parameter(torch.zeros(1, num_patches + 1, dim), requires_grad=False)
    self.blocks = tnn.ModuleList([Block(dim, heads, mlp_ratio, eps, init_values) for _ in range(depth)])
    self.norm = tnn.LayerNorm(dim, eps=eps)
    self.decoder_embed = tnn.Linear(dim, dec_dim, bias=True)
    self.mask_token = tnn.Parameter(torch.zeros(1, 1, dec_dim))
    self.decoder_pos_embed = tnn.Parameter(torch.zeros(1, num_patches + 1, dec_dim), requires_grad=False)
    self.decoder_blocks = tnn.ModuleList([Block(dec_dim, dec_heads, mlp_ratio, eps) for _ in range(dec_depth)])
    self.decoder_norm = tnn.LayerNorm(dec_dim, eps=eps)
    self.decoder_pred = tnn.Linear(dec_dim, PATCH ** rank * in_chans, bias=True)

  def forward_encoder(self, x, mask_ratio, noise):
    x = self.patch_embed(x)
    x = x + self.pos_embed[:, 1:, :]
    x, mask, ids_restore = random_masking(x, mask_ratio, noise)
    cls_token = self.cls_token + self.pos_embed[:, :1, :]
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x), mask, ids_restore

  def forward_decoder(self, x, ids_restore):
    x = self.decoder_embed(x)
    mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

  def forward(self, imgs, mask_ratio, noise):
    latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
    pred = self.forward_decoder(latent, ids_restore)
    return mae_loss(imgs, pred, mask, PATCH), pred, mask, latent


# --- timm VisionTransformer.forward_features (what an exported file is loaded into) ---------------------------

class TorchViT(tnn.Module):
  def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio=4.0, qkv_bias=True,
               init_values=None, final_norm=True, class_token=True, global_pool="token", num_classes=0,
               eps=1e-6):
    super().__init__()
    assert qkv_bias and class_token and global_pool == "token" and num_classes == 0
    rank = len(img_size)
    self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, rank)
    n = int(np.prod([s // patch_size for s in img_size]))
    self.cls_token = tnn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = tnn.Parameter(torch.zeros(1, n + 1, embed_dim))
    self.blocks = tnn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, eps, init_values) for _ in range(depth)])
    self.norm = tnn.LayerNorm(embed_dim, eps=eps) if final_norm else tnn.Identity()

  def forward_features(self, x):
    x = self.patch_embed(x)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    return self.norm(self.blocks(x))


# --- MedCoSS Unified_Model (model/Unimodel.py, model/Base_module.py) -----------------------------------------

class MedCoSSEncoderLayer(tnn.Module):
  """TransformerEncoderLayer(norm_first=True, batch_first=True, activation='gelu', layer_scale=True)."""

  def __init__(self, d_model, nhead, dim_feedforward, ls_init_values=1e-3, layer_norm_eps=1e-5):
    super().__init__()
    self.self_attn = tnn.MultiheadAttention(d_model, nhead, dropout=0.0, batch_first=True)
    self.linear1 = tnn.Linear(d_model, dim_feedforward)
    self.linear2 = tnn.Linear(dim_feedforward, d_model)
    self.norm1 = tnn.LayerNorm(d_model, eps=layer_norm_eps)
    self.norm2 = tnn.LayerNorm(d_model, eps=layer_norm_eps)
    self.gamma_1 = tnn.Parameter(ls_init_values * torch.ones(d_model))
    self.gamma_2 = tnn.Parameter(ls_init_values * torch.ones(d_model))

  def forward(self, x):
    y = self.norm1(x)
    x = x + self.gamma_1 * self.self_attn(y, y, y, need_weights=False)[0]
    return x + self.gamma_2 * self.linear2(torch.nn.functional.gelu(self.linear1(self.norm2(x))))


class NNEmbeddingEncoding(tnn.Module):
  def __init__(self, dim, max_len):
    super().__init__()
    self.position_embeddings = tnn.Embedding(max_len, dim)


class DivideSTPos(tnn.Module):
  def __init__(self, num_patches, max_time_len, out_dim):
    super().__init__()
    self.spatial_pos_embed = tnn.Embedding(num_patches, out_dim)
    self.temporal_pos_embed = tnn.Embedding(max_time_len, out_dim)
    self.max_frames = max_time_len
    self.temporal_row = None  # test hook: the row MedCoSS draws at random in training

  def forward(self, x):
    temp_len, spatial_size = x.size(1), x.size(2)
    if self.training:
      start = self.temporal_row if self.temporal_row is not None else int(
          torch.randint(0, self.max_frames - temp_len + 1, size=(1,)))
      temporal_pos_ids = torch.arange(temp_len) + start
    else:
      temporal_pos_ids = torch.arange(temp_len)
    return (self.temporal_pos_embed(temporal_pos_ids).unsqueeze(1)
            + self.spatial_pos_embed(torch.arange(spatial_size)).unsqueeze(0))


class VideoBaseEmbedding(tnn.Module):
  def __init__(self, dim, max_2d, max_3d):
    super().__init__()
    self.embeddings_norm = tnn.LayerNorm(dim)  # default eps 1e-5
    self.embeddings_pos = NNEmbeddingEncoding(dim, 40)  # unused in forward, as in MedCoSS
    self.embeddings_type = tnn.Embedding(1, dim)  # unused in forward, as in MedCoSS
    self.embeddings_st_pos_2D = DivideSTPos(max_2d, 8, dim)
    self.embeddings_st_pos_3D = DivideSTPos(max_3d, 8, dim)
    self.embeddings = tnn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)
    self.embeddings_3D = tnn.Conv3d(1, dim, kernel_size=PATCH, stride=PATCH)

  def forward(self, data):
    conv, st = (self.embeddings, self.embeddings_st_pos_2D) if data.dim() == 4 else \
        (self.embeddings_3D, self.embeddings_st_pos_3D)
    x = conv(data).flatten(2)  # (b, c, L) -> rearrange '(b t s) c hw -> b t hw (s c)' with t = s = 1
    emb = x.transpose(1, 2).unsqueeze(1)
    pos = st(emb).unsqueeze(0).flatten(1, 2)
    emb = emb.flatten(1, 2) + pos
    return self.embeddings_norm(emb)


class TokenBaseEmbedding(tnn.Module):
  """Uni-Perceiver's text tokenizer as MedCoSS uses it: ids -> LN(embedding + position + token type 0)."""

  def __init__(self, dim, vocab_size, max_len=512):
    super().__init__()
    self.embeddings = tnn.Embedding(vocab_size, dim)
    self.embeddings_norm = tnn.LayerNorm(dim)
    self.embeddings_pos = NNEmbeddingEncoding(dim, max_len)
    self.embeddings_token_type = tnn.Embedding(2, dim)

  def forward(self, input_ids):
    x = self.embeddings(input_ids)
    x = x + self.embeddings_pos.position_embeddings(torch.arange(input_ids.size(1)))
    x = x + self.embeddings_token_type.weight[0].unsqueeze(0).unsqueeze(1)
    return self.embeddings_norm(x)


class TorchMedCoSS(tnn.Module):
  def __init__(self, now_2d, now_3d, max_2d, max_3d, dim=32, depth=2, heads=4, dec_dim=32, dec_depth=1,
               dec_heads=4, vocab=11):
    super().__init__()
    self.fused_encoder = tnn.Module()
    self.fused_encoder.layers = tnn.ModuleList([MedCoSSEncoderLayer(dim, heads, 4 * dim) for _ in range(depth)])
    self.token_embed = TokenBaseEmbedding(dim, vocab)
    self.video_embed = VideoBaseEmbedding(dim, max_2d, max_3d)
    self.cls_token = tnn.Parameter(torch.zeros(1, 1, dim))
    self.decoder_embed = tnn.Linear(dim, dec_dim, bias=True)
    self.mask_token = tnn.Parameter(torch.zeros(1, 1, dec_dim))
    n2, n3 = int(np.prod([s // PATCH for s in now_2d])), int(np.prod([s // PATCH for s in now_3d]))
    self.decoder_pos_embed_1D = tnn.Embedding(2, dim)
    self.decoder_pos_embed_2D = tnn.Parameter(torch.zeros(1, n2 + 1, dec_dim))
    self.decoder_pos_embed_3D = tnn.Parameter(torch.zeros(1, n3 + 1, dec_dim))
    self.decoder_blocks = tnn.ModuleList([Block(dec_dim, dec_heads, 4.0, 1e-6) for _ in range(dec_depth)])
    self.decoder_norm = tnn.LayerNorm(dec_dim, eps=1e-6)
    self.decoder_pred_2D = tnn.Linear(dec_dim, PATCH ** 2 * 3, bias=True)
    self.decoder_pred_3D = tnn.Linear(dec_dim, PATCH ** 3 * 1, bias=True)
    self.mlm_head = tnn.Module()
    self.mlm_head.transform = tnn.Module()
    self.mlm_head.transform.dense = tnn.Linear(dim, dim)

  def forward(self, imgs, mask_ratio, noise):
    x, mask, ids_restore = random_masking(self.video_embed(imgs), mask_ratio, noise)
    x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for layer in self.fused_encoder.layers:
      x = layer(x)
    latent = x
    x = self.decoder_embed(x)
    mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + (self.decoder_pos_embed_2D if imgs.dim() == 4 else self.decoder_pos_embed_3D)
    for blk in self.decoder_blocks:
      x = blk(x)
    x = self.decoder_norm(x)
    pred = (self.decoder_pred_2D if imgs.dim() == 4 else self.decoder_pred_3D)(x)[:, 1:, :]
    return mae_loss(imgs, pred, mask, PATCH), pred, mask, latent


# --- helpers ----------------------------------------------------------------------------------------------------

def randomize(module: tnn.Module, seed: int) -> tnn.Module:
  """Random weights of a realistic scale: LayerNorm scales near 1, matrices ~ 1/sqrt(fan_in), tokens ~ 0.5."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      leaf = name.split(".")[-1]
      if leaf in ("cls_token", "mask_token") or "pos_embed" in name or isinstance(_owner(module, name),
                                                                                  tnn.Embedding):
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
      elif p.ndim >= 2:
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p[0].numel()))
      elif "norm" in name and leaf == "weight":
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
  return module.eval()


def _owner(module, name):
  for part in name.split(".")[:-1]:
    module = getattr(module, part)
  return module


def tiny_cfg(**overrides):
  cfg = models.model_config("micro")
  cfg.update(dict(width=32, depth=2, num_heads=4, decoder_width=32, decoder_depth=1, decoder_heads=4,
                  patch_size_2d=(PATCH, PATCH), patch_size_3d=(PATCH,) * 3, learned_pos_grid_2d=(4, 4),
                  learned_pos_grid_3d=(2, 2, 2)))
  cfg.update(overrides)
  return cfg


def init_params(cfg, shapes, seed=0):
  """Random parameters with the tree of `init_mae_params` (shapes by tracing only, which keeps tests fast):
  LayerNorm scales near 1, everything else ~ N(0, 0.1)."""
  model = models.build_mae(cfg)
  tree = jax.eval_shape(lambda r: models.init_mae_params(model, r, shapes), jax.random.key(0))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: ((1.0 if path[-1].key == "scale" else 0.0)
                       + 0.1 * rng.standard_normal(s.shape)).astype(np.float32), tree)


def images(shape, seed):
  """(channels-last for JAX, channels-first for PyTorch) random images."""
  x = np.random.default_rng(seed).uniform(size=shape).astype(np.float32)
  return x, torch.from_numpy(np.moveaxis(x, -1, 1).copy())


def noise_for(b, l, seed):
  n = np.random.default_rng(seed).uniform(size=(b, l)).astype(np.float32)
  return n, torch.from_numpy(n)


@functools.partial(jax.jit, static_argnums=(0, 4))
def forward_and_encode(model, params, x, noise, mask_ratio):
  """One compiled program per model and shape (much faster than op-by-op on a busy CPU)."""
  out = model.apply({"params": params}, x, mask_ratio=mask_ratio, noise=noise)
  tokens, _, _ = model.apply({"params": params}, x, mask_ratio=mask_ratio, noise=noise, method=models.MAE.encode)
  return out, tokens


@functools.partial(jax.jit, static_argnums=(0,))
def encode_all(model, params, x):
  return model.apply({"params": params}, x, mask_ratio=0.0, method=models.MAE.encode)[0]


def assert_same_mae(model, params, torch_model, x, xt, mask_ratio, seed=5):
  """Encoder tokens, mask, prediction and loss of both sides on the same patches."""
  b = x.shape[0]
  l = int(np.prod([s // PATCH for s in x.shape[1:-1]]))
  noise, noise_t = noise_for(b, l, seed)
  out, tokens = forward_and_encode(model, params, jnp.asarray(x), jnp.asarray(noise), mask_ratio)
  with torch.no_grad():
    loss_t, pred_t, mask_t, latent_t = torch_model(xt, mask_ratio, noise_t)
  np.testing.assert_array_equal(np.asarray(out["mask"]), to_np(mask_t))
  assert rel_err(tokens, to_np(latent_t)) < RTOL
  assert rel_err(out["pred"], to_np(pred_t)) < RTOL
  if mask_ratio > 0:  # no masked patch: PyTorch's loss is 0 / 0
    assert abs(float(out["loss"]) - float(loss_t)) <= RTOL * abs(float(loss_t))


# --- MAE / timm import ------------------------------------------------------------------------------------------

def test_mae_2d_pth_with_training_wrapper_matches_pytorch(tmp_path):
  tm = randomize(TorchMAE((32, 32), 3, 32, 2, 4, 32, 1, 4), seed=0)
  with torch.no_grad():  # MAE's fixed tables, as initialize_weights() sets them
    tm.pos_embed.copy_(torch.from_numpy(mae_2d_sincos(32, 4, cls_token=True)).float()[None])
    tm.decoder_pos_embed.copy_(torch.from_numpy(mae_2d_sincos(32, 4, cls_token=True)).float()[None])
  path = tmp_path / "checkpoint-799.pth"  # what MAE's misc.save_model writes
  torch.save({"model": tm.state_dict(), "optimizer": {"state": {}}, "epoch": 799,
              "args": argparse.Namespace(lr=1.5e-4, norm_pix_loss=True)}, path)
  cfg = tiny_cfg(**interop.model_overrides("mae"))
  model = models.build_mae(cfg)
  params0 = init_params(cfg, [(32, 32, 3), (16, 16, 16, 1)])
  params = interop.load_torch_into_params(path, params0, cfg)
  x, xt = images((2, 32, 32, 3), seed=1)
  assert_same_mae(model, params, tm, x, xt, 0.75)
  # The 3D tokenizer and head the 2D checkpoint does not have are kept as they were.
  np.testing.assert_array_equal(params["patch_embed_3d"]["kernel"], params0["patch_embed_3d"]["kernel"])
  np.testing.assert_array_equal(params["decoder_pred_3d"]["kernel"], params0["decoder_pred_3d"]["kernel"])


def test_mae_3d_learned_tables_and_layer_scale_match_pytorch(tmp_path):
  tm = randomize(TorchMAE((16, 16, 16), 1, 32, 2, 4, 32, 1, 4, eps=1e-6, init_values=0.1), seed=2)
  path = tmp_path / "mae3d.safetensors"
  torch_save_safetensors({k: v.contiguous() for k, v in tm.state_dict().items()}, str(path))
  # Trained (random) tables with non-zero CLS rows: the encoder row folds into cls_token, the decoder row
  # needs decoder_cls_pos.
  cfg = tiny_cfg(pos_embed="learned", layer_scale_init=0.1, decoder_cls_pos=True)
  model = models.build_mae(cfg)
  params = interop.load_torch_into_params(path, init_params(cfg, [(16, 16, 16, 1)]), cfg, layout="mae")
  x, xt = images((2, 16, 16, 16, 1), seed=3)
  assert_same_mae(model, params, tm, x, xt, 0.5)


# --- MedCoSS import ---------------------------------------------------------------------------------------------

def _medcoss():
  # Tables sized for larger images than the ones used (as MedCoSS's 512 x 512 / 256^3 tables), so only their
  # first rows are read.
  return randomize(TorchMedCoSS(now_2d=(32, 32), now_3d=(16, 16, 16), max_2d=64, max_3d=27), seed=4)


def _medcoss_cfg():
  over = interop.model_overrides("medcoss")
  keep = {k: v for k, v in over.items() if k not in ("width", "depth", "num_heads", "decoder_width", "decoder_depth",
                                                     "decoder_heads", "patch_size_2d", "patch_size_3d",
                                                     "learned_pos_grid_2d", "learned_pos_grid_3d")}
  return tiny_cfg(**keep)


def test_medcoss_2d_and_3d_match_pytorch():
  tm = _medcoss()
  cfg = _medcoss_cfg()
  model = models.build_mae(cfg)
  sd = {k: to_np(v) for k, v in tm.state_dict().items()}
  params, report = interop.convert_state_dict(sd, init_params(cfg, [(32, 32, 3), (16, 16, 16, 1)]), cfg)
  assert report.layout == "medcoss" and not report.kept
  assert {k for k, why in report.ignored.items() if "text" in why} == {
      k for k in sd if k.startswith(("token_embed.", "mlm_head.", "decoder_pos_embed_1D."))}
  assert "video_embed.embeddings_pos.position_embeddings.weight" in report.ignored
  for shape, seed in (((2, 32, 32, 3), 5), ((2, 16, 16, 16, 1), 6)):
    x, xt = images(shape, seed)
    assert_same_mae(model, params, tm, x, xt, 0.75, seed=seed)


def test_medcoss_text_tokenizer_maps_where_the_vocabularies_match():
  """With config.model's vocabulary (the first V ids of MedCoSS's 49411-row table, e.g. Bio_ClinicalBERT's
  vocab.txt), the text tokenizer gives Uni-Perceiver's embedding exactly: table rows, positions with the
  token-type row folded in, and the text tokenizer's own LayerNorm."""
  tm = _medcoss()
  cfg = _medcoss_cfg()
  cfg.update(dict(vocab_size=7, text_max_len=16))
  model = models.build_mae(cfg)
  sd = {k: to_np(v) for k, v in tm.state_dict().items()}
  params, report = interop.convert_state_dict(sd, init_params(cfg, [(32, 32, 3), (16, 16, 16, 1), (16,)]), cfg)
  assert not [k for k in report.ignored if k.startswith("token_embed.")]
  assert {k for k, why in report.ignored.items() if "MLM head" in why} == {
      k for k in sd if k.startswith(("mlm_head.", "decoder_pos_embed_1D."))}
  ids = np.random.default_rng(3).integers(0, 7, size=(2, 12))
  ours = jax.jit(lambda p, t: model.apply({"params": p}, t, method=models.MAE.tokenize_text))(params, jnp.asarray(ids))
  theirs = to_np(tm.token_embed(torch.as_tensor(ids)))
  assert rel_err(ours, theirs) < RTOL
  # The image tokenizer's LayerNorm is not the text one's.
  assert not np.allclose(params["text_embed_norm"]["scale"], params["embed_norm"]["scale"])
  cfg.update(dict(vocab_size=12))  # more ids than MedCoSS's table has: refused with the shapes
  with pytest.raises(interop.CheckpointMismatchError, match="token_embed.embeddings.weight"):
    interop.convert_state_dict(sd, init_params(cfg, [(32, 32, 3), (16, 16, 16, 1), (16,)]), cfg)


def test_medcoss_training_draws_one_temporal_row_per_batch():
  tm = _medcoss()
  cfg = _medcoss_cfg()
  cfg.drop_path = 0.0  # the reference has no stochastic depth; only the temporal row is random here
  model = models.build_mae(cfg)
  sd = {k: to_np(v) for k, v in tm.state_dict().items()}
  params, _ = interop.convert_state_dict(sd, init_params(cfg, [(32, 32, 3)]), cfg)
  x, xt = images((2, 32, 32, 3), seed=7)
  noise, noise_t = noise_for(2, 16, seed=8)
  tm.train()
  ref = []
  for row in range(8):  # PyTorch training forward with each possible temporal row
    tm.video_embed.embeddings_st_pos_2D.temporal_row = row
    with torch.no_grad():
      ref.append(to_np(tm(xt, 0.75, noise_t)[3]))
  encode = jax.jit(lambda p, k: model.apply({"params": p}, jnp.asarray(x), mask_ratio=0.75, noise=jnp.asarray(noise),
                                            train=True, rngs={"dropout": k}, method=models.MAE.encode)[0])
  seen = set()
  for k in range(6):
    tokens = encode(params, jax.random.key(k))
    errs = [rel_err(tokens, r) for r in ref]
    assert min(errs) < RTOL
    seen.add(int(np.argmin(errs)))
  assert len(seen) > 1


# --- export -------------------------------------------------------------------------------------------------------

def _reload_in_torch(path):
  meta = interop.read_export_metadata(path)
  kwargs = dict(meta["timm_kwargs"], img_size=tuple(meta["timm_kwargs"]["img_size"]))
  tv = TorchViT(**kwargs, eps=meta["layer_norm_eps"]).eval()
  tv.load_state_dict(torch_load_safetensors(str(path)), strict=True)  # the one call a PyTorch user makes
  return tv


@pytest.mark.parametrize("rank,overrides,size", [
    (2, dict(), None),
    (3, dict(pos_embed="learned", layer_scale_init=0.1, final_norm=False, ln_eps=1e-5), None),
    (2, dict(pos_embed="learned", temporal_pos_len=3), (48, 40)),  # learned table interpolated to another grid
])
def test_export_reloads_in_pytorch_with_the_same_outputs(tmp_path, rank, overrides, size):
  cfg = tiny_cfg(**overrides)
  model = models.build_mae(cfg)
  shape = (32, 32, 3) if rank == 2 else (16, 16, 16, 1)
  params = init_params(cfg, [shape], seed=1)
  path = tmp_path / f"encoder_{rank}d.safetensors"
  interop.export_timm_encoder(params, cfg, path, rank=rank, image_size=size)
  tv = _reload_in_torch(path)
  x, xt = images((2, *(size or shape[:-1]), shape[-1]), seed=9)
  tokens = encode_all(model, params, jnp.asarray(x))
  with torch.no_grad():
    ref = to_np(tv.forward_features(xt))
  assert rel_err(tokens, ref) < RTOL


def test_import_then_export_gives_back_the_encoder_tensors(tmp_path):
  tv = randomize(TorchViT((32, 32), PATCH, 3, 32, 2, 4), seed=10)
  with torch.no_grad():
    tv.pos_embed.copy_(torch.from_numpy(mae_2d_sincos(32, 4, cls_token=True)).float()[None])
  sd = {k: to_np(v) for k, v in tv.state_dict().items()}
  cfg = tiny_cfg()
  params, report = interop.convert_state_dict(sd, init_params(cfg, [(32, 32, 3)]), cfg)
  assert report.layout == "timm" and "decoder" in report.kept
  out, meta = interop.timm_state_dict(params, cfg, rank=2)
  assert set(out) == set(sd) and meta["timm_kwargs"]["img_size"] == [32, 32]
  for k in sd:
    np.testing.assert_allclose(out[k], sd[k], rtol=0, atol=1e-6, err_msg=k)


def test_export_refuses_the_tokenizer_layernorm():
  cfg = tiny_cfg(embed_norm=True)
  with pytest.raises(ValueError, match="embed_norm.*norm_pre"):
    interop.timm_state_dict(init_params(cfg, [(32, 32, 3)]), cfg, rank=2)


def test_export_torch_job_writes_loadable_files(tmp_path):
  from invcoss_jax import defaults
  from invcoss_jax.jobs import export_torch as job
  from invcoss_jax.train import checkpoint as ckpt_lib

  stage = tmp_path / "stage"
  config = defaults.base_config()
  config.model = tiny_cfg()
  params = init_params(config.model, [(32, 32, 3)])
  ckpt_lib.write_config(stage, config)
  manager = ckpt_lib.make_manager(stage)
  ckpt_lib.save(manager, 3, {"params": params}, None, config, force=True)
  manager.wait_until_finished()
  manager.close()

  export_cfg = defaults.base_config()
  export_cfg.mode = "export_torch"
  export_cfg.init_from = str(stage)
  out = job.run_export(export_cfg, tmp_path / "export_run")
  assert set(out) == {"2d"}
  tv = _reload_in_torch(out["2d"])
  x, xt = images((1, 32, 32, 3), seed=11)
  tokens = encode_all(models.build_mae(config.model), params, jnp.asarray(x))
  with torch.no_grad():
    assert rel_err(tokens, to_np(tv.forward_features(xt))) < RTOL
  export_cfg.interop = interop.interop_config()
  export_cfg.interop.export_dims = ("3d",)
  with pytest.raises(ValueError, match="none of config.interop.export_dims"):
    job.run_export(export_cfg, tmp_path / "export_run")


# --- errors -------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _mae_sd(depth=2, dim=32, seed=12):
  tm = randomize(TorchMAE((32, 32), 3, dim, depth, 4, 32, 1, 4), seed=seed)
  with torch.no_grad():
    tm.pos_embed.copy_(torch.from_numpy(mae_2d_sincos(dim, 4, cls_token=True)).float()[None])
    tm.decoder_pos_embed.copy_(torch.from_numpy(mae_2d_sincos(32, 4, cls_token=True)).float()[None])
  return {k: to_np(v) for k, v in tm.state_dict().items()}


def _convert(sd, **overrides):
  cfg = tiny_cfg(**overrides)
  return interop.convert_state_dict(sd, init_params(cfg, [(32, 32, 3)]), cfg)


def test_missing_and_unexpected_keys_are_listed_with_hints():
  sd = dict(_mae_sd())
  del sd["blocks.1.attn.qkv.weight"]
  sd["blocks.1.attn.extra"] = np.zeros(3, np.float32)
  with pytest.raises(interop.CheckpointMismatchError) as e:
    _convert(sd)
  msg = str(e.value)
  assert "missing keys" in msg and "blocks.1.attn.qkv.weight -> encoder/block_1/attn/query/kernel" in msg
  assert "unexpected keys" in msg and "blocks.1.attn.extra" in msg
  with pytest.raises(interop.CheckpointMismatchError) as e:
    _convert(_mae_sd(depth=3))
  msg = str(e.value)
  assert "blocks.2.norm1.weight" in msg and "3 encoder blocks: config.model.depth=2" in msg


def test_shape_mismatches_are_listed():
  with pytest.raises(interop.CheckpointMismatchError) as e:
    _convert(_mae_sd(dim=48))
  msg = str(e.value)
  assert "shape mismatches" in msg
  assert "patch_embed.proj.weight: checkpoint (48, 3, 8, 8), model expects (32, 3, 8, 8)" in msg
  assert "width is 48: config.model.width=32" in msg


def test_config_that_cannot_express_the_checkpoint_is_reported():
  sd = dict(_mae_sd())
  sd["pos_embed"] = sd["pos_embed"] + 0.5  # a trained table in a checkpoint read as fixed sin-cos
  with pytest.raises(interop.CheckpointMismatchError, match="pos_embed is not the fixed sin-cos.*pos_embed='learned'"):
    _convert(sd)
  with pytest.raises(interop.CheckpointMismatchError) as e:  # MAE has a final norm, no layer scale
    _convert(_mae_sd(), final_norm=False, layer_scale_init=0.1)
  msg = str(e.value)
  assert "unexpected keys" in msg and "norm.weight" in msg and "config.model.final_norm=False" in msg
  assert "blocks.0.ls1.gamma -> encoder/block_0/ls1/gamma" in msg and "layer_scale_init=0.1" in msg
  # A MedCoSS checkpoint read with the MAE defaults names every setting to change.
  sd = {k: to_np(v) for k, v in _medcoss().state_dict().items()}
  with pytest.raises(interop.CheckpointMismatchError) as e:
    _convert(sd)
  msg = str(e.value)
  for hint in ("embed_norm=False", "temporal_pos_len=0", "pos_embed='learned'", "final_norm=True",
               "layer_scale_init=0.0"):
    assert hint in msg, hint


def test_layouts_are_detected_and_unknown_ones_refused():
  assert interop.detect_layout(_mae_sd()) == "mae"
  assert interop.detect_layout({k: v for k, v in _mae_sd().items() if not k.startswith(("decoder", "mask"))}) == "timm"
  with pytest.raises(ValueError, match="cannot tell the checkpoint layout"):
    interop.detect_layout({"conv1.weight": np.zeros((1,))})
  cfg = tiny_cfg()
  with pytest.raises(ValueError, match="layout 'swin' is unknown"):
    interop.load_torch_into_params("unused.pth", {}, cfg, layout="swin")
