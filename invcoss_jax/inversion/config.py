"""Defaults of `config.inversion`."""

import ml_collections


def inversion_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  return c
