"""The accounting of a DP stage, all of it by dp-accounting (never by hand): the DP-SGD plan of a stage (its
noise multiplier calibrated from a target epsilon), the epsilon of a list of mechanisms composed in one
accountant, and the stage's ledger `privacy.json`.

A mechanism is a JSON-able dict (as the ledger stores it), turned into a `dp_accounting.DpEvent` by `event`:
- `poisson_gaussian`: `steps` Gaussian steps (noise multiplier `noise_multiplier`, sensitivity 1 after the
  scaling by clip_norm) on Poisson samples of rate `sampling_rate`; with `truncated_batch_size` below
  `dataset_size` each sample is truncated to that size (TruncatedSubsampledGaussianDpEvent, 'pld' only);
- `gaussian`: `count` releases of the Gaussian mechanism (noise multiplier `noise_multiplier`) on all the data.
The neighbouring relation is add-or-remove one example of the stage's data (dp-accounting's default).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import ml_collections

from invcoss_jax import io_utils
from invcoss_jax.config_checks import ConfigError
from invcoss_jax.privacy.config import ACCOUNTANTS, SAMPLINGS, enabled

LEDGER_FILE = "privacy.json"
# Calibration: the smallest noise multiplier searched, and the tolerance on sigma.
_MIN_SIGMA = 0.05
_SIGMA_TOL = 1e-3


def make_accountant(name: str) -> "dp_accounting.PrivacyAccountant":
  """A fresh dp-accounting accountant: 'pld' (PLDAccountant) or 'rdp' (RdpAccountant)."""
  from dp_accounting import pld, rdp  # pylint: disable=g-import-not-at-top  (privacy.dp_sgd._JAX_PRIVACY)
  if name == "pld":
    return pld.PLDAccountant()
  if name == "rdp":
    return rdp.RdpAccountant()
  raise ConfigError(f"privacy.accountant={name!r}: expected one of {ACCOUNTANTS}")


def event(mechanism: dict[str, Any]) -> "dp_accounting.DpEvent":
  """The dp-accounting event of one ledger mechanism (see the module's docstring)."""
  import dp_accounting  # pylint: disable=g-import-not-at-top  (privacy.dp_sgd._JAX_PRIVACY: 0.8 s for every run)
  kind = mechanism["kind"]
  sigma = float(mechanism["noise_multiplier"])
  if kind == "gaussian":
    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), int(mechanism.get("count", 1)))
  if kind == "poisson_gaussian":
    q, steps = float(mechanism["sampling_rate"]), int(mechanism["steps"])
    n, cap = int(mechanism["dataset_size"]), mechanism.get("truncated_batch_size")
    if cap is None or int(cap) >= n:
      step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    else:
      step = dp_accounting.TruncatedSubsampledGaussianDpEvent(
          dataset_size=n, sampling_probability=q, truncated_batch_size=int(cap), noise_multiplier=sigma)
    return dp_accounting.SelfComposedDpEvent(step, steps)
  raise ValueError(f"unknown mechanism kind {kind!r} (expected 'poisson_gaussian' or 'gaussian')")


def epsilon(mechanisms: Sequence[dict[str, Any]], delta: float, accountant: str) -> float:
  """The epsilon at `delta` of the mechanisms composed in one accountant (inf when one is not DP)."""
  acc = make_accountant(accountant)
  for m in mechanisms:
    e = event(m)
    if not acc.supports(e):
      raise ConfigError(f"privacy.accountant={accountant!r} cannot account the mechanism {m['name']!r} ({e}): "
                        "a truncated Poisson batch needs 'pld', or privacy.max_batch_size >= the examples")
    acc.compose(e)
  return float(acc.get_epsilon(float(delta)))


def calibrate_noise_multiplier(make_mechanisms, target_epsilon: float, delta: float, accountant: str) -> float:
  """The smallest noise multiplier (within 1e-3) whose mechanisms `make_mechanisms(sigma)` reach at most
  `target_epsilon` at `delta`: dp_accounting.calibrate_dp_mechanism in a bracket found by doubling."""
  import dp_accounting  # pylint: disable=g-import-not-at-top  (privacy.dp_sgd._JAX_PRIVACY)
  def eps(sigma: float) -> float:
    return epsilon(make_mechanisms(sigma), delta, accountant)

  lo, hi = 0.5, 1.0
  while eps(hi) > target_epsilon:
    lo, hi = hi, 2 * hi
    if hi > 1e4:
      raise ConfigError(f"privacy.target_epsilon={target_epsilon}: not reached with a noise multiplier below 1e4 "
                        "(raise it, or sample fewer examples per step or run fewer steps)")
  if lo == 0.5:
    while eps(lo) <= target_epsilon:
      if lo <= _MIN_SIGMA:
        return lo
      lo, hi = max(lo / 2, _MIN_SIGMA), lo
  return float(dp_accounting.calibrate_dp_mechanism(
      lambda: make_accountant(accountant),
      lambda sigma: dp_accounting.ComposedDpEvent([event(m) for m in make_mechanisms(sigma)]),
      float(target_epsilon), float(delta),
      bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi), tol=_SIGMA_TOL))


@dataclasses.dataclass(frozen=True)
class DpSgdPlan:
  """The DP-SGD of one stage: what the step needs (`clip_norm`, `noise_multiplier`, `expected_batch_size`,
  `max_batch_size`, `microbatch_size`) and what the ledger records."""
  clip_norm: float
  noise_multiplier: float
  expected_batch_size: int  # the gradient sum is divided by it (train.global_batch_size)
  max_batch_size: int  # the padded batch a step holds
  microbatch_size: int  # examples per vmap chunk (divides max_batch_size)
  dataset_size: int
  steps: int
  delta: float
  accountant: str
  sampling: str
  epsilon: float
  target_epsilon: float
  calibrated: bool = False  # noise_multiplier was calibrated from target_epsilon (not given)

  @property
  def sampling_rate(self) -> float:
    return self.expected_batch_size / self.dataset_size

  def mechanism(self, data: str = "") -> dict[str, Any]:
    cap = self.max_batch_size if self.max_batch_size < self.dataset_size else None
    return dict(name="dp_sgd", kind="poisson_gaussian", data=data, sampling=self.sampling,
                sampling_rate=self.sampling_rate, noise_multiplier=self.noise_multiplier, steps=self.steps,
                dataset_size=self.dataset_size, truncated_batch_size=cap, clip_norm=self.clip_norm,
                expected_batch_size=self.expected_batch_size)


def _round_up(x: int, multiple: int) -> int:
  return -(-int(x) // multiple) * multiple


def physical_batch_size(privacy: ml_collections.ConfigDict, expected: int, dataset_size: int, multiple: int) -> int:
  """`privacy.max_batch_size`, or (0) the expected batch plus four standard deviations of the Poisson batch
  size, rounded up to `multiple` (and at most the data, rounded up)."""
  given = int(privacy.max_batch_size)
  if given > 0:
    if given % multiple:
      raise ConfigError(f"privacy.max_batch_size={given}: expected a multiple of {multiple} (the batch shards "
                        "of the mesh and privacy.microbatch_size)")
    if given < expected:
      raise ConfigError(f"privacy.max_batch_size={given}: expected at least the expected batch "
                        f"train.global_batch_size={expected}")
    return given
  q = expected / dataset_size
  size = min(math.ceil(expected + 4 * math.sqrt(expected * (1 - q))), dataset_size)
  return _round_up(max(size, 1), multiple)


def auto_microbatch_size(expected: int, shards: int = 1) -> int:
  """privacy.microbatch_size 0: about a quarter of the expected batch (a power of two times the batch shards), so
  a draw of the expected size fills 4 or 5 chunks and the step skips the chunks of padding alone (on the micro
  ViT on CPU, chunks of 8 at batch 32 cost 2.7x the plain step; the whole batch at once 7.5x:
  benchmarks/dp_step.py)."""
  per_shard = max(1, int(expected) // (4 * int(shards)))
  return int(shards) * 2 ** int(math.floor(math.log2(per_shard)))


def plan_dp_sgd(privacy: ml_collections.ConfigDict | None, *, expected_batch_size: int, dataset_size: int,
                steps: int, batch_multiple: int = 1, data: str = "", previous: dict[str, Any] | None = None,
                grad_accum_steps: int = 1, batch_option: str = "train.global_batch_size") -> DpSgdPlan | None:
  """The DP-SGD plan of a training run (None when `privacy`, a config.privacy section, is off): options checked,
  the physical batch chosen, the noise multiplier calibrated to target_epsilon (or taken as given) and the
  epsilon it reaches. `expected_batch_size` (the option `batch_option`) over `dataset_size` is the sampling rate.

  `previous`: the ledger an earlier run of the stage wrote; when it was planned from the same inputs, its noise
  multiplier and epsilon are taken (a resumed run does not calibrate again)."""
  if not enabled(privacy):
    return None
  check_privacy(privacy, grad_accum_steps=grad_accum_steps)
  expected = int(expected_batch_size)
  if expected > dataset_size:
    raise ConfigError(f"{batch_option}={expected} is larger than the {dataset_size} examples of "
                      f"{data or 'the data'}: DP-SGD samples each example with probability batch / N <= 1")
  micro = int(privacy.microbatch_size) or auto_microbatch_size(expected, int(batch_multiple))
  cap = physical_batch_size(privacy, expected, int(dataset_size), math.lcm(int(batch_multiple), micro))
  delta = float(privacy.delta) or 1.0 / dataset_size
  accountant, target = str(privacy.accountant), float(privacy.target_epsilon)
  if accountant == "rdp" and cap < dataset_size:
    raise ConfigError(f"privacy.accountant='rdp' with privacy.max_batch_size={cap} below the {dataset_size} "
                      "examples: dp-accounting's RDP accountant has no truncated Poisson event; use "
                      "privacy.accountant='pld' (exact for truncation) or a max_batch_size >= the examples")

  given = float(privacy.noise_multiplier)

  def plan(sigma: float, eps: float) -> DpSgdPlan:
    return DpSgdPlan(clip_norm=float(privacy.clip_norm), noise_multiplier=float(sigma), expected_batch_size=expected,
                     max_batch_size=cap, microbatch_size=micro, dataset_size=int(dataset_size), steps=int(steps),
                     delta=delta, accountant=accountant, sampling=str(privacy.sampling), epsilon=eps,
                     target_epsilon=target, calibrated=given <= 0)

  sigma = given
  key = plan_key(plan(sigma, math.inf))
  if previous and previous.get("plan_key") == key:
    return plan(float(previous["noise_multiplier"]), float(previous["epsilon"]))
  if sigma <= 0:
    sigma = calibrate_noise_multiplier(lambda s: [plan(s, math.inf).mechanism(data)], target, delta, accountant)
  p = plan(sigma, math.inf)
  return dataclasses.replace(p, epsilon=epsilon([p.mechanism(data)], delta, accountant))


def plan_key(plan: DpSgdPlan) -> dict[str, Any]:
  """What a plan's noise multiplier and epsilon follow from (without the noise multiplier when calibrated)."""
  out = dataclasses.asdict(plan)
  out.pop("epsilon")
  if plan.calibrated:
    out.pop("noise_multiplier")
  out["target_epsilon"] = out["target_epsilon"] if math.isfinite(out["target_epsilon"]) else None
  return out


def check_privacy(p: ml_collections.ConfigDict, *, grad_accum_steps: int = 1) -> None:
  """A config.privacy section's ranges, and the training options DP-SGD cannot run with (one-line
  ConfigErrors); `grad_accum_steps`: the run's config.train.grad_accum_steps."""
  eps, sigma = float(p.target_epsilon), float(p.noise_multiplier)
  if math.isnan(eps) or eps <= 0:
    raise ConfigError(f"privacy.target_epsilon={eps}: expected a positive epsilon, or inf for no DP")
  if math.isnan(sigma) or sigma < 0 or math.isinf(sigma):
    raise ConfigError(f"privacy.noise_multiplier={sigma}: expected a finite value >= 0 (0 = calibrated from "
                      "privacy.target_epsilon)")
  if not enabled(p):
    return
  if math.isfinite(eps) and sigma > 0:
    raise ConfigError(f"privacy.target_epsilon={eps} and privacy.noise_multiplier={sigma} are both set: set one "
                      "(the other follows from the accountant)")
  delta = float(p.delta)
  if not 0.0 <= delta < 1.0:
    raise ConfigError(f"privacy.delta={delta}: expected 0 <= delta < 1 (0 = 1 / N of the stage's data)")
  c = float(p.clip_norm)
  if not (math.isfinite(c) and c > 0):
    raise ConfigError(f"privacy.clip_norm={c}: expected a positive, finite L2 bound of each example's gradient")
  if str(p.accountant) not in ACCOUNTANTS:
    raise ConfigError(f"privacy.accountant={p.accountant!r}: expected one of {ACCOUNTANTS}")
  if str(p.sampling) not in SAMPLINGS:
    raise ConfigError(f"privacy.sampling={p.sampling!r}: expected one of {SAMPLINGS} (the loaders' shuffled "
                      "fixed-size batches have no accountant here)")
  for name in ("max_batch_size", "microbatch_size"):
    if int(p[name]) < 0:
      raise ConfigError(f"privacy.{name}={int(p[name])}: expected >= 0 (0 = automatic)")
  if int(grad_accum_steps) != 1:
    raise ConfigError(f"train.grad_accum_steps={int(grad_accum_steps)} with privacy on: expected 1 (each "
                      "DP-SGD step is one Poisson sample; privacy.microbatch_size bounds the memory instead)")


def ledger(mechanisms: Sequence[dict[str, Any]], *, delta: float, accountant: str, eps: float | None = None,
           **extra: Any) -> dict[str, Any]:
  """The ledger of a stage: its mechanisms composed in one accountant (epsilon at delta; `eps` when the caller
  has it already). The keys of the first DP-SGD mechanism (noise_multiplier, sampling_rate, steps, clip_norm)
  are repeated at the top."""
  eps = epsilon(mechanisms, delta, accountant) if eps is None else float(eps)
  sgd = next((m for m in mechanisms if m["name"] == "dp_sgd"), {})
  return dict(epsilon=eps, delta=float(delta), accountant=accountant,
              noise_multiplier=sgd.get("noise_multiplier"), sampling_rate=sgd.get("sampling_rate"),
              steps=sgd.get("steps"), clip_norm=sgd.get("clip_norm"),
              neighbouring="add or remove one example of the stage's data", mechanisms=list(mechanisms), **extra)


def write_ledger(workdir: str | os.PathLike, record: dict[str, Any]) -> str:
  """Writes `workdir/privacy.json` atomically; returns its path."""
  path = os.path.join(os.fspath(workdir), LEDGER_FILE)
  io_utils.atomic_write_json(path, record)
  return path


def read_ledger(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """The stage's ledger, or None when it has none (a stage trained without DP)."""
  path = os.path.join(os.fspath(workdir), LEDGER_FILE)
  if not os.path.isfile(path):
    return None
  return io_utils.read_json(path, lambda m: ValueError(f"{path}: {m}"))
