"""er: experience replay of a uniformly random `continual.buffer_fraction` of every earlier stage, kept at the
stage's end as real samples (`buffer/`, npz shards, and `buffer.json`) and distilled to the frozen previous
model. `RealBuffer` is the family of real buffers: a subclass changes only `choose` (medcoss: k-means)."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from invcoss_jax import npz_io
from invcoss_jax.continual import buffers, methods
from invcoss_jax.continual.stages import BUFFER_DIR, BUFFER_INFO, read_record
from invcoss_jax.io_utils import atomic_write_json


class RealBuffer(methods.Method):
  """Keeps `choose`'s samples of every stage but the last, replays them in every later stage."""
  keeps = "a real buffer"
  replays = "real"
  teacher = True
  text_buffer = "random"

  def choose(self, end, fraction: float) -> tuple[np.ndarray, dict[str, Any]]:
    """(sorted indices into the stage's eval order, extra fields of buffer.json): a random `fraction`."""
    idx = buffers.random_indices(end.n_current[0], fraction, seed=int(end.cfg.seed) + end.stage.index)
    return idx, {}

  def end_stage(self, end):
    if end.text or end.last or os.path.isfile(os.path.join(end.stage.workdir, BUFFER_INFO)):
      return  # a report stage's buffer is the text buffer; the last stage's would never be read
    c = end.cfg.continual
    fraction = float(c.buffer_fraction)
    idx, extra = self.choose(end, fraction)
    images = buffers.gather_examples(end.eval_batches(int(c.kmeans.batch_size)), idx)
    if jax.process_index() == 0:
      npz_io.write_shards(os.path.join(end.stage.workdir, BUFFER_DIR), images, int(end.cfg.inversion.shard_size))
      atomic_write_json(os.path.join(end.stage.workdir, BUFFER_INFO), dict(
          method=self.name, num_examples=int(len(images)), fraction=fraction, indices=[int(i) for i in idx],
          image_shape=list(images.shape[1:]), **extra))

  def replay_set(self, cfg, stage, source, earlier, model, params, mesh):
    return (os.path.join(source.workdir, BUFFER_DIR),
            int(read_record(os.path.join(source.workdir, BUFFER_INFO))["num_examples"]))

  def retains(self, c, text):
    return ("real_buffer",)


methods.register(RealBuffer("er"))
