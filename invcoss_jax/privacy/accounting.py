"""The accounting of a DP stage, all of it by dp-accounting (never by hand): the DP-SGD plan of a stage (its
noise multiplier calibrated from a target epsilon), the epsilon of a list of mechanisms composed in one
accountant, and the stage's ledger `privacy.json`.

A mechanism is a JSON-able dict (as the ledger stores it), turned into a `dp_accounting.DpEvent` by `event`:
- `poisson_gaussian`: `steps` Gaussian steps (noise multiplier `noise_multiplier`, sensitivity 1 after the
  scaling by clip_norm) on Poisson samples of rate `sampling_rate`; with `truncated_batch_size` below
  `dataset_size` each sample is truncated to that size (TruncatedSubsampledGaussianDpEvent, 'pld' only);
- `gaussian`: `count` releases of the Gaussian mechanism (noise multiplier `noise_multiplier`) on all the data:
  the DP feature statistics (`name` 'dp_statistics', `StatisticsPlan`), one release of the clipped sums.
The neighbouring relation is add-or-remove one example of the stage's data (dp-accounting's default), for
every mechanism: DP-SGD's clipped gradient sum and the statistics' clipped sums each move by at most their clip
norm when one example is added or removed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import Any, Sequence

import ml_collections

from invcoss_jax import io_utils
from invcoss_jax.config_checks import ConfigError
from invcoss_jax.privacy.config import ACCOUNTANTS, SAMPLINGS, enabled

LEDGER_FILE = "privacy.json"
SGD_MECHANISM = "dp_sgd"
STATS_MECHANISM = "dp_statistics"
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
  return _calibrate(lambda sigma: epsilon(make_mechanisms(sigma), delta, accountant),
                    lambda: make_accountant(accountant),
                    lambda sigma: dp_accounting.ComposedDpEvent([event(m) for m in make_mechanisms(sigma)]),
                    target_epsilon, delta, "(raise it, or sample fewer examples per step or run fewer steps)")


def _calibrate(eps, make_fresh_accountant, make_event, target_epsilon: float, delta: float, hint: str) -> float:
  """calibrate_noise_multiplier's search: `eps(sigma)` the epsilon of the mechanisms at sigma, `make_event(sigma)`
  their dp-accounting event composed onto `make_fresh_accountant()`. With `make_event` None the bracket is
  bisected on `eps` alone (to within 1e-3, the smallest sigma found meeting the target), for mechanisms composed
  onto an accountant that is not fresh (dp_accounting.calibrate_dp_mechanism needs an empty one)."""
  import dp_accounting  # pylint: disable=g-import-not-at-top  (privacy.dp_sgd._JAX_PRIVACY)
  lo, hi = 0.5, 1.0
  while eps(hi) > target_epsilon:
    lo, hi = hi, 2 * hi
    if hi > 1e4:
      raise ConfigError(f"privacy.target_epsilon={target_epsilon}: not reached with a noise multiplier below 1e4 "
                        f"{hint}")
  if lo == 0.5:
    while eps(lo) <= target_epsilon:
      if lo <= _MIN_SIGMA:
        return lo
      lo, hi = max(lo / 2, _MIN_SIGMA), lo
  if make_event is None:
    while hi - lo > _SIGMA_TOL:  # eps(lo) > target >= eps(hi)
      mid = (lo + hi) / 2
      lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return float(hi)
  return float(dp_accounting.calibrate_dp_mechanism(
      make_fresh_accountant, make_event, float(target_epsilon), float(delta),
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
  # The share of target_epsilon left to the stage's DP statistics: DP-SGD alone was calibrated to
  # (1 - it) x target_epsilon (0: the whole target; a fine-tuning run, a report stage, a sigma given).
  statistics_epsilon_fraction: float = 0.0

  @property
  def sampling_rate(self) -> float:
    return self.expected_batch_size / self.dataset_size

  def mechanism(self, data: str = "") -> dict[str, Any]:
    cap = self.max_batch_size if self.max_batch_size < self.dataset_size else None
    return dict(name=SGD_MECHANISM, kind="poisson_gaussian", data=data, sampling=self.sampling,
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
                grad_accum_steps: int = 1, batch_option: str = "train.global_batch_size",
                statistics: bool = False) -> DpSgdPlan | None:
  """The DP-SGD plan of a training run (None when `privacy`, a config.privacy section, is off): options checked,
  the physical batch chosen, the noise multiplier calibrated to target_epsilon (or taken as given) and the
  epsilon it reaches. `expected_batch_size` (the option `batch_option`) over `dataset_size` is the sampling rate.
  `statistics`: the run is an image pre-training stage, whose statistics pass is DP too: a calibrated sigma
  meets (1 - privacy.stats_epsilon_fraction) x target_epsilon alone, the rest is the statistics' share.

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
  share = float(privacy.stats_epsilon_fraction) if statistics and given <= 0 else 0.0

  def plan(sigma: float, eps: float) -> DpSgdPlan:
    return DpSgdPlan(clip_norm=float(privacy.clip_norm), noise_multiplier=float(sigma), expected_batch_size=expected,
                     max_batch_size=cap, microbatch_size=micro, dataset_size=int(dataset_size), steps=int(steps),
                     delta=delta, accountant=accountant, sampling=str(privacy.sampling), epsilon=eps,
                     target_epsilon=target, calibrated=given <= 0, statistics_epsilon_fraction=share)

  sigma = given
  key = plan_key(plan(sigma, math.inf))
  if previous and previous.get("plan_key") == key:
    # The ledger's top-level epsilon is the stage's (DP-SGD and its statistics composed) once statistics ran.
    return plan(float(previous["noise_multiplier"]), float(previous.get("dp_sgd_epsilon", previous["epsilon"])))
  if sigma <= 0:
    sigma = calibrate_noise_multiplier(lambda s: [plan(s, math.inf).mechanism(data)], target * (1 - share), delta,
                                       accountant)
  p = plan(sigma, math.inf)
  return dataclasses.replace(p, epsilon=epsilon([p.mechanism(data)], delta, accountant))


def plan_key(plan: DpSgdPlan) -> dict[str, Any]:
  """What a plan's noise multiplier and epsilon follow from (without the noise multiplier when calibrated)."""
  out = dataclasses.asdict(plan)
  out.pop("epsilon")
  if plan.calibrated:
    out.pop("noise_multiplier")
  out["target_epsilon"] = out["target_epsilon"] if math.isfinite(out["target_epsilon"]) else None
  if not out["statistics_epsilon_fraction"]:
    out.pop("statistics_epsilon_fraction")  # the keys of ledgers written before DP statistics existed
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
  on = enabled(p)  # the values are checked either way (a typo is refused before a DP run needs it)
  if on and math.isfinite(eps) and sigma > 0:
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
  c, s, f = float(p.stats_clip_norm), float(p.stats_noise_multiplier), float(p.stats_epsilon_fraction)
  if not (math.isfinite(c) and c >= 0):
    raise ConfigError(f"privacy.stats_clip_norm={c}: expected a positive, finite L2 bound of each example's "
                      "statistics contribution (0 = not set)")
  if not (math.isfinite(s) and s >= 0):
    raise ConfigError(f"privacy.stats_noise_multiplier={s}: expected a finite value >= 0 (0 = calibrated from "
                      "privacy.target_epsilon)")
  if not 0.0 <= f < 1.0:
    raise ConfigError(f"privacy.stats_epsilon_fraction={f}: expected 0 <= fraction < 1 (the share of "
                      "privacy.target_epsilon left to the statistics pass)")
  if not on:
    return
  if math.isfinite(eps) and s > 0:
    raise ConfigError(f"privacy.target_epsilon={eps} and privacy.stats_noise_multiplier={s} are both set: set one "
                      "(with target_epsilon the statistics' sigma is calibrated to privacy.stats_epsilon_fraction "
                      "of it)")
  if int(grad_accum_steps) != 1:
    raise ConfigError(f"train.grad_accum_steps={int(grad_accum_steps)} with privacy on: expected 1 (each "
                      "DP-SGD step is one Poisson sample; privacy.microbatch_size bounds the memory instead)")


def ledger(mechanisms: Sequence[dict[str, Any]], *, delta: float, accountant: str, eps: float | None = None,
           **extra: Any) -> dict[str, Any]:
  """The ledger of a stage: its mechanisms composed in one accountant (epsilon at delta; `eps` when the caller
  has it already). The keys of the first DP-SGD mechanism (noise_multiplier, sampling_rate, steps, clip_norm)
  are repeated at the top."""
  eps = epsilon(mechanisms, delta, accountant) if eps is None else float(eps)
  sgd = next((m for m in mechanisms if m["name"] == SGD_MECHANISM), {})
  return dict(epsilon=eps, delta=float(delta), accountant=accountant,
              noise_multiplier=sgd.get("noise_multiplier"), sampling_rate=sgd.get("sampling_rate"),
              steps=sgd.get("steps"), clip_norm=sgd.get("clip_norm"),
              neighbouring="add or remove one example of the stage's data", mechanisms=list(mechanisms), **extra)


# --- DP feature statistics ---------------------------------------------------------------------------------

COVERS_SGD = ("the stage's parameters (every checkpoint) and what is computed from them alone; not the training "
              "logs and image grids, nor statistics computed on the data without noise")
COVERS_WITH_STATISTICS = (
    "the stage's parameters (every checkpoint), its DP feature statistics (statistics.npz) and what is computed "
    "from them alone and public inputs (a synthetic set inverted from them reads nothing else); not the training "
    "logs, config.seed (the noise keys follow from it) or anything else computed from the data")


def check_statistics_options(p: ml_collections.ConfigDict) -> None:
  """The options a DP statistics pass needs on top of check_privacy's (one-line ConfigErrors): stats_clip_norm
  set, and the statistics' noise multiplier given (with privacy.noise_multiplier) or a share of
  privacy.target_epsilon (privacy.stats_epsilon_fraction) to calibrate it from."""
  check_privacy(p)
  off = "or run no statistics pass (config.train.stats_after_pretrain=False)"
  if float(p.stats_clip_norm) <= 0:
    raise ConfigError(f"privacy.stats_clip_norm={float(p.stats_clip_norm)}: set the L2 bound of each example's "
                      "statistics contribution for a DP statistics pass (no default fits every model: measure it "
                      f"on public images, docs/privacy.md), {off}")
  target = float(p.target_epsilon)
  if math.isfinite(target):
    if float(p.stats_epsilon_fraction) <= 0:
      raise ConfigError(f"privacy.stats_epsilon_fraction={float(p.stats_epsilon_fraction)} leaves the statistics "
                        f"pass none of privacy.target_epsilon={target}: set a share (e.g. 0.1), {off}")
  elif float(p.stats_noise_multiplier) <= 0:
    raise ConfigError(f"privacy.stats_noise_multiplier={float(p.stats_noise_multiplier)} with "
                      "privacy.noise_multiplier given: set the statistics' noise multiplier too (there is no "
                      f"privacy.target_epsilon to calibrate it from), {off}")


def statistics_mechanism(noise_multiplier: float, clip_norm: float, dataset_size: int, data: str = "") -> dict:
  """The ledger mechanism of a DP statistics pass: one Gaussian mechanism on the clipped sums (L2 sensitivity
  clip_norm under add-or-remove one example; noise std noise_multiplier x clip_norm), divided by the public N."""
  return dict(name=STATS_MECHANISM, kind="gaussian", data=data, count=1, noise_multiplier=float(noise_multiplier),
              clip_norm=float(clip_norm), sensitivity=float(clip_norm), dataset_size=int(dataset_size))


@dataclasses.dataclass(frozen=True)
class StatisticsPlan:
  """The DP statistics pass of a DP stage: what the pass needs (`clip_norm`, `noise_multiplier`, `dataset_size`,
  the public N the noisy sums are divided by) and what the ledger records."""
  clip_norm: float
  noise_multiplier: float
  dataset_size: int
  delta: float
  accountant: str
  epsilon: float  # the stage's: its DP-SGD and the statistics composed in one accountant
  statistics_epsilon: float  # the statistics' Gaussian mechanism alone
  dp_sgd_epsilon: float  # the stage's DP-SGD alone
  target_epsilon: float
  epsilon_fraction: float  # privacy.stats_epsilon_fraction (used when calibrated)
  calibrated: bool  # noise_multiplier calibrated so that the composition meets target_epsilon

  def mechanism(self, data: str = "") -> dict[str, Any]:
    return statistics_mechanism(self.noise_multiplier, self.clip_norm, self.dataset_size, data)


def plan_dp_statistics(privacy: ml_collections.ConfigDict, stage_ledger: dict[str, Any] | None, *,
                       dataset_size: int, data: str = "", where: str = "the stage") -> StatisticsPlan:
  """The DP statistics pass of a stage trained with DP-SGD (its ledger `stage_ledger`, privacy.json): options
  checked, the noise multiplier taken as given or calibrated so that the stage's DP-SGD and the statistics,
  composed in one accountant, meet privacy.target_epsilon; the epsilon of the composition. A stage with no DP-SGD
  in its ledger is refused (DP statistics of a non-DP model would protect nothing), as is another data set, delta
  or accountant than the ledger's (one composition: one data set, one delta, one accountant)."""
  check_statistics_options(privacy)
  fixed = [m for m in (stage_ledger or {}).get("mechanisms", ()) if m.get("name") != STATS_MECHANISM]
  sgd = next((m for m in fixed if m.get("name") == SGD_MECHANISM), None)
  if sgd is None:
    raise ConfigError(f"config.privacy is on, but {where} was not trained with DP-SGD (no {LEDGER_FILE} with a "
                      "DP-SGD mechanism): DP statistics of a non-DP model protect nothing; train the stage with "
                      "config.privacy, or turn config.privacy off for plain statistics")
  if int(sgd["dataset_size"]) != int(dataset_size) or (sgd.get("data") and data and sgd["data"] != data):
    raise ConfigError(f"config.data: statistics over {data!r} ({int(dataset_size)} examples), but {where} was "
                      f"trained with DP-SGD on {sgd.get('data')!r} ({int(sgd['dataset_size'])} examples): its ledger "
                      "composes the mechanisms of one data set")
  delta = float(privacy.delta) or 1.0 / int(dataset_size)
  if not math.isclose(delta, float(stage_ledger["delta"]), rel_tol=1e-12):
    raise ConfigError(f"privacy.delta={float(privacy.delta)}: the ledger of {where} is at delta="
                      f"{float(stage_ledger['delta'])!r}; its statistics compose with its DP-SGD at that delta")
  accountant = str(privacy.accountant)
  if accountant != str(stage_ledger["accountant"]):
    raise ConfigError(f"privacy.accountant={accountant!r}: the ledger of {where} used "
                      f"{stage_ledger['accountant']!r}; its statistics compose with its DP-SGD in that accountant")
  clip, target = float(privacy.stats_clip_norm), float(privacy.target_epsilon)
  fraction, sigma = float(privacy.stats_epsilon_fraction), float(privacy.stats_noise_multiplier)

  base = make_accountant(accountant)  # the stage's DP-SGD, composed once (a truncated Poisson PLD takes seconds)
  for m in fixed:
    e = event(m)
    if not base.supports(e):
      raise ConfigError(f"privacy.accountant={accountant!r} cannot account the mechanism {m['name']!r} ({e})")
    base.compose(e)
  sgd_eps = float(base.get_epsilon(delta))
  calibrated = sigma <= 0
  if calibrated:
    if sgd_eps > (1 - fraction) * target * (1 + 1e-9):
      raise ConfigError(f"privacy.stats_epsilon_fraction={fraction}: the DP-SGD of {where} alone spends epsilon "
                        f"{sgd_eps:.4g}, more than (1 - {fraction}) x privacy.target_epsilon={target}: it was trained "
                        "with another target or share, and its statistics cannot have theirs")

    def composed(s: float):
      acc = copy.deepcopy(base)
      acc.compose(event(statistics_mechanism(s, clip, dataset_size)))
      return acc

    # The stage's DP-SGD is composed once (`base`, copied for each sigma tried): dp-accounting's epsilons,
    # bisected here (calibrate_dp_mechanism wants an empty accountant, and would compose the DP-SGD each time).
    sigma = _calibrate(lambda s: float(composed(s).get_epsilon(delta)), None, None, target, delta,
                       "for the statistics (raise privacy.stats_epsilon_fraction)")
  mech = statistics_mechanism(sigma, clip, dataset_size, data)
  return StatisticsPlan(clip_norm=clip, noise_multiplier=float(sigma), dataset_size=int(dataset_size), delta=delta,
                        accountant=accountant, epsilon=epsilon(fixed + [mech], delta, accountant),
                        statistics_epsilon=epsilon([mech], delta, accountant), dp_sgd_epsilon=sgd_eps,
                        target_epsilon=target, epsilon_fraction=fraction, calibrated=calibrated)


def record_statistics(record: dict[str, Any], plan: StatisticsPlan | None, *, data: str = "",
                      **detail: Any) -> dict[str, Any]:
  """The stage's ledger `record` with its statistics pass. With `plan` (DP statistics): the mechanisms are the
  stage's DP-SGD and the statistics' Gaussian mechanism, `epsilon` their composition (DP-SGD's alone in
  `dp_sgd_epsilon`), `statistics: {dp: true, ...}`. Without (statistics computed without noise):
  `statistics: {dp: false}`, the epsilon DP-SGD's alone, which does not cover them. `detail` goes into
  `statistics`. A statistics mechanism of an earlier pass is replaced (its file is overwritten)."""
  out = dict(record)
  fixed = [m for m in record["mechanisms"] if m["name"] != STATS_MECHANISM]
  sgd_eps = float(record.get("dp_sgd_epsilon", record["epsilon"]))
  if plan is None:
    out.update(mechanisms=fixed, epsilon=sgd_eps, dp_sgd_epsilon=sgd_eps, covers=COVERS_SGD, statistics=dict(
        dp=False, **detail, note=("the feature statistics were computed on the stage's data without noise: they, "
                                  "and synthetic sets inverted from them, are not covered by this ledger's epsilon")))
    return out
  out.update(mechanisms=fixed + [plan.mechanism(data)], epsilon=plan.epsilon, dp_sgd_epsilon=plan.dp_sgd_epsilon,
             covers=COVERS_WITH_STATISTICS, statistics=dict(
                 dp=True, epsilon=plan.statistics_epsilon, delta=plan.delta, noise_multiplier=plan.noise_multiplier,
                 clip_norm=plan.clip_norm, dataset_size=plan.dataset_size, calibrated=plan.calibrated,
                 epsilon_fraction=plan.epsilon_fraction if plan.calibrated else None,
                 composed_epsilon=plan.epsilon, **detail))
  return out


def carry_statistics(record: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
  """A stage's new ledger `record` (its DP-SGD) keeping the statistics part of `previous` (the ledger an earlier
  run of the stage wrote) when that run planned the same DP-SGD: a finished stage started again keeps the record
  of the statistics it has released."""
  if not previous or "statistics" not in previous or previous.get("plan_key") != record.get("plan_key"):
    return record
  keep = ("epsilon", "mechanisms", "statistics", "covers", "dp_sgd_epsilon")
  return dict(record, **{k: previous[k] for k in keep if k in previous})


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


# --- What a guarantee allows an attack -----------------------------------------------------------------------


def tpr_bound(epsilon: float, delta: float, fpr: float) -> float:
  """The largest true-positive rate any membership-inference attack can reach at false-positive rate `fpr`
  against an (epsilon, delta)-DP mechanism:

      TPR <= min(1, e^eps * FPR + delta, 1 - e^-eps * (1 - delta - FPR))

  The hypothesis-testing view of DP (Kairouz, Oh & Viswanath 2015, "The composition theorem for differential
  privacy", Thm. 2.1; Wasserman & Zhou 2010; used to audit DP-SGD by Nasr et al. 2021, "Adversary
  instantiation: lower bounds for differentially private machine learning", Eq. 1): for neighbouring data sets
  D, D' (one example added or removed) every test of "D" against "D'" from the mechanism's output has
  FPR + e^eps * FNR >= 1 - delta and FNR + e^eps * FPR >= 1 - delta (FNR = 1 - TPR). The two lines are the
  form above. For the membership experiment it bounds the TPR and FPR expected over the training randomness
  when members and non-members are exchangeable (drawn at random from one pool, as the audit asks of its
  held-out split); a measured TPR at a finite sample size can exceed it by sampling error (read its CI).

  epsilon = inf (no DP) gives 1; epsilon = 0 gives FPR + delta. `fpr` must lie in [0, 1], `delta` in [0, 1],
  `epsilon` >= 0.
  """
  eps, delta, fpr = float(epsilon), float(delta), float(fpr)
  if not (eps >= 0 and 0.0 <= delta <= 1.0 and 0.0 <= fpr <= 1.0):
    raise ValueError(f"tpr_bound: expected epsilon >= 0, delta and fpr in [0, 1]; got {epsilon}, {delta}, {fpr}")
  if math.isinf(eps):
    return 1.0
  # e^eps * fpr may overflow for a large finite epsilon: the bound is then 1 (or the third line when fpr is 0).
  first = math.exp(eps) * fpr + delta if eps < 700 else (delta if fpr == 0 else math.inf)
  second = 1.0 - math.exp(-eps) * (1.0 - delta - fpr)
  return float(min(1.0, first, second))


def auc_bound(epsilon: float, delta: float) -> float:
  """The largest ROC AUC of any membership-inference attack against an (epsilon, delta)-DP mechanism: the area
  under `tpr_bound` (a concave ROC curve, itself reachable, so the area bounds every attack's AUC). In closed
  form, with f* = (1 - delta) / (e^eps + 1) where the two lines of `tpr_bound` cross and a = 1 - delta - f*:

      AUC <= e^eps f*^2 / 2 + delta f* + a - e^-eps a^2 / 2 + delta

  epsilon = 0, delta = 0 gives 0.5; epsilon = inf gives 1.
  """
  eps, delta = float(epsilon), float(delta)
  if not (eps >= 0 and 0.0 <= delta <= 1.0):
    raise ValueError(f"auc_bound: expected epsilon >= 0 and delta in [0, 1]; got {epsilon}, {delta}")
  if math.isinf(eps) or eps >= 700:
    return 1.0
  f_star = (1.0 - delta) / (math.exp(eps) + 1.0)
  a = 1.0 - delta - f_star
  area = math.exp(eps) * f_star ** 2 / 2 + delta * f_star + a - math.exp(-eps) * a ** 2 / 2 + delta
  return float(min(1.0, area))
