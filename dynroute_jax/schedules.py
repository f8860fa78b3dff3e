"""Training stages on the global step axis and their schedules (learning rate, router temperature).

Shared by the trainer and by evaluation, which needs the temperature a checkpoint was trained at
without importing the trainer.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import optax

from dynroute_jax import input_pipeline
from dynroute_jax import routing


@dataclasses.dataclass(frozen=True)
class Stage:
  """A training stage's place on the global step axis."""
  index: int            # 1 or 2.
  start: int            # first global step.
  num_steps: int
  steps_per_epoch: int
  cfg: ml_collections.ConfigDict

  @property
  def end(self) -> int:
    return self.start + self.num_steps


def plan_stages(config: ml_collections.ConfigDict, num_train_examples: int) -> list[Stage]:
  """Turns the config's epoch/step lengths into global step ranges."""
  gbs = config.train.global_batch_size
  if num_train_examples < gbs:
    raise ValueError(f"config.train.global_batch_size ({gbs}) exceeds the {num_train_examples} training "
                     f"examples of {config.data.name}; lower it.")
  spe = num_train_examples // gbs
  stages, start = [], 0
  for i in range(1, config.train.num_stages + 1):
    cfg = config.train[f"stage{i}"]
    n = int(cfg.steps) if cfg.steps > 0 else int(round(cfg.epochs * spe))
    stages.append(Stage(index=i, start=start, num_steps=n, steps_per_epoch=spe, cfg=cfg))
    start += n
  if start == 0:
    names = " and ".join(f"config.train.stage{s.index}" for s in stages)
    raise ValueError(f"{names} train 0 steps: their steps are 0 and epochs x {spe} steps per "
                     f"epoch rounds to 0; set config.train.stage1.steps (or .epochs) above 0.")
  return stages


def training_splits(config: ml_collections.ConfigDict):
  """(train, calibration) datasets: a held-out calibration share of the train split is never trained on.

  The split is a pure function of (config.data, config.seed), so `evaluate` rebuilds the same one for
  budget mode. calibration is None when config.data.calibration_fraction is 0.
  """
  full = input_pipeline.load_dataset(config.data, config.data.train_split)
  if config.data.calibration_fraction <= 0:
    return full, None
  return input_pipeline.split_calibration(full, float(config.data.calibration_fraction),
                                          int(config.seed))


def stage_at(stages: list[Stage], step: int) -> Stage | None:
  """The stage whose steps (start, end] hold checkpoint `step` (saved after its step-th update);
  None past the last stage. A stage of 0 steps holds none."""
  return next((s for s in stages if s.start < step <= s.end), None)


def final_tau(stage: Stage, step: int) -> float:
  """The router temperature of the last step that ran before `step` (what evaluation uses)."""
  return float(tau_schedule(stage)(max(min(step, stage.end) - 1, stage.start)))


def lr_schedule(stage: Stage) -> optax.Schedule:
  """The stage's learning rate as a function of the step within the stage."""
  cfg, n, spe = stage.cfg, max(stage.num_steps, 1), stage.steps_per_epoch
  warmup = int(round(cfg.warmup_epochs * spe))
  if cfg.lr_schedule == "cosine":
    main = optax.cosine_decay_schedule(cfg.lr, max(n - warmup, 1))
  elif cfg.lr_schedule == "multistep":
    bounds = {int(round(e * spe)) - warmup: cfg.lr_decay for e in cfg.lr_boundaries_epochs}
    main = optax.piecewise_constant_schedule(cfg.lr, bounds)
  else:
    main = optax.constant_schedule(cfg.lr)
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])
  return main


def tau_schedule(stage: Stage) -> routing.Schedule:
  """The stage's router temperature as a function of the global step (decayed once per epoch).

  Not `optax.exponential_decay(..., staircase=True)`: that computes init * exp(-r) ** epoch, which
  in float32 differs from init * exp(-r * epoch) (by up to ~1e-5 relative over 1000 epochs), and
  the temperatures of earlier runs and checkpoints must be reproduced exactly.
  """
  cfg = stage.cfg
  return routing.exponential_decay_schedule(cfg.tau_init, cfg.tau_decay_per_epoch, cfg.tau_floor,
                                            stage.steps_per_epoch, start_step=stage.start)
