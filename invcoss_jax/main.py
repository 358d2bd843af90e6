"""Entry point: `python -m invcoss_jax.main --config=configs/xray.py[:demo] [--config.key=value] --workdir=DIR`.

Intentionally short: flags in, `jobs.run(config, workdir)` out; `config.mode` selects the job.
"""

from __future__ import annotations

import errno
import logging
import os
import sys

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

  from invcoss_jax.config_checks import ConfigError

  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
  try:
    jobs.run(_CONFIG.value, workdir)
  except ConfigError as e:  # an option out of range: the message says which; a traceback would bury it
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT):
      raise
    from invcoss_jax.workdir import describe_os_error
    logging.error("%s: %s", type(e).__name__, e)
    sys.stderr.write(f"error: {describe_os_error(e, workdir)}\n")
    sys.stderr.flush()
    # Without the interpreter's shutdown: reader and checkpoint threads that also hit the error would each
    # print a traceback (hundreds, ending in "sys.meta_path is None") and bury this line.
    logging.shutdown()
    os._exit(1)


def _config_spec(argv) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_command_line(argv) -> None:
  """Unknown `--config.<key>` overrides end the run before absl parses them (ml_collections would raise a
  raw AttributeError from inside flag parsing), with the nearest valid option names."""
  from invcoss_jax import config_checks
  from invcoss_jax.defaults import load_config_file

  spec, keys = _config_spec(argv), config_checks.override_keys(argv)
  if not spec or not keys:
    return
  try:
    config = load_config_file(spec)
  except Exception:  # pylint: disable=broad-except
    return  # config_flags reports a config file it cannot load
  config_checks.check_override_keys(config, keys)


def entry_point():
  try:
    check_command_line(sys.argv[1:])
  except ValueError as e:  # config_checks.ConfigError
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  app.run(main)


if __name__ == "__main__":
  entry_point()
