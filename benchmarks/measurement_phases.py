r"""Where a retention benchmark's measurement time goes: each part of measuring one (seed, method) run of a
finished benchmark, timed on its own through `retention.evaluate.Measurer` (nothing of the benchmark is
written; a scratch folder holds the anchors' cache).

  python benchmarks/measurement_phases.py --preset=content --root=workdirs/retention_mixed --seed=0 --method=er \
      --out=benchmarks/results/measurement_phases.json

Parts, in the order a run meets them: held-out splits, the probes of stage 1 (`tasks`), the masked-reconstruction
re-fit of stage 1, the judge net (once per modality and process), the judges' anchors (once per seed, cached on
disk), the replay set's judges, the rest of the replay-set quality, then stage 2's probes and its measures of
stage 1 (CKA, feature distance, reconstruction with re-fit). Timings include compilation where a part is the first
to need a program, as in the benchmark.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's package

from invcoss_jax.continual.stages import plan_stages  # noqa: E402
from invcoss_jax.defaults import load_config_file  # noqa: E402
from invcoss_jax.io_utils import atomic_write_json  # noqa: E402
from invcoss_jax.retention import evaluate as retention_evaluate  # noqa: E402
from invcoss_jax.retention.config import run_config  # noqa: E402
from invcoss_jax.train import checkpoint as ckpt_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="content")
  p.add_argument("--root", required=True, help="workdir of a finished retention benchmark of that preset")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--method", default="er")
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  config = load_config_file(os.path.join(REPO, "configs", f"retention.py:{a.preset}"))
  stages = plan_stages(run_config(config, a.seed, a.method), os.path.join(a.root, "runs", f"seed_{a.seed}", a.method))
  if len(stages) < 2:
    raise SystemExit(f"{a.root}: expected a run of at least two stages")
  params = [ckpt_lib.load_trained_stage(s.workdir)[2] for s in stages[:2]]
  m = retention_evaluate.Measurer(config, tempfile.mkdtemp(prefix="measurement_phases_"))
  first = stages[0].modality
  images = retention_evaluate.read_replay_set(stages[0], a.method)
  seconds: dict[str, float] = {}

  def timed(name, fn):
    t = time.perf_counter()
    fn()
    seconds[name] = time.perf_counter() - t
    print(f"{name}: {seconds[name]:.1f} s", flush=True)

  timed("held-out splits", lambda: [m.split(mod, sp) for mod in m.order for sp in (str(m.rc.fit_split),
                                                                                   str(m.rc.test_split), "train")])
  timed("stage 1 probes", lambda: m.tasks(params[0], a.seed))
  timed("stage 1 reconstruction (decoder re-fit)", lambda: m.reconstruction(a.seed, stages[0], params[0]))
  if images is not None and m.judging(stages[0]):
    timed("judge net (once per modality)", lambda: m.judge_net(first))
    timed("judges' anchors (once per seed)", lambda: m.anchors(a.seed, stages[0], len(images)))
    timed("replay set's judges", lambda: m.judges(a.seed, a.method, stages[0], images))
    j = m.rc.replay.judges
    enabled, j.enabled = bool(j.enabled), False
    timed("replay-set quality without judges", lambda: m.replay_quality(a.seed, a.method, stages[0], params[0]))
    j.enabled = enabled
  timed("stage 2 probes", lambda: m.tasks(params[1], a.seed))
  timed("stage 2 measures of stage 1 (CKA, distance, re-fit)",
        lambda: m.earlier_stages(a.seed, stages, 1, lambda i: params[i], cka=True, recon=True))
  result = dict(preset=a.preset, root=a.root, seed=a.seed, method=a.method, seconds=seconds,
                command="python benchmarks/measurement_phases.py " + " ".join(argv if argv is not None else sys.argv[1:]))
  if a.out:
    atomic_write_json(a.out, result)
  return result


if __name__ == "__main__":
  main()
