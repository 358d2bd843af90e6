"""`config.init_from_torch` starts pre-training from PyTorch (timm layout) encoder weights."""

import jax
import numpy as np

from invcoss_jax import interop, models
from invcoss_jax.defaults import load_config_file
from invcoss_jax.jobs import pretrain as pretrain_lib


def test_pretrain_starts_from_exported_timm_weights(tmp_path):
  cfg = load_config_file("configs/xray.py:demo")
  model = models.build_mae(cfg.model)
  source = models.init_mae_params(model, jax.random.PRNGKey(123), [(32, 32, 3)])
  path = tmp_path / "encoder.safetensors"
  interop.export_timm_encoder(source, cfg.model, str(path), rank=2, image_size=(32, 32))

  cfg.init_from_torch = str(path)
  cfg.interop.torch_layout = "timm"
  cfg.train.stats_after_pretrain = False
  out = pretrain_lib.pretrain(cfg, tmp_path / "wd", stop_at_step=0)
  got = jax.device_get(out["state"].params)
  for name in ("encoder", "patch_embed_2d", "cls_token"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), got[name],
                 source[name])
  # The decoder is not in a timm encoder file: it keeps this run's own initialisation, not the source's.
  assert not np.allclose(np.asarray(got["decoder_embed"]["kernel"]), np.asarray(source["decoder_embed"]["kernel"]))
