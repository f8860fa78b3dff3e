"""Soak test: many short training runs of the tiny DRNet of test_faults.py, each hit by a fault.

Every round, chosen with a seeded RNG (printed; DYNROUTE_SOAK_SEED replays the choices, though
not the timing), does one of
  - kill -9 at a random moment (during start-up/restore, after a random step, or in a save),
  - SIGTERM at a random moment (the same moments),
  - damage: flip bytes in, truncate or delete a random data file of a random verifying step (only
    when at least two steps verify, so one good step always remains), then rerun to the end.
Each round's run resumes the previous round's work directory. After every round at least one
checkpoint step must verify (once one had), the newest verifying step must not go back (except
below a damaged step), and a run that resumes must resume from the newest verifying step. When a
run finishes training and evaluation, its final parameters must equal the uninterrupted reference
bitwise and the next round starts a fresh work directory; the last one is run to the end.

Bounded in time: after the first MIN_ROUNDS rounds (one of each kind), no new round starts once
the next one would end past DYNROUTE_SOAK_SECONDS after the test started (the reference run
included when this test is the first to need it: it is shared, tests/conftest.py). The default, 0,
runs the MIN_ROUNDS rounds only, which keeps the suite's time in bounds; a real soak sets a budget,
e.g. `DYNROUTE_SOAK_SECONDS=1800 pytest tests/test_soak.py -s` (DYNROUTE_SOAK_SEED replays one).
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import pytest

from test_faults import (TOTAL_STEPS, Run, assert_bitwise_equal,  # pylint: disable=g-bad-import-order,unused-import
                         final_params, run_to_end)

from dynroute_jax import checkpoint as ckpt_lib

pytestmark = pytest.mark.slow

SOAK_SECONDS = float(os.environ.get("DYNROUTE_SOAK_SECONDS", "0"))
WAIT_S = 300  # One run's wait for a log line; generous for loaded 2-core machines.
KINDS = ("kill9", "sigterm", "damage")
MIN_ROUNDS = len(KINDS)


@pytest.fixture(scope="module")
def soak_clock() -> float:
  """When the soak started: requested before `reference`, so its run counts if made here."""
  return time.monotonic()


def verifying_steps(workdir: Path) -> list[int]:
  """Committed steps that verify. Lists step directories itself: opening an orbax manager would
  remove the temporary directories a kill -9 left, which the next run is meant to meet."""
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    return []
  ckpt = ckpt_lib.Checkpointer(directory, async_save=False)
  try:
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())
    return [s for s in steps if not ckpt.verify(s)]
  finally:
    ckpt.close()


def damage_random_file(step_dir: Path, rng: random.Random) -> str:
  """Flips bytes in, truncates or deletes one random array data file of the step."""
  files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d")
  assert files, f"no data files in {step_dir}"
  target = rng.choice(files)
  how = rng.choice(("flip", "truncate", "delete"))
  size = target.stat().st_size
  if how == "delete" or size == 0:
    how = "delete"
    target.unlink()
  elif how == "truncate":
    with open(target, "r+b") as f:
      f.truncate(rng.randrange(size))
  else:
    data = bytearray(target.read_bytes())
    for i in rng.sample(range(size), min(size, rng.randint(1, 16))):
      data[i] ^= 0xFF
    target.write_bytes(bytes(data))
  return f"{how} {target.relative_to(step_dir).as_posix()}"


def _wait(run: Run, pattern: str) -> bool:
  """Waits for a log line; False when the run ended first (nothing left to interrupt)."""
  try:
    run.wait_for(pattern, timeout=WAIT_S)
    return True
  except AssertionError as e:
    if str(e).startswith("run ended"):
      return False
    raise


def interrupt(run: Run, sig: int, start_step: int, rng: random.Random) -> str:
  """Sends `sig` at a random moment of the run; returns the moment's description."""
  moments = ["startup"]
  if start_step < TOTAL_STEPS:
    moments += ["step", "save"]
  moment = rng.choice(moments)
  if moment == "startup":  # Imports, compilation, restore, or (if it gets that far) training.
    delay = rng.uniform(0.5, 10.0)
    end = time.monotonic() + delay
    while time.monotonic() < end and run.proc.poll() is None:
      time.sleep(0.05)
    what = f"{delay:.1f} s after start"
  elif moment == "step":  # Just after a random step (logged one step late), or later.
    k = rng.randint(start_step + 1, TOTAL_STEPS)
    delay = rng.uniform(0.0, 0.3)
    if _wait(run, rf"\] \[{k}\] .*loss/total"):
      time.sleep(delay)
    what = f"{delay:.2f} s after step {k}"
  else:  # While an asynchronous save writes (orbax's temporary directory exists).
    delay = rng.uniform(0.0, 0.15)
    if _wait(run, r"/(\d+)\.orbax-checkpoint-tmp"):
      time.sleep(delay)
    what = f"{delay:.2f} s into a save"
  ended = run.proc.poll() is not None
  run.kill(sig)
  return what + (" (the run had ended)" if ended else "")


def check_resume(run: Run, expected: int | None) -> None:
  """A run that got as far as resuming resumed from `expected`, the newest verifying step."""
  resumed = re.findall(r"Resumed from step (\d+)", run.text)
  if expected is None:
    assert not resumed, run.tail()
  elif resumed:
    assert [int(s) for s in resumed] == [expected], run.tail()


def test_soak_random_faults_resume_bitwise(soak_clock, reference, cache_dir, tmp_path):
  seed = int(os.environ.get("DYNROUTE_SOAK_SEED", time.time_ns() % 2**31))
  print(f"\nsoak seed {seed} (DYNROUTE_SOAK_SEED={seed} replays the choices)")
  rng = random.Random(seed)
  counts = dict.fromkeys(KINDS, 0)
  cycle, rounds, finished, durations = 0, 0, 0, []
  workdir = tmp_path / f"cycle{cycle}"
  bag: list[str] = []

  def finish_cycle(run: Run) -> bool:
    """Checks a run that trained and evaluated to the end; True when it did."""
    nonlocal cycle, workdir, finished
    if run.proc.returncode != 0 or not (workdir / "eval" / "report.json").exists():
      return False
    assert TOTAL_STEPS in verifying_steps(workdir)
    assert_bitwise_equal(final_params(workdir), reference[1])
    finished += 1
    cycle += 1
    workdir = tmp_path / f"cycle{cycle}"
    return True

  while True:
    elapsed = time.monotonic() - soak_clock
    estimate = max(durations) if durations else 0.0
    # MIN_ROUNDS always run (one of each fault kind): on a slow machine the soak takes longer
    # rather than testing less.
    if rounds >= MIN_ROUNDS and elapsed + estimate > SOAK_SECONDS:
      break
    t0 = time.monotonic()
    good = verifying_steps(workdir)
    if not bag:
      bag = list(KINDS)
      rng.shuffle(bag)
    kind = bag.pop(0)
    if kind == "damage" and len(good) < 2:  # Never damage the last verifying step.
      bag.append(kind)
      kind = bag.pop(0) if bag[0] != "damage" else rng.choice(("kill9", "sigterm"))
    rounds += 1
    counts[kind] += 1
    newest = max(good) if good else None
    if kind == "damage":
      step = rng.choice(good)
      what = damage_random_file(workdir / "checkpoints" / str(step), rng)
      remaining = [s for s in good if s != step]
      assert verifying_steps(workdir) == remaining
      run = run_to_end(cache_dir, workdir)
      if step == newest:
        assert re.search(rf"Skipping checkpoint step {step} in .*damaged", run.text), run.tail()
      check_resume(run, max(remaining))
      assert "Resumed from step" in run.text, run.tail()
      what = f"step {step}: {what}"
      floor = max(remaining)
    else:
      sig = signal.SIGKILL if kind == "kill9" else signal.SIGTERM
      run = Run(cache_dir, workdir)
      what = interrupt(run, sig, newest or 0, rng)
      rc = run.finish(WAIT_S)
      check_resume(run, newest)
      if kind == "kill9":
        assert rc in (0, -signal.SIGKILL), run.tail()
      else:  # Before the handler is installed SIGTERM's default action ends the process.
        assert rc in (0, -signal.SIGTERM), run.tail()
        saved = re.search(r"Saved step (\d+) after a stop signal", run.text)
        if saved:
          assert rc == 0 and max(verifying_steps(workdir)) == int(saved.group(1)), run.tail()
        if "during the final evaluation" in run.text:
          assert TOTAL_STEPS in verifying_steps(workdir), run.tail()
      floor = newest
    after = verifying_steps(workdir)
    if good:
      assert after, f"round {rounds} ({kind}) left no verifying checkpoint:\n{run.tail()}"
    if floor is not None:
      assert max(after) >= floor, f"round {rounds} ({kind}) lost progress: {good} -> {after}"
    done = finish_cycle(run)
    durations.append(time.monotonic() - t0)
    print(f"round {rounds:2d} {kind:7s} {what}; rc {run.proc.returncode}; verifying {good} -> "
          f"{after}{'; finished, bitwise equal' if done else ''} ({durations[-1]:.0f} s)")

  if (workdir / "checkpoints").exists():  # The last work directory, run to the end.
    good = verifying_steps(workdir)
    run = run_to_end(cache_dir, workdir)
    check_resume(run, max(good) if good else None)
    assert finish_cycle(run), run.tail()
  assert rounds >= MIN_ROUNDS, f"only {rounds} rounds"
  print(f"soak: {rounds} rounds ({counts['kill9']} kill -9, {counts['sigterm']} SIGTERM, "
        f"{counts['damage']} damage), all resumed bitwise ({finished} runs finished bitwise equal "
        f"to the reference, {time.monotonic() - soak_clock:.0f} s, seed {seed})")
