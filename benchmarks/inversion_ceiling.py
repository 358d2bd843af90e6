r"""Is the realism of the inverted X-rays limited by the inversion budget, or by what the statistics constrain?

A diagnostic for issue 26 on the finished stage-1 X-ray models of the `content` benchmark
(`<root>/seed_<s>/seqssl/stage_1_xray`: the shared first stage, its checkpoint and statistics.npz). Per seed:

  A   the benchmark's setting: `configs/retention.py:content,priors` (the realism priors, InvUNet, batches of 64,
      200 steps from a fresh generator per batch) on the set the benchmark replays (5 % of the stage, 235
      images), with the stage's inversion seed (config.seed + 1009 * stage index), so the set is the one the
      `priors` ablation replayed (checked against its stored shard with --check_root);
  A64 the first batch of A (64 images, 200 steps): A at the size of the single-batch variants;
  B   that same batch (same initial generator, latents and L_task masks) optimised for --long_steps steps;
  B0  the same batch without a generator: the pixels themselves (grey: one channel's logits, repeated over
      the three channels the model sees), --long_steps steps at inversion.lr_latents;
  C   as B, with L_norm's weight 0 (only L_task, L_rep and the pixel priors): what the statistics contribute.

Every set is judged against held-out real X-rays of the same size (the stage's `val` split, sampled as the
benchmark's Measurer._held_out does) by the three classifier two-sample tests of retention/judges.py (logistic
regression on pixels, gradient boosting on pixel statistics, a small CNN; 5-fold out-of-fold AUC), next to
the anchors real-vs-real and smoothed noise at the same n. L_norm is reported per set: of the whole set's
statistics against the stored ones (the benchmark's `l_norm_synthetic_set`), the optimiser's value at the end
of each batch, the curve of the long runs, and, for scale, that of as many real images (train and val).

  .venv/bin/python benchmarks/inversion_ceiling.py --seeds=0,1 --long_steps=1500 \
      --out=benchmarks/results/inversion_ceiling.json
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from invcoss_jax import data as data_lib  # noqa: E402
from invcoss_jax.defaults import load_config_file  # noqa: E402
from invcoss_jax.inversion import engine, losses, statistics  # noqa: E402
from invcoss_jax.inversion.config import inversion_spec  # noqa: E402
from invcoss_jax.io_utils import atomic_write_json  # noqa: E402
from invcoss_jax.models.invunet import output_fn  # noqa: E402
from invcoss_jax.retention import features, judges  # noqa: E402
from invcoss_jax.train.checkpoint import load_trained_stage  # noqa: E402

STAGE_INDEX = 1  # stage_1_xray: the continual job's inversion seed is config.seed + 1009 * index


class GreyPixels(nn.Module):
  """No generator: the latent of each image is its (H*W) pre-activation pixels, one grey channel repeated over
  `channels` (library's generator='none' optimises every channel apart, which grey X-rays never are; its
  grey='yes' is refused without a generator). A dummy parameter keeps the optimiser's tree non-empty."""
  shape: tuple
  channels: int
  out_act: str

  @nn.compact
  def __call__(self, z, train: bool = True):
    dummy = self.param("unused", nn.initializers.zeros, ())
    x = output_fn(self.out_act)(z.reshape(z.shape[0], *self.shape, 1)) + 0.0 * dummy
    return jnp.repeat(x, self.channels, axis=-1)


class CurveWriter:
  """Collects `synthesize_with_report`'s loss curves (what a clu writer would receive)."""

  def __init__(self):
    self.rows = []

  def write_scalars(self, step, scalars):
    self.rows.append(dict(step=int(step), **{k.split("/")[-1]: float(v) for k, v in scalars.items()}))


def set_l_norm(model, params, images, stats) -> float:
  s = statistics.compute_statistics(model, params, [images[i:i + 256] for i in range(0, len(images), 256)])
  return float(losses.l_norm(jnp.asarray(s.mean, jnp.float32), jnp.asarray(s.var, jnp.float32),
                             jnp.asarray(stats.mean, jnp.float32), jnp.asarray(stats.var, jnp.float32)))


def invert(model, params, stats, inv, image_shape, *, seed: int, num_samples: int, steps: int | None = None,
           norm_weight: float | None = None, grey_pixels: bool = False):
  """(images, report, curve) of one inversion with the overrides; the rng is the stage's inversion seed."""
  inv = inv.copy_and_resolve_references()
  if steps is not None:
    inv.schedule_2d.steps = inv.schedule_2d.init_steps = int(steps)
  if norm_weight is not None:
    inv.loss_weights.norm = float(norm_weight)
  if grey_pixels:
    inv.schedule_2d.latent_dim = int(np.prod(image_shape[:-1]))
    inv.lr_generator = 0.0  # the dummy parameter
  spec = engine.resolve_grey(inversion_spec(inv), "xray")
  writer = CurveWriter()
  build = engine.build_generator
  if grey_pixels:
    out_act = engine.output_activation(spec.program, 2)
    engine.build_generator = lambda p, shape: GreyPixels(tuple(shape[:-1]), int(shape[-1]), out_act)
  try:
    t = time.time()
    images, report = engine.synthesize_with_report(model, params, stats, spec, image_shape=image_shape,
                                                   rng=jax.random.key(seed), num_samples=num_samples,
                                                   writer=writer)
    report["seconds"] = time.time() - t
  finally:
    engine.build_generator = build
  return images, report, writer.rows


def judge(images, held, seed: int, cnn_steps: int) -> dict:
  g = judges.to_grey(images)[..., None]
  h = judges.to_grey(held)[..., None]
  t = time.time()
  out = dict(logistic=judges.c2st_logistic(h, g, seed=seed), statistics=judges.c2st_statistics(h, g, seed=seed),
             cnn=judges.c2st_cnn(h, g, seed=seed, steps=cnn_steps))
  out["tv"] = float(judges.total_variation(g).mean())
  out["seconds"] = time.time() - t
  return out


def run_seed(args, seed: int, inv) -> dict:
  stage_dir = os.path.join(args.root, f"seed_{seed}", "seqssl", "stage_1_xray")
  stage_cfg, model, params = load_trained_stage(stage_dir)
  image_shape = tuple(int(s) for s in data_lib.image_shape(stage_cfg.data))
  stored = statistics.load_statistics(os.path.join(stage_dir, "statistics.npz"))
  # The pixel statistics the priors need, in the statistics pass's own way (write_statistics); the feature
  # statistics stay the stored ones (what the benchmark inverted).
  fresh = statistics.compute_statistics(model, params, data_lib.make_eval_iterator(
      stage_cfg.data, batch_size=int(inv.stats_batch_size)), pixel=True)
  stats = stored.replace(pixel=fresh.pixel)
  out = dict(seed=seed, stage=os.path.abspath(stage_dir), image_shape=list(image_shape),
             feature_stats_recomputed_max_abs_diff=float(max(np.abs(fresh.mean - stored.mean).max(),
                                                             np.abs(fresh.var - stored.var).max())))
  check = os.path.join(args.check_root, "runs", f"seed_{seed}", "invcoss", "stage_1_xray") if args.check_root else ""
  if check and os.path.isfile(os.path.join(check, "statistics.npz")):
    ref = statistics.load_statistics(os.path.join(check, "statistics.npz"))
    if ref.pixel is not None:
      out["pixel_stats_vs_ablation_max_abs_diff"] = float(max(np.abs(np.asarray(ref.pixel[k]) - np.asarray(
          stats.pixel[k])).max() for k in ("mean", "var", "tv")))

  inv_seed = seed + 1009 * STAGE_INDEX
  num = int(args.num_samples) or int(round(0.05 * data_lib.num_examples(stage_cfg.data)))
  n_small = int(inv.schedule_2d.batch_size)
  val = features.load_split(stage_cfg.data, "val").images
  train = features.load_split(stage_cfg.data, "train", 5000).images
  held = {n: features.random_sample(val, n, seed + 31) for n in (num, n_small)}  # Measurer._held_out

  sets, rows = {}, []

  def record(name, images, *, steps, report=None, curve=None, note=""):
    row = dict(variant=name, steps=steps, set_size=int(len(images)), note=note,
               l_norm_set=set_l_norm(model, params, images, stats))
    if report is not None:
      row["l_norm_batch_end"] = [b["end"].get("norm") for b in report["batches"]]
      row["l_norm_batch_start"] = [b["start"].get("norm") for b in report["batches"]]
      row["end_terms"] = report["end"]
      row["inversion_seconds"] = report["seconds"]
      row["mean_pairwise_cosine"] = report["mean_pairwise_cosine"]
    if curve:
      every = max(1, steps // 20)
      row["curve"] = [r for r in curve if r["step"] % every == 0 or r["step"] == steps]
    row["judges"] = judge(images, held[len(images)], seed, args.cnn_steps)
    rows.append(row)
    sets[name] = images
    j = row["judges"]
    print(f"[seed {seed}] {name:<28} steps {steps:>5} n {len(images):>3}  L_norm(set) {row['l_norm_set']:8.2f}  "
          f"AUC logistic {j['logistic']:.3f} statistics {j['statistics']:.3f} cnn {j['cnn']:.3f}  "
          f"TV {j['tv']:.4f}  ({row.get('inversion_seconds', 0):.0f} s + {j['seconds']:.0f} s)", flush=True)
    atomic_write_json(args.partial, dict(rows=rows))
    return row

  # Anchors at both sizes, as Measurer.anchors draws them.
  for n in sorted(held):
    record(f"(real vs real, train) n={n}", features.random_sample(train, n, seed + 37), steps=0,
           note="anchor: the best any set can score")
    record(f"(smoothed noise) n={n}", judges.smoothed_noise_like(train, n, seed=seed + 41, sigma=1.5), steps=0,
           note="anchor: the floor")

  steps_a = int(inv.schedule_2d.init_steps)
  if seed in args.a_from_check:  # the priors ablation's stored set and its inversion.json (same setting and seed)
    import json
    images_a = np.load(os.path.join(check, "synthetic", "shard_00000.npz"))["images"]
    with open(os.path.join(check, "inversion.json")) as f:
      rep_a = json.load(f)
    rep_a["seconds"] = 0.0
    record("A: priors (benchmark)", images_a, steps=steps_a, report=rep_a,
           note=f"stored set of the priors ablation ({check}), not regenerated")
    record("A64: first batch of A", images_a[:n_small], steps=steps_a, note="A's batch 0 alone")
  elif not args.skip_a:
    images_a, rep_a, _ = invert(model, params, stats, inv, image_shape, seed=inv_seed, num_samples=num)
    row_a = record("A: priors (benchmark)", images_a, steps=steps_a, report=rep_a,
                   note=f"{rep_a['num_batches']} batches of {n_small}, fresh generator each")
    shard = os.path.join(check, "synthetic", "shard_00000.npz") if check else ""
    if shard and os.path.isfile(shard):
      ref = np.load(shard)["images"]
      row_a["reproduces_ablation_set_max_abs_diff"] = (float(np.abs(ref - images_a).max())
                                                       if ref.shape == images_a.shape else None)
    record("A64: first batch of A", images_a[:n_small], steps=steps_a, note="A's batch 0 alone")

  long = int(args.long_steps)
  images_b, rep_b, curve_b = invert(model, params, stats, inv, image_shape, seed=inv_seed, num_samples=n_small,
                                    steps=long)
  record("B: priors, long", images_b, steps=long, report=rep_b, curve=curve_b, note="A's batch 0, more steps")
  if not args.skip_pixels:
    images_p, rep_p, curve_p = invert(model, params, stats, inv, image_shape, seed=inv_seed,
                                      num_samples=n_small, steps=long, grey_pixels=True)
    record("B0: priors, long, no generator", images_p, steps=long, report=rep_p, curve=curve_p,
           note="grey pixels optimised directly at lr_latents")
  images_c, rep_c, curve_c = invert(model, params, stats, inv, image_shape, seed=inv_seed, num_samples=n_small,
                                    steps=long, norm_weight=0.0)
  record("C: priors, long, L_norm weight 0", images_c, steps=long, report=rep_c, curve=curve_c,
         note="control: no statistics matching")
  # L_norm of as many real images, for scale (the sampling floor of a set's statistics).
  for n in sorted(held):
    rows.append(dict(variant=f"(real val) n={n}", steps=0, set_size=n, l_norm_set=set_l_norm(model, params, held[n],
                                                                                             stats)))
  if args.save_images:
    np.savez_compressed(os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                     f"inversion_ceiling_sets_seed{seed}.npz"),
                        **{k.split(":")[0]: v[..., :1].astype(np.float16) for k, v in sets.items()
                           if not k.startswith("(")})
  out["rows"] = rows
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default="workdirs/retention_content/runs", help="the content benchmark's runs/")
  p.add_argument("--check_root", default="workdirs/ablation_content/priors",
                 help="the priors ablation's workdir: A's set and pixel statistics are compared with its own")
  p.add_argument("--preset", default="configs/retention.py:content,priors")
  p.add_argument("--seeds", default="0")
  p.add_argument("--num_samples", type=int, default=0, help="A's set size (0: the benchmark's, 5 %% of the stage)")
  p.add_argument("--long_steps", type=int, default=1500, help="steps of the single-batch variants B, B0, C")
  p.add_argument("--cnn_steps", type=int, default=300)
  p.add_argument("--skip_a", action="store_true")
  p.add_argument("--skip_pixels", action="store_true")
  p.add_argument("--a_from_check", default="",
                 help="seeds (e.g. 1) whose A is the priors ablation's stored set under --check_root instead of a "
                 "new inversion (the same setting and seed; checked to reproduce where regenerated)")
  p.add_argument("--save_images", action="store_true")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  args.partial = args.out + ".partial"
  args.a_from_check = {int(x) for x in args.a_from_check.split(",") if x}
  config = load_config_file(args.preset)
  inv = config.inversion
  t = time.time()
  result = dict(command=" ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/inversion_ceiling.py"]
                                 + list(sys.argv[1:] if argv is None else argv)),
                preset=args.preset, backend=jax.default_backend(),
                inversion=dict(loss_weights=dict(inv.loss_weights), lr_generator=inv.lr_generator,
                               lr_latents=inv.lr_latents, schedule_2d=dict(inv.schedule_2d),
                               invunet=dict(inv.invunet)), seeds=[])
  for s in [int(x) for x in args.seeds.split(",") if x]:
    result["seeds"].append(run_seed(args, s, inv))
    result["seconds"] = time.time() - t
    atomic_write_json(args.out, result)
  if os.path.exists(args.partial):
    os.remove(args.partial)
  print(f"wrote {args.out} ({time.time() - t:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
