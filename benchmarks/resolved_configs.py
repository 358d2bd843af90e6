r"""The resolved config of every preset, as one JSON file: diff two of them to check that a refactor changes no
option (issue 17 compared the tree before and after the trainer core this way).

  python benchmarks/resolved_configs.py --out=/tmp/configs_after.json
  python benchmarks/resolved_configs.py --compare=/tmp/configs_before.json,/tmp/configs_after.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's package

from invcoss_jax.continual.config import METHODS  # noqa: E402
from invcoss_jax.defaults import load_config_file  # noqa: E402
from invcoss_jax.evaluate.config import DEMO_TASKS, PAPER_TASKS  # noqa: E402


def specs() -> list[str]:
  out = []
  for f in ("xray", "ct", "mri", "path", "report"):
    out += [f"configs/{f}.py", f"configs/{f}.py:demo"]
  for p in ["", "alt", "demo", "demo,alt", "demo,report", "demo,report,alt"] + [f"demo,{m}" for m in METHODS] + list(
      METHODS):
    out.append(f"configs/continual.py:{p}" if p else "configs/continual.py")
  out += [f"configs/retention.py:{p}" for p in ("quick", "full", "report", "tiny")]
  for t in DEMO_TASKS + PAPER_TASKS + ("forgetting",):
    out += [f"configs/evaluate.py:{t}", f"configs/evaluate.py:{t},linear"]
  return out


def _flat(d, prefix=""):
  if isinstance(d, dict):
    return {k2: v2 for k, v in d.items() for k2, v2 in _flat(v, f"{prefix}{k}.").items()}
  return {prefix.rstrip("."): d}


def compare(a_path: str, b_path: str) -> list[str]:
  """'preset: key: old -> new' for every option that differs (or exists on one side only)."""
  with open(a_path) as f:
    a = json.load(f)
  with open(b_path) as f:
    b = json.load(f)
  out = []
  for spec in sorted(set(a) | set(b)):
    fa, fb = _flat(a.get(spec, {})), _flat(b.get(spec, {}))
    for k in sorted(set(fa) | set(fb)):
      if fa.get(k, "<absent>") != fb.get(k, "<absent>"):
        out.append(f"{spec}: {k}: {fa.get(k, '<absent>')!r} -> {fb.get(k, '<absent>')!r}")
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="")
  p.add_argument("--compare", default="", help="two JSON files written by --out, comma-separated")
  a = p.parse_args(argv)
  if a.compare:
    diffs = compare(*a.compare.split(","))
    print("\n".join(diffs) or "identical")
    return 0
  configs = {s: json.loads(load_config_file(s).to_json_best_effort(sort_keys=True)) for s in specs()}
  with open(a.out, "w") as f:
    json.dump(configs, f, sort_keys=True, indent=1)
  print(f"{len(configs)} presets -> {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
