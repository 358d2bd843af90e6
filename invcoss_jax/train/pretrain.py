"""MAE (or, for the report stage, MLM) pre-training of one stage on the trainer core (train/core.py).

`train_stage(config, workdir)` trains (or resumes) a stage; the `pretrain` job (invcoss_jax/jobs/pretrain.py)
adds the statistics pass. A run restarted on the same workdir resumes from its latest checkpoint (state and
data iterator), so its later losses equal those of an uninterrupted run.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import parameter_overview, periodic_actions

from invcoss_jax import data as data_lib, interop, models
from invcoss_jax.config_checks import ConfigError, check_batch_fits
from invcoss_jax.data import registry, tokenization
from invcoss_jax.parallel import mesh as mesh_lib
from invcoss_jax.privacy import accounting as privacy_accounting, dp_sgd, sampling as dp_sampling
from invcoss_jax.train import checkpoint as ckpt_lib, core, mlm, optim, vocabulary, writers

# Streams folded into the run's key, so each random use is independent of the others.
_IMAGE_STREAM = 0x1A6E
_TEXT_STREAM = 0x7E47


def mae_loss(model: models.MAE, mask_ratio: float) -> core.LossFn:
  """The MAE loss of an image batch {'image'}; masking and drop-path keys are split from the step's key."""

  def loss_fn(params, batch, consts, rng):
    del consts
    mask_rng, drop_rng = jax.random.split(rng)
    out = model.apply({"params": params}, batch["image"], mask_ratio=mask_ratio, train=True,
                      rngs={"masking": mask_rng, "dropout": drop_rng})
    return out["loss"].astype(jnp.float32), {}

  return loss_fn


def mlm_loss(model: models.MAE, probability: float | None = None) -> core.LossFn:
  """The report stage's loss: masked language modelling on a batch of corrupted ids (`train.mlm.mlm_inputs`
  prepares it on the host: tokens, attention_mask, mlm_mask, labels). With the masking `probability` the head
  scores only the gathered corrupted positions (`mlm.prediction_budget` of the padded length bounds them);
  None puts every position through the vocabulary projection (the reference path)."""

  def loss_fn(params, batch, consts, rng):
    del consts
    budget = None if probability is None else mlm.prediction_budget(batch["tokens"].shape[1], probability)
    out = model.apply({"params": params}, batch["tokens"], batch["attention_mask"], batch["mlm_mask"],
                      batch["labels"], train=True, rngs={"dropout": jax.random.fold_in(rng, 1)},
                      max_predictions=budget, method=models.MAE.mlm)
    return out["loss"].astype(jnp.float32), {}

  return loss_fn


def make_train_step(model: models.MAE, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    mask_ratio: float, grad_accum_steps: int = 1, privacy: dp_sgd.Spec | None = None) -> Callable:
  """The pure MAE train step (state, batch[, consts]) -> (state, metrics) (core.make_step of `mae_loss`;
  `privacy`: a DP-SGD plan, see core.make_step)."""
  return core.make_step(mae_loss(model, mask_ratio), tx, schedule, grad_accum_steps=grad_accum_steps,
                        privacy=privacy)


def make_text_train_step(model: models.MAE, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                         grad_accum_steps: int = 1, probability: float | None = None,
                         privacy: dp_sgd.Spec | None = None) -> Callable:
  """The report stage's pure train step (core.make_step of `mlm_loss`; `probability` as there)."""
  return core.make_step(mlm_loss(model, probability), tx, schedule, grad_accum_steps=grad_accum_steps,
                        privacy=privacy)


class TextMasker:
  """Host-side whole-word masking of each text batch, seeded by (seed, step): a resumed run draws the same
  masks."""

  def __init__(self, data_cfg: ml_collections.ConfigDict, seed: int, probability: float):
    self.mask = mlm.masker_for(str(data_cfg.text.tokenizer), probability)
    self.seed = int(seed)

  def __call__(self, local: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    return self.mask(local, np.random.default_rng([self.seed, _TEXT_STREAM, int(step)]))


def prepare_text_stage(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy of a report stage's config with its tokenizer (trained on the stage's training split into
  `workdir/tokenizer.json`, reused when there, or the user's file) and config.model's vocabulary set from it."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.data = tokenization.ensure_tokenizer(config.data, workdir)
  tokenization.set_model_vocabulary(config.model, str(config.data.text.tokenizer))
  return config


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
  path = str(config.data.path or "")
  if path and not os.path.exists(path):
    raise FileNotFoundError(
        f"config.data.path={path!r} does not exist: expected the {config.data.modality} "
        f"training data (config.data.name={config.data.name!r}, format="
        f"{config.data.format!r}) there. Point --config.data.path at your copy, or try the "
        f"embedded demo data with a ':demo' preset, e.g. --config=configs/xray.py:demo")


def _open_train_data(config: ml_collections.ConfigDict, micro_batch: int, *, iterator: bool = True):
  """(the training iterator, or None without `iterator`, the number of examples, the example shape)."""
  check_data_available(config)
  try:
    it = (data_lib.make_train_iterator(config.data, global_batch_size=micro_batch, seed=int(config.seed))
          if iterator else None)
    n = data_lib.num_examples(config.data)
    shape = tuple(data_lib.image_shape(config.data))
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}\n(config.data.name={config.data.name!r}, "
                            f"config.data.path={config.data.path!r}; for the embedded demo data "
                            f"use a ':demo' preset, e.g. --config=configs/xray.py:demo)") from e
  return it, n, shape


def _hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The run's defining options for TensorBoard's HParams view (the whole config is config.json)."""
  out = {"seed": int(config.seed), "total_steps": int(config.total_steps),
         "data.name": str(config.data.name), "data.modality": str(config.data.modality)}
  for section in ("model", "train"):
    for k, v in config[section].items():
      if isinstance(v, (bool, int, float, str)):
        out[f"{section}.{k}"] = v
      elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v):
        out[f"{section}.{k}"] = "x".join(str(x) for x in v)
  return out


def _torch_init_params(config: ml_collections.ConfigDict, init_args: dict[str, Any]) -> Any | None:
  """Host parameters initialised as usual, then overwritten from `config.init_from_torch` (MAE, timm or
  MedCoSS PyTorch weights); None when no PyTorch checkpoint is configured."""
  path = str(config.init_from_torch or "")
  if not path:
    return None

  init_rng, _ = jax.random.split(init_args["rng"])  # the same stream create_train_state initialises from
  params = jax.device_get(init_args["init_params"](init_rng))
  layout = str(config.interop.torch_layout)
  logging.info("initialising from PyTorch weights %s (layout %s)", path, layout)
  return interop.load_torch_into_params(path, params, config.model, layout=layout)


def train_stage(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                stop_at_step: int | None = None) -> dict[str, Any]:
  """Pre-trains (or resumes) the MAE of one stage in `workdir`.

  `stop_at_step` ends the run early after that train step with a checkpoint, as a preempted job would;
  rerunning on the same workdir continues from there.

  Returns dict(state, losses {step: loss of this run's steps}, final_loss, step, total_steps, workdir,
  config (the run's config, with a report stage's tokenizer fields), text).
  """
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(config.mesh)
  train_cfg = config.train
  k = int(train_cfg.grad_accum_steps)
  if int(train_cfg.global_batch_size) % k:
    raise ConfigError(f"config.train.global_batch_size={train_cfg.global_batch_size} must be divisible by "
                     f"config.train.grad_accum_steps={k}")
  micro_batch = int(train_cfg.global_batch_size) // k
  mesh_lib.check_global_batch(mesh, micro_batch, "config.train.global_batch_size / grad_accum_steps")

  text = registry.is_text(config.data)
  if text:
    config = prepare_text_stage(config, workdir)
  private = privacy_accounting.enabled(config.get("privacy"))
  if private:
    privacy_accounting.check_privacy(config.privacy, grad_accum_steps=k)
  # A DP stage draws Poisson batches (privacy.sampling): no grain iterator, nothing of it to checkpoint.
  data_iter, num_examples, image_shape = _open_train_data(config, micro_batch, iterator=not private)
  check_batch_fits("train.global_batch_size", int(train_cfg.global_batch_size), num_examples,
                   f"data (name {config.data.name!r}, split {config.data.get('split', 'train')!r})",
                   volumes=len(image_shape) == 4)
  if text:  # before the first checkpoint: the checkpoint's text embedding is only meaningful with it
    vocabulary.check_or_record(workdir, str(config.model.tokenizer))
  length = optim.run_length(config, num_examples)
  tx, schedule = optim.make_optimizer(train_cfg, length)
  plan = _privacy_plan(config, workdir, mesh, num_examples, length.total_steps, text)
  model = models.build_mae(config.model)
  logging.info("pre-training %s on %s (%d examples of shape %s): %d updates (%d warm-up), %d per epoch, "
               "peak lr %.3g, mesh %s", config.model.get("preset", "?"), config.data.get("name"),
               num_examples, image_shape, length.total_steps, length.warmup_steps, length.steps_per_epoch,
               optim.peak_learning_rate(train_cfg), dict(mesh.shape))

  total = length.total_micro_steps
  writer = writers.create_writer(workdir)
  manager = ckpt_lib.make_manager(workdir, config.checkpoint)
  losses: dict[int, float] = {}
  try:
    with jax.set_mesh(mesh):
      init_args = dict(init_params=lambda rng: models.init_mae_params(model, rng, [image_shape]), tx=tx,
                       rng=jax.random.PRNGKey(int(config.seed)), mesh=mesh,
                       rules=mesh_lib.LayoutRules.of(config.mesh))
      if manager.latest_step() is not None:
        # Restored straight into this run's layout, which may differ from the saving run's.
        target, shardings = core.abstract_train_state(**init_args)
        state, _ = ckpt_lib.restore(manager, target, data_iter)
      else:
        state, shardings = core.create_train_state(**init_args, params=_torch_init_params(config, init_args))
      start = int(jax.device_get(state.step))
      # Recorded once the run was checked and its checkpoint restored into this run's model (a failed resume
      # leaves the record as it was), and never again for a finished stage: it describes what trained it.
      if start < total or not os.path.isfile(os.path.join(workdir, ckpt_lib.CONFIG_FILE)):
        ckpt_lib.write_config(workdir, config)
      if start == 0:
        parameter_overview.log_parameter_overview(state.params, msg="MAE parameters")
        writer.write_hparams(_hparams(config))
      else:
        logging.info("resuming at step %d of %d", start, total)
      end = total if stop_at_step is None else min(total, int(stop_at_step))
      loop = _loop(config, model, text, mesh, shardings, tx, schedule, data_iter, writer, manager, total, plan)
      state, _, losses, _ = loop.run(state, None, start, end)
      manager.wait_until_finished()
  finally:
    manager.close()
    writer.flush()
    writer.close()

  final_step = int(jax.device_get(state.step))
  return dict(state=state, losses=losses, final_loss=losses[max(losses)] if losses else None, step=final_step,
              total_steps=total, workdir=workdir, config=config, text=text)


def _privacy_plan(config, workdir: str, mesh, num_examples: int, steps: int, text: bool = False
                  ) -> privacy_accounting.DpSgdPlan | None:
  """The stage's DP-SGD plan (None without config.privacy), its ledger written to `workdir/privacy.json`. An
  image stage's statistics pass is DP too: a calibrated sigma leaves it privacy.stats_epsilon_fraction of the
  target (jobs/inversion.run_stats composes it into the ledger)."""
  multiple = math.lcm(mesh_lib.num_batch_shards(mesh), jax.process_count())
  data = str(config.data.get("name") or config.data.get("path"))
  if not privacy_accounting.enabled(config.get("privacy")):
    return None
  previous = privacy_accounting.read_ledger(workdir)
  plan = privacy_accounting.plan_dp_sgd(
      config.privacy, expected_batch_size=int(config.train.global_batch_size), dataset_size=num_examples,
      steps=steps, batch_multiple=multiple, data=data, previous=previous,
      grad_accum_steps=int(config.train.grad_accum_steps), statistics=not text)
  logging.info("DP-SGD: (%.4g, %.3g)-DP (%s accountant) over %d steps: noise multiplier %.4g, clip norm %g, "
               "Poisson rate %.4g (expected batch %d, padded to %d, vmap chunks of %d)", plan.epsilon, plan.delta,
               plan.accountant, plan.steps, plan.noise_multiplier, plan.clip_norm, plan.sampling_rate,
               plan.expected_batch_size, plan.max_batch_size, plan.microbatch_size)
  if jax.process_index() == 0:
    record = privacy_accounting.ledger(
        [plan.mechanism(data)], delta=plan.delta, accountant=plan.accountant, eps=plan.epsilon, dp=True,
        dp_sgd_epsilon=plan.epsilon, plan_key=privacy_accounting.plan_key(plan),
        target_epsilon=plan.target_epsilon if math.isfinite(plan.target_epsilon) else None,
        dataset_size=plan.dataset_size,
        expected_batch_size=plan.expected_batch_size, max_batch_size=plan.max_batch_size,
        microbatch_size=plan.microbatch_size, sampling=plan.sampling,
        statistics_epsilon_fraction=plan.statistics_epsilon_fraction or None,
        covers=privacy_accounting.COVERS_SGD)
    privacy_accounting.write_ledger(workdir, privacy_accounting.carry_statistics(record, previous))
  return plan


def _loop(config, model, text: bool, mesh, shardings, tx, schedule, data_iter, writer, manager,
          total: int, plan: privacy_accounting.DpSgdPlan | None = None) -> core.Loop:
  """The stage's loop on the core: batches from the data iterator (MLM-masked for text), or with `plan` the
  Poisson batches of DP-SGD, progress, image grids, checkpoints of the state and the iterator."""
  k = int(config.train.grad_accum_steps)
  if text:
    step = make_text_train_step(model, tx, schedule, grad_accum_steps=k,
                                probability=float(config.train.mlm_probability), privacy=plan)
    masker = TextMasker(config.data, int(config.seed), float(config.train.mlm_probability))
  else:
    step = make_train_step(model, tx, schedule, mask_ratio=float(config.train.mask_ratio), grad_accum_steps=k,
                           privacy=plan)
  step_fn = core.jit_step(step, shardings, mesh)
  per_dispatch = int(config.train.steps_per_dispatch)
  block_fn = core.jit_block(step, shardings, mesh) if per_dispatch > 1 else None
  poisson = None
  if plan is not None:
    poisson = dp_sampling.PoissonBatches(config.data, seed=int(config.seed), sampling_rate=plan.sampling_rate,
                                         max_batch_size=plan.max_batch_size, microbatch_size=plan.microbatch_size,
                                         process_index=jax.process_index(),
                                         process_count=jax.process_count())
  log_every = max(1, int(config.logging.log_every_steps))
  report = periodic_actions.ReportProgress(num_train_steps=total, every_steps=log_every)
  last_local: dict[str, Any] = {}

  def next_batch(step: int):
    with report.timed("data", wait_jax_async_dispatch=False):
      local = next(data_iter) if poisson is None else poisson.batch(step)
    last_local["batch"] = local
    extra = {} if poisson is None else {dp_sgd.PADDING_KEY: local[dp_sgd.PADDING_KEY]}
    if text:
      return mesh_lib.put_batch(mesh, {**masker(local, step), **extra})
    return mesh_lib.put_batch(mesh, {"image": np.asarray(local["image"], np.float32), **extra})

  hooks = []
  image_every, num_images = int(config.logging.image_every_steps), int(config.logging.num_images)
  if image_every > 0 and not text and plan is not None:
    logging.info("DP-SGD: no reconstruction grids (they would store training images in the workdir's events)")
  if image_every > 0 and not text and plan is None:
    reconstruct = make_reconstruct(model, float(config.train.mask_ratio))

    def grids(step, state, consts):
      if step % image_every == 0 and jax.process_index() == 0:
        _write_images(writer, reconstruct, state, last_local["batch"]["image"][:num_images], config, step)
      return state, consts

    hooks.append(grids)
  return core.Loop(step_fn=step_fn, next_batch=next_batch, what="pretrain", log_every=log_every, writer=writer,
                   save=lambda step, state: ckpt_lib.save(manager, step, state, data_iter, config, force=True),
                   should_save=manager.should_save, latest_checkpoint=manager.latest_step, after_step=hooks,
                   hook_at=lambda step: bool(hooks) and step % image_every == 0, progress=report,
                   steps_per_dispatch=per_dispatch, block_fn=block_fn)


def _write_images(writer, reconstruct, state, images, config, step):
  images = jnp.asarray(np.asarray(images, np.float32))
  rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), _IMAGE_STREAM + step)
  mask_px, recon = jax.device_get(reconstruct(state.params, images, rng))
  grid = writers.mae_image_grid(np.asarray(images), mask_px, recon)
  writer.write_images(step, {"train/reconstruction": grid[None]})
