"""Defaults of `config.evaluate`."""

import ml_collections


def evaluate_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  return c
