"""Defaults of `config.inversion` (paper Sec. 3.3-3.5, App. B, C), and its frozen, typed spec.

`inversion_spec(config.inversion)` is the one reading of the section: an `InversionSpec` whose `program` part
(`ProgramSpec`) holds every option the compiled inversion program depends on (the generator, the optimiser, the
objective: the traced code reads only these, and they are the compile cache's key) and whose `host` part
(`HostSpec`) holds the options only the host loop reads (schedules, sizes, files, logging). Every key of
`config.inversion` is a field of exactly one part, so a new option says on which side it is; a key that is
neither is refused, naming it, unless a registered loss term declares it as its own option
(`register_loss_term(name, options=(...))`, docs/extending_losses.md), which makes it a program field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from invcoss_jax.config_checks import ConfigError


def _schedule(*, batch_size: int, steps: int, init_steps: int, latent_dim: int,
              reinit_every: int) -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.batch_size = batch_size  # synthetic images optimised together (their statistics are matched jointly)
  s.steps = steps  # optimisation steps of a batch whose generator was carried over from the previous batch
  s.init_steps = init_steps  # steps of a batch that starts from a freshly initialised generator
  s.latent_dim = latent_dim  # size of each latent vector z
  s.reinit_every = reinit_every  # re-initialise the generator every this many batches (1 = every batch)
  return s


def inversion_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # --- Feature statistics of a trained stage (App. B.2) ---
  c.stats_batch_size = 64  # batch size of the statistics pass (the result does not depend on it)
  c.stats_file = "statistics.npz"  # inside the stage workdir
  c.buffer_fractions = (0.01, 0.05, 0.10)  # real replay-buffer sizes the statistics' size is compared with
  # Also keep input-space statistics (per-pixel mean and variance, the mean total variation; a few KB), which
  # the opt-in priors `pixel` and `tv_target` below match. Beyond the paper; counted in the storage log.
  c.pixel_statistics = False
  # With pixel_statistics, also keep the K leading principal components of the grey images (channel mean),
  # average-pooled to at most pixel_components_grid pixels per side (0 = none; K x D + D float32 values, e.g.
  # 132 KB at K = 32 on a 32x32 grid), which the opt-in prior `pixel_pca` matches. Beyond the paper.
  c.pixel_components = 0
  c.pixel_components_grid = 32
  c.pixel_pca_full = 32  # leading components fitted with their full covariance (the rest one by one); < batch
  c.pixel_pca_residual_weight = 30.0  # weight of the energy outside the subspace within loss_weights.pixel_pca

  # --- What to synthesise ---
  # Number of synthetic samples; <= 0 derives it from config.continual.buffer_fraction of the stage's dataset
  # size (the paper generates as many synthetic samples as a 5 % replay buffer holds).
  c.num_samples = -1
  c.shard_size = 256  # samples per npz shard under workdir/synthetic/

  # --- Generator (App. B.3, Table 4; Table 3 baselines) ---
  c.generator = "invunet"  # invunet | cmi | cmi_large | none (direct optimisation of the image tensor)
  c.invunet = ml_collections.ConfigDict()
  c.invunet.channels = (16, 32, 64, 128, 256)  # full resolution ... bottleneck
  # How an inversion-branch level joins the memory-cache feature of the same resolution: 'add' gives the
  # paper's 7.7M parameters at 224x224 (7.65M); 'concat' (U-Net style) gives 7.85M.
  c.invunet.skip = "add"
  c.invunet.activation = "leaky_relu"  # leaky_relu (slope 0.2) | relu | gelu | silu
  c.cmi = ml_collections.ConfigDict()
  # CMI's generator (zju-vipa/CMI datafree/models/generator.py): Linear(z -> 2*ngf x (S/4)^2), BN, 2x
  # (upsample, conv3, BN, LeakyReLU), conv3, output activation. ngf picks the size: with 128-d latents at
  # 224x224, ngf 13 -> 10.5M ('cmi', the paper's 10.6M) and ngf 32 -> 25.9M ('cmi_large').
  c.cmi.ngf = 13
  c.cmi.ngf_large = 32
  c.cmi.num_upsamples = 2
  # Grey prior: 'yes' generates one channel and repeats it over the image's channels; 'auto' does so for the
  # modalities stored grey and fed as 3 equal channels (X-ray), 'no' generates every channel (the paper).
  c.grey = "auto"
  # Output activation: 'auto' = sigmoid for 2D ([0, 1], X-ray/pathology) and tanh for 3D ([-1, 1]), as in
  # App. B.3; or 'sigmoid' | 'tanh' | 'identity' (e.g. z-scored MRI).
  c.output_activation = "auto"

  # --- Optimisation (App. C) ---
  c.lr_generator = 2e-4
  c.lr_latents = 0.05  # also the learning rate of the pixels when generator = 'none'
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.schedule_2d = _schedule(batch_size=320, steps=1000, init_steps=1000, latent_dim=128, reinit_every=1)
  c.schedule_3d = _schedule(batch_size=48, steps=500, init_steps=2000, latent_dim=512, reinit_every=10)
  # How the inner loop of a batch is compiled: 'compiled' = the whole loop in one program (lax.fori_loop);
  # 'stepwise' = one compiled step per call; 'auto' = stepwise on CPU (XLA:CPU runs weight-gradient
  # convolutions inside compiled loops 10-30x slower), compiled on GPU/TPU.
  c.inner_loop = "auto"
  c.max_retries = 3  # a batch whose loss turns non-finite is regenerated with a new seed this many times

  # --- Objective (Eq. 6): sum(loss_weights[name] * term[name]); weight 0 switches a term off ---
  c.loss_weights = ml_collections.ConfigDict()
  c.loss_weights.task = 1.0  # L_task, Eq. 7
  c.loss_weights.norm = 1.0  # alpha_norm, L_norm, Eq. 3
  c.loss_weights.img = 0.1  # alpha_img, L_img, Eq. 8
  c.loss_weights.rep = 0.1  # alpha_rep, L_rep, Eq. 5
  # Priors beyond the paper, off by default (docs/continual.md); both need pixel_statistics = True:
  c.loss_weights.pixel = 0.0  # batch moments of the pixels vs the stored per-pixel mean and variance
  c.loss_weights.tv_target = 0.0  # |TV - the real images' TV| (PSAQ-ViT), instead of L_img's minimisation
  # Gaussian KL of the batch in the stored principal subspace of the grey images (needs pixel_components > 0)
  c.loss_weights.pixel_pca = 0.0
  # Opt-in, beyond the paper (DeepInversion's and PSAQ-ViT's jitter): each inner step the frozen model sees the
  # batch rolled by one random offset in [-jitter, jitter] pixels per spatial axis (0 = off), so no pattern tied
  # to the patch grid can satisfy the model-facing terms; the pixel-space terms (img, pixel, tv_target) read the
  # generated images themselves. Offsets that are not multiples of the patch size shift content across patches.
  c.jitter = 0
  c.task_mask_ratio = 0.75  # MAE masking ratio of L_task (the pre-training ratio)
  # L_img reduction: 'mean' = sum over axes of the mean absolute neighbour difference (scale-free, so
  # alpha_img = 0.1 is meaningful at any resolution); 'sum' = Eq. 8 literally (sum per image, batch mean).
  c.img_reduction = "mean"
  # L_rep feature: 'mean' patch token of the encoder output (as MedCoSS's buffer) | 'cls' | 'centered_mean'
  # (last block's mean patch token minus its real-data mean, taken from the statistics; see context.py).
  c.rep_feature = "mean"
  c.pool_size = -1  # persistent feature pool size; <= 0: the number of synthetic samples (Sec. 3.4)

  # --- Logging ---
  c.log_every_steps = 10  # loss terms written to TensorBoard every this many inner steps
  c.grid_size = 16  # images in the PNG grid
  return c


def use_cpu_demo_schedule(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.inversion` sized for the CPU demos and benchmarks (32x32 images, 16x32x32 volumes, a micro ViT):
  a small InvUNet and short schedules (batches of 16 images / 4 volumes, 30 steps from a fresh generator)."""
  c.invunet.channels = (8, 16, 32)
  c.schedule_2d.batch_size = 16
  c.schedule_2d.steps = 20
  c.schedule_2d.init_steps = 30
  c.schedule_3d.batch_size = 4
  c.schedule_3d.steps = 20
  c.schedule_3d.init_steps = 30
  c.schedule_3d.latent_dim = 64
  c.grid_size = 16
  return c


def use_realism_priors(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.inversion` with the opt-in priors beyond the paper that moved the CPU benchmark's synthetic X-rays
  from texture towards X-rays (docs/results.md, 'Inversion that produces data'): input-space statistics kept by
  the statistics pass and matched (pixel moments x10, total variation pulled to the real images' x30 instead of
  L_img's minimisation), and a generator learning rate of 3e-3: at the paper's 2e-4 a few hundred steps cannot
  move the randomly initialised InvUNet away from its own high-frequency texture (its TV stays at 0.12 whatever
  the TV term's weight; the real X-rays' is 0.067). The schedule is the caller's (the benchmark: 64 x 200)."""
  c.pixel_statistics = True
  c.loss_weights.pixel = 10.0
  c.loss_weights.tv_target = 30.0
  c.loss_weights.img = 0.0
  c.lr_generator = 3e-3
  return c


def use_subspace_prior(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.inversion` with the principal-subspace prior beyond the paper (docs/continual.md): the statistics
  pass keeps the 32 leading principal components of the grey images, and the batch's whitened coordinates
  there are matched to N(0, I) (x10), its energy outside them to the real images' (x30 within the term). On the
  CPU benchmark's X-rays the realism priors alone left 0.2-0.7x the real variance along the leading components
  and 3x the real energy outside the first 32 (docs/results.md). Add to `use_realism_priors`."""
  c.pixel_statistics = True
  c.pixel_components = 32
  c.loss_weights.pixel_pca = 10.0
  return c


# ----------------------------------------------------------------------------------------------------------
# The spec.


@dataclasses.dataclass(frozen=True)
class Schedule:
  """config.inversion.schedule_2d / schedule_3d."""
  batch_size: int
  steps: int
  init_steps: int
  latent_dim: int
  reinit_every: int


@dataclasses.dataclass(frozen=True)
class InvUNetOptions:
  """config.inversion.invunet."""
  channels: tuple[int, ...]
  skip: str
  activation: str


@dataclasses.dataclass(frozen=True)
class CMIOptions:
  """config.inversion.cmi."""
  ngf: int
  ngf_large: int
  num_upsamples: int


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
  """The options of config.inversion the compiled program depends on: the generator, the optimiser and the
  objective. It is the compile cache's key (hashable), and the only options the traced code sees (loss terms
  receive it as their second argument). `term_options`: the options registered loss terms declared, read as
  attributes (`spec.pixel_mean`) or with `get`."""
  generator: str
  invunet: InvUNetOptions
  cmi: CMIOptions
  grey: str
  output_activation: str
  lr_generator: float
  lr_latents: float
  adam_b1: float
  adam_b2: float
  loss_weights: tuple[tuple[str, float], ...]  # (name, weight), sorted by name
  jitter: int
  task_mask_ratio: float
  img_reduction: str
  rep_feature: str
  pixel_components_grid: int
  pixel_pca_full: int
  pixel_pca_residual_weight: float
  term_options: tuple[tuple[str, Any], ...] = ()

  def __getattr__(self, name: str) -> Any:  # only called for names that are not fields: the term options
    for key, value in object.__getattribute__(self, "term_options"):
      if key == name:
        return value
    raise AttributeError(f"config.inversion.{name} is not an option of the inversion program (a loss term's own "
                         "option is declared with register_loss_term(name, options=(...)))")

  def get(self, name: str, default: Any = None) -> Any:
    """An option by name (a field or a declared term option), or `default`."""
    try:
      return getattr(self, name)
    except AttributeError:
      return default


@dataclasses.dataclass(frozen=True)
class HostSpec:
  """The options of config.inversion only the host loop reads: changing them compiles nothing new."""
  stats_batch_size: int
  stats_file: str
  buffer_fractions: tuple[float, ...]
  pixel_statistics: bool
  pixel_components: int
  num_samples: int
  shard_size: int
  schedule_2d: Schedule
  schedule_3d: Schedule
  inner_loop: str
  max_retries: int
  pool_size: int
  log_every_steps: int
  grid_size: int


@dataclasses.dataclass(frozen=True)
class InversionSpec:
  """config.inversion, read once: `program` (the compiled program's options) and `host` (the host loop's)."""
  program: ProgramSpec
  host: HostSpec


_NESTED = {"invunet": InvUNetOptions, "cmi": CMIOptions, "schedule_2d": Schedule, "schedule_3d": Schedule}
PROGRAM_OPTIONS = tuple(f.name for f in dataclasses.fields(ProgramSpec) if f.name != "term_options")
HOST_OPTIONS = tuple(f.name for f in dataclasses.fields(HostSpec))
# Read when a config lacks them (one recorded before the option existed): the behaviour of that time.
_IF_ABSENT = {"grey": "no"}
# option -> the registered loss term that declared it (register_loss_term(name, options=...)).
_TERM_OPTIONS: dict[str, str] = {}


def declare_term_options(term: str, options) -> None:
  """Records `options` (keys of config.inversion) as the own options of the loss term `term`: program fields
  of the spec (a change recompiles), allowed in config.inversion beside the built-in options."""
  for option in options:
    option = str(option)
    if option in PROGRAM_OPTIONS or option in HOST_OPTIONS:
      raise ValueError(f"loss term {term!r}: config.inversion.{option} is a built-in option; pick another name")
    if _TERM_OPTIONS.get(option, term) != term:
      raise ValueError(f"loss term {term!r}: config.inversion.{option} is already the option of the term "
                       f"{_TERM_OPTIONS[option]!r}; pick another name")
    _TERM_OPTIONS[option] = term


def _typed(option: str, value: Any, kind) -> Any:
  try:
    if kind is tuple:
      return tuple(value)
    if kind is bool and isinstance(value, str):
      raise TypeError("a string")
    return kind(value)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.inversion.{option}={value!r}: expected {kind.__name__} ({e})") from e


def _kind(field_type: str):
  return {"int": int, "float": float, "str": str, "bool": bool}.get(field_type, tuple)


def _frozen(value: Any) -> Any:
  """A hashable copy of a term option's value."""
  if isinstance(value, (ml_collections.ConfigDict, Mapping)):
    return ml_collections.FrozenConfigDict(value)
  if isinstance(value, (list, tuple)):
    return tuple(_frozen(v) for v in value)
  return value


def _build(cls, section: str, given: Mapping[str, Any], defaults: Mapping[str, Any]):
  values = {}
  for f in dataclasses.fields(cls):
    if f.name == "term_options":
      continue
    option = f"{section}{f.name}"
    if f.name in _NESTED:
      sub = given.get(f.name, defaults[f.name])
      values[f.name] = _build(_NESTED[f.name], option + ".", _section(option, sub), defaults[f.name])
    elif f.name == "loss_weights":
      weights = _section(option, given.get(f.name, defaults[f.name]))
      values[f.name] = tuple(sorted((str(k), _typed(f"{option}.{k}", w, float)) for k, w in weights.items()))
    elif f.name in given:
      values[f.name] = _typed(option, given[f.name], _kind(str(f.type)))
    else:
      values[f.name] = _IF_ABSENT.get(f.name, defaults[f.name])
  if cls in (Schedule, InvUNetOptions, CMIOptions):
    unknown = sorted(set(given) - set(values))
    if unknown:
      raise ConfigError(f"config.inversion.{section}{unknown[0]} is not an option of the inversion; options of "
                        f"config.inversion.{section.rstrip('.')}: {', '.join(sorted(values))}")
  return cls(**values)


def _section(option: str, value: Any) -> Mapping[str, Any]:
  if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return {k: value[k] for k in value.keys()}
  if isinstance(value, Mapping):
    return dict(value)
  raise ConfigError(f"config.inversion.{option}={value!r}: expected a section of options")


def inversion_spec(inv_cfg) -> InversionSpec:
  """The `InversionSpec` of `config.inversion` (a ConfigDict; an InversionSpec is returned as it is).

  Every key must be a field of the program or the host part, or an option a registered loss term declared;
  anything else is a ConfigError naming it. A missing key takes its default (a config recorded before the
  option existed)."""
  if isinstance(inv_cfg, InversionSpec):
    return inv_cfg
  given = _section("", inv_cfg)
  defaults = inversion_config().to_dict()
  unknown = [k for k in sorted(given) if k not in PROGRAM_OPTIONS and k not in HOST_OPTIONS and k not in _TERM_OPTIONS]
  if unknown:
    k = unknown[0]
    raise ConfigError(f"config.inversion.{k} is not an option of the inversion (a loss term's own option must be "
                      f"declared where the term is registered: register_loss_term(name, options=({k!r},)), "
                      "docs/extending_losses.md)")
  program = _build(ProgramSpec, "", given, defaults)
  terms = tuple(sorted((k, _frozen(given[k])) for k in given if k in _TERM_OPTIONS))
  return InversionSpec(program=dataclasses.replace(program, term_options=terms),
                       host=_build(HostSpec, "", given, defaults))


def program_spec(inv) -> ProgramSpec:
  """The `ProgramSpec` of a ProgramSpec, an InversionSpec or a `config.inversion` ConfigDict."""
  if isinstance(inv, ProgramSpec):
    return inv
  return inversion_spec(inv).program
