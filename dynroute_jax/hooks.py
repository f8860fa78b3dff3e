"""What the train loop does around the steps: stop signals, finiteness checks, progress reports.

  * `Preemption`: SIGTERM/SIGINT become a flag that every process agrees on at step boundaries.
  * `StopEvaluationOnSignal`: during the final evaluation a signal stops it at once.
  * `StepHooks`: runs per-step hooks one step late, so that reading a step's metrics never waits
    for the step just dispatched: `CheckFinite` (stop, or skip, a non-finite step),
    `MetricsCallback` (the caller's per-step function) and `ReportProgress` (summaries and the
    console's progress line).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from typing import Any, Callable, Protocol, Sequence

from absl import logging
import jax

from dynroute_jax import console
from dynroute_jax import distributed
from dynroute_jax import tensorboard_writer

Array = jax.Array

# Multi-host: how often processes agree on whether a stop signal arrived anywhere.
PREEMPTION_CHECK_STEPS = 10


class NonFiniteError(FloatingPointError):
  """A loss term or the gradients became NaN/Inf."""


def install_stop_handlers(handler: Callable[[int, Any], None]) -> dict[int, Any]:
  """Installs `handler` for SIGTERM and SIGINT (main thread only); returns the previous ones."""
  if threading.current_thread() is not threading.main_thread():
    return {}
  return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}


def _restore_handlers(old: dict[int, Any]) -> None:
  for s, h in old.items():
    signal.signal(s, h)


class Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop checks at step boundaries (main thread only).

  `on_error` runs when the block ends with an exception (a second Ctrl-C excepted): training
  passes the checkpointer's close, so a save still in flight completes with its manifest.
  """

  def __init__(self, on_error: Callable[[], None] | None = None):
    self.signum = None
    self._old = {}
    self._on_error = on_error

  def __enter__(self) -> Preemption:
    self._old = install_stop_handlers(self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C stops at once.
    logging.warning("Received signal %d: saving a checkpoint at the next step boundary.", signum)
    self.signum = signum

  def should_stop(self, done: int, stage_end: int) -> bool:
    """Whether every process stops after `done` steps (a collective at the agreement steps).

    Every process must stop at the same step, or the others wait forever in the next all-reduce:
    they agree on the signal at fixed steps, at the stage's end, and after every step on a single
    process (where the agreement is no collective).
    """
    if done % PREEMPTION_CHECK_STEPS == 0 or done == stage_end or jax.process_count() == 1:
      return distributed.any_process(self.signum is not None)
    return False

  def __exit__(self, exc_type, exc, tb):
    _restore_handlers(self._old)
    if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt) and self._on_error:
      try:
        self._on_error()
      except Exception:  # pylint: disable=broad-except
        logging.exception("While stopping on %s, finishing the last checkpoint failed:",
                          exc_type.__name__)
    return False


class EvaluationInterrupted(BaseException):
  """A stop signal arrived during the final evaluation (BaseException: nothing may swallow it)."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"signal {signum} during the final evaluation")
    self.signum, self.step = signum, step


class StopEvaluationOnSignal:
  """During the final evaluation, turns SIGTERM/SIGINT into `EvaluationInterrupted`.

  Training's handler is gone by then, and the default one would kill the process (exit -15)
  although the final checkpoint is safe. Evaluation holds no state worth saving (its report is
  written atomically, at its end), so it is stopped at once rather than at a step boundary.
  """

  def __init__(self, step: int):
    self.step = step
    self._old = {}

  def __enter__(self) -> StopEvaluationOnSignal:
    self._old = install_stop_handlers(self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.__exit__()  # A second signal meets the previous handlers.
    raise EvaluationInterrupted(signum, self.step)

  def __exit__(self, *exc):
    old, self._old = self._old, {}
    _restore_handlers(old)
    return False


def metric_writer(workdir: str | os.PathLike[str]) -> tensorboard_writer.SummaryWriter:
  """TensorBoard summaries of every metric (process 0), echoed as key=value lines only if verbose.

  CLU's default writer always echoes each write as one long INFO line; the console gets the short
  progress lines of `console.step_line` instead. The writer needs no TensorFlow (see
  `dynroute_jax.tensorboard_writer`).
  """
  return tensorboard_writer.SummaryWriter(workdir if jax.process_index() == 0 else None,
                                          echo=console.is_verbose())


# ----------------------------------------------------------------------------------------------
# Per-step hooks.


class StepHook(Protocol):

  def __call__(self, step: int, metrics: dict[str, Array], force: bool) -> None:
    """Sees step `step`'s metrics; `force`: the last step before a save or the stage's end."""


def host_scalars(metrics: dict[str, Array]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


class StepHooks:
  """Runs `hooks` on each step's metrics one step late, so dispatch stays asynchronous."""

  def __init__(self, hooks: Sequence[StepHook]):
    self.hooks = tuple(hooks)
    self.pending = None

  def push(self, step: int, metrics: dict[str, Array]) -> None:
    if self.pending is not None:
      self._run(*self.pending, force=False)
    self.pending = (step, metrics)

  def flush(self) -> None:
    """Runs the hooks on the last step pushed (before a checkpoint can include it)."""
    if self.pending is not None:
      self._run(*self.pending, force=True)
      self.pending = None

  def _run(self, step: int, metrics: dict[str, Array], force: bool) -> None:
    for hook in self.hooks:
      hook(step, metrics, force)


def nonfinite_message(step: int, metrics: dict[str, float]) -> str:
  bad = [k for k, v in metrics.items() if k.startswith("loss/") and not math.isfinite(v)]
  if not math.isfinite(metrics.get("grad_norm", 0.0)):
    bad.append("gradients")
  return (f"Non-finite value at step {step} in {', '.join(bad) or 'the loss'} "
          f"(metrics: {metrics}). The parameters of step {step} were not applied and the last "
          "checkpoint is intact. Lower the learning rate, enable train.grad_clip_norm, or set "
          "train.skip_nonfinite_steps=True to skip such steps.")


class CheckFinite:
  """Raises `NonFiniteError` on a non-finite step, or, with `skip`, warns and carries on."""

  def __init__(self, skip: bool):
    self.skip = skip

  def __call__(self, step: int, metrics: dict[str, Array], force: bool) -> None:
    del force
    if bool(jax.device_get(metrics["finite"])):
      return
    message = nonfinite_message(step, host_scalars(metrics))
    if not self.skip:
      raise NonFiniteError(message)
    logging.warning("Skipped step %d: %s", step, message.split(" (")[0])


class MetricsCallback:
  """Calls `callback(step, scalars)` with every step's metrics as Python floats."""

  def __init__(self, callback: Callable[[int, dict[str, float]], None]):
    self.callback = callback

  def __call__(self, step: int, metrics: dict[str, Array], force: bool) -> None:
    del force
    self.callback(step, host_scalars(metrics))


class ReportProgress:
  """Every `every_steps` steps (and when forced): summaries, and one console progress line."""

  def __init__(self, writer, stage_index: int, total_steps: int, every_steps: int):
    self.writer, self.stage_index = writer, stage_index
    self.total_steps, self.every_steps = total_steps, every_steps
    self.last_time, self.last_step = time.time(), None

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` spent outside the steps (a periodic evaluation) out of step/s and ETA."""
    self.last_time += seconds

  def __call__(self, step: int, metrics: dict[str, Array], force: bool) -> None:
    if self.last_step is None:
      self.last_step = step
    if not (force or (step + 1) % self.every_steps == 0):
      return
    host = host_scalars(metrics)
    now = time.time()
    steps_per_s = max(step - self.last_step, 1) / max(now - self.last_time, 1e-9)
    self.last_time, self.last_step = now, step
    host["steps_per_sec"] = steps_per_s
    host["eta_minutes"] = (self.total_steps - step - 1) / max(steps_per_s, 1e-9) / 60
    host["stage"] = self.stage_index
    self.writer.write_scalars(step + 1, host)
    console.info(console.step_line(self.stage_index, step + 1, self.total_steps, host, steps_per_s,
                                   host["eta_minutes"] * 60))
