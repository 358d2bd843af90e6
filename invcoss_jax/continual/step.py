"""The composite train step of continual pre-training (Eq. 4) for every method.

One step sees sub-batches grouped by example shape (`streams.StageStreams`):
- `current`: data of the stage (MAE loss, or the MLM loss for text; several modalities for `joint`),
- `buffer`: replay samples of earlier stages (feature distillation to the frozen previous model: both encode
  the sample under the same mask, MSE over the encoder output tokens, MedCoSS's L_reg).
The text, 2D and 3D sub-batches go through their own tokenizer inside the one compiled step. Text is never
dropped by the encoder (MLM corrupts ids instead), so a text buffer sample is distilled over all its real
tokens and CLS (padding left out). Each term is a mean over its samples (per-group means weighted by group
size), and the terms are summed:

  loss = L_task(current) + distill_weight * L_reg(buffer) + buffer_mae_weight * L_task(buffer)
         + cassle_weight * L_cassle(current) + ewc_weight * EWC(encoder side).

Masks come from explicit noise (`draw_noises`), folded from the state's key and step, so a resumed run
draws the same masks and a test can recompute every term with separate model calls.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from invcoss_jax import models
from invcoss_jax.continual import losses
from invcoss_jax.continual.params import split_params
from invcoss_jax.parallel import mesh as mesh_lib
from invcoss_jax.train import core, mlm
from invcoss_jax.train.core import TrainState


class ContinualState(TrainState):
  """TrainState plus `aux`: trainable parameters outside the MAE (CaSSLe's predictor; {} otherwise).

  `params` stays the MAE tree alone, so `train.checkpoint.load_trained_stage` reads a stage as usual; the
  optimiser state (and the loss) covers {'mae': params, 'aux': aux}."""
  aux: Any

  @property
  def trainable(self) -> Any:
    return {"mae": self.params, "aux": self.aux}

  def with_trainable(self, trainable: Any) -> "ContinualState":
    return self.replace(params=trainable["mae"], aux=trainable["aux"])


class DistillPredictor(nn.Module):
  """CaSSLe's predictor g: Linear(D -> hidden) - norm - ReLU - Linear(-> D), applied per token.

  LayerNorm replaces CaSSLe's BatchNorm so the state needs no batch statistics (the ViT has none either)."""
  hidden_dim: int

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    d = tokens.shape[-1]
    h = nn.Dense(self.hidden_dim, name="fc1")(tokens.astype(jnp.float32))
    h = nn.relu(nn.LayerNorm(name="norm")(h))
    return nn.Dense(d, name="fc2")(h)


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """Static weights and ratios of the composite loss (from config.train / config.continual)."""
  mask_ratio: float = 0.75
  distill_mask_ratio: float = 0.75
  distill_weight: float = 1.0
  buffer_mae_weight: float = 0.0
  ewc_weight: float = 0.0
  cassle_weight: float = 0.0
  mlm_probability: float | None = None  # text: the head scores only the gathered corrupted positions


def num_patches(model_cfg: models.ViTConfig, image_shape) -> int:
  """Tokens (without CLS) of one example of per-example shape `image_shape`."""
  rank = len(image_shape) - 1
  return math.prod(models.grid_shape(tuple(image_shape[:-1]), model_cfg.patch_size(rank)))


def is_text_batch(x) -> bool:
  """Text sub-batches are dicts of token arrays (streams.py); image sub-batches are arrays."""
  return isinstance(x, dict)


def draw_noises(rng: jax.Array, batch: dict, model_cfg: models.ViTConfig) -> dict[str, tuple[Any, ...]]:
  """Uniform masking noise (B, L) for every image sub-batch (None for text, which is not dropped); group g
  of role r uses fold_in(rng, offset_r + g)."""
  out = {}
  for role, offset in (("current", 0), ("buffer", 1000)):
    out[role] = tuple(
        None if is_text_batch(x) else
        jax.random.uniform(jax.random.fold_in(rng, offset + g), (x.shape[0], num_patches(model_cfg, x.shape[1:])))
        for g, x in enumerate(batch.get(role, ())))
  return out


def text_valid(batch: dict) -> jax.Array:
  """(B, 1 + L) float32: CLS and the real tokens of a text sub-batch (the tokens distillation compares)."""
  a = batch["attention_mask"].astype(jnp.float32)
  return jnp.concatenate([jnp.ones((a.shape[0], 1), jnp.float32), a], axis=1)


def mlm_forward(model: models.MAE, params, batch: dict, *, train: bool, rng=None,
                probability: float | None = None):
  """(MLM loss, encoder output tokens) of one text sub-batch (MAE.mlm; with the masking `probability` only
  the corrupted positions, at most `train.mlm.prediction_budget` of the padded length, reach the head)."""
  rngs = {"dropout": rng} if rng is not None else None
  budget = None if probability is None else mlm.prediction_budget(batch["tokens"].shape[1], probability)
  out = model.apply({"params": params}, batch["tokens"], batch["attention_mask"], batch["mlm_mask"],
                    batch["labels"], train=train, rngs=rngs, max_predictions=budget, method=models.MAE.mlm)
  return out["loss"], out["tokens"]


def mae_forward(model: models.MAE, params, images, noise, *, mask_ratio: float, train: bool, rng=None):
  """(MAE loss, encoder output tokens) of one pass with the mask fixed by `noise` (= MAE.__call__'s loss)."""
  rank = models.spatial_rank(images)
  grid = models.grid_shape(images.shape[1:-1], model.cfg.patch_size(rank))

  def fwd(m: models.MAE, x, n):
    tokens, mask, ids_restore = m.encode(x, mask_ratio=mask_ratio, train=train, noise=n)
    pred = m.decode(tokens, ids_restore, grid, train=train)
    loss, _ = m.loss(x, pred, mask)
    return loss, tokens

  rngs = {"dropout": rng, "masking": rng} if rng is not None else None
  return model.apply({"params": params}, images, noise, method=fwd, rngs=rngs)


def encode_tokens(model: models.MAE, params, images, noise, *, mask_ratio: float, train: bool, rng=None):
  """Encoder output tokens (B, 1 + L_keep, D) with the mask fixed by `noise`; a text sub-batch (a dict)
  is encoded whole with its attention mask (`noise` None)."""
  rngs = {"dropout": rng, "masking": rng} if rng is not None else None
  if is_text_batch(images):
    tokens, _, _ = model.apply({"params": params}, images["tokens"], train=train,
                               attention_mask=images["attention_mask"], method=models.MAE.encode, rngs=rngs)
    return tokens
  tokens, _, _ = model.apply({"params": params}, images, mask_ratio=mask_ratio, train=train, noise=noise,
                             method=models.MAE.encode, rngs=rngs)
  return tokens


def _valid(x) -> jax.Array | None:
  return text_valid(x) if is_text_batch(x) else None


def _size(x) -> int:
  return (x["tokens"] if is_text_batch(x) else x).shape[0]


def composite_loss(model: models.MAE, spec: LossSpec, params, aux, batch: dict, noises: dict, consts: dict,
                   rng: jax.Array, predictor: DistillPredictor | None = None) -> tuple[jax.Array, dict]:
  """(total loss, {term: value}) of one composite step; see the module doc.

  consts: 'teacher' (the frozen previous MAE parameters, or None), 'ewc_anchor' / 'ewc_fisher' (encoder-side
  trees, or None). `rng` seeds drop-path (one fold per forward pass)."""
  teacher = consts.get("teacher")
  current, buffer = batch.get("current", ()), batch.get("buffer", ())
  terms: dict[str, jax.Array] = {}
  calls = itertools.count()

  def key():  # a distinct drop-path key for every forward pass
    return jax.random.fold_in(rng, next(calls))

  task, cassle = [], []
  for x, noise in zip(current, noises["current"]):
    if is_text_batch(x):
      loss, tokens = mlm_forward(model, params, x, train=True, rng=key(), probability=spec.mlm_probability)
    else:
      loss, tokens = mae_forward(model, params, x, noise, mask_ratio=spec.mask_ratio, train=True, rng=key())
    task.append(loss)
    if spec.cassle_weight > 0:
      if teacher is None or predictor is None:
        raise ValueError("cassle needs the frozen previous model and a predictor")
      target = encode_tokens(model, teacher, x, noise, mask_ratio=spec.mask_ratio, train=False)
      cassle.append(losses.feature_distillation(predictor.apply({"params": aux["predictor"]}, tokens), target,
                                                _valid(x)))
  sizes = [_size(x) for x in current]
  total = terms["task"] = losses.sample_weighted_mean(task, sizes)
  if spec.cassle_weight > 0:
    terms["cassle"] = losses.sample_weighted_mean(cassle, sizes)
    total = total + spec.cassle_weight * terms["cassle"]

  if buffer:
    if teacher is None:
      raise ValueError("buffer samples are distilled to the frozen previous model, but consts['teacher'] is None")
    reg, buf_task = [], []
    for x, noise in zip(buffer, noises["buffer"]):
      if spec.buffer_mae_weight > 0 and not is_text_batch(x):
        loss, tokens = mae_forward(model, params, x, noise, mask_ratio=spec.distill_mask_ratio, train=True,
                                   rng=key())
        buf_task.append(loss)
      else:
        tokens = encode_tokens(model, params, x, noise, mask_ratio=spec.distill_mask_ratio, train=True, rng=key())
      target = encode_tokens(model, teacher, x, noise, mask_ratio=spec.distill_mask_ratio, train=False)
      reg.append(losses.feature_distillation(tokens, target, _valid(x)))
    bsizes = [_size(x) for x in buffer]
    terms["distill"] = losses.sample_weighted_mean(reg, bsizes)
    total = total + spec.distill_weight * terms["distill"]
    if spec.buffer_mae_weight > 0:  # image buffers only (text buffers are not masked on the host)
      image_sizes = [n for x, n in zip(buffer, bsizes) if not is_text_batch(x)]
      terms["buffer_task"] = losses.sample_weighted_mean(buf_task, image_sizes)
      total = total + spec.buffer_mae_weight * terms["buffer_task"]

  if spec.ewc_weight > 0:
    anchor, fisher = consts.get("ewc_anchor"), consts.get("ewc_fisher")
    if anchor is not None:
      enc, _ = split_params(params)
      terms["ewc"] = losses.ewc_penalty(enc, anchor, fisher)
      total = total + spec.ewc_weight * terms["ewc"]
  return total, terms


def composite_loss_fn(model: models.MAE, spec: LossSpec, predictor: DistillPredictor | None = None
                      ) -> core.LossFn:
  """`composite_loss` as the trainer core's loss: masking noise and drop-path keys split from the step's key."""

  def loss_fn(trainable, batch, consts, rng):
    noise_rng, drop_rng = jax.random.split(rng)
    noises = draw_noises(noise_rng, batch, model.cfg)
    loss, terms = composite_loss(model, spec, trainable["mae"], trainable["aux"], batch, noises, consts, drop_rng,
                                 predictor)
    return loss, {f"loss_{k}": v for k, v in terms.items()}

  return loss_fn


def mask_frozen(updates: Any, consts: dict) -> Any:
  """PackNet: consts['trainable'] (a tree like the MAE parameters of 0/1 multipliers, or None) zeroes the
  updates of frozen weights after the optimiser, so they stay bit-exact, weight decay included."""
  mask = consts.get("trainable")
  if mask is None:
    return updates
  return dict(updates, mae=jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates["mae"], mask))


def make_train_step(model: models.MAE, spec: LossSpec, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    *, grad_accum_steps: int = 1, predictor: DistillPredictor | None = None) -> Callable:
  """The pure step (state, batch, consts) -> (state, metrics) on the trainer core."""
  return core.make_step(composite_loss_fn(model, spec, predictor), tx, schedule, grad_accum_steps=grad_accum_steps,
                        mask_updates=mask_frozen)


def create_state(params, aux, tx: optax.GradientTransformation, rng: jax.Array, mesh: jax.sharding.Mesh,
                 mesh_cfg) -> tuple[ContinualState, Any]:
  """The state built directly in its sharded layout (train.core.create_state); returns (state, shardings)."""

  def init(p, a, r):
    return ContinualState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init({"mae": p, "aux": a}),
                          rng=r, aux=a)

  init_fn, shardings = core.state_init(init, (params, aux, rng), mesh, mesh_cfg)
  # Inputs (e.g. a previous stage's parameters, committed to one device) go to their final layout first.
  params, aux, rng = jax.device_put((params, aux, rng), (shardings.params, shardings.aux, shardings.rng))
  return init_fn(params, aux, rng), shardings
