"""What a person at the terminal reads: one line per event, libraries quiet unless asked.

By default the command-line programs (`dynroute_jax.main`, `dynroute_jax.evaluate`) print

  stage 1  compiled the train step in 18.3 s
  stage 1  step 200/700  loss 0.043  acc 0.984  tau 3.00  1.2 step/s  ETA 6m51s
  checkpoint step 200 (saving in the background)

plus warnings, errors and the final report table, and silence the INFO messages of the libraries
underneath (orbax's save internals, JAX's backend probing, TensorFlow's start-up banner). Passing
absl's `--verbosity` (`-v`, e.g. `-v 0` for INFO) restores every library's log output, routes these
lines through absl logging (timestamps, thread, file) and echoes every metric as CLU's
`key=value` lines. The metrics are written to the TensorBoard summaries either way.

Library use (`train.train_and_evaluate` from a notebook or a test) prints the same lines and leaves
the logging configuration of the caller alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging as py_logging
import math
import os
import sys
import threading
import types
import warnings
from typing import Mapping

from absl import logging

# Python loggers silenced below WARNING by default. orbax logs through absl's logger, which the
# verbosity covers; the others are plain Python loggers that propagate to absl's handler.
QUIET_LOGGERS = ("jax", "jax._src", "orbax", "tensorflow", "tensorflow_datasets", "matplotlib",
                 "etils", "clu")

_verbose = False


def is_verbose() -> bool:
  """Whether lines go to absl logging (with every library's INFO) rather than to stdout."""
  return _verbose


def configure_for_program(verbosity_given: bool | None = None) -> bool:
  """Sets the console behaviour of a command-line program once absl has parsed its flags.

  Args:
    verbosity_given: whether the user asked for a verbosity; None reads absl's `--verbosity`
      (`-v`) flag: given on the command line means verbose.

  Returns:
    Whether the program runs verbose.
  """
  global _verbose
  _route_teardown_noise()
  if verbosity_given is None:
    from absl import flags  # pylint: disable=g-import-not-at-top
    verbosity_given = bool(flags.FLAGS["verbosity"].present)
  _verbose = bool(verbosity_given)
  if _verbose:
    return True
  # C++ INFO lines of XLA and older TensorFlow versions; must precede their first log.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  logging.set_verbosity(logging.WARNING)
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    chosen = flags.FLAGS["logger_levels"].value or {}
  except (KeyError, flags.UnparsedFlagAccessError):
    chosen = {}
  for name in QUIET_LOGGERS:
    if name not in chosen:  # An explicit --logger_levels=name:LEVEL wins.
      py_logging.getLogger(name).setLevel(py_logging.WARNING)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OneLineLibraryTracebacks) for f in handler.filters):
    handler.addFilter(_OneLineLibraryTracebacks())
  return False


class _OneLineLibraryTracebacks(py_logging.Filter):
  """Drops the traceback of the libraries' warnings and errors: one line each by default.

  A failed save makes orbax log the same OSError from half a dozen threads, 30 lines each, before
  the program's own one-line error names it; `-v 0` shows them in full.
  """

  _OWN = os.path.dirname(os.path.abspath(__file__)) + os.sep

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.exc_info and not os.path.abspath(record.pathname).startswith(self._OWN):
      kind = record.exc_info[0].__name__ if record.exc_info[0] else "exception"
      record.msg = f"{record.getMessage()} ({kind}; -v 0 shows the traceback)"
      record.args, record.exc_info, record.exc_text = None, None, None
    return True


# Unraisable exceptions that orbax's asynchronous saves leave behind once a save has failed:
# tensorstore completes the writes still in flight and calls back into event loops and executors
# that orbax has already closed. Each is a harmless multi-line traceback, printed hundreds of
# times from other threads, in the middle of the progress lines and the final error.
_TEARDOWN_NOISE = ("Event loop is closed", "cannot schedule new futures after")
teardown_noise_count = 0  # How many such exceptions were routed to the debug log.


def _route_teardown_noise() -> None:
  """Sends `_TEARDOWN_NOISE` exceptions to absl's debug log (`-v 1`); others print as usual."""
  previous = sys.unraisablehook
  if getattr(previous, "_dynroute_teardown", False):
    return

  def hook(unraisable) -> None:
    global teardown_noise_count
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and any(m in str(value) for m in _TEARDOWN_NOISE):
      teardown_noise_count += 1
      logging.debug("Ignored after a failed asynchronous save: %r", value)
      return
    previous(unraisable)

  hook._dynroute_teardown = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def final_error(message: str) -> None:
  """Prints `message` as the program's last console line and keeps the teardown quiet after it.

  Only the interpreter's shutdown follows; what the libraries say while their background threads
  wind down (orbax errors about the save that already failed, in its log or as its threads'
  uncaught exceptions, never-awaited coroutines) goes to the debug log only. The console's file
  descriptors are pointed at /dev/null before the message is written to a copy of stderr's: a
  thread that had already passed its logger's level check, or writes to stderr directly, cannot
  print below the message (orbax's failed commit did, at random, under the disk-full fault test).
  """
  logging.set_verbosity(logging.FATAL)
  for name in QUIET_LOGGERS:
    py_logging.getLogger(name).setLevel(py_logging.CRITICAL)
  sys.unraisablehook = lambda unraisable: logging.debug("After the error: %r",
                                                        unraisable.exc_value)
  threading.excepthook = lambda args: logging.debug(
      "After the error, thread %s: %r", getattr(args.thread, "name", "?"), args.exc_value)
  warnings.simplefilter("ignore")
  sys.stdout.flush()
  sys.stderr.flush()
  console = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    for fd in (1, 2):
      os.dup2(devnull, fd)
    os.write(console, (message + "\n").encode())  # one call: nothing can split the line
  finally:
    os.close(devnull)
    os.close(console)


def import_quietly(name: str) -> types.ModuleType | None:
  """Imports `name` with its native start-up lines discarded; None if it is not installed.

  TensorFlow 2.2x logs its oneDNN/CPU-feature banner through C++ absl logging straight to file
  descriptor 2 at import, ignoring TF_CPP_MIN_LOG_LEVEL, so the only way to keep it off the
  console is to point that descriptor elsewhere while the import runs. Python exceptions of the
  import still propagate (they are printed after the descriptor is restored). Verbose programs
  import normally.
  """
  if _verbose or name in sys.modules:
    return importlib.import_module(name)
  if importlib.util.find_spec(name) is None:
    return None
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as devnull:
      os.dup2(devnull.fileno(), 2)
      try:
        return importlib.import_module(name)
      finally:
        os.dup2(saved, 2)
  finally:
    os.close(saved)


def info(message: str) -> None:
  """One line for the person running the program (printed by process 0 only, unless verbose)."""
  if _verbose:
    logging.info("%s", message)
    return
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(message, file=sys.stdout, flush=True)


def format_duration(seconds: float) -> str:
  """6m51s, 42s, 1h05m (whole seconds; '?' when unknown)."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "?"
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _number(x: float) -> str:
  """Three significant digits, without exponent noise for the usual loss range."""
  if not math.isfinite(x):
    return str(x)
  if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
    return f"{x:.2e}"
  return f"{x:.3g}" if abs(x) >= 1 else f"{x:.3f}"


def step_line(stage: int, done: int, total: int, metrics: Mapping[str, float],
              steps_per_sec: float, eta_seconds: float) -> str:
  """`stage 1  step 200/700  loss 0.043  acc 0.984  tau 3.00  1.2 step/s  ETA 6m51s`.

  Args:
    stage: the stage index (1-based).
    done: steps finished so far, over all stages.
    total: the run's total steps.
    metrics: the step's metrics as floats (`loss/total`, `accuracy`, `tau` are shown when present).
    steps_per_sec: measured over the last log interval.
    eta_seconds: estimated time to the end of training.
  """
  parts = [f"stage {stage}", f"step {done}/{total}"]
  if "loss/total" in metrics:
    parts.append(f"loss {_number(float(metrics['loss/total']))}")
  if "accuracy" in metrics:
    parts.append(f"acc {float(metrics['accuracy']):.3f}")
  if "tau" in metrics:
    parts.append(f"tau {float(metrics['tau']):.2f}")
  rate = f"{steps_per_sec:.3g}" if steps_per_sec < 10 else f"{steps_per_sec:.0f}"
  parts.append(f"{rate} step/s")
  parts.append(f"ETA {format_duration(eta_seconds)}")
  return "  ".join(parts)


__all__ = ["QUIET_LOGGERS", "configure_for_program", "final_error", "format_duration",
           "import_quietly", "info", "is_verbose", "step_line"]
