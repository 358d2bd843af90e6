"""The continual methods as registered objects (docs/continual.md, "Adding a method").

A method is one `Method` object, registered under its name: it declares what a stage keeps for the later stages
(nothing, a real buffer, a synthetic set, a penalty, a mask), what the later stages replay, its loss terms on
the trainer core (`continual.step.LossSpec` weights) and whether it distils to the frozen previous model, and
checks its own options. `continual/` looks the configured method up (`get(config.continual.method)`) and
calls it; it has no branch on a method's name.

Every module of this folder whose name does not start with `_` holds the method of that name (seqssl.py:
`seqssl`) and is imported on first use, so that reading a config (configs/continual.py checks a preset's method
name with `names()`) lists this folder without importing a method, and with it JAX. A method written elsewhere
registers itself when its module is imported:

  from invcoss_jax.continual import methods
  methods.register(MyMethod("mine"))

Registry: `register(method)`, `get(name)`, `names()`, `all_methods()`; the groups of continual/config.py
(SYNTHETIC_METHODS, ...) are computed from the methods' declarations.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import TYPE_CHECKING, Any, Callable

from invcoss_jax.config_checks import ConfigError

if TYPE_CHECKING:  # annotations only: the contexts live with the code that builds them
  import ml_collections
  from invcoss_jax.continual.sequence import StagePlan
  from invcoss_jax.continual.stage_end import StageEnd
  from invcoss_jax.continual.stages import Stage
  from invcoss_jax.continual.step import LossSpec

_REGISTRY: dict[str, "Method"] = {}


class Method:
  """One continual method. The defaults are seqssl's: a stage keeps nothing, the later stages replay nothing
  and train their task loss alone. A method overrides the declarations below and the hooks it needs.

  Declarations (read by continual/):
  - `replays`: what the later stages train on besides their own data: '' (nothing), 'real' (a buffer of
    real samples, `buffer/`) or 'synthetic' (a set made from the model, `synthetic/` or `replay/`); a
    replaying method has `replay_set`, and the step distils the replayed samples to the frozen previous model.
  - `teacher`: the step reads the frozen previous model (consts['teacher']) from the second stage on.
  - `sequential`: False trains one stage over every modality of the order at once (`joint`), with no
    data-free guard (nothing is retired).
  - `statistics`: the stage's statistics pass runs whatever continual.statistics_after_stage says.
  - `text_buffer`: how a report stage's real text buffer is chosen ('random' | 'kmeans'; '' keeps none).
    Text cannot be inverted, so every replaying method keeps real texts (continual/text.py).
  - `keeps`: what a stage keeps, in words (docs/continual.md's table, error messages).
  """
  keeps = "nothing"
  replays = ""
  teacher = False
  sequential = True
  statistics = False
  text_buffer = ""

  def __init__(self, name: str):
    self.name = str(name)

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r})"

  def check(self, config: ml_collections.ConfigDict) -> None:
    """The method's own options, checked before anything is written; raises ConfigError."""

  def loss_weights(self, c: ml_collections.ConfigDict) -> dict[str, float]:
    """Weights of the method's own terms of the composite loss (LossSpec fields, e.g. `ewc_weight`) from
    config.continual `c`; they apply from the second stage on (the first has nothing to keep)."""
    return {}

  def extra_steps(self, c: ml_collections.ConfigDict, steps: int) -> int:
    """Optimiser steps added after a stage's `steps` (PackNet's retraining); `enter_extra_steps` starts them."""
    return 0

  def consts(self, config: ml_collections.ConfigDict, stage: Stage, plan: StagePlan, spec: LossSpec
             ) -> dict[str, Any]:
    """Read-only inputs of the step besides the teacher, by their key in `continual.step.composite_loss`'s
    consts ('ewc_anchor', 'ewc_fisher', 'trainable')."""
    return {}

  def aux(self, config: ml_collections.ConfigDict, stage: Stage, plan: StagePlan, spec: LossSpec
          ) -> tuple[Any, dict]:
    """(module, its parameters) trained beside the MAE in the state's `aux` (CaSSLe's predictor), or (None, {})."""
    return None, {}

  def enter_extra_steps(self, config: ml_collections.ConfigDict, stage: Stage, plan: StagePlan, shardings,
                        consts_shardings, last: bool) -> Callable | None:
    """`enter(state, consts) -> (state, consts)`, called once the stage's own steps are done (and again on a
    resume past that point) when `extra_steps` added some; None otherwise."""
    return None

  def replay_set(self, cfg: ml_collections.ConfigDict, stage: Stage, source: Stage, earlier: list[Stage],
                 model, params, mesh) -> tuple[str, int]:
    """(folder of npz shards, examples) that `stage` replays of the earlier image stage `source`. `model` and
    `params` are stage T-1's (a set made at the start of the stage). Report stages replay their text buffer."""
    raise NotImplementedError(f"method {self.name!r} declares replays={self.replays!r} but has no replay_set")

  def end_stage(self, end: StageEnd) -> None:
    """Keeps what the later stages need of a stage whose training ended, while its data is readable (a real
    buffer, the Fisher information, a synthetic set); idempotent (a resumed stage end skips what exists)."""

  def retains(self, c: ml_collections.ConfigDict, text: bool) -> tuple[str, ...]:
    """Kinds of what a stage leaves, each counted by the storage log as `<kind>_bytes` (statistics, synthetic,
    real_buffer, ewc, packnet); `text`: a report stage."""
    return ()


def _module(name: str) -> str:
  return f"{__name__}.{name}"


def _builtin() -> tuple[str, ...]:
  """Names of the methods of this folder (its modules), sorted; none is imported."""
  return tuple(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def register(method: Method) -> Method:
  """Registers `method` under `method.name`; returns it. A name is registered once (a method of this folder
  is loaded first, so that another object cannot take its name)."""
  if not isinstance(method, Method):
    raise TypeError(f"a continual method is a methods.Method, got {method!r}")
  name = method.name
  if not name or name.startswith("_") or "," in name:
    raise ValueError(f"continual method name {name!r}: expected a non-empty name without ',' or a leading '_'")
  if name in _builtin() and _module(name) not in sys.modules:
    importlib.import_module(_module(name))
  old = _REGISTRY.get(name)
  if old is not None and old is not method:
    raise ValueError(f"continual method {name!r} is already registered ({old!r} of {type(old).__module__}); "
                     "pick another name")
  _REGISTRY[name] = method
  return method


def names() -> tuple[str, ...]:
  """Every method's name: this folder's, then those registered from elsewhere. Imports no method."""
  builtin = _builtin()
  return builtin + tuple(n for n in _REGISTRY if n not in builtin)


def get(name: str) -> Method:
  """The method registered as `name` (its module imported on first use); ConfigError for an unknown name."""
  name = str(name)
  if name not in _REGISTRY and name in _builtin():
    importlib.import_module(_module(name))
    if name not in _REGISTRY:
      raise ValueError(f"{_module(name)} registers no method named {name!r}: a module of "
                       f"{__name__} holds the method of its name")
  if name not in _REGISTRY:
    raise ConfigError(f"config.continual.method={name!r}: expected one of {list(names())}")
  return _REGISTRY[name]


def all_methods() -> tuple[Method, ...]:
  """Every method (imports every module of this folder)."""
  return tuple(get(n) for n in names())


def select(predicate: Callable[[Method], bool]) -> tuple[str, ...]:
  """Names of the methods whose declarations satisfy `predicate` (e.g. `lambda m: m.replays == 'real'`)."""
  return tuple(m.name for m in all_methods() if predicate(m))
