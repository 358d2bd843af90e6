"""PNG figures of the privacy audit: closest pairs, nearest-neighbour distance histograms, radial spectra and
the membership-inference loss distributions. Every figure is written atomically."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
# Figure objects draw with the Agg canvas without pyplot, so the user's backend (e.g. a notebook's inline
# plots) is left alone.
from matplotlib.figure import Figure

from invcoss_jax.io_utils import atomic_path


def thumbnail(images: np.ndarray, max_side: int) -> np.ndarray:
  """(B, h, w, C) float32: the middle slice of volumes, subsampled (nearest) so its longest side is at most
  `max_side`; images already that small pass through."""
  x = np.asarray(images, np.float32)
  if x.ndim == 5:
    x = x[:, x.shape[1] // 2]
  if x.ndim != 4:
    raise ValueError(f"expected images (B, H, W, C) or volumes (B, D, H, W, C), got shape {x.shape}")
  h, w = x.shape[1:3]
  scale = max(h, w) / max(int(max_side), 1)
  if scale <= 1.0:
    return x
  rows = np.minimum((np.arange(max(1, round(h / scale))) + 0.5) * scale, h - 1).astype(int)
  cols = np.minimum((np.arange(max(1, round(w / scale))) + 0.5) * scale, w - 1).astype(int)
  return x[:, rows][:, :, cols]


def _display(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
  a = np.clip((a - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
  return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a[..., :3]


def _save(fig, path: str) -> None:
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def closest_pairs(path: str, panels: Sequence[dict], title: str, pad: int = 4) -> None:
  """One column pair per panel: rows of (query, its nearest training image), closest first.

  Each panel is dict(name, queries (k, h, w, C), neighbours (k, h, w, C), distances (k,), indices (k,),
  query_indices (k,)). A pair is shown on one intensity scale (the pair's joint range) so copies look
  identical. The pairs are composed into one image (one axes: fast to draw), a caption over each cell.
  """
  h, w = panels[0]["queries"].shape[1:3]
  rows = max(len(p["distances"]) for p in panels)
  cols = 2 * len(panels)
  grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.float32)
  texts = []
  for j, p in enumerate(panels):
    for i in range(len(p["distances"])):
      q, n = p["queries"][i], p["neighbours"][i]
      lo, hi = float(min(q.min(), n.min())), float(max(q.max(), n.max()))
      for c, (img, label) in enumerate(((q, f"{p['name']} query {p['query_indices'][i]}"),
                                        (n, f"train {p['indices'][i]}, d={p['distances'][i]:.3g}"))):
        y0, x0 = pad + i * (h + pad), pad + (2 * j + c) * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = _display(img, lo, hi)
        texts.append((x0, y0, label))
  scale = max(1.0, 96.0 / max(h, w))  # draw small images at least ~96 px per cell
  fig = Figure(figsize=(grid.shape[1] * scale / 100.0, grid.shape[0] * scale / 100.0 + 0.4))
  ax = fig.add_axes((0, 0, 1, grid.shape[0] * scale / 100.0 / fig.get_figheight()))
  ax.imshow(grid, interpolation="nearest")
  ax.axis("off")
  for x0, y0, label in texts:
    ax.text(x0, y0 + 1, label, fontsize=6, color="yellow", va="top", ha="left",
            bbox=dict(facecolor="black", alpha=0.6, pad=1, lw=0))
  fig.suptitle(title, fontsize=8, y=1.0)
  _save(fig, path)


def distance_histograms(path: str, spaces: Mapping[str, Mapping[str, np.ndarray]],
                        thresholds: Mapping[str, float], quantile: float) -> None:
  """One panel per space: histograms of the nearest-training distance of every set, and the threshold."""
  fig = Figure(figsize=(5.5 * len(spaces), 3.6))
  axes = fig.subplots(1, len(spaces), squeeze=False)
  for ax, (space, sets) in zip(axes[0], spaces.items()):
    finite = np.concatenate([np.asarray(d, np.float64) for d in sets.values()])
    bins = np.linspace(0.0, max(float(finite.max()), 1e-6) * 1.02, 40)
    for name, d in sets.items():
      ax.hist(np.asarray(d), bins=bins, alpha=0.5, density=True, label=f"{name} (n={len(d)})")
    ax.axvline(thresholds[space], color="k", ls="--", lw=1, label=f"threshold: held-out q={quantile:g}")
    ax.set_xlabel(f"distance to the nearest training image ({space})")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
  _save(fig, path)


def spectra(path: str, centres: np.ndarray, profiles: Mapping[str, np.ndarray], cutoff: float) -> None:
  """Mean radial power spectrum of every set (log scale) and the high-frequency cutoff."""
  fig = Figure(figsize=(5.5, 3.6))
  ax = fig.subplots()
  for name, prof in profiles.items():
    ax.semilogy(centres, np.maximum(np.asarray(prof), 1e-30), label=name)
  ax.axvline(cutoff, color="k", ls="--", lw=1, label=f"cutoff {cutoff:g}")
  ax.set_xlabel("normalised spatial frequency (1 = Nyquist)")
  ax.set_ylabel("mean power")
  ax.legend(fontsize=7)
  _save(fig, path)


def membership_losses(path: str, member_losses: np.ndarray, nonmember_losses: np.ndarray, auc: float,
                      ci: Sequence[float]) -> None:
  """Histograms of the per-image masked-reconstruction loss of training and held-out images."""
  fig = Figure(figsize=(5.5, 3.6))
  ax = fig.subplots()
  both = np.concatenate([member_losses, nonmember_losses])
  bins = np.linspace(float(both.min()), float(both.max()) + 1e-9, 40)
  ax.hist(member_losses, bins=bins, alpha=0.5, density=True, label=f"training (n={len(member_losses)})")
  ax.hist(nonmember_losses, bins=bins, alpha=0.5, density=True, label=f"held-out (n={len(nonmember_losses)})")
  ax.set_xlabel("per-image masked-reconstruction loss")
  ax.set_ylabel("density")
  ax.set_title(f"membership inference AUC {auc:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]", fontsize=9)
  ax.legend(fontsize=7)
  _save(fig, path)


def figure_paths(workdir: str, set_names: Sequence[str]) -> dict[str, str]:
  names = {"distances": "nn_distances.png", "spectra": "spectra.png", "membership": "mia_losses.png"}
  names.update({f"closest_pairs_{s}": f"closest_pairs_{s}.png" for s in set_names})
  return {k: os.path.join(workdir, v) for k, v in names.items()}
