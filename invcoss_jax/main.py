"""Entry point: `python -m invcoss_jax.main --config=configs/xray.py[:demo] [--config.key=value] --workdir=DIR`.

Intentionally short: flags in, `jobs.run(config, workdir)` out; `config.mode` selects the job.

How a run ends when it cannot go on (docs/reliability.md):
- an error the user can fix ends as one line `error: ...` on stderr, without a traceback: exit 2 for an
  option or a workdir (`config_checks.ConfigError`, `workdir.WorkdirError`, a `--config=` file that cannot be
  loaded), exit 1 for a file or a resource (`data.errors.DataError`: data, vocabularies, checkpoints that do not
  fit; missing files; a full, read-only or unwritable disk). Raised in a grain read thread or an asynchronous
  orbax save, the error reaches the main thread as itself or chained (`__cause__` / `__context__`) under
  another; the first one of the chain that the user can fix is the line. Any other exception is a bug and
  keeps its traceback. `INVCOSS_DEBUG=1` (or `--config.debug=True`) keeps every traceback.
- Ctrl-C (SIGINT) and SIGTERM end with one line, exit 130 / 143. The process ends at once, as after a kill:
  every output is written atomically and an unfinished checkpoint is discarded on restart, so the workdir is
  consistent and the same command resumes.
Both end without the interpreter's shutdown (`os._exit`): the reader and checkpoint threads still running
would each print a traceback (hundreds of lines) and bury the one that matters.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import sys
from typing import Iterator

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
  """Keeps orbax's per-save INFO chatter (dozens of lines per checkpoint) out of the run log, and the
  traceback orbax logs when an asynchronous save fails (its message stays): the error itself reaches the main
  thread and ends the run with one line (`debugging()` keeps the traceback)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "/orbax/" not in record.pathname:
      return True
    if record.exc_info and not debugging():
      record.exc_info, record.exc_text = None, None
    return record.levelno >= logging.WARNING


# File-system errors that are the machine's, not the program's: one line says what to do.
_RESOURCE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENAMETOOLONG,
                    errno.EFBIG)
# Tensorstore (orbax's writer) reports a failed write as a ValueError whose text ends in the OS error code,
# e.g. 'RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database at local file "/w/...": ... No space left on
# device [os_error_code='28']'; read back as the OSError it was.
_TENSORSTORE_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")
_TENSORSTORE_FILE = re.compile(r'local file "([^"]+)"')


def _os_error_of(x: BaseException) -> OSError | None:
  if isinstance(x, OSError):
    return x
  m = _TENSORSTORE_OS_ERROR.search(str(x))
  if m is None:
    return None
  code = int(m.group(1))
  path = _TENSORSTORE_FILE.search(str(x))
  return OSError(code, os.strerror(code), path.group(1) if path else None)
DEBUG_ENV = "INVCOSS_DEBUG"


def _chain(e: BaseException) -> Iterator[tuple[BaseException, bool]]:
  """(exception, implicit) for `e` and the exceptions it was raised from (`__cause__`) or while handling
  (`__context__`), outermost first, each once; `implicit`: some link on the way was a `__context__`."""
  seen, implicit = set(), False
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e, implicit
    implicit = implicit or e.__cause__ is None
    e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)


def one_line(message: str) -> str:
  return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def user_error(e: BaseException, workdir: str) -> tuple[int, str] | None:
  """(exit status, message) for an error the user can fix, found in `e` or what it was chained from; None
  for anything else (a bug: it keeps its traceback)."""
  from invcoss_jax.config_checks import ConfigError  # pylint: disable=g-import-not-at-top
  from invcoss_jax.data.errors import DataError  # pylint: disable=g-import-not-at-top
  from invcoss_jax.workdir import describe_os_error  # pylint: disable=g-import-not-at-top
  for x, implicit in _chain(e):
    if isinstance(x, ConfigError):  # an option or the workdir (WorkdirError is one)
      return 2, one_line(x)
    if isinstance(x, DataError):  # a data file, a vocabulary, a checkpoint that does not fit
      return 1, one_line(x)
    os_error = _os_error_of(x)
    if os_error is not None and os_error.errno in _RESOURCE_ERRNOS:
      return 1, one_line(describe_os_error(os_error, workdir))
    # A missing file, unless only met while handling another error: code that looks for a file and falls back
    # when it is absent leaves it as the context of whatever goes wrong next, which may be a bug.
    if isinstance(x, (FileNotFoundError, NotADirectoryError, IsADirectoryError)) and not implicit:
      return 1, one_line(x)
  return None


def debugging(config=None) -> bool:
  """Tracebacks kept: $INVCOSS_DEBUG set (not 0/false), or config.debug."""
  env = os.environ.get(DEBUG_ENV, "").strip().lower()
  return env not in ("", "0", "false", "no") or bool(config is not None and config.get("debug", False))


def _end(status: int, line: str) -> None:
  """Writes `line` and ends the process now, without the interpreter's shutdown (see the module docstring)."""
  sys.stderr.write(line + "\n")
  sys.stderr.flush()
  logging.shutdown()
  os._exit(status)  # pylint: disable=protected-access


def _on_signal(signum, frame) -> None:
  del frame
  name = signal.Signals(signum).name
  _end(128 + signum, f"interrupted ({name}): the workdir is consistent; rerun the same command to resume")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  from invcoss_jax import jobs  # Imported after flag parsing: jobs import jax lazily per mode.

  config = _CONFIG.value
  debug = debugging(config)
  if not debug:
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
  try:
    jobs.run(config, workdir)
  except KeyboardInterrupt:
    if debug:
      raise
    _on_signal(signal.SIGINT, None)
  except Exception as e:  # pylint: disable=broad-except
    found = None if debug else user_error(e, workdir)
    if found is None:
      raise
    _end(found[0], f"error: {found[1]}")


def _config_spec(argv) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def resolve_config_path(argv: list[str]) -> list[str]:
  """`argv` with its `--config=` file found as `defaults.load_config_file` finds it: relative to the working
  directory, else in the package's checkout (so `--config=configs/xray.py` works from any directory of a
  source checkout). A file found nowhere is one line naming where it was looked for."""
  from invcoss_jax.config_checks import ConfigError  # pylint: disable=g-import-not-at-top
  spec = _config_spec(argv)
  if not spec:
    return argv
  path, sep, preset = spec.partition(":")
  if os.path.isfile(path):
    return argv
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  found = os.path.join(repo, path)
  if os.path.isabs(path) or not os.path.isfile(found):
    where = [os.path.abspath(path)] + ([] if os.path.isabs(path) else [found])
    raise ConfigError(f"--config={spec}: no such config file (looked for {' and '.join(where)})")
  out = list(argv)
  for i, a in enumerate(out):  # the occurrence _config_spec read
    if a.startswith("--config="):
      out[i] = f"--config={found}{sep}{preset}"
      break
    if a == "--config" and i + 1 < len(out):
      out[i + 1] = f"{found}{sep}{preset}"
      break
  return out


def check_command_line(argv) -> None:
  """The `--config=` file loads (an exception in it, e.g. an unknown preset, is one line), and unknown
  `--config.<key>` overrides end the run before absl parses them (ml_collections would raise a raw
  AttributeError from inside flag parsing), with the nearest valid option names."""
  from invcoss_jax import config_checks
  from invcoss_jax.defaults import load_config_file

  spec, keys = _config_spec(argv), config_checks.override_keys(argv)
  if not spec:
    return
  try:
    config = load_config_file(spec)
  except Exception as e:  # pylint: disable=broad-except  (the user's config file: its own message)
    if debugging():
      raise
    raise config_checks.ConfigError(f"--config={spec}: {type(e).__name__}: {one_line(e)}") from e
  config_checks.check_override_keys(config, keys)


def entry_point():
  from invcoss_jax.config_checks import resolve_aliases  # pylint: disable=g-import-not-at-top
  try:
    argv = resolve_aliases(sys.argv[1:])  # --config.method -> --config.continual.method
    resolved = resolve_config_path(argv)
    check_command_line(argv)  # messages name the file as the user gave it
    sys.argv[1:] = resolved
  except ValueError as e:  # config_checks.ConfigError
    sys.stderr.write(f"error: {one_line(e)}\n")
    sys.exit(2)
  app.run(main)


if __name__ == "__main__":
  entry_point()
