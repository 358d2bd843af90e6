"""The Markdown summary of an audit (the numbers of audit.json, with one line on how to read each)."""

from __future__ import annotations

from typing import Any


def _ci(d: dict) -> str:
  return f"[{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]"


_JUDGE_ROWS = (("synthetic", "synthetic"), ("er_buffer", "replay buffer"), ("real_vs_real", "real vs real"),
               ("smoothed_noise", "smoothed noise"))
_JUDGE_COLUMNS = (("c2st_logistic_auc", "C2ST logistic AUC"), ("c2st_statistics_auc", "C2ST statistics AUC"),
                  ("c2st_cnn_auc", "C2ST CNN AUC"), ("kid", "KID"), ("precision", "precision"),
                  ("recall", "recall"), ("density", "density"), ("coverage", "coverage"),
                  ("mean_map_corr", "mean-map corr"), ("std_map_corr", "std-map corr"))


def _num(v) -> str:
  return "-" if v is None else f"{v:.3f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _judges_section(judged: dict[str, dict], info: dict[str, Any]) -> list[str]:
  """The independent judges of the synthetic set (invcoss_jax/retention/judges.py) as a table."""
  lines = ["", "## Independent judges of the synthetic set", ""]
  if info.get("skipped"):
    return lines + [f"Skipped: {info['skipped']}."]
  net = info.get("judge_net", {})
  lines += [
      f"Each set ({info['n']} images) against the same {info['n']} held-out real images. A classifier two-sample "
      "test's AUC is 0.5 when a classifier trained from scratch cannot tell the set from held-out real images "
      "and 1 when it always can; none of these judges ever saw the inverted model (the classifiers are fitted "
      "on the two sets, KID and precision/recall/density/coverage live in a small CNN trained on the training "
      "split's class labels, the map correlations are fixed pixel statistics). Real vs real (training images) "
      "is the best a set can do, smoothed noise the floor it must clearly beat.", "",
  ]
  if net.get("trained"):
    acc = (f"; held-out accuracy {net['heldout_accuracy']:.3f} (majority class "
           f"{net['heldout_majority_class_rate']:.3f})" if "heldout_accuracy" in net else "")
    lines += [f"Judge net: {net['steps']} steps on {net['num_train']} training images{acc}.", ""]
  else:
    lines += [f"No judge net ({net.get('reason', 'not trained')}): no KID nor PRDC.", ""]
  lines += ["| set | " + " | ".join(title for _, title in _JUDGE_COLUMNS) + " |",
            "|---|" + "---|" * len(_JUDGE_COLUMNS)]
  for key, title in _JUDGE_ROWS:
    if key in judged:
      lines.append(f"| {title} | " + " | ".join(_num(judged[key].get(c)) for c, _ in _JUDGE_COLUMNS) + " |")
  return lines


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
  if "judges_info" in audit:
    lines += _judges_section(audit["judges"], audit["judges_info"])
  lines += ["", "## Figures", ""]
  lines += [f"- `{f}`" for f in audit.get("figures", {}).values()]
  return "\n".join(lines) + "\n"
