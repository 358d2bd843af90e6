"""The bottom-to-top generator of CMI (Fang et al. 2021), the baseline of the paper's Tables 2 and 3.

As zju-vipa/CMI `datafree/models/generator.py`: Dense(z -> 2*ngf x (S / 2^n)), BatchNorm, then n times
(2x up-sampling, 3x3 conv without bias, BatchNorm, LeakyReLU(0.2)) with 2*ngf channels and ngf for the last,
a final 3x3 conv and the output activation. Up-sampling is (bi/tri)linear here, as in InvUNet, so the
comparison isolates the architecture (CMI's nn.Upsample is nearest). 3D volumes use 3D convolutions and
InstanceNorm, like InvUNet's 3D variant. The latent is projected straight to a low-resolution map and
up-sampled without skip connections: the design Sec. 3.3 finds loses high-frequency detail.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from invcoss_jax.models.invunet import Norm, default_output_activation, output_fn, resize_spatial, upsample2x


class CMIGenerator(nn.Module):
  """latents `(B, latent_dim)` -> images `(B, *image_shape)`.

  ngf: base width (13 -> 10.5M, 32 -> 25.9M parameters at 224x224 with 128-d latents).
  num_upsamples: up-sampling stages (CMI: 2, so the projection is at 1/4 of the image size).
  """
  image_shape: tuple[int, ...]
  ngf: int = 64
  num_upsamples: int = 2
  norm: str = "auto"
  output_activation: str = "auto"

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = True) -> jax.Array:
    rank = len(self.image_shape) - 1
    if rank not in (2, 3):
      raise ValueError(f"CMIGenerator image_shape must be (H, W, C) or (D, H, W, C), got {self.image_shape}")
    if self.ngf < 1 or self.num_upsamples < 1:
      raise ValueError(f"config.inversion.cmi: ngf and num_upsamples must be >= 1, got {self.ngf}, "
                       f"{self.num_upsamples}")
    norm = ("batch" if rank == 2 else "instance") if self.norm == "auto" else self.norm
    out = default_output_activation(rank) if self.output_activation == "auto" else self.output_activation
    spatial = tuple(self.image_shape[:-1])
    init = tuple(max(1, math.ceil(s / 2**self.num_upsamples)) for s in spatial)
    x = nn.Dense(2 * self.ngf * math.prod(init), name="project")(z.astype(jnp.float32))
    x = x.reshape((z.shape[0], *init, 2 * self.ngf))
    x = Norm(norm, name="norm0")(x, train)
    for k in range(self.num_upsamples):
      ch = self.ngf if k == self.num_upsamples - 1 else 2 * self.ngf
      x = upsample2x(x)
      x = nn.Conv(ch, (3,) * rank, padding="SAME", use_bias=False, name=f"conv{k + 1}")(x)
      x = nn.leaky_relu(Norm(norm, name=f"norm{k + 1}")(x, train), 0.2)
    x = resize_spatial(x, spatial)
    y = nn.Conv(self.image_shape[-1], (3,) * rank, padding="SAME", name="final")(x)
    return output_fn(out)(y).astype(jnp.float32)
