"""Defaults of `config.train`, `config.checkpoint` and `config.logging`."""

import ml_collections


def train_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.global_batch_size = 512
  c.num_epochs = 300
  c.warmup_epochs = 40
  c.base_lr = 1.5e-4  # scaled by global_batch_size / 256
  c.min_lr = 0.0
  c.weight_decay = 0.05
  c.b1 = 0.9
  c.b2 = 0.95
  c.grad_accum_steps = 1
  c.mask_ratio = 0.75
  return c


def checkpoint_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.every_steps = 1000
  c.max_to_keep = 3
  return c


def logging_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.log_every_steps = 50
  c.image_every_steps = 1000
  return c
