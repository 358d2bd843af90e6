"""Entry point: `python -m invcoss_jax.main --config=configs/xray.py[:demo] [--config.key=value] --workdir=DIR`.

Intentionally short: flags in, `jobs.run(config, workdir)` out; `config.mode` selects the job.
"""

from __future__ import annotations

import logging
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/xray.py or configs/xray.py:demo; override fields with "
    "--config.key=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, checkpoints and event files "
                               "(default ./workdirs/<config name>[_<preset>]).")
flags.mark_flags_as_required(["config"])


def default_workdir(config_arg: str) -> str:
  """'configs/xray.py:demo' -> './workdirs/xray_demo'."""
  path, _, preset = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("workdirs", f"{name}_{preset}" if preset else name)


class _QuietLibraries(logging.Filter):
  """Keeps orbax's per-save INFO chatter (dozens of lines per checkpoint) out of the run log."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  from invcoss_jax import jobs  # Imported after flag parsing: jobs import jax lazily per mode.

  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
  jobs.run(_CONFIG.value, workdir)


def entry_point():
  app.run(main)


if __name__ == "__main__":
  entry_point()
