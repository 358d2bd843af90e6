"""Defaults of `config.audit`: the privacy audit of a stage's synthetic data (docs/privacy_audit.md).

The stage to audit is `config.init_from` (its workdir: checkpoint, config.json, synthetic/). Every data
section the audit reads starts from the stage's own `config.data` (so images have the shape and range the
model was trained on); the `*_data` sections below override its fields, and an empty string keeps the
stage's value.
"""

import ml_collections


def _data_overrides(split: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = ""  # '' = the stage's registered dataset
  c.format = ""
  c.path = ""
  c.split = split
  return c


def audit_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # --- What is compared ---
  c.train_data = _data_overrides("train")  # the split the stage was trained on (the members)
  c.heldout_data = _data_overrides("val")  # real images of the same modality the stage never saw
  # Synthetic set: a folder of npz shards (key `images`, as `invert` writes them); '' = <init_from>/synthetic.
  c.synthetic_path = ""
  # Real replay buffer (the reference "what leaking looks like"): a folder of npz shards, or '' to draw the
  # buffer of method `er` here: a uniformly random config.continual.buffer_fraction of the training split
  # (seed `seed`), as the continual job keeps it.
  c.buffer_path = ""
  c.draw_buffer = True  # False: without buffer_path, no replay-buffer audit

  # --- Sizes: each set in memory is capped (a random subset with seed `seed`); <= 0 keeps all ---
  c.max_synthetic = 2048
  c.max_buffer = 2048
  c.max_heldout = 2048  # held-out queries (the memorisation threshold and the MIA non-members)
  c.max_members = 2048  # training images scored by the membership-inference attack
  c.batch_size = 64  # model forward passes and data reading
  c.seed = 0

  # --- Nearest neighbours ---
  c.feature = "mean"  # encoder feature: 'mean' patch token (the L_rep / MedCoSS buffer feature) | 'cls'
  c.normalize_features = True  # L2-normalise features (the distance is then monotone in cosine similarity)
  c.query_chunk = 256  # rows of a query block of the distance computation
  c.ref_chunk = 1024  # rows of a reference block
  c.max_block_elements = 2**24  # a block holds at most this many values (memory bound whatever the image size)
  c.memorisation_quantile = 0.05  # q: the threshold is the q-quantile of held-out-to-training distances

  # --- Membership inference ---
  c.mia_mask_ratio = -1.0  # MAE masking ratio of the per-sample loss; < 0 = the stage's train.mask_ratio
  c.mia_num_masks = 4  # random masks per image; the score is minus the mean loss over them
  c.tpr_at_fpr = (0.01, 0.1)  # also report the attack's TPR at these false-positive rates

  # --- Bootstrap confidence intervals (MIA AUC, memorisation rates) ---
  c.num_bootstrap = 1000
  c.ci_level = 0.95

  # --- High-frequency energy ---
  c.hf_cutoff = 0.5  # normalised radius (1 = Nyquist along an axis): detail finer than 4 pixels
  c.spectrum_bins = 32  # radial bins of the spectrum figure

  # --- Independent judges of the synthetic set (invcoss_jax/retention/judges.py; 2D, volumes by their
  # central slice): the synthetic set, the replay buffer, a training sample (real vs real) and smoothed noise,
  # each against the same n held-out images, n = min(set sizes, held-out count, max_images) ---
  c.judges = ml_collections.ConfigDict()
  c.judges.enabled = True
  c.judges.folds = 5  # stratified folds of the classifier two-sample tests
  c.judges.cnn_steps = 300  # Adam steps per fold of the CNN two-sample test; 0 skips it
  c.judges.judge_net_steps = 1000  # steps of the supervised judge net (KID, PRDC); 0 skips it (as no labels do)
  c.judges.judge_net_max_train = 20000  # its training images: a uniform random sample of the training split
  c.judges.judge_net_max_values = 2**28  # ... and at most this many grey pixels of them in memory (8 B each)
  c.judges.noise_sigma = 1.5  # blur (pixels) of the smoothed-noise anchor
  c.judges.max_images = 512  # cap of n; <= 0 = no cap

  # --- Figures ---
  c.num_pairs = 8  # closest (query, training image) pairs shown per set and space
  c.thumbnail_size = 96  # longest side of the stored nearest-neighbour images (memory bound for the figure)
  return c
