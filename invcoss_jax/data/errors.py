"""Bad input: one error type that names the file and what was expected, and the lenient skip log."""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger("invcoss_jax.data")


class DataError(ValueError):
  """A file or option the input layer cannot use; the message names it and what was expected."""

  def __init__(self, path: str | os.PathLike | None, problem: str):
    self.path = None if path is None else os.fspath(path)
    self.problem = problem
    super().__init__(problem if path is None else f"{self.path}: {problem}")

  # grain's worker processes send a reader's error to the main process pickled; the default would call
  # __init__ with the message alone.
  def __reduce__(self):
    return type(self), (self.path, self.problem)


class MissingDataError(DataError, FileNotFoundError):
  """A data path that does not exist or holds none of the files expected (still a FileNotFoundError)."""


# Paths already warned about in this process: the same bad file met again by another pass (each split, the
# tokenizer, every evaluation) is logged at DEBUG, not as a new warning.
_WARNED: set[str] = set()
_WARNED_LOCK = threading.Lock()


class SkipLog:
  """Files skipped under `lenient=True`: each is logged once when met; `summary()` gives the count.

  Each process (and grain worker) keeps its own log; the counts are per process. A file is warned about
  once per process, however many passes skip it (their summaries still count it).
  """

  def __init__(self, what: str):
    self.what = what
    self._lock = threading.Lock()
    self._skipped: dict[str, str] = {}

  def skip(self, path: str | os.PathLike, reason: str) -> None:
    path = os.fspath(path)
    with self._lock:
      if path in self._skipped:
        return
      self._skipped[path] = reason
      n = len(self._skipped)
    with _WARNED_LOCK:
      first = path not in _WARNED
      _WARNED.add(path)
    logger.log(logging.WARNING if first else logging.DEBUG, "lenient: skipping %s: %s (%d file(s) of %s skipped "
               "so far)", path, reason, n, self.what)

  def is_skipped(self, path: str | os.PathLike) -> bool:
    with self._lock:
      return os.fspath(path) in self._skipped

  @property
  def skipped(self) -> dict[str, str]:
    with self._lock:
      return dict(self._skipped)

  def __len__(self) -> int:
    with self._lock:
      return len(self._skipped)

  def summary(self) -> str:
    n = len(self)
    return f"{n} bad file(s) of {self.what} skipped (lenient=True)" + (
        ": " + ", ".join(sorted(os.path.basename(p) for p in self.skipped)) if n else "")

  def log_summary(self) -> None:
    if len(self):
      logger.warning("%s", self.summary())

  # A lock cannot be pickled (grain sends sources to worker processes).
  def __getstate__(self):
    return {"what": self.what, "skipped": self.skipped}

  def __setstate__(self, state):
    self.what = state["what"]
    self._lock = threading.Lock()
    self._skipped = dict(state["skipped"])
