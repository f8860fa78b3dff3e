"""The configuration schema shared by every config file, and its validation.

Config files under `configs/` call `base_config()`, fill `config.model` with a model's
`default_config(variant)`, and override what differs. `validate(config)` runs before anything is
compiled and raises a ValueError naming the bad field and the allowed values.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
from typing import Any

import ml_collections

DATASETS = ("digits", "cifar10", "cifar100", "svhn_cropped", "imagenet2012")
STRATEGIES = ("auto", "dense", "batch_cond", "per_example", "compact", "chunk")


def sibling_config(this_file: str, name: str):
  """Loads the config module `name`.py next to `this_file`, so a config can derive from another.

  Config files are loaded by path (not as a package), so a plain import of a sibling would depend on
  the working directory; this does not.
  """
  path = os.path.join(os.path.dirname(os.path.abspath(this_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"dynroute_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def stage_config(**overrides: Any) -> ml_collections.ConfigDict:
  """One training stage. Epoch-based lengths; `steps` > 0 overrides `epochs`."""
  stage = ml_collections.ConfigDict(dict(
      epochs=1.0,
      steps=0,
      # Learning rate: peak value, 'cosine' (to zero over the stage) or 'multistep'.
      lr=0.025,
      lr_schedule="cosine",
      lr_boundaries_epochs=(),  # multistep: epochs (relative to the stage) where lr *= lr_decay.
      lr_decay=0.1,
      warmup_epochs=0.0,
      # Temperature: tau = max(tau_floor, tau_init * exp(-tau_decay_per_epoch * epoch_in_stage)).
      tau_init=1.0,
      tau_decay_per_epoch=0.0,
      tau_floor=1.0,
      # Loss weights (0 disables a term).
      resource_weight=0.0,      # DRNet Eq. 8 lambda.
      consistency_weight=0.0,   # CoDiNet alpha.
      diversity_weight=0.0,     # CoDiNet beta.
      cost_weight=0.0,          # CoDiNet gamma (cost loss, MACs normalised by the full model's).
      aux_weight=0.0,           # DRNet auxiliary head.
      # Regularisation.
      drop_path_rate=0.0,       # final drop-connection rate, ramped linearly from 0 over the stage.
      # CoDiNet stage 2: routers frozen (no update, no weight decay) and hard decisions.
      freeze_routers=False,
      hard_decisions=False,
  ))
  stage.update(overrides)
  return stage


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with defaults. Config files override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict()  # Filled by the model's default_config(variant).

  c.data = ml_collections.ConfigDict(dict(
      name="digits",
      data_dir="",            # '' = $TFDS_DATA_DIR, else tfds' default.
      image_size=8,
      num_channels=1,
      num_classes=10,
      num_views=1,            # CoDiNet: M augmented views per image.
      train_split="train",
      eval_split="test",
      calibration_fraction=0.1,  # held-out share of the train split for threshold budgeting.
      crop_padding=0,
      flip=False,
      cutout=0,
      autoaugment=False,
  ))

  c.train = ml_collections.ConfigDict(dict(
      # Images per step over all devices; with data.num_views = M a step sees M x this many views.
      global_batch_size=128,
      optimizer="sgd",        # 'sgd' (momentum) or 'nesterov'.
      momentum=0.9,
      weight_decay=3e-4,
      label_smoothing=0.0,
      grad_clip_norm=0.0,     # 0 = off.
      skip_nonfinite_steps=False,  # True: a step with NaN/Inf loss or grads is skipped, not fatal.
      consistency_margin=0.2,  # CoDiNet m_c.
      diversity_margin=0.5,    # CoDiNet m_d.
      stage1=stage_config(),
      stage2=stage_config(),
      num_stages=2,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      batch_size=256,
      threshold=0.8,           # DRNet T (CoDiNet: run iff v >= threshold, 0.5 in the paper).
      thresholds=(0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
      strategy="auto",         # see dispatch.STRATEGIES; 'auto' = measured per-platform default.
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=500,
      keep=3,
      async_save=True,
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,                 # -1: all devices not used by other axes.
      fsdp=1,
      param_sharding="replicated",  # 'replicated' or 'fsdp'.
  ))

  c.distributed = ml_collections.ConfigDict(dict(
      initialize="auto",       # 'auto' (cluster env detected), 'always', 'never'.
      coordinator_address="",
      num_processes=0,
      process_id=-1,
      initialization_timeout=300,
  ))

  c.log_every_steps = 50
  c.eval_every_steps = 0       # 0 = only at the end of each stage.
  c.dry_run = False
  return c


def _check_choice(value: Any, allowed: tuple, field: str) -> None:
  if value not in allowed:
    raise ValueError(f"config.{field} must be one of {allowed}; got {value!r}.")


def _check_positive(value: Any, field: str, allow_zero: bool = False) -> None:
  ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
  if not ok:
    raise ValueError(f"config.{field} must be a number {'>= 0' if allow_zero else '> 0'}; got {value!r}.")


def check_known_fields(config: Any, reference: Any, prefix: str = "config") -> None:
  """Raises on a field `reference` (the schema) does not have: a misspelled field would be ignored.

  ConfigDicts accept new fields, so `c.train.skip_nonfinite_step = True` in a config file would
  otherwise be silently unused. `config.model` is checked by the model's from_config.
  """
  for key in config.keys():
    if prefix == "config" and key == "model":
      continue
    if key not in reference:
      close = difflib.get_close_matches(key, list(reference.keys()), n=1)
      hint = f" Did you mean {prefix}.{close[0]}?" if close else ""
      raise ValueError(f"Unknown config field {prefix}.{key}.{hint} The fields of {prefix} are: "
                       f"{', '.join(sorted(reference.keys()))}.")
    value, ref = config[key], reference[key]
    if isinstance(value, ml_collections.ConfigDict) and isinstance(ref, ml_collections.ConfigDict):
      check_known_fields(value, ref, f"{prefix}.{key}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the fields every run reads. Model fields are checked by the model's from_config."""
  check_known_fields(config, base_config())
  _check_choice(config.data.name, DATASETS, "data.name")
  _check_choice(config.train.optimizer, ("sgd", "nesterov"), "train.optimizer")
  _check_choice(config.eval.strategy, STRATEGIES, "eval.strategy")
  _check_choice(config.mesh.param_sharding, ("replicated", "fsdp"), "mesh.param_sharding")
  _check_choice(config.distributed.initialize, ("auto", "always", "never"), "distributed.initialize")
  _check_choice(config.train.num_stages, (1, 2), "train.num_stages")
  if not isinstance(config.train.global_batch_size, int) or config.train.global_batch_size <= 0:
    raise ValueError(f"config.train.global_batch_size must be a positive int; "
                     f"got {config.train.global_batch_size!r}.")
  if not isinstance(config.data.num_views, int) or config.data.num_views < 1:
    raise ValueError(f"config.data.num_views must be an int >= 1; got {config.data.num_views!r}.")
  _check_positive(config.train.weight_decay, "train.weight_decay", allow_zero=True)
  if not 0.0 <= config.train.label_smoothing < 1.0:
    raise ValueError(f"config.train.label_smoothing must lie in [0, 1); got {config.train.label_smoothing!r}.")
  for t in (config.eval.threshold, *config.eval.thresholds):
    if not (isinstance(t, (int, float)) and 0.0 < t <= 1.0):
      raise ValueError(f"config.eval.threshold(s) must lie in (0, 1]; got {t!r}.")
  for name in ("stage1", "stage2")[:config.train.num_stages]:
    s = config.train[name]
    for f in ("tau_init", "tau_floor"):
      _check_positive(s[f], f"train.{name}.{f}")
    if s.tau_floor > s.tau_init:
      raise ValueError(f"config.train.{name}.tau_floor ({s.tau_floor}) must not exceed "
                       f"tau_init ({s.tau_init}).")
    _check_positive(s.lr, f"train.{name}.lr", allow_zero=True)
    _check_positive(s.epochs, f"train.{name}.epochs", allow_zero=True)
    if s.steps < 0:
      raise ValueError(f"config.train.{name}.steps must be >= 0; got {s.steps!r}.")
    _check_choice(s.lr_schedule, ("cosine", "multistep", "constant"), f"train.{name}.lr_schedule")
    for f in ("resource_weight", "consistency_weight", "diversity_weight", "cost_weight",
              "aux_weight", "tau_decay_per_epoch"):
      _check_positive(s[f], f"train.{name}.{f}", allow_zero=True)
    if not 0.0 <= s.drop_path_rate < 1.0:
      raise ValueError(f"config.train.{name}.drop_path_rate must lie in [0, 1); got {s.drop_path_rate!r}.")
  for f in ("consistency_margin", "diversity_margin"):
    if f in config.train and config.train[f] < 0:
      raise ValueError(f"config.train.{f} must be >= 0 (a hinge margin); got {config.train[f]!r}.")
  if (config.train.stage1.consistency_weight or config.train.stage1.diversity_weight
      or config.train.stage2.consistency_weight or config.train.stage2.diversity_weight):
    if config.data.num_views < 2:
      raise ValueError("Consistency/diversity losses need config.data.num_views >= 2 augmented views "
                       f"per image; got {config.data.num_views}.")
