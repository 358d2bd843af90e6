"""Defaults of `config.continual`."""

import ml_collections


def continual_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  return c
