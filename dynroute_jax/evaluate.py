"""Evaluates a trained run from its work directory: threshold sweep, budget mode, plots.

  python -m dynroute_jax.evaluate --workdir=runs/drnet_s
  python -m dynroute_jax.evaluate --workdir=runs/drnet_s --step=3000 --thresholds=0.5,0.8,1.0
  python -m dynroute_jax.evaluate --workdir=runs/drnet_s --target_macs=40e6

What it does:
  1. Rebuilds the config from WORKDIR/config.json (JSON only; nothing is executed or unpickled) and
     the model from it.
  2. Restores parameters and batch statistics (no optimizer state) of the newest intact checkpoint
     (or --step), replicated over a data-parallel mesh of however many devices are present now.
     A checkpoint of another model (its recorded fingerprint, or its parameter shapes, differ from
     config.json's model) is refused.
  3. Evaluates the test split with every branch and at each threshold, measures instance awareness
     (confident-and-correct vs other inputs; clean vs Gaussian-noised inputs), optionally picks the
     threshold meeting a MACs budget on a calibration split of the train set, writes
     WORKDIR/eval/report.json and the figures (WORKDIR/eval/*.png), and prints a table.

Where the report goes: WORKDIR/eval/report.json is the report of the newest checkpoint step (the
one the end of training evaluates, and writes there too). Evaluating any other step (an older
--step, or the fallback when the newest step is damaged) writes WORKDIR/eval/step_<N>/report.json
and its figures instead, with a warning saying so: the training's report is never replaced by an
older step's. The report records where it went as `report_file`.

Eval temperature: the router temperature of the checkpoint's step, recomputed from the config's
schedule of the stage the checkpoint belongs to (for a finished run: the temperature training ended
with, as the end-of-training evaluation uses). Recorded as `eval_tau`. The restoration is
`inference.restore_run`, the one `dynroute_jax.restore` does.

Calibration split: `schedules.training_splits(config)`, the share config.data.calibration_fraction of
the train split that training holds out (a pure function of the config and seed), so budget mode
picks its threshold on images the model has never seen.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from dynroute_jax import checkpoint as ckpt_lib
from dynroute_jax import config_lib
from dynroute_jax import dispatch
from dynroute_jax import evaluation
from dynroute_jax import inference
from dynroute_jax import input_pipeline

# The restoration's names, as callers of this module know them.
EvaluationSetupError = inference.EvaluationSetupError
load_config = inference.load_config
eval_temperature = inference.eval_temperature
STRATEGIES = dispatch.STRATEGIES


def parse_thresholds(text: str | Sequence[float] | None) -> list[float] | None:
  """'0.5,0.8,1.0' -> [0.5, 0.8, 1.0]; each must lie in (0, 1]."""
  if text is None or (isinstance(text, str) and not text.strip()):
    return None
  items = text.split(",") if isinstance(text, str) else list(text)
  out = []
  for item in items:
    if isinstance(item, str) and not item.strip():
      raise ValueError(f"--thresholds has an empty entry: {text!r}; write numbers in (0, 1] "
                       "separated by commas, e.g. 0.5,0.8,1.0.")
    out.append(config_lib.check_threshold(item.strip() if isinstance(item, str) else item,
                                          "--thresholds entry"))
  return out


def _eval_mesh():
  """A data-parallel mesh over every device present now (parameters replicated)."""
  from dynroute_jax import sharding  # pylint: disable=g-import-not-at-top
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))


def _check_arguments(step: int | None, strategy: str | None, target_macs: Any,
                     noise_stds: Sequence[float], tsne_max_points: int = 2000) -> float | None:
  """Raises a ValueError for a bad argument; returns target_macs as a float (or None)."""
  if isinstance(tsne_max_points, bool) or not isinstance(tsne_max_points, (int, np.integer)) \
      or tsne_max_points < 1:
    raise ValueError(f"--tsne_max_points must be an int >= 1 (test examples in the t-SNE plot); "
                     f"got {tsne_max_points!r}.")
  if target_macs is not None:
    target_macs = evaluation.check_target_macs(target_macs)
  if strategy is not None and strategy not in STRATEGIES:
    raise ValueError(f"--strategy must be one of {STRATEGIES}; got {strategy!r}.")
  if step is not None and (not isinstance(step, (int, np.integer)) or step < 0):
    raise ValueError(f"--step must be a checkpoint step (an int >= 0); got {step!r}.")
  for s in noise_stds:
    if not (np.isfinite(s) and s >= 0):
      raise ValueError(f"noise standard deviations must be finite and >= 0; got {s!r}.")
  return target_macs


def _newest_step(workdir: str) -> int | None:
  """The newest step directory (orbax's temporary ones have a suffix); damaged ones count."""
  ckpt_dir = epath.Path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir():
    return None  # No checkpoints: `inference.restore_run` says so.
  return max((int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()), default=None)


def _budget_request(config, target_macs: float | None,
                    held_out) -> evaluation.BudgetRequest | None:
  if target_macs is None:
    return None
  if held_out is None or len(held_out) == 0:
    raise EvaluationSetupError(
        f"config.data.calibration_fraction={config.data.calibration_fraction} leaves no "
        "calibration examples for --target_macs.")
  # The trainer trains on the rest of the train split; see the module docstring.
  return evaluation.BudgetRequest(
      target_macs, held_out,
      info={"calibration_fraction": float(config.data.calibration_fraction),
            "calibration_held_out_from_training": True})


def _output_root(workdir: str, newest: int | None, ckpt_step: int,
                 step: int | None) -> tuple[str, str | None]:
  """(where evaluation writes eval/, the step's own directory or None for WORKDIR/eval).

  Any step but the newest is reported in eval/step_<N>/, written under a temporary root first.
  """
  if newest is None or ckpt_step == newest:
    return workdir, None
  out_root = os.path.join(workdir, f".eval_step_{ckpt_step}.tmp")
  target = os.path.join(workdir, "eval", f"step_{ckpt_step}")
  why = (f"--step={ckpt_step} was asked for" if step is not None else
         f"the newest step {newest} does not verify (see the warning above)")
  logging.warning("Evaluating checkpoint step %d, not the newest checkpoint step %d (%s): the "
                  "report and figures go to %s; %s is left as it is.", ckpt_step, newest, why,
                  target, os.path.join(workdir, "eval", "report.json"))
  if jax.process_index() == 0 and epath.Path(out_root).exists():
    epath.Path(out_root).rmtree()  # Left by an evaluation that was interrupted.
  return out_root, target


def _move_into_place(out_root: str, target: str) -> None:
  """Evaluation wrote <out_root>/eval/: it becomes `target`."""
  final = epath.Path(target)
  if final.exists():
    final.rmtree()
  final.parent.mkdir(parents=True, exist_ok=True)
  (epath.Path(out_root) / "eval").rename(final)
  epath.Path(out_root).rmtree()


def evaluate_workdir(workdir: str, *, step: int | None = None,
                     thresholds: str | Sequence[float] | None = None,
                     strategy: str | None = None,
                     target_macs: float | str | None = None, plots: bool = True,
                     instance_awareness: bool = True,
                     noise_stds: Sequence[float] = evaluation.DEFAULT_NOISE_STDS,
                     tsne_max_points: int = 2000) -> dict[str, Any]:
  """Evaluates the run in `workdir` (see the module docstring); returns the report.

  Raises:
    EvaluationSetupError (a ValueError): missing/empty work directory or config, bad arguments.
    ValueError: a threshold outside (0, 1], a nonsensical target_macs, an unknown strategy.
    checkpoint.CheckpointNotFoundError: no checkpoint, or no checkpoint at `step` (the message
      lists the available steps).
    checkpoint.DamagedCheckpointError: the requested step is damaged.
    checkpoint.FingerprintMismatchError: the checkpoint belongs to another model.
  """
  # Every argument is checked before anything is loaded or compiled.
  ts = parse_thresholds(thresholds)
  target_macs = _check_arguments(step, strategy, target_macs, noise_stds, tsne_max_points)
  meshes = []

  def replicated():  # Made once the work directory is known to hold checkpoints.
    meshes.append(_eval_mesh())
    return jax.sharding.NamedSharding(meshes[0], jax.sharding.PartitionSpec())

  newest = _newest_step(workdir)  # Before restoring: a damaged newest step still counts.
  run = inference.restore_run(workdir, step, sharding_fn=replicated)
  config, mesh = run.config, meshes[0]
  test_ds = input_pipeline.load_dataset(config.data, config.data.eval_split)
  budget = _budget_request(config, target_macs, run.calibration_ds)
  local = "://" not in os.fspath(workdir)
  extra = {"checkpoint": {"step": run.step, "stage": run.stage, "fingerprint": run.fingerprint,
                          "workdir": os.path.abspath(workdir) if local else os.fspath(workdir)},
           "eval_tau_source": f"stage {run.stage} temperature schedule at step {run.step}",
           "num_devices": int(mesh.devices.size)}
  out_root, target = _output_root(workdir, newest, run.step, step)
  extra["report_file"] = os.path.join(
      workdir, "eval", *([f"step_{run.step}"] if target else []), "report.json")
  options = evaluation.ReportOptions(
      thresholds=ts, strategy=strategy, budget=budget, instance_awareness=instance_awareness,
      noise_stds=tuple(noise_stds), plots=plots, tsne_max_points=tsne_max_points, extra=extra)
  report = evaluation.evaluate_and_report(config, run.model, run.variables, test_ds, mesh,
                                          out_root, tau=run.tau, step=run.step, options=options)
  if target and jax.process_index() == 0:
    _move_into_place(out_root, target)
  return report


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so importing defines none)."""
  flags.DEFINE_string("workdir", None, "The training run's work directory.")
  flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest intact one).")
  flags.DEFINE_string("thresholds", None, "Comma-separated thresholds in (0, 1] to sweep "
                      "(default: config.eval.thresholds); the config's threshold is always added.")
  flags.DEFINE_string("strategy", None, f"Dispatch strategy, one of {STRATEGIES}, with the "
                      "options of the run's config.eval.dispatch (default: config.eval.strategy).")
  flags.DEFINE_float("target_macs", None, "Budget mode: pick the threshold whose mean MACs per "
                     "example on the calibration split is the largest not exceeding this.")
  flags.DEFINE_bool("plots", True, "Write the PNG figures into WORKDIR/eval.")
  flags.DEFINE_bool("instance_awareness", True, "Measure MACs of easy/hard and clean/noisy inputs.")
  flags.DEFINE_string("noise_stds", "0.1,0.3", "Gaussian noise levels (normalised units).")
  flags.DEFINE_integer("tsne_max_points", 2000, "Test examples in the t-SNE plot (evenly spaced).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required.")
  from dynroute_jax import compile_cache  # pylint: disable=g-import-not-at-top
  from dynroute_jax import console  # pylint: disable=g-import-not-at-top
  console.configure_for_program()
  compile_cache.enable()
  try:
    noise = [float(s) for s in FLAGS.noise_stds.split(",") if s.strip()]
  except ValueError:
    raise app.UsageError(f"--noise_stds must be comma-separated numbers; got {FLAGS.noise_stds!r}.")
  try:
    report = evaluate_workdir(FLAGS.workdir, step=FLAGS.step, thresholds=FLAGS.thresholds,
                              strategy=FLAGS.strategy, target_macs=FLAGS.target_macs,
                              plots=FLAGS.plots, instance_awareness=FLAGS.instance_awareness,
                              noise_stds=noise, tsne_max_points=FLAGS.tsne_max_points)
  except (ValueError, ckpt_lib.CheckpointError) as e:
    console.final_error(f"evaluate: error: {e}")
    sys.exit(2)
  console.info(f"Wrote {report['report_file']}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
