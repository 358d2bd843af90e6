"""One run per workdir: an advisory lock (`<workdir>/.lock`) held for the whole run of a job.

Two runs started on one workdir would both resume from the same checkpoints and the last writer would win (a
seed-0 run vanished under a seed-1 run of the same command). `jobs.run` holds the lock of its `--workdir`
from before `workdir.json` is written until the job returns, so a notebook calling `jobs.run` is covered as
well as the command line. A second run is refused naming the holder (`error: <workdir> is in use by pid N on
host H (started at ...)`).

The lock is `fcntl.flock` on `.lock`: the kernel releases it when the holding process dies, however it dies
(SIGKILL, preemption, a crash), so a lock left by a dead process is simply taken over; the JSON in the file
(pid, host, start time) only names the holder in the message. The file is never deleted: deleting it while
a process waits to lock it would let two processes hold locks on two different files of the same name.

The lock is re-entrant within a process: the `continual` job locks its workdir in `jobs.run` and again in
`continual.sequence.run` (which a notebook or the retention benchmark may call directly) without deadlocking
on its own lock; the retention benchmark's per-seed, per-method runs each lock their own folder under its
locked workdir. Only process 0 of a multi-process job locks (every process runs in the same workdir). The lock
is advisory: code that does not take it (a hand-run script) is not stopped. On a file system without `flock`
(some network mounts), the run goes on unlocked with a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
from typing import Iterator

from absl import logging

LOCK_FILE = ".lock"

# lock file (real path) -> [fd, depth]: the locks this process holds, for re-entrance.
_held: dict[str, list[int]] = {}
_held_guard = threading.Lock()


def _holder(fd: int) -> dict:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    return json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
  except (OSError, ValueError):  # being written by its holder, or not ours: the message says less
    return {}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _refusal(workdir: str, holder: dict) -> Exception:
  from invcoss_jax.workdir import WorkdirError  # pylint: disable=g-import-not-at-top  # cycle: workdir imports LOCK_FILE
  pid, host, started = holder.get("pid"), holder.get("host"), holder.get("started")
  who = f"pid {pid} on host {host}" if pid else "another process"
  msg = f"{workdir} is in use by {who}" + (f" (started at {started})" if started else "")
  if pid and host == socket.gethostname() and not _pid_alive(int(pid)):
    # flock is released when the last descriptor closes: a child that inherited it (a data-loader worker
    # process forked by the dead run) still holds it.
    msg += (f"; pid {pid} has ended, but a process it started still holds {os.path.join(workdir, LOCK_FILE)} "
            "(see `fuser` or `lsof` on it): end that process")
  else:
    msg += ": wait for that run to end, or use another --workdir"
  return WorkdirError(msg)


def _first_process() -> bool:
  """Process 0 of a job locks: every process of a multi-process job runs in the same workdir."""
  jax = sys.modules.get("jax")  # not imported: no distributed runtime, one process
  return jax is None or jax.process_index() == 0


@contextlib.contextmanager
def hold(workdir: str | os.PathLike) -> Iterator[None]:
  """Holds the lock of `workdir` (created if missing) for the block; raises WorkdirError when another process
  holds it. Re-entrant within a process; only process 0 of a multi-process job locks."""
  from invcoss_jax.workdir import WorkdirError, describe_os_error  # pylint: disable=g-import-not-at-top  # cycle: workdir imports LOCK_FILE
  workdir = os.path.abspath(os.fspath(workdir))
  path = os.path.realpath(os.path.join(workdir, LOCK_FILE))

  def create(opener):
    try:
      os.makedirs(workdir, exist_ok=True)
      return opener()
    except OSError as e:
      raise WorkdirError(describe_os_error(e, f"--workdir={workdir}")) from e

  if not _first_process():
    create(lambda: None)
    yield
    return
  with _held_guard:
    if path in _held:
      _held[path][1] += 1
    else:
      fd = create(lambda: os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise _refusal(workdir, holder) from None
      except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
          os.close(fd)
          raise
        logging.warning("%s: the file system does not support flock (%s): this run does not lock its workdir",
                        path, e)
      # The file is rewritten in place: renaming a new file over it would leave the lock on the old inode.
      record = dict(pid=os.getpid(), host=socket.gethostname(),
                    started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
      _held[path] = [fd, 1]
  try:
    yield
  finally:
    with _held_guard:
      entry = _held[path]
      entry[1] -= 1
      if entry[1] == 0:
        del _held[path]
        os.close(entry[0])  # closing the descriptor releases the flock


def holds(workdir: str | os.PathLike) -> bool:
  """Whether this process holds the lock of `workdir`."""
  path = os.path.realpath(os.path.join(os.path.abspath(os.fspath(workdir)), LOCK_FILE))
  with _held_guard:
    return path in _held
