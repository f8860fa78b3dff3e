"""Evaluation of a routed model over a dataset: accuracy and executed cost per example.

Evaluation is deterministic: no Gumbel noise (unless config.eval.gumbel_noise), the router softmax at
the temperature training ended with (recorded in the report as `eval_tau`), batch norm on running
statistics. "All" means every branch/block runs; "routed" uses the config's threshold.

Shape letters: B batch, S routed units, P path features.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynroute_jax import input_pipeline
from dynroute_jax import sharding

PyTree = Any


def _gather(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def make_predict_fn(model: nn.Module, data_config, *, tau: float, routed: bool, strategy: str = "dense"):
  """A jitted (variables, images_uint8, threshold) -> per-example outputs function."""

  def predict(variables, images, threshold):
    x = input_pipeline.preprocess_eval(images, data_config)
    out = model.apply(variables, x, train=False, tau=tau,
                      threshold=threshold if routed else None, strategy=strategy)
    probs = jax.nn.softmax(out.logits.astype(jnp.float32), axis=-1)
    return {
        "prediction": jnp.argmax(out.logits, -1),
        "confidence": jnp.max(probs, -1),
        "macs": out.executed_macs,
        "params": out.executed_params,
        "executed": out.executed,
        "weights": out.weights,
        "path": out.path,
    }

  return jax.jit(predict)


def run_dataset(predict_fn, variables: PyTree, ds, data_config, mesh, batch_size: int,
                threshold: float | None, keep: Iterable[str] = ("prediction", "confidence", "macs",
                                                               "params", "executed")
                ) -> dict[str, np.ndarray]:
  """Runs `predict_fn` over every example of `ds` once; returns per-example numpy arrays (+ label)."""
  n_dev = mesh.devices.size
  batch_size = -(-batch_size // n_dev) * n_dev
  thr = jnp.asarray(threshold if threshold is not None else 1.0, jnp.float32)
  chunks: dict[str, list[np.ndarray]] = {}
  for local in input_pipeline.eval_batches(ds, batch_size, jax.process_index(), jax.process_count()):
    batch = sharding.make_global_batch(local, mesh)
    out = predict_fn(variables, batch["image"], thr)
    out = {k: out[k] for k in keep}
    out["label"] = batch["label"]
    out["mask"] = batch["mask"]
    for k, v in out.items():
      chunks.setdefault(k, []).append(_gather(v))
  res = {k: np.concatenate(v) for k, v in chunks.items()}
  valid = res.pop("mask").astype(bool)
  return {k: v[valid] for k, v in res.items()}


def summarize(res: dict[str, np.ndarray], macs_all: float) -> dict[str, Any]:
  """Accuracy and cost statistics of one evaluation pass."""
  correct = res["prediction"] == res["label"]
  macs = res["macs"].astype(np.float64)
  summary = {
      "accuracy": float(np.mean(correct)),
      "macs_mean": float(np.mean(macs)),
      "macs_median": float(np.median(macs)),
      "macs_p90": float(np.percentile(macs, 90)),
      "params_mean": float(np.mean(res["params"])),
      "macs_reduction": float(1.0 - np.mean(macs) / macs_all) if macs_all else 0.0,
      "num_examples": int(correct.size),
  }
  if "executed" in res:
    ex = res["executed"] > 0.5
    summary["distinct_paths"] = int(len({row.tobytes() for row in np.packbits(ex, axis=1)}))
    summary["mean_path_length"] = float(np.mean(np.sum(ex, axis=1)))
  return summary


def evaluate_and_report(config, model: nn.Module, variables: PyTree, test_ds, mesh, workdir: str, *,
                        tau: float, step: int, thresholds: Iterable[float] | None = None,
                        strategy: str = "dense") -> dict[str, Any]:
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
    thresholds: routing thresholds to sweep (default: config.eval.thresholds).
    strategy: how skipped work is avoided (see dynroute_jax.dispatch).

  Returns:
    The report dict with top-level keys accuracy_all, accuracy_routed, macs_all, macs_routed_mean,
    and the sweep under 'thresholds'.
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variables = jax.device_put(variables, replicated)
  bs = config.eval.batch_size
  dc = config.data
  predict_all = make_predict_fn(model, dc, tau=tau, routed=False)
  predict_routed = make_predict_fn(model, dc, tau=tau, routed=True, strategy=strategy)
  res_all = run_dataset(predict_all, variables, test_ds, dc, mesh, bs, None)
  macs_all = float(np.mean(res_all["macs"]))
  all_summary = summarize(res_all, macs_all)
  sweep = {}
  t_default = float(config.eval.threshold)
  ts = sorted({float(t) for t in (thresholds if thresholds is not None else config.eval.thresholds)}
              | {t_default})
  for t in ts:
    sweep[f"{t:g}"] = summarize(run_dataset(predict_routed, variables, test_ds, dc, mesh, bs, t),
                                macs_all)
  routed = sweep[f"{t_default:g}"]
  report = {
      "model": config.model.name,
      "variant": config.model.get("variant", ""),
      "dataset": dc.name,
      "step": step,
      "eval_tau": tau,
      "threshold": t_default,
      "strategy": strategy,
      "macs_convention": "MACs per example (FLOPs = 2 x MACs)",
      "accuracy_all": all_summary["accuracy"],
      "accuracy_routed": routed["accuracy"],
      "macs_all": macs_all,
      "macs_routed_mean": routed["macs_mean"],
      "params_all": all_summary["params_mean"],
      "params_routed_mean": routed["params_mean"],
      "all": all_summary,
      "thresholds": sweep,
  }
  print(format_table(report))
  if jax.process_index() == 0:
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "report.json.tmp")
    with open(tmp, "w") as f:
      json.dump(report, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "report.json"))
    logging.info("Wrote %s", os.path.join(out_dir, "report.json"))
  return report


def format_table(report: dict[str, Any]) -> str:
  """A plain-text table of the sweep."""
  lines = [f"{report['model']} {report['variant']} on {report['dataset']} (step {report['step']}, "
           f"eval tau {report['eval_tau']:.3g}); MACs per example, FLOPs = 2 x MACs",
           f"{'threshold':>10} {'accuracy':>9} {'MACs mean':>12} {'MACs p90':>12} {'reduction':>9}",
           f"{'all':>10} {report['accuracy_all']:9.4f} {report['macs_all']:12.4g} "
           f"{report['all']['macs_p90']:12.4g} {0.0:9.1%}"]
  for t, s in report["thresholds"].items():
    lines.append(f"{t:>10} {s['accuracy']:9.4f} {s['macs_mean']:12.4g} {s['macs_p90']:12.4g} "
                 f"{s['macs_reduction']:9.1%}")
  return "\n".join(lines)
