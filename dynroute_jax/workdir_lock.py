"""One training per work directory: an exclusive lock file, `<workdir>/train.lock`.

Two trainings writing the same checkpoints would overwrite each other's steps (and one would
resume from the other's), so `train.train_and_evaluate` takes this lock (process 0 only: the
other processes of a multi-host run belong to the same training) and releases it on the way out,
whatever the way out.

The lock file is JSON naming the holder: pid, host name, the process's start time (so a pid
reused by an unrelated process is not taken for the holder), when it was taken and the command
line. It is created complete in one atomic step (written to a private temporary file, then
hard-linked to its name, which fails if the name exists; `O_EXCL` where the file system has no
hard links), so a reader never sees a half-written lock.

A lock left behind by a process that died without releasing it (kill -9, a power cut) is stale.
On the same host that is certain when its pid is gone or now belongs to a process started at
another time: the lock is then taken over with a warning naming the dead holder. A lock held on
another host cannot be checked from here and is always reported as taken; the message says how
to remove it if that process is known to be gone.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
import time
import uuid
from typing import Any, Optional

from absl import logging

LOCK_NAME = "train.lock"
_ATTEMPTS = 5


class WorkdirLockedError(OSError):
  """Another training holds the work directory's lock (the message names it)."""


def _process_start_time(pid: int) -> Optional[str]:
  """The start time of `pid` in clock ticks since boot (Linux), or None where unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None
  # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
  fields = stat[stat.rfind(")") + 2:].split()
  return fields[19] if len(fields) > 19 else None  # Field 22 of the whole line.


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Exists, owned by another user.
  except OSError:
    return True
  return True


def _describe(info: dict[str, Any]) -> str:
  return (f"pid {info.get('pid')} on host {info.get('host')!r}, started "
          f"{info.get('started', '?')}, command {' '.join(info.get('argv', [])) or '?'}")


class WorkdirLock:
  """The exclusive lock of a work directory. A context manager; `release` is idempotent.

  Args:
    workdir: the work directory (must exist).
    enabled: False makes every method a no-op (the processes other than 0 of a multi-host run).
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    self.enabled = enabled
    self._token: Optional[str] = None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  @property
  def held(self) -> bool:
    return self._token is not None

  def _my_info(self) -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "pid_start_time": _process_start_time(pid),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(sys.argv), "token": uuid.uuid4().hex}

  def _create(self, info: dict[str, Any]) -> bool:
    """Creates the lock file holding `info` atomically; False if it exists already."""
    directory = os.path.dirname(self.path)
    tmp = os.path.join(directory, f".{LOCK_NAME}.{info['token']}")
    with open(tmp, "w") as f:
      json.dump(info, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    except OSError as e:
      if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        raise
      # No hard links on this file system: O_EXCL creation, then the content.
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
      return True
    finally:
      os.remove(tmp)

  def _read(self) -> Optional[dict[str, Any]]:
    """The lock file's content; {} if unreadable; None if there is no lock file."""
    try:
      with open(self.path) as f:
        info = json.load(f)
      return info if isinstance(info, dict) else {}
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}

  def _stale_reason(self, info: dict[str, Any]) -> Optional[str]:
    """Why the holder is certainly gone, or None if it may be alive."""
    if not info:
      try:  # Unreadable: a lock being written without hard links, unless it is old.
        age = time.time() - os.path.getmtime(self.path)
      except OSError:
        return "it disappeared"
      return f"it is unreadable and {age:.0f} s old" if age > 10 else None
    if info.get("host") != socket.gethostname():
      return None
    try:
      pid = int(info.get("pid"))
    except (TypeError, ValueError):
      return "it names no pid"
    if not _pid_alive(pid):
      return f"process {pid} no longer exists"
    recorded, now = info.get("pid_start_time"), _process_start_time(pid)
    if recorded is not None and now is not None and recorded != now:
      return f"pid {pid} now belongs to another process"
    return None

  def _take_over(self, info: dict[str, Any]) -> None:
    """Removes the stale lock described by `info`, unless another process replaced it meanwhile."""
    aside = f"{self.path}.stale-{uuid.uuid4().hex}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    moved = self._read_path(aside)
    if info and moved != info:  # A fresh lock taken in between: put it back.
      try:
        os.link(aside, self.path)
      except OSError:
        pass
    os.remove(aside)

  @staticmethod
  def _read_path(path: str) -> dict[str, Any]:
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def acquire(self) -> None:
    """Takes the lock; raises WorkdirLockedError naming the holder if another training has it."""
    if not self.enabled or self.held:
      return
    mine = self._my_info()
    for _ in range(_ATTEMPTS):
      if self._create(mine):
        self._token = mine["token"]
        return
      info = self._read()
      if info is None:
        continue  # Released meanwhile: try again.
      reason = self._stale_reason(info)
      if reason is None:
        if info.get("token") and info.get("pid") == os.getpid() and (
            info.get("host") == socket.gethostname()):
          who = "this very process (an earlier training in it is still running)"
        else:
          who = _describe(info)
        raise WorkdirLockedError(
            f"Work directory {os.path.dirname(self.path)} is in use by another training: "
            f"{who} holds {self.path}. Two trainings on one work directory would overwrite "
            f"each other's checkpoints. Wait for it to finish, stop it, or use another "
            f"--workdir; if that process is known to be gone (e.g. it ran on another host "
            f"that was shut down), delete {self.path}.")
      logging.warning("Taking over the stale lock %s of a training that did not release it (%s; "
                      "%s).", self.path, _describe(info) if info else "no holder recorded", reason)
      self._take_over(info)
      time.sleep(0.01)
    raise WorkdirLockedError(f"Could not take the lock {self.path}: other processes keep "
                             f"taking it. Is another training starting on this work directory?")

  def release(self) -> None:
    """Removes the lock file if this object holds it."""
    if not self.held:
      return
    token, self._token = self._token, None
    info = self._read()
    if info is None or info.get("token") != token:
      logging.warning("The lock %s is no longer this training's (%s); leaving it.", self.path,
                      _describe(info) if info else "removed")
      return
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass
