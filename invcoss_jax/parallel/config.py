"""Defaults of `config.mesh` and `config.compile` (ahead-of-time planning on meshes)."""

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
  # (regex, 'replicated' | 'fsdp') rules over leaf paths, first match wins, before the shard_params default:
  # e.g. (('teacher/.*', 'replicated'),) keeps the frozen teacher whole on every device while the train state
  # is sharded. Trees are named 'params/...' / 'opt_state/...' (train states), 'teacher', 'ewc_anchor',
  # 'ewc_fisher', 'trainable' (continual constants), 'generator' (inversion) and 'teacher' for the frozen
  # model inversion reads too.
  c.sharding_rules = ()
  return c


PROGRAMS = ("pretrain", "invert_2d", "invert_3d")  # what `mode=compile` can plan


def compile_config() -> ml_collections.ConfigDict:
  """Defaults of `config.compile`."""
  c = ml_collections.ConfigDict()
  c.num_devices = (1, 8)  # compile for each of these device counts (global batches stay the same)
  c.programs = PROGRAMS  # any of 'pretrain', 'invert_2d', 'invert_3d'
  c.variants = ()  # () = config.model as it is; else names of VARIANTS, e.g. ('f32', 'bf16+remat')
  # Per-example shapes. pretrain: () = the shape config.data gives (224x224x3 for the X-ray stage).
  c.pretrain_image_shape = ()
  c.invert_image_shape_2d = (224, 224, 3)
  c.invert_image_shape_3d = (16, 192, 192, 1)
  # Size of L_rep's persistent feature pool when config.inversion.pool_size and num_samples are unset
  # (the paper: as many features as synthetic samples, a 5 % buffer of the stage's data).
  c.pool_size = 16384
  c.device_memory_gib = 80.0  # the budget the `fits` column compares the per-device peak with
  # '' compiles for this host's backend (on CPU with simulated devices). A Cloud TPU topology such as
  # 'v5p:2x2x2' compiles deviceless for that TPU: XLA's TPU compiler and memory plan, no TPU needed, only the
  # libtpu package (pip install 'jax[tpu]').
  c.target = ""
  return c
