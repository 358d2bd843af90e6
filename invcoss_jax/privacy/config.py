"""Defaults of `config.privacy`: differentially private training of a stage (docs/privacy.md).

Off by default (`target_epsilon = inf` and `noise_multiplier = 0`): training is then today's, bit for bit.
On, every train step of the stage is DP-SGD (per-example gradients clipped to L2 norm `clip_norm`, Gaussian
noise of standard deviation noise_multiplier x clip_norm on their sum) on Poisson-sampled batches of expected
size `train.global_batch_size`, and the stage's `privacy.json` records its (epsilon, delta).
"""

import ml_collections

ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("poisson",)


def privacy_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # The (epsilon, delta) the stage's training must meet; inf = no differential privacy (today's training).
  # A finite value calibrates noise_multiplier (when it is 0) with the accountant before training.
  c.target_epsilon = float("inf")
  c.delta = 0.0  # 0 = 1 / N, N the examples of the stage's data
  c.clip_norm = 1.0  # L2 bound C of each example's gradient
  # > 0: the noise multiplier sigma used as given (the ledger reports the epsilon it reaches); 0 = calibrated
  # from target_epsilon. Set one of the two.
  c.noise_multiplier = 0.0
  c.accountant = "pld"  # 'pld' (privacy loss distributions) | 'rdp' (Renyi DP), both dp-accounting's
  # How each step's examples are drawn: 'poisson' (each example independently with probability
  # q = train.global_batch_size / N; the accounting of Poisson-subsampled Gaussian steps). The loaders'
  # shuffled fixed-size batches are not offered: no accountant bounds them as tightly as it assumes.
  c.sampling = "poisson"
  # Examples one step holds (the padded shape the step is compiled for); 0 = the expected batch plus four
  # standard deviations, rounded up to a multiple of the batch shards and microbatch_size. A draw above it is
  # truncated to a uniformly random subset, which the 'pld' accountant accounts exactly
  # (TruncatedSubsampledGaussianDpEvent); 'rdp' needs a size no draw can exceed (>= N).
  c.max_batch_size = 0
  # Examples whose gradients are computed at once (vmap) before clipping; the physical batch is processed in
  # chunks of this size one after the other (chunks holding padding alone are skipped), so memory stays bounded.
  # 0 = about a quarter of the expected batch (privacy.accounting.auto_microbatch_size).
  c.microbatch_size = 0
  # A DP continual run refuses methods that store real examples (er, medcoss, the report stage's k-means text
  # buffer): they are not DP. True runs them anyway and the ledger says the stage is not DP.
  c.allow_real_buffers = False
  # DP feature statistics (the stage's statistics pass with privacy on; inversion/statistics.py
  # compute_dp_statistics): each example's contribution (its block tokens and their squares, and its pixels,
  # their squares and its total variation with inversion.pixel_statistics), as one vector, is clipped to this
  # L2 norm; the sums get Gaussian noise of std stats_noise_multiplier x stats_clip_norm. 0 = not set: a DP
  # statistics pass refuses to run. No number fits every model: the norm grows with the square root of
  # blocks x tokens x width and with the features' scale (a median of about 540 for the demo micro ViT at 32x32
  # at initialisation), too small clips every example (biasing the statistics towards 0), too large drowns them
  # in noise, and choosing it from the private data costs privacy.
  # Measure it on public images (statistics.contribution_norms; docs/privacy.md).
  c.stats_clip_norm = 0.0
  # > 0: the statistics' noise multiplier as given (with privacy.noise_multiplier); 0 = calibrated from
  # privacy.target_epsilon: the stage's DP-SGD is calibrated alone to (1 - stats_epsilon_fraction) x
  # target_epsilon, the statistics' sigma so that both composed meet target_epsilon.
  c.stats_noise_multiplier = 0.0
  c.stats_epsilon_fraction = 0.1
  return c


def enabled(privacy: ml_collections.ConfigDict | None) -> bool:
  """Whether `privacy` (a `config.privacy` section, or None) asks for differentially private training."""
  if privacy is None:
    return False
  return float(privacy.target_epsilon) != float("inf") or float(privacy.noise_multiplier) > 0
