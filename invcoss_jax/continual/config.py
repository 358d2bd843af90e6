"""Defaults of `config.continual`: the modality sequence, the method and its buffer (paper Sec. 3.2, 4.1, B.1).

Every stage trains with `config.train` / `config.model` / `config.mesh`; only its data differs
(`datasets[<modality>]`, a full `config.data` section). See docs/continual.md.
"""

import ml_collections

from invcoss_jax.continual import methods
from invcoss_jax.data.config import data_config

# The methods and their groups, computed from the registry (continual/methods/) when first read: METHODS lists
# names without importing a method (reading a config imports no JAX); a group reads every method's declarations.
_GROUPS = {
    "REAL_BUFFER_METHODS": lambda m: m.replays == "real",  # keep real samples of every stage (er, medcoss)
    # Replay a set made from the model: invcoss its inverted set; noise (the control) the same generator's
    # output at initialisation, with everything else of invcoss, so that the two differ by what inversion adds.
    "SYNTHETIC_METHODS": lambda m: m.replays == "synthetic",
    "REPLAY_METHODS": lambda m: bool(m.replays),
    "TEACHER_METHODS": lambda m: m.teacher,  # distil to the frozen previous model
}


def __getattr__(name: str):
  if name == "METHODS":
    return methods.names()
  if name in _GROUPS:
    return methods.select(_GROUPS[name])
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


IMAGE_MODALITIES = ("xray", "ct", "mri", "path")
MODALITIES = ("report",) + IMAGE_MODALITIES
# Paper Sec. 4.1 / App. C: Report, X-ray, CT, MRI, pathology; Table 5's alternative order Path., MRI, Report,
# CT, X-ray. The image-only orders serve the embedded demo data (it has no reports) and the retention benchmark.
PAPER_ORDER = ("report", "xray", "ct", "mri", "path")
PAPER_ALTERNATIVE_ORDER = ("path", "mri", "report", "ct", "xray")
DEFAULT_ORDER = IMAGE_ORDER = ("xray", "ct", "mri", "path")
ALTERNATIVE_ORDER = IMAGE_ALTERNATIVE_ORDER = ("path", "mri", "ct", "xray")


def _dataset(name: str, modality: str) -> ml_collections.ConfigDict:
  d = data_config()
  d.name = name
  d.modality = modality
  return d


def _report_dataset() -> ml_collections.ConfigDict:
  """The report stage's texts: the Indiana reports' name (no embedded copy; data.path must point at them)."""
  d = _dataset("indiana_reports", "report")
  d.format = "text"
  return d


def continual_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "invcoss"  # a registered method (continual/methods/): invcoss | seqssl | er | medcoss | ewc | cassle |
  # packnet | joint | noise (the control)
  c.order = DEFAULT_ORDER  # one stage per entry, each a key of `datasets`
  # Steps of each stage of `order` (same length); () or an entry <= 0: config.total_steps. Joint trains the sum.
  c.stage_steps = ()
  # The data section of each modality's stage (a full config.data; configs/continual.py sets the paper corpora).
  c.datasets = ml_collections.ConfigDict({m: _dataset(f"demo_{m}", m) for m in IMAGE_MODALITIES})
  c.datasets.report = _report_dataset()

  # --- Buffer: what stage T replays of stages 1..T-1 (er, medcoss: real samples; invcoss: synthetic) ---
  c.buffer_fraction = 0.05  # of each earlier stage's examples: 0.01 / 0.05 / 0.10 (paper Fig. 7)
  # Buffer samples per current sample in every step. < 0: N_buffer / N_current, the proportion in which
  # MedCoSS's sampler mixes buffer and current batches over an epoch (clipped to [1 per batch shard, 1x]).
  c.buffer_batch_ratio = -1.0
  c.buffer_split = "proportional"  # buffer samples of a step across earlier stages: proportional (to size) | equal
  c.distill_weight = 1.0  # weight of L_reg (Eq. 4): feature distillation of buffer samples to the frozen model
  c.distill_mask_ratio = 0.75  # teacher and student encode a buffer sample under the same mask (MedCoSS)
  c.buffer_mae_weight = 0.0  # > 0 also trains the MAE loss on image buffer samples (MedCoSS: 0; never on text)
  # The stage's own crop/flip (2D) or mirroring (3D) on buffer samples, as MedCoSS's buffer, which re-reads its
  # samples through the stage's dataset transform; False feeds them as stored.
  c.buffer_augment = False
  # Weight of L_reg: 'per_step' = distill_weight x the buffer sub-batch's mean (every step's buffer term weighs as
  # much as its current term, so a buffer sample weighs N_cur/N_buf times more than a current one when the
  # ratio below is N_buf/N_cur); 'per_sample' = scaled by B_buf/B, every buffer sample weighs as much as a current
  # one, as in MedCoSS's alternating homogeneous batches.
  c.distill_scale = "per_step"
  # Intra-modal mixup of buffer samples (MedCoSS): lam ~ U(0, 1) per sample, partner from the same stage; text
  # mixes token-wise (each id and attention bit from the sample with probability lam, else from the partner).
  c.mixup = True
  c.reinit_decoder = True  # re-initialise the MAE decoder at every stage (MedCoSS); the trunk is always carried
  # invcoss: 'own' synthesises stage t's set once, at its end, from f_t and its statistics (Sec. 3.2: "reconstructed
  # exclusively from the pre-trained model of task t"); 'latest' re-synthesises every earlier stage's set at the
  # start of stage T from f_{T-1} and the stored statistics (Algorithm 1, lines 1-9).
  c.invert_with = "own"
  c.synthesize_last_stage = True  # 'own': also invert the last stage (its set serves a later extension, the audit)

  # --- Privacy and storage ---
  # Once a stage ends, its training data can no longer be read in this process (config check + file audit hook).
  c.data_free_guard = True
  c.statistics_after_stage = True  # every stage ends with its statistics pass (needed by invcoss, logged by all)

  # --- medcoss: k-means buffer (main_buffer_kmean.py) ---
  c.kmeans = ml_collections.ConfigDict()
  c.kmeans.cluster_fraction = 0.01  # clusters = int(N * 0.01) (at least 1)
  # Encoder feature at mask ratio 0: 'all_tokens' (mean over every token, CLS included: MedCoSS) | 'mean' | 'cls'.
  c.kmeans.feature = "all_tokens"
  c.kmeans.batch_size = 128  # feature-extraction batch
  c.kmeans.n_init = 1  # sklearn KMeans n_init (MedCoSS uses sklearn's default)
  c.kmeans.max_iter = 300

  # --- ewc: online EWC on the encoder side (Kirkpatrick et al. 2017) ---
  c.ewc = ml_collections.ConfigDict()
  c.ewc.weight = 100.0  # lambda of lambda/2 * sum F (theta - theta*)^2; no published value for MAE pre-training
  c.ewc.gamma = 1.0  # online EWC: F <- gamma F_old + F_new
  c.ewc.fisher_num_examples = 256  # examples of the stage in the empirical Fisher; <= 0: all
  c.ewc.fisher_batch_size = 8  # per-example gradients computed together (vmap)

  # --- cassle: predictor-based distillation on current data (Fini et al. 2022) ---
  c.cassle = ml_collections.ConfigDict()
  c.cassle.weight = 1.0
  c.cassle.hidden_dim = 2048  # predictor Linear(D -> hidden) - LayerNorm - ReLU - Linear(-> D)

  # --- packnet: per-stage pruning masks (Mallya & Lazebnik 2018) ---
  c.packnet = ml_collections.ConfigDict()
  c.packnet.prune_fraction = 0.5  # of the weights free at a stage, this fraction is released for later stages
  c.packnet.retrain_fraction = 0.1  # extra steps after pruning, as a fraction of the stage's steps

  # --- joint: all modalities in every step (the upper bound, one stage) ---
  c.joint_split = "proportional"  # the global batch across modalities: proportional (to size) | equal
  return c
