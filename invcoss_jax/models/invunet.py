"""InvUNet: the dual-stream generator of InvCoSS (paper Sec. 3.3, App. B.3, Table 4), 2D and 3D.

latent z -> Noise Projector (Dense to the bottleneck, norm, activation) -> bottleneck feature map.
Memory Cache Branch: UpBlocks (2x up-sampling, then two conv-norm-activation) from the bottleneck, one per
  resolution; each level's output is kept as a structural prior.
Inversion Branch: UpBlocks from the bottleneck too; at every resolution it joins the memory-cache feature of
  that resolution (skip connection), then a final conv and the output activation.
2D: bilinear up-sampling, BatchNorm, sigmoid ([0, 1]). 3D: trilinear up-sampling, InstanceNorm (batch
independent), tanh ([-1, 1]). The bottleneck is the image size / 2^(levels), so the output follows the
configured image shape (sizes that are not multiples of 2^levels are reached by one final resize).

BatchNorm runs in training mode (batch statistics) while the generator is optimised; its running averages
live in the `batch_stats` collection, which the caller threads through explicitly.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "leaky_relu": lambda x: nn.leaky_relu(x, 0.2),
    "relu": nn.relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
}
_OUTPUTS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "sigmoid": nn.sigmoid,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in _ACTIVATIONS:
    raise ValueError(f"config.inversion.invunet.activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
  return _ACTIVATIONS[name]


def output_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in _OUTPUTS:
    raise ValueError(f"generator output activation must be one of {sorted(_OUTPUTS)}, got {name!r}")
  return _OUTPUTS[name]


def default_output_activation(spatial_rank: int) -> str:
  """App. B.3: sigmoid for 2D images in [0, 1], tanh for 3D volumes in [-1, 1]."""
  return "sigmoid" if spatial_rank == 2 else "tanh"


def resize_spatial(x: jax.Array, spatial: Sequence[int]) -> jax.Array:
  """(Bi/tri)linear resize of a channels-last batch to `spatial` (half-pixel, align_corners=False)."""
  if tuple(x.shape[1:-1]) == tuple(spatial):
    return x
  return jax.image.resize(x, (x.shape[0], *spatial, x.shape[-1]), method="linear")


def upsample2x(x: jax.Array) -> jax.Array:
  return resize_spatial(x, tuple(2 * s for s in x.shape[1:-1]))


class Norm(nn.Module):
  """BatchNorm (2D; PyTorch's momentum 0.1 and eps 1e-5) or InstanceNorm (3D) over channels-last maps."""
  kind: str

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.kind == "batch":
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
    if self.kind == "instance":
      return nn.InstanceNorm(epsilon=1e-5)(x)
    raise ValueError(f"norm must be 'batch' or 'instance', got {self.kind!r}")


class ConvBlock(nn.Module):
  """Two (3x3 or 3x3x3) convolutions, each followed by normalisation and activation."""
  features: int
  norm: str
  activation: str = "leaky_relu"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    rank = x.ndim - 2
    act = activation_fn(self.activation)
    for i in range(2):
      # No bias: the normalisation that follows removes it.
      x = nn.Conv(self.features, (3,) * rank, padding="SAME", use_bias=False, name=f"conv{i + 1}")(x)
      x = act(Norm(self.norm, name=f"norm{i + 1}")(x, train))
    return x


class UpBlock(nn.Module):
  """2x (bi/tri)linear up-sampling followed by a ConvBlock."""
  features: int
  norm: str
  activation: str = "leaky_relu"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, skip: jax.Array | None = None) -> jax.Array:
    x = upsample2x(x)
    if skip is not None:  # U-Net style concatenation (skip = 'concat')
      x = jnp.concatenate([x, skip], axis=-1)
    return ConvBlock(self.features, self.norm, self.activation, name="conv_block")(x, train)


class NoiseProjector(nn.Module):
  """Bottleneck injection: Dense(z -> prod(bottleneck) * C), reshape, norm, activation."""
  bottleneck: tuple[int, ...]
  features: int
  norm: str
  activation: str = "leaky_relu"

  @nn.compact
  def __call__(self, z: jax.Array, train: bool) -> jax.Array:
    x = nn.Dense(math.prod(self.bottleneck) * self.features, name="dense")(z.astype(jnp.float32))
    x = x.reshape((z.shape[0], *self.bottleneck, self.features))
    return activation_fn(self.activation)(Norm(self.norm, name="norm")(x, train))


class InvUNet(nn.Module):
  """latents `(B, latent_dim)` -> images `(B, *image_shape)` (channels last).

  image_shape: per-example output shape, e.g. (224, 224, 3) or (16, 192, 192, 1).
  channels: feature channels from full resolution to the bottleneck (Table 4: 16, 32, 64, 128, 256).
  skip: 'add' (inversion-branch output + memory-cache output of the same level; 7.65M parameters at
    224x224 with 128-d latents, the paper's 7.7M) or 'concat' (memory-cache output concatenated with the
    up-sampled inversion feature before the convolutions, 7.85M).
  norm: 'auto' (batch for 2D, instance for 3D, as App. B.3), 'batch' or 'instance'.
  output_activation: 'auto' (sigmoid 2D, tanh 3D), 'sigmoid', 'tanh' or 'identity'.
  Feature maps of every level are sown into `intermediates` under the names of Table 4 (bottleneck, MC-k,
  Inv-k) when that collection is mutable.
  """
  image_shape: tuple[int, ...]
  channels: tuple[int, ...] = (16, 32, 64, 128, 256)
  skip: str = "add"
  norm: str = "auto"
  activation: str = "leaky_relu"
  output_activation: str = "auto"

  def _resolved(self) -> tuple[int, str, str]:
    rank = len(self.image_shape) - 1
    if rank not in (2, 3):
      raise ValueError(f"InvUNet image_shape must be (H, W, C) or (D, H, W, C), got {self.image_shape}")
    if self.skip not in ("add", "concat"):
      raise ValueError(f"config.inversion.invunet.skip must be 'add' or 'concat', got {self.skip!r}")
    if len(self.channels) < 2:
      raise ValueError(f"config.inversion.invunet.channels needs at least 2 entries, got {self.channels}")
    norm = ("batch" if rank == 2 else "instance") if self.norm == "auto" else self.norm
    out = default_output_activation(rank) if self.output_activation == "auto" else self.output_activation
    return rank, norm, out

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = True) -> jax.Array:
    rank, norm, out = self._resolved()
    levels = len(self.channels) - 1
    spatial = tuple(self.image_shape[:-1])
    bottleneck = tuple(max(1, math.ceil(s / 2**levels)) for s in spatial)
    x = NoiseProjector(bottleneck, self.channels[-1], norm, self.activation, name="noise_projector")(z, train)
    self.sow("intermediates", "bottleneck", x)

    up_channels = list(reversed(self.channels[:-1]))  # 128, 64, 32, 16
    cache = []
    mc = x
    for k, ch in enumerate(up_channels):
      mc = UpBlock(ch, norm, self.activation, name=f"mc_{k + 1}")(mc, train)
      self.sow("intermediates", f"MC-{k + 1}", mc)
      cache.append(mc)

    inv = x
    for k, ch in enumerate(up_channels):
      if self.skip == "concat":
        inv = UpBlock(ch, norm, self.activation, name=f"inv_{k + 1}")(inv, train, skip=cache[k])
      else:
        inv = UpBlock(ch, norm, self.activation, name=f"inv_{k + 1}")(inv, train) + cache[k]
      self.sow("intermediates", f"Inv-{k + 1}", inv)

    inv = resize_spatial(inv, spatial)
    y = nn.Conv(self.image_shape[-1], (3,) * rank, padding="SAME", name="final")(inv)
    return output_fn(out)(y).astype(jnp.float32)
