"""Measurements of one stage's model (and of what it left for later stages), cached on disk.

Layout under `workdir/measurements/`:
  seed_<s>/random.json                 the random-init encoder (stage 1's starting point) on every stage's data
  seed_<s>/<method>/<stage>.json       the model after <stage> on every stage's data, CKA to earlier stages'
                                       own models (and, per image stage, masked-reconstruction error with the
                                       model's decoder and a re-fitted one, and feature distance: `recon`,
                                       `feature_distance`), and the quality of the replay set the stage left
  grids/seed_<s>_<method>_<stage>.png  the replay set beside as many held-out real images
Each file is written atomically once its measurement is complete: a killed job re-measures only what is
missing, and never reads half a result.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from invcoss_jax import data as data_lib, models, npz_io
from invcoss_jax.continual import methods
from invcoss_jax.continual.stages import BUFFER_DIR, STAGE_INFO, Stage, stage_key
from invcoss_jax.io_utils import atomic_write_json
from invcoss_jax.measure.evaluators import get_evaluator
from invcoss_jax.workdir import SYNTHETIC_DIR
from invcoss_jax.retention import evaluators, features, metrics  # noqa: F401 (evaluators: registers them)
from invcoss_jax.audit import distances
from invcoss_jax.continual.sequence import fresh_params_fn
from invcoss_jax.data import registry as data_registry
from invcoss_jax.evaluate import finetune
from invcoss_jax.evaluate.config import task_config
from invcoss_jax.inversion import engine
from invcoss_jax.retention import judges, reconstruction
from invcoss_jax.retention.config import run_config
from invcoss_jax.train import checkpoint as ckpt_lib
from invcoss_jax.train.writers import image_grid, write_png

RECON_KEY = 7919  # folded with a stage's index into PRNGKey(seed): the masks and re-fit of that stage's measures


def _read_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_replay_set(stage: Stage, method: str) -> np.ndarray | None:
  """The images stage `stage` left for later stages (invcoss, noise: synthetic/; er, medcoss: buffer/), or None.

  Shards are read one after another in this thread (numpy's .npy header parser is not thread safe on
  CPython 3.11, python/cpython#106905)."""
  synthetic = methods.get(method).replays == "synthetic"
  folder = os.path.join(stage.workdir, SYNTHETIC_DIR if synthetic else BUFFER_DIR)
  files = sorted(glob.glob(os.path.join(folder, "*.npz")))
  if not files:
    return None
  parts = []
  for f in files:
    try:
      images = npz_io.load_npz(f, ["images"])["images"]
    except KeyError as e:
      raise ValueError(f"expected an array 'images' in a replay shard: {e.args[0]}") from e
    parts.append(np.asarray(images, np.float32))
  return np.concatenate(parts)


def initial_generator_images(stage: Stage, num: int, seed: int) -> np.ndarray | None:
  """`num` images of the stage's generator at initialisation (the latents and weights inversion starts from):
  the reference a trained generator must beat. None when the stage inverts without a generator."""
  cfg = ckpt_lib.read_config(stage.workdir)
  info = _read_json(os.path.join(stage.workdir, STAGE_INFO)) or {}
  inv = engine.resolve_grey(cfg.inversion, str(data_lib.resolve(cfg.data).modality))
  return engine.generator_at_init(inv, image_shape=info["image_shapes"][0], rng=jax.random.PRNGKey(seed),
                                  num_samples=num)


def _fingerprint(params) -> str:
  """A digest of every parameter's values (identical copies of a stage's model measure alike)."""
  h = hashlib.sha1()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    a = np.ascontiguousarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str((a.dtype, a.shape)).encode())
    h.update(a.tobytes())
  return h.hexdigest()


class Measurer:
  """Measures models of one benchmark; holds the held-out data and the compiled feature function."""

  def __init__(self, config: ml_collections.ConfigDict, root: str):
    self.config, self.rc, self.root = config, config.retention, root
    self.order = [str(m) for m in config.continual.order]
    self.model = models.build_mae(config.model)
    self._splits: dict[tuple[str, str], features.Split] = {}
    self._finetuners: dict[str, Any] = {}
    self._recon = None
    self._judge_nets: dict[str, Any] = {}
    self._generator_init: dict[tuple, Any] = {}
    self._recon_cache: dict[tuple[int, int, str], dict[str, float]] = {}
    self._tasks_cache: dict[tuple[int, str], dict[str, dict[str, float]]] = {}
    self._digests: dict[int, tuple[Any, str]] = {}  # id(params) -> (params, digest): each tree hashed once

  # --- data ---

  def data(self, modality: str) -> ml_collections.ConfigDict:
    return self.config.continual.datasets[modality]

  def fingerprint(self, params) -> str:
    """`_fingerprint(params)`, computed once per parameter tree (the probes and the re-fits of a stage key their
    caches on the same tree; the tree is kept, so its id is not reused)."""
    held = self._digests.get(id(params))
    if held is None or held[0] is not params:
      if len(self._digests) >= 4:  # a run's stages at most: older trees are let go (ViT-B's are 450 MB each)
        del self._digests[next(iter(self._digests))]
      held = self._digests[id(params)] = (params, _fingerprint(params))
    return held[1]

  def split(self, modality: str, which: str) -> features.Split:
    key = (modality, which)
    if key not in self._splits:
      cap = {str(self.rc.fit_split): int(self.rc.max_fit_examples),
             str(self.rc.test_split): int(self.rc.max_test_examples)}.get(which, int(self.rc.replay.max_nn_reference))
      self._splits[key] = features.load_split(self.data(modality), which, cap)
      logging.info("retention: %s %s split: %d examples%s", modality, which, len(self._splits[key].images),
                   "" if self._splits[key].labels is None else ", labelled")
    return self._splits[key]

  def labelled(self, modality: str) -> bool:
    fit, test = self.split(modality, str(self.rc.fit_split)), self.split(modality, str(self.rc.test_split))
    return (fit.labels is not None and test.labels is not None and len(np.unique(fit.labels)) > 1
            and len(np.unique(test.labels)) > 1)

  def feats(self, params, images: np.ndarray) -> np.ndarray:
    return features.encoder_features(self.model, params, images, kind=str(self.rc.feature),
                                     batch_size=int(self.rc.feature_batch_size))

  # --- measurements ---

  def tasks(self, params, seed: int) -> dict[str, dict[str, float]]:
    """Probe (and fine-tuning) scores of `params` on the held-out data of every labelled stage. Computed once
    per (seed, parameter values): every method's copy of the shared first stage measures alike."""
    cache_key = (int(seed), self.fingerprint(params))
    if cache_key not in self._tasks_cache:
      self._tasks_cache[cache_key] = self._tasks(params, seed)
    return {m: dict(v) for m, v in self._tasks_cache[cache_key].items()}

  def _tasks(self, params, seed: int) -> dict[str, dict[str, float]]:
    out = {}
    for m in self.order:
      if not self.labelled(m):
        continue
      fit, test = self.split(m, str(self.rc.fit_split)), self.split(m, str(self.rc.test_split))
      out[m] = get_evaluator("probe")(self.model, fit, test, feature=str(self.rc.feature),
                                      batch_size=int(self.rc.feature_batch_size), logreg_c=float(self.rc.logreg_c),
                                      knn_k=int(self.rc.knn_k), seed=seed).run(params)
      if bool(self.rc.finetune.enabled):
        out[m].update(self.finetune(m, params, seed))
    return out

  def finetuner(self, modality: str):
    """One compiled fine-tuning set-up per stage dataset (evaluate.finetune), shared by every model."""
    if modality not in self._finetuners:
      f = self.rc.finetune
      t = task_config("pneumonia")  # a classification task; everything but its kind is replaced below
      t.data = ml_collections.ConfigDict(self.data(modality).to_dict())
      t.data.augment = False
      t.num_classes = int(max(np.max(self.split(modality, str(self.rc.fit_split)).labels),
                              np.max(self.split(modality, str(self.rc.test_split)).labels)) + 1)
      # The label budget is the fit split; the model after the last step is scored (no selection).
      t.train_split, t.val_split, t.test_split = str(self.rc.fit_split), str(self.rc.fit_split), str(self.rc.test_split)
      t.steps, t.eval_every, t.batch_size, t.lr = int(f.steps), int(f.steps), int(f.batch_size), float(f.lr)
      self._finetuners[modality] = finetune.Finetuner(t, f"retention_{modality}", self.config.model,
                                                      protocol=str(f.protocol), batch_shards=False)
    return self._finetuners[modality]

  def finetune(self, modality: str, params, seed: int) -> dict[str, float]:
    res = self.finetuner(modality).run(seed, pretrained=jax.device_get(params), source=f"retention {modality}")
    return {f"finetune_{k}": float(v) for k, v in res.test.items() if isinstance(v, (int, float))}

  def is_image(self, modality: str) -> bool:
    """Whether a stage's data are images or volumes (text stages have no masked-patch reconstruction)."""
    return not data_registry.is_text(self.data(modality))

  def reconstructor(self):
    """The compiled masked-reconstruction error and decoder re-fit (retention/reconstruction.py), built once."""
    if self._recon is None:
      r = self.rc.recon
      self._recon = reconstruction.Reconstruction(
          self.model, mask_ratio=float(self.config.train.mask_ratio), batch_size=int(self.rc.feature_batch_size),
          refit_batch_size=int(r.refit_batch_size), refit_lr=float(r.refit_lr))
    return self._recon

  def reconstruction(self, seed: int, stage: Stage, params) -> dict[str, float]:
    """Masked-reconstruction error of `params` on `stage`'s held-out images: with its own decoder
    (`mae_mse`) and with a fresh decoder re-fitted on the frozen encoder on the stage's fit split
    (`mae_mse_refit`). Masks, the fresh decoder and the re-fit's batches depend on (seed, stage) only."""
    cache_key = (int(seed), int(stage.index), self.fingerprint(params))
    if cache_key in self._recon_cache:  # e.g. the first stage, shared by every method of a seed
      return dict(self._recon_cache[cache_key])
    r, rec = self.rc.recon, self.reconstructor()
    m = stage.modality
    test = self.split(m, str(self.rc.test_split)).images
    key = jax.random.fold_in(jax.random.PRNGKey(int(seed)), RECON_KEY + int(stage.index))
    noise_key, init_key, refit_key = jax.random.split(key, 3)
    noises = reconstruction.fixed_noises(noise_key, len(test),
                                         reconstruction.num_tokens(self.model.cfg, test.shape[1:]),
                                         int(r.mask_draws))
    fit = self.split(m, str(self.rc.fit_split)).images if int(r.refit_steps) > 0 else None
    out = get_evaluator("reconstruction")(rec, test, noises, fit=fit, refit_steps=int(r.refit_steps),
                                          init_key=init_key, refit_key=refit_key,
                                          refit_seed=int(seed) * 1000 + int(stage.index)).run(params)
    self._recon_cache[cache_key] = dict(out)
    return out

  def random_params(self, seed: int):
    """The encoder every run of `seed` starts from (continual.sequence.initial_params of stage 1)."""
    return fresh_params_fn(self.model.cfg)(stage_key(run_config(self.config, seed, "seqssl"), 1, 0))

  def _path(self, seed: int, method: str, stage: str) -> str:
    return os.path.join(self.root, f"seed_{seed}", method, f"{stage}.json")

  def has_random(self, seed: int) -> bool:
    return os.path.isfile(os.path.join(self.root, f"seed_{seed}", "random.json"))

  def has_run(self, seed: int, method: str, stages: list[Stage]) -> bool:
    """Whether every stage of the run has its measurement (so the run itself has finished)."""
    return all(os.path.isfile(self._path(seed, method, s.name)) for s in stages)

  def random_baseline(self, seed: int) -> bool:
    """Measures the random-init encoder of `seed`; returns True when it was measured earlier."""
    path = os.path.join(self.root, f"seed_{seed}", "random.json")
    if os.path.isfile(path):
      return True
    atomic_write_json(path, dict(seed=seed, tasks=self.tasks(self.random_params(seed), seed)))
    return False

  def measure_run(self, seed: int, method: str, stages: list[Stage]) -> bool:
    """Measures every stage of one finished run that has no measurement yet; returns whether any was made.
    A measurement made before `recon` existed (config.retention.recon.enabled) gets it added in place."""
    params: dict[int, Any] = {}
    recon = bool(self.rc.recon.enabled)

    def stage_params(i: int):
      if i not in params:
        params[i] = ckpt_lib.load_trained_stage(stages[i].workdir)[2]
      return params[i]

    made = False
    for i, stage in enumerate(stages):
      path = self._path(seed, method, stage.name)
      old = _read_json(path)
      if old is not None:
        if recon and "recon" not in old:
          old.update(self.earlier_stages(seed, stages, i, stage_params, cka=False, recon=True))
          atomic_write_json(path, old)
          made = True
          logging.info("retention: seed %d %s %s: reconstruction measures added", seed, method, stage.name)
        replay = old.get("replay")
        if replay and self.judging(stage) and "judges" not in replay:
          replay["judges"] = self.judges(seed, method, stage)
          atomic_write_json(path, old)
          made = True
          logging.info("retention: seed %d %s %s: judges of the replay set added", seed, method, stage.name)
        continue
      p = stage_params(i)
      result = dict(seed=seed, method=method, stage=stage.name, index=stage.index, modality=stage.modality,
                    tasks=self.tasks(p, seed))
      result.update(self.earlier_stages(seed, stages, i, stage_params, cka=True, recon=recon))
      if bool(self.rc.replay.enabled) and methods.get(method).replays:
        result["replay"] = self.replay_quality(seed, method, stage, p)
      atomic_write_json(path, result)
      made = True
      logging.info("retention: seed %d %s %s measured: %s", seed, method, stage.name,
                   {m: round(v[str(self.rc.headline)], 4) for m, v in result["tasks"].items()
                    if str(self.rc.headline) in v})
    return made

  def earlier_stages(self, seed: int, stages: list[Stage], i: int, stage_params, *, cka: bool, recon: bool
                     ) -> dict[str, dict[str, Any]]:
    """The model after stage i on the held-out test data of every stage j <= i: drift from stage j's own model
    (`cka`: linear CKA; with `recon`, per image stage, `feature_distance`) and the masked-reconstruction errors
    (`recon`). `stage_params(j)` gives stage j's parameters."""
    out: dict[str, dict[str, Any]] = {}
    if cka:
      out["cka"] = {}
    if recon:
      out["recon"], out["feature_distance"] = {}, {}
    p = stage_params(i)
    for j in range(i + 1):
      m, name = stages[j].modality, stages[j].name
      if m not in self.order:  # joint's one stage spans every modality: no earlier model to drift from
        continue
      image = recon and self.is_image(m)
      if j == i:
        if cka:
          out["cka"][name] = 1.0
        distance = 0.0
      elif cka or image:
        test = self.split(m, str(self.rc.test_split)).images
        f_own, f_now = self.feats(stage_params(j), test), self.feats(p, test)
        if cka:
          out["cka"][name] = metrics.linear_cka(f_own, f_now)
        distance = metrics.relative_feature_distance(f_now, f_own)
      if image:
        out["feature_distance"][name] = distance
        out["recon"][name] = self.reconstruction(seed, stages[j], p)
    return out

  def replay_quality(self, seed: int, method: str, stage: Stage, params) -> dict[str, Any] | None:
    """How close the stage's replay set is to its held-out data, in the frozen stage encoder's features."""
    images = read_replay_set(stage, method)
    if images is None:
      return None
    m = stage.modality
    test = self.split(m, str(self.rc.test_split)).images
    train = self.split(m, "train").images
    real = features.random_sample(train, len(images), seed)
    f_test = self.feats(params, test)
    sets = {"replay": images, "real_same_size": real}
    if methods.get(method).replays == "synthetic":
      init = self.generator_init(seed, stage, len(images))
      if init is not None:
        sets["generator_init"] = init
    out: dict[str, Any] = dict(num_samples=int(len(images)), feature_dim=int(f_test.shape[1]))
    for name, x in sets.items():
      f = self.feats(params, x)
      out[name] = dict(frechet=metrics.frechet_distance(f, f_test), mean_pairwise_cosine=(
          metrics.mean_pairwise_cosine(f) if len(f) > 1 else float("nan")),
          pixel_mean=float(np.mean(x)), pixel_std=float(np.std(x)),
          channel_spread=float(np.mean(np.std(x, axis=-1))))
    out["test"] = dict(mean_pairwise_cosine=metrics.mean_pairwise_cosine(f_test), pixel_mean=float(np.mean(test)),
                       pixel_std=float(np.std(test)), channel_spread=float(np.mean(np.std(test, axis=-1))))
    # Nearest training image of each replay image, against the same for held-out images (the audit's figure):
    # a replay set much closer to the training images than held-out images are would be memorised data.
    out["nn_replay_to_train"] = distances.summarize_distances(distances.nearest_neighbours(images, train).distance)
    out["nn_test_to_train"] = distances.summarize_distances(distances.nearest_neighbours(test, train).distance)
    if self.judging(stage):
      out["judges"] = self.judges(seed, method, stage, images)
    k = int(self.rc.replay.grid_size)
    if k > 0:
      a, b = image_grid(images, k), image_grid(test, k)
      h = max(a.shape[0], b.shape[0])
      pad = lambda g: np.pad(g, ((0, h - g.shape[0]), (0, 0), (0, 0)), constant_values=255)
      grid = np.concatenate([pad(a), np.full((h, 6, 3), 255, np.uint8), pad(b)], axis=1)
      write_png(os.path.join(self.root, "grids", f"seed_{seed}_{method}_{stage.name}.png"), grid)
    return out

  # --- independent judges of a replay set (retention/judges.py) ---

  def generator_init(self, seed: int, stage: Stage, num: int) -> np.ndarray | None:
    key = (seed, stage.workdir, num)
    if key not in self._generator_init:
      self._generator_init[key] = initial_generator_images(stage, num, seed + 17)
    return self._generator_init[key]

  def judging(self, stage: Stage) -> bool:
    """Judges apply to 2D image stages (volumes are judged by their central slice; text never)."""
    return bool(self.rc.replay.judges.enabled) and self.is_image(stage.modality)

  def judge_net(self, modality: str):
    """The judge net of a labelled stage: a small CNN trained supervised on the stage's training split (another
    objective than the MAE's, never the inverted model); None without labels or with judge_net_steps 0."""
    steps = int(self.rc.replay.judges.judge_net_steps)
    if modality not in self._judge_nets:
      # The whole training split: a capped one is its first examples, which can be of one class (files sorted
      # by class, as the demo X-rays are).
      train = features.load_split(self.data(modality), "train", -1)
      ok = steps > 0 and train.labels is not None and len(np.unique(train.labels)) > 1
      self._judge_nets[modality] = judges.train_judge_features(train.images, train.labels, seed=0, steps=steps
                                                               ) if ok else None
    return self._judge_nets[modality]

  def _judge_kwargs(self, seed: int) -> dict[str, Any]:
    j = self.rc.replay.judges
    return dict(seed=int(seed), folds=int(j.folds), cnn_steps=int(j.cnn_steps))

  def _held_out(self, seed: int, modality: str, n: int) -> np.ndarray:
    """The same n held-out real images for every set judged for (seed, stage)."""
    held = self.split(modality, str(self.rc.replay.judges.split)).images
    if n > len(held):
      raise ValueError(f"retention judges: {n} images to judge but the {self.rc.replay.judges.split!r} split of "
                       f"{modality!r} holds {len(held)}; set config.retention.replay.judges.split to a larger one")
    return features.random_sample(held, n, int(seed) + 31)

  def anchors(self, seed: int, stage: Stage, n: int) -> dict[str, dict[str, float]]:
    """Real vs real (a training sample) and smoothed noise vs real, judged as a replay set of n images is;
    cached per (seed, stage, n) in `seed_<s>/anchors_<stage>_<n>.json`: every method of a seed shares them."""
    path = os.path.join(self.root, f"seed_{seed}", f"anchors_{stage.name}_{n}.json")
    cached = _read_json(path)
    if cached is not None:
      return cached
    m, kw = stage.modality, self._judge_kwargs(seed)
    held, net = self._held_out(seed, m, n), self.judge_net(m)
    train = self.split(m, "train").images
    real = features.random_sample(train, n, int(seed) + 37)
    noise = judges.smoothed_noise_like(train, n, seed=int(seed) + 41, sigma=float(self.rc.replay.judges.noise_sigma))
    out = {name: get_evaluator("judges")(x, held, feature_fn=None if net is None else net.features, **kw).run(None)
           for name, x in (("real_vs_real", real), ("smoothed_noise", noise))}
    atomic_write_json(path, out)
    return out

  def judges(self, seed: int, method: str, stage: Stage, images: np.ndarray | None = None
             ) -> dict[str, dict[str, float]]:
    """{'replay': the set's judges, 'real_vs_real', 'smoothed_noise', 'generator_init' (synthetic methods)}, all
    against the same held-out sample of the set's size."""
    images = read_replay_set(stage, method) if images is None else images
    n, m, kw = len(images), stage.modality, self._judge_kwargs(seed)
    held, net = self._held_out(seed, m, n), self.judge_net(m)
    feature_fn = None if net is None else net.features
    out = dict(self.anchors(seed, stage, n))
    out["replay"] = get_evaluator("judges")(images, held, feature_fn=feature_fn, **kw).run(None)
    if methods.get(method).replays == "synthetic":
      init = self.generator_init(seed, stage, n)
      if init is not None:
        out["generator_init"] = get_evaluator("judges")(init, held, feature_fn=feature_fn, **kw).run(None)
    return out

  # --- reading back ---

  def load_all(self, seeds, methods, stage_names) -> dict[str, Any]:
    """{'random': {seed: tasks}, 'runs': {method: {seed: {stage: measurement}}}} from the cache."""
    out: dict[str, Any] = {"random": {}, "runs": {m: {} for m in methods}}
    for s in seeds:
      r = _read_json(os.path.join(self.root, f"seed_{s}", "random.json"))
      if r is None:
        raise FileNotFoundError(f"{self.root}/seed_{s}/random.json is missing: the benchmark has not finished")
      out["random"][s] = r["tasks"]
      for m in methods:
        out["runs"][m][s] = {}
        for name in (["stage_1_joint"] if m == "joint" else stage_names):
          r = _read_json(self._path(s, m, name))
          if r is None:
            raise FileNotFoundError(f"{self.root}/seed_{s}/{m}/{name}.json is missing: the benchmark has not "
                                    "finished")
          out["runs"][m][s][name] = r
    return out
