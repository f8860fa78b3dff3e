"""A trained run, restored for inference: `dynroute_jax.restore(workdir)`.

  clf = dynroute_jax.restore("runs/graded_drnet")       # newest checkpoint that verifies
  clf.image_shape                                       # (H, W, C)
  out = clf(images_uint8_BxHxWxC)                       # the run's own threshold, strategy 'auto'
  out["logits"], out["macs"], out["executed"]           # [B, N], [B], [B, S]

The config comes from WORKDIR/config.json (JSON, never executed), the parameters and batch
statistics from the checkpoint (verified against its checksum manifest and the model's
fingerprint), the router temperature from the schedule at the checkpoint's step: the same
restoration `python -m dynroute_jax.evaluate` does, so the outputs equal the evaluation's.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from dynroute_jax import checkpoint as ckpt_lib
from dynroute_jax import evaluation

# Output keys, each a numpy array with the batch as its leading axis.
OUTPUT_KEYS = ("logits", "prediction", "confidence", "macs", "params", "executed", "weights",
               "router_probs")


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
    self._predictors: dict[str, evaluation.Predictor] = {}

  def __call__(self, images, threshold: float | None = None, strategy: str = "auto"
               ) -> dict[str, np.ndarray]:
    """Routed inference (deterministic, skipped work really not run).

    Args:
      images: uint8 [B, H, W, C] (`image_shape`), values 0..255; normalisation happens inside.
      threshold: routing threshold in (0, 1]; None = the run's own (`self.threshold`).
      strategy: how skipped branches/blocks are avoided (`dynroute_jax.dispatch`; 'auto' picks
        the platform default, 'dense' computes everything and masks).

    Returns:
      dict of numpy arrays: logits [B, N], prediction [B], confidence [B], macs [B] (executed
      MACs per example, routers included), params [B], executed [B, S] bool (the per-example
      routing mask), weights [B, S], router_probs [B, S].
    """
    from dynroute_jax import dispatch  # pylint: disable=g-import-not-at-top

    if strategy not in dispatch.STRATEGIES:
      raise ValueError(f"strategy must be one of {dispatch.STRATEGIES}; got {strategy!r}.")
    t = self.threshold if threshold is None else evaluation.check_threshold(threshold)
    if strategy not in self._predictors:
      self._predictors[strategy] = evaluation.Predictor(
          self.model, self.config.data, tau=self.tau, routed=True, strategy=strategy)
    out = self._predictors[strategy](self._variables, np.asarray(images), t)
    return {k: np.asarray(jax.device_get(out[k])) for k in OUTPUT_KEYS}


def restore(workdir: str | os.PathLike, step: int | None = None) -> RoutedClassifier:
  """Restores the run in `workdir` (its newest verifying checkpoint, or `step`) for inference.

  Raises:
    evaluate.EvaluationSetupError: `workdir` is not a training work directory.
    checkpoint.CheckpointNotFoundError / DamagedCheckpointError / FingerprintMismatchError: no
      checkpoint (at `step`), a damaged one, or one of another model.
  """
  from dynroute_jax import config_lib  # pylint: disable=g-import-not-at-top
  from dynroute_jax import evaluate  # pylint: disable=g-import-not-at-top
  from dynroute_jax import train  # pylint: disable=g-import-not-at-top
  from dynroute_jax import models  # pylint: disable=g-import-not-at-top

  workdir = os.fspath(workdir)
  config = evaluate.load_config(workdir)
  config_lib.validate(config)
  model = models.build_model(config.model)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir) or not os.listdir(ckpt_dir):
    raise ckpt_lib.CheckpointNotFoundError(
        f"{workdir} holds no checkpoints ({ckpt_dir} is missing or empty): train first.")
  restored = ckpt_lib.restore_for_eval(ckpt_dir, step)
  meta = restored.meta
  ckpt_step = int(meta.get("step", step if step is not None else -1))
  recorded, expected = meta.get("fingerprint"), train.model_fingerprint(config)
  if recorded is not None and recorded != expected:
    raise ckpt_lib.FingerprintMismatchError(
        f"checkpoint step {ckpt_step} in {ckpt_dir} was saved by another model (fingerprint "
        f"{recorded}; config.json's model has {expected}).")
  evaluate._check_params_match(model, config, restored.params, restored.batch_stats,  # pylint: disable=protected-access
                               ckpt_step, workdir)
  train_ds, _ = train.training_splits(config)
  tau, _ = evaluate.eval_temperature(config, ckpt_step, meta.get("stage"), len(train_ds))
  variables = {"params": restored.params, "batch_stats": restored.batch_stats}
  return RoutedClassifier(config, model, variables, step=ckpt_step, tau=tau)
