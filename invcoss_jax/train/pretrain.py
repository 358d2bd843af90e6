"""MAE pre-training of one stage: the sharded train step, the loop and the `pretrain` job.

`pretrain(config, workdir)` is what `main.py` runs for `config.mode = 'pretrain'` and what a notebook
calls. A run restarted on the same workdir resumes from its latest checkpoint (state and data
iterator), so its later losses equal those of an uninterrupted run.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import parameter_overview, periodic_actions

from invcoss_jax import faults, models
from invcoss_jax.parallel import mesh as mesh_lib
from invcoss_jax.train import checkpoint as ckpt_lib
from invcoss_jax.train import optim, writers
from invcoss_jax.train.nonfinite import check_losses
from invcoss_jax.train.state import TrainState, abstract_train_state, create_train_state

# Streams folded into the run's key, so each random use is independent of the others.
_IMAGE_STREAM = 0x1A6E
_TEXT_STREAM = 0x7E47


def _update(state: TrainState, loss_fn: Callable, tx: optax.GradientTransformation, schedule: optax.Schedule,
            grad_accum_steps: int) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser update of `state` on the gradient of `loss_fn(params)`, with the step's metrics."""
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "learning_rate": schedule(state.step // grad_accum_steps)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(model: models.MAE, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    mask_ratio: float, grad_accum_steps: int = 1) -> Callable:
  """The pure train step: (state, batch) -> (state, metrics). Masking and drop-path keys are
  folded from the state's key and step, so a resumed run draws the same masks."""

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    mask_rng, drop_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))

    def loss_fn(params):
      out = model.apply({"params": params}, batch["image"], mask_ratio=mask_ratio, train=True,
                        rngs={"masking": mask_rng, "dropout": drop_rng})
      return out["loss"].astype(jnp.float32)

    return _update(state, loss_fn, tx, schedule, grad_accum_steps)

  return train_step


def make_text_train_step(model: models.MAE, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                         grad_accum_steps: int = 1) -> Callable:
  """The report stage's step: masked language modelling on a batch of corrupted ids (`train.mlm.mlm_inputs`
  prepares it on the host: tokens, attention_mask, mlm_mask, labels)."""

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    drop_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)

    def loss_fn(params):
      out = model.apply({"params": params}, batch["tokens"], batch["attention_mask"], batch["mlm_mask"],
                        batch["labels"], train=True, rngs={"dropout": drop_rng}, method=models.MAE.mlm)
      return out["loss"].astype(jnp.float32)

    return _update(state, loss_fn, tx, schedule, grad_accum_steps)

  return train_step


class TextMasker:
  """Host-side whole-word masking of each text batch, seeded by (seed, step): a resumed run draws the same
  masks."""

  def __init__(self, data_cfg: ml_collections.ConfigDict, seed: int, probability: float):
    from invcoss_jax.train import mlm  # pylint: disable=g-import-not-at-top
    self.mask = mlm.masker_for(str(data_cfg.text.tokenizer), probability)
    self.seed = int(seed)

  def __call__(self, local: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    return self.mask(local, np.random.default_rng([self.seed, _TEXT_STREAM, int(step)]))


def prepare_text_stage(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy of a report stage's config with its tokenizer (trained on the stage's training split into
  `workdir/tokenizer.json`, reused when there, or the user's file) and config.model.vocab_size set from it."""
  from invcoss_jax.data import tokenization  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  config.data = tokenization.ensure_tokenizer(config.data, workdir)
  fields = tokenization.model_text_fields(str(config.data.text.tokenizer))
  given = int(config.model.get("vocab_size", 0))
  if given and given != fields["vocab_size"]:
    raise ValueError(f"config.model.vocab_size={given}, but the tokenizer {config.data.text.tokenizer} has "
                     f"{fields['vocab_size']} tokens: leave it 0 to take the tokenizer's")
  config.model.update(fields)
  return config


def is_text_stage(config: ml_collections.ConfigDict) -> bool:
  return str(config.data.get("modality", "")) == "report" or str(config.data.get("format", "")) == "text"


def jit_train_step(train_step: Callable, state_shardings: Any, mesh: jax.sharding.Mesh) -> Callable:
  """jit with explicit shardings; the old state is donated (its buffers become the new state's)."""
  return jax.jit(train_step, in_shardings=(state_shardings, mesh_lib.data_sharding(mesh)),
                 out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))


def make_reconstruct(model: models.MAE, mask_ratio: float) -> Callable:
  """(params, images, rng) -> (mask as pixels, reconstruction) for the image grids."""

  @jax.jit
  def reconstruct(params, images, rng):
    variables = {"params": params}
    out = model.apply(variables, images, mask_ratio=mask_ratio, train=False, rngs={"masking": rng})
    recon = model.apply(variables, images, out["pred"], out["mask"], method=models.MAE.reconstruct)
    rank = images.ndim - 2
    ps = model.cfg.patch_size(rank)
    grid = models.grid_shape(images.shape[1:-1], ps)
    per_patch = jnp.broadcast_to(out["mask"][..., None], out["pred"].shape)
    mask_px = models.unpatchify(per_patch, grid, ps, images.shape[-1])
    return mask_px, recon

  return reconstruct


def check_data_available(config: ml_collections.ConfigDict) -> None:
  """A clear error when the configured data path does not exist."""
  path = str(config.data.get("path", "") or "")
  if path and not os.path.exists(path):
    raise FileNotFoundError(
        f"config.data.path={path!r} does not exist: expected the {config.data.get('modality', '')} "
        f"training data (config.data.name={config.data.get('name', '')!r}, format="
        f"{config.data.get('format', '')!r}) there. Point --config.data.path at your copy, or try the "
        f"embedded demo data with a ':demo' preset, e.g. --config=configs/xray.py:demo")


def _open_train_data(config: ml_collections.ConfigDict, micro_batch: int):
  from invcoss_jax import data as data_lib  # Lazy: the input layer imports grain's workers.

  check_data_available(config)
  try:
    it = data_lib.make_train_iterator(config.data, global_batch_size=micro_batch, seed=int(config.seed))
    n = data_lib.num_examples(config.data)
    shape = tuple(data_lib.image_shape(config.data))
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}\n(config.data.name={config.data.get('name')!r}, "
                            f"config.data.path={config.data.get('path')!r}; for the embedded demo data "
                            f"use a ':demo' preset, e.g. --config=configs/xray.py:demo)") from e
  return it, n, shape


def _hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The run's defining options for TensorBoard's HParams view (the whole config is config.json)."""
  out = {"seed": int(config.seed), "total_steps": int(config.total_steps),
         "data.name": str(config.data.get("name", "")), "data.modality": str(config.data.get("modality", ""))}
  for section in ("model", "train"):
    for k, v in config[section].items():
      if isinstance(v, (bool, int, float, str)):
        out[f"{section}.{k}"] = v
      elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v):
        out[f"{section}.{k}"] = "x".join(str(x) for x in v)
  return out


def _run_stats(config: ml_collections.ConfigDict, workdir: str, params: Any):
  """The stage's statistics pass (invcoss_jax.inversion.job.run_stats), when that job exists."""
  try:
    from invcoss_jax.inversion import job as inversion_job
  except ModuleNotFoundError as e:
    if e.name not in ("invcoss_jax.inversion.job",):
      raise
    logging.warning("invcoss_jax.inversion.job is not available: skipping the statistics pass")
    return None
  return inversion_job.run_stats(config, workdir, params=params)


def _torch_init_params(config: ml_collections.ConfigDict, init_args: dict[str, Any]) -> Any | None:
  """Host parameters initialised as usual, then overwritten from `config.init_from_torch` (MAE, timm or
  MedCoSS PyTorch weights); None when no PyTorch checkpoint is configured."""
  path = str(config.get("init_from_torch", "") or "")
  if not path:
    return None
  from invcoss_jax import interop  # Imported only when used: torch is needed only for .pth files.

  init_rng, _ = jax.random.split(init_args["rng"])  # the same stream create_train_state initialises from
  params = jax.device_get(init_args["init_params"](init_rng))
  layout = str(config.get("interop", {}).get("torch_layout", "auto"))
  logging.info("initialising from PyTorch weights %s (layout %s)", path, layout)
  return interop.load_torch_into_params(path, params, config.model, layout=layout)


def pretrain(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
             stop_at_step: int | None = None) -> dict[str, Any]:
  """Pre-trains (or resumes) the MAE of one stage in `workdir`.

  `stop_at_step` ends the run early after that train step with a checkpoint, as a preempted job
  would (no statistics pass); rerunning on the same workdir continues from there.

  Returns dict(state, losses {step: loss of this run's steps}, final_loss, step, total_steps,
  workdir, stats (what the statistics pass returned, or None)).
  """
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(config.mesh)
  train_cfg = config.train
  k = int(train_cfg.get("grad_accum_steps", 1))
  if int(train_cfg.global_batch_size) % k:
    raise ValueError(f"config.train.global_batch_size={train_cfg.global_batch_size} must be divisible by "
                     f"config.train.grad_accum_steps={k}")
  micro_batch = int(train_cfg.global_batch_size) // k
  mesh_lib.check_global_batch(mesh, micro_batch, "config.train.global_batch_size / grad_accum_steps")

  text = is_text_stage(config)
  if text:
    config = prepare_text_stage(config, workdir)
  data_iter, num_examples, image_shape = _open_train_data(config, micro_batch)
  length = optim.run_length(config, num_examples)
  tx, schedule = optim.make_optimizer(train_cfg, length)
  model = models.build_mae(config.model)
  ckpt_lib.write_config(workdir, config)
  logging.info("pre-training %s on %s (%d examples of shape %s): %d updates (%d warm-up), %d per epoch, "
               "peak lr %.3g, mesh %s", config.model.get("preset", "?"), config.data.get("name"),
               num_examples, image_shape, length.total_steps, length.warmup_steps, length.steps_per_epoch,
               optim.peak_learning_rate(train_cfg), dict(mesh.shape))

  total = length.total_micro_steps
  mask_ratio = float(train_cfg.mask_ratio)
  log_every = max(1, int(config.logging.log_every_steps))
  image_every = int(config.logging.get("image_every_steps", 0))
  num_images = int(config.logging.get("num_images", 8))
  writer = writers.create_writer(workdir)
  manager = ckpt_lib.make_manager(workdir, config.checkpoint)
  losses: dict[int, float] = {}
  try:
    with jax.set_mesh(mesh):
      init_args = dict(init_params=lambda rng: models.init_mae_params(model, rng, [image_shape]), tx=tx,
                       rng=jax.random.PRNGKey(int(config.seed)), mesh=mesh,
                       shard_params=bool(config.mesh.shard_params),
                       fsdp_min_size=int(config.mesh.get("fsdp_min_size", mesh_lib.DEFAULT_FSDP_MIN_SIZE)))
      if manager.latest_step() is not None:
        # Restored straight into this run's layout, which may differ from the saving run's.
        target, shardings = abstract_train_state(**init_args)
        state, _ = ckpt_lib.restore(manager, target, data_iter)
      else:
        state, shardings = create_train_state(**init_args, params=_torch_init_params(config, init_args))
      start = int(jax.device_get(state.step))
      if start == 0:
        parameter_overview.log_parameter_overview(state.params, msg="MAE parameters")
        writer.write_hparams(_hparams(config))
      else:
        logging.info("resuming at step %d of %d", start, total)

      if text:
        step_fn = jit_train_step(make_text_train_step(model, tx, schedule, grad_accum_steps=k), shardings, mesh)
        masker = TextMasker(config.data, int(config.seed), float(train_cfg.mlm_probability))
      else:
        step_fn = jit_train_step(make_train_step(model, tx, schedule, mask_ratio=mask_ratio,
                                                 grad_accum_steps=k), shardings, mesh)
      reconstruct = make_reconstruct(model, mask_ratio)
      report = periodic_actions.ReportProgress(num_train_steps=total, every_steps=log_every)
      pending: list[tuple[int, Any]] = []
      last_step, last_time = start, time.perf_counter()
      end = total if stop_at_step is None else min(total, int(stop_at_step))
      step = start
      for step in range(start + 1, end + 1):
        with report.timed("data", wait_jax_async_dispatch=False):
          local = next(data_iter)
        if text:
          batch = mesh_lib.put_batch(mesh, masker(local, step))
        else:
          batch = mesh_lib.put_batch(mesh, {"image": np.asarray(local["image"], np.float32)})
        state, metrics = step_fn(state, batch)
        pending.append((step, metrics))
        report(step)
        if step % log_every == 0 or step == end or step == start + 1:
          fetched = jax.device_get(pending)
          pending = []
          now = time.perf_counter()
          step_losses = [float(m["loss"]) for _, m in fetched]
          losses.update({s: float(m["loss"]) for s, m in fetched})
          check_losses(fetched, what="pretrain", latest_checkpoint=manager.latest_step())
          writer.write_scalars(step, {
              "train/loss": float(np.mean(step_losses)),
              "train/grad_norm": float(np.mean([m["grad_norm"] for _, m in fetched])),
              "train/learning_rate": float(fetched[-1][1]["learning_rate"]),
              "train/steps_per_sec": (step - last_step) / max(now - last_time, 1e-9)})
          last_step, last_time = step, now
        if image_every > 0 and not text and step % image_every == 0 and jax.process_index() == 0:
          _write_images(writer, reconstruct, state, local["image"][:num_images], config, step)
        if pending and manager.should_save(step):
          check_losses(pending, what="pretrain", latest_checkpoint=manager.latest_step())
        ckpt_lib.save(manager, step, state, data_iter, config)
        faults.point(f"train_step:pretrain:{step}")
      if step > start and manager.latest_step() != step:
        check_losses(pending, what="pretrain", latest_checkpoint=manager.latest_step())
        ckpt_lib.save(manager, step, state, data_iter, config, force=True)
      manager.wait_until_finished()
  finally:
    manager.close()
    writer.flush()
    writer.close()

  final_step = int(jax.device_get(state.step))
  stats = None
  if final_step >= total and bool(train_cfg.get("stats_after_pretrain", True)):
    if text:  # text is never inverted (it is discrete): its stage keeps a real k-means buffer instead
      logging.info("report stage: no feature statistics (text is not inverted)")
    else:
      stats = _run_stats(config, workdir, state.params)
  return dict(state=state, losses=losses, final_loss=losses[max(losses)] if losses else None,
              step=final_step, total_steps=total, workdir=workdir, stats=stats)


def _write_images(writer, reconstruct, state, images, config, step):
  images = jnp.asarray(np.asarray(images, np.float32))
  rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), _IMAGE_STREAM + step)
  mask_px, recon = jax.device_get(reconstruct(state.params, images, rng))
  grid = writers.mae_image_grid(np.asarray(images), mask_px, recon)
  writer.write_images(step, {"train/reconstruction": grid[None]})
