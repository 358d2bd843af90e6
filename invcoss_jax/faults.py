"""Named points at which a test can kill the process with SIGKILL, to show that a restart recovers.

Set `INVCOSS_KILL_AT=<pattern>[@<n>]` in a job's environment: the n-th time (default the first) a point
whose name matches the shell-style pattern is reached, the process kills itself with SIGKILL, leaving
whatever was on disk at that instant, exactly as a preemption would. `INVCOSS_DISK_FULL_AT` (same syntax)
raises the OSError of a full disk there instead. Without the variable a point costs one
environment lookup. The points (tests/test_kill_resume.py uses them; docs/reliability.md lists what each
job guarantees after a kill):

- `atomic:<file name>`: an atomic output (JSON, .npz shard, statistics, buffer, PNG) fully written to its
  temporary file, not yet renamed into place;
- `checkpoint:<step>`: right after a checkpoint of that step was handed to orbax (with asynchronous saving
  still being written: a kill mid-checkpoint);
- `train_step:<stage>:<step>`: after a training step;
- `inversion_batch:<index>`: after an inversion batch of the synthetic set;
- `stage_end:<stage>`: a continual stage trained and its buffer or synthetic set written, before its
  `stage_info.json` marks it done.
"""

from __future__ import annotations

import collections
import errno
import fnmatch
import os
import signal
import threading

ENV = "INVCOSS_KILL_AT"
DISK_FULL_ENV = "INVCOSS_DISK_FULL_AT"  # same syntax: raise OSError(ENOSPC) there instead (a full disk)
_counts: collections.Counter = collections.Counter()
_lock = threading.Lock()


def point(name: str) -> None:
  """Kills the process here if $INVCOSS_KILL_AT selects this point (see the module docstring)."""
  if _hit(ENV, name):
    os.kill(os.getpid(), signal.SIGKILL)
  if _hit(DISK_FULL_ENV, name):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name.partition(":")[2] or name)


def _hit(env: str, name: str) -> bool:
  spec = os.environ.get(env)
  if not spec:
    return False
  pattern, _, nth = spec.partition("@")
  if not fnmatch.fnmatchcase(name, pattern):
    return False
  with _lock:
    _counts[(env, pattern)] += 1
    return _counts[(env, pattern)] == int(nth or 1)
