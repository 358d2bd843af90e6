"""Defaults of `config.inversion`: feature statistics and data-free inversion (paper Sec. 3.3-3.5, App. B, C)."""

import ml_collections


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

  # --- What to synthesise ---
  # Number of synthetic samples; <= 0 derives it from `buffer_fraction` of the stage's dataset size
  # (the paper generates as many synthetic samples as a 5 % replay buffer holds).
  c.num_samples = -1
  c.buffer_fraction = 0.05
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
