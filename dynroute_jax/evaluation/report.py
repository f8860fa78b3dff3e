"""The evaluation report: every pass of a routed model over the test set, written and printed.

"All" means every branch/block runs; "routed" uses the config's threshold
(`config.eval.threshold`), swept over `ReportOptions.thresholds`. The report also holds the
dynamics at the config's threshold, the static counterpart, and optionally the budget and
instance-awareness sections. It goes to `workdir/eval/report.json` (any filesystem etils.epath
supports) and its table to stdout.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import numpy as np

from dynroute_jax import config_lib
from dynroute_jax import dispatch
from dynroute_jax import dynamics as dynamics_lib
from dynroute_jax.evaluation import budget as budget_lib
from dynroute_jax.evaluation import instance
from dynroute_jax.evaluation import metrics
from dynroute_jax.evaluation import predict
from dynroute_jax.evaluation import static
from dynroute_jax.evaluation import table

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ReportOptions:
  """What an evaluation report holds besides the sweep at the config's thresholds.

  Attributes:
    thresholds: routing thresholds to sweep (None: config.eval.thresholds); the config's threshold
      is always added.
    strategy: how skipped work is avoided (see dynroute_jax.dispatch): a name (with the options
      of config.eval.dispatch), a mapping or a Strategy; None: config.eval.strategy.
    budget: budget mode: choose the threshold meeting a mean MACs per example on a calibration
      split, then report test accuracy/MACs at it under 'budget'.
    instance_awareness: add the 'instance_awareness' section (confidence split, noisy inputs).
    noise_stds: Gaussian noise levels (normalised units) for the instance-awareness section.
    plots: write the PNG figures (dynroute_jax.plots) into workdir/eval.
    tsne_max_points: examples (an evenly spaced subset) in the t-SNE plot.
    extra: entries merged into the report (e.g. checkpoint details).
  """
  thresholds: Sequence[float] | None = None
  strategy: dispatch.StrategySpec | None = None
  budget: budget_lib.BudgetRequest | None = None
  instance_awareness: bool = False
  noise_stds: Sequence[float] = instance.DEFAULT_NOISE_STDS
  plots: bool = False
  tsne_max_points: int = 2000
  extra: Mapping[str, Any] | None = None


def evaluate_and_report(config, model: nn.Module, variables: PyTree, test_ds, mesh, workdir: str, *,
                        tau: float, step: int,
                        options: ReportOptions = ReportOptions()) -> dict[str, Any]:
  """Evaluates with all branches and with routing, writes `workdir/eval/report.json`, prints a table.

  Args:
    config: the run's config.
    model: the Flax module (a `models.base.RoutedModel`).
    variables: {'params', 'batch_stats'}.
    test_ds: the evaluation dataset (input_pipeline.ArrayDataset).
    mesh: device mesh; the batch is sharded over it, parameters replicated.
    workdir: the run directory.
    tau: the router temperature evaluation uses (the one training ended with).
    step: the checkpoint step evaluated, recorded in the report.
    options: what else to measure and write (see `ReportOptions`).

  Returns:
    The report dict with top-level keys accuracy_all, accuracy_routed, macs_all, macs_routed_mean,
    and the sweep under 'thresholds'.
  """
  t_default = config_lib.check_threshold(config.eval.threshold, "config.eval.threshold")
  ts = sorted({config_lib.check_threshold(t, "threshold") for t in
               (options.thresholds if options.thresholds is not None else config.eval.thresholds)}
              | {t_default})
  strategy = config_lib.eval_strategy(config, options.strategy)
  passes = predict.make_passes(model, config, variables, mesh, tau=tau, strategy=strategy,
                               noise=options.instance_awareness)
  res_all = passes.all(test_ds, predict.DEFAULT_KEEP + ("router_probs",))
  macs_all = float(np.mean(res_all["macs"]))
  all_summary = metrics.summarize(res_all, macs_all)
  sweep, res_default = _sweep(passes, test_ds, ts, t_default, macs_all, model)
  routed = sweep[f"{t_default:g}"]
  image_hw = (config.data.image_size, config.data.image_size)
  report = _header(config, step, tau, t_default, dispatch.describe(strategy))
  report.update(_headline(all_summary, routed, macs_all))
  report.update(site_shape=list(model.routing_site_shape(image_hw)), all=all_summary,
                thresholds=sweep)
  report["dynamics"] = dynamics_lib.summarize(res_default, model)
  report["static"] = static.static_counterpart(
      passes, test_ds, config, res_all["router_probs"].mean(axis=0),
      routed_accuracy=routed["accuracy"], routed_macs=routed["macs_mean"],
      run_skip=model.unit_names() is None)
  names = model.unit_names()
  if names:
    report["branch_names"] = names
  if options.extra:
    report.update(options.extra)
  if options.budget is not None:
    report["budget"] = budget_lib.budget_section(passes, options.budget, test_ds, macs_all)
  if options.instance_awareness:
    report["instance_awareness"] = instance.instance_section(passes, test_ds, t_default,
                                                             res_default, options.noise_stds)
  out_dir = epath.Path(workdir) / "eval"  # Any filesystem etils.epath supports (gs://, ...).
  if options.plots and jax.process_index() == 0:
    report["plots"] = _write_plots(report, res_default, test_ds, out_dir, options, config)
  print(table.format_table(report))
  if jax.process_index() == 0:
    _write_json(report, out_dir)
  return report


def _sweep(passes: predict.Passes, test_ds, ts: Sequence[float], t_default: float,
           macs_all: float, model: nn.Module) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """The summary per threshold, and the per-example pass at the config's threshold."""
  sweep, res_default = {}, None
  for t in ts:
    keep = predict.DEFAULT_KEEP + (("path", "weights", "logits") if t == t_default else ())
    res = passes.routed(test_ds, t, keep)
    sweep[f"{t:g}"] = metrics.summarize(res, macs_all, model)
    if t == t_default:
      res_default = res
  return sweep, res_default


def evaluate_headline(config, model: nn.Module, variables: PyTree, test_ds, mesh, *,
                      tau: float) -> dict[str, float]:
  """The report's headline alone: accuracy and mean MACs with every branch, and routed at
  `config.eval.threshold` (the periodic evaluation during training, `config.eval_every_steps`).

  Its two passes are the final report's (same predictors, compiled once per process).

  Returns:
    accuracy_all, accuracy_routed, macs_all, macs_routed_mean (MACs per example), threshold.
  """
  t = config_lib.check_threshold(config.eval.threshold, "config.eval.threshold")
  passes = predict.make_passes(model, config, variables, mesh, tau=tau,
                               strategy=config_lib.eval_strategy(config), noise=False)
  res_all = passes.all(test_ds)
  macs_all = float(np.mean(res_all["macs"]))
  routed = metrics.summarize(passes.routed(test_ds, t), macs_all)
  return {"accuracy_all": metrics.summarize(res_all, macs_all)["accuracy"],
          "accuracy_routed": routed["accuracy"], "macs_all": macs_all,
          "macs_routed_mean": routed["macs_mean"], "threshold": t}


def _header(config, step: int, tau: float, threshold: float, strategy: str) -> dict[str, Any]:
  """What was evaluated, and how."""
  return {
      "model": config.model.name,
      "variant": config.model.get("variant", ""),
      "dataset": config.data.name,
      "step": step,
      "eval_tau": tau,
      "router_noise": "none (deterministic softmax of the router logits at eval_tau)",
      "threshold": threshold,
      "strategy": strategy,
      "macs_convention": "MACs per example (FLOPs = 2 x MACs)",
  }


def _headline(all_summary: dict[str, Any], routed: dict[str, Any],
              macs_all: float) -> dict[str, Any]:
  """Accuracy, MACs and parameters with every branch and routed at the config's threshold."""
  return {
      "accuracy_all": all_summary["accuracy"],
      "accuracy_routed": routed["accuracy"],
      "macs_all": macs_all,
      "macs_routed_mean": routed["macs_mean"],
      "params_all": all_summary["params_mean"],
      "params_routed_mean": routed["params_mean"],
  }


def _write_plots(report: dict[str, Any], res_default: dict[str, np.ndarray], test_ds,
                 out_dir: epath.Path, options: ReportOptions, config) -> list[str]:
  from dynroute_jax import plots as plots_lib  # pylint: disable=g-import-not-at-top
  out_dir.mkdir(parents=True, exist_ok=True)
  return plots_lib.write_all(report, res_default, test_ds, out_dir,
                             tsne_max_points=options.tsne_max_points, seed=int(config.seed))


def _write_json(report: dict[str, Any], out_dir: epath.Path) -> None:
  """Writes `out_dir/report.json` through a temporary file, so a reader never sees half of it."""
  out_dir.mkdir(parents=True, exist_ok=True)
  tmp = out_dir / "report.json.tmp"
  tmp.write_text(json.dumps(report, indent=2))
  tmp.replace(out_dir / "report.json")
  logging.info("Wrote %s", out_dir / "report.json")
