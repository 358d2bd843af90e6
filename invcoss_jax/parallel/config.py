"""Defaults of `config.mesh`."""

import ml_collections


def mesh_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Axis names and sizes; -1 takes the remaining devices. ('data', -1) is pure data parallelism;
  # [('data', -1), ('fsdp', 4)] also shards parameters and optimiser state over 'fsdp'.
  c.axes = [("data", -1)]
  c.num_devices = -1  # > 0 uses only the first N devices (debugging, device-count comparisons)
  c.shard_params = False  # shard parameters over the 'fsdp' axis (when present)
  # Parameters (and their optimiser moments) with fewer elements than this stay replicated under
  # fsdp: biases and norms are cheap to replicate and expensive to gather one by one.
  c.fsdp_min_size = 2**14
  return c
