"""Checkpoints of a stage: orbax CheckpointManager with the train state, the grain iterator state and
the config, and the resolved config as `workdir/config.json`.

A run restarted on the same workdir resumes from the latest checkpoint, restoring arrays straight
into their sharded layout (abstract targets) and the data iterator where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging as logging_std
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from invcoss_jax import faults, io_utils, models
from invcoss_jax.config_checks import without_moved
from invcoss_jax.data.errors import DataError
from invcoss_jax.workdir import not_a_stage

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
ITEM_STATE, ITEM_DATA, ITEM_CONFIG = "state", "data_iter", "config"


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The resolved config as plain JSON types (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def write_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> str:
  """Writes `workdir/config.json` atomically (process 0 only); returns its path."""
  path = os.path.join(os.fspath(workdir), CONFIG_FILE)
  if jax.process_index() == 0:
    io_utils.atomic_write_json(path, config_to_dict(config))
  return path


class CheckpointError(DataError):
  """A checkpoint on disk that does not fit this run's model (restored arrays of other shapes)."""


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  path = os.path.join(os.fspath(workdir), CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(not_a_stage(workdir, "workdir") or f"{path} not found: {os.fspath(workdir)!r} is "
                            f"not the workdir of a trained stage (expected {CONFIG_FILE} and {CHECKPOINT_DIR}/)")
  with open(path) as f:
    return ml_collections.ConfigDict(without_moved(json.load(f)))  # recorded before an option moved: without it


class _DropReadOnlyNotice(logging_std.Filter):
  def filter(self, record: logging_std.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


@contextlib.contextmanager
def _quiet_read_only():
  """Drops orbax's warning that a manager opened read-only is read-only: every load asks for that."""
  f = _DropReadOnlyNotice()
  logger = logging_std.getLogger("absl")
  logger.addFilter(f)
  try:
    yield
  finally:
    logger.removeFilter(f)


def make_manager(workdir: str | os.PathLike, ckpt_cfg: ml_collections.ConfigDict | None = None, *,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """The stage's CheckpointManager over `workdir/checkpoints` (created unless read_only)."""
  ckpt_cfg = ckpt_cfg or ml_collections.ConfigDict(dict(every_steps=1, max_to_keep=None, async_save=False))
  directory = os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_DIR)
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=0 if read_only else max(1, int(ckpt_cfg.every_steps)),
      max_to_keep=None if read_only else ckpt_cfg.get("max_to_keep"),
      enable_async_checkpointing=bool(ckpt_cfg.get("async_save", True)) and not read_only,
      create=not read_only, read_only=read_only)
  handlers = {ITEM_STATE: ocp.StandardCheckpointHandler(), ITEM_CONFIG: ocp.JsonCheckpointHandler(),
              ITEM_DATA: grain.checkpoint.CheckpointHandler()}
  if read_only:
    with _quiet_read_only():
      return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any,
         config: ml_collections.ConfigDict, *, force: bool = False) -> bool:
  """Saves state, iterator and config at `step` when the interval says so (or `force`)."""
  args = {ITEM_STATE: ocp.args.StandardSave(state),
          ITEM_CONFIG: ocp.args.JsonSave(config_to_dict(config))}
  if data_iter is not None:
    args[ITEM_DATA] = grain.checkpoint.CheckpointSave(data_iter)
  saved = manager.save(step, args=ocp.args.Composite(**args), force=force)
  if saved:
    faults.point(f"checkpoint:{step}")  # an asynchronous save is still being written here
  return saved


def restore(manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any = None,
            step: int | None = None) -> tuple[Any, int]:
  """Restores the state into `abstract_state`'s shardings, and `data_iter` in place (if given)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  args = {ITEM_STATE: ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    args[ITEM_DATA] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**args))
  except ValueError as e:
    if "shape" not in str(e):
      raise
    # orbax names neither the checkpoint nor the array; its first sentence says what differs.
    raise CheckpointError(os.path.join(os.fspath(manager.directory), str(step)),
                          f"does not fit this run's model ({str(e).split('. ')[0]}): it was saved by a run of "
                          "another model or vocabulary; use that run's options, or another --workdir") from e
  logging.info("restored checkpoint %d from %s", step, manager.directory)
  return restored[ITEM_STATE], step


def load_trained_stage(workdir: str | os.PathLike, *, sharding: jax.sharding.Sharding | None = None,
                       step: int | None = None) -> tuple[ml_collections.ConfigDict, Any, Any]:
  """(config, model, params) of a finished (or interrupted) stage: `workdir/config.json` and the
  parameters of the latest checkpoint only (no optimiser state is read). `sharding` places every
  parameter (default: the first local device)."""
  workdir = os.fspath(workdir)
  config = read_config(workdir)
  ckpt_dir = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{ckpt_dir} not found: the stage in {workdir!r} has no checkpoints")
  # Every item's handler is named although only the parameters are read: orbax warns once per load and
  # item about items it finds without one ("Item data_iter was found in the checkpoint, but ...").
  handlers = {ITEM_STATE: ocp.PyTreeCheckpointHandler(), ITEM_CONFIG: ocp.JsonCheckpointHandler(),
              ITEM_DATA: grain.checkpoint.CheckpointHandler()}
  with _quiet_read_only(), ocp.CheckpointManager(
      ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
      item_handlers=handlers) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{ckpt_dir} holds no finished checkpoint of the stage in {workdir!r}")
    meta = manager.item_metadata(step)[ITEM_STATE]
    meta = getattr(meta, "tree", meta)
    if "params" not in meta:
      raise ValueError(f"checkpoint {step} in {ckpt_dir} has no 'params' in its train state")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                                     meta["params"])}
    restored = manager.restore(step, args=ocp.args.Composite(**{ITEM_STATE: ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)}))
  model = models.build_mae(config.model)
  return config, model, restored[ITEM_STATE]["params"]
