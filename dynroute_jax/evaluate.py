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
with, as the end-of-training evaluation uses). Recorded as `eval_tau`.

Calibration split: `train.training_splits(config)`, the share config.data.calibration_fraction of
the train split that training holds out (a pure function of the config and seed), so budget mode
picks its threshold on images the model has never seen.
"""

from __future__ import annotations

import json
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
from dynroute_jax import evaluation

STRATEGIES = ("auto", "dense", "batch_cond", "per_example", "compact", "chunk")


class EvaluationSetupError(ValueError):
  """The work directory, step or arguments cannot be evaluated (the message says why)."""


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run saved as WORKDIR/config.json."""
  if not workdir:
    raise EvaluationSetupError("--workdir is empty: pass the run directory training wrote.")
  if not epath.Path(workdir).is_dir():
    raise EvaluationSetupError(f"Work directory {workdir} does not exist.")
  path = epath.Path(workdir) / "config.json"
  if not path.is_file():
    raise EvaluationSetupError(
        f"{path} not found: {workdir} is not a training work directory (training writes "
        "config.json and checkpoints/ there).")
  try:
    raw = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise EvaluationSetupError(f"{path} is not readable JSON: {e}") from e
  if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict) or "name" not in raw["model"]:
    raise EvaluationSetupError(f"{path} has no model section (model.name): not a run config.")
  return ml_collections.ConfigDict(raw)


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
    out.append(evaluation.check_threshold(item.strip() if isinstance(item, str) else item,
                                          "--thresholds entry"))
  return out


def eval_temperature(config: ml_collections.ConfigDict, step: int, stage_index: int | None,
                     num_train_examples: int) -> tuple[float, int]:
  """The router temperature at `step` of the stage the checkpoint belongs to; returns (tau, stage)."""
  from dynroute_jax import train  # pylint: disable=g-import-not-at-top
  stages = train.plan_stages(config, num_train_examples)
  if stage_index is None or not 1 <= int(stage_index) <= len(stages):
    # The stage whose range (start, end] holds the step; the last one past the end.
    stage_index = next((s.index for s in stages if s.start < step <= s.end), stages[-1].index)
  stage = stages[int(stage_index) - 1]
  return train.final_tau(stage, step), stage.index


def _eval_mesh():
  """A data-parallel mesh over every device present now (parameters replicated)."""
  from dynroute_jax import sharding  # pylint: disable=g-import-not-at-top
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))


def _check_params_match(model, config, params, batch_stats, step: int, workdir: str) -> None:
  """Raises FingerprintMismatchError if the restored trees do not fit the model's."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dc = config.data
  x = jax.ShapeDtypeStruct((1, dc.image_size, dc.image_size, dc.num_channels), jnp.float32)
  key = jax.random.key(0)
  abstract = jax.eval_shape(lambda x: model.init({"params": key, "routing": key, "dropout": key},
                                                 x, train=False), x)
  problems = []
  for name, got in (("params", params), ("batch_stats", batch_stats)):
    want = abstract.get(name, {})
    w = {jax.tree_util.keystr(p): tuple(l.shape) for p, l in jax.tree_util.tree_leaves_with_path(want)}
    g = {jax.tree_util.keystr(p): tuple(np.shape(l))
         for p, l in jax.tree_util.tree_leaves_with_path(got or {})}
    for k in sorted(set(w) | set(g)):
      if w.get(k) != g.get(k):
        problems.append(f"{name}{k}: model {w.get(k, 'absent')}, checkpoint {g.get(k, 'absent')}")
  if problems:
    raise ckpt_lib.FingerprintMismatchError(
        f"checkpoint step {step} in {workdir} does not fit the model of {workdir}/config.json "
        f"({config.model.name}/{config.model.get('variant', '')}): {len(problems)} parameter(s) "
        f"differ, e.g. {'; '.join(problems[:4])}.")


def evaluate_workdir(workdir: str, *, step: int | None = None,
                     thresholds: str | Sequence[float] | None = None, strategy: str = "dense",
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
  if target_macs is not None:
    target_macs = evaluation.check_target_macs(target_macs)
  if strategy not in STRATEGIES:
    raise ValueError(f"--strategy must be one of {STRATEGIES}; got {strategy!r}.")
  if step is not None and (not isinstance(step, (int, np.integer)) or step < 0):
    raise ValueError(f"--step must be a checkpoint step (an int >= 0); got {step!r}.")
  for s in noise_stds:
    if not (np.isfinite(s) and s >= 0):
      raise ValueError(f"noise standard deviations must be finite and >= 0; got {s!r}.")
  config = load_config(workdir)

  from dynroute_jax import config_lib  # pylint: disable=g-import-not-at-top
  from dynroute_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from dynroute_jax import train  # pylint: disable=g-import-not-at-top
  from dynroute_jax import models  # pylint: disable=g-import-not-at-top

  config_lib.validate(config)
  model = models.build_model(config.model)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not epath.Path(ckpt_dir).is_dir() or not any(epath.Path(ckpt_dir).iterdir()):
    raise ckpt_lib.CheckpointNotFoundError(
        f"{workdir} holds no checkpoints ({ckpt_dir} is missing or empty): train first, or pass the "
        "work directory of a finished run.")
  mesh = _eval_mesh()
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # Step directories only (orbax's temporary ones have a suffix); damaged ones count as newest.
  newest = max((int(name) for name in os.listdir(ckpt_dir) if name.isdigit()), default=None) if (
      "://" not in os.fspath(ckpt_dir)) else None
  restored = ckpt_lib.restore_for_eval(ckpt_dir, step, sharding=replicated)
  meta = restored.meta
  ckpt_step = int(meta.get("step", step if step is not None else -1))
  expected = train.model_fingerprint(config)
  recorded = meta.get("fingerprint")
  if recorded is not None and recorded != expected:
    raise ckpt_lib.FingerprintMismatchError(
        f"checkpoint step {ckpt_step} in {ckpt_dir} was saved by another model: recorded fingerprint "
        f"{recorded} (model {meta.get('model')}/{meta.get('variant')}), config.json's model "
        f"{config.model.name}/{config.model.get('variant', '')} has fingerprint {expected}.")
  _check_params_match(model, config, restored.params, restored.batch_stats, ckpt_step, workdir)

  train_ds, held_out = train.training_splits(config)
  test_ds = input_pipeline.load_dataset(config.data, config.data.eval_split)
  tau, stage = eval_temperature(config, ckpt_step, meta.get("stage"), len(train_ds))
  calibration_ds = None
  if target_macs is not None:
    calibration_ds = held_out
    if calibration_ds is None or len(calibration_ds) == 0:
      raise EvaluationSetupError(
          f"config.data.calibration_fraction={config.data.calibration_fraction} leaves no "
          "calibration examples for --target_macs.")
  local = "://" not in os.fspath(workdir)
  extra = {"checkpoint": {"step": ckpt_step, "stage": stage, "fingerprint": recorded,
                          "workdir": os.path.abspath(workdir) if local else os.fspath(workdir)},
           "eval_tau_source": f"stage {stage} temperature schedule at step {ckpt_step}",
           "num_devices": int(mesh.devices.size)}
  out_root, own_dir = workdir, newest is not None and ckpt_step != newest
  if own_dir:
    out_root = os.path.join(workdir, f".eval_step_{ckpt_step}.tmp")
    target = os.path.join(workdir, "eval", f"step_{ckpt_step}")
    why = (f"--step={ckpt_step} was asked for" if step is not None else
           f"the newest step {newest} does not verify (see the warning above)")
    logging.warning("Evaluating checkpoint step %d, not the newest checkpoint step %d (%s): the "
                    "report and figures go to %s; %s is left as it is.", ckpt_step, newest, why,
                    target, os.path.join(workdir, "eval", "report.json"))
    if jax.process_index() == 0 and epath.Path(out_root).exists():
      epath.Path(out_root).rmtree()  # Left by an evaluation that was interrupted.
  extra["report_file"] = os.path.join(
      workdir, "eval", *([f"step_{ckpt_step}"] if own_dir else []), "report.json")
  report = evaluation.evaluate_and_report(
      config, model, {"params": restored.params, "batch_stats": restored.batch_stats}, test_ds,
      mesh, out_root, tau=tau, step=ckpt_step, thresholds=ts, strategy=strategy,
      calibration_ds=calibration_ds, target_macs=target_macs,
      instance_awareness=instance_awareness, noise_stds=tuple(noise_stds), plots=plots,
      tsne_max_points=tsne_max_points, extra=extra,
      # The trainer trains on the whole train split; see the module docstring.
      calibration_info={"calibration_fraction": float(config.data.calibration_fraction),
                        "calibration_held_out_from_training": True})
  if own_dir and jax.process_index() == 0:
    # Written under a temporary root (evaluation writes <root>/eval/), then moved into place.
    final = epath.Path(target)
    if final.exists():
      final.rmtree()
    final.parent.mkdir(parents=True, exist_ok=True)
    (epath.Path(out_root) / "eval").rename(final)
    epath.Path(out_root).rmtree()
  return report


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so importing defines none)."""
  flags.DEFINE_string("workdir", None, "The training run's work directory.")
  flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest intact one).")
  flags.DEFINE_string("thresholds", None, "Comma-separated thresholds in (0, 1] to sweep "
                      "(default: config.eval.thresholds); the config's threshold is always added.")
  flags.DEFINE_string("strategy", "dense", f"Dispatch strategy, one of {STRATEGIES}.")
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
    print(f"evaluate: error: {e}", file=sys.stderr)
    sys.exit(2)
  console.info(f"Wrote {report['report_file']}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
