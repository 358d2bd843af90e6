"""medcoss: MedCoSS's k-means buffer (main_buffer_kmean.py): k-means with int(N x kmeans.cluster_fraction)
clusters on the encoder features of the stage (mask ratio 0), and from every cluster its members nearest the
centroid, int(buffer_fraction x N // clusters) of them; replayed as er's real buffer."""

from __future__ import annotations

import jax

from invcoss_jax.continual import buffers, methods
from invcoss_jax.continual.methods.er import RealBuffer
from invcoss_jax.measure import features


class KMeansBuffer(RealBuffer):
  text_buffer = "kmeans"

  def choose(self, end, fraction):
    c = end.cfg.continual
    feats = features.encoder_features(end.model, jax.device_get(end.params),
                                      end.eval_batches(int(c.kmeans.batch_size)), kind=str(c.kmeans.feature))
    idx, km = buffers.kmeans_indices(feats, cluster_fraction=float(c.kmeans.cluster_fraction), fraction=fraction,
                                     seed=int(end.cfg.seed) + end.stage.index, n_init=int(c.kmeans.n_init),
                                     max_iter=int(c.kmeans.max_iter))
    return idx, dict(clusters=int(km.n_clusters), inertia=float(km.inertia_))


methods.register(KMeansBuffer("medcoss"))
