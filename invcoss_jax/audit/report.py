"""The Markdown summary of an audit (the numbers of audit.json, with one line on how to read each)."""

from __future__ import annotations

from typing import Any


def _ci(d: dict) -> str:
  return f"[{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]"


def markdown(audit: dict[str, Any]) -> str:
  """audit.md from the dict the audit job (invcoss_jax/jobs/audit.py) writes to audit.json."""
  mia = audit["membership_inference"]
  th = audit["memorisation_thresholds"]
  q = th["quantile"]
  level = f"{100 * mia['level']:g} %"
  lines = [
      f"# Privacy audit of `{audit['stage']}`", "",
      f"- training split (members): {audit['train']['source']}, {audit['train']['num_examples']} images",
      f"- held-out split (never seen): {audit['heldout']['source']}, {audit['heldout']['num_examples']} images",
      f"- image shape {tuple(audit['image_shape'])}; pixel distances: {audit['units']['pixel']}; feature "
      f"distances: {audit['units']['feature']}", "",
      "Definitions and how to read every number: docs/privacy_audit.md.", "",
      "## Membership inference against the pre-trained model", "",
      f"AUC of telling training from held-out images by their masked-reconstruction loss: **{mia['auc']:.3f}** "
      f"({level} bootstrap CI {_ci(mia)}, {mia['num_bootstrap']} resamples; {mia['num_members']} members, "
      f"{mia['num_nonmembers']} non-members; mask ratio {mia['mask_ratio']:g}, {mia['num_masks']} masks per "
      "image).",
      "TPR at low FPR: " + ", ".join(f"{v:.3f} at FPR {k}" for k, v in mia["tpr_at_fpr"].items()) + ".",
      f"Mean loss: members {mia['mean_loss_members']:.4f}, non-members {mia['mean_loss_nonmembers']:.4f}.", "",
      "0.5 = the model's losses say nothing about who was in the training set; an interval that excludes 0.5 "
      "means they do.", "",
      "## Nearest neighbours and memorisation rate", "",
      f"Threshold: the {q:g}-quantile of the held-out images' nearest-training distances (pixel "
      f"{th['pixel']:.4g}, feature {th['feature']:.4g}). Memorisation rate = fraction of a set closer than that "
      f"to some training image; unseen real images score about {q:g} (the base rate), copies of training "
      "images score 1.", "",
      "| set | samples | space | median d(train) | median d(held-out) | memorisation rate | "
      f"{level} CI | rate / base |",
      "|---|---|---|---|---|---|---|---|",
  ]
  ref = audit["heldout_reference"]
  for sp in ("pixel", "feature"):
    lines.append(f"| held-out (reference) | {ref['num_samples']} | {sp} | {ref[sp]['to_train']['median']:.4g} "
                 f"| - | {q:g} by definition | - | 1 |")
  for name, s in audit["sets"].items():
    for sp in ("pixel", "feature"):
      m = s[sp]["memorisation"]
      lines.append(f"| {name} | {s['num_samples']} | {sp} | {s[sp]['to_train']['median']:.4g} | "
                   f"{s[sp]['to_heldout']['median']:.4g} | {m['rate']:.3f} | {_ci(m)} | "
                   f"{m['rate'] / m['base_rate']:.2f} |")
  hf = audit["high_frequency"]
  lines += [
      "", "## High-frequency energy", "",
      f"Share of each image's spectral energy above normalised frequency {hf['cutoff']:g} (1 = Nyquist), mean "
      "over the set.", "",
      "| set | mean ratio | relative to training images |", "|---|---|---|",
      f"| training | {hf['training']['mean']:.4f} | 1 |",
      f"| held-out | {ref['high_frequency']['mean']:.4f} | {ref['high_frequency']['relative_to_training']:.3f} |",
  ]
  for name, s in audit["sets"].items():
    lines.append(f"| {name} | {s['high_frequency']['mean']:.4f} | {s['high_frequency']['relative_to_training']:.3f} |")
  lines += ["", "## Figures", ""]
  lines += [f"- `{f}`" for f in audit.get("figures", {}).values()]
  return "\n".join(lines) + "\n"
