"""Continual pre-training over a sequence of modality stages with one method of Table 1 (the library behind
the `continual` job, invcoss_jax/jobs/continual.py).

For every stage T (see stages.py for the layout):
  1. start from stage T-1's model (trunk and tokenizers; the decoder re-initialised when configured),
  2. train on D_T plus the buffer B_T with the composite step (step.py) of the method,
  3. end the stage while D_T is still readable: statistics pass, then what the method keeps of it (a real
     buffer for er/medcoss, the Fisher information for ewc, the synthetic set for invcoss),
  4. retire D_T: the data-free guard (guard.py) refuses every later read of it.
A stopped sequence resumes at the stage and step where it stopped (orbax checkpoints of the state and of
every data stream); finished stages are recognised by their stage_info.json. The method is an object of the
registry (continual/methods/): its declarations and hooks decide what a stage keeps, replays and trains with;
this module has no branch on a method's name.

`run(config, workdir)` runs (or resumes) the sequence; each stage trains on the trainer core (train/core.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from typing import Any, Callable

import jax
import ml_collections
from absl import logging

from invcoss_jax import data as data_lib, models, workdir_lock
from invcoss_jax.config_checks import ConfigError, check_batch_fits
from invcoss_jax.continual import methods, params as params_lib, text as text_lib
from invcoss_jax.continual.guard import DataFreeGuard, check_disjoint
from invcoss_jax.continual.stage_end import finish_stage
from invcoss_jax.continual.stages import (BUFFER_DIR, BUFFER_INFO, SEQUENCE_FILE, STORAGE_FILE, Stage, check_method,
                                          check_sequence, finished_info, plan_stages, read_info, read_record,
                                          stage_config, stage_key, training_changes)
from invcoss_jax.continual.step import DistillPredictor, LossSpec, create_state, make_train_step
from invcoss_jax.continual.streams import StageStreams, Stream, split_batch
from invcoss_jax.data import registry as data_registry
from invcoss_jax.io_utils import atomic_write_json
from invcoss_jax.parallel import mesh as mesh_lib
from invcoss_jax.train import checkpoint as ckpt_lib, core, mlm, optim, vocabulary as vocab_lib, writers


@dataclasses.dataclass(frozen=True)
class BufferSource:
  """One earlier stage's replay set as the input layer reads it."""
  name: str  # the earlier stage's name
  data: ml_collections.ConfigDict  # format 'npz', preprocessed (a report stage's: format 'text', its JSONL buffer)
  num_examples: int
  image_shape: tuple[int, ...]


# ----------------------------------------------------------------------------------------------------------
# Small helpers.


def _dummy_shapes(model_cfg: models.ViTConfig) -> list[tuple[int, ...]]:
  """One 2D and one 3D example of 2 patches per axis, and 8 token ids when the model has a vocabulary:
  creates every tokenizer and head (the tree does not depend on the image size or the text length)."""
  shapes = [tuple(2 * p for p in model_cfg.patch_size_2d) + (model_cfg.channels_2d,),
            tuple(2 * p for p in model_cfg.patch_size_3d) + (model_cfg.channels_3d,)]
  if model_cfg.vocab_size > 0:
    shapes.append((min(8, model_cfg.text_max_len),))
  return shapes


@functools.lru_cache(maxsize=8)
def fresh_params_fn(model_cfg: models.ViTConfig):
  """The jitted initialisation of every tokenizer and head (one compile per model configuration; eager
  initialisation would compile every operation on its own, tens of seconds on a CPU)."""
  model = models.build_mae(model_cfg)
  return jax.jit(lambda key: models.init_mae_params(model, key, _dummy_shapes(model_cfg)))


# ----------------------------------------------------------------------------------------------------------
# The sequence.


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
        stop_at: tuple[int, int] | None = None,
        after_stage: Callable[[Stage, dict], None] | None = None) -> dict[str, Any]:
  """Runs (or resumes) the continual sequence of `config` in `workdir`.

  `stop_at=(stage index, step)` ends the run after that train step of that stage with a checkpoint, as a
  preempted job would; rerunning on the same workdir continues from there. `after_stage(stage, info)` is
  called for every finished stage once its data is retired, also for stages finished by an earlier run
  (e.g. to delete the data at its site).

  Returns dict(method, workdir, stages [stage_info of each finished stage], losses {stage: {step: loss}} of
  the steps run now, stopped). The workdir is locked for the run (workdir_lock; re-entrant, so `jobs.run`
  holding it already is fine).
  """
  check_sequence(config)  # before the lock creates the workdir
  with workdir_lock.hold(workdir):
    return _run(config, workdir, stop_at=stop_at, after_stage=after_stage)


def _run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, stop_at: tuple[int, int] | None,
         after_stage: Callable[[Stage, dict], None] | None) -> dict[str, Any]:
  method = check_method(config)
  sequential = methods.get(method).sequential
  workdir = os.path.abspath(os.fspath(workdir))
  os.makedirs(workdir, exist_ok=True)
  stages = plan_stages(config, workdir)
  text_stages = [s for s in stages if any(data_registry.is_text(d) for d in s.data)]
  if text_stages:  # one vocabulary for the sequence, settled before the first stage (continual/text.py)
    config = text_lib.prepare_sequence(config, tuple(str(m) for m in config.continual.order),
                                       text_stages[0].workdir)
    stages = plan_stages(config, workdir)
  if sequential:  # one stage per dataset: retiring one must not lock another out
    check_disjoint([(s.name, s.data[0]) for s in stages])
  check_recorded_stages(config, stages)
  check_vocabularies(config, stages)
  # Recorded only now that the sequence and the stages already on disk were checked.
  atomic_write_json(os.path.join(workdir, SEQUENCE_FILE), dict(
      method=method, stages=[s.name for s in stages], order=list(config.continual.order),
      buffer_fraction=float(config.continual.buffer_fraction), config=ckpt_lib.config_to_dict(config)))
  guard = DataFreeGuard(enabled=bool(config.continual.data_free_guard) and sequential)
  infos, losses = [], {}
  with guard.active():
    for i, stage in enumerate(stages):
      info = read_info(stage)
      if info and info.get("method", method) != method:
        raise ConfigError(f"{stage.workdir} holds a stage of method {info.get('method')!r} but "
                         f"config.continual.method={method!r}: use another workdir for another method")
      if not (info and info.get("done")):
        logging.info("continual (%s): %s", method, stage.name)
        done, info, stage_losses = run_stage(config, stage, stages[:i], guard, stop_at=stop_at,
                                             last=i == len(stages) - 1)
        losses[stage.name] = stage_losses
        if not done:
          return dict(method=method, workdir=workdir, stages=infos, losses=losses, stopped=True)
      else:
        logging.info("continual (%s): %s finished earlier", method, stage.name)
      for d in stage.data:  # the stage ended: its data is off limits from now on
        guard.retire(stage.name, d)
      infos.append(info)
      if after_stage is not None:
        after_stage(stage, info)
  _write_storage(workdir, infos)
  return dict(method=method, workdir=workdir, stages=infos, losses=losses, stopped=False)


def _write_storage(workdir: str, infos: list[dict]) -> None:
  atomic_write_json(os.path.join(workdir, STORAGE_FILE),
                    {info["name"]: info.get("storage", {}) for info in infos})


# ----------------------------------------------------------------------------------------------------------
# One stage.


def buffer_sources(cfg, stage: Stage, earlier: list[Stage], prev_model=None, prev_params=None,
                   mesh=None) -> list[BufferSource]:
  """The replay sets stage `stage` trains on (earlier stages' buffers; none for buffer-free methods)."""
  method = methods.get(cfg.continual.method)
  out = []
  if not method.replays or not earlier:
    return out
  if float(cfg.continual.buffer_batch_ratio) == 0.0:
    return out
  for t in earlier:
    info = finished_info(t)
    if data_registry.is_text(t.data[0]):  # text: the real text buffer (k-means; er: random) of every replay method
      folder = os.path.join(t.workdir, BUFFER_DIR)
      n = int(read_record(os.path.join(t.workdir, BUFFER_INFO))["num_examples"])
      out.append(BufferSource(t.name, text_lib.text_buffer_section(t.data[0], folder), n,
                              tuple(int(s) for s in info["image_shapes"][0])))
      continue
    folder, n = method.replay_set(cfg, stage, t, earlier, prev_model, prev_params, mesh)
    section = data_registry.npz_shards_section(t.data[0], folder, augment=bool(cfg.continual.buffer_augment))
    out.append(BufferSource(t.name, section, int(n), tuple(int(s) for s in info["image_shapes"][0])))
  return out


def _batch_plan(cfg, stage: Stage, n_current: list[int], sources: list[BufferSource], shards: int
                ) -> tuple[list[int], list[int]]:
  """(samples per step of each current stream, of each buffer stream)."""
  k = int(cfg.train.grad_accum_steps)
  micro = int(cfg.train.global_batch_size) // k
  if micro % shards:
    raise ValueError(f"config.train.global_batch_size / grad_accum_steps = {micro} must be divisible by the "
                     f"{shards} batch shards of the mesh")
  if len(n_current) == 1:
    cur = [micro]
  else:
    split = str(cfg.continual.joint_split)
    if split not in ("proportional", "equal"):
      raise ValueError(f"config.continual.joint_split must be 'proportional' or 'equal', got {split!r}")
    cur = split_batch(micro, n_current if split == "proportional" else [1] * len(n_current), shards)
  if not sources:
    return cur, []
  ratio = float(cfg.continual.buffer_batch_ratio)
  n_buf = sum(s.num_examples for s in sources)
  if ratio < 0:
    ratio = n_buf / float(sum(n_current))
  total = min(max(int(round(ratio * micro)), shards), micro)
  split = str(cfg.continual.buffer_split)
  if split not in ("proportional", "equal"):
    raise ValueError(f"config.continual.buffer_split must be 'proportional' or 'equal', got {split!r}")
  weights = [s.num_examples for s in sources] if split == "proportional" else [1] * len(sources)
  return cur, split_batch(total, weights, shards)


def distill_weight(c: ml_collections.ConfigDict, cur_sizes: list[int], buf_sizes: list[int]) -> float:
  """The weight of the buffer sub-batch's mean L_reg (config.continual.distill_scale, see continual/config.py)."""
  scale = str(c.distill_scale)
  if scale not in ("per_step", "per_sample"):
    raise ValueError(f"config.continual.distill_scale must be 'per_step' or 'per_sample', got {scale!r}")
  w = float(c.distill_weight)
  if scale == "per_sample" and buf_sizes:
    w *= sum(buf_sizes) / float(sum(cur_sizes))
  return w


def initial_params(config, stage: Stage, earlier: list[Stage], model: models.MAE) -> tuple[dict, dict | None]:
  """(stage's starting parameters, stage T-1's parameters or None).

  Stage T starts from stage T-1's trunk and tokenizers (and decoder unless config.continual.reinit_decoder);
  the first stage from config.init_from when set, else from a fresh initialisation."""
  c = config.continual
  fresh = fresh_params_fn(model.cfg)(stage_key(config, stage.index, 0))
  if earlier:
    prev = earlier[-1]
    _, _, prev_params = ckpt_lib.load_trained_stage(prev.workdir)
    return params_lib.hand_over(prev_params, fresh, reinit_decoder=bool(c.reinit_decoder),
                                where=f"hand-over {prev.name} -> {stage.name}"), prev_params
  if str(config.init_from or ""):
    _, _, start_params = ckpt_lib.load_trained_stage(config.init_from)
    return params_lib.hand_over(start_params, fresh, reinit_decoder=bool(c.reinit_decoder),
                                where=f"config.init_from={config.init_from!r} -> {stage.name}"), None
  return fresh, None


def check_recorded_stages(config, stages: list[Stage]) -> None:
  """A stage already (partly) trained under other training options (steps, schedule, model, data) would be
  resumed or reused as if it were this run's: refused, naming the options, before anything runs. With
  config.overwrite_workdir that stage and every later one are deleted and trained again."""
  for i, stage in enumerate(stages):
    path = os.path.join(stage.workdir, ckpt_lib.CONFIG_FILE)
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      old = json.load(f)
    changes = training_changes(old, ckpt_lib.config_to_dict(stage_config(config, stage)))
    if not changes:
      continue
    if not bool(config.overwrite_workdir):
      raise ConfigError(
          f"{stage.workdir} was trained with other options than this run asks for ({'; '.join(changes[:5])}"
          f"{'; ...' if len(changes) > 5 else ''}): resuming it would mix the two. Use a new --workdir, or "
          "--config.overwrite_workdir=True to delete it and the stages after it and train them again")
    for later in stages[i:]:
      if os.path.isdir(later.workdir):
        logging.warning("config.overwrite_workdir: deleting %s (trained with other options)", later.workdir)
        shutil.rmtree(later.workdir)
    return


def check_vocabularies(config, stages: list[Stage]) -> None:
  """The sequence's vocabulary (config.model.tokenizer, settled by text.prepare_sequence) against the one every
  stage already trained recorded, and config.init_from's: a stage trained with another vocabulary would be
  resumed or handed over with its text embedding's rows meaning other tokens (train/vocabulary.py)."""
  tokenizer = str(config.model.get("tokenizer", "") or "")
  if not tokenizer:
    return
  for i, stage in enumerate(stages):
    if not vocab_lib.has_checkpoint(stage.workdir):
      continue
    try:
      vocab_lib.check(stage.workdir, tokenizer, f"resuming {stage.name} (or starting a later stage from it)")
    except vocab_lib.VocabularyError:
      if not bool(config.overwrite_workdir):
        raise
      for later in stages[i:]:  # as check_recorded_stages does for other training options
        if os.path.isdir(later.workdir):
          logging.warning("config.overwrite_workdir: deleting %s (trained with another vocabulary)", later.workdir)
          shutil.rmtree(later.workdir)
      break
  if str(config.init_from or ""):
    vocab_lib.check(str(config.init_from), tokenizer, "starting the sequence from config.init_from")


@dataclasses.dataclass
class StagePlan:
  """What one stage trains on and with (`plan_stage`)."""
  cfg: ml_collections.ConfigDict  # the stage's config (stages.stage_config)
  mesh: jax.sharding.Mesh
  model: models.MAE
  prev: Stage | None
  params: Any  # the starting parameters (hand-over)
  prev_params: Any  # stage T-1's, or None
  sources: list[BufferSource]
  n_current: list[int]
  shapes: list[tuple[int, ...]]
  cur_sizes: list[int]  # samples per step of each current stream
  buf_sizes: list[int]  # and of each buffer stream
  tx: Any
  schedule: Any
  total: int  # train steps (micro-batches)
  boundary: int  # the step after which the method's extra steps start (packnet: prune, then retrain)


def plan_stage(config, stage: Stage, earlier: list[Stage], guard: DataFreeGuard) -> StagePlan:
  """The stage's config (written), data sizes, starting parameters, replay sources, batch split and optimiser."""
  c = config.continual
  cfg = stage_config(config, stage)
  os.makedirs(stage.workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  for d in stage.data:
    guard.check_config(d, what=f"{stage.name} (its own data)")
  n_current = [int(data_lib.num_examples(d)) for d in stage.data]
  shapes = [tuple(int(s) for s in data_lib.image_shape(d)) for d in stage.data]
  model = models.build_mae(cfg.model)
  params, prev_params = initial_params(config, stage, earlier, model)
  sources = buffer_sources(cfg, stage, earlier, model, prev_params, mesh)
  cur_sizes, buf_sizes = _batch_plan(cfg, stage, n_current, sources, mesh_lib.num_batch_shards(mesh))
  for m, n, b, shape in zip(stage.modalities, n_current, cur_sizes, shapes):
    check_batch_fits("train.global_batch_size", int(cfg.train.global_batch_size), n,
                     f"continual.datasets.{m} ({stage.name})", used=b * int(cfg.train.grad_accum_steps),
                     volumes=len(shape) == 4)
  # Recorded once the stage's data and starting point were read (a stage that fails here leaves no record).
  ckpt_lib.write_config(stage.workdir, cfg)
  if str(cfg.model.get("tokenizer", "") or ""):
    vocab_lib.check_or_record(stage.workdir, str(cfg.model.tokenizer))
  length = optim.run_length(cfg, sum(n_current))
  extra = int(methods.get(c.method).extra_steps(c, length.total_steps))
  length = dataclasses.replace(length, total_steps=length.total_steps + extra)
  tx, schedule = optim.make_optimizer(cfg.train, length)
  total = length.total_micro_steps
  return StagePlan(cfg=cfg, mesh=mesh, model=model, prev=earlier[-1] if earlier else None, params=params,
                   prev_params=prev_params, sources=sources, n_current=n_current, shapes=shapes, cur_sizes=cur_sizes,
                   buf_sizes=buf_sizes, tx=tx, schedule=schedule, total=total,
                   boundary=total - extra * int(cfg.train.grad_accum_steps))


def method_terms(config, stage: Stage, p: StagePlan) -> tuple[LossSpec, dict, DistillPredictor | None, dict]:
  """(loss weights, constants: the frozen teacher / EWC anchor and Fisher / PackNet mask, CaSSLe's predictor
  and its parameters) of the method at this stage."""
  c = config.continual
  method, prev = methods.get(c.method), p.prev
  own = method.loss_weights(c) if prev is not None else {}  # the first stage has nothing to keep
  spec = LossSpec(mask_ratio=float(p.cfg.train.mask_ratio), distill_mask_ratio=float(c.distill_mask_ratio),
                  distill_weight=distill_weight(c, p.cur_sizes, p.buf_sizes), buffer_mae_weight=float(c.buffer_mae_weight),
                  mlm_probability=float(p.cfg.train.mlm_probability), **{k: float(v) for k, v in own.items()})
  consts: dict[str, Any] = dict(teacher=None, ewc_anchor=None, ewc_fisher=None, trainable=None)
  if method.teacher and prev is not None:
    consts["teacher"] = params_lib.split_params(p.prev_params)[0]  # the frozen encoder (the decoder is not used)
  extra = method.consts(config, stage, p, spec)
  unknown = sorted(set(extra) - set(consts))
  if unknown:
    raise ValueError(f"method {method.name!r}: consts {unknown} are not read by the step; expected some of "
                     f"{sorted(consts)}")
  consts.update(extra)
  predictor, aux = method.aux(config, stage, p, spec)
  return spec, consts, predictor, aux


def stage_streams(config, stage: Stage, p: StagePlan) -> StageStreams:
  """The stage's current streams (MLM-masked for text) and one stream per replay source (mixup)."""
  seed = int(config.seed)
  current = []
  for j, (m, d, b, shape) in enumerate(zip(stage.modalities, stage.data, p.cur_sizes, p.shapes)):
    it = data_lib.make_train_iterator(d, global_batch_size=b, seed=seed + 7919 * stage.index + j)
    masker = (mlm.masker_for(str(d.text.tokenizer), float(p.cfg.train.mlm_probability)) if len(shape) == 1
              else None)
    current.append(Stream(f"current/{m}", it, b, shape, masker=masker))
  buffer = []
  for j, (s, b) in enumerate(zip(p.sources, p.buf_sizes)):
    it = data_lib.make_train_iterator(s.data, global_batch_size=b, seed=seed + 7919 * stage.index + 101 + j)
    buffer.append(Stream(f"buffer/{s.name}", it, b, s.image_shape, mixup=bool(config.continual.mixup)))
  return StageStreams(current, buffer, seed=seed, stage_index=stage.index)


def run_stage(config, stage: Stage, earlier: list[Stage], guard: DataFreeGuard, *,
              stop_at: tuple[int, int] | None = None, last: bool = False) -> tuple[bool, dict, dict[int, float]]:
  """Trains (or resumes) one stage on the trainer core and ends it; returns (finished, stage_info, losses of
  the steps run)."""
  p = plan_stage(config, stage, earlier, guard)
  cfg, mesh = p.cfg, p.mesh
  spec, consts, predictor, aux = method_terms(config, stage, p)
  state, shardings = create_state(p.params, aux, p.tx, stage_key(config, stage.index, 1), mesh, cfg.mesh)
  consts_shardings = mesh_lib.state_shardings(consts, mesh, cfg.mesh)
  consts = jax.device_put(consts, consts_shardings)
  step = make_train_step(p.model, spec, p.tx, p.schedule, grad_accum_steps=int(cfg.train.grad_accum_steps),
                         predictor=predictor)
  step_fn = core.jit_step(step, shardings, mesh, consts_shardings)
  per_dispatch = int(cfg.train.steps_per_dispatch)
  block_fn = core.jit_block(step, shardings, mesh, consts_shardings) if per_dispatch > 1 else None
  streams = stage_streams(config, stage, p)
  logging.info("%s: %d steps (%d examples of %s; per step %s current + %s buffer from %s), mesh %s", stage.name,
               p.total, sum(p.n_current), p.shapes, p.cur_sizes, p.buf_sizes, [s.name for s in p.sources],
               dict(mesh.shape))
  writer = writers.create_writer(stage.workdir)
  manager = ckpt_lib.make_manager(stage.workdir, cfg.checkpoint)
  try:
    with jax.set_mesh(mesh):
      if manager.latest_step() is not None:
        state, _ = ckpt_lib.restore(manager, core.abstract_state(state, shardings), streams)
      start = int(jax.device_get(state.step))
      if start:
        logging.info("%s: resuming at step %d of %d", stage.name, start, p.total)
      hooks = []
      enter = methods.get(config.continual.method).enter_extra_steps(config, stage, p, shardings, consts_shardings,
                                                                     last)
      if enter is not None:  # e.g. PackNet's boundary: prune, then retrain the kept weights
        if start >= p.boundary:
          state, consts = enter(state, consts)
        hooks.append(lambda step, st, co: enter(st, co) if step == p.boundary else (st, co))
      save_every = max(1, int(cfg.checkpoint.every_steps))
      loop = core.Loop(step_fn=step_fn, next_batch=lambda step: mesh_lib.put_batch(mesh, streams.next_batch(step)),
                       what=stage.name, log_every=int(cfg.logging.log_every_steps), writer=writer,
                       save=lambda step, st: ckpt_lib.save(manager, step, st, streams, cfg, force=True),
                       should_save=lambda step: step % save_every == 0, latest_checkpoint=manager.latest_step,
                       after_step=hooks, hook_at=lambda step: step == p.boundary,
                       steps_per_dispatch=per_dispatch, block_fn=block_fn)
      stop_step = int(stop_at[1]) if stop_at is not None and int(stop_at[0]) == stage.index else None
      state, consts, losses, stopped = loop.run(state, consts, start, p.total, stop_at=stop_step)
      manager.wait_until_finished()
  finally:
    manager.close()
    writer.flush()
    streams.close()
  try:
    if stopped:
      return False, {}, losses
    return True, finish_stage(cfg, stage, p.model, state.params, p.n_current, p.shapes, p.total,
                              prev=p.prev, last=last, writer=writer), losses
  finally:
    writer.close()
