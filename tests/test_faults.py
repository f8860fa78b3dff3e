"""End-to-end fault tests through the command line: preemption, kill -9, damaged checkpoints,
non-finite steps, a disk filling up during a save, and determinism.

Every run is a real `python -m dynroute_jax.main` subprocess on a tiny DRNet (digits, 4 + 2 steps,
a checkpoint every 2 steps). The runs share a persistent compilation cache, so only the first one
compiles. Final parameters are compared bitwise with an uninterrupted reference run.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import xla_flags  # pylint: disable=g-bad-import-order

from dynroute_jax import checkpoint as ckpt_lib

REPO = Path(__file__).resolve().parents[1]
TOTAL_STEPS = 6  # stage 1: steps 0-3 (checkpoint 4), stage 2: steps 4-5 (checkpoint 6).
TINY_ARGS = [
    "--config=configs/digits.py",
    "--config.train.stage1.steps=4",
    "--config.train.stage2.steps=2",
    "--config.checkpoint.every_steps=2",
    "--config.log_every_steps=1",
    "--config.model.num_nodes=1",
    "--config.model.init_channels=4",
    "--config.train.global_batch_size=16",
    "--config.eval.thresholds=(0.8,)",
    "--config.eval.static_thresholds=(0.5,)",  # The default sweeps 20: a test pass each.
    # These tests read the full log: CLU's key=value metric lines and orbax's temporary
    # directories, which only a verbose run prints.
    "--verbosity=0",
]
# The reference run is the same model run as a user runs it (the default, quiet output, a progress
# line every 2 steps): tests/test_console.py checks its output. Neither setting changes what is
# trained, so its final parameters are the fault runs' reference all the same.
REFERENCE_ARGS = [a for a in TINY_ARGS if a not in ("--verbosity=0", "--config.log_every_steps=1")
                  ] + ["--config.log_every_steps=2"]
RUN_TIMEOUT_S = 900  # A single run; generous for loaded 2-core machines.
STEP_LINE = re.compile(r"\] \[(\d+)\] .*loss/total")

pytestmark = pytest.mark.slow


def _env(cache_dir: str) -> dict[str, str]:
  env = dict(os.environ)
  env.update({"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache_dir,
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
              "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
  env["XLA_FLAGS"] = xla_flags()  # One CPU device: the reference mesh.
  return env


def _cmd(workdir, extra=(), driver: str | None = None) -> list[str]:
  args = [*TINY_ARGS, f"--workdir={workdir}", *extra]
  if driver is None:
    return [sys.executable, "-m", "dynroute_jax.main", *args]
  return [sys.executable, "-c", driver, *args]


class Run:
  """A training subprocess whose stderr is read line by line (and kept) by a thread."""

  def __init__(self, cache_dir: str, workdir, extra=(), driver: str | None = None):
    self.lines: list[str] = []
    self.cond = threading.Condition()
    self.proc = subprocess.Popen(_cmd(workdir, extra, driver), cwd=REPO, env=_env(cache_dir),
                                 stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, bufsize=1)
    self.reader = threading.Thread(target=self._read, daemon=True)
    self.reader.start()

  def _read(self):
    for line in self.proc.stdout:
      with self.cond:
        self.lines.append(line)
        self.cond.notify_all()
    with self.cond:
      self.cond.notify_all()

  def wait_for(self, pattern: str, timeout: float = RUN_TIMEOUT_S) -> re.Match:
    """Blocks until a line matches `pattern` (searched in lines not yet matched by this call)."""
    rx = re.compile(pattern)
    deadline = time.time() + timeout
    seen = 0
    with self.cond:
      while True:
        for line in self.lines[seen:]:
          if (m := rx.search(line)):
            return m
        seen = len(self.lines)
        if self.proc.poll() is not None and not self.reader.is_alive():
          raise AssertionError(f"run ended (rc {self.proc.returncode}) before /{pattern}/:\n"
                               + self.tail())
        left = deadline - time.time()
        if left <= 0:
          self.kill()
          raise AssertionError(f"timed out waiting for /{pattern}/:\n" + self.tail())
        self.cond.wait(min(left, 1.0))

  def finish(self, timeout: float = RUN_TIMEOUT_S) -> int:
    try:
      self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError("run timed out:\n" + self.tail())
    self.reader.join(30)
    return self.proc.returncode

  def kill(self, sig=signal.SIGKILL):
    if self.proc.poll() is None:
      self.proc.send_signal(sig)

  @property
  def text(self) -> str:
    return "".join(self.lines)

  def tail(self, n: int = 40) -> str:
    return "".join(self.lines[-n:])


def run_to_end(cache_dir, workdir, extra=(), driver=None, expect_rc=0) -> Run:
  run = Run(cache_dir, workdir, extra, driver)
  rc = run.finish()
  assert rc == expect_rc, f"exit status {rc}, expected {expect_rc}:\n{run.tail()}"
  return run


def error_line(run: Run) -> str:
  """The CLI's one-line error message."""
  lines = [l for l in run.lines if l.startswith("main: error:")]
  assert len(lines) == 1, run.tail()
  return lines[0].strip()


def final_params(workdir, step: int = TOTAL_STEPS):
  restored = ckpt_lib.restore_for_eval(os.path.join(workdir, "checkpoints"), step)
  assert int(restored.meta["step"]) == step
  return jax.device_get({"params": restored.params, "batch_stats": restored.batch_stats})


def assert_bitwise_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes(), "parameters differ"


def good_steps(workdir) -> list[int]:
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    return [s for s in ckpt.all_steps() if not ckpt.verify(s)]
  finally:
    ckpt.close()


def reference_run(cache_dir, workdir: Path) -> None:
  """An uninterrupted run into `workdir`: the `reference` fixture's (tests/conftest.py).

  Its standard output and error are kept beside the work directory, in stdout.txt and stderr.txt.
  """
  proc = subprocess.run([sys.executable, "-m", "dynroute_jax.main", *REFERENCE_ARGS,
                         f"--workdir={workdir}"], cwd=REPO, env=_env(cache_dir),
                        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  assert "Resumed" not in proc.stdout + proc.stderr
  (workdir.parent / "stdout.txt").write_text(proc.stdout)
  (workdir.parent / "stderr.txt").write_text(proc.stderr)


def test_same_seed_bitwise_identical(reference, cache_dir, tmp_path):
  """Determinism on CPU: a second run with the same config and seed gives the same bits."""
  run_to_end(cache_dir, tmp_path / "run")
  assert_bitwise_equal(final_params(tmp_path / "run"), reference[1])


def test_sigterm_saves_current_step_and_resumes(reference, cache_dir, tmp_path):
  workdir = tmp_path / "run"
  run = Run(cache_dir, workdir)
  run.wait_for(r"\] \[2\] .*loss/total")  # Step 2 is done (logged one step late).
  run.kill(signal.SIGTERM)
  rc = run.finish()
  assert rc == 0, run.tail()
  m = re.search(r"Saved step (\d+) after a stop signal", run.text)
  assert m, run.tail()
  saved = int(m.group(1))
  assert 2 < saved <= TOTAL_STEPS
  assert re.search(rf"checkpoint step {saved} is saved\. Rerun the same command", run.text)
  assert max(good_steps(workdir)) == saved  # Written at the step reached, and complete.
  assert not os.path.exists(workdir / "eval" / "report.json")
  again = run_to_end(cache_dir, workdir)
  assert f"Resumed from step {saved}" in again.text
  assert_bitwise_equal(final_params(workdir), reference[1])


def test_kill9_at_random_moments_resumes_bitwise(reference, cache_dir, tmp_path):
  """SIGINT, then SIGKILL in the middle of an async save, then SIGKILL at a seeded random moment."""
  rng = random.Random(1234)
  workdir = tmp_path / "run"
  # 1. Ctrl-C: a clean stop with a checkpoint.
  run = Run(cache_dir, workdir)
  run.wait_for(r"\] \[1\] .*loss/total")
  run.kill(signal.SIGINT)
  assert run.finish() == 0, run.tail()
  first = int(re.search(r"Saved step (\d+) after a stop signal", run.text).group(1))
  # 2. kill -9 as soon as an asynchronous save has started writing (orbax's temporary directory).
  run = Run(cache_dir, workdir)
  run.wait_for(rf"Resumed from step {first}")
  m = run.wait_for(r"/(\d+)\.orbax-checkpoint-tmp")
  run.kill()
  run.finish()
  assert run.proc.returncode == -signal.SIGKILL
  killed_in_save = int(m.group(1))
  # 3. kill -9 after a random step's log line plus a random delay (possibly during evaluation).
  run = Run(cache_dir, workdir)
  step = rng.randint(1, TOTAL_STEPS)
  delay = rng.uniform(0.0, 2.0)
  try:
    run.wait_for(rf"\] \[{step}\] .*loss/total", timeout=RUN_TIMEOUT_S)
    time.sleep(delay)
  except AssertionError:
    pass  # The run resumed past `step` and finished: nothing to kill.
  run.kill()
  run.finish()
  # 4. To the end.
  final = run_to_end(cache_dir, workdir)
  assert "Resumed from step" in final.text or killed_in_save == TOTAL_STEPS
  assert_bitwise_equal(final_params(workdir), reference[1])
  assert os.path.exists(workdir / "eval" / "report.json")


# A driver that makes the cross-entropy NaN at one step: the labels of that step's batch are set
# to -1, and a label < 0 gives a NaN loss.
NAN_DRIVER = textwrap.dedent("""
    import sys
    import jax.numpy as jnp
    from absl import app
    from dynroute_jax import input_pipeline, losses, main
    BAD_STEP = 2
    _batch, _ce = input_pipeline.train_batch, losses.cross_entropy
    def train_batch(ds, seed, step, *a, **k):
      out = dict(_batch(ds, seed, step, *a, **k))
      if step == BAD_STEP:
        out["label"] = out["label"] * 0 - 1
      return out
    def cross_entropy(logits, labels, *a, **k):
      ce = _ce(logits, jnp.maximum(labels, 0), *a, **k)
      return jnp.where(labels < 0, jnp.nan, ce)
    input_pipeline.train_batch, losses.cross_entropy = train_batch, cross_entropy
    sys.argv[0] = "dynroute_jax.main"
    app.run(main.main)
""")


def test_nonfinite_loss_stops_with_step_and_term_then_skip_mode(cache_dir, tmp_path):
  workdir = tmp_path / "run"
  every = ["--config.checkpoint.every_steps=1"]
  run = run_to_end(cache_dir, workdir, every, driver=NAN_DRIVER, expect_rc=1)
  last = error_line(run)
  print(last)  # Quoted in the README.
  assert last.startswith("main: error: NonFiniteError: Non-finite value at step 2 in loss/ce"), last
  assert "skip_nonfinite_steps" in last
  # Nothing after the bad step was checkpointed; the last checkpoint verifies and is finite.
  assert good_steps(workdir) == [1, 2]
  params = final_params(workdir, 2)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  # Opt-in: skip such steps. The run resumes from step 2, skips the bad step and finishes.
  run = run_to_end(cache_dir, workdir, every + ["--config.train.skip_nonfinite_steps=True"],
                   driver=NAN_DRIVER)
  assert "Resumed from step 2" in run.text
  skipped = re.search(r"Skipped step 2: Non-finite value at step 2 in loss/ce.*", run.text)
  assert skipped, run.tail()
  print(skipped.group(0))
  params = final_params(workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


# A driver whose checkpoint writes of step 4 fail with ENOSPC, as on a full disk.
DISK_FULL_DRIVER = textwrap.dedent("""
    import errno, sys
    from absl import app
    from etils import epath
    from dynroute_jax import main
    cls = type(epath.Path("/"))
    _write_text = cls.write_text
    def write_text(self, *a, **k):
      if "/4.orbax-checkpoint-tmp" in str(self):
        raise OSError(errno.ENOSPC, "No space left on device")
      return _write_text(self, *a, **k)
    cls.write_text = write_text
    sys.argv[0] = "dynroute_jax.main"
    app.run(main.main)
""")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_disk_full_during_save_then_resume(reference, cache_dir, tmp_path):
  workdir = tmp_path / "run"
  run = run_to_end(cache_dir, workdir, driver=DISK_FULL_DRIVER, expect_rc=1)
  last = error_line(run)
  print(last)  # Quoted in the README.
  assert last.startswith("main: error: CheckpointSaveError: saving checkpoint step 4"), last
  # The message is the last line, whole: orbax's threads, still winding down the failed save,
  # used to print hundreds of closed-event-loop tracebacks around and into it.
  assert run.text.rstrip().splitlines()[-1] == last, run.tail()
  assert "Event loop is closed" not in run.text, run.tail()
  assert "No space left on device" in last and "earlier checkpoints are untouched" in last
  assert good_steps(workdir) == [2]
  run = run_to_end(cache_dir, workdir)
  assert "Resumed from step 2" in run.text
  assert_bitwise_equal(final_params(workdir), reference[1])


def _damage(step_dir: Path, how: str) -> str:
  """Damages the largest array data file of the step's params; returns its path in the step."""
  files = [p for p in (step_dir / "params").rglob("*")
           if p.is_file() and p.parent.name == "d"]  # Tensorstore (OCDBT) data files.
  target = max(files, key=lambda p: p.stat().st_size)
  if how == "delete":
    target.unlink()
  elif how == "truncate":
    with open(target, "r+b") as f:
      f.truncate(target.stat().st_size // 2)
  else:
    data = bytearray(target.read_bytes())
    for i in range(0, len(data), max(len(data) // 8, 1)):
      data[i] ^= 0xFF
    target.write_bytes(bytes(data))
  return target.relative_to(step_dir).as_posix()


@pytest.mark.parametrize("how,problem", [("delete", "missing file"),
                                         ("truncate", "size mismatch in"),
                                         ("flip", "checksum mismatch in")])
def test_evaluate_damaged_step_names_step_and_problem(reference, tmp_path, how, problem):
  from dynroute_jax import evaluate
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  rel = _damage(workdir / "checkpoints" / str(TOTAL_STEPS), how)
  with pytest.raises(ckpt_lib.DamagedCheckpointError) as e:
    evaluate.evaluate_workdir(str(workdir), step=TOTAL_STEPS, plots=False,
                              instance_awareness=False)
  msg = str(e.value)
  assert f"checkpoint step {TOTAL_STEPS} " in msg and f"{problem} {rel}" in msg, msg


def test_resume_falls_back_from_damaged_newest_step(reference, cache_dir, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  shutil.rmtree(workdir / "eval")
  rel = _damage(workdir / "checkpoints" / str(TOTAL_STEPS), "flip")
  run = run_to_end(cache_dir, workdir)
  warning = re.search(rf"Skipping checkpoint step {TOTAL_STEPS} in .*checksum mismatch in {rel}",
                      run.text)
  assert warning, run.tail()
  print(warning.group(0))
  assert "Resumed from step 4" in run.text
  # The damaged step was moved aside (not deleted) and written again.
  assert list((workdir / "checkpoints" / "quarantine").iterdir())
  assert_bitwise_equal(final_params(workdir), reference[1])
