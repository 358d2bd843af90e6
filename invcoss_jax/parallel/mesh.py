"""The one place that builds the device mesh and the shardings every job uses.

Axes are `AxisType.Auto`: linen's sharding constraints assert under Explicit axes. Batches are split
over every batch-like axis present ('data' and 'fsdp'); parameters are replicated, or with
`shard_params` each large one is split over 'fsdp' along its largest divisible dimension.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from invcoss_jax.config_checks import ConfigError

BATCH_AXES = ("data", "fsdp")  # axes the leading (batch) dimension is split over, in this order
FSDP_AXIS = "fsdp"
DEFAULT_FSDP_MIN_SIZE = 2**14


def _axes_from_config(mesh_cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> list[tuple[str, int]]:
  axes = mesh_cfg["axes"]
  out = []
  for a in axes:
    if not (isinstance(a, (tuple, list)) and len(a) == 2 and isinstance(a[0], str)
            and isinstance(a[1], int)):
      raise ValueError(f"config.mesh.axes: expected a list of (name, size) pairs such as "
                       f"[('data', -1), ('fsdp', 2)], got {axes!r}")
    out.append((a[0], int(a[1])))
  names = [n for n, _ in out]
  if len(set(names)) != len(names):
    raise ValueError(f"config.mesh.axes: axis names must be unique, got {names}")
  return out


def make_mesh(mesh_cfg: ml_collections.ConfigDict | Mapping[str, Any],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh of `mesh_cfg.axes` over `devices` (default: all, or the first
  `mesh_cfg.num_devices`); one axis size may be -1 (the remaining devices)."""
  axes = _axes_from_config(mesh_cfg)
  if devices is None:
    devices = jax.devices()
    num = int(mesh_cfg.get("num_devices", -1))
    if num > len(devices):
      raise ValueError(f"config.mesh.num_devices={num} but only {len(devices)} devices are available")
    if num > 0:
      devices = devices[:num]
  devices = list(devices)
  n = len(devices)
  sizes = [s for _, s in axes]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"config.mesh.axes: at most one axis may have size -1, got {axes}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or n % known:
    raise ValueError(f"config.mesh.axes={axes}: the fixed axis sizes (product {known}) must be "
                     f"positive and divide the {n} available devices")
  sizes = [n // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != n:
    raise ValueError(f"config.mesh.axes={axes} gives {math.prod(sizes)} devices but {n} are "
                     f"available; use -1 for one axis to take the rest")
  names = tuple(name for name, _ in axes)
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes, the rest replicated."""
  axes = batch_axes(mesh)
  return NamedSharding(mesh, P(axes if axes else None))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (small state, scalars, metrics)."""
  return NamedSharding(mesh, P())


def _leaf_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return P()
  # Largest dimension divisible by the fsdp size; ties go to the last such dimension (the
  # output features of a Dense kernel), which keeps the gathers contiguous.
  best = None
  for i, d in enumerate(shape):
    if d % fsdp_size == 0 and (best is None or d >= shape[best]):
      best = i
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = FSDP_AXIS
  return P(*spec)


LAYOUTS = ("replicated", "fsdp")


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


@dataclasses.dataclass(frozen=True)
class LayoutRules:
  """How a state is laid out on the mesh: `config.mesh.shard_params`, `fsdp_min_size` and `sharding_rules`.

  Every leaf is named by its path (`prefix/` + the tree path, e.g. 'teacher/encoder/block_0/fc1/kernel' or
  'params/patch_embed_2d/kernel'); the first `(regex, layout)` rule whose regex matches the whole name decides,
  the `shard_params` default the rest. Layouts: 'replicated' (every device holds the leaf) or 'fsdp' (a leaf of
  at least `fsdp_min_size` elements split over the 'fsdp' axis, when the mesh has one, along its largest
  divisible dimension)."""
  shard_params: bool = False
  fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE
  sharding_rules: tuple = ()

  @classmethod
  def of(cls, rules: "LayoutRules | ml_collections.ConfigDict | Mapping[str, Any] | None") -> "LayoutRules":
    """`rules` as given, read from a `config.mesh` section (its absent keys at their defaults), or for None
    every leaf replicated."""
    if rules is None:
      return cls()
    if isinstance(rules, cls):
      return rules
    return cls(shard_params=bool(rules.get("shard_params", False)),
               fsdp_min_size=int(rules.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE)),
               sharding_rules=tuple(rules.get("sharding_rules", ())))


def state_shardings(abstract: Any, mesh: Mesh,
                    rules: LayoutRules | ml_collections.ConfigDict | Mapping[str, Any] | None = None, *,
                    prefix: str = "") -> Any:
  """NamedShardings for a tree of arrays/ShapeDtypeStructs (parameters, optimiser state, a whole train state,
  a frozen teacher, EWC's constants, the inversion's generator) on `mesh`, laid out by `rules` (a
  `LayoutRules`, or the `config.mesh` section it is read from; None: replicated). `prefix` names the tree in the
  rules (e.g. 'teacher', 'generator'). The one layout function of pre-training, continual training,
  fine-tuning and inversion."""
  rules = LayoutRules.of(rules)
  compiled = []
  for rule in rules.sharding_rules:
    if len(rule) != 2 or str(rule[1]) not in LAYOUTS:
      raise ValueError(f"config.mesh.sharding_rules entry {tuple(rule)!r}: expected (regex, layout) with layout "
                       f"one of {LAYOUTS}")
    try:
      compiled.append((re.compile(str(rule[0])), str(rule[1])))
    except re.error as e:
      raise ValueError(f"config.mesh.sharding_rules: {rule[0]!r} is not a regular expression ({e})") from e
  default = "fsdp" if rules.shard_params else "replicated"
  fsdp_size = mesh.shape[FSDP_AXIS] if FSDP_AXIS in mesh.axis_names else 1

  def one(path, x):
    name = "/".join(p for p in (prefix, _path_name(path)) if p)
    layout = next((lay for rx, lay in compiled if rx.fullmatch(name)), default)
    return NamedSharding(mesh, _leaf_spec(np.shape(x), fsdp_size if layout == "fsdp" else 1,
                                          int(rules.fsdp_min_size)))

  return jax.tree_util.tree_map_with_path(one, abstract)


def check_global_batch(mesh: Mesh, global_batch_size: int, option: str = "config.train.global_batch_size"):
  """A clear error, naming `option`, when the batch cannot be split evenly over the mesh."""
  shards = num_batch_shards(mesh)
  if global_batch_size % shards or global_batch_size % jax.process_count():
    raise ConfigError(f"{option}={global_batch_size} must be divisible by the {shards} batch shards "
                     f"of the mesh {dict(mesh.shape)} (and by {jax.process_count()} processes)")


def put_batch(mesh: Mesh, local_batch: Any) -> Any:
  """Turns this process's NumPy batch (a pytree of arrays with a leading batch dimension) into
  global jax.Arrays split over the batch axes; the global batch is process_count times larger."""
  sharding = data_sharding(mesh)
  shards = num_batch_shards(mesh)

  def one(x):
    x = np.asarray(x)
    global_b = x.shape[0] * jax.process_count()
    if global_b % shards:
      raise ValueError(f"batch of {global_b} examples (shape {x.shape}) cannot be split over the "
                       f"{shards} batch shards of the mesh {dict(mesh.shape)}")
    return jax.make_array_from_process_local_data(sharding, x, (global_b,) + x.shape[1:])

  return jax.tree.map(one, local_batch)
