r"""The second bad-input sweep (issue 22), replayed from the command line: every case ends CLEAR or OK?

Each case builds the bad input it needs in a temporary folder (from the real data of ../shared/data, or
$INVCOSS_SHARED_DATA), runs `python -m invcoss_jax.main ...` in a subprocess with a timeout, one at a time, and
is classified from the exit status and stderr alone:

  CLEAR     the expected exit status (2 options and workdirs, 1 data files), stderr's last line is the only one
            starting with `error:`, it names what it should (the option, the file), and no `Traceback`;
            for Ctrl-C / SIGTERM: exit 130 / 143 and the one `interrupted (...)` line
  OK        a good input (or one whose documented behaviour is a warning) that ends with exit 0
  POOR      anything else that ended: a traceback, another status, a line that names nothing, a good input refused
  HANG      the timeout was reached (the process group is killed)
  ACCEPTED  a bad input that ended with exit 0
  DAMAGE    the run ended as expected, but what it should have left alone changed (a finished stage's
            config.json, the other run's record, files created under a refused workdir, ...)

  python benchmarks/bad_input_sweep.py --list
  python benchmarks/bad_input_sweep.py                      # every case; writes benchmarks/results/bad_input_sweep.json
  python benchmarks/bad_input_sweep.py --cases=seed_negative,csv_empty --out=/tmp/some.json

The results file is rewritten atomically after every case (a subset run writes only with --out). The machine
may be small: the cases run sequentially (two cases start a second process on purpose: two runs on one
workdir), each run kept tiny (`--config.total_steps=2`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import hashlib
import io
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "bad_input_sweep.json")


def shared_data() -> str:
  env = os.environ.get("INVCOSS_SHARED_DATA", "")
  return env or os.path.join(os.path.dirname(REPO), "shared", "data")


SHARED = shared_data()
PY = sys.executable
MAIN = [PY, "-m", "invcoss_jax.main"]

# The sweep's shorthand (issue 22): R, and the single-modality presets on the user's own files.
TINY = ["--config.total_steps=2"]
NO_STATS = ["--config.train.stats_after_pretrain=False"]


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
  e = {k: v for k, v in os.environ.items() if k not in ("INVCOSS_DEBUG", "INVCOSS_KILL_AT", "INVCOSS_DISK_FULL_AT")}
  e.update(extra or {})
  e["PYTHONPATH"] = REPO + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
  e.setdefault("INVCOSS_SHARED_DATA", SHARED)
  return e


# ------------------------------------------------------------------------------------------ running the CLI


@dataclasses.dataclass
class Run:
  args: list[str]
  cwd: str
  extra_env: dict[str, str]
  returncode: int | None  # None: killed at the timeout
  stderr: str
  seconds: float
  wrapper: tuple[str, ...] = ()  # a command the entry point runs under (e.g. unshare ... sh -c '...')

  @property
  def command(self) -> str:
    shown = ["python -m invcoss_jax.main"] + [shlex.quote(a) for a in self.args]
    shown = ([f"{k}={shlex.quote(v)}" for k, v in self.extra_env.items()] + [shlex.quote(a) for a in self.wrapper]
             + shown)
    prefix = "" if self.cwd == REPO else f"(cd {shlex.quote(self.cwd)} && "
    return prefix + " ".join(shown) + (")" if prefix else "")

  @property
  def lines(self) -> list[str]:
    return [ln for ln in self.stderr.splitlines() if ln.strip()]

  @property
  def last_line(self) -> str:
    return self.lines[-1] if self.lines else ""


def _kill_group(p: subprocess.Popen) -> None:
  try:
    os.killpg(p.pid, signal.SIGKILL)  # the group of the process this script started (start_new_session)
  except ProcessLookupError:
    pass


def cli(args: list[str], *, cwd: str = REPO, timeout: float = 300, log: str | None = None,
        extra_env: dict[str, str] | None = None, wrapper: tuple[str, ...] = ()) -> Run:
  """Runs the entry point once; stderr is kept (and written to `log`), stdout dropped."""
  start = time.perf_counter()
  p = subprocess.Popen(list(wrapper) + MAIN + args, cwd=cwd, env=env(extra_env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True, errors="replace", start_new_session=True)
  try:
    _, err = p.communicate(timeout=timeout)
    rc = p.returncode
  except subprocess.TimeoutExpired:
    _kill_group(p)
    _, err = p.communicate()
    rc = None
  run = Run(args, cwd, dict(extra_env or {}), rc, err or "", time.perf_counter() - start, tuple(wrapper))
  if log:
    with open(log, "w", encoding="utf-8") as f:
      f.write(f"$ {run.command}\n# exit {rc}, {run.seconds:.1f} s\n{run.stderr}")
  return run


def cli_background(args: list[str], *, cwd: str = REPO, stderr_path: str) -> subprocess.Popen:
  f = open(stderr_path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
  p = subprocess.Popen(MAIN + args, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=f, text=True,
                       start_new_session=True)
  p._stderr_file = f  # pylint: disable=protected-access
  return p


def finish_background(p: subprocess.Popen, stderr_path: str, args: list[str], cwd: str, start: float,
                      timeout: float) -> Run:
  try:
    rc = p.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    _kill_group(p)
    p.wait()
    rc = None
  p._stderr_file.close()  # pylint: disable=protected-access
  with open(stderr_path, encoding="utf-8", errors="replace") as f:
    err = f.read()
  return Run(args, cwd, {}, rc, err, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------ classification


@dataclasses.dataclass
class Expect:
  kind: str  # clear | ok | signal
  status: int = 0
  names: tuple[str, ...] = ()  # substrings the error line must hold (the option, the file)

  def describe(self) -> str:
    if self.kind == "ok":
      return "OK: exit 0"
    if self.kind == "signal":
      return f"one line 'interrupted (...)', exit {self.status}, no traceback"
    named = f" naming {', '.join(repr(n) for n in self.names)}" if self.names else ""
    return f"CLEAR: one 'error:' line{named}, exit {self.status}, no traceback"


def classify(run: Run, expect: Expect) -> tuple[str, list[str]]:
  """(outcome, notes) of one run against what was expected."""
  notes = []
  if run.returncode is None:
    return "HANG", [f"no exit after {run.seconds:.0f} s (killed)"]
  traceback = "Traceback" in run.stderr
  if expect.kind == "ok":
    if run.returncode == 0:
      if traceback:
        notes.append("exit 0, but a traceback was printed")
        return "POOR", notes
      return "OK", notes
    notes.append(f"a good input ended with exit {run.returncode}")
    return "POOR", notes
  if run.returncode == 0:
    return "ACCEPTED", ["exit 0"]
  if run.returncode != expect.status:
    notes.append(f"exit {run.returncode}, expected {expect.status}")
  if traceback:
    notes.append(f"a traceback ({run.stderr.count('Traceback')}x, {len(run.lines)} stderr lines)")
  last = run.last_line
  if expect.kind == "signal":
    if not last.startswith("interrupted ("):
      notes.append("the last stderr line is not 'interrupted (...)'")
  else:
    errors = [ln for ln in run.lines if ln.startswith("error:")]
    if not last.startswith("error:"):
      notes.append("the last stderr line does not start with 'error:'")
    else:
      if len(errors) != 1:
        notes.append(f"{len(errors)} 'error:' lines")
      for n in expect.names:
        if n not in last:
          notes.append(f"the error line does not name {n!r}")
  return ("POOR", notes) if notes else ("CLEAR", notes)


# ------------------------------------------------------------------------------------------ a case


@dataclasses.dataclass
class Case:
  name: str
  # The issue's group of the finding: damage | hang | accepted | poor | good (inputs that worked before), or item1:
  # not a finding of its list, but what its item 1 and docs/reliability.md promise (errors of asynchronous orbax
  # saves, full disks, one line).
  found: str
  issue: str  # the finding of issue 22 it replays
  fn: Callable[["Ctx"], dict]


CASES: list[Case] = []


def case(name: str, found: str, issue: str):
  def register(fn):
    CASES.append(Case(name, found, issue, fn))
    return fn
  return register


def result(run: Run, expect: Expect, *, damage: list[str] = (), extra_runs: list[Run] = (),
           notes: list[str] = (), outcome: str | None = None) -> dict:
  """The record of a case whose main run is `run`; `damage`: what it changed that it should not have."""
  got, why = classify(run, expect)
  why = list(why) + list(notes)
  if damage:
    why += list(damage)
    if got in ("CLEAR", "OK"):
      got = "DAMAGE"
  if outcome:
    got = outcome
  out = dict(command=run.command, expected=expect.describe(), outcome=got, exit_code=run.returncode,
             last_stderr_line=run.last_line[:2000], seconds=round(run.seconds, 1), notes=why)
  if extra_runs:
    out["other_commands"] = [dict(command=r.command, exit_code=r.returncode, last_stderr_line=r.last_line[:2000],
                                  seconds=round(r.seconds, 1)) for r in extra_runs]
  if got not in ("CLEAR", "OK"):
    out["stderr_tail"] = run.lines[-25:]
  return out


# ------------------------------------------------------------------------------------------ inputs


class Ctx:
  """The temporary folder, the inputs built from the real data (each once) and the fixtures (finished runs)."""

  def __init__(self, root: str):
    self.root = root
    self.logs = os.path.join(root, "logs")
    os.makedirs(self.logs, exist_ok=True)
    self._cache: dict[str, Any] = {}
    self.current = ""
    self.slot = ""

  def enter(self, name: str) -> None:
    """Case `name`'s files go to cases/c<k>: a folder name that says nothing (an error line naming the case's
    folder must not pass for one naming what is wrong)."""
    self.current = name
    self.slot = f"c{[c.name for c in CASES].index(name):02d}"

  def dir(self, name: str) -> str:
    path = os.path.join(self.root, "k", self.slot, name)
    os.makedirs(path, exist_ok=True)
    return path

  def workdir(self, name: str = "w") -> str:
    return os.path.join(self.root, "k", self.slot, name)

  def run(self, args, *, cwd=REPO, timeout=300, tag="", extra_env=None, wrapper=()) -> Run:
    log = os.path.join(self.logs, f"{self.current}{'_' + tag if tag else ''}.log")
    return cli(list(args), cwd=cwd, timeout=timeout, log=log, extra_env=extra_env, wrapper=wrapper)

  def once(self, key: str, build: Callable[[], Any]) -> Any:
    if key not in self._cache:
      self._cache[key] = build()
    return self._cache[key]

  # --- real data ---------------------------------------------------------------------------------------------

  def xray_images(self, n: int) -> np.ndarray:
    """Real chest X-rays (PneumoniaMNIST, 28x28 uint8)."""
    arr = self.once("xray", lambda: np.load(os.path.join(SHARED, "xray", "pneumoniamnist.npz"))["train_images"][:200])
    return arr[:n]

  def he_tiles(self, n: int) -> np.ndarray:
    arr = self.once("tiles", lambda: np.load(os.path.join(SHARED, "pathology", "he_tiles_64px.npz"))["images"][:64])
    return arr[:n]

  def png_folder(self, name: str, n: int = 40) -> str:
    from PIL import Image
    d = self.dir(name)
    for i, im in enumerate(self.xray_images(n)):
      Image.fromarray(im).save(os.path.join(d, f"xray_{i:03d}.png"))
    return d

  def reports(self) -> list[dict[str, str]]:
    """300 real Indiana reports with both findings and impression."""
    def build():
      with open(os.path.join(SHARED, "report", "indiana_reports.csv"), newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["findings"].strip() and r["impression"].strip()]
      return rows[:300]
    return self.once("reports", build)

  def reports_csv(self, name: str = "reports.csv", *, rows: list[dict] | None = None) -> str:
    path = os.path.join(self.dir("data"), name)
    rows = self.reports() if rows is None else rows
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(self.reports()[0].keys()))
    w.writeheader()
    w.writerows(rows)
    with open(path, "w", encoding="utf-8", newline="") as f:
      f.write(buf.getvalue())
    return path

  def reports_jsonl(self, bad: list[str]) -> str:
    """The real reports as JSON lines, then one row per entry of `bad` (raw JSON of the findings value)."""
    path = os.path.join(self.dir("data"), "reports.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      for r in self.reports():
        f.write(json.dumps(dict(findings=r["findings"], impression=r["impression"])) + "\n")
      for value in bad:
        f.write('{"findings": ' + value + ', "impression": "Normal chest."}\n')
    return path

  # --- fixtures: finished runs ---------------------------------------------------------------------------------

  def report_stage_args(self, workdir: str) -> list[str]:
    csv_path = self.once("fixture_reports_csv", lambda: self._fixture_reports_csv())
    return ["--config=configs/report.py:demo", "--config.total_steps=2", f"--config.data.path={csv_path}",
            "--config.data.text.max_length=32", "--config.data.text.vocab_size=1000",
            "--config.checkpoint.every_steps=1", f"--workdir={workdir}"]

  def _fixture_reports_csv(self) -> str:
    d = os.path.join(self.root, "fixtures")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "reports.csv")
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(self.reports()[0].keys()))
    w.writeheader()
    w.writerows(self.reports())
    with open(path, "w", encoding="utf-8", newline="") as f:
      f.write(buf.getvalue())
    return path

  def report_stage(self) -> str:
    """A finished report stage (2 steps on 300 real reports)."""
    def build():
      w = os.path.join(self.root, "fixtures", "report_stage")
      r = cli(self.report_stage_args(w), log=os.path.join(self.logs, "fixture_report_stage.log"))
      if r.returncode != 0:
        raise RuntimeError(f"fixture report stage failed: {r.command}\n{r.stderr[-3000:]}")
      return w
    return self.once("report_stage", build)

  def xray_stage_args(self, workdir: str) -> list[str]:
    return ["--config=configs/xray.py:demo", *TINY, *NO_STATS, f"--workdir={workdir}"]

  def xray_stage(self) -> str:
    def build():
      w = os.path.join(self.root, "fixtures", "xray_stage")
      r = cli(self.xray_stage_args(w), log=os.path.join(self.logs, "fixture_xray_stage.log"))
      if r.returncode != 0:
        raise RuntimeError(f"fixture X-ray stage failed: {r.command}\n{r.stderr[-3000:]}")
      return w
    return self.once("xray_stage", build)

  def continual_run(self) -> str:
    """A finished continual run (X-ray then pathology, invcoss, 2 steps a stage): the corrected rerun of the
    method-typo case when it ran, else run here."""
    def build():
      done = self._cache.get("continual_corrected")
      if done and os.path.isdir(os.path.join(done, "stage_1_xray")):
        return done
      w = os.path.join(self.root, "fixtures", "continual")
      r = cli(continual_args("invcoss", ("xray", "path"), w), log=os.path.join(self.logs, "fixture_continual.log"))
      if r.returncode != 0:
        raise RuntimeError(f"fixture continual run failed: {r.command}\n{r.stderr[-3000:]}")
      return w
    return self.once("continual_run", build)


def snapshot(root: str, *, skip=(".lock",)) -> dict[str, tuple[int, int, str]]:
  """{path: (size, mtime_ns, sha256 of small files)} under `root`, the lock file left out (it is rewritten)."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      if f in skip:
        continue
      p = os.path.join(d, f)
      st = os.stat(p)
      digest = ""
      if st.st_size < (4 << 20):
        with open(p, "rb") as fh:
          digest = hashlib.sha256(fh.read()).hexdigest()
      out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, digest)
  return out


def snapshot_diff(before: dict, after: dict) -> list[str]:
  out = []
  for k in sorted(set(before) | set(after)):
    if k not in after:
      out.append(f"removed {k}")
    elif k not in before:
      out.append(f"created {k}")
    elif before[k] != after[k]:
      out.append(f"changed {k}")
  return out


def listing(path: str) -> list[str]:
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


# ------------------------------------------------------------------------------------------ command lines


def xray_folder(fmt: str, path: str, *extra: str) -> list[str]:
  """The X-ray preset on the user's own files (`data.name=folder`)."""
  return ["--config=configs/xray.py:demo", *TINY, "--config.data.name=folder", f"--config.data.format={fmt}",
          f"--config.data.path={path}", "--config.data.modality=xray", *extra]


def report_on(path: str, *extra: str) -> list[str]:
  """The sweep's R: `--config=configs/report.py:demo --config.total_steps=2`, on another reports file."""
  return ["--config=configs/report.py:demo", *TINY, f"--config.data.path={path}", *extra]


def continual_args(method: str, order: tuple[str, ...], workdir: str) -> list[str]:
  """The continual demo cut to two image stages of 2 steps and a 16-image inversion (the retention `tiny` sizes)."""
  return ["--config=configs/continual.py:demo", f"--config.method={method}",
          f"--config.continual.order={order!r}".replace(" ", ""), *TINY,
          "--config.inversion.num_samples=16", "--config.inversion.schedule_2d.batch_size=8",
          "--config.inversion.schedule_2d.steps=2", "--config.inversion.schedule_2d.init_steps=2",
          "--config.continual.synthesize_last_stage=False", f"--workdir={workdir}"]


def clear(status: int, *names: str) -> Expect:
  return Expect("clear", status, tuple(names))


OK = Expect("ok")


# ================================================================================================== the cases
# --- options (exit 2) -----------------------------------------------------------------------------------------


@case("seed_negative", "poor", "seed=-1 reported by numpy without the option's name")
def _(ctx: Ctx):
  w = ctx.workdir()
  r = ctx.run(["--config=configs/xray.py:demo", "--config.seed=-1", f"--workdir={w}"])
  return result(r, clear(2, "seed=-1"), damage=[f"created {w}"] if os.path.exists(w) else [])


@case("total_steps_negative", "accepted", "total_steps=-3 (runs 300 epochs)")
def _(ctx: Ctx):
  w = ctx.workdir()
  r = ctx.run(["--config=configs/xray.py:demo", "--config.total_steps=-3", f"--workdir={w}"], timeout=120)
  return result(r, clear(2, "total_steps=-3"), damage=[f"created {w}"] if os.path.exists(w) else [])


@case("evaluate_seeds_empty", "poor", "evaluate.seeds=() (a traceback)")
def _(ctx: Ctx):
  w = ctx.workdir()
  r = ctx.run(["--config=configs/evaluate.py:pneumonia", "--config.evaluate.seeds=()", f"--workdir={w}"])
  return result(r, clear(2, "evaluate.seeds"), damage=[f"created {w}"] if os.path.exists(w) else [])


@case("retention_unknown_method", "poor", "unknown retention method (a traceback)")
def _(ctx: Ctx):
  w = ctx.workdir()
  r = ctx.run(["--config=configs/retention.py:tiny", "--config.retention.methods=('seqssl','nonsense')",
               f"--workdir={w}"])
  return result(r, clear(2, "retention.methods", "nonsense"), damage=[f"created {w}"] if os.path.exists(w) else [])


@case("batch_larger_than_dataset", "accepted", "a batch larger than the dataset (each image repeated in a batch)")
def _(ctx: Ctx):
  folder = ctx.png_folder("xrays", 20)  # 20 real X-rays, the preset's batch of 32
  w = ctx.workdir()
  r = ctx.run(xray_folder("images", folder, f"--workdir={w}"))
  damage = [f"{w}/config.json written"] if os.path.exists(os.path.join(w, "config.json")) else []
  return result(r, clear(2, "train.global_batch_size=32", "20"), damage=damage)


@case("batch_100000", "poor", "a batch of 100,000 runs 44 s into an out-of-memory")
def _(ctx: Ctx):
  w = ctx.workdir()
  r = ctx.run(["--config=configs/xray.py:demo", *TINY, "--config.train.global_batch_size=100000", f"--workdir={w}"])
  notes = [f"took {r.seconds:.0f} s"] if r.seconds > 40 else []
  damage = [f"{w}/config.json written"] if os.path.exists(os.path.join(w, "config.json")) else []
  return result(r, clear(2, "train.global_batch_size=100000"), damage=damage, notes=notes)


@case("vocab_size_6", "accepted", "data.text.vocab_size=6 building 93 tokens")
def _(ctx: Ctx):
  w = ctx.workdir()
  # A DataError (exit 1) by the docs: the least size depends on the corpus's alphabet, known once it is read.
  r = ctx.run(report_on(ctx.reports_csv(), "--config.data.text.vocab_size=6", f"--workdir={w}"))
  return result(r, clear(1, "data.text.vocab_size=6"))


@case("init_from_continual_workdir", "poor", "init_from=<continual workdir> does not point to its stage_N_* folders")
def _(ctx: Ctx):
  seq = ctx.continual_run()
  w = ctx.workdir()
  r = ctx.run(["--config=configs/evaluate.py:pneumonia", f"--config.init_from={seq}", "--config.evaluate.seeds=(0,)",
               f"--workdir={w}"])
  return result(r, clear(2, "init_from", "stage_1_xray"), damage=[f"created {w}"] if os.path.exists(w) else [])


@case("evaluate_pneumonia_from_report_stage", "poor",
      "evaluating pneumonia from a report stage says 'pre-trained on 3D volumes only'")
def _(ctx: Ctx):
  stage = ctx.report_stage()
  w = ctx.workdir()
  r = ctx.run(["--config=configs/evaluate.py:pneumonia", f"--config.init_from={stage}",
               "--config.evaluate.seeds=(0,)", f"--workdir={w}"])
  r_ok = clear(2, "report text only")
  out = result(r, r_ok)
  if "3D volumes only" in r.stderr:
    out["notes"].append("still says '3D volumes only'")
    out["outcome"] = "POOR"
  return out


def _typo_then_fix(ctx: Ctx, bad: list[str], good: list[str], names: tuple[str, ...], key: str | None = None):
  w = ctx.workdir()
  r_bad = ctx.run(bad, tag="typo")
  damage = []
  if os.path.exists(os.path.join(w, "workdir.json")):
    damage.append(f"the typo was recorded in {w}/workdir.json")
  r_good = ctx.run(good, tag="corrected", timeout=600)
  typo = result(r_bad, clear(2, *names), damage=damage)
  fixed = result(r_good, OK)
  if key and fixed["outcome"] == "OK":
    ctx._cache[key] = w  # pylint: disable=protected-access
  return typo, fixed


@case("continual_method_typo", "damage", "a typo in --config.method is recorded in workdir.json before it is checked")
def _(ctx: Ctx):
  w = ctx.workdir()
  typo, fixed = _typo_then_fix(ctx, continual_args("invcos", ("xray", "path"), w),
                               continual_args("invcoss", ("xray", "path"), w), ("continual.method='invcos'",),
                               key="continual_corrected")
  ctx._cache["method_fixed"] = fixed  # pylint: disable=protected-access
  return typo


@case("continual_method_typo_corrected_rerun", "damage",
      "the corrected rerun (method) was refused as 'another run'")
def _(ctx: Ctx):
  fixed = ctx._cache.get("method_fixed")  # pylint: disable=protected-access
  if fixed is None:  # run alone: the typo first
    ctx.enter("continual_method_typo")
    CASES_BY_NAME["continual_method_typo"].fn(ctx)
    ctx.enter("continual_method_typo_corrected_rerun")
    fixed = ctx._cache["method_fixed"]  # pylint: disable=protected-access
  return fixed


@case("continual_order_typo", "damage", "a typo in the continual order is recorded in workdir.json before it is checked")
def _(ctx: Ctx):
  w = ctx.workdir()
  typo, fixed = _typo_then_fix(ctx, continual_args("seqssl", ("xray", "pth"), w),
                               continual_args("seqssl", ("xray", "path"), w), ("continual.order", "pth"))
  ctx._cache["order_fixed"] = fixed  # pylint: disable=protected-access
  return typo


@case("continual_order_typo_corrected_rerun", "damage", "the corrected rerun (order) was refused as 'another run'")
def _(ctx: Ctx):
  fixed = ctx._cache.get("order_fixed")  # pylint: disable=protected-access
  if fixed is None:
    ctx.enter("continual_order_typo")
    CASES_BY_NAME["continual_order_typo"].fn(ctx)
    ctx.enter("continual_order_typo_corrected_rerun")
    fixed = ctx._cache["order_fixed"]  # pylint: disable=protected-access
  return fixed


@case("relative_config_other_directory", "poor", "a relative --config= from another directory fails in ml_collections")
def _(ctx: Ctx):
  elsewhere = ctx.dir("elsewhere")
  w = ctx.workdir()
  r = ctx.run(["--config=configs/xray.py:demo", *TINY, *NO_STATS, f"--workdir={w}"], cwd=elsewhere)
  return result(r, OK)


@case("relative_config_not_found", "poor", "a relative --config= found nowhere (a traceback in ml_collections)")
def _(ctx: Ctx):
  elsewhere = ctx.dir("elsewhere")
  w = ctx.workdir()
  r = ctx.run(["--config=configs/xray_typo.py:demo", f"--workdir={w}"], cwd=elsewhere)
  return result(r, clear(2, "configs/xray_typo.py", "no such config file"))


@case("workdir_name_too_long", "poor", "a long workdir path fails mid-run inside orbax (a name over PC_NAME_MAX)")
def _(ctx: Ctx):
  parent = ctx.dir("parent")
  name_max = os.pathconf(parent, "PC_NAME_MAX")
  w = os.path.join(parent, "n" * (name_max + 1))
  r = ctx.run(["--config=configs/xray.py:demo", *TINY, f"--workdir={w}"])
  damage = [f"created {e} under the parent" for e in listing(parent)]
  return result(r, clear(2, "PC_NAME_MAX", "--workdir"), damage=damage)


@case("workdir_path_too_long", "poor", "a long workdir path fails mid-run inside orbax (fits, its checkpoint files do not)")
def _(ctx: Ctx):
  parent = ctx.dir("parent")
  path_max = os.pathconf(parent, "PC_PATH_MAX")
  deep = os.path.join(parent, *["d" * 100] * ((path_max - len(parent) - 150) // 101))
  r = ctx.run(["--config=configs/xray.py:demo", *TINY, f"--workdir={deep}"])
  damage = [f"created {e} under the parent" for e in listing(parent)]
  out = result(r, clear(2, "PC_PATH_MAX"), damage=damage)
  out["notes"].append(f"workdir of {len(deep)} bytes (PC_PATH_MAX {path_max})")
  return out


# --- one run per workdir, signals -----------------------------------------------------------------------------


@case("two_runs_one_workdir", "damage", "no workdir lock: two runs on one workdir both exit 0, the last writer wins")
def _(ctx: Ctx):
  w = ctx.workdir()
  x = ["--config=configs/xray.py:demo", "--config.total_steps=100", "--config.checkpoint.every_steps=20",
       *NO_STATS, f"--workdir={w}"]
  first_args = x + ["--config.seed=0"]
  err_a = os.path.join(ctx.logs, "two_runs_one_workdir_first.log")
  start = time.perf_counter()
  a = cli_background(first_args, stderr_path=err_a)
  deadline = time.time() + 180
  while not os.path.exists(os.path.join(w, "workdir.json")) and time.time() < deadline and a.poll() is None:
    time.sleep(0.2)
  b = ctx.run(x + ["--config.seed=1"], tag="second")
  a_still_running = a.poll() is None
  ra = finish_background(a, err_a, first_args, REPO, start, 400)
  damage, notes = [], []
  if not a_still_running:
    notes.append("the first run had ended before the second was refused: inconclusive")
  if ra.returncode != 0:
    damage.append(f"the first run (seed 0) ended with exit {ra.returncode}: {ra.last_line}")
  try:
    with open(os.path.join(w, "config.json"), encoding="utf-8") as f:
      seed = json.load(f).get("seed")
    if seed != 0:
      damage.append(f"{w}/config.json records seed {seed}: the seed-0 run was overwritten")
  except (OSError, ValueError) as e:
    damage.append(f"{w}/config.json unreadable after both runs ({e})")
  return result(b, clear(2, f"pid {a.pid}", "in use"), damage=damage, extra_runs=[ra], notes=notes)


@case("stale_lock_taken_over", "good", "a stale lock of a dead process is taken over")
def _(ctx: Ctx):
  w = ctx.workdir()
  os.makedirs(w)
  dead = subprocess.Popen([PY, "-c", "pass"])
  dead.wait()
  with open(os.path.join(w, ".lock"), "w", encoding="utf-8") as f:
    json.dump(dict(pid=dead.pid, host=socket.gethostname(), started="2026-01-01T00:00:00+00:00"), f)
  r = ctx.run(["--config=configs/xray.py:demo", *TINY, *NO_STATS, f"--workdir={w}"])
  return result(r, OK)


def _signal_mid_run(ctx: Ctx, sig: signal.Signals, status: int) -> dict:
  """Mid-run, during asynchronous saves: one line; then the same command resumes and finishes."""
  w = ctx.workdir()
  args = ["--config=configs/xray.py:demo", "--config.total_steps=60", "--config.checkpoint.every_steps=2",
          "--config.checkpoint.async_save=True", *NO_STATS, f"--workdir={w}"]
  err = os.path.join(ctx.logs, f"{ctx.current}.log")
  start = time.perf_counter()
  p = cli_background(args, stderr_path=err)
  deadline = time.time() + 240
  while not os.path.isdir(os.path.join(w, "checkpoints", "4")) and time.time() < deadline and p.poll() is None:
    time.sleep(0.1)
  notes = []
  offset = 0
  if p.poll() is None:
    p._stderr_file.flush()  # pylint: disable=protected-access
    offset = os.path.getsize(err)
    p.send_signal(sig)
  else:
    notes.append(f"the run ended (exit {p.returncode}) before the signal")
  r = finish_background(p, err, args, REPO, start, 120)
  with open(err, "rb") as f:
    f.seek(offset)
    after = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
  notes.append(f"{len(after)} non-empty stderr line(s) written after the signal (the run's whole stderr: "
               f"{len(r.lines)})")
  steps = sorted(int(s) for s in listing(os.path.join(w, "checkpoints")) if s.isdigit())
  notes.append(f"checkpoints on disk after the signal: {steps}")
  again = ctx.run(args, tag="rerun")
  damage = []
  if again.returncode != 0:
    damage.append(f"the rerun of the same command ended with exit {again.returncode}: {again.last_line}")
  elif "resuming at step" not in again.stderr:
    damage.append("the rerun did not resume from a checkpoint")
  steps = sorted(int(s) for s in listing(os.path.join(w, "checkpoints")) if s.isdigit())
  if not steps or steps[-1] != 60:
    damage.append(f"after the rerun the checkpoints are {steps}, expected the last at step 60")
  return result(r, Expect("signal", status), damage=damage, extra_runs=[again], notes=notes)


@case("ctrl_c_mid_run", "poor", "Ctrl-C during an async save prints 1,406 lines and ~100 tracebacks")
def _(ctx: Ctx):
  return _signal_mid_run(ctx, signal.SIGINT, 130)


@case("sigterm_mid_run", "poor", "SIGTERM mid-run (issue 22, item 1: one line and a consistent workdir)")
def _(ctx: Ctx):
  return _signal_mid_run(ctx, signal.SIGTERM, 143)


@case("disk_full_at_an_async_checkpoint", "item1",
      "a full disk while checkpoints are saved asynchronously (item 1: errors of async orbax saves, one line)")
def _(ctx: Ctx):
  w = ctx.workdir()
  args = ["--config=configs/xray.py:demo", "--config.total_steps=6", "--config.checkpoint.every_steps=2",
          "--config.checkpoint.async_save=True", *NO_STATS, f"--workdir={w}"]
  # The package's fault injection (invcoss_jax/faults.py): ENOSPC right after the step-4 checkpoint was handed
  # to orbax, while it is still being written in the background.
  r = ctx.run(args, extra_env={"INVCOSS_DISK_FULL_AT": "checkpoint:4"})
  again = ctx.run(args, tag="rerun")
  damage = []
  if again.returncode != 0:
    damage.append(f"the rerun (disk freed) ended with exit {again.returncode}: {again.last_line}")
  elif "resuming at step" not in again.stderr:
    damage.append("the rerun did not resume from a checkpoint")
  out = result(r, clear(1, "no space left"), damage=damage, extra_runs=[again])
  if "writing 4:" in r.last_line:
    out["notes"].append("the line names '4', the fault point's value (INVCOSS_DISK_FULL_AT's OSError carries no path): "
                        "an artifact of the injection")
  return out


def _small_disk(mount_point: str, size: str) -> tuple[str, ...]:
  """A command prefix that runs the entry point with a `size` tmpfs on `mount_point`, in a private mount
  namespace (nothing is mounted outside it; the mount ends with the process). () where that is not allowed."""
  if not shutil.which("unshare") or os.geteuid() != 0:
    return ()
  wrapper = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(mount_point)} && exec \"$@\"", "sh")
  probe = subprocess.run(list(wrapper) + ["true"], capture_output=True, timeout=60)
  return wrapper if probe.returncode == 0 else ()


def _full_disk_during_checkpoint(ctx: Ctx, async_save: bool) -> dict:
  mnt = ctx.dir("small_disk")
  wrapper = _small_disk(mnt, "2m")  # the demo stage's first checkpoint (about 3.4 MB) does not fit
  args = ["--config=configs/xray.py:demo", "--config.total_steps=6", "--config.checkpoint.every_steps=2",
          f"--config.checkpoint.async_save={async_save}", *NO_STATS, f"--workdir={os.path.join(mnt, 'w')}"]
  if not wrapper:
    return dict(command="", expected="", outcome="SKIPPED", exit_code=None, last_stderr_line="", seconds=0.0,
                notes=["needs root and unshare to mount a small tmpfs in a private mount namespace"])
  r = ctx.run(args, wrapper=wrapper)
  out = result(r, clear(1, "no space left", "checkpoints"))
  out["notes"].append(f"{r.stderr.count('Traceback')} tracebacks, {len(r.lines)} stderr lines")
  return out


@case("disk_full_during_async_checkpoint", "item1",
      "a real full disk (2 MB tmpfs) while orbax saves a checkpoint asynchronously (item 1: async orbax saves; "
      "docs/reliability.md 'Full or read-only disks')")
def _(ctx: Ctx):
  return _full_disk_during_checkpoint(ctx, True)


@case("disk_full_during_sync_checkpoint", "item1",
      "a real full disk (2 MB tmpfs) while orbax saves a checkpoint synchronously (docs/reliability.md)")
def _(ctx: Ctx):
  return _full_disk_during_checkpoint(ctx, False)


# --- a finished stage's record, vocabularies -----------------------------------------------------------------------


def _vocab_tokens(stage: str) -> list[str]:
  with open(os.path.join(stage, "tokenizer.json"), encoding="utf-8") as f:
    vocab = json.load(f)["model"]["vocab"]
  return [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


def _write_vocab(path: str, tokens: list[str]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(t + "\n" for t in tokens))
  return path


def _resume_report_with(ctx: Ctx, tokens_of: Callable[[list[str]], list[str]], *extra: str) -> dict:
  stage = ctx.report_stage()
  vocab = _write_vocab(os.path.join(ctx.dir("data"), "vocab.txt"), tokens_of(_vocab_tokens(stage)))
  before = snapshot(stage)
  args = [a for a in ctx.report_stage_args(stage) if not a.startswith("--config.total_steps=")]
  r = ctx.run(args + ["--config.total_steps=4", f"--config.data.text.tokenizer={vocab}", *extra])
  damage = [f"{stage}: {d}" for d in snapshot_diff(before, snapshot(stage))]
  return result(r, clear(1, vocab, "sha256"), damage=damage)


@case("report_resume_other_size_vocabulary", "damage",
      "a failed resume (another-size vocabulary, another lr) rewrites a finished stage's config.json")
def _(ctx: Ctx):
  return _resume_report_with(ctx, lambda t: t + ["zzzz"], "--config.train.base_lr=0.5")


@case("report_resume_permuted_vocabulary", "accepted",
      "resuming a report stage with a same-size vocabulary whose ids are in another order")
def _(ctx: Ctx):
  return _resume_report_with(ctx, lambda t: t[:5] + [t[6], t[5]] + t[7:])


@case("report_rerun_same_vocabulary_as_vocab_txt", "good",
      "the same token list given as a vocab.txt is the same vocabulary (resume accepted, record kept)")
def _(ctx: Ctx):
  stage = ctx.report_stage()
  vocab = _write_vocab(os.path.join(ctx.dir("data"), "vocab.txt"), _vocab_tokens(stage))
  with open(os.path.join(stage, "config.json"), "rb") as f:
    record = f.read()
  r = ctx.run(ctx.report_stage_args(stage) + [f"--config.data.text.tokenizer={vocab}"])
  with open(os.path.join(stage, "config.json"), "rb") as f:
    damage = [] if f.read() == record else [f"{stage}/config.json rewritten"]
  return result(r, OK, damage=damage)


@case("xray_rerun_finished_stage_other_lr", "damage", "a rerun of a finished stage with another lr rewrote its config.json")
def _(ctx: Ctx):
  stage = ctx.xray_stage()
  with open(os.path.join(stage, "config.json"), "rb") as f:
    record = f.read()
  r = ctx.run(ctx.xray_stage_args(stage) + ["--config.train.base_lr=0.5"])
  with open(os.path.join(stage, "config.json"), "rb") as f:
    damage = [] if f.read() == record else [f"{stage}/config.json rewritten"]
  return result(r, OK, damage=damage)


# --- report text -----------------------------------------------------------------------------------------------


@case("csv_missing_column", "poor", "CSV missing a column (a traceback)")
def _(ctx: Ctx):
  rows = [{k: v for k, v in r.items() if k != "impression"} for r in ctx.reports()]
  path = os.path.join(ctx.dir("data"), "reports.csv")
  with open(path, "w", encoding="utf-8", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  r = ctx.run(report_on(path, f"--workdir={ctx.workdir()}"))
  return result(r, clear(1, "reports.csv:1", "impression"))


@case("csv_empty", "poor", "empty CSV (a traceback)")
def _(ctx: Ctx):
  path = os.path.join(ctx.dir("data"), "reports.csv")
  open(path, "w").close()  # pylint: disable=consider-using-with
  r = ctx.run(report_on(path, f"--workdir={ctx.workdir()}"))
  return result(r, clear(1, "reports.csv", "empty"))


@case("csv_header_only", "poor", "a CSV with a header and no rows")
def _(ctx: Ctx):
  path = ctx.reports_csv(rows=[])
  r = ctx.run(report_on(path, f"--workdir={ctx.workdir()}"))
  return result(r, clear(1, "reports.csv"))


@case("csv_unbalanced_quote", "poor", "unbalanced quote (a traceback)")
def _(ctx: Ctx):
  rows = ctx.reports()
  path = ctx.reports_csv(rows=rows[:100])  # header and rows 1-100: lines 1-101
  with open(path, "a", encoding="utf-8", newline="") as f:
    f.write('999,normal,normal,Xray Chest PA and Lateral,None.,None.,"Unclosed quote, left lower lobe '
            'opacity.,Normal.\r\n')  # line 102: a quote opened and never closed
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writerows(rows[100:])
  r = ctx.run(report_on(path, f"--workdir={ctx.workdir()}"))
  out = result(r, clear(1, "reports.csv:102"))
  if "quote" not in r.last_line:
    out["notes"].append("the line is named, but the message does not say that a quote is unbalanced")
  return out


def _non_utf8_csv(ctx: Ctx) -> tuple[str, int]:
  """The real reports with one Latin-1 byte in the findings of row 150 (line 151)."""
  rows = [dict(r) for r in ctx.reports()]
  rows[149]["findings"] = "PLACEHOLDER " + rows[149]["findings"]
  path = ctx.reports_csv(rows=rows)
  with open(path, "rb") as f:
    raw = f.read()
  with open(path, "wb") as f:
    f.write(raw.replace(b"PLACEHOLDER", b"Caf\xe9", 1))
  return path, 151


@case("csv_non_utf8_lenient", "poor", "one non-UTF-8 byte under lenient=True drops all 300 rows, then 'no texts'")
def _(ctx: Ctx):
  path, line = _non_utf8_csv(ctx)
  r = ctx.run(report_on(path, f"--workdir={ctx.workdir()}"))  # the demo preset is lenient
  out = result(r, OK)
  if out["outcome"] == "OK" and f"reports.csv:{line}" not in r.stderr:
    out["notes"].append(f"the skip of reports.csv:{line} is not logged")
  return out


@case("csv_non_utf8_strict", "poor", "a non-UTF-8 byte (lenient=False): the file and line")
def _(ctx: Ctx):
  path, line = _non_utf8_csv(ctx)
  r = ctx.run(report_on(path, "--config.data.lenient=False", f"--workdir={ctx.workdir()}"))
  return result(r, clear(1, f"reports.csv:{line}", "0xe9"))


@case("csv_report_over_131072_characters", "poor", "a valid CSV with a report over 131,072 characters is fatal")
def _(ctx: Ctx):
  rows = [dict(r) for r in ctx.reports()]
  words = " ".join(r["findings"] for r in rows)
  long = (words + " ") * (180_000 // len(words) + 1)
  rows[10]["findings"] = long[:180_000].strip()
  path = ctx.reports_csv(rows=rows)
  r = ctx.run(report_on(path, f"--workdir={ctx.workdir()}"))
  return result(r, OK)


@case("five_megabyte_word", "hang", "one 5 MB 'word' without spaces (a base64 blob) makes WordPiece training quadratic")
def _(ctx: Ctx):
  rows = [dict(r) for r in ctx.reports()]
  rows[20]["findings"] = "Attachment: " + "QUJD" * 1_250_000 + " end."
  path = ctx.reports_csv(rows=rows)
  r = ctx.run(report_on(path, f"--workdir={ctx.workdir()}"), timeout=240)
  out = result(r, OK)
  if out["outcome"] == "OK" and "longer than 100 characters" not in r.stderr:
    out["notes"].append("no warning about the long word")
  return out


def _json_case(ctx: Ctx, value: str, kind: str) -> dict:
  path = ctx.reports_jsonl([value])
  r = ctx.run(report_on(path, "--config.data.lenient=False", f"--workdir={ctx.workdir()}"))
  return result(r, clear(1, f"reports.jsonl:{len(ctx.reports()) + 1}", f"JSON {kind}"))


@case("json_number_as_report", "accepted", "JSON numbers as report text")
def _(ctx: Ctx):
  return _json_case(ctx, "42", "number")


@case("json_object_as_report", "accepted", "JSON objects as report text")
def _(ctx: Ctx):
  return _json_case(ctx, '{"text": "Clear."}', "object")


@case("json_boolean_as_report", "accepted", "JSON booleans as report text")
def _(ctx: Ctx):
  return _json_case(ctx, "true", "boolean")


@case("json_array_as_report", "accepted", "JSON arrays as report text")
def _(ctx: Ctx):
  return _json_case(ctx, '["Clear.", "Normal."]', "array")


@case("json_non_string_reports_lenient", "accepted", "JSON numbers/objects/booleans under the demo's lenient=True")
def _(ctx: Ctx):
  path = ctx.reports_jsonl(["42", '{"text": "Clear."}', "true"])
  r = ctx.run(report_on(path, f"--workdir={ctx.workdir()}"))
  out = result(r, OK)
  n = len(ctx.reports())
  missing = [n + k for k in (1, 2, 3) if f"reports.jsonl:{n + k}" not in r.stderr]
  if out["outcome"] == "OK" and missing:
    out["notes"].append(f"skips not logged for lines {missing}")
    out["outcome"] = "ACCEPTED"
  return out


def _vocab_txt_case(ctx: Ctx, body: bytes | None, names: tuple[str, ...]) -> dict:
  vocab = os.path.join(ctx.dir("data"), "vocab.txt")
  if body is not None:
    with open(vocab, "wb") as f:
      f.write(body)
  r = ctx.run(report_on(ctx.reports_csv(), f"--config.data.text.tokenizer={vocab}", f"--workdir={ctx.workdir()}"))
  return result(r, clear(1, *names))


@case("vocab_txt_empty_line", "poor", "bad vocab.txt: an empty line (a traceback)")
def _(ctx: Ctx):
  return _vocab_txt_case(ctx, b"[PAD]\n[UNK]\n\n[CLS]\n[SEP]\n[MASK]\nlung\nheart\n", ("vocab.txt:3", "empty line"))


@case("vocab_txt_missing_special", "poor", "bad vocab.txt: no [UNK]")
def _(ctx: Ctx):
  return _vocab_txt_case(ctx, b"[PAD]\n[CLS]\n[SEP]\n[MASK]\nlung\nheart\n", ("vocab.txt", "[UNK]"))


@case("vocab_txt_not_utf8", "poor", "bad vocab.txt: a byte that is not UTF-8")
def _(ctx: Ctx):
  return _vocab_txt_case(ctx, b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nlung\n\xff\n", ("vocab.txt:7", "0xff"))


@case("vocab_txt_missing_file", "poor", "bad vocab.txt: the file does not exist")
def _(ctx: Ctx):
  return _vocab_txt_case(ctx, None, ("vocab.txt",))


# --- images and arrays ---------------------------------------------------------------------------------------------


@case("npz_label_count", "poor", "wrong label count (a traceback)")
def _(ctx: Ctx):
  path = os.path.join(ctx.dir("data"), "xrays.npz")
  np.savez(path, images=ctx.xray_images(64), labels=np.zeros(63, np.int64))
  r = ctx.run(xray_folder("npz", path, f"--workdir={ctx.workdir()}"))
  return result(r, clear(1, "xrays.npz", "'labels' has 63 rows"))


def _float_xrays(ctx: Ctx, n: int) -> np.ndarray:
  return ctx.xray_images(n).astype(np.float32) / 255.0


@case("npz_nan_pixels", "accepted", "NaN/Inf pixels in an npz (caught only as a non-finite loss naming no file)")
def _(ctx: Ctx):
  images = _float_xrays(ctx, 64)
  images[37, 3, 4], images[37, 5, 6] = np.nan, np.inf
  path = os.path.join(ctx.dir("data"), "xrays.npz")
  np.savez(path, images=images)
  r = ctx.run(xray_folder("npz", path, f"--workdir={ctx.workdir()}"))
  return result(r, clear(1, "xrays.npz:images[37]", "NaN/Inf"))


@case("npz_nan_pixels_nonfinite_zero", "accepted", "data.nonfinite='zero' had no effect on npz pixels")
def _(ctx: Ctx):
  images = _float_xrays(ctx, 64)
  images[37, 3, 4], images[37, 5, 6] = np.nan, np.inf
  path = os.path.join(ctx.dir("data"), "xrays.npz")
  np.savez(path, images=images)
  r = ctx.run(xray_folder("npz", path, "--config.data.nonfinite=zero", f"--workdir={ctx.workdir()}"))
  out = result(r, OK)
  if out["outcome"] == "OK" and "replaced by 0" not in r.stderr:
    out["notes"].append("no warning naming the replaced pixels")
  return out


def _float_tiffs(ctx: Ctx) -> str:
  from PIL import Image
  d = ctx.dir("tiffs")
  for i, im in enumerate(_float_xrays(ctx, 40)):
    if i == 13:
      im = im.copy()
      im[0, :3] = [np.nan, np.inf, -np.inf]
    Image.fromarray(im).save(os.path.join(d, f"xray_{i:03d}.tif"))
  return d


@case("tiff_nan_inf_pixels", "accepted", "NaN/Inf pixels in image files (float TIFF)")
def _(ctx: Ctx):
  r = ctx.run(xray_folder("images", _float_tiffs(ctx), f"--workdir={ctx.workdir()}"))
  return result(r, clear(1, "xray_013.tif", "NaN/Inf"))


@case("tiff_nan_inf_pixels_nonfinite_zero", "accepted", "data.nonfinite='zero' on image files")
def _(ctx: Ctx):
  r = ctx.run(xray_folder("images", _float_tiffs(ctx), "--config.data.nonfinite=zero", f"--workdir={ctx.workdir()}"))
  out = result(r, OK)
  if out["outcome"] == "OK" and "replaced by 0" not in r.stderr:
    out["notes"].append("no warning naming the replaced pixels")
  return out


def _tiny_image_case(ctx: Ctx, side: int) -> dict:
  from PIL import Image
  d = ctx.png_folder("xrays", 40)
  Image.fromarray(np.asarray(Image.fromarray(ctx.xray_images(1)[0]).resize((side, side)))).save(
      os.path.join(d, "tiny.png"))
  r = ctx.run(xray_folder("images", d, f"--workdir={ctx.workdir()}"))
  return result(r, clear(1, "tiny.png", f"{side}x{side}", "min_image_size"))


@case("image_1x1", "accepted", "1x1 images silently upsampled")
def _(ctx: Ctx):
  return _tiny_image_case(ctx, 1)


@case("image_7x7", "accepted", "7x7 images silently upsampled")
def _(ctx: Ctx):
  return _tiny_image_case(ctx, 7)


@case("image_exif_rotated", "accepted", "EXIF orientation ignored")
def _(ctx: Ctx):
  from PIL import Image
  d = ctx.png_folder("xrays", 40)
  im = Image.fromarray(ctx.xray_images(41)[40]).resize((40, 28))  # 28 rows x 40 columns, stored sideways
  exif = im.getexif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
  path = os.path.join(d, "rotated.jpg")
  im.save(path, exif=exif, quality=95)
  r = ctx.run(xray_folder("images", d, f"--workdir={ctx.workdir()}"))
  out = result(r, OK)
  # What the reader made of it (the package's reader, as the pipeline calls it): upright, 40 x 28.
  probe = subprocess.run([PY, "-c", "import sys; from invcoss_jax.data import read_image; "
                          "print(tuple(read_image(sys.argv[1]).shape))", path],
                         env=env(), capture_output=True, text=True, timeout=120)
  shape = probe.stdout.strip()
  out["notes"].append(f"read_image shape {shape} (stored 28x40, upright 40x28)")
  if out["outcome"] == "OK" and not shape.startswith("(40, 28"):
    out["outcome"] = "ACCEPTED"
    out["notes"].append("the orientation was not applied")
  return out


@case("empty_image_folder", "poor", "empty image folder (a traceback)")
def _(ctx: Ctx):
  d = ctx.dir("empty")
  r = ctx.run(xray_folder("images", d, f"--workdir={ctx.workdir()}"))
  return result(r, clear(1, d, "holds no"))


@case("grain_thread_truncated_png", "poor",
      "a bad file inside a grain read thread ends in grain's 'removed its internal frames' note")
def _(ctx: Ctx):
  from PIL import Image
  d = ctx.dir("tiles")
  for i, im in enumerate(ctx.he_tiles(40)):
    Image.fromarray(im).save(os.path.join(d, f"tile_{i:03d}.png"))
  bad = os.path.join(d, "tile_017.png")
  with open(bad, "rb") as f:
    head = f.read(200)
  with open(bad, "wb") as f:
    f.write(head)
  r = ctx.run(["--config=configs/path.py:demo", *TINY, "--config.data.name=folder", "--config.data.format=images",
               f"--config.data.path={d}", "--config.data.modality=path", f"--workdir={ctx.workdir()}"])
  out = result(r, clear(1, "tile_017.png", "cannot decode"))
  if "removed its internal frames" in r.stderr:
    out["notes"].append("grain's 'removed its internal frames' note printed")
  return out


# --- volumes ---------------------------------------------------------------------------------------------------


@case("nifti_4d", "poor", "4D NIfTI (a traceback)")
def _(ctx: Ctx):
  d = ctx.dir("mri")
  for name in sorted(os.listdir(os.path.join(SHARED, "mri", "hippocampus", "images")))[:3]:
    shutil.copy(os.path.join(SHARED, "mri", "hippocampus", "images", name), d)
  shutil.copy(os.path.join(SHARED, "mri", "nibabel_testdata", "example4d.nii.gz"), d)
  r = ctx.run(["--config=configs/mri.py:demo", *TINY, "--config.data.name=folder", "--config.data.format=nifti",
               f"--config.data.path={d}", "--config.data.modality=mri", f"--workdir={ctx.workdir()}"])
  return result(r, clear(1, "example4d.nii.gz", "4D"))


def ct_dicom(path: str, *extra: str) -> list[str]:
  return ["--config=configs/ct.py:demo", *TINY, "--config.data.name=folder", "--config.data.format=dicom",
          f"--config.data.path={path}", "--config.data.modality=ct", *extra]


@case("dicom_mixed_series", "poor", "mixed DICOM series in one folder (a traceback)")
def _(ctx: Ctx):
  root = ctx.dir("dicom")
  scan = os.path.join(root, "scan")
  os.makedirs(scan)
  for name in sorted(os.listdir(os.path.join(SHARED, "ct", "dicom"))):
    shutil.copy(os.path.join(SHARED, "ct", "dicom", name), scan)
  r = ctx.run(ct_dicom(root, f"--workdir={ctx.workdir()}"))
  return result(r, clear(1, "scan", "series"))


def write_dicom(path, pixels, *, z, series_number=None, series_uid=None, instance=1,
                study_uid="1.2.826.0.1.3680043.8.498.1"):
  """A CT slice of real pixels (int16 HU) at `z` mm, axial (as tests/test_data_bad_input.py writes them)."""
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = CTImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.StudyInstanceUID = "CT", study_uid
  if series_uid is not None:
    ds.SeriesInstanceUID = series_uid
  if series_number is not None:
    ds.SeriesNumber = series_number
  ds.InstanceNumber = instance
  ds.ImagePositionPatient = [0.0, 0.0, float(z)]
  ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
  ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
  ds.RescaleIntercept, ds.RescaleSlope = 0, 1
  ds.PixelData = np.ascontiguousarray(pixels.astype(np.int16)).tobytes()
  ds.save_as(path, enforce_file_format=True)


def _ct_slices() -> np.ndarray:
  """The 30 axial slices of the real small CT (122 x 101, HU)."""
  import nibabel as nib
  vol = np.asarray(nib.load(os.path.join(SHARED, "ct", "totalseg_ct_small.nii.gz")).dataobj)
  return np.moveaxis(vol, 2, 0)


def _two_interleaved_series(folders: tuple[str, str]) -> None:
  """Two series of the real CT's 30 slices (the second one 100 HU brighter), each at 2 mm, interleaved in
  position (0, 2, 4, ... and 1, 3, 5, ...), with SeriesNumber 1 and 2 and no SeriesInstanceUID."""
  slices = _ct_slices()
  for s, folder in enumerate(folders):
    os.makedirs(folder, exist_ok=True)
    for k, px in enumerate(slices):
      write_dicom(os.path.join(folder, f"s{s}_{k:02d}.dcm"), px + 100 * s, z=2 * k + s, series_number=s + 1,
                  instance=k + 1)


@case("dicom_interleaved_without_series_uid", "accepted",
      "interleaved DICOM series without SeriesInstanceUID merged into one volume")
def _(ctx: Ctx):
  root = ctx.dir("dicom")
  scan = os.path.join(root, "scan")
  _two_interleaved_series((scan, scan))
  r = ctx.run(ct_dicom(root, f"--workdir={ctx.workdir()}"))
  return result(r, clear(1, "scan", "series", "SeriesNumber"))


@case("dicom_two_series_in_two_folders", "good", "the same two series, one folder each: two volumes")
def _(ctx: Ctx):
  root = ctx.dir("dicom")
  _two_interleaved_series((os.path.join(root, "series1"), os.path.join(root, "series2")))
  r = ctx.run(ct_dicom(root, f"--workdir={ctx.workdir()}"))
  return result(r, OK)


# init_from a continual workdir reuses the corrected continual run of the method-typo case: after it.
CASES.insert([c.name for c in CASES].index("continual_order_typo_corrected_rerun") + 1,
             CASES.pop([c.name for c in CASES].index("init_from_continual_workdir")))
CASES_BY_NAME = {c.name: c for c in CASES}

# The findings of issue 22 that have no case here, and why.
NOT_REPRODUCED = [
    dict(finding="The workdir lock on retention's nested runs (item 2: 'on every job, including retention's nested "
                 "runs')",
         why="two retention runs on one workdir would take minutes each even at the `tiny` preset on this machine; "
             "the lock itself is exercised by two_runs_one_workdir and stale_lock_taken_over"),
    dict(finding="Ctrl-C 'during an async save' exactly",
         why="the signal is sent once checkpoints/4 exists with checkpoint.every_steps=2 and async_save=True, so "
             "saves are in flight most of the time, but the instant cannot be chosen from outside the process"),
    dict(finding="The 9 good inputs of the sweep that already worked",
         why="issue 22 does not list them; the OK cases here are the good inputs its findings imply (nonfinite='zero', "
             "lenient reading, a long CSV field, a relative --config=, two series in two folders, a corrected "
             "rerun, a stale lock)"),
]


# ------------------------------------------------------------------------------------------ driver


def _atomic_write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=1, ensure_ascii=False)
      f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the result private
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          timeout=30).stdout.strip()
  except OSError:
    return ""


def print_table(records: list[dict]) -> None:
  w = max([len(r["case"]) for r in records] + [4])
  print(f"\n{'case':<{w}}  {'outcome':<8} {'exit':>4} {'s':>6}  last stderr line")
  for r in records:
    line = (r.get("last_stderr_line") or "").replace("\n", " ")
    print(f"{r['case']:<{w}}  {r['outcome']:<8} {str(r['exit_code']):>4} {r['seconds']:>6.1f}  {line[:110]}")
  counts: dict[str, int] = {}
  for r in records:
    counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
  print("\n" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="", help=f"results JSON (default for a full run: {DEFAULT_OUT})")
  ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
  ap.add_argument("--list", action="store_true", help="list the cases and exit")
  ap.add_argument("--keep", action="store_true", help="keep the temporary folder (inputs, workdirs, logs)")
  ap.add_argument("--tmp", default="", help="parent of the temporary folder (default: the system's)")
  args = ap.parse_args(argv)

  if args.list:
    for c in CASES:
      print(f"{c.name:<42} {c.found:<9} {c.issue}")
    print(f"\n{len(CASES)} cases; not reproduced from the command line:")
    for n in NOT_REPRODUCED:
      print(f"  - {n['finding']}: {n['why']}")
    return 0

  names = [n.strip() for n in args.cases.split(",") if n.strip()]
  unknown = [n for n in names if n not in CASES_BY_NAME]
  if unknown:
    print(f"unknown case(s) {unknown}; --list shows them", file=sys.stderr)
    return 2
  selected = [CASES_BY_NAME[n] for n in names] if names else list(CASES)
  out_path = args.out or ("" if names else DEFAULT_OUT)
  if not os.path.isdir(SHARED):
    print(f"the shared data folder {SHARED} does not exist (set INVCOSS_SHARED_DATA)", file=sys.stderr)
    return 2

  root = tempfile.mkdtemp(prefix="bis_", dir=args.tmp or None)
  ctx = Ctx(root)
  started = time.perf_counter()
  doc = dict(
      about="issue 22's second bad-input sweep, replayed from the command line by benchmarks/bad_input_sweep.py",
      started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), commit=_commit(),
      host=dict(machine=platform.machine(), cpus=os.cpu_count(), python=platform.python_version()),
      shared_data=SHARED, outcomes={}, outcomes_of_the_issues_findings={}, total_seconds=0.0, cases=[], not_reproduced=NOT_REPRODUCED)
  records = doc["cases"]
  print(f"{len(selected)} case(s); inputs and logs in {root}", flush=True)
  try:
    for c in selected:
      ctx.enter(c.name)
      t0 = time.perf_counter()
      try:
        rec = c.fn(ctx)
      except Exception as e:  # pylint: disable=broad-except  (the sweep goes on; the case says why)
        rec = dict(command="", expected="", outcome="ERROR", exit_code=None, last_stderr_line="", seconds=0.0,
                   notes=[f"the case itself failed: {type(e).__name__}: {str(e)[-2000:]}"])
      rec = dict(case=c.name, found=c.found, issue=c.issue, **rec)
      rec["case_seconds"] = round(time.perf_counter() - t0, 1)
      records.append(rec)
      line = (rec.get("last_stderr_line") or "")[:120]
      print(f"[{len(records):2d}/{len(selected)}] {c.name:<42} {rec['outcome']:<8} exit {rec['exit_code']} "
            f"{rec['case_seconds']:6.1f}s  {line}", flush=True)
      doc["outcomes"] = {k: sum(r["outcome"] == k for r in records) for k in
                         sorted({r["outcome"] for r in records})}
      listed = [r for r in records if r["found"] != "item1"]
      doc["outcomes_of_the_issues_findings"] = {k: sum(r["outcome"] == k for r in listed) for k in
                                                sorted({r["outcome"] for r in listed})}
      doc["total_seconds"] = round(time.perf_counter() - started, 1)
      if out_path:
        _atomic_write_json(out_path, doc)
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  print_table(records)
  print(f"total {time.perf_counter() - started:.0f} s" + (f"; results in {out_path}" if out_path else ""))
  return 0 if all(r["outcome"] in ("CLEAR", "OK") for r in records) else 1


if __name__ == "__main__":
  sys.exit(main())
