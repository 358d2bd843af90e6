"""The one evaluation interface (issue 23): the shared feature and padding functions every measurement uses, and
evaluators chosen by name (a new measurement is one registered class, as below)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from invcoss_jax import models
from invcoss_jax.measure import evaluators, features


@evaluators.register_evaluator("test_mean_feature_norm")
class MeanFeatureNorm(evaluators.Evaluator):
  """A measurement written in the test file: the mean L2 norm of the encoder's pooled features of `images`."""

  def __init__(self, model, images, batch_size=3):
    self.model, self.images, self.batch_size = model, images, batch_size

  def run(self, params):
    f = features.encoder_features(self.model, params, (self.images[i:i + self.batch_size]
                                                       for i in range(0, len(self.images), self.batch_size)),
                                  kind="mean")
    return {"mean_norm": float(np.mean(np.linalg.norm(f, axis=1))), "count": len(f)}


def _tiny():
  c = models.model_config("micro")
  c.update(dict(width=32, depth=1, num_heads=2, decoder_width=16, decoder_depth=1, decoder_heads=2,
                patch_size_2d=(4, 4)))
  model = models.build_mae(c)
  x = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (7, 16, 16, 3)), np.float32)
  return model, models.init_mae_params(model, jax.random.PRNGKey(1), [x.shape[1:]]), x


def test_a_registered_evaluator_runs_through_the_interface():
  model, params, x = _tiny()
  assert "test_mean_feature_norm" in evaluators.evaluator_names()
  cls = evaluators.get_evaluator("test_mean_feature_norm")
  assert cls is MeanFeatureNorm and cls.name == "test_mean_feature_norm"
  out = cls(model, x).run(params)
  # Ragged batches (3, 3, 1) padded to 3 give the features of one whole batch.
  whole = np.asarray(features.feature_fn(model, "mean")(params, x))
  assert out["count"] == 7
  np.testing.assert_allclose(out["mean_norm"], np.mean(np.linalg.norm(whole, axis=1)), rtol=1e-6)
  with pytest.raises(ValueError, match="already registered"):
    evaluators.register_evaluator("test_mean_feature_norm")(type("Other", (evaluators.Evaluator,), {}))
  with pytest.raises(TypeError, match="subclass"):
    evaluators.register_evaluator("not_an_evaluator")(object)
  with pytest.raises(KeyError, match="no evaluator named 'nope'"):
    evaluators.get_evaluator("nope")


def test_the_shipped_measurements_are_registered():
  from invcoss_jax.audit import evaluators as _audit  # noqa: F401
  from invcoss_jax.retention import evaluators as _retention  # noqa: F401
  assert {"probe", "reconstruction", "judges", "membership"} <= set(evaluators.evaluator_names())


def test_pooled_feature_and_the_compiled_feature_function():
  tokens = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 4))
  t = np.asarray(tokens)
  np.testing.assert_allclose(features.pooled_feature(tokens, "mean"), t[:, 1:].mean(1), rtol=1e-6)
  np.testing.assert_array_equal(features.pooled_feature(tokens, "cls"), t[:, 0])
  np.testing.assert_allclose(features.pooled_feature(tokens, "all_tokens"), t.mean(1), rtol=1e-6)
  valid = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  np.testing.assert_allclose(features.pooled_feature(tokens, "mean", valid)[0], t[0, 1:3].mean(0), rtol=1e-6)
  with pytest.raises(ValueError, match="config.audit.feature"):
    features.pooled_feature(tokens, "max", option="config.audit.feature")
  model, params, x = _tiny()
  # One compiled function per (model, kind, normalize), shared by every caller.
  assert features.feature_fn(model, "mean") is features.feature_fn(model, "mean")
  f = np.asarray(features.feature_fn(model, "mean", normalize=True)(params, x))
  np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, rtol=1e-5)


def test_padding_and_batched_evaluation():
  x = np.arange(6, dtype=np.float32).reshape(3, 2)
  np.testing.assert_array_equal(features.pad_rows(x, 5), np.concatenate([x, x[-1:], x[-1:]]))
  assert features.pad_rows(x, 3) is x
  padded, w = features.pad_batch(x, 4)
  assert padded.shape == (4, 2) and w.tolist() == [1, 1, 1, 0] and w.dtype == np.float32
  calls = []

  def fn(params, a, b):
    calls.append(a.shape)
    return a.sum(axis=1) * params + b

  out = features.batched(fn, 2.0, np.arange(10, dtype=np.float32).reshape(5, 2), 2, np.ones(5, np.float32))
  np.testing.assert_array_equal(out, [3, 11, 19, 27, 35])
  assert calls == [(2, 2)] * 3  # the last batch of one row was padded to the compiled size
