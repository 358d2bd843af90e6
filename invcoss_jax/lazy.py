"""Package attributes imported on first use (PEP 562), so that reading a config section
(`defaults.base_config`) imports no jax, flax or grain through a package's `__init__`."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_attributes(package: str, namespace: dict[str, Any], exports: Mapping[str, str]
                    ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
  """(`__getattr__`, `__dir__`) for `package`: a name of `exports` (name -> module) is imported from its module,
  any other name as a submodule (e.g. `data.text_io`); each is cached in `namespace` (the package's globals)."""

  def getattr_(name: str) -> Any:
    if name in exports:
      value = getattr(importlib.import_module(exports[name]), name)
    else:
      try:
        value = importlib.import_module(f"{package}.{name}")
      except ModuleNotFoundError as e:
        if e.name != f"{package}.{name}":
          raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
    namespace[name] = value
    return value

  def dir_() -> list[str]:
    return sorted(set(namespace) | set(exports))

  return getattr_, dir_
