"""End-to-end reliability through the command line: no silent restart from damaged checkpoints,
one training per work directory, a clean stop during the final evaluation, and a soak test of
random interruptions and damage.

Runs are real `python -m dynroute_jax.main` subprocesses of the tiny DRNet of test_faults.py (same
arguments, same compilation cache), compared bitwise with an uninterrupted reference run.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import textwrap
import time

import pytest

from test_faults import (RUN_TIMEOUT_S, TOTAL_STEPS, Run, _damage, assert_bitwise_equal,  # pylint: disable=g-bad-import-order,unused-import
                         error_line, final_params, good_steps, run_to_end)
from test_validation import snapshot  # pylint: disable=g-bad-import-order

from dynroute_jax import workdir_lock

pytestmark = pytest.mark.slow


def _fresh_copy(reference_dir, workdir):
  shutil.copytree(reference_dir, workdir)
  shutil.rmtree(workdir / "eval")


def test_no_verifying_checkpoint_refuses_then_the_flag_restarts(reference, cache_dir, tmp_path):
  workdir = tmp_path / "run"
  _fresh_copy(reference[0], workdir)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4, 6]
  _damage(workdir / "checkpoints" / "6", "truncate")
  _damage(workdir / "checkpoints" / "4", "flip")
  os.remove(workdir / "checkpoints" / "2" / "manifest.json")
  before = snapshot(workdir)

  run = run_to_end(cache_dir, workdir, expect_rc=2)
  line = error_line(run)
  print(line)  # Quoted in the README.
  assert line.startswith("main: error: NoGoodCheckpointError: Cannot resume: no checkpoint in "), line
  assert re.search(r"step 6: size mismatch in params/.*; step 4: checksum mismatch in params/.*; "
                   r"step 2: manifest\.json is missing", line), line
  assert "--config.checkpoint.restart_if_damaged=True" in line
  assert snapshot(workdir) == before, "a refused resume changed the work directory"

  run = run_to_end(cache_dir, workdir, ["--config.checkpoint.restart_if_damaged=True"])
  starts = [l for l in run.lines if "training starts from step 0" in l]
  assert len(starts) == 1, run.tail()
  print(starts[0].strip())
  assert "Resumed" not in run.text
  assert_bitwise_equal(final_params(workdir), reference[1])
  assert len(os.listdir(workdir / "checkpoints" / "quarantine")) == 3  # Moved, not deleted.


def _wait_for_file(path, run: Run, timeout=RUN_TIMEOUT_S):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    assert run.proc.poll() is None, run.tail()
    assert time.time() < deadline, run.tail()
    time.sleep(0.05)


def test_second_training_on_a_workdir_is_refused_and_a_stale_lock_recovered(
    reference, cache_dir, tmp_path):
  workdir = tmp_path / "run"
  first = Run(cache_dir, workdir)
  lock = workdir / workdir_lock.LOCK_NAME
  _wait_for_file(lock, first)
  second = run_to_end(cache_dir, workdir, expect_rc=2)
  line = error_line(second)
  print(line)  # Quoted in the README.
  assert f"is in use by another training: pid {first.proc.pid} on host " in line, line
  first.kill()  # kill -9: the lock stays behind, stale.
  first.finish()
  assert lock.exists()
  third = run_to_end(cache_dir, workdir)
  warning = re.search(rf"Taking over the stale lock .*pid {first.proc.pid} .*no longer exists",
                      third.text)
  assert warning, third.tail()
  print(warning.group(0))
  assert not lock.exists()  # Released at the end.
  assert_bitwise_equal(final_params(workdir), reference[1])


# Sends SIGTERM to itself as the final evaluation starts.
EVAL_SIGTERM_DRIVER = textwrap.dedent("""
    import os, signal, sys, time
    from absl import app
    from dynroute_jax import evaluation, main
    _evaluate_and_report = evaluation.evaluate_and_report
    def evaluate_and_report(*a, **k):
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(30)  # The signal arrives here, during the evaluation.
      return _evaluate_and_report(*a, **k)
    evaluation.evaluate_and_report = evaluate_and_report
    sys.argv[0] = "dynroute_jax.main"
    app.run(main.main)
""")


def test_sigterm_during_the_final_evaluation_stops_cleanly(reference, cache_dir, tmp_path):
  workdir = tmp_path / "run"
  run = run_to_end(cache_dir, workdir, driver=EVAL_SIGTERM_DRIVER)  # Exit 0, not -15.
  warning = re.search(r"Received signal 15 during the final evaluation.*", run.text)
  assert warning, run.tail()
  print(warning.group(0))
  assert f"checkpoint step {TOTAL_STEPS} is saved" in run.text
  assert not (workdir / "eval" / "report.json").exists()
  assert not (workdir / workdir_lock.LOCK_NAME).exists()
  again = run_to_end(cache_dir, workdir)  # Evaluates the final checkpoint.
  assert f"Resumed from step {TOTAL_STEPS}" in again.text
  assert (workdir / "eval" / "report.json").exists()
  assert_bitwise_equal(final_params(workdir), reference[1])
