"""The PyTorch implementation the JAX steps are compared with: the same ViT-MAE pre-training step and the same
inversion step (InvUNet + frozen ViT-MAE + L_norm, L_task, L_img, L_rep), written the way a PyTorch user would
(facebookresearch/mae `models_mae.py` naming, `F.scaled_dot_product_attention`, channels-first convolutions).

Only for benchmarks and their tests: nothing in `invcoss_jax` imports it. The architecture follows
`config.model` (`invcoss_jax.models.ViTConfig`) and `config.inversion` exactly, so with the same weights the
losses equal the JAX ones (tests/test_scale_bench.py), and the FLOPs per step are the same.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from invcoss_jax.models.pos_embed import sincos_grid


# ----------------------------------------------------------------------------------------------------------
# ViT-MAE


class Block(nn.Module):
  def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float):
    super().__init__()
    self.heads = heads
    self.norm1 = nn.LayerNorm(width, eps=eps)
    self.attn = nn.Module()
    self.attn.qkv = nn.Linear(width, 3 * width)
    self.attn.proj = nn.Linear(width, width)
    self.norm2 = nn.LayerNorm(width, eps=eps)
    self.mlp = nn.Module()
    self.mlp.fc1 = nn.Linear(width, int(width * mlp_ratio))
    self.mlp.fc2 = nn.Linear(int(width * mlp_ratio), width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, t, d = x.shape
    qkv = self.attn.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    x = x + self.attn.proj(y.transpose(1, 2).reshape(b, t, d))
    return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class MAE(nn.Module):
  """MAE with a Conv2d/Conv3d patch embedding (by `rank`) and fixed sin-cos position embeddings."""

  def __init__(self, cfg, image_shape: Sequence[int]):
    super().__init__()
    self.cfg = cfg
    rank = len(image_shape) - 1
    self.rank = rank
    self.patch = tuple(cfg.patch_size(rank))
    self.channels = cfg.channels(rank)
    self.grid = tuple(s // p for s, p in zip(image_shape[:-1], self.patch))
    num = math.prod(self.grid)
    conv = nn.Conv2d if rank == 2 else nn.Conv3d
    self.patch_embed = nn.Module()
    self.patch_embed.proj = conv(self.channels, cfg.width, self.patch, stride=self.patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
    self.register_buffer("pos_embed", self._table(cfg.width, num))
    self.blocks = nn.ModuleList(Block(cfg.width, cfg.num_heads, cfg.mlp_ratio, cfg.ln_eps) for _ in range(cfg.depth))
    self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
    self.decoder_embed = nn.Linear(cfg.width, cfg.decoder_width)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_width))
    self.register_buffer("decoder_pos_embed", self._table(cfg.decoder_width, num))
    eps = cfg.decoder_eps
    self.decoder_blocks = nn.ModuleList(Block(cfg.decoder_width, cfg.decoder_heads, cfg.mlp_ratio, eps)
                                        for _ in range(cfg.decoder_depth))
    self.decoder_norm = nn.LayerNorm(cfg.decoder_width, eps=eps)
    self.decoder_pred = nn.Linear(cfg.decoder_width, math.prod(self.patch) * self.channels)

  def _table(self, width: int, num: int) -> torch.Tensor:
    table = np.concatenate([np.zeros((1, width), np.float32), sincos_grid(width, self.grid)], axis=0)
    assert table.shape[0] == num + 1
    return torch.from_numpy(table)[None]

  def patchify(self, images: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, L, prod(patch) * C), patch vectors in (*patch, C) order as the JAX model."""
    b, c = images.shape[:2]
    shape, perm = [b, c], [0]
    for g, p in zip(self.grid, self.patch):
      shape += [g, p]
    r = self.rank
    perm += [2 + 2 * i for i in range(r)] + [3 + 2 * i for i in range(r)] + [1]
    x = images.reshape(shape).permute(perm)
    return x.reshape(b, math.prod(self.grid), math.prod(self.patch) * c)

  def encode(self, images: torch.Tensor, noise: torch.Tensor | None, mask_ratio: float, taps: list | None = None):
    x = self.patch_embed.proj(images).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
    b, l, d = x.shape
    if noise is not None:
      keep = int(l * (1 - mask_ratio))
      ids_shuffle = torch.argsort(noise, dim=1)
      ids_restore = torch.argsort(ids_shuffle, dim=1)
      x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
      mask = torch.ones(b, l, device=x.device)
      mask[:, :keep] = 0
      mask = torch.gather(mask, 1, ids_restore)
    else:
      ids_restore, mask = None, torch.zeros(b, l, device=x.device)
    x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1), x], dim=1)
    for blk in self.blocks:
      x = blk(x)
      if taps is not None:
        taps.append(x)
    return self.norm(x), mask, ids_restore

  def decode(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    x = self.decoder_embed(x)
    b, l = ids_restore.shape
    body = torch.cat([x[:, 1:], self.mask_token.expand(b, l + 1 - x.shape[1], -1)], dim=1)
    body = torch.gather(body, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([x[:, :1], body], dim=1) + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:]

  def forward(self, images: torch.Tensor, noise: torch.Tensor, mask_ratio: float):
    """(loss, pred, target, mask): the normalised-pixel MSE on the masked patches."""
    tokens, mask, ids_restore = self.encode(images, noise, mask_ratio)
    pred = self.decode(tokens, ids_restore)
    target = self.patchify(images)
    if self.cfg.norm_pix_loss:
      target = (target - target.mean(-1, keepdim=True)) / torch.sqrt(target.var(-1, keepdim=True) + 1e-6)
    return masked_mse(pred, target, mask), pred, target, mask


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
  per_patch = ((pred - target) ** 2).mean(-1)
  return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


def to_channels_first(images: np.ndarray) -> torch.Tensor:
  x = torch.from_numpy(np.ascontiguousarray(images, np.float32))
  return x.permute(0, x.ndim - 1, *range(1, x.ndim - 1)).contiguous()


def load_flax_params(model: MAE, params: Any) -> None:
  """Copies the JAX model's parameters into `model` (via invcoss_jax.interop's MAE layout rules)."""
  import jax
  from invcoss_jax.interop import layouts

  template = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  flat = {tuple(str(getattr(k, "key", k)) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  plan = layouts.plan("mae", template, model.cfg, set(flat))
  fixed = {"pos_embed", "decoder_pos_embed"}  # sin-cos buffers, already the JAX model's tables
  state = {}
  for rule in plan.rules:
    if not rule.flax_paths:
      continue
    arrays = rule.to_torch([flat[p] for p in rule.flax_paths])
    state.update({k: a for k, a in zip(rule.torch_keys, arrays) if k not in fixed})
  missing = sorted(set(template) - set(state) - fixed)
  if missing:
    raise ValueError(f"load_flax_params: no rule filled {missing}")
  model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}, strict=False)


def _autocast(compute_dtype: torch.dtype | None):
  """Autocast to `compute_dtype` on the CPU (a no-op context for None or float32)."""
  enabled = compute_dtype not in (None, torch.float32)
  return torch.autocast("cpu", dtype=compute_dtype or torch.bfloat16, enabled=enabled)


def make_pretrain_step(model: MAE, train_cfg, mask_ratio: float, compute_dtype: torch.dtype | None = None):
  """AdamW with MAE's weight-decay groups; returns step(images, noise) -> loss (float). `compute_dtype`
  (e.g. torch.bfloat16) runs the forward pass under autocast, float32 parameters and optimiser, like the JAX
  model's `dtype`."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    (no_decay if p.ndim <= 1 or name in ("cls_token", "mask_token") else decay).append(p)
  lr = float(train_cfg.base_lr) * int(train_cfg.global_batch_size) / 256.0
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(train_cfg.weight_decay)},
                           {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                          betas=(float(train_cfg.b1), float(train_cfg.b2)), eps=float(train_cfg.eps))
  model.train()

  def step(images: torch.Tensor, noise: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    with _autocast(compute_dtype):
      loss = model(images, noise, mask_ratio)[0]
    loss.backward()
    opt.step()
    return float(loss.detach())

  return step


# ----------------------------------------------------------------------------------------------------------
# InvUNet and the inversion step


def _act(name: str):
  return {"leaky_relu": lambda x: F.leaky_relu(x, 0.2), "relu": F.relu, "gelu": F.gelu, "silu": F.silu}[name]


class ConvBlock(nn.Module):
  def __init__(self, cin: int, cout: int, rank: int, activation: str):
    super().__init__()
    conv = nn.Conv2d if rank == 2 else nn.Conv3d
    norm = (lambda c: nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)) if rank == 2 else \
        (lambda c: nn.InstanceNorm3d(c, eps=1e-5, affine=True))
    self.conv1, self.norm1 = conv(cin, cout, 3, padding=1, bias=False), norm(cout)
    self.conv2, self.norm2 = conv(cout, cout, 3, padding=1, bias=False), norm(cout)
    self.act = _act(activation)

  def forward(self, x):
    return self.act(self.norm2(self.conv2(self.act(self.norm1(self.conv1(x))))))


class InvUNet(nn.Module):
  """The dual-stream generator (add skips), as invcoss_jax.models.invunet.InvUNet, channels first."""

  def __init__(self, image_shape: Sequence[int], latent_dim: int, channels: Sequence[int], activation: str,
               output: str):
    super().__init__()
    rank = len(image_shape) - 1
    self.rank, self.spatial, self.channels = rank, tuple(image_shape[:-1]), tuple(channels)
    levels = len(channels) - 1
    self.bottleneck = tuple(max(1, math.ceil(s / 2**levels)) for s in self.spatial)
    self.dense = nn.Linear(latent_dim, math.prod(self.bottleneck) * channels[-1])
    self.norm = nn.BatchNorm2d(channels[-1], eps=1e-5) if rank == 2 else nn.InstanceNorm3d(channels[-1], affine=True)
    up = list(reversed(channels[:-1]))
    ins = [channels[-1]] + up[:-1]
    self.mc = nn.ModuleList(ConvBlock(i, o, rank, activation) for i, o in zip(ins, up))
    self.inv = nn.ModuleList(ConvBlock(i, o, rank, activation) for i, o in zip(ins, up))
    self.final = (nn.Conv2d if rank == 2 else nn.Conv3d)(channels[0], image_shape[-1], 3, padding=1)
    self.act = _act(activation)
    self.out = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "identity": lambda x: x}[output]
    self.mode = "bilinear" if rank == 2 else "trilinear"

  def _up(self, x, size=None):
    return F.interpolate(x, size=size, scale_factor=None if size else 2, mode=self.mode, align_corners=False)

  def forward(self, z):
    x = self.act(self.norm(self.dense(z).reshape(z.shape[0], self.channels[-1], *self.bottleneck)))
    cache, mc = [], x
    for blk in self.mc:
      mc = blk(self._up(mc))
      cache.append(mc)
    inv = x
    for blk, skip in zip(self.inv, cache):
      inv = blk(self._up(inv)) + skip
    if tuple(inv.shape[2:]) != self.spatial:
      inv = self._up(inv, self.spatial)
    return self.out(self.final(inv))


def _l2(x: torch.Tensor) -> torch.Tensor:
  return torch.sqrt((x ** 2).sum())


def inversion_losses(teacher: MAE, images: torch.Tensor, target_mean: torch.Tensor, target_var: torch.Tensor,
                     pool: torch.Tensor, pool_count: int, noise: torch.Tensor, inv_cfg) -> dict[str, torch.Tensor]:
  """The four terms of Eq. 6 for channels-first `images` (as invcoss_jax.inversion.losses)."""
  taps: list[torch.Tensor] = []
  tokens, _, _ = teacher.encode(images, None, 0.0, taps)
  norm = images.new_zeros(())
  for i, t in enumerate(taps):
    mean, var = t.mean(0), t.var(0, unbiased=False)
    norm = norm + _l2(mean - target_mean[i]) + _l2(var - target_var[i])
  _, pred, target, mask = teacher(images, noise, float(inv_cfg.task_mask_ratio))
  task = masked_mse(pred, target, mask)
  img = images.new_zeros(())
  for axis in range(2, images.ndim):
    img = img + torch.diff(images, dim=axis).abs().mean()
  feats = tokens[:, 1:].mean(1) if inv_cfg.rep_feature == "mean" else tokens[:, 0]
  p, b = pool.shape[0], feats.shape[0]
  slots = (pool_count + torch.arange(b)) % p
  full = pool.clone()
  full[slots] = feats.detach()
  valid = (torch.arange(p) < min(pool_count + b, p)).float()
  unit = lambda x: x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)
  cos = unit(feats) @ unit(full).T
  rep = (cos ** 2 * valid[None]).sum() / max(float(b * valid.sum()), 1.0)
  return dict(norm=norm, task=task, img=img, rep=rep)


def make_inversion_step(teacher: MAE, generator: InvUNet, latents: torch.Tensor, target_mean: torch.Tensor,
                        target_var: torch.Tensor, pool: torch.Tensor, inv_cfg, seed: int = 0,
                        compute_dtype: torch.dtype | None = None):
  """One optimisation step of a synthetic batch (Adam on the generator and the latents, the teacher frozen);
  returns step() -> total loss (float). `compute_dtype` as in `make_pretrain_step`."""
  teacher.eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  generator.train()
  latents = latents.clone().requires_grad_(True)
  betas = (float(inv_cfg.adam_b1), float(inv_cfg.adam_b2))
  opt = torch.optim.Adam([{"params": generator.parameters(), "lr": float(inv_cfg.lr_generator)},
                          {"params": [latents], "lr": float(inv_cfg.lr_latents)}], betas=betas)
  weights = {k: float(v) for k, v in dict(inv_cfg.loss_weights).items()}
  num_patches = math.prod(teacher.grid)
  gen = torch.Generator().manual_seed(seed)

  def step() -> float:
    opt.zero_grad(set_to_none=True)
    with _autocast(compute_dtype):
      images = generator(latents)
      noise = torch.rand(images.shape[0], num_patches, generator=gen)
      terms = inversion_losses(teacher, images, target_mean, target_var, pool, 0, noise, inv_cfg)
      total = sum(weights[k] * v.float() for k, v in terms.items() if weights.get(k, 0.0) != 0.0)
    total.backward()
    opt.step()
    return float(total.detach())

  return step
