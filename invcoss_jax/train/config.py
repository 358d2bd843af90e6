"""Defaults of `config.train`, `config.checkpoint` and `config.logging`."""

import ml_collections


def train_config() -> ml_collections.ConfigDict:
  """The paper's pre-training hyper-parameters (Sec. 4.1, App. C; MAE's recipe), written only here: presets
  (configs/*.py, defaults.use_demo_data) override what differs."""
  c = ml_collections.ConfigDict()
  c.global_batch_size = 512  # effective batch per optimiser update (all devices, all accumulation steps)
  c.num_epochs = 300
  c.warmup_epochs = 40
  # -1 derives the epoch length from the data (num_examples // global_batch_size).
  c.steps_per_epoch = -1
  c.base_lr = 1.5e-4  # scaled by global_batch_size / 256
  c.min_lr = 0.0  # the cosine decays to this
  c.weight_decay = 0.05
  c.b1 = 0.9
  c.b2 = 0.95
  c.eps = 1e-8
  c.grad_clip_norm = 0.0  # > 0 clips the global gradient norm (MedCoSS does not clip)
  c.grad_accum_steps = 1  # > 1: optax.MultiSteps over micro-batches of global_batch_size / k
  # Train steps per dispatch: k > 1 runs blocks of k steps as one compiled lax.scan (train.core.jit_block),
  # logs, checkpoints and hooks at block boundaries (steps around them one by one); 1 is the one-step loop.
  # Pays where per-step host work is a large share of a small model's step; changes no batch or step.
  c.steps_per_dispatch = 1
  c.mask_ratio = 0.75
  c.mlm_probability = 0.15  # report stage: tokens predicted per example, whole words at a time (MedCoSS, BERT)
  # Parameters whose '/'-joined path matches one of these regexes get no weight decay, nor does
  # any parameter of rank <= 1 (biases, norm scales).
  c.no_decay_patterns = ("cls_token", "pos_embed", "mask_token")
  # A finished pre-training run ends with the stage's statistics pass (the `pretrain` job calls jobs.inversion.run_stats).
  c.stats_after_pretrain = True
  return c


# Step counts in `checkpoint` and `logging` are train steps: micro-batches when grad_accum_steps > 1
# (config.total_steps counts optimiser updates).


def checkpoint_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.every_steps = 1000
  c.max_to_keep = 3
  c.async_save = True
  return c


def logging_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.log_every_steps = 50
  c.image_every_steps = 1000  # <= 0 disables the reconstruction images
  c.num_images = 8  # examples in each reconstruction grid
  return c
