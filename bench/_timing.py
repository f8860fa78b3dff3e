"""Timing helpers shared by the benchmarks: interleaved rounds and same-round ratios.

On a shared machine the load drifts by several x over minutes, so the variants of one comparison
are timed in rounds (every variant once per round, in a shuffled order) and compared through the
median of their same-round ratios to a reference variant, plus the ratio of their fastest runs
(the least disturbed ones).
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np


def interleaved_times(fns: Mapping[str, Callable[[], Any]], repeats: int,
                      rng: np.random.Generator, warmup: bool = True) -> dict[str, list[float]]:
  """Seconds per call of each `fns[name]()` over `repeats` rounds, each round in a shuffled order.

  Each call's result is waited for (`jax.block_until_ready`). `warmup` runs every function once
  first, untimed.
  """
  names = list(fns)
  if warmup:
    for name in names:
      jax.block_until_ready(fns[name]())
  times = {name: [] for name in names}
  for _ in range(repeats):
    for i in rng.permutation(len(names)):
      name = names[i]
      t0 = time.perf_counter()
      jax.block_until_ready(fns[name]())
      times[name].append(time.perf_counter() - t0)
  return times


def speedups(times: Mapping[str, list[float]], ref: str = "dense"
             ) -> dict[str, tuple[float, float, float]]:
  """name -> (median seconds, median same-round ratio ref / name, fastest ref / fastest name).

  The ratios are NaN when `ref` was not timed.
  """
  out = {}
  for name, t in times.items():
    t = np.asarray(t, np.float64)
    med = float(np.median(t))
    if ref in times:
      r = np.asarray(times[ref], np.float64)
      paired = float(np.median(r / t))
      best = float(r.min() / t.min())
    else:
      paired = best = float("nan")
    out[name] = (med, paired, best)
  return out


def ratio_range(times: Mapping[str, list[float]], name: str, ref: str = "dense"
                ) -> tuple[float, float]:
  """(lowest, highest) same-round ratio ref / name: the spread around `speedups`' median."""
  if ref not in times:
    return float("nan"), float("nan")
  r = np.asarray(times[ref], np.float64) / np.asarray(times[name], np.float64)
  return float(r.min()), float(r.max())


def load_average() -> float:
  """The 1-minute load average (NaN where the OS does not report one)."""
  try:
    return os.getloadavg()[0]
  except (AttributeError, OSError):
    return float("nan")


def host() -> str:
  """The machine's processor model and CPU count, e.g. 'Intel(R) Xeon(R) Processor, 2 CPUs'.

  Printed with every figure: the same code runs 1.5-2x slower on one 2-core machine than on
  another, so a time means little without the processor it ran on.
  """
  model = ""
  try:
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), "")
  except OSError:
    pass
  return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
