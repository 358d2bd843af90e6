"""Defaults of `config.audit`."""

import ml_collections


def audit_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  return c
