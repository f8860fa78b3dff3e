"""A trained run, restored for inference: `dynroute_jax.restore(workdir)`.

  clf = dynroute_jax.restore("runs/graded_drnet")       # newest checkpoint that verifies
  clf.image_shape                                       # (H, W, C)
  out = clf(images_uint8_BxHxWxC)                       # the run's own threshold, strategy 'auto'
  out["logits"], out["macs"], out["executed"]           # [B, N], [B], [B, S]

The config comes from WORKDIR/config.json (JSON, never executed), the parameters and batch
statistics from the checkpoint (verified against its checksum manifest and the model's
fingerprint), the router temperature from the schedule at the checkpoint's step. `restore_run`
is that restoration; `python -m dynroute_jax.evaluate` uses it too, so the outputs equal the
evaluation's.

Shape letters: B batch, N classes, S routed units.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dynroute_jax import checkpoint as ckpt_lib
from dynroute_jax import config_lib
from dynroute_jax import dispatch
from dynroute_jax import evaluation
from dynroute_jax import manifest
from dynroute_jax import models
from dynroute_jax import schedules

# Output keys, each a numpy array with the batch as its leading axis.
OUTPUT_KEYS = ("logits", "prediction", "confidence", "macs", "params", "executed", "weights",
               "router_probs")


class EvaluationSetupError(ValueError):
  """The work directory, step or arguments cannot be evaluated (the message says why)."""


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run saved as WORKDIR/config.json."""
  if not workdir:
    raise EvaluationSetupError("--workdir is empty: pass the run directory training wrote.")
  if not epath.Path(workdir).is_dir():
    what = "is a file, not a directory" if epath.Path(workdir).exists() else "does not exist"
    raise EvaluationSetupError(f"Work directory {workdir} {what}: pass the run directory "
                               "training wrote.")
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


def eval_temperature(config: ml_collections.ConfigDict, step: int, stage_index: int | None,
                     num_train_examples: int) -> tuple[float, int]:
  """The router temperature at `step` of the stage the checkpoint belongs to; returns (tau, stage)."""
  stages = schedules.plan_stages(config, num_train_examples)
  if stage_index is None or not 1 <= int(stage_index) <= len(stages):
    # The stage whose range (start, end] holds the step; the last one past the end.
    stage_index = (schedules.stage_at(stages, step) or stages[-1]).index
  stage = stages[int(stage_index) - 1]
  return schedules.final_tau(stage, step), stage.index


def check_params_match(model, config, params, batch_stats, step: int, workdir: str) -> None:
  """Raises FingerprintMismatchError if the restored trees do not fit the model's."""
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


@dataclasses.dataclass(frozen=True)
class RestoredRun:
  """A training run's config, model and checkpoint, restored for evaluation.

  Attributes:
    config: the resolved config of WORKDIR/config.json (validated).
    model: the Flax module it builds.
    variables: {'params', 'batch_stats'} of the checkpoint.
    step: the checkpoint step restored.
    stage: the training stage that step belongs to.
    tau: the router temperature of that step (what evaluation uses).
    fingerprint: the model fingerprint the checkpoint recorded (None for an older one).
    train_ds: the train split training used (the calibration share held out).
    calibration_ds: the held-out calibration share (None without one).
  """
  config: ml_collections.ConfigDict
  model: Any
  variables: dict[str, Any]
  step: int
  stage: int
  tau: float
  fingerprint: str | None
  train_ds: Any
  calibration_ds: Any


def restore_run(workdir: str, step: int | None = None, *,
                sharding_fn: Callable[[], jax.sharding.Sharding] | None = None) -> RestoredRun:
  """Restores the run in `workdir` (its newest verifying checkpoint, or `step`).

  Args:
    workdir: the training run's work directory.
    step: the checkpoint step (None: the newest that verifies).
    sharding_fn: makes the sharding the arrays are restored with (called once the work directory
      is known to hold checkpoints); None restores them as saved.

  Raises:
    EvaluationSetupError: `workdir` is not a training work directory.
    checkpoint.CheckpointNotFoundError / DamagedCheckpointError / FingerprintMismatchError: no
      checkpoint (at `step`), a damaged one, or one of another model.
  """
  config = load_config(workdir)
  config_lib.validate(config)
  model = models.build_model(config.model)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not epath.Path(ckpt_dir).is_dir() or not any(epath.Path(ckpt_dir).iterdir()):
    raise ckpt_lib.CheckpointNotFoundError(
        f"{workdir} holds no checkpoints ({ckpt_dir} is missing or empty): train first, or pass the "
        "work directory of a finished run.")
  sharding = sharding_fn() if sharding_fn is not None else None
  restored = ckpt_lib.restore_for_eval(ckpt_dir, step, sharding=sharding)
  meta = restored.meta
  ckpt_step = int(meta.get("step", step if step is not None else -1))
  expected, recorded = manifest.model_fingerprint(config), meta.get("fingerprint")
  if recorded is not None and recorded != expected:
    raise ckpt_lib.FingerprintMismatchError(
        f"checkpoint step {ckpt_step} in {ckpt_dir} was saved by another model: recorded fingerprint "
        f"{recorded} (model {meta.get('model')}/{meta.get('variant')}), config.json's model "
        f"{config.model.name}/{config.model.get('variant', '')} has fingerprint {expected}.")
  check_params_match(model, config, restored.params, restored.batch_stats, ckpt_step, workdir)
  train_ds, held_out = schedules.training_splits(config)
  tau, stage = eval_temperature(config, ckpt_step, meta.get("stage"), len(train_ds))
  return RestoredRun(config=config, model=model,
                     variables={"params": restored.params, "batch_stats": restored.batch_stats},
                     step=ckpt_step, stage=stage, tau=tau, fingerprint=recorded,
                     train_ds=train_ds, calibration_ds=held_out)


class RoutedClassifier:
  """A restored routed model: call it on uint8 images.

  Attributes:
    image_shape: (H, W, C) the images must have.
    config: the run's resolved config (a ConfigDict).
    model: the Flax module.
    step: the checkpoint step restored.
    tau: the router temperature evaluation uses at that step.
    threshold: the run's own threshold (config.eval.threshold; CoDiNet: run a block iff v >= it).
  """

  def __init__(self, config, model, variables: Any, *, step: int, tau: float):
    self.config, self.model, self.step, self.tau = config, model, step, tau
    self.image_shape = evaluation.image_shape(config.data)
    self.threshold = float(config.eval.threshold)
    self._variables = variables
    self._predictors: dict[dispatch.Strategy, evaluation.Predictor] = {}

  def __call__(self, images, threshold: float | None = None,
               strategy: dispatch.StrategySpec = "auto") -> dict[str, np.ndarray]:
    """Routed inference (deterministic, skipped work really not run).

    Args:
      images: uint8 [B, H, W, C] (`image_shape`), values 0..255; normalisation happens inside.
      threshold: routing threshold in (0, 1]; None = the run's own (`self.threshold`).
      strategy: how skipped branches/blocks are avoided (`dynroute_jax.dispatch`; 'auto' picks
        the platform default, 'dense' computes everything and masks). A name takes the options
        of the run's `config.eval.dispatch`; a mapping or a `dispatch.Strategy` is used as is.

    Returns:
      dict of numpy arrays: logits [B, N], prediction [B], confidence [B], macs [B] (executed
      MACs per example, routers included), params [B], executed [B, S] bool (the per-example
      routing mask), weights [B, S], router_probs [B, S].
    """
    if isinstance(strategy, str) and strategy not in dispatch.STRATEGIES:
      raise ValueError(f"strategy must be one of {dispatch.STRATEGIES}; got {strategy!r}.")
    strategy = config_lib.eval_strategy(self.config, strategy)
    t = self.threshold if threshold is None else config_lib.check_threshold(threshold)
    if strategy not in self._predictors:
      self._predictors[strategy] = evaluation.Predictor(
          self.model, self.config.data, tau=self.tau, routed=True, strategy=strategy)
    out = self._predictors[strategy](self._variables, np.asarray(images), t)
    return {k: np.asarray(jax.device_get(out[k])) for k in OUTPUT_KEYS}


def restore(workdir: str | os.PathLike, step: int | None = None) -> RoutedClassifier:
  """Restores the run in `workdir` (its newest verifying checkpoint, or `step`) for inference.

  Raises:
    EvaluationSetupError: `workdir` is not a training work directory.
    checkpoint.CheckpointNotFoundError / DamagedCheckpointError / FingerprintMismatchError: no
      checkpoint (at `step`), a damaged one, or one of another model.
  """
  run = restore_run(os.fspath(workdir), step)
  return RoutedClassifier(run.config, run.model, run.variables, step=run.step, tau=run.tau)
