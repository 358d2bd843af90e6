"""Data-free inversion of a trained MAE (paper Sec. 3.2-3.5, App. C, Algorithm 1 stage 1).

A generator (InvUNet, CMI's bottom-to-top generator, or none: the pixels themselves) and a batch of latents
are optimised together so that the frozen MAE's block-token statistics of the generated batch match the
stage's stored statistics (L_norm), the MAE reconstructs them (L_task), they are smooth (L_img) and their
features stay away from every synthetic sample so far (L_rep). The inner loop of a batch runs compiled: the
whole loop as one program on GPU/TPU, one compiled step per call on CPU (`inner_loop_mode`); the generator's
BatchNorm statistics are explicit state in its carry.

Schedules (config.inversion.schedule_2d / schedule_3d): 2D batches of 320, 1000 steps, generator and 128-d
latents re-initialised every batch; 3D batches of 48, 2000 steps after each generator initialisation and 500
otherwise, 512-d latents, generator re-initialised every 10 batches. Latents (and the Adam state) are new for
every batch. A batch whose loss turns non-finite is discarded and regenerated with a new seed (and a fresh
generator); it is never returned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from invcoss_jax import faults
from invcoss_jax.config_checks import ConfigError
from invcoss_jax.inversion import losses, statistics
from invcoss_jax.inversion.config import InversionSpec, ProgramSpec, Schedule, inversion_spec, program_spec
from invcoss_jax.inversion.context import InversionContext
from invcoss_jax.models.cmi_generator import CMIGenerator
from invcoss_jax.models.invunet import InvUNet, default_output_activation, output_fn
from invcoss_jax.parallel import mesh as mesh_lib
from invcoss_jax.parallel.config import mesh_config

GENERATORS = ("invunet", "cmi", "cmi_large", "none")


def spatial_rank_of(image_shape) -> int:
  rank = len(image_shape) - 1
  if rank not in (2, 3):
    raise ValueError(f"image_shape must be (H, W, C) or (D, H, W, C), got {tuple(image_shape)}")
  return rank


def schedule_for(inv, rank: int) -> Schedule:
  """config.inversion.schedule_2d or schedule_3d, checked (`inv`: config.inversion or its InversionSpec)."""
  name = f"schedule_{rank}d"
  s = getattr(inversion_spec(inv).host, name)
  for field in dataclasses.fields(Schedule):
    if getattr(s, field.name) < 1:
      raise ValueError(f"config.inversion.{name}.{field.name} must be >= 1, got {getattr(s, field.name)}")
  return s


def output_activation(inv, rank: int) -> str:
  name = program_spec(inv).output_activation
  return default_output_activation(rank) if name == "auto" else name


GREY_MODALITIES = ("xray",)  # stored grey, fed to the model as 3 equal channels (data/preprocessing.py)


class ReplicateChannels(nn.Module):
  """A one-channel generator whose image is repeated over `channels`: a grey image in an RGB layout."""
  generator: nn.Module
  channels: int

  def __call__(self, z: jax.Array, train: bool = True) -> jax.Array:
    return jnp.repeat(self.generator(z, train=train), self.channels, axis=-1)


def _resolved_grey(grey: str, generator: str, modality: str) -> str:
  if grey not in ("auto", "yes", "no"):
    raise ValueError(f"config.inversion.grey must be 'auto', 'yes' or 'no', got {grey!r}")
  if grey == "auto":
    return "yes" if modality in GREY_MODALITIES and generator != "none" else "no"
  return grey


def resolve_grey(inv, modality: str):
  """A copy of `inv` (config.inversion, or its InversionSpec) with `grey` 'auto' resolved for a stage of
  `modality`: 'yes' where the modality's images are grey replicated to 3 channels (X-ray), else 'no'."""
  if isinstance(inv, InversionSpec):
    p = inv.program
    return dataclasses.replace(inv, program=dataclasses.replace(p, grey=_resolved_grey(p.grey, p.generator,
                                                                                       modality)))
  out = ml_collections.ConfigDict(inv.to_dict())
  out.grey = _resolved_grey(str(inv.get("grey", "no")), inv.generator, modality)
  return out


def build_generator(inv, image_shape) -> nn.Module | None:
  """The generator named by config.inversion.generator; None for 'none' (direct image optimisation).

  With config.inversion.grey = 'yes' the generator draws one channel, repeated over the image's channels
  ('auto' is resolved by the jobs from the stage's modality, `resolve_grey`; here it means 'no')."""
  p = program_spec(inv)
  shape = tuple(int(s) for s in image_shape)
  if p.grey not in ("auto", "yes", "no"):
    raise ValueError(f"config.inversion.grey must be 'auto', 'yes' or 'no', got {p.grey!r}")
  if p.grey == "yes" and shape[-1] > 1:
    if p.generator == "none":
      raise ValueError("config.inversion.grey='yes' needs a generator (config.inversion.generator='none' "
                       "optimises the pixels of every channel)")
    return ReplicateChannels(_build_generator(p, shape[:-1] + (1,)), shape[-1])
  return _build_generator(p, shape)


def _build_generator(p: ProgramSpec, shape: tuple[int, ...]) -> nn.Module | None:
  rank = spatial_rank_of(shape)
  out = output_activation(p, rank)
  output_fn(out)  # validates the name
  g = p.generator
  if g == "invunet":
    c = p.invunet
    return InvUNet(image_shape=shape, channels=tuple(c.channels), skip=c.skip, activation=c.activation,
                   output_activation=out)
  if g in ("cmi", "cmi_large"):
    ngf = p.cmi.ngf_large if g == "cmi_large" else p.cmi.ngf
    return CMIGenerator(image_shape=shape, ngf=int(ngf), num_upsamples=int(p.cmi.num_upsamples),
                        output_activation=out)
  if g == "none":
    return None
  raise ValueError(f"config.inversion.generator must be one of {list(GENERATORS)}, got {g!r}")


def make_optimizer(inv) -> optax.GradientTransformation:
  """One optax transformation over {'generator': ..., 'latents': ...}: Adam at lr_generator for the generator
  and at lr_latents for the latents (App. C: 2e-4 and 0.05)."""
  p = program_spec(inv)

  def adam(lr):
    return optax.adam(float(lr), b1=float(p.adam_b1), b2=float(p.adam_b2))

  def labels(tree):
    return {k: jax.tree.map(lambda _: k, v) for k, v in tree.items()}

  return optax.partition({"generator": adam(p.lr_generator), "latents": adam(p.lr_latents)}, labels)


def init_variables(generator: nn.Module | None, image_shape, batch_size: int, latent_dim: int,
                   rng: jax.Array) -> tuple[dict, dict]:
  """(optimised variables {'generator', 'latents'}, generator state {'batch_stats': ...} or {})."""
  k_gen, k_z = jax.random.split(rng)
  if generator is None:
    # Direct optimisation: the "latents" are the pre-activation pixels.
    return {"generator": {}, "latents": jax.random.normal(k_z, (batch_size, *image_shape), jnp.float32)}, {}
  z = jax.random.normal(k_z, (batch_size, latent_dim), jnp.float32)
  variables = generator.init({"params": k_gen}, z, train=True)
  state = {k: v for k, v in variables.items() if k != "params"}
  return {"generator": variables["params"], "latents": z}, state


def render(generator: nn.Module | None, out_act: str, opt_vars: dict, state: dict) -> tuple[jax.Array, dict]:
  """Synthetic images from the optimised variables (BatchNorm in training mode) and the new state."""
  if generator is None:
    return output_fn(out_act)(opt_vars["latents"]), state
  variables = {"params": opt_vars["generator"], **state}
  if state:
    images, new_state = generator.apply(variables, opt_vars["latents"], train=True, mutable=list(state))
    return images, dict(new_state)
  return generator.apply(variables, opt_vars["latents"], train=True), state


JITTER_STREAM = 0x7177  # folded into the step's key for the jitter offsets (the L_task masks use the key itself)


def jittered(images: jax.Array, key: jax.Array, max_offset: int) -> jax.Array:
  """`images` (B, *spatial, C) rolled by one offset per spatial axis, uniform in [-max_offset, max_offset]
  (config.inversion.jitter; 0 returns them unchanged)."""
  if max_offset < 0:
    raise ValueError(f"config.inversion.jitter={max_offset}: expected a non-negative number of pixels")
  if max_offset == 0:
    return images
  rank = images.ndim - 2
  shifts = jax.random.randint(jax.random.fold_in(key, JITTER_STREAM), (rank,), -max_offset, max_offset + 1)
  for axis in range(rank):
    images = jnp.roll(images, shifts[axis], axis=1 + axis)
  return images


def inner_loop_mode(inv) -> str:
  """'compiled' (the whole batch in one compiled loop) or 'stepwise' (one compiled step per call).

  'auto' picks 'stepwise' on CPU: XLA:CPU leaves the weight-gradient convolutions inside a compiled loop in
  a layout its fast kernels do not take (measured 10-30x slower per step), while a loop-free step program
  gets them; on GPU/TPU 'auto' is 'compiled'.
  """
  mode = inversion_spec(inv).host.inner_loop
  if mode == "auto":
    return "stepwise" if jax.default_backend() == "cpu" else "compiled"
  if mode not in ("compiled", "stepwise"):
    raise ValueError(f"config.inversion.inner_loop must be 'auto', 'compiled' or 'stepwise', got {mode!r}")
  return mode


class BatchOptimizer:
  """Optimises one batch for up to `max_steps` steps with compiled programs.

  `__call__(opt_vars, state, frozen, key, attempt, num_steps)` -> dict(opt_vars, state, images, features,
  totals (max_steps + 1,), terms {name: (max_steps + 1,)}); `frozen` = dict(params, stats, pool, pool_count)
  holds the teacher's parameters and everything not optimised. `inv` is the ProgramSpec of config.inversion
  (or config.inversion itself): the only options the program reads. `num_steps` <= max_steps is traced, so the 3D
  schedule's 2000- and 500-step batches share one program. Entry i < num_steps of the histories is the loss
  of the variables before update i; entry num_steps is the loss of the final variables (that last pass
  evaluates only, and also yields the final images and features).
  mode 'compiled' runs the whole loop as one `lax.fori_loop` program; 'stepwise' runs the same loop body as
  one jitted program per step (its carry donated), see `inner_loop_mode`.

  The pieces are public and pure, for composing other programs from them (the compile job lowers
  `inner_loop(init_carry(...))` and `inner_step(0, init_carry(...))` without running them):
  `init_carry(opt_vars, state)` -> carry; `inner_step(i, carry, frozen, key, attempt, num_steps)` -> carry
  (one forward and backward pass and, for i < num_steps, one Adam update); `inner_loop(carry, frozen, key,
  attempt, num_steps)` -> carry after inner steps 0..num_steps. A carry is (opt_vars, opt_state, state,
  images, features, totals, terms).
  """

  def __init__(self, model, generator: nn.Module | None, inv, out_act: str, max_steps: int, image_shape,
               feature_dim: int, mode: str):
    spec = program_spec(inv)
    self.max_steps, self.mode = max_steps, mode
    self.image_shape, self.feature_dim = tuple(image_shape), feature_dim
    self.tx = make_optimizer(spec)
    self.names = tuple(losses.active_terms(spec))

    def loss_fn(opt_vars, state, frozen, key, attempt):
      images, new_state = render(generator, out_act, opt_vars, state)
      ctx = InversionContext(images=images, model=model, params=frozen["params"], target_stats=frozen["stats"],
                             rng=key, pool=frozen["pool"], pool_count=frozen["pool_count"], spec=spec,
                             attempt=attempt, model_images=jittered(images, key, spec.jitter))
      total, terms = losses.objective(ctx, spec)
      return total, (terms, new_state, images, jax.lax.stop_gradient(ctx.features))

    self._grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    self._init = jax.jit(self.init_carry)
    self._loop = jax.jit(self.inner_loop)
    self._step = jax.jit(self.inner_step, donate_argnums=(1,))

  def init_carry(self, opt_vars, state):
    batch = opt_vars["latents"].shape[0]
    history = jnp.full((self.max_steps + 1,), jnp.nan, jnp.float32)
    return (opt_vars, self.tx.init(opt_vars), state, jnp.zeros((batch, *self.image_shape), jnp.float32),
            jnp.zeros((batch, self.feature_dim), jnp.float32), history, {n: history for n in self.names})

  def inner_step(self, i, carry, frozen, key, attempt, num_steps):
    v, opt_state, st, _, _, totals, terms = carry
    (total, (values, new_st, images, features)), grads = self._grad_fn(v, st, frozen, jax.random.fold_in(key, i),
                                                                       attempt)
    updates, new_opt_state = self.tx.update(grads, opt_state, v)
    new = (optax.apply_updates(v, updates), new_opt_state, new_st)
    # The last pass (i == num_steps) only evaluates: its update is dropped.
    v, opt_state, st = jax.tree.map(lambda a, b: jnp.where(i < num_steps, a, b), new, (v, opt_state, st))
    totals = totals.at[i].set(total)
    terms = {n: terms[n].at[i].set(values[n]) for n in self.names}
    return v, opt_state, st, images, features, totals, terms

  def inner_loop(self, carry, frozen, key, attempt, num_steps):
    return jax.lax.fori_loop(0, num_steps + 1,
                             lambda i, c: self.inner_step(i, c, frozen, key, attempt, num_steps), carry)

  def __call__(self, opt_vars, state, frozen, key, attempt, num_steps: int) -> dict:
    if not 1 <= num_steps <= self.max_steps:
      raise ValueError(f"num_steps={num_steps} must be in [1, {self.max_steps}]")
    carry = self._init(opt_vars, state)
    attempt, n = jnp.asarray(attempt, jnp.int32), jnp.asarray(num_steps, jnp.int32)
    if self.mode == "compiled":
      carry = self._loop(carry, frozen, key, attempt, n)
    else:
      for i in range(num_steps + 1):
        carry = self._step(jnp.asarray(i, jnp.int32), carry, frozen, key, attempt, n)
    v, _, st, images, features, totals, terms = carry
    return dict(opt_vars=v, state=st, images=images, features=features, totals=totals, terms=terms)


def inversion_shardings(mesh, mesh_cfg: ml_collections.ConfigDict, opt_vars: Any, state: Any,
                        frozen: Any) -> tuple[Any, Any, Any]:
  """Shardings of the (opt_vars, state, frozen) arguments of a `BatchOptimizer` on `mesh`.

  The latents (or, without a generator, the pixels) are split over the batch axes. The teacher's and the
  generator's parameters are replicated, or with `config.mesh.shard_params` split over 'fsdp' like the
  pre-training state (`config.mesh.sharding_rules` name them 'teacher/...' and 'generator/...'); the Adam moments are created inside the program and follow their parameters. The
  statistics, the feature pool and the generator's BatchNorm state are replicated (they are small, and every
  device reads all of them).
  """
  rep = mesh_lib.replicated(mesh)
  params = lambda tree, name: mesh_lib.state_shardings(tree, mesh, mesh_cfg, prefix=name)
  opt_sh = {"generator": params(opt_vars["generator"], "generator"),
            "latents": jax.tree.map(lambda _: mesh_lib.data_sharding(mesh), opt_vars["latents"])}
  frozen_sh = {k: (params(v, "teacher") if k == "params" else jax.tree.map(lambda _: rep, v))
               for k, v in frozen.items()}
  return opt_sh, jax.tree.map(lambda _: rep, state), frozen_sh


def place_inversion_args(mesh, mesh_cfg: ml_collections.ConfigDict, opt_vars: Any, state: Any,
                         frozen: Any) -> tuple[Any, Any, Any]:
  """`jax.device_put` of (opt_vars, state, frozen) with `inversion_shardings` (a no-op for arrays already
  placed so)."""
  return jax.device_put((opt_vars, state, frozen), inversion_shardings(mesh, mesh_cfg, opt_vars, state, frozen))


_COMPILED: dict[tuple, Any] = {}
_COMPILED_MAX = 16


def _cached(key: tuple, build):
  """Compiled programs kept across calls (the continual framework and benchmarks invert repeatedly); the key
  holds everything the program depends on: the spec's program part (`ProgramSpec`, every option the traced
  code reads), the shapes, the modules and the registered term functions in use."""
  if key not in _COMPILED:
    if len(_COMPILED) >= _COMPILED_MAX:
      _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = build()
  return _COMPILED[key]


def _seed_words(rng: jax.Array) -> list[int]:
  data = jax.random.key_data(rng) if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
  return [int(w) for w in np.asarray(data).ravel()]


def _rbg_key(words: list[int]) -> jax.Array:
  """A key of XLA's RngBitGenerator ('rbg'), derived on the host from `words`.

  The generator initialisation and the L_task masking draw from rbg keys: threefry programs compile about
  4-10x slower on CPU, and these draws need no reproducibility across shardings.
  """
  data = np.random.SeedSequence(words).generate_state(4, np.uint32)
  return jax.random.wrap_key_data(jnp.asarray(data), impl="rbg")


def _batch_summary(out: dict, batch: int, steps: int, attempts: int, fresh: bool) -> dict[str, Any]:
  """Loss terms of one batch at its first step and at the end."""
  return dict(batch=batch, steps=steps, attempts=attempts, fresh_generator=fresh,
              start=dict(total=float(out["totals"][0]), **{k: float(v[0]) for k, v in out["terms"].items()}),
              end=dict(total=float(out["final_total"]), **{k: float(v) for k, v in out["final_terms"].items()}))


def _write_curves(writer, out: dict, global_step: int, steps: int, log_every: int) -> None:
  """Every loss term every `log_every` steps, then the final values, at global inner-step numbers."""
  for i in range(0, steps, log_every):
    writer.write_scalars(global_step + i, {"inversion/total": float(out["totals"][i]),
                                           **{f"inversion/{k}": float(v[i]) for k, v in out["terms"].items()}})
  writer.write_scalars(global_step + steps, {"inversion/total": float(out["final_total"]),
                                             **{f"inversion/{k}": float(v) for k, v in out["final_terms"].items()}})


def _finite(out: dict) -> bool:
  return bool(np.all(np.isfinite(out["totals"])) and np.isfinite(out["final_total"])
              and np.all(np.isfinite(out["images"])) and np.all(np.isfinite(out["features"])))


def _placement(mesh, mesh_cfg, batch_size: int, rank: int) -> tuple[Callable, Callable]:
  """(place(opt_vars, state, frozen), run context) of the batches of one inversion: identity and no mesh, or
  `place_inversion_args` and `jax.set_mesh`."""
  if mesh is None:
    return (lambda *args: args), contextlib.nullcontext
  shards = mesh_lib.num_batch_shards(mesh)
  if batch_size % shards:
    raise ValueError(f"config.inversion.schedule_{rank}d.batch_size={batch_size} must be divisible by the "
                     f"{shards} batch shards of the mesh {dict(mesh.shape)}")
  layout = mesh_cfg if mesh_cfg is not None else mesh_config()
  return (lambda *args: place_inversion_args(mesh, layout, *args)), (lambda: jax.set_mesh(mesh))


def _optimise_batch(b: int, fresh_batch: bool, carried, frozen: dict, *, seed, init_fn, runner, sched,
                    max_retries: int, place, run_context) -> tuple[dict, int, int, bool, Any, list[dict]]:
  """One batch, retried with a new seed (and a new generator) while its loss is non-finite:
  (outputs, steps, attempts, fresh, the placed frozen parameters, discarded attempts)."""
  discarded = []
  for attempt in range(max_retries + 1):
    k_init, k_run = (_rbg_key(seed + [b, attempt, i]) for i in (0, 1))
    fresh = fresh_batch or attempt > 0  # a retry also gets a new generator
    opt_vars, state = init_fn(k_init)
    if not fresh:
      opt_vars["generator"], state = carried
    steps = int(sched.init_steps) if fresh else int(sched.steps)
    opt_vars, state, placed = place(opt_vars, state, frozen)
    with run_context():
      out = jax.device_get(runner(opt_vars, state, placed, k_run, attempt, steps))
    # Histories: steps losses during the optimisation, then the final one.
    out["totals"], out["final_total"] = out["totals"][:steps], out["totals"][steps]
    out["final_terms"] = {k: v[steps] for k, v in out["terms"].items()}
    out["terms"] = {k: v[:steps] for k, v in out["terms"].items()}
    if _finite(out):
      return out, steps, attempt + 1, fresh, placed["params"], discarded
    logging.warning("inversion batch %d (attempt %d): the loss turned non-finite; the batch is discarded and "
                    "regenerated with a new seed", b, attempt)
    discarded.append(dict(batch=b, attempt=attempt))
  raise FloatingPointError(f"inversion batch {b}: the loss stayed non-finite for {max_retries + 1} "
                           f"attempts (config.inversion.max_retries={max_retries}); lower the learning "
                           "rates or check the statistics")


def synthesize_with_report(model, params, stats: statistics.FeatureStats, inv, *,
                           image_shape, rng: jax.Array, num_samples: int, mesh=None,
                           mesh_cfg: ml_collections.ConfigDict | None = None,
                           writer=None) -> tuple[np.ndarray, dict[str, Any]]:
  """`num_samples` synthetic images `(N, *image_shape)` float32 and a report of the optimisation.

  The report holds per batch the loss terms at the first and last step, the attempts, the discarded batches,
  the features of the synthetic images (for diversity measures) and their mean pairwise cosine similarity.
  With `mesh`, every batch is split over the mesh's batch axes, and with `mesh_cfg.shard_params` (a
  `config.mesh`) the teacher's and the generator's parameters over its 'fsdp' axis (`inversion_shardings`).
  `writer` (a clu MetricWriter) receives every
  loss term every `config.inversion.log_every_steps` inner steps under 'inversion/<term>'. `inv` is
  config.inversion or its `InversionSpec` (read once here otherwise).
  """
  spec = inversion_spec(inv)
  program, host = spec.program, spec.host
  image_shape = tuple(int(s) for s in image_shape)
  rank = spatial_rank_of(image_shape)
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  sched = schedule_for(spec, rank)
  batch_size, latent_dim = int(sched.batch_size), int(sched.latent_dim)
  losses.active_terms(program)  # fails early on an unknown term
  statistics.check_statistics(stats, model, params, image_shape)
  generator = build_generator(program, image_shape)
  out_act = output_activation(program, rank)

  pixel = None
  if stats.pixel is not None:
    pixel = {k: jnp.asarray(v, jnp.float32) for k, v in stats.pixel.items()}
  needs = [n for n in losses.active_terms(program) if n in losses.PIXEL_TERMS]
  if needs and pixel is None:
    raise ConfigError(f"config.inversion.loss_weights switches on {needs}, which match the stage's pixel "
                     "statistics, but its statistics file holds none: run the statistics pass with "
                     "config.inversion.pixel_statistics=True")
  if "pixel_pca" in needs:
    if "pca_basis" not in stats.pixel:
      raise ConfigError("config.inversion.loss_weights.pixel_pca matches the stage's principal subspace of grey "
                        "images, but its statistics file holds none: run the statistics pass with "
                        "config.inversion.pixel_components > 0")
    want = statistics.pca_pool_shape(image_shape[:-1], program.pixel_components_grid)
    if tuple(int(v) for v in stats.pixel["pca_shape"]) != want:
      raise ConfigError(f"config.inversion.pixel_components_grid={program.pixel_components_grid} pools the images "
                        f"to {want}, but the stage's principal subspace was kept on "
                        f"{tuple(int(v) for v in stats.pixel['pca_shape'])}: use the grid of its statistics pass")
    pixel.pop("pca_shape")
  target = statistics.FeatureStats(count=jnp.asarray(stats.count, jnp.float32),
                                   mean=jnp.asarray(stats.mean, jnp.float32),
                                   var=jnp.asarray(stats.var, jnp.float32), pixel=pixel if needs else None)
  feature_dim = int(target.mean.shape[-1])
  pool_size = max(host.pool_size if host.pool_size > 0 else num_samples, batch_size)
  pool = np.zeros((pool_size, feature_dim), np.float32)
  pool_count = 0
  place, run_context = _placement(mesh, mesh_cfg, batch_size, rank)

  cfg_key = (model, generator, program, out_act, image_shape, feature_dim,
             tuple((n, losses.get_loss_term(n)) for n in losses.active_terms(program)))
  max_steps = max(int(sched.init_steps), int(sched.steps))
  mode = inner_loop_mode(spec)
  runner = _cached(("run", max_steps, mode) + cfg_key, lambda: BatchOptimizer(
      model, generator, program, out_act, max_steps, image_shape, feature_dim, mode))
  init_fn = _cached(("init", generator, image_shape, batch_size, latent_dim), lambda: jax.jit(
      lambda k: init_variables(generator, image_shape, batch_size, latent_dim, k)))
  seed = _seed_words(rng)
  kept_images, kept_features, batches, discarded = [], [], [], []
  carried = None  # (generator params, generator state) carried to the next batch
  global_step = 0
  log_every = max(1, host.log_every_steps)
  num_batches = math.ceil(num_samples / batch_size)
  for b in range(num_batches):
    frozen = dict(params=params, stats=target, pool=jnp.asarray(pool), pool_count=jnp.asarray(pool_count, jnp.int32))
    out, steps, attempts, fresh, params, lost = _optimise_batch(
        b, carried is None or b % int(sched.reinit_every) == 0, carried, frozen, seed=seed, init_fn=init_fn,
        runner=runner, sched=sched, max_retries=host.max_retries, place=place, run_context=run_context)
    discarded += lost  # params: placed once, so the next batches' device_put of them is a no-op
    carried = (out["opt_vars"]["generator"], out["state"])
    keep = min(batch_size, num_samples - pool_count)  # pool_count = samples kept so far
    kept_images.append(np.asarray(out["images"][:keep], np.float32))
    feats = np.asarray(out["features"][:keep], np.float32)
    kept_features.append(feats)
    pool[(pool_count + np.arange(keep)) % pool_size] = feats
    pool_count += keep

    batches.append(_batch_summary(out, b, steps, attempts, fresh))
    if writer is not None:
      _write_curves(writer, out, global_step, steps, log_every)
    global_step += steps
    faults.point(f"inversion_batch:{b}")
    logging.info("inversion batch %d/%d: %d steps, loss %.4g -> %.4g (%s)", b + 1, num_batches, steps,
                 batches[-1]["start"]["total"], batches[-1]["end"]["total"],
                 ", ".join(f"{k} {v:.4g}" for k, v in batches[-1]["end"].items() if k != "total"))
  return _images_and_report(kept_images, kept_features, batches, discarded, num_batches, batch_size,
                            program.generator)


def _images_and_report(kept_images, kept_features, batches, discarded, num_batches: int, batch_size: int,
                       generator: str) -> tuple[np.ndarray, dict[str, Any]]:
  images = np.concatenate(kept_images, axis=0)
  features = np.concatenate(kept_features, axis=0)
  report = dict(
      num_samples=int(images.shape[0]), num_batches=num_batches, batch_size=batch_size,
      generator=generator, batches=batches, discarded=discarded,
      start={k: float(np.mean([bb["start"][k] for bb in batches])) for k in batches[0]["start"]},
      end={k: float(np.mean([bb["end"][k] for bb in batches])) for k in batches[0]["end"]},
      mean_pairwise_cosine=(float(losses.mean_pairwise_cosine(jnp.asarray(features)))
                            if len(features) > 1 else float("nan")),
      features=features)
  return images, report


def synthesize(model, params, stats: statistics.FeatureStats, inv, *, image_shape, rng: jax.Array,
               num_samples: int, mesh=None, mesh_cfg=None, writer=None) -> np.ndarray:
  """`num_samples` synthetic images `(N, *image_shape)` float32 inverted from `model` (see module doc)."""
  images, _ = synthesize_with_report(model, params, stats, inv, image_shape=image_shape, rng=rng,
                                     num_samples=num_samples, mesh=mesh, mesh_cfg=mesh_cfg, writer=writer)
  return images


def generator_at_init(inv, *, image_shape, rng: jax.Array, num_samples: int) -> np.ndarray | None:
  """`num_samples` images `(N, *image_shape)` float32 of the generator at initialisation: freshly initialised
  weights and latents, drawn batch by batch as inversion starts each batch, with no optimisation step.

  This is the `noise` method's replay set (the control that keeps everything of invcoss but the inversion)
  and the reference a trained generator must beat. None when `config.inversion.generator` is 'none' (there
  is no generator whose output could be replayed)."""
  image_shape = tuple(int(s) for s in image_shape)
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  spec = inversion_spec(inv)
  generator = build_generator(spec.program, image_shape)
  if generator is None:
    return None
  rank = spatial_rank_of(image_shape)
  sched = schedule_for(spec, rank)
  out_act = output_activation(spec.program, rank)
  batch, latent = int(sched.batch_size), int(sched.latent_dim)
  draw = _cached(("init_images", generator, out_act, image_shape, batch, latent), lambda: jax.jit(
      lambda k: render(generator, out_act, *init_variables(generator, image_shape, batch, latent, k))[0]))
  out, key = [], rng
  while sum(len(o) for o in out) < num_samples:
    key, sub = jax.random.split(key)
    out.append(np.asarray(jax.device_get(draw(sub)), np.float32))
  return np.concatenate(out)[:num_samples]


def inversion_program(optimizer, whole_loop: bool = True):
  """The jitted program of a `BatchOptimizer` from (opt_vars, state, frozen, key, attempt,
  num_steps): with `whole_loop`, the fresh carry and the whole inner loop (the 'compiled' mode that GPUs and
  TPUs run); otherwise one inner step from the fresh carry (one forward and backward pass and an Adam update:
  the FLOPs of a step, and the program the 'stepwise' mode runs per step)."""
  # BatchOptimizer's own pieces (its carry initialisation, loop and step), composed without running them.
  if whole_loop:
    return jax.jit(lambda v, st, fr, k, a, n: optimizer.inner_loop(optimizer.init_carry(v, st), fr, k, a, n))
  return jax.jit(lambda v, st, fr, k, a, n: optimizer.inner_step(jnp.int32(0), optimizer.init_carry(v, st), fr, k, a,
                                                                 n))
