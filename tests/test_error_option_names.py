"""Error messages name options that exist: every `config.<dotted.name>` in the text of an error raised under
invcoss_jax/ resolves in the default config of a job (configs/*.py), and no message names an option through a
code variable (`cfg.continual.invert_with`, left by a mechanical rename) instead of `config.`."""

import ast
import glob
import os
import re

import pytest

from invcoss_jax.config_checks import flat_keys
from invcoss_jax.defaults import base_config, load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `config.` not inside a longer name or path (inversion/config.py, my.config.x).
OPTION = re.compile(r"(?<![\w./-])config\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
# An option named through a code variable: `cfg.<section>.<key>` (a bare `cfg.data` is a Python hint).
VARIABLE = re.compile(r"(?<![\w./-])cfg\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)")
# Names that are not options, or whose message completes them at run time (`f"...schedule_{rank}d..."`);
# each must still begin a real option's name, so that the list cannot hide a stale one.
ALLOWED = {
    "json": "the file config.json of a workdir, not an option",
    "inversion.schedule_": "inversion.schedule_{rank}d",
    "model.channels_": "model.channels_{rank}d",
    "model.learned_pos_grid_": "model.learned_pos_grid_{rank}d",
}


def _error_nodes(tree):
  """`raise` statements and calls of exception classes (a message built before its `raise`)."""
  for n in ast.walk(tree):
    if isinstance(n, ast.Raise) and n.exc is not None:
      yield n
    elif isinstance(n, ast.Call):
      f = n.func
      name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
      if name.endswith(("Error", "Violation", "Exception")):
        yield n


def error_strings(root: str):
  """(text, 'path:line') of every string literal (each literal part of an f-string) in an error."""
  for path in sorted(glob.glob(os.path.join(root, "invcoss_jax", "**", "*.py"), recursive=True)):
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    seen = set()  # a raise's exception call is an error node too: each literal once
    for node in _error_nodes(tree):
      for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in seen:
          seen.add(id(n))
          yield n.value, f"{os.path.relpath(path, root)}:{n.lineno}"


@pytest.fixture(scope="module")
def option_keys():
  """Every option of every job's default config (configs/*.py without a preset), sections included."""
  keys = set()
  for f in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    keys |= set(flat_keys(load_config_file(f)))
  return keys


def _resolves(name: str, keys: set[str]) -> bool:
  return name in keys or any(k.startswith(name + ".") for k in keys)


def test_every_option_named_in_an_error_exists(option_keys):
  named: dict[str, list[str]] = {}
  for text, where in error_strings(REPO):
    for m in OPTION.finditer(text):
      named.setdefault(m.group(1), []).append(where)
  assert len(named) > 50  # the scan sees the package's messages
  for name, why in ALLOWED.items():
    assert name == "json" or any(k.startswith(name) for k in option_keys), (name, why)
  stale = {n: w[:3] for n, w in named.items() if n not in ALLOWED and not _resolves(n, option_keys)}
  assert not stale, f"error messages name options no config has: {stale}"
  assert _resolves("continual.kmeans.feature", option_keys) and not _resolves("continual.no_such", option_keys)


def test_no_error_names_an_option_through_a_code_variable():
  sections = set(base_config().keys())
  found = [f"{where}: {m.group(0)}" for text, where in error_strings(REPO) for m in VARIABLE.finditer(text)
           if m.group(1) in sections]
  assert not found, f"write these as config.<section>.<key>: {found}"
