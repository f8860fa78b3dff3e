"""Budget mode: the threshold meeting a MACs budget on a calibration split.

Threshold semantics differ between the models (DRNet keeps more as T grows, CoDiNet runs less),
so the search assumes neither direction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import numpy as np

from dynroute_jax import config_lib
from dynroute_jax.evaluation import metrics
from dynroute_jax.evaluation import predict

# The smallest threshold tried (keeps one branch per DRNet connection).
MIN_THRESHOLD = 1e-6
# The test summary's entries the budget section keeps.
_TEST_KEYS = ("accuracy", "macs_mean", "macs_median", "macs_p90", "params_mean", "macs_reduction")


def check_target_macs(value: Any) -> float:
  """`value` as a float, or a ValueError unless it is a finite number > 0 of MACs per example."""
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"target_macs must be a positive number of MACs per example; got {value!r}.") from None
  if not (math.isfinite(x) and x > 0):
    raise ValueError(f"target_macs must be a finite number > 0 (MACs per example); got {value!r}.")
  return x


@dataclasses.dataclass(frozen=True, eq=False)
class BudgetRequest:
  """A MACs budget to meet, checked when made (before anything is compiled).

  Attributes:
    target_macs: the budget, mean MACs per example (finite, > 0).
    calibration_ds: the split the threshold is chosen on.
    info: entries merged into the report's 'budget' section (how the split was made).
  """
  target_macs: float
  calibration_ds: Any
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    object.__setattr__(self, "target_macs", check_target_macs(self.target_macs))
    if self.calibration_ds is None:
      raise ValueError("target_macs needs a calibration split (calibration_ds).")


def _refine(f: Callable[[float], float], ok: Callable[[float], bool], grid: Sequence[float],
            seen: dict[float, float], t_best: float, refine_steps: int) -> None:
  """Bisects from the best feasible grid point towards each infeasible grid neighbour."""
  i = grid.index(t_best) if t_best in grid else None
  neighbours = []
  if i is not None:
    neighbours = [grid[j] for j in (i - 1, i + 1) if 0 <= j < len(grid) and not ok(seen[grid[j]])]
  for t_bad in neighbours:
    lo, hi = t_best, t_bad  # lo feasible, hi infeasible.
    for _ in range(refine_steps):
      mid = 0.5 * (lo + hi)
      if ok(f(mid)):
        lo = mid
      else:
        hi = mid


def choose_threshold(mean_macs_at: Callable[[float], float], target_macs: float, *,
                     grid: Sequence[float] | None = None, refine_steps: int = 8) -> dict[str, Any]:
  """Picks the threshold in (0, 1] whose mean MACs is the largest not exceeding `target_macs`.

  A grid search (default: 1e-6 and 0.05, 0.10, ..., 1.0) followed by bisection between the best
  feasible grid point and each infeasible neighbour. No monotonicity is assumed: the answer is the
  best feasible point among those evaluated (ties: the larger threshold for a rising curve).

  Args:
    mean_macs_at: threshold -> mean MACs per example on the calibration data.
    target_macs: the budget (MACs per example), finite and > 0.
    grid: thresholds to try first.
    refine_steps: bisection steps towards each infeasible neighbour of the best grid point.

  Returns:
    dict(feasible, threshold, macs, cheapest_macs, cheapest_threshold, evaluated=[[t, macs], ...],
    message). When infeasible, threshold and macs are None.
  """
  target = float(target_macs)
  if grid is None:
    grid = [MIN_THRESHOLD] + [round(0.05 * i, 2) for i in range(1, 21)]
  grid = sorted({config_lib.check_threshold(t, "budget search threshold") for t in grid})
  seen: dict[float, float] = {}

  def f(t: float) -> float:
    if t not in seen:
      seen[t] = float(mean_macs_at(t))
    return seen[t]

  tol = 1e-9 * max(abs(target), 1.0)
  ok = lambda m: m <= target + tol

  def best_feasible():
    cand = [(m, t) for t, m in seen.items() if ok(m)]
    return max(cand) if cand else None

  for t in grid:
    f(t)
  best = best_feasible()
  if best is not None:
    _refine(f, ok, grid, seen, best[1], refine_steps)
    best = best_feasible()
  cheapest_t, cheapest = min(seen.items(), key=lambda kv: (kv[1], -kv[0]))
  evaluated = [[t, m] for t, m in sorted(seen.items())]
  if best is None:
    return {"feasible": False, "threshold": None, "macs": None, "target_macs": target,
            "cheapest_macs": cheapest, "cheapest_threshold": cheapest_t, "evaluated": evaluated,
            "message": (f"The budget of {target:.6g} MACs per example is below the cheapest "
                        f"achievable mean of {cheapest:.6g} MACs (at threshold {cheapest_t:g}) on "
                        "the calibration data: no threshold meets it.")}
  macs, t = best
  return {"feasible": True, "threshold": t, "macs": macs, "target_macs": target,
          "cheapest_macs": cheapest, "cheapest_threshold": cheapest_t, "evaluated": evaluated,
          "message": (f"Threshold {t:.6g}: {macs:.6g} mean MACs per example on the calibration data "
                      f"(budget {target:.6g}).")}


def budget_section(passes: predict.Passes, request: BudgetRequest, test_ds,
                   macs_all: float) -> dict[str, Any]:
  """The report's 'budget' section: the threshold chosen on calibration data, then tested."""
  cal_ds = request.calibration_ds

  def cal_macs(t):
    return float(np.mean(passes.routed(cal_ds, t, ("macs",))["macs"]))

  budget = choose_threshold(cal_macs, request.target_macs)
  budget["calibration_examples"] = len(cal_ds)
  budget.update(request.info or {})
  if budget["feasible"]:
    s = metrics.summarize(passes.routed(test_ds, budget["threshold"]), macs_all)
    budget["test"] = {k: s[k] for k in _TEST_KEYS}
  else:
    logging.warning("%s", budget["message"])
  return budget
