"""One run per workdir: an exclusive `fcntl.flock` on WORKDIR/.lock, held for the run.

A second run on the same workdir (pretraining or fine-tuning) is refused at once with
WorkdirLockedError naming the holder's pid and host, before it touches anything. The lock
belongs to the open file, so it goes away with its process however that ends (SIGKILL
included): a stale lock never blocks a relaunch. On several hosts only process 0 takes it
(the others share its workdir by design).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import os
import socket
from typing import Any, Callable, Iterator

LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir's lock."""


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      text = f.read().strip()
  except OSError:
    text = ""
  return text or "unknown"


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[str]:
  """Holds WORKDIR/.lock for the duration of the block; raises WorkdirLockedError at once
  if another process holds it."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirLockedError(
          f"workdir {workdir} is in use by another run ({_holder(path)}; lock file {path}). "
          "Wait for it to end or stop it, or use another --workdir.") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
    try:
      yield path
    finally:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


def holding_workdir(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Decorates `fn(config, workdir, ...)` to run under the lock of its `workdir` argument
  (on process 0)."""
  signature = inspect.signature(fn)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    import jax
    workdir = signature.bind(*args, **kwargs).arguments["workdir"]
    if jax.process_index() != 0:
      return fn(*args, **kwargs)
    with hold(os.path.abspath(workdir)):
      return fn(*args, **kwargs)

  return wrapper
