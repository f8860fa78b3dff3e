"""Routing dynamics of an evaluation pass: does compute follow the input?

A dynamic network earns its routers only if (a) different inputs take different amounts of compute,
(b) the amount follows difficulty, and (c) it beats a *static* network of the same cost. This
module turns the per-example arrays of one evaluation pass into those numbers (pure NumPy, no JAX):

  * `macs_stats`: per-example executed MACs mean / CV / min / max;
  * `path_stats`: distinct routing masks, the share of the most common one, and the routing units
    whose decision is constant over the whole set, as the model counts them
    (`RoutedModel.constant_decisions`: CoDiNet's blocks; DRNet's connections, whose kept branch set
    never changes, and routers, all of whose connections are constant);
  * `spearman`: rank correlation (average ranks for ties), used for MACs vs loss and MACs vs level;
  * `level_stats`: accuracy and MACs per difficulty level (datasets with levels, e.g. digits_graded);
  * `static_comparison`: the static counterpart at equal cost. Every input gets the set-mean router
    output (DRNet: mean branch weights; CoDiNet: mean run probability), swept over thresholds; its
    accuracy is interpolated at the routed model's mean MACs and the gap routed - static is given
    in points. The static network needs no routers, so its MACs exclude them.

Shape letters: N examples, S routed units (the flattened site shape of `models.base`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
  from dynroute_jax.models import base


def rankdata(x: np.ndarray) -> np.ndarray:
  """Ranks 1..N with ties given their average rank (as scipy.stats.rankdata(method='average'))."""
  x = np.asarray(x, np.float64).ravel()
  order = np.argsort(x, kind="mergesort")
  ranks = np.empty(x.size, np.float64)
  ranks[order] = np.arange(1, x.size + 1)
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=ranks)
  return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
  """Spearman's rank correlation of a and b; None when either is constant or N < 3."""
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  if a.size != b.size:
    raise ValueError(f"spearman needs equal lengths; got {a.size} and {b.size}.")
  if a.size < 3 or np.all(a == a[0]) or np.all(b == b[0]):
    return None
  ra, rb = rankdata(a), rankdata(b)
  return float(np.corrcoef(ra, rb)[0, 1])


def cross_entropy_np(logits_NxC: np.ndarray, labels_N: np.ndarray) -> np.ndarray:
  """[N] softmax cross entropy, float64."""
  z = np.asarray(logits_NxC, np.float64)
  z = z - z.max(axis=1, keepdims=True)
  lse = np.log(np.exp(z).sum(axis=1))
  return lse - z[np.arange(z.shape[0]), np.asarray(labels_N)]


def macs_stats(macs_N: np.ndarray) -> dict[str, float]:
  m = np.asarray(macs_N, np.float64)
  mean = float(m.mean())
  return {"mean": mean, "cv": float(m.std() / mean) if mean else 0.0, "min": float(m.min()),
          "max": float(m.max()), "median": float(np.median(m))}


ConstantDecisions = Callable[[np.ndarray], dict[str, Any]]


def _constant_decisions_fn(model: "base.RoutedModel | ConstantDecisions") -> ConstantDecisions:
  """The model's `constant_decisions` (or the callable itself)."""
  return getattr(model, "constant_decisions", model)


def path_stats(executed_NxS: np.ndarray, model: "base.RoutedModel | ConstantDecisions"
               ) -> dict[str, Any]:
  """Distinct paths, the most common path's share, and constant routing decisions.

  Args:
    executed_NxS: [N, S] 0/1 (or bool) routing masks of N examples.
    model: the routed model (its `constant_decisions` says which units never change), or that
      function itself.

  Returns:
    distinct_paths, most_common_path_share, paths_used_by_1pct, then the model's constant-unit
    counts (see `RoutedModel.constant_decisions`).
  """
  ex = np.asarray(executed_NxS) > 0.5
  n = ex.shape[0]
  _, counts = np.unique(np.packbits(ex, axis=1), axis=0, return_counts=True)
  counts = np.sort(counts)[::-1]
  out = {"distinct_paths": int(counts.size),
         "most_common_path_share": float(counts[0] / n),
         "paths_used_by_1pct": int(np.sum(counts >= 0.01 * n))}
  out.update(_constant_decisions_fn(model)(ex))
  return out


def level_stats(correct_N: np.ndarray, macs_N: np.ndarray, levels_N: np.ndarray
                ) -> dict[str, Any]:
  """Accuracy and MACs per difficulty level, and Spearman(MACs, level)."""
  correct = np.asarray(correct_N, bool)
  macs = np.asarray(macs_N, np.float64)
  levels = np.asarray(levels_N)
  per = {}
  for lv in np.unique(levels):
    sel = levels == lv
    per[str(int(lv))] = {"count": int(sel.sum()), "accuracy": float(correct[sel].mean()),
                         "macs_mean": float(macs[sel].mean()),
                         "macs_median": float(np.median(macs[sel]))}
  lo, hi = str(int(levels.min())), str(int(levels.max()))
  return {"per_level": per, "spearman_macs_level": spearman(macs, levels),
          "macs_ratio_top_over_bottom_level": (per[hi]["macs_mean"] / per[lo]["macs_mean"]
                                               if per[lo]["macs_mean"] else None)}


def summarize(res: dict[str, np.ndarray], model: "base.RoutedModel | ConstantDecisions"
              ) -> dict[str, Any]:
  """The dynamics section of one routed pass (needs 'macs', 'executed'; uses 'logits', 'level').

  `model` is the routed model, or its `constant_decisions` (see `path_stats`).
  """
  out: dict[str, Any] = {"macs": macs_stats(res["macs"])}
  out.update(path_stats(res["executed"], model))
  if "logits" in res:
    loss = cross_entropy_np(res["logits"], res["label"])
    out["spearman_macs_loss"] = spearman(res["macs"], loss)
  if "level" in res:
    out["levels"] = level_stats(res["prediction"] == res["label"], res["macs"], res["level"])
  return out


def interpolate_accuracy(points: Sequence[tuple[float, float]], macs: float
                         ) -> tuple[float, bool]:
  """Accuracy of a (MACs, accuracy) curve at `macs`, linearly interpolated.

  Points of equal MACs keep their best accuracy (the static network one would pick at that cost).
  Outside the curve's MACs range the end point is used and the second value is True.
  """
  best: dict[float, float] = {}
  for m, a in points:
    best[float(m)] = max(best.get(float(m), -np.inf), float(a))
  xs = np.asarray(sorted(best), np.float64)
  ys = np.asarray([best[x] for x in xs], np.float64)
  outside = bool(macs < xs[0] - 1e-9 or macs > xs[-1] + 1e-9)
  return float(np.interp(macs, xs, ys)), outside


def static_comparison(routed_accuracy: float, routed_macs: float,
                      static_sweep: dict[str, dict[str, float]]) -> dict[str, Any]:
  """Routed vs the static counterpart at the routed model's mean MACs.

  Args:
    routed_accuracy: accuracy of the routed model at its threshold.
    routed_macs: its mean executed MACs per example (routers included).
    static_sweep: threshold -> {'accuracy', 'macs_mean'} of the static network (routers excluded).

  Returns:
    dict(static_accuracy_at_routed_macs, gap_points (= 100 x (routed - static)), extrapolated,
    sweep).
  """
  points = [(s["macs_mean"], s["accuracy"]) for s in static_sweep.values()]
  acc, outside = interpolate_accuracy(points, routed_macs)
  return {"static_accuracy_at_routed_macs": acc,
          "gap_points": 100.0 * (routed_accuracy - acc),
          "extrapolated": outside,
          "routed_accuracy": routed_accuracy, "routed_macs": routed_macs,
          "sweep": static_sweep}
