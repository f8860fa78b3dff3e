"""Console output: the progress line format, and a real run's output is short and library-quiet."""

from __future__ import annotations

import logging as py_logging
import re
import subprocess
import sys
import textwrap

import pytest

from dynroute_jax import compile_cache
from dynroute_jax import console

STEP_LINE = re.compile(r"^stage (?P<stage>\d)  step (?P<done>\d+)/(?P<total>\d+)  loss \S+  "
                       r"acc \d\.\d{3}  tau \d+\.\d\d  \S+ step/s  "
                       r"ETA (\d+s|\d+m\d\ds|\d+h\d\dm|\?)$")
# absl's prefix (I1202 04:36:19.407 123 file.py:12]) marks a log record; quiet runs print none at
# INFO, and nothing of orbax's or CLU's key=value echo at all.
INFO_RECORD = re.compile(r"^I\d{4} \d\d:\d\d:\d\d")


def test_step_line_format():
  line = console.step_line(1, 200, 700, {"loss/total": 0.0431, "accuracy": 0.984375, "tau": 3.0,
                                         "lr": 0.1}, 1.2, 411.0)
  assert line == "stage 1  step 200/700  loss 0.043  acc 0.984  tau 3.00  1.2 step/s  ETA 6m51s"
  assert STEP_LINE.match(line)
  assert console.step_line(2, 5, 6, {"loss/total": 2.3456}, 25.0, 3) == (
      "stage 2  step 5/6  loss 2.35  25 step/s  ETA 3s")


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (59.4, "59s"), (60, "1m00s"), (411, "6m51s"),
                                          (3725, "1h02m"), (float("nan"), "?"), (-1, "?")])
def test_format_duration(seconds, text):
  assert console.format_duration(seconds) == text


def test_compile_cache_dir_resolution(monkeypatch, tmp_path):
  monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compile_cache.resolve_dir() == str(tmp_path / "dynroute_jax" / "jax_cache")
  monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "c"))
  assert compile_cache.resolve_dir() == str(tmp_path / "c")
  for off in ("off", "0", "", "None"):
    monkeypatch.setenv(compile_cache.ENV_VAR, off)
    assert compile_cache.resolve_dir() is None
  assert compile_cache.resolve_dir(tmp_path / "d") == str(tmp_path / "d")


class _RaisesWhenCollected:
  """Raises from `__del__`: Python reports it through `sys.unraisablehook`."""

  def __init__(self, error: Exception):
    self.error = error

  def __del__(self):
    raise self.error


def test_teardown_noise_of_a_failed_save_stays_off_the_console(monkeypatch, capsys):
  # What tensorstore's callbacks raise, hundreds of times, once orbax has closed a failed save's
  # event loop (tests/test_faults.py::test_disk_full_during_save_then_resume runs the real one).
  monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
  console._route_teardown_noise()  # pylint: disable=protected-access
  console._route_teardown_noise()  # Idempotent: the programs configure once each.
  before = console.teardown_noise_count
  _RaisesWhenCollected(RuntimeError("Event loop is closed"))
  _RaisesWhenCollected(RuntimeError("cannot schedule new futures after shutdown"))
  assert console.teardown_noise_count == before + 2
  assert capsys.readouterr().err == ""
  _RaisesWhenCollected(ValueError("a real bug"))  # Anything else is printed as usual.
  assert "a real bug" in capsys.readouterr().err


def test_nothing_prints_after_the_final_error():
  # After a failed save, orbax's own threads can still raise (its writer thread's OSError): the
  # threading excepthook printed that traceback below the program's one-line error. The disk-full
  # fault test caught it at random; here a thread raises after the error, every time.
  code = textwrap.dedent("""
      import os, sys, threading, warnings
      from dynroute_jax import console
      console.final_error("main: error: OSError: disk full")
      thread = threading.Thread(target=lambda: open("/nonexistent/dir/file", "w"), name="save")
      thread.start()
      thread.join()
      warnings.warn("late")
      # A thread already past every hook and level check (orbax's failed commit, logging its
      # traceback): it printed below the error at random before the console was closed.
      late = threading.Thread(target=lambda: (sys.stderr.write("late traceback\\n"),
                                              os.write(2, b"late fd 2\\n"), print("late stdout")))
      late.start()
      late.join()
  """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 0, proc.stderr
  assert (proc.stdout, proc.stderr) == ("", "main: error: OSError: disk full\n")


def test_library_tracebacks_are_one_line_unless_verbose(tmp_path):
  library = py_logging.LogRecord("orbax", py_logging.ERROR, "/site-packages/orbax/future.py", 1,
                                 "thread %s failed", ("save",), _exc_info(OSError(28, "disk")))
  own = py_logging.LogRecord("absl", py_logging.ERROR, console.__file__, 1, "stopping", None,
                             _exc_info(OSError(28, "disk")))
  quiet = console._OneLineLibraryTracebacks()  # pylint: disable=protected-access
  assert quiet.filter(library) and quiet.filter(own)
  assert (library.getMessage(), library.exc_info) == (
      "thread save failed (OSError; -v 0 shows the traceback)", None)
  assert own.exc_info is not None  # The program's own records keep theirs.


def _exc_info(error: Exception):
  try:
    raise error
  except OSError:
    return sys.exc_info()


@pytest.mark.slow
def test_training_output_is_one_line_per_event(reference, reference_output):
  # `reference` (tests/conftest.py) is the fault tests' uninterrupted run of the tiny DRNet
  # (tests/test_faults.py REFERENCE_ARGS), run as a user runs it: default verbosity, a progress
  # line every 2 steps. Its output is what a user reads.
  workdir = reference[0]
  stdout, stderr = reference_output
  out = stdout + stderr
  lines = [l for l in out.splitlines() if l.strip()]
  steps = [m.groupdict() for m in map(STEP_LINE.match, stdout.splitlines()) if m]
  # log_every_steps=2 and the end of each stage: steps 2 and 4 (stage 1), 6 (stage 2).
  assert [(s["stage"], s["done"], s["total"]) for s in steps] == [
      ("1", "2", "6"), ("1", "4", "6"), ("2", "6", "6")], stdout
  # Both stages share one step: compiled once, reused once.
  compiles = [l for l in lines if re.match(r"^stage \d  (compiled|reuses)", l)]
  assert len(compiles) == 2, stdout
  assert re.match(r"^stage 1  compiled the train step in \d+\.\d s \(shared by stages 1, 2\)$",
                  compiles[0]), stdout
  assert compiles[1] == "stage 2  reuses the train step compiled for stage 1", stdout
  assert [l for l in lines if l.startswith("checkpoint step ")] == [
      f"checkpoint step {s}  (saving in the background)" for s in (2, 4, 6)], stdout
  assert "threshold  accuracy" in stdout  # The report table.
  assert stdout.rstrip().endswith(f"Wrote {workdir}/eval/report.json")
  noise = [l for l in lines if INFO_RECORD.match(l) or "orbax" in l or "loss/total=" in l
           or "oneDNN" in l]
  assert not noise, "\n".join(noise[:20])
  assert len(lines) <= 40, out
  # Every metric still goes to the TensorBoard summaries.
  assert list(workdir.glob("events.out.tfevents.*")), sorted(p.name for p in workdir.iterdir())
