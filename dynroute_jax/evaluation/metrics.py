"""Accuracy and cost statistics of one evaluation pass.

Costs are MACs per example (multiply-accumulates of conv and linear layers; FLOPs = 2 x MACs),
counted from the branches/blocks that actually run for that example, routers and fixed parts
included. "Active parameters" are the parameters of what runs for an example.

Shape letters: N examples, S routed units.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dynroute_jax.models import base


def summarize(res: dict[str, np.ndarray], macs_all: float,
              model: base.RoutedModel | None = None) -> dict[str, Any]:
  """Accuracy, MACs and paths of one pass; with `model`, its selection ratios of the routed units.

  Args:
    res: per-example arrays of `run_dataset` ('prediction', 'label', 'macs', 'params', and
      'executed' [N, S] for the path statistics).
    macs_all: mean MACs with every branch running (the reduction's reference).
    model: the routed model, whose `selection_ratios` lays out the share running each unit.
  """
  correct = res["prediction"] == res["label"]
  macs = res["macs"].astype(np.float64)
  summary = {
      "accuracy": float(np.mean(correct)),
      "macs_mean": float(np.mean(macs)),
      "macs_median": float(np.median(macs)),
      "macs_p90": float(np.percentile(macs, 90)),
      # In float64 like the MACs: a float32 mean of 359 x 101370 read 101370.0078.
      "params_mean": float(np.mean(res["params"].astype(np.float64))),
      # max(0, .) + 0.0: the all-branches pass reads exactly 0, never -0.0 from rounding.
      "macs_reduction": max(0.0, float(1.0 - np.mean(macs) / macs_all)) + 0.0 if macs_all else 0.0,
      "num_examples": int(correct.size),
  }
  if "executed" in res:
    executed_NxS = res["executed"] > 0.5
    summary["distinct_paths"] = int(len({row.tobytes()
                                         for row in np.packbits(executed_NxS, axis=1)}))
    summary["mean_path_length"] = float(np.mean(np.sum(executed_NxS, axis=1)))
    if model is not None:
      summary.update(model.selection_ratios(executed_NxS))
  return summary
