"""The static counterpart: the network of equal cost whose routing is the same for every input.

Every input gets the set-mean router output (DRNet: mean branch weights; CoDiNet: mean run
probability), swept over thresholds; a static network needs no routers, so its MACs leave them
out. For run/skip routing with few units, every fixed subset of units is tried as well.

Shape letters: S routed units, D blocks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dynroute_jax import config_lib
from dynroute_jax import dynamics as dynamics_lib
from dynroute_jax.evaluation import predict

# Try every subset of blocks when there are at most this many (2^D passes).
MAX_EXHAUSTIVE_BLOCKS = 8


def _accuracy_and_macs(passes: predict.Passes, ds, threshold: float,
                       router_override: np.ndarray) -> tuple[float, float]:
  res = passes.routed(ds, threshold, ("prediction", "macs"), router_override=router_override)
  return float(np.mean(res["prediction"] == res["label"])), float(np.mean(res["macs"]))


def static_counterpart(passes: predict.Passes, ds, config, mean_router_S: np.ndarray, *,
                       routed_accuracy: float, routed_macs: float,
                       run_skip: bool = False) -> dict[str, Any]:
  """The static network of equal cost: every input gets the set-mean router output.

  Sweeps `config.eval.static_thresholds` plus the routed sweep's thresholds (DRNet: the kept
  branches of the mean weights; CoDiNet: the blocks whose mean run probability reaches the
  cut-off), MACs without the routers, and compares with the routed model at its mean MACs
  (`dynamics.static_comparison`).

  Args:
    passes: the evaluation's passes (the routed predictor takes the override).
    ds: the dataset.
    config: the run's config (its eval thresholds).
    mean_router_S: [S] the set-mean router output.
    routed_accuracy: the routed model's accuracy at the config's threshold.
    routed_macs: its mean MACs there.
    run_skip: each unit is run or skipped (one decision per unit): fixed subsets of units are
      static paths too (`best_subset`).
  """
  ts = sorted({config_lib.check_threshold(t, "config.eval.static_thresholds") for t in
               (*config.eval.get("static_thresholds", ()), *config.eval.thresholds,
                config.eval.threshold)})
  mean = np.asarray(mean_router_S, np.float32)
  sweep = {}
  for t in ts:
    accuracy, macs = _accuracy_and_macs(passes, ds, t, mean)
    sweep[f"{t:g}"] = {"accuracy": accuracy, "macs_mean": macs}
  out = dynamics_lib.static_comparison(routed_accuracy, routed_macs, sweep)
  out["mean_router_output"] = np.round(mean, 6).tolist()
  if run_skip and mean.size <= MAX_EXHAUSTIVE_BLOCKS:
    out["best_subset"] = best_static_subsets(passes, ds, mean.size, routed_accuracy, routed_macs)
  out["macs_convention"] = "static MACs exclude the routers (a static network has none)"
  return out


def best_static_subsets(passes: predict.Passes, ds, num_blocks: int, routed_accuracy: float,
                        routed_macs: float) -> dict[str, Any]:
  """A stronger static baseline for block routing: every one of the 2^D fixed subsets of blocks.

  The mean-router sweep only tries the subsets nested by mean run probability; the best static
  network of a given cost may be another subset. Its accuracy at the routed MACs is interpolated
  on the upper envelope of all subsets (evaluated on the same test set, so it is optimistic for
  the static side: the subset is picked on the data it is scored on).
  """
  points = []
  for code in range(2 ** num_blocks):
    subset_D = np.asarray([(code >> k) & 1 for k in range(num_blocks)], np.float32)
    accuracy, macs = _accuracy_and_macs(passes, ds, 0.5, subset_D)
    points.append((macs, accuracy))
  envelope, best = [], -1.0
  for m, a in sorted(points):
    if a > best:
      envelope.append((m, a))
      best = a
  sweep = {f"subset_{i}": {"macs_mean": m, "accuracy": a} for i, (m, a) in enumerate(envelope)}
  out = dynamics_lib.static_comparison(routed_accuracy, routed_macs, sweep)
  out["num_subsets"] = len(points)
  out["note"] = ("upper envelope of all fixed block subsets, chosen on the test set itself "
                 "(optimistic for the static network)")
  return out
