"""DESIGN.md's one-way import rule, enforced: no module imports a job or a layer above its own.

Every module under invcoss_jax/ is parsed (nothing is imported) and each of its imports of `invcoss_jax.*`,
at module top and inside functions alike, is checked against LAYERS, the order of docs/DESIGN.md ("Imports flow
one way"). A unit is a folder (`invcoss_jax/<folder>/`) or a module at the package root; a unit may import
itself and any unit of a lower rank, never one of its own rank (siblings stay independent) or above.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "invcoss_jax"

# Lowest first (docs/DESIGN.md, "Imports flow one way").
LAYERS = {
    # Shared modules at the package root, below every folder.
    "faults": 0, "lazy": 0, "config_checks": 0,
    "io_utils": 1,
    "npz_io": 2,
    # The base folders: independent of each other.
    "data": 3, "models": 3, "parallel": 3, "measure": 3,
    # What a workdir holds (workdir.py with workdir_lock.py; reads data.registry), the PyTorch <-> Flax
    # weights (on the models' parameter trees; pre-training's init_from_torch reads through it), and
    # differential privacy (DP-SGD's gradient, Poisson batches of a data section, the accountant and ledger),
    # which the trainer core uses.
    "workdir": 4, "interop": 4, "privacy": 4,
    "train": 5,
    # The library folders.
    "inversion": 6, "evaluate": 6,
    "continual": 7, "audit": 7,
    "retention": 8,
    # Composes every folder's config section; then the jobs and the command line.
    "defaults": 9,
    "jobs": 10,
    "main": 11,
}
# Modules that are one unit with another: the workdir's lock is part of the workdir (each imports the other).
SAME_UNIT = {"workdir_lock": "workdir"}

# (importing module, imported module) -> why it is allowed. Every entry must still be a violation.
ALLOWED = {
    # check_options (called by jobs.run before any work) resolves each data section to check its patch
    # tiling and text length, while data/ raises config_checks.ConfigError; moving ConfigError below data/
    # would touch every folder. Both imports stay inside check_options.
    ("invcoss_jax.config_checks", "invcoss_jax.data.errors"): "check_options resolves the data sections",
    ("invcoss_jax.config_checks", "invcoss_jax.data.registry"): "check_options resolves the data sections",
}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _unit(module: str) -> str:
  parts = module.split(".")
  if len(parts) < 2:
    return "invcoss_jax"
  return SAME_UNIT.get(parts[1], parts[1])


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, imported module) of every `invcoss_jax` import in the file, wherever it sits; `from invcoss_jax
  import data` counts as importing `invcoss_jax.data`."""
  module = _module_name(path)
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "invcoss_jax"]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        name = ".".join(base + ([node.module] if node.module else []))
      else:
        name = node.module or ""
      if name.split(".")[0] != "invcoss_jax":
        continue
      if name == "invcoss_jax":
        out += [(node.lineno, f"invcoss_jax.{a.name}") for a in node.names]
      else:
        out.append((node.lineno, name))
  return out


def _modules() -> list[pathlib.Path]:
  return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _violations() -> list[tuple[str, int, str, str]]:
  found = []
  for path in _modules():
    module = _module_name(path)
    unit = _unit(module)
    for line, imported in _imports(path):
      other = _unit(imported)
      if other in (unit, "invcoss_jax") or LAYERS[other] < LAYERS[unit]:
        continue
      found.append((module, line, imported, f"{unit} (rank {LAYERS[unit]}) imports {other} (rank {LAYERS[other]})"))
  return found


def test_every_folder_and_root_module_has_a_layer():
  units = {_unit(_module_name(p)) for p in _modules()} - {"invcoss_jax"}
  assert not units - set(LAYERS), f"give these a rank in LAYERS (and docs/DESIGN.md): {sorted(units - set(LAYERS))}"
  assert not set(LAYERS) - units, f"LAYERS names units that do not exist: {sorted(set(LAYERS) - units)}"


def test_imports_flow_one_way():
  bad = [f"{m}:{line} imports {i}: {why}" for m, line, i, why in _violations() if (m, i) not in ALLOWED]
  assert not bad, ("no module may import a job or a layer at or above its own (docs/DESIGN.md, tests/"
                   "test_layering.py LAYERS); move the function to the right layer or invert the dependency:\n"
                   + "\n".join(bad))


def test_allow_list_has_no_stale_entries():
  seen = {(m, i) for m, _, i, _ in _violations()}
  assert not set(ALLOWED) - seen, f"no longer violations, remove from ALLOWED: {sorted(set(ALLOWED) - seen)}"


def test_design_md_states_the_order():
  text = (PACKAGE.parent / "docs" / "DESIGN.md").read_text()
  assert "tests/test_layering.py" in text


@pytest.mark.parametrize("source, message", [
    ("from invcoss_jax.jobs import audit\n", "imports invcoss_jax.jobs"),
    ("def f():\n  from invcoss_jax import retention\n", "imports invcoss_jax.retention"),
])
def test_the_check_sees_imports_inside_functions(tmp_path, monkeypatch, source, message):
  """A module of train/ importing a job or a library folder (at top or in a function) is reported."""
  fake = tmp_path / "invcoss_jax"
  (fake / "train").mkdir(parents=True)
  (fake / "train" / "bad.py").write_text(source)
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
  violations = _violations()
  assert len(violations) == 1 and message in f"imports {violations[0][2]}"
