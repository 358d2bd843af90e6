"""Defaults of `config.data`."""

import ml_collections


def data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "demo_xray"
  c.format = ""
  c.path = ""
  c.split = "train"
  c.modality = "xray"
  return c
