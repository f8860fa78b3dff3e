"""Evaluation of a routed model over a dataset: accuracy and executed cost per example.

Evaluation is deterministic: no Gumbel noise, the router softmax at the temperature training ended
with (recorded in the report as `eval_tau`), batch norm on running statistics. "All" means every
branch/block runs; "routed" uses the config's threshold (`config.eval.threshold`).

Costs are MACs per example (multiply-accumulates of conv and linear layers; FLOPs = 2 x MACs), counted
from the branches/blocks that actually run for that example (`ModelOutput.executed_macs`), routers and
fixed parts included. "Active parameters" are the parameters of what runs for an example.

Threshold semantics differ between the models: DRNet keeps, per connection, the fewest largest branch
weights reaching T (more is kept as T grows, T = 1 keeps every branch with positive weight); CoDiNet
runs a block iff its run probability v >= T (less runs as T grows). Every function here works for
both; the budget search (`choose_threshold`) does not assume either direction.

Besides the threshold sweep the report can hold:
  * `budget`: the threshold meeting a MACs budget on a calibration split (`choose_threshold`);
  * `instance_awareness`: mean MACs of confident-and-correct vs other inputs, and of clean vs
    Gaussian-noised inputs (noise in normalised units, a deterministic per-example key).

Shape letters: B batch, N examples, S routed units, P path features.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Iterable, Sequence

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynroute_jax import dynamics as dynamics_lib
from dynroute_jax import input_pipeline
from dynroute_jax import sharding

PyTree = Any

# Keys `run_dataset` keeps by default.
DEFAULT_KEEP = ("prediction", "confidence", "macs", "params", "executed")
# Instance awareness: "confident" means the top softmax probability reaches this.
CONFIDENCE_LEVEL = 0.9
DEFAULT_NOISE_STDS = (0.1, 0.3)
NOISE_SEED = 0
# Static counterpart: try every subset of blocks when there are at most this many (2^D passes).
MAX_EXHAUSTIVE_BLOCKS = 8
# Budget search: the smallest threshold tried (keeps one branch per DRNet connection).
MIN_THRESHOLD = 1e-6


def _gather(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def check_threshold(value: Any, source: str = "threshold") -> float:
  """Returns `value` as a float, or raises a ValueError naming `source` unless it lies in (0, 1]."""
  try:
    t = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{source} must be a number in (0, 1]; got {value!r}.") from None
  if not (math.isfinite(t) and 0.0 < t <= 1.0):
    raise ValueError(f"{source} must lie in (0, 1] (the routing threshold); got {value!r}.")
  return t


def image_shape(data_config) -> tuple[int, int, int]:
  return (int(data_config.image_size), int(data_config.image_size), int(data_config.num_channels))


def check_images(images: Any, expected_shape: Sequence[int]) -> None:
  """Raises a ValueError unless `images` is uint8 [B, *expected_shape] (checked before compiling)."""
  shape = getattr(images, "shape", None)
  dtype = getattr(images, "dtype", None)
  if shape is None or dtype is None:
    raise ValueError(f"images must be an array of uint8 [B, {', '.join(map(str, expected_shape))}]; "
                     f"got {type(images).__name__}.")
  want = "uint8 [B, " + ", ".join(map(str, expected_shape)) + "]"
  if len(shape) != 1 + len(expected_shape) or tuple(shape[1:]) != tuple(expected_shape):
    raise ValueError(f"images must have shape [B, {', '.join(map(str, expected_shape))}] "
                     f"(expected {want}); got shape {tuple(shape)} ({dtype}).")
  if np.dtype(dtype) != np.uint8:
    raise ValueError(f"images must have dtype uint8 with values 0..255 (expected {want}; "
                     f"normalisation happens inside); got dtype {np.dtype(dtype)}.")
  if shape[0] == 0:
    raise ValueError("images is an empty batch (B = 0).")


class Predictor:
  """A jitted forward pass over uint8 images returning per-example outputs.

  `predictor(variables, images, threshold=None, *, indices=None, noise_std=0.0)` checks the
  images' shape and dtype and the threshold before anything is traced or compiled. With
  `noise=True`, Gaussian noise of standard deviation `noise_std` (normalised units) is added after
  normalisation; example i (its index in the dataset, `indices`) always gets the same noise,
  drawn from fold_in(key(noise_seed), i), whatever the batching.
  """

  def __init__(self, model: nn.Module, data_config, *, tau: float, routed: bool,
               strategy: str = "dense", noise: bool = False, noise_seed: int = NOISE_SEED):
    self.image_shape = image_shape(data_config)
    self.routed = routed
    self.noise = noise
    noise_key = jax.random.key(noise_seed)
    shape = self.image_shape

    def predict(variables, images, threshold, indices, noise_std, router_override):
      x = input_pipeline.preprocess_eval(images, data_config)
      if noise:
        eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), shape))(indices)
        x = x + noise_std * eps.astype(x.dtype)
      out = model.apply(variables, x, train=False, tau=tau,
                        threshold=threshold if routed else None, strategy=strategy,
                        **({} if router_override is None else {"router_override": router_override}))
      probs = jax.nn.softmax(out.logits.astype(jnp.float32), axis=-1)
      static = router_override is not None
      return {
          "prediction": jnp.argmax(out.logits, -1),
          "confidence": jnp.max(probs, -1),
          # A static network (one routing for every input) needs no routers: not counted.
          "macs": out.executed_macs - (out.router_macs if static else 0.0),
          "params": out.executed_params,
          "executed": out.executed > 0.5,
          "weights": out.weights,
          "path": out.path,
          "logits": out.logits.astype(jnp.float32),
          "router_probs": out.router_probs,
      }

    self._jitted = jax.jit(predict)

  def __call__(self, variables: PyTree, images, threshold=None, *, indices=None,
               noise_std: float = 0.0, router_override=None) -> dict[str, jax.Array]:
    def concrete(value: Any, name: str) -> np.ndarray | None:
      """`value` as float64 numbers; None for a traced value (checked where it is made)."""
      if isinstance(value, jax.Array) and not getattr(value, "is_fully_addressable", True):
        return None  # Spans other hosts: each process checks the part it made.
      try:
        return np.asarray(jax.device_get(value) if isinstance(value, jax.Array) else value,
                          np.float64)
      except jax.errors.JAXTypeError:
        return None
      except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or an array of numbers; got {value!r}.") from None

    check_images(images, self.image_shape)
    if self.routed:
      if threshold is None:
        raise ValueError("This predictor routes: pass a threshold in (0, 1].")
      if isinstance(threshold, (int, float, np.floating, np.integer)):
        threshold = check_threshold(threshold)
      else:
        # An array of thresholds: every entry obeys the scalar's range (1.5 would run nothing).
        values = concrete(threshold, "threshold")
        if values is not None:
          bad = values[~(np.isfinite(values) & (values > 0.0) & (values <= 1.0))]
          if bad.size:
            raise ValueError(f"threshold must lie in (0, 1] (the routing threshold), every entry "
                             f"of an array too; got {float(bad.flat[0])!r} in an array of shape "
                             f"{values.shape}.")
    std = concrete(noise_std, "noise_std")
    if std is not None and (std.shape != () or not (np.isfinite(std) and std >= 0.0)):
      raise ValueError(f"noise_std must be one finite number >= 0 (a standard deviation, in "
                       f"normalised units); got {noise_std!r}.")
    thr = jnp.asarray(1.0 if threshold is None else threshold, jnp.float32)
    if indices is None:
      indices = np.arange(images.shape[0], dtype=np.int32)
    else:
      # One dataset index per image, or the noise of example i would be drawn for another one.
      shape, dtype = np.shape(indices), getattr(indices, "dtype", None)
      if dtype is None:
        dtype = np.asarray(indices).dtype
      if tuple(shape) != (images.shape[0],) or not np.issubdtype(dtype, np.integer):
        raise ValueError(f"indices must hold one int per image, shape ({images.shape[0]},); got "
                         f"shape {tuple(shape)} ({dtype}).")
    override = None if router_override is None else jnp.asarray(router_override, jnp.float32)
    return self._jitted(variables, images, thr, indices, jnp.asarray(noise_std, jnp.float32),
                        override)


def make_predict_fn(model: nn.Module, data_config, *, tau: float, routed: bool,
                    strategy: str = "dense", noise: bool = False) -> Predictor:
  """A (variables, images_uint8, threshold) -> per-example outputs function (see `Predictor`)."""
  return Predictor(model, data_config, tau=tau, routed=routed, strategy=strategy, noise=noise)


def run_dataset(predict_fn, variables: PyTree, ds, data_config, mesh, batch_size: int,
                threshold: float | None, keep: Iterable[str] = DEFAULT_KEEP, *,
                noise_std: float = 0.0, router_override=None) -> dict[str, np.ndarray]:
  """Runs `predict_fn` over every example of `ds` once; returns per-example numpy arrays.

  Adds 'label' and 'index' (position in `ds`). Batches are sharded over `mesh`.
  """
  del data_config
  n_dev = mesh.devices.size
  batch_size = -(-batch_size // n_dev) * n_dev
  pc, pi = jax.process_count(), jax.process_index()
  local = batch_size // pc
  keep = tuple(keep)
  chunks: dict[str, list[np.ndarray]] = {}
  for k, batch_local in enumerate(input_pipeline.eval_batches(ds, batch_size, pi, pc)):
    start = k * batch_size + pi * local
    batch_local = dict(batch_local, index=np.arange(start, start + local, dtype=np.int32))
    batch = sharding.make_global_batch(batch_local, mesh)
    extra = {} if router_override is None else {"router_override": router_override}
    out = predict_fn(variables, batch["image"], threshold, indices=batch["index"],
                     noise_std=noise_std, **extra)
    out = {key: out[key] for key in keep}
    out["label"] = batch["label"]
    if "level" in batch:
      out["level"] = batch["level"]
    out["index"] = batch["index"]
    out["mask"] = batch["mask"]
    for key, v in out.items():
      chunks.setdefault(key, []).append(_gather(v))
  res = {key: np.concatenate(v) for key, v in chunks.items()}
  valid = res.pop("mask").astype(bool)
  return {key: v[valid] for key, v in res.items()}


def selection_ratios(executed: np.ndarray, site_shape: Sequence[int]) -> dict[str, Any]:
  """Share of examples running each routed unit (DRNet Fig. 2; CoDiNet run ratio per block).

  DRNet (site_shape (L, C, K)): 'branch_selection' [L][C][K], 'branch_selection_per_cell' [L][K]
  (mean over connections) and 'branch_ratio' [K]. CoDiNet (site_shape (D,)): 'run_ratio_per_block'
  [D] and 'run_ratio'.
  """
  ex = executed.astype(np.float64)
  mean = ex.mean(axis=0) if ex.shape[0] else np.zeros(ex.shape[1:])
  site_shape = tuple(int(s) for s in site_shape)
  if len(site_shape) == 3:
    sel = mean.reshape(site_shape)
    return {"branch_selection": np.round(sel, 6).tolist(),
            "branch_selection_per_cell": np.round(sel.mean(axis=1), 6).tolist(),
            "branch_ratio": np.round(sel.mean(axis=(0, 1)), 6).tolist()}
  if len(site_shape) == 1:
    return {"run_ratio_per_block": np.round(mean, 6).tolist(), "run_ratio": float(mean.mean())}
  return {}


def summarize(res: dict[str, np.ndarray], macs_all: float,
              site_shape: Sequence[int] | None = None) -> dict[str, Any]:
  """Accuracy and cost statistics of one evaluation pass."""
  correct = res["prediction"] == res["label"]
  macs = res["macs"].astype(np.float64)
  summary = {
      "accuracy": float(np.mean(correct)),
      "macs_mean": float(np.mean(macs)),
      "macs_median": float(np.median(macs)),
      "macs_p90": float(np.percentile(macs, 90)),
      "params_mean": float(np.mean(res["params"])),
      # max(0, .) + 0.0: the all-branches pass reads exactly 0, never -0.0 from rounding.
      "macs_reduction": max(0.0, float(1.0 - np.mean(macs) / macs_all)) + 0.0 if macs_all else 0.0,
      "num_examples": int(correct.size),
  }
  if "executed" in res:
    ex = res["executed"] > 0.5
    summary["distinct_paths"] = int(len({row.tobytes() for row in np.packbits(ex, axis=1)}))
    summary["mean_path_length"] = float(np.mean(np.sum(ex, axis=1)))
    if site_shape:
      summary.update(selection_ratios(ex, site_shape))
  return summary


def _site_shape(model: nn.Module, data_config) -> tuple[int, ...]:
  shape = getattr(model, "site_shape", None)
  if isinstance(shape, tuple):
    return shape
  if hasattr(model, "block_specs"):  # CoDiNet: one routed unit per block.
    return (len(model.block_specs((data_config.image_size, data_config.image_size))),)
  return ()


def _unit_names(model_name: str) -> list[str] | None:
  if model_name == "drnet":
    from dynroute_jax.models import drnet  # pylint: disable=g-import-not-at-top
    return list(drnet.BRANCHES)
  return None


# ------------------------------------------------------------------------------------------------
# Budget mode.


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
  grid = sorted({check_threshold(t, "budget search threshold") for t in grid})
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
    t_best = best[1]
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


def check_target_macs(value: Any) -> float:
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"target_macs must be a positive number of MACs per example; got {value!r}.") from None
  if not (math.isfinite(x) and x > 0):
    raise ValueError(f"target_macs must be a finite number > 0 (MACs per example); got {value!r}.")
  return x


# ------------------------------------------------------------------------------------------------
# Instance awareness.


def confidence_split(res: dict[str, np.ndarray], level: float = CONFIDENCE_LEVEL) -> dict[str, Any]:
  """Mean MACs of confidently correct inputs vs misclassified or low-confidence ones."""
  correct = res["prediction"] == res["label"]
  easy = correct & (res["confidence"] >= level)
  macs = res["macs"].astype(np.float64)

  def stats(sel):
    n = int(np.sum(sel))
    return {"count": n, "macs_mean": float(np.mean(macs[sel])) if n else None,
            "macs_median": float(np.median(macs[sel])) if n else None}

  out = {"confidence_level": level, "confident_correct": stats(easy),
         "misclassified_or_unconfident": stats(~easy), "misclassified": stats(~correct)}
  a, b = out["confident_correct"]["macs_mean"], out["misclassified_or_unconfident"]["macs_mean"]
  out["macs_ratio_hard_over_easy"] = (b / a) if (a and b is not None) else None
  if macs.size > 1 and np.std(macs) > 0 and np.std(res["confidence"]) > 0:
    out["corr_confidence_macs"] = float(np.corrcoef(res["confidence"], macs)[0, 1])
  else:
    out["corr_confidence_macs"] = None
  return out


def noise_comparison(clean: dict[str, np.ndarray], noisy: dict[float, dict[str, np.ndarray]]
                     ) -> dict[str, Any]:
  """Clean vs Gaussian-noised copies of the same images (matched by dataset index)."""
  clean_macs = clean["macs"].astype(np.float64)
  out = {"clean": {"accuracy": float(np.mean(clean["prediction"] == clean["label"])),
                   "macs_mean": float(np.mean(clean_macs))}}
  for std, res in sorted(noisy.items()):
    if not np.array_equal(res["index"], clean["index"]):
      raise RuntimeError("internal: noisy and clean passes cover different examples")
    macs = res["macs"].astype(np.float64)
    out[f"std_{std:g}"] = {
        "noise_std": std,
        "accuracy": float(np.mean(res["prediction"] == res["label"])),
        "macs_mean": float(np.mean(macs)),
        "macs_change": float(np.mean(macs) - np.mean(clean_macs)),
        "macs_change_relative": float(np.mean(macs) / np.mean(clean_macs) - 1.0),
        "share_more_macs": float(np.mean(macs > clean_macs)),
        "share_fewer_macs": float(np.mean(macs < clean_macs)),
    }
  return out


# ------------------------------------------------------------------------------------------------
# The report.


def evaluate_and_report(config, model: nn.Module, variables: PyTree, test_ds, mesh, workdir: str, *,
                        tau: float, step: int, thresholds: Iterable[float] | None = None,
                        strategy: str = "dense", calibration_ds=None,
                        target_macs: float | None = None, instance_awareness: bool = False,
                        noise_stds: Sequence[float] = DEFAULT_NOISE_STDS, plots: bool = False,
                        tsne_max_points: int = 2000, extra: dict[str, Any] | None = None,
                        calibration_info: dict[str, Any] | None = None) -> dict[str, Any]:
  """Evaluates with all branches and with routing, writes `workdir/eval/report.json`, prints a table.

  Args:
    config: the run's config.
    model: the Flax module.
    variables: {'params', 'batch_stats'}.
    test_ds: the evaluation dataset (input_pipeline.ArrayDataset).
    mesh: device mesh; the batch is sharded over it, parameters replicated.
    workdir: the run directory.
    tau: the router temperature evaluation uses (the one training ended with).
    step: the checkpoint step evaluated, recorded in the report.
    thresholds: routing thresholds to sweep (default: config.eval.thresholds); the config's
      threshold is always added.
    strategy: how skipped work is avoided (see dynroute_jax.dispatch).
    calibration_ds: calibration split for budget mode (needed with `target_macs`).
    target_macs: budget mode: choose the threshold meeting this mean MACs per example on
      `calibration_ds`, then report test accuracy/MACs at it under 'budget'.
    instance_awareness: add the 'instance_awareness' section (confidence split, noisy inputs).
    noise_stds: Gaussian noise levels (normalised units) for the instance-awareness section.
    plots: write the PNG figures (dynroute_jax.plots) into workdir/eval.
    tsne_max_points: examples (an evenly spaced subset) in the t-SNE plot.
    extra: entries merged into the report (e.g. checkpoint details).
    calibration_info: entries merged into the 'budget' section (how the calibration split was made).

  Returns:
    The report dict with top-level keys accuracy_all, accuracy_routed, macs_all, macs_routed_mean,
    and the sweep under 'thresholds'.
  """
  t_default = check_threshold(config.eval.threshold, "config.eval.threshold")
  ts = sorted({check_threshold(t, "threshold") for t in
               (thresholds if thresholds is not None else config.eval.thresholds)} | {t_default})
  if target_macs is not None:
    target_macs = check_target_macs(target_macs)
    if calibration_ds is None:
      raise ValueError("target_macs needs a calibration split (calibration_ds).")
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variables = jax.device_put(variables, replicated)
  bs = config.eval.batch_size
  dc = config.data
  site_shape = _site_shape(model, dc)
  predict_all = make_predict_fn(model, dc, tau=tau, routed=False)
  # With instance awareness the routed function also takes the noise level (0 = clean, exactly),
  # so the noisy passes reuse its compilation.
  predict_routed = make_predict_fn(model, dc, tau=tau, routed=True, strategy=strategy,
                                   noise=instance_awareness)
  res_all = run_dataset(predict_all, variables, test_ds, dc, mesh, bs, None,
                        DEFAULT_KEEP + ("router_probs",))
  macs_all = float(np.mean(res_all["macs"]))
  all_summary = summarize(res_all, macs_all)
  sweep = {}
  res_default = None
  for t in ts:
    keep = DEFAULT_KEEP + (("path", "weights", "logits") if t == t_default else ())
    res = run_dataset(predict_routed, variables, test_ds, dc, mesh, bs, t, keep)
    sweep[f"{t:g}"] = summarize(res, macs_all, site_shape)
    if t == t_default:
      res_default = res
  routed = sweep[f"{t_default:g}"]
  report = {
      "model": config.model.name,
      "variant": config.model.get("variant", ""),
      "dataset": dc.name,
      "step": step,
      "eval_tau": tau,
      "router_noise": "none (deterministic softmax of the router logits at eval_tau)",
      "threshold": t_default,
      "strategy": strategy,
      "macs_convention": "MACs per example (FLOPs = 2 x MACs)",
      "accuracy_all": all_summary["accuracy"],
      "accuracy_routed": routed["accuracy"],
      "macs_all": macs_all,
      "macs_routed_mean": routed["macs_mean"],
      "params_all": all_summary["params_mean"],
      "params_routed_mean": routed["params_mean"],
      "site_shape": list(site_shape),
      "all": all_summary,
      "thresholds": sweep,
  }
  report["dynamics"] = dynamics_lib.summarize(res_default, site_shape)
  report["static"] = static_counterpart(
      predict_routed, variables, test_ds, config, mesh, res_all["router_probs"].mean(axis=0),
      routed_accuracy=routed["accuracy"], routed_macs=routed["macs_mean"], site_shape=site_shape)
  names = _unit_names(config.model.name)
  if names:
    report["branch_names"] = names
  if extra:
    report.update(extra)

  if target_macs is not None:
    def cal_macs(t):
      r = run_dataset(predict_routed, variables, calibration_ds, dc, mesh, bs, t, ("macs",))
      return float(np.mean(r["macs"]))

    budget = choose_threshold(cal_macs, target_macs)
    budget["calibration_examples"] = len(calibration_ds)
    budget.update(calibration_info or {})
    if budget["feasible"]:
      res_b = run_dataset(predict_routed, variables, test_ds, dc, mesh, bs, budget["threshold"])
      s = summarize(res_b, macs_all)
      budget["test"] = {k: s[k] for k in ("accuracy", "macs_mean", "macs_median", "macs_p90",
                                          "params_mean", "macs_reduction")}
    else:
      logging.warning("%s", budget["message"])
    report["budget"] = budget

  if instance_awareness:
    noisy = {float(s): run_dataset(predict_routed, variables, test_ds, dc, mesh, bs, t_default,
                                   noise_std=float(s))
             for s in noise_stds}
    report["instance_awareness"] = {
        "threshold": t_default,
        "confidence": confidence_split(res_default),
        "noise": dict(noise_comparison(res_default, noisy), noise_units="normalised (after "
                      "per-channel mean/std)", noise_seed=NOISE_SEED),
    }

  out_dir = epath.Path(workdir) / "eval"  # Any filesystem etils.epath supports (gs://, ...).
  if plots and jax.process_index() == 0:
    from dynroute_jax import plots as plots_lib  # pylint: disable=g-import-not-at-top
    out_dir.mkdir(parents=True, exist_ok=True)
    report["plots"] = plots_lib.write_all(report, res_default, test_ds, out_dir,
                                          tsne_max_points=tsne_max_points, seed=int(config.seed))
  print(format_table(report))
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out_dir / "report.json")
    logging.info("Wrote %s", out_dir / "report.json")
  return report


def static_counterpart(predict_fn, variables: PyTree, ds, config, mesh, mean_router_S: np.ndarray,
                       *, routed_accuracy: float, routed_macs: float,
                       site_shape: Sequence[int] = ()) -> dict[str, Any]:
  """The static network of equal cost: every input gets the set-mean router output.

  Sweeps `config.eval.static_thresholds` plus the routed sweep's thresholds (DRNet: the kept
  branches of the mean weights; CoDiNet: the blocks whose mean run probability reaches the
  cut-off), MACs without the routers, and compares with the routed model at its mean MACs
  (`dynamics.static_comparison`).
  """
  ts = sorted({check_threshold(t, "config.eval.static_thresholds") for t in
               (*config.eval.get("static_thresholds", ()), *config.eval.thresholds,
                config.eval.threshold)})
  mean = np.asarray(mean_router_S, np.float32)
  sweep = {}
  for t in ts:
    res = run_dataset(predict_fn, variables, ds, config.data, mesh, config.eval.batch_size, t,
                      ("prediction", "macs"), router_override=mean)
    sweep[f"{t:g}"] = {"accuracy": float(np.mean(res["prediction"] == res["label"])),
                       "macs_mean": float(np.mean(res["macs"]))}
  out = dynamics_lib.static_comparison(routed_accuracy, routed_macs, sweep)
  out["mean_router_output"] = np.round(mean, 6).tolist()
  # One run/skip decision per unit (site shape (D,)): a fixed subset of units is a static path.
  if len(site_shape) == 1 and mean.size <= MAX_EXHAUSTIVE_BLOCKS:
    out["best_subset"] = _best_static_subsets(predict_fn, variables, ds, config, mesh, mean.size,
                                              routed_accuracy, routed_macs)
  out["macs_convention"] = "static MACs exclude the routers (a static network has none)"
  return out


def _best_static_subsets(predict_fn, variables: PyTree, ds, config, mesh, num_blocks: int,
                         routed_accuracy: float, routed_macs: float) -> dict[str, Any]:
  """A stronger static baseline for block routing: every one of the 2^D fixed subsets of blocks.

  The mean-router sweep only tries the subsets nested by mean run probability; the best static
  network of a given cost may be another subset. Its accuracy at the routed MACs is interpolated
  on the upper envelope of all subsets (evaluated on the same test set, so it is optimistic for
  the static side: the subset is picked on the data it is scored on).
  """
  points = []
  for code in range(2 ** num_blocks):
    subset = np.asarray([(code >> k) & 1 for k in range(num_blocks)], np.float32)
    res = run_dataset(predict_fn, variables, ds, config.data, mesh, config.eval.batch_size, 0.5,
                      ("prediction", "macs"), router_override=subset)
    points.append((float(np.mean(res["macs"])), float(np.mean(res["prediction"] == res["label"]))))
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


def _fmt_macs(x: float) -> str:
  return f"{x / 1e6:.4g}M" if x >= 1e5 else f"{x:.4g}"


def format_table(report: dict[str, Any]) -> str:
  """A plain-text table of the sweep (plus budget and instance-awareness lines when present)."""
  lines = [f"{report['model']} {report['variant']} on {report['dataset']} (step {report['step']}, "
           f"eval tau {report['eval_tau']:.3g}, strategy {report.get('strategy', 'dense')}); "
           "MACs per example, FLOPs = 2 x MACs",
           f"{'threshold':>10} {'accuracy':>9} {'MACs mean':>10} {'median':>10} {'p90':>10} "
           f"{'params':>10} {'reduction':>9} {'paths':>6} {'path len':>8}"]

  def row(name, s):
    return (f"{name:>10} {s['accuracy']:9.4f} {_fmt_macs(s['macs_mean']):>10} "
            f"{_fmt_macs(s['macs_median']):>10} {_fmt_macs(s['macs_p90']):>10} "
            f"{_fmt_macs(s['params_mean']):>10} {s['macs_reduction']:9.1%} "
            f"{s.get('distinct_paths', ''):>6} {s.get('mean_path_length', float('nan')):8.2f}")

  lines.append(row("all", report["all"]))
  for t, s in report["thresholds"].items():
    mark = "*" if float(t) == float(report["threshold"]) else ""
    lines.append(row(t + mark, s))
  lines.append(f"(* = the config's threshold; reduction against all branches: "
               f"{_fmt_macs(report['macs_all'])} MACs)")
  lines.extend(_dynamics_lines(report))
  b = report.get("budget")
  if b:
    if b["feasible"]:
      tst = b.get("test", {})
      lines.append(f"budget {_fmt_macs(b['target_macs'])} MACs: threshold {b['threshold']:.4g} "
                   f"(calibration {_fmt_macs(b['macs'])} MACs); test accuracy "
                   f"{tst.get('accuracy', float('nan')):.4f}, {_fmt_macs(tst.get('macs_mean', 0.0))} MACs")
    else:
      lines.append("budget: INFEASIBLE. " + b["message"])
  ia = report.get("instance_awareness")
  if ia:
    c = ia["confidence"]
    e, h = c["confident_correct"], c["misclassified_or_unconfident"]
    fm = lambda s: "n/a" if s["macs_mean"] is None else _fmt_macs(s["macs_mean"])
    lines.append(f"instance awareness at threshold {ia['threshold']:g}: confident (>= "
                 f"{c['confidence_level']:g}) and correct {fm(e)} MACs (n={e['count']}) vs "
                 f"misclassified or unconfident {fm(h)} MACs (n={h['count']})")
    n = ia["noise"]
    parts = [f"clean {_fmt_macs(n['clean']['macs_mean'])} (acc {n['clean']['accuracy']:.3f})"]
    for k, v in n.items():
      if k.startswith("std_"):
        parts.append(f"noise std {v['noise_std']:g}: {_fmt_macs(v['macs_mean'])} "
                     f"({v['macs_change_relative']:+.1%}, acc {v['accuracy']:.3f})")
    lines.append("  MACs " + "; ".join(parts))
  return "\n".join(lines)


def _fmt(x: Any, spec: str = ".3f") -> str:
  return "n/a" if x is None else format(x, spec)


def _dynamics_lines(report: dict[str, Any]) -> list[str]:
  """The dynamics and static-counterpart lines of the table."""
  d, st = report.get("dynamics"), report.get("static")
  if not d:
    return []
  m = d["macs"]
  lines = [f"dynamics at threshold {report['threshold']:g}: MACs mean {_fmt_macs(m['mean'])} "
           f"CV {m['cv']:.1%} min {_fmt_macs(m['min'])} max {_fmt_macs(m['max'])}; "
           f"{d['distinct_paths']} paths (most common {d['most_common_path_share']:.1%}, "
           f"{d['paths_used_by_1pct']} used by >= 1%); constant routers {d['constant_routers']}/"
           f"{d['num_routers']}" + (f", constant connections {d['constant_connections']}/"
                                    f"{d['num_connections']}" if "constant_connections" in d else "")
           + f"; Spearman(MACs, loss) {_fmt(d.get('spearman_macs_loss'), '+.3f')}"]
  lv = d.get("levels")
  if lv:
    per = "; ".join(f"L{k}: acc {v['accuracy']:.3f} MACs {_fmt_macs(v['macs_mean'])}"
                    for k, v in lv["per_level"].items())
    lines.append(f"  per level: {per}; Spearman(MACs, level) "
                 f"{_fmt(lv['spearman_macs_level'], '+.3f')}; top/bottom level MACs "
                 f"{_fmt(lv['macs_ratio_top_over_bottom_level'], '.3f')}x")
  if st:
    lines.append(f"  static counterpart (mean router output, no routers): "
                 f"{st['static_accuracy_at_routed_macs']:.4f} at {_fmt_macs(st['routed_macs'])} MACs"
                 f"{' (extrapolated)' if st['extrapolated'] else ''}; routed - static = "
                 f"{st['gap_points']:+.2f} points")
    bs = st.get("best_subset")
    if bs:
      lines.append(f"  best fixed subset of blocks (of {bs['num_subsets']}, picked on this set): "
                   f"{bs['static_accuracy_at_routed_macs']:.4f}; routed - best subset = "
                   f"{bs['gap_points']:+.2f} points")
  return lines
