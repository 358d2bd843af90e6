"""Fine-tunes a (pre-trained) ViT encoder with a task head for one seed and reports test metrics.

The downstream model is the MAE's encoder (`MAE.encode`, no masking, patch tokens in raster order)
plus a head from `heads.py`. Protocols: `finetune` trains every weight; `linear` freezes the encoder
(stop_gradient on its tokens and no optimiser update). Model selection: the parameters scoring best on
the validation split (acc + auc + f1 for classification as MedCoSS, Dice for segmentation) are the
ones evaluated on the test split.

Evaluation runs in one process (any number of local devices); training batches are split over the
mesh's batch axes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from invcoss_jax import data as data_lib, models
from invcoss_jax.config_checks import ConfigError
from invcoss_jax.evaluate import heads, losses, metrics, sliding_window
from invcoss_jax.evaluate.config import CLASSIFICATION, SEGMENTATION
from invcoss_jax.measure.features import pad_rows
from invcoss_jax.parallel import mesh as mesh_lib
from invcoss_jax.privacy import accounting as privacy_accounting, dp_sgd, sampling as dp_sampling
from invcoss_jax.train import core, optim

PROTOCOLS = ("finetune", "linear")
# Besides biases and norm scales (rank <= 1), as in pre-training.
NO_WEIGHT_DECAY = ("cls_token", "pos_embed")


@dataclasses.dataclass(frozen=True)
class DownstreamModel:
  """ViT encoder + head. Parameters: `{'backbone': <MAE encoder params>, 'head': <head params>}`."""
  backbone: models.MAE
  head: nn.Module
  kind: str
  freeze_backbone: bool = False
  blocks: tuple[int, ...] = ()  # segmentation: 1-based encoder blocks feeding the decoder

  def _tokens(self, backbone_params, images, train: bool, rng):
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    # A frozen encoder runs in inference mode (no drop-path); block tokens only for the decoder.
    encode = functools.partial(self.backbone.apply, {"params": backbone_params}, images,
                               train=train and not self.freeze_backbone, method=models.MAE.encode, rngs=rngs)
    feats = []
    if self.kind == CLASSIFICATION:
      tokens, _, _ = encode()
    else:
      (tokens, _, _), state = encode(mutable=["intermediates"])
      blocks = models.block_tokens(state["intermediates"])
      # The last block's tokens pass the encoder's final norm, as UNETR's bottleneck (MONAI).
      feats = [tokens if b == len(blocks) else blocks[b - 1] for b in self.blocks]
    if self.freeze_backbone:
      tokens = jax.lax.stop_gradient(tokens)
      feats = [jax.lax.stop_gradient(f) for f in feats]
    return tokens, feats

  def init_backbone(self, rng: jax.Array, image_shape: tuple[int, ...]) -> Any:
    return self.backbone.init({"params": rng}, _dummy_inputs(image_shape), method=models.MAE.encode)["params"]

  def init_head(self, rng: jax.Array, image_shape: tuple[int, ...]) -> Any:
    """Head parameters; only the shapes of the encoder's tokens are needed, not its weights."""
    images = _dummy_inputs(image_shape)
    abstract = jax.eval_shape(lambda r: self.init_backbone(r, image_shape), rng)
    tokens, feats = jax.eval_shape(lambda p: self._tokens(p, images, False, None), abstract)
    tokens = jnp.zeros(tokens.shape, tokens.dtype)
    feats = [jnp.zeros(f.shape, f.dtype) for f in feats]
    # An RBG key seeded by `rng`: XLA compiles a threefry hash for every parameter (about half a
    # second each on CPU, most of a UNETR's set-up time); RBG is far cheaper to compile.
    key = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")
    if self.kind == CLASSIFICATION:
      return self.head.init(key, tokens)["params"]
    return self.head.init(key, images, feats)["params"]

  def init(self, rng: jax.Array, image_shape: tuple[int, ...]) -> dict[str, Any]:
    return {"backbone": self.init_backbone(rng, image_shape),
            "head": self.init_head(jax.random.fold_in(rng, 1), image_shape)}

  def apply(self, params, images: jnp.ndarray, *, train: bool = False, rng: jax.Array | None = None):
    """Logits: `(B, num_classes)` or `(B, *spatial, channels)`, float32."""
    tokens, feats = self._tokens(params["backbone"], images, train, rng)
    if self.kind == CLASSIFICATION:
      return self.head.apply({"params": params["head"]}, tokens)
    return self.head.apply({"params": params["head"]}, images, feats)


def check_task(task: ml_collections.ConfigDict, name: str) -> None:
  """Clear errors for options the fine-tuning reads."""
  where = f"config.evaluate.tasks.{name}"
  if task.kind not in (CLASSIFICATION, SEGMENTATION):
    raise ConfigError(f"{where}.kind={task.kind!r}: expected {CLASSIFICATION!r} or {SEGMENTATION!r}")
  if int(task.num_classes) < 2:
    raise ConfigError(f"{where}.num_classes={task.num_classes}: expected >= 2 (segmentation counts background)")
  if task.kind == SEGMENTATION and task.seg_loss not in ("dice_bce", "dice_ce"):
    raise ConfigError(f"{where}.seg_loss={task.seg_loss!r}: expected 'dice_bce' or 'dice_ce'")
  if int(task.batch_size) < 1 or int(task.eval_batch_size) < 1:
    raise ConfigError(f"{where}: batch_size and eval_batch_size must be >= 1")
  if int(task.steps) <= 0 and float(task.epochs) <= 0:
    raise ConfigError(f"{where}: set steps > 0 or epochs > 0")
  path = str(task.data.get("path", "") or "")
  if task.data.get("name") == "folder" and not path:
    raise ConfigError(f"{where}.data.path is empty: point it at your copy of the {name} dataset "
                     f"(format {task.data.get('format')!r}), e.g. --{where}.data.path=/data/{name}")
  if (task.kind == SEGMENTATION and task.data.get("name") == "folder"
      and not str(task.data.get("label_path", "") or "")):
    raise ConfigError(f"{where}.data.label_path is empty: segmentation needs the folder of label maps "
                     f"(masks) parallel to {where}.data.path")
  if path and not os.path.exists(path):
    raise FileNotFoundError(f"{where}.data.path={path!r} does not exist: expected the {name} "
                            f"dataset ({task.data.get('format')!r} files) there")


def output_channels(task: ml_collections.ConfigDict) -> int:
  if task.kind == CLASSIFICATION:
    return int(task.num_classes)
  # Sigmoid heads predict one channel per foreground class, softmax heads every class.
  return int(task.num_classes) - 1 if task.seg_loss == "dice_bce" else int(task.num_classes)


def build_model(task: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict,
                protocol: str, image_shape: tuple[int, ...]) -> DownstreamModel:
  if protocol not in PROTOCOLS:
    raise ValueError(f"config.evaluate.protocol={protocol!r}: expected one of {PROTOCOLS}")
  backbone = models.build_mae(model_cfg)
  vit = backbone.cfg
  dtype = vit.compute_dtype
  if task.kind == CLASSIFICATION:
    head = heads.ClassificationHead(output_channels(task), mlp_dim=int(task.mlp_dim), dtype=dtype)
    return DownstreamModel(backbone, head, CLASSIFICATION, protocol == "linear")
  rank = len(image_shape) - 1
  patch = tuple(vit.patch_size(rank))
  levels = len(heads.upsampling_plan(patch))
  blocks = tuple(heads.feature_blocks(vit.depth, levels, tuple(task.unetr_blocks)))
  head = heads.UNETR(output_channels(task), patch, feature_size=int(task.unetr_feature_size), dtype=dtype)
  return DownstreamModel(backbone, head, SEGMENTATION, protocol == "linear", blocks)


def init_params(model: DownstreamModel, rng: jax.Array, image_shape: tuple[int, ...],
                pretrained: Any | None = None, source: str = "") -> tuple[dict[str, Any], list[str]]:
  """Fresh head; encoder sub-trees from `pretrained` where it has them (shapes must match), freshly
  initialised otherwise (e.g. the 3D tokenizer of a 2D-only stage, with a warning). Returns
  (params, names of the pre-trained sub-trees used)."""
  abstract = jax.eval_shape(lambda r: model.init_backbone(r, image_shape), rng)
  pretrained = pretrained or {}
  loaded, fresh = [], []
  for key, want in abstract.items():
    if key not in pretrained:
      fresh.append(key)
      continue
    got = pretrained[key]
    if jax.tree.structure(got) != jax.tree.structure(want):
      raise ValueError(f"{source}: parameter tree {key!r} differs from the model's: "
                       f"{jax.tree.structure(got)} vs {jax.tree.structure(want)}")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{source}: parameter {key!r} has shape {tuple(a.shape)}, the model expects "
                         f"{tuple(b.shape)} (the fine-tuning model config must be the pre-trained one)")
    loaded.append(key)
  # Host copies: a checkpoint restored onto one device must not pin the fine-tuning to that device.
  backbone = {k: jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(pretrained[k])) for k in loaded}
  rank = len(image_shape) - 1
  if pretrained and f"patch_embed_{rank}d" in fresh:
    # The input layer of this task's dimensionality was never trained: the result would be that of a random
    # tokenizer under a pre-trained trunk, reported as the checkpoint's.
    text_only = "token_embed" in pretrained and f"patch_embed_{5 - rank}d" not in pretrained
    seen = ("report text only (a report stage)" if text_only else
            f"{'3D volumes' if rank == 2 else '2D images'} only")
    raise ConfigError(f"{source or 'the checkpoint'} has no {rank}D tokenizer (patch_embed_{rank}d): it was "
                      f"pre-trained on {seen}, and this task's {rank}D inputs would enter through a random input "
                      f"layer. Fine-tune a checkpoint of a stage that saw {rank}D data (a continual stage carries "
                      "every earlier tokenizer)")
  if fresh:
    if loaded:
      logging.warning("%s has no %s: initialised randomly", source or "the checkpoint", fresh)
    init = _init_backbone(model, rng, image_shape)
    backbone.update({k: init[k] for k in fresh})
  head = _init_head(model, jax.random.fold_in(rng, 1), image_shape)
  return {"backbone": {k: backbone[k] for k in abstract}, "head": head}, loaded


# Jitted (eager initialisation compiles op by op) and cached per (model, image shape): the model is
# a hashable frozen dataclass, so every seed and checkpoint of one architecture shares the compilation.
@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_backbone(model: DownstreamModel, rng: jax.Array, image_shape: tuple[int, ...]):
  return model.init_backbone(rng, image_shape)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_head(model: DownstreamModel, rng: jax.Array, image_shape: tuple[int, ...]):
  return model.init_head(rng, image_shape)


def make_schedule(task: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up, then MedCoSS's poly decay lr * (1 - t/T)^power to 0."""
  warmup = min(int(task.warmup_steps), max(total_steps - 1, 0))
  poly = optax.polynomial_schedule(init_value=float(task.lr), end_value=0.0, power=float(task.lr_power),
                                   transition_steps=max(total_steps - warmup, 1))
  if warmup == 0:
    return poly
  ramp = optax.linear_schedule(0.0, float(task.lr), warmup)
  return optax.join_schedules([ramp, poly], [warmup])


def make_optimizer(task: ml_collections.ConfigDict, total_steps: int, params: Any,
                   freeze_backbone: bool) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(task, total_steps)
  adamw = optax.adamw(schedule, b1=float(task.b1), b2=float(task.b2), weight_decay=float(task.weight_decay),
                      mask=lambda p: optim.weight_decay_mask(p, NO_WEIGHT_DECAY))
  if not freeze_backbone:
    return adamw, schedule
  labels = {"backbone": jax.tree.map(lambda _: "frozen", params["backbone"]),
            "head": jax.tree.map(lambda _: "train", params["head"])}
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels), schedule


def loss_fn_for(task: ml_collections.ConfigDict) -> Callable:
  if task.kind == CLASSIFICATION:
    return losses.classification_loss
  return losses.dice_bce_loss if task.seg_loss == "dice_bce" else losses.dice_ce_loss


def task_loss(model: DownstreamModel, loss_fn: Callable) -> core.LossFn:
  """The task's loss of a batch {'image', 'target'} as the trainer core's loss (drop-path from the step key)."""

  def objective(params, batch, consts, rng):
    del consts
    return loss_fn(model.apply(params, batch["image"], train=True, rng=rng), batch["target"]), {}

  return objective


def make_train_step(model: DownstreamModel, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    loss_fn: Callable, privacy: dp_sgd.Spec | None = None) -> Callable:
  """(state, batch{'image', 'target'}) -> (state, metrics) on the trainer core (`privacy`: a DP-SGD plan, the
  batch then carries dp_sgd.PADDING_KEY)."""
  return core.make_step(task_loss(model, loss_fn), tx, schedule, privacy=privacy)


def _flip_tta(predict: Callable, images: jnp.ndarray, flips: bool) -> jnp.ndarray:
  if not flips:
    return predict(images)
  spatial = range(1, images.ndim - 1)
  subsets = [s for r in range(len(spatial) + 1) for s in itertools.combinations(spatial, r)]
  total = 0.0
  for axes in subsets:
    x = jnp.flip(images, axes) if axes else images
    y = predict(x)
    total = total + (jnp.flip(y, axes) if axes else y)
  return total / len(subsets)


def make_predict(model: DownstreamModel, task: ml_collections.ConfigDict) -> Callable:
  """(params, images) -> probabilities (softmax for classification, per the loss for segmentation)."""

  def predict(params, images):
    def probs(x):
      logits = model.apply(params, x, train=False)
      if task.kind == CLASSIFICATION:
        return jax.nn.softmax(logits)
      return losses.segmentation_probs(logits, task.seg_loss)
    if task.kind == CLASSIFICATION:
      return probs(images)
    return _flip_tta(probs, images, bool(task.tta_flips))

  return predict


def _labels_of(batch: dict[str, np.ndarray]) -> np.ndarray:
  return np.asarray(batch["label"]).reshape(-1).astype(np.int64)


def model_inputs(batch: dict[str, np.ndarray]) -> np.ndarray:
  """What the encoder reads of a batch: images/volumes as float32, or a text batch's token ids as int32
  (the encoder keeps [PAD] out of attention from the ids: config.model.pad_id)."""
  if "tokens" in batch:
    return np.asarray(batch["tokens"], np.int32)
  return np.asarray(batch["image"], np.float32)


def _dummy_inputs(image_shape: tuple[int, ...]) -> jnp.ndarray:
  return jnp.zeros((1, *image_shape), jnp.int32 if len(image_shape) == 1 else jnp.float32)


def _mask_of(batch: dict[str, np.ndarray], image_ndim: int) -> np.ndarray:
  m = np.asarray(batch["mask"])
  return m[..., 0] if m.ndim == image_ndim else m


def evaluate_split(predict_fn: Callable, params: Any, batches: Iterable[dict[str, np.ndarray]],
                   task: ml_collections.ConfigDict, *, window: tuple[int, ...], batch_size: int,
                   put: Callable[[np.ndarray], Any]) -> dict[str, float]:
  """Metrics over a finite iterator of NumPy batches (ragged last batch allowed).

  Classification: metrics of the pooled predictions. Segmentation: per-case metrics (sliding
  window over inputs larger than `window`), averaged over cases as MedCoSS does.
  """
  if task.kind == CLASSIFICATION:
    all_probs, all_labels = [], []
    for batch in batches:
      images = model_inputs(batch)
      n = images.shape[0]
      probs = np.asarray(predict_fn(params, put(pad_rows(images, batch_size))))[:n]
      all_probs.append(probs)
      all_labels.append(_labels_of(batch))
    if not all_probs:
      raise ValueError(f"evaluation split of data.name={task.data.get('name')!r} yielded no examples")
    return metrics.classification_metrics(np.concatenate(all_labels), np.concatenate(all_probs))

  per_case: list[dict[str, float]] = []
  window_fn = lambda x: np.asarray(predict_fn(params, put(x)))
  for batch in batches:
    images = np.asarray(batch["image"], np.float32)
    masks = _mask_of(batch, images.ndim)
    probs = sliding_window.sliding_window_inference(
        window_fn, images, window, overlap=float(task.overlap), sigma_scale=float(task.sigma_scale),
        batch_size=batch_size)
    pred = losses.probs_to_labels(probs, task.seg_loss)
    spacings = batch.get("spacing")
    for i in range(images.shape[0]):
      spacing = (np.asarray(spacings[i], np.float64) if spacings is not None
                 else (tuple(task.spacing) or None))
      per_case.append(metrics.segmentation_metrics(pred[i], masks[i], int(task.num_classes),
                                                   spacing=spacing, dice_smooth=float(task.dice_smooth)))
  if not per_case:
    raise ValueError(f"evaluation split of data.name={task.data.get('name')!r} yielded no examples")
  return {k: float(np.mean([c[k] for c in per_case])) for k in per_case[0]}


def whole_case_batches(cases) -> Iterable[dict[str, np.ndarray]]:
  """Batches of one whole case each (cases differ in shape): image, mask and spacing."""
  for k in range(len(cases)):
    case = cases[k]
    if "mask" not in case:
      raise ValueError(f"case {case.get('case_id', k)!r} has no label map: segmentation needs data.label_path")
    yield {"image": case["image"][None], "mask": case["mask"][None], "spacing": case["spacing"][None]}


def selection_score(task: ml_collections.ConfigDict, m: dict[str, float]) -> float:
  """Validation score for model selection (higher is better)."""
  if task.kind == CLASSIFICATION:
    return float(m["acc"] + np.nan_to_num(m["auc"]) + m["f1"])
  return float(m["dsc"])


@dataclasses.dataclass
class FinetuneResult:
  test: dict[str, float]
  best_val: dict[str, float]
  best_step: int
  history: list[dict[str, Any]]
  total_steps: int
  loaded: list[str]
  params: Any = None
  privacy: dict[str, Any] | None = None  # the run's privacy ledger (DP-SGD fine-tuning), None without DP


class Finetuner:
  """Fine-tuning of one task with one model config: data, model, optimiser and the compiled train and
  predict steps are built once and shared by every seed (and every checkpoint of that architecture).

  `run(seed, pretrained)` fine-tunes from `pretrained` MAE parameters (None: from scratch) with `seed`
  (head initialisation, data order, drop-path) and tests the model selected on validation.

  `privacy` (a config.privacy section, on): DP-SGD fine-tuning on Poisson batches of expected size batch_size
  (docs/privacy.md); the guarantee covers the training split, not the validation split model selection reads.
  """

  def __init__(self, task: ml_collections.ConfigDict, task_name: str, model_cfg: ml_collections.ConfigDict, *,
               protocol: str = "finetune", mesh_cfg: ml_collections.ConfigDict | None = None,
               max_steps: int = -1, batch_shards: bool = True,
               privacy: ml_collections.ConfigDict | None = None):
    check_task(task, task_name)
    if jax.process_count() > 1:
      raise NotImplementedError("downstream evaluation runs in a single process (any number of local "
                                f"devices); this job has {jax.process_count()} processes")
    self.data_lib = data_lib
    self.task, self.task_name, self.protocol = task, task_name, protocol
    self.train_data = ml_collections.ConfigDict(task.data.to_dict())
    self.train_data.split = task.train_split
    self.image_shape = tuple(int(s) for s in data_lib.image_shape(self.train_data))
    self.n_train = int(data_lib.num_examples(self.train_data, split=task.train_split))
    self.batch = int(task.batch_size)
    self.eval_batch = int(task.eval_batch_size)
    steps_per_epoch = max(1, self.n_train // self.batch)
    total = int(task.steps) if int(task.steps) > 0 else int(round(float(task.epochs) * steps_per_epoch))
    self.total = min(total, max_steps) if max_steps > 0 else total
    self.eval_every = int(task.eval_every) if int(task.eval_every) > 0 else steps_per_epoch
    self.window = tuple(int(w) for w in task.window) or self.image_shape[:-1]

    if batch_shards:
      self.mesh = mesh_lib.make_mesh(mesh_cfg if mesh_cfg is not None else {"axes": [("data", -1)]})
    else:
      self.mesh = mesh_lib.make_mesh({"axes": [("data", 1)]}, jax.local_devices()[:1])
    where = f"config.evaluate.tasks.{task_name}"
    mesh_lib.check_global_batch(self.mesh, self.batch, f"{where}.batch_size")
    mesh_lib.check_global_batch(self.mesh, self.eval_batch, f"{where}.eval_batch_size")

    self.plan = privacy_accounting.plan_dp_sgd(
        privacy, expected_batch_size=self.batch, dataset_size=self.n_train, steps=self.total,
        batch_multiple=mesh_lib.num_batch_shards(self.mesh), data=f"{task.data.get('name')}:{task.train_split}",
        batch_option=f"{where}.batch_size")
    self.model = build_model(task, model_cfg, protocol, self.image_shape)
    abstract = jax.eval_shape(lambda r: self.model.init(r, self.image_shape), jax.random.PRNGKey(0))
    self.tx, self.schedule = make_optimizer(task, self.total, abstract, self.model.freeze_backbone)
    # The state is laid out by config.mesh's rules (shard_params, sharding_rules) as pre-training lays out its
    # own; the single-device mesh of batch_shards=False keeps everything whole. Compiled once, for every seed.
    with jax.set_mesh(self.mesh):
      self.init_state, self.shardings = core.state_init(core.train_state_init(self.tx),
                                                        (abstract, jax.random.PRNGKey(0)), self.mesh,
                                                        mesh_cfg if batch_shards else None)
    self.step_fn = core.jit_step(make_train_step(self.model, self.tx, self.schedule, loss_fn_for(task),
                                                 privacy=self.plan), self.shardings, self.mesh)
    self.predict = jax.jit(make_predict(self.model, task),
                           in_shardings=(self.shardings.params, mesh_lib.data_sharding(self.mesh)),
                           out_shardings=mesh_lib.replicated(self.mesh))

  def _target(self, b: dict[str, np.ndarray]) -> np.ndarray:
    if self.task.kind == CLASSIFICATION:
      return _labels_of(b).astype(np.int32)
    return _mask_of(b, np.ndim(b["image"])).astype(np.int32)

  def evaluate(self, params: Any, split: str) -> dict[str, float]:
    """Metrics of `params` on `split` (whole cases for 3D segmentation with eval_whole_cases)."""
    task = self.task
    if task.kind == SEGMENTATION and bool(task.eval_whole_cases):
      batches = whole_case_batches(self.data_lib.make_case_source(task.data, split))
    else:
      batches = self.data_lib.make_eval_iterator(task.data, batch_size=self.eval_batch, split=split)
    put = lambda x: mesh_lib.put_batch(self.mesh, np.asarray(x))
    with jax.set_mesh(self.mesh):
      return evaluate_split(self.predict, params, batches, task, window=self.window,
                            batch_size=self.eval_batch, put=put)

  def run(self, seed: int, pretrained: Any | None = None, source: str = "",
          keep_params: bool = False) -> FinetuneResult:
    task, name = self.task, self.task_name
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(int(seed)))
    params, loaded = init_params(self.model, init_rng, self.image_shape, pretrained, source)
    logging.info("fine-tuning %s (%s, %s) seed %d: %d steps of batch %d, %d train examples of shape %s, "
                 "pre-trained %s", name, task.kind, self.protocol, seed, self.total, self.batch, self.n_train,
                 self.image_shape, loaded or "nothing")
    history: list[dict[str, Any]] = []
    best: list[Any] = [-math.inf, None, 0, {}]  # score, host parameters, step, validation metrics

    def validate(step: int, state, fetched) -> None:
      train_loss = float(np.mean([float(m["loss"]) for _, m in fetched]))
      val = self.evaluate(state.params, task.val_split)
      score = selection_score(task, val)
      history.append({"step": step, "train_loss": train_loss, "val": val, "score": score})
      logging.info("%s seed %d step %d: train loss %.4f, val %s", name, seed, step, train_loss,
                   {k: round(v, 4) for k, v in val.items() if "_" not in k})
      if score > best[0]:
        best[:] = [score, jax.device_get(state.params), step, val]

    with jax.set_mesh(self.mesh):
      # Pre-trained weights (host arrays, or committed to one device) go to their layout first.
      state = self.init_state(jax.device_put(params, self.shardings.params), state_rng)
      plan = self.plan
      if plan is None:
        train_iter = self.data_lib.make_train_iterator(self.train_data, global_batch_size=self.batch,
                                                       seed=int(seed))
      else:
        poisson = dp_sampling.PoissonBatches(self.train_data, seed=int(seed), sampling_rate=plan.sampling_rate,
                                             max_batch_size=plan.max_batch_size,
                                             microbatch_size=plan.microbatch_size)

      def next_batch(step: int):
        local = next(train_iter) if plan is None else poisson.batch(step)
        extra = {} if plan is None else {dp_sgd.PADDING_KEY: local[dp_sgd.PADDING_KEY]}
        return mesh_lib.put_batch(self.mesh, {"image": model_inputs(local), "target": self._target(local), **extra})

      # Validation (model selection) every eval_every steps and at the last; no checkpoints (runs are short).
      core.Loop(step_fn=self.step_fn, next_batch=next_batch, what=f"{name}:{seed}", log_every=self.eval_every,
                on_log=validate, fault_prefix="finetune_step", log_first=False,
                nonfinite_hint=f"lower config.evaluate.tasks.{name}.lr").run(state, None, 0, self.total)
      _, best_params, best_step, best_val = best
      params = jax.device_put(best_params, self.shardings.params)
    test = self.evaluate(params, task.test_split)
    return FinetuneResult(test=test, best_val=best_val, best_step=best_step, history=history,
                          total_steps=self.total, loaded=loaded, params=params if keep_params else None,
                          privacy=self.ledger())

  def ledger(self) -> dict[str, Any] | None:
    """The privacy ledger of one run (every seed's is the same), or None without DP."""
    plan = self.plan
    if plan is None:
      return None
    data = f"{self.task.data.get('name')}:{self.task.train_split}"
    return privacy_accounting.ledger(
        [plan.mechanism(data)], delta=plan.delta, accountant=plan.accountant, eps=plan.epsilon, dp=True,
        dataset_size=plan.dataset_size, expected_batch_size=plan.expected_batch_size,
        max_batch_size=plan.max_batch_size, microbatch_size=plan.microbatch_size, sampling=plan.sampling,
        covers=("the fine-tuned parameters of each seed, with respect to the task's training split; not the "
                "model selection on the validation split, nor the logged training losses"))


def finetune(task: ml_collections.ConfigDict, task_name: str, model_cfg: ml_collections.ConfigDict, *,
             seed: int, protocol: str = "finetune", pretrained: Any | None = None, source: str = "",
             mesh_cfg: ml_collections.ConfigDict | None = None, max_steps: int = -1,
             batch_shards: bool = True, keep_params: bool = False,
             privacy: ml_collections.ConfigDict | None = None) -> FinetuneResult:
  """One fine-tuning run (see `Finetuner`)."""
  return Finetuner(task, task_name, model_cfg, protocol=protocol, mesh_cfg=mesh_cfg, max_steps=max_steps,
                   batch_shards=batch_shards, privacy=privacy).run(seed, pretrained, source, keep_params=keep_params)
