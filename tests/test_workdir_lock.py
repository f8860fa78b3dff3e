"""Tests of dynroute_jax.workdir_lock: one training per work directory."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from dynroute_jax import workdir_lock as L


def _write_lock(workdir, **info):
  (workdir / L.LOCK_NAME).write_text(json.dumps({"token": "f" * 32, "argv": ["train"], **info}))


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid  # Reaped: no process has this pid now (reuse this soon is vanishingly rare).


def test_acquire_release_and_second_holder_refused(tmp_path):
  lock = L.WorkdirLock(str(tmp_path))
  with lock:
    info = json.loads((tmp_path / L.LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    with pytest.raises(L.WorkdirLockedError, match="in use by another training: this very process"):
      L.WorkdirLock(str(tmp_path)).acquire()
  assert not (tmp_path / L.LOCK_NAME).exists()
  assert not [p for p in os.listdir(tmp_path)]  # No temporary files left behind either.
  lock.release()  # Idempotent.


def test_live_holder_on_this_host_is_named(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _write_lock(tmp_path, pid=holder.pid, host=socket.gethostname(),
                pid_start_time=L._process_start_time(holder.pid), started="2024-05-01T10:00:00")
    before = (tmp_path / L.LOCK_NAME).read_text()
    with pytest.raises(L.WorkdirLockedError) as e:
      L.WorkdirLock(str(tmp_path)).acquire()
    msg = str(e.value)
    assert f"pid {holder.pid} on host {socket.gethostname()!r}" in msg, msg
    assert "use another --workdir" in msg and str(tmp_path / L.LOCK_NAME) in msg
    assert (tmp_path / L.LOCK_NAME).read_text() == before  # Left alone.
  finally:
    holder.kill()
    holder.wait()


def test_holder_on_another_host_is_never_taken_over(tmp_path):
  _write_lock(tmp_path, pid=_dead_pid(), host="some-other-host")
  with pytest.raises(L.WorkdirLockedError, match=r"on host 'some-other-host'.*delete .*train\.lock"):
    L.WorkdirLock(str(tmp_path)).acquire()


def test_stale_lock_of_a_dead_process_is_recovered_with_a_warning(tmp_path, caplog):
  dead = _dead_pid()
  _write_lock(tmp_path, pid=dead, host=socket.gethostname())
  with caplog.at_level(logging.WARNING):
    with L.WorkdirLock(str(tmp_path)):
      assert json.loads((tmp_path / L.LOCK_NAME).read_text())["pid"] == os.getpid()
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("stale lock" in w and f"pid {dead}" in w and "no longer exists" in w
             for w in warnings), warnings
  assert not (tmp_path / L.LOCK_NAME).exists()


def test_stale_lock_whose_pid_was_reused_is_recovered(tmp_path, caplog):
  # The parent process is alive, but started at another time than the one recorded.
  _write_lock(tmp_path, pid=os.getppid(), host=socket.gethostname(), pid_start_time="1")
  if L._process_start_time(os.getppid()) is None:
    pytest.skip("no /proc: process start times unknown")
  with caplog.at_level(logging.WARNING):
    with L.WorkdirLock(str(tmp_path)):
      pass
  assert any("now belongs to another process" in r.getMessage() for r in caplog.records)


def test_disabled_lock_does_nothing(tmp_path):
  with L.WorkdirLock(str(tmp_path), enabled=False):
    assert not (tmp_path / L.LOCK_NAME).exists()
