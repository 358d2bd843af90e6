r"""Inversion measurements on the demo X-ray and MRI stages (the figures of issue 4's closing note).

  .venv/bin/python benchmarks/inversion_ablation.py --workdir=/tmp/inversion_ablation
  .venv/bin/python benchmarks/inversion_ablation.py --workdir=... --modalities=xray --steps=100 --rep_sweep=1,10

Trains the demo stages (configs/<modality>.py:demo, `pretrain`, which ends with the statistics pass) into
<workdir>/<modality> unless they are there, then inverts each with its `:demo` inversion settings and reports:
  1. L_norm at the first and the last step of each batch (InvUNet, the paper's weights);
  2. the mean pairwise cosine similarity of the synthetic images' features, alpha_rep = 0.1 vs 0 (and with
     L_rep on the data-centred feature, rep_feature='centered_mean'), for the raw and the centred feature;
  3. InvUNet vs CMI's bottom-to-top generator (and its large variant) vs no generator: final L_norm + L_task
     after the same number of steps, and the L_norm of the whole synthetic set;
  4. the statistics' size vs a 5 % real replay buffer.
For scale, the same measures on as many real examples as synthetic ones (the first ones of the stage's data):
their features' mean pairwise cosine similarity and the L_norm of their statistics. For 3D, one more variant
with an identity output (the demo MRI is z-scored, beyond the paper's tanh range). Every variant uses the same
seed, batches and steps. Results go to <workdir>/inversion_ablation.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from invcoss_jax import data as data_lib  # noqa: E402
from invcoss_jax import jobs  # noqa: E402
from invcoss_jax.inversion import engine, losses, statistics  # noqa: E402
from invcoss_jax.io_utils import atomic_write_json  # noqa: E402
from invcoss_jax.train.checkpoint import load_trained_stage  # noqa: E402


def demo_config(modality: str):
  spec = importlib.util.spec_from_file_location(f"{modality}_config", REPO / "configs" / f"{modality}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("demo")


def ensure_stage(modality: str, workdir: pathlib.Path) -> pathlib.Path:
  stage = workdir / modality
  if not (stage / "statistics.npz").exists():
    t = time.time()
    jobs.run(demo_config(modality), stage)
    print(f"[{modality}] trained the demo stage in {time.time() - t:.0f} s", flush=True)
  return stage


def param_count(generator, latent_dim: int) -> int:
  if generator is None:
    return 0
  shapes = jax.eval_shape(lambda: generator.init(jax.random.key(0), jnp.zeros((2, latent_dim)), train=True))
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"])))


def set_l_norm(model, params, images, stats) -> float:
  """L_norm between the statistics of a whole image set and the stored ones."""
  s = statistics.compute_statistics(model, params, [images[i:i + 64] for i in range(0, len(images), 64)])
  return float(losses.l_norm(jnp.asarray(s.mean, jnp.float32), jnp.asarray(s.var, jnp.float32),
                             jnp.asarray(stats.mean), jnp.asarray(stats.var)))


def feature_cosines(model, params, images, stats) -> dict:
  """Mean pairwise cosine similarity of the images' features: 'raw' = the mean patch token of the encoder
  output (L_rep's default feature), 'centered' = the last block's mean patch token minus its real-data mean,
  'centered_sq' = the mean squared cosine of the centred features."""
  from invcoss_jax.inversion.context import rep_features
  blocks, tokens = jax.jit(lambda p, x: statistics.encoder_forward(model, p, x))(params, images)
  raw = rep_features(tokens, "mean")
  centered = rep_features(tokens, "centered_mean", last_block=blocks[-1], target_stats=stats)
  return dict(raw=float(losses.mean_pairwise_cosine(raw)), centered=float(losses.mean_pairwise_cosine(centered)),
              centered_sq=mean_pairwise_sq_cosine(centered))


def mean_pairwise_sq_cosine(features) -> float:
  """Mean squared cosine over distinct pairs (what L_rep minimises; 0 = orthogonal, 1 = collinear)."""
  u = np.asarray(features, np.float64)
  u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
  s = np.square(u @ u.T)
  n = len(u)
  return float((s.sum() - np.trace(s)) / (n * (n - 1)))


def real_reference(model, params, stats, data_cfg, num: int) -> dict:
  """Feature cosines and L_norm of the first `num` real examples."""
  images = []
  for batch in data_lib.make_eval_iterator(data_cfg, batch_size=64):
    images.append(batch["image"])
    if sum(len(x) for x in images) >= num:
      break
  images = np.concatenate(images)[:num]
  return dict(num=len(images), cosine=feature_cosines(model, params, images, stats),
              l_norm=set_l_norm(model, params, images, stats))


def run_variant(name, model, params, stats, inv_cfg, image_shape, num_samples, seed):
  rank = len(image_shape) - 1
  t = time.time()
  images, report = engine.synthesize_with_report(model, params, stats, inv_cfg, image_shape=image_shape,
                                                 rng=jax.random.key(seed), num_samples=num_samples)
  seconds = time.time() - t
  set_norm = set_l_norm(model, params, images, stats)
  cosine = feature_cosines(model, params, images, stats)
  sched = inv_cfg[f"schedule_{rank}d"]
  row = dict(
      variant=name, generator=inv_cfg.generator,
      generator_params=param_count(engine.build_generator(inv_cfg, image_shape), int(sched.latent_dim)),
      weights=dict(inv_cfg.loss_weights), steps=[b["steps"] for b in report["batches"]],
      start=report["start"], end=report["end"],
      norm_plus_task_end=report["end"].get("norm", 0.0) + report["end"].get("task", 0.0),
      l_norm_synthetic_set=set_norm, cosine=cosine,
      discarded=len(report["discarded"]), seconds=seconds)
  print(f"  {name:<18} gen {row['generator_params']:>9,d}  L_norm {row['start'].get('norm', float('nan')):8.3f}"
        f" -> {row['end'].get('norm', float('nan')):8.3f}  norm+task {row['norm_plus_task_end']:8.3f}  "
        f"set L_norm {set_norm:8.3f}  cos raw {cosine['raw']:.6f} centred {cosine['centered']:.4f} "
        f"centred^2 {cosine['centered_sq']:.4f}  "
        f"{seconds:6.1f} s", flush=True)
  return row


def measure(modality: str, stage: pathlib.Path, steps: int | None, seed: int, rep_sweep: list[float]) -> dict:
  stage_cfg, model, params = load_trained_stage(stage)
  stats = statistics.load_statistics(stage / "statistics.npz")
  image_shape = tuple(data_lib.image_shape(stage_cfg.data))
  rank = len(image_shape) - 1
  base = demo_config(modality).inversion  # the :demo inversion settings
  if steps:
    base[f"schedule_{rank}d"].update(steps=steps, init_steps=steps)
  num_samples = int(base.num_samples)
  stats_summary = json.loads((stage / "statistics.json").read_text())
  print(f"[{modality}] image {image_shape}, {num_samples} samples in batches of "
        f"{base[f'schedule_{rank}d'].batch_size}, statistics {stats_summary['statistics_bytes']:,d} bytes vs "
        f"5 % buffer {stats_summary['replay_buffer_bytes']['0.05']:,d} bytes", flush=True)

  real = real_reference(model, params, stats, stage_cfg.data, num_samples)
  print(f"  {'real examples':<18} {real['num']} of them: L_norm {real['l_norm']:8.3f}  cos raw "
        f"{real['cosine']['raw']:.6f} centred {real['cosine']['centered']:.4f} centred^2 "
        f"{real['cosine']['centered_sq']:.4f}", flush=True)
  rows = []

  def variant(name, **overrides):
    cfg = base.copy_and_resolve_references()
    for k, v in overrides.items():
      if k in cfg.loss_weights:
        cfg.loss_weights[k] = v
      else:
        cfg[k] = v
    rows.append(run_variant(name, model, params, stats, cfg, image_shape, num_samples, seed))
    return rows[-1]

  invunet = variant("invunet")
  no_rep = variant("invunet, rep=0", rep=0.0)
  centered_rep = variant("invunet, rep centred", rep_feature="centered_mean")
  cmi = variant("cmi", generator="cmi")
  cmi_large = variant("cmi_large", generator="cmi_large")
  direct = variant("none", generator="none")
  if rank == 3:
    variant("invunet, identity", output_activation="identity")
  sweep = {w: variant(f"invunet, rep={w:g}", rep=w)["cosine"] for w in rep_sweep}
  return dict(
      modality=modality, image_shape=list(image_shape), num_samples=num_samples,
      statistics_bytes=stats_summary["statistics_bytes"],
      replay_buffer_bytes_5pct=stats_summary["replay_buffer_bytes"]["0.05"],
      buffer_over_statistics_5pct=stats_summary["replay_buffer_bytes"]["0.05"] / stats_summary["statistics_bytes"],
      l_norm_start=invunet["start"]["norm"], l_norm_end=invunet["end"]["norm"],
      cosine_rep_0_1=invunet["cosine"], cosine_rep_0=no_rep["cosine"],
      cosine_rep_0_1_centered_feature=centered_rep["cosine"],
      real=real, rep_sweep_cosine={f"{w:g}": c for w, c in sweep.items()},
      norm_plus_task_end={r["variant"]: r["norm_plus_task_end"] for r in (invunet, cmi, cmi_large, direct)},
      variants=rows)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="stages are trained into <workdir>/<modality> if absent")
  p.add_argument("--modalities", default="xray,mri")
  p.add_argument("--steps", type=int, default=0, help="steps per batch (0: the :demo preset's)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--rep_sweep", default="", help="extra alpha_rep values, e.g. 1,10 (diversity vs alpha_rep)")
  args = p.parse_args(argv)
  workdir = pathlib.Path(args.workdir)
  results = dict(args=vars(args), backend=jax.default_backend(), devices=len(jax.devices()), modalities={})
  for modality in args.modalities.split(","):
    stage = ensure_stage(modality, workdir)
    sweep = [float(w) for w in args.rep_sweep.split(",") if w]
    results["modalities"][modality] = measure(modality, stage, args.steps or None, args.seed, sweep)
  atomic_write_json(workdir / "inversion_ablation.json", results)
  print(f"wrote {workdir / 'inversion_ablation.json'}")


if __name__ == "__main__":
  main()
