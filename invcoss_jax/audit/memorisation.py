"""The memorisation rate of a sample set against a model's training split.

Definition (docs/privacy_audit.md). Let `d(x)` be the distance from `x` to its nearest training image. The
threshold `tau_q` is the `q`-quantile of `d(h)` over a held-out split `H` of the same modality: only a
fraction `q` of unseen real images lie that close to a training image. The memorisation rate of a set `S` is

    rate(S) = |{s in S : d(s) < tau_q}| / |S|.

A set drawn like the held-out images has rate ~ q (the base rate); a set holding copies of training images
has rate 1. The ratio rate / q says how many times more often `S` lands "too close" than unseen real data.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def memorisation_threshold(heldout_distances: np.ndarray, quantile: float) -> float:
  """`tau_q`: the `quantile` of the held-out-to-training nearest distances (linear interpolation)."""
  d = _distances(heldout_distances, "heldout_distances")
  if not 0.0 < quantile < 1.0:
    raise ValueError(f"config.audit.memorisation_quantile must be in (0, 1), got {quantile}")
  return float(np.quantile(d, quantile))


def memorisation_rate(query_distances: np.ndarray, heldout_distances: np.ndarray, quantile: float) -> float:
  """Fraction of queries whose nearest training distance is below `tau_q` (strictly)."""
  d = _distances(query_distances, "query_distances")
  return float(np.mean(d < memorisation_threshold(heldout_distances, quantile)))


def bootstrap_memorisation(query_distances: np.ndarray, heldout_distances: np.ndarray, quantile: float, *,
                           num_bootstrap: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
  """The rate and its confidence interval.

  Two intervals at `level`, and their union as `ci` (conservative):
  - `ci_bootstrap`: percentile bootstrap resampling both the queries and the held-out distances (the
    threshold is itself an estimate);
  - `ci_exact`: Clopper-Pearson for the count of queries below the threshold, which the bootstrap cannot
    give at the edges (no query below the threshold resamples to [0, 0]; the exact upper bound of 0 in n is
    1 - ((1 - level) / 2)^(1/n), about 3.7 / n at 95 %).
  Returns dict(rate, threshold, base_rate, count, ci, ci_bootstrap, ci_exact, level, num_bootstrap).
  """
  q = _distances(query_distances, "query_distances")
  h = _distances(heldout_distances, "heldout_distances")
  _check_bootstrap(num_bootstrap, level)
  rate = memorisation_rate(q, h, quantile)
  rng = np.random.default_rng(seed)
  rates = np.empty((num_bootstrap,), np.float64)
  for b in range(num_bootstrap):
    tau = np.quantile(h[rng.integers(0, h.size, h.size)], quantile)
    rates[b] = np.mean(q[rng.integers(0, q.size, q.size)] < tau)
  lo, hi = np.quantile(rates, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
  count = int(round(rate * q.size))
  exact = stats.binomtest(count, q.size).proportion_ci(confidence_level=level, method="exact")
  return dict(rate=rate, threshold=memorisation_threshold(h, quantile), base_rate=float(quantile), count=count,
              ci=[float(min(lo, exact.low)), float(max(hi, exact.high))], ci_bootstrap=[float(lo), float(hi)],
              ci_exact=[float(exact.low), float(exact.high)], level=float(level), num_bootstrap=int(num_bootstrap))


def _distances(d: np.ndarray, name: str) -> np.ndarray:
  d = np.asarray(d, np.float64).reshape(-1)
  if d.size == 0:
    raise ValueError(f"{name} is empty: the memorisation rate needs at least one distance")
  if not np.all(np.isfinite(d)):
    raise ValueError(f"{name} holds {int(np.sum(~np.isfinite(d)))} non-finite distances (a query that was "
                     f"never compared with any training image?)")
  return d


def _check_bootstrap(num_bootstrap: int, level: float) -> None:
  if num_bootstrap < 1:
    raise ValueError(f"config.audit.num_bootstrap must be >= 1, got {num_bootstrap}")
  if not 0.0 < level < 1.0:
    raise ValueError(f"config.audit.ci_level must be in (0, 1), got {level}")
