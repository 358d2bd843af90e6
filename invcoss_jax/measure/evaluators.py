"""Measurements chosen by name, behind one interface (as big_vision chooses its evaluators by
`config.evals.<name>.type`).

An evaluator is a class registered under a name: constructed with what it measures on (held-out data, options,
compiled functions), `run(params) -> {name: value}` measures one model's parameters. A module registers its
evaluators when it is imported: retention/evaluators.py (the probes, the reconstruction measures, the judges)
and audit/evaluators.py (membership inference, memorisation) hold the shipped ones, and the modules that use
them import them. A new measurement is one registered class:

  @register_evaluator("my_measure")
  class MyMeasure(Evaluator):
    def __init__(self, images): self.images = images
    def run(self, params): return {"value": ...}

  get_evaluator("my_measure")(images).run(params)
"""

from __future__ import annotations

from typing import Any, Callable

_EVALUATORS: dict[str, type] = {}


class Evaluator:
  """The interface: `run(params) -> dict` measures one model's parameters (an evaluator that never reads the
  model, e.g. the judges of an image set, ignores them)."""

  name: str = ""

  def run(self, params: Any) -> dict[str, Any]:
    raise NotImplementedError


def register_evaluator(name: str) -> Callable[[type], type]:
  """Class decorator: registers an `Evaluator` subclass under `name` (one class per name)."""

  def register(cls: type) -> type:
    if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
      raise TypeError(f"evaluator {name!r}: expected a subclass of measure.evaluators.Evaluator, got {cls!r}")
    if name in _EVALUATORS and _EVALUATORS[name] is not cls:
      raise ValueError(f"evaluator {name!r} is already registered ({_EVALUATORS[name].__module__})")
    cls.name = name
    _EVALUATORS[name] = cls
    return cls

  return register


def get_evaluator(name: str) -> type:
  """The evaluator class registered under `name`."""
  if name not in _EVALUATORS:
    raise KeyError(f"no evaluator named {name!r}; registered: {sorted(_EVALUATORS)} (a module registers its "
                   "evaluators when imported: retention.evaluators, audit.evaluators)")
  return _EVALUATORS[name]


def evaluator_names() -> list[str]:
  """The names registered so far."""
  return sorted(_EVALUATORS)
