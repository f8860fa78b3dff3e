"""The configuration schema shared by every config file, and its validation.

Config files under `configs/` call `base_config()`, fill `config.model` with a model's
`default_config(variant)`, and override what differs. `validate(config)` runs before anything is
compiled and raises a ValueError naming the bad field and the allowed values.

Unknown fields are refused by ml_collections' lock: main's `--config` flag locks the loaded config
(config_flags' `lock_config`), so a misspelled command-line override fails as it is parsed, and
`validate` writes every field into a locked `base_config()`, which refuses a field it lacks (a
misspelled field in a config file would otherwise go unused). `check_threshold` is the one check
of a routing threshold, for config fields, command-line values and the predictor's arguments.

The module is longer than most: `base_config()` and `SCHEMA` list every field once each (its
default and its range), and the hand-written checks of `validate` keep their order and messages.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
from typing import Any, Optional, Sequence

import ml_collections
import numpy as np

from dynroute_jax import dispatch

DATASETS = ("digits", "digits_graded", "cifar10", "cifar100", "svhn_cropped", "imagenet2012")
STRATEGIES = dispatch.STRATEGIES
# What a threshold's range protects, in its error message.
THRESHOLD_NOTE = " (the routing threshold)"


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


def dispatch_config() -> ml_collections.ConfigDict:
  """`config.eval.dispatch`: every option of the skipping strategies, at its default.

  An option whose default is None is a typed placeholder, so that a command-line override
  (`--config.eval.dispatch.chunk=16`) is parsed as an int.
  """
  return ml_collections.ConfigDict({
      k: ml_collections.config_dict.placeholder(int) if v is None else v
      for k, v in dispatch.option_defaults().items()})


def eval_strategy(config: ml_collections.ConfigDict,
                  spec: dispatch.StrategySpec | None = None) -> dispatch.Strategy:
  """The dispatch strategy of an evaluation of `config`.

  Args:
    config: a run's config (one saved before `config.eval.dispatch` existed has no options).
    spec: None: `config.eval.strategy`; a name: that strategy; either with the options of
      `config.eval.dispatch`. A mapping or a `dispatch.Strategy` is taken as it is.

  Raises:
    ValueError: a bad name or option, naming the config field.
  """
  if spec is not None and not isinstance(spec, str):
    return dispatch.make_strategy(spec)
  name = config.eval.strategy if spec is None else spec
  options = config.eval.get("dispatch", ml_collections.ConfigDict()).to_dict()
  return dispatch.from_config(dict(options, name=name), field="config.eval.strategy / dispatch")


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
      # Router training (both stages). Defaults follow the papers where they are explicit.
      resource_cost="branches",  # DRNet Eq. 8 log of: 'branches' (paper) or 'total' (+ fixed MACs).
      router_lr_multiplier=1.0,  # the routers' learning rate = this x the stage's.
      path_loss_input="noisy",   # CoDiNet Eq. 8/9 on 'noisy' (Gumbel, paper) or 'clean' outputs.
      cost_type="macs",          # CoDiNet cost: 'macs' (Eq. 11) or 'count_l1' (official code).
      cost_target=0.5,           # 'count_l1': target share of blocks run.
      cost_on_correct_only=False,  # CoDiNet cost only on correctly classified examples (as Eq. 8).
      router_logit_weight=0.0,   # weight of losses.router_logit_spread (anti-saturation).
      stage1=stage_config(),
      stage2=stage_config(),
      num_stages=2,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      batch_size=256,
      threshold=0.8,           # DRNet T (CoDiNet: run iff v >= threshold, 0.5 in the paper).
      thresholds=(0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
      # How the report's routed passes avoid skipped work (dispatch.STRATEGIES). Its accuracy and
      # MACs are the same under every strategy (MACs are counted from the decisions): 'dense'
      # compiles fastest; 'auto' (the platform default) or a skipping strategy really skips.
      strategy="dense",
      # The options of 'compact' and 'chunk' (dispatch.Compact, dispatch.Chunk); each strategy
      # takes its own and ignores the rest. chunk None: B/8 rows.
      dispatch=dispatch_config(),
      # The static counterpart's sweep (every input gets the test-set mean router output).
      static_thresholds=tuple(round(0.05 * i, 2) for i in range(1, 21)),
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=500,
      keep=3,
      async_save=True,
      # Checkpoints exist but none verifies: False refuses to start (naming each damaged step);
      # True trains from step 0 (the damaged steps are moved to checkpoints/quarantine/ as
      # their step numbers are saved again).
      restart_if_damaged=False,
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
  # Every this many steps, the test split's accuracy (every branch, and routed at
  # eval.threshold) and routed MACs as eval/* summaries and one console line; 0 = only the
  # final report. The run's last step is left to the final report.
  c.eval_every_steps = 0
  c.dry_run = False
  return c


def _check_choice(value: Any, allowed: tuple, field: str) -> None:
  if value not in allowed:
    raise ValueError(f"config.{field} must be one of {allowed}; got {value!r}.")


def _check_positive(value: Any, field: str, allow_zero: bool = False) -> None:
  ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
  if not ok:
    raise ValueError(f"config.{field} must be a number {'>= 0' if allow_zero else '> 0'}; got {value!r}.")


def check_threshold(value: Any, source: str = "threshold", *, field: bool = False) -> Any:
  """The one check of a routing threshold: a number in (0, 1]; returns it as a float.

  DRNet keeps, per connection, the fewest largest branch weights reaching T; CoDiNet runs a block
  iff v >= T. Outside (0, 1] either nothing or everything would be kept.

  Args:
    value: a number, text a number is read from (a command-line entry), or a numpy array of
      thresholds (every entry is checked; the array is returned as it is).
    source: what the value is, for the message (e.g. '--thresholds entry').
    field: `value` is a config field: only ints and floats are numbers (the schema owns the field's
      type) and the message is the config's.

  Raises:
    ValueError: naming `source` and the value.
  """
  note = "" if field else THRESHOLD_NOTE
  if isinstance(value, np.ndarray):
    bad = value[~(np.isfinite(value) & (value > 0.0) & (value <= 1.0))]
    if bad.size:
      raise ValueError(f"{source} must lie in (0, 1]{note}, every entry of an array too; got "
                       f"{float(bad.flat[0])!r} in an array of shape {value.shape}.")
    return value
  if field and not isinstance(value, (int, float)):
    t = math.nan  # Not a number: refused by the range check below, with the config's message.
  else:
    try:
      t = float(value)
    except (TypeError, ValueError):
      raise ValueError(f"{source} must be a number in (0, 1]; got {value!r}.") from None
  if not (math.isfinite(t) and 0.0 < t <= 1.0):
    raise ValueError(f"{source} must lie in (0, 1]{note}; got {value!r}.")
  return t


def check_known_fields(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError for a field `base_config()` does not have, naming it and the fix.

  The test is ml_collections' lock: the fields of `config` are written into a locked
  `base_config()` (types unchecked: `check_schema` owns them), which refuses a field it lacks.
  `config.model` is checked by the model's from_config.
  """
  reference = base_config().lock()
  with reference.ignore_type():
    _write_into_locked(reference, config, "config")


def _write_into_locked(locked: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                       prefix: str) -> None:
  for key, value in config.items():
    if prefix == "config" and key == "model":
      continue
    if (isinstance(value, ml_collections.ConfigDict)
        and isinstance(locked.get(key), ml_collections.ConfigDict)):
      _write_into_locked(locked[key], value, f"{prefix}.{key}")
      continue
    try:
      locked[key] = value
    except KeyError:  # The lock: `locked` has no field `key`.
      close = difflib.get_close_matches(key, list(locked.keys()), n=1)
      hint = f" Did you mean {prefix}.{close[0]}?" if close else ""
      raise ValueError(f"Unknown config field {prefix}.{key}.{hint} The fields of {prefix} are: "
                       f"{', '.join(sorted(locked.keys()))}.") from None


# ----------------------------------------------------------------------------------------------
# The schema: a declared type and range for every field of `base_config()` (model fields excepted:
# each model's from_config checks them). `validate` checks every field against it, so a value
# outside its range is refused, naming the field, the value and the allowed range, before
# anything is compiled. A new field of base_config()/stage_config() needs an entry here
# (tests/test_validation.py fails for a field without one).


@dataclasses.dataclass(frozen=True)
class Field:
  """A field's declared type and allowed values.

  kind: 'int', 'number' (int or float, finite), 'bool', 'str', 'choice' (one of `choices`) or
    'numbers' (a tuple of numbers, each in the range). Bounds are inclusive unless `*_open`.
  """
  kind: str
  lo: Optional[float] = None
  hi: Optional[float] = None
  lo_open: bool = False
  hi_open: bool = False
  choices: tuple = ()
  allow_none: bool = False
  also: tuple = ()  # Special values allowed outside the range (e.g. -1 = detect).
  why: str = ""  # Appended to the message: what the bound protects.

  def describe(self) -> str:
    """The allowed values in words, e.g. 'an int >= 1' or 'a number in [0, 1)'."""
    if self.kind == "choice":
      return f"one of {self.choices}"
    if self.kind in ("bool", "str"):
      return f"a {self.kind}"
    noun = {"int": "an int", "number": "a number", "numbers": "a tuple of numbers"}[self.kind]
    if self.kind == "numbers":
      noun += ", each"
    lo, hi = _fmt(self.lo), _fmt(self.hi)
    if lo is not None and hi is not None:
      text = f"{noun} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
    elif lo is not None:
      text = f"{noun} {'>' if self.lo_open else '>='} {lo}"
    elif hi is not None:
      text = f"{noun} {'<' if self.hi_open else '<='} {hi}"
    else:
      text = noun
    specials = [repr(v) for v in self.also] + (["None"] if self.allow_none else [])
    return text + (f", or {' or '.join(specials)}" if specials else "")

  def _number_ok(self, v: Any, integer: bool) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      return False
    if integer and not isinstance(v, int):
      return False
    if not math.isfinite(v):
      return False
    if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
      return False
    if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
      return False
    return True

  def ok(self, value: Any) -> bool:
    if value is None:
      return self.allow_none
    if any(value == v and type(value) is type(v) for v in self.also):
      return True
    if self.kind == "choice":
      return value in self.choices
    if self.kind == "bool":
      return isinstance(value, bool)
    if self.kind == "str":
      return isinstance(value, str)
    if self.kind == "numbers":
      return (isinstance(value, (tuple, list))
              and all(self._number_ok(v, integer=False) for v in value))
    return self._number_ok(value, integer=self.kind == "int")


def _fmt(bound: Optional[float]) -> Optional[str]:
  if bound is None:
    return None
  return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _int(lo=None, hi=None, **kw) -> Field:
  return Field("int", lo, hi, **kw)


def _num(lo=None, hi=None, **kw) -> Field:
  return Field("number", lo, hi, **kw)


_BOOL, _STR = Field("bool"), Field("str")
# Below this the routers' logits / tau overflow float32 or their gradients explode.
MIN_TAU = 1e-3

SCHEMA: dict[str, Field] = {
    "seed": _int(0, 2**32 - 1),
    "data.name": Field("choice", choices=DATASETS),
    "data.data_dir": _STR,
    "data.image_size": _int(1),
    "data.num_channels": _int(1),
    "data.num_classes": _int(2),
    "data.num_views": _int(1),
    "data.train_split": _STR,
    "data.eval_split": _STR,
    "data.calibration_fraction": _num(0, 1, hi_open=True,
                                      why="the rest of the train split is trained on"),
    "data.crop_padding": _int(0),
    "data.flip": _BOOL,
    "data.cutout": _int(0),
    "data.autoaugment": _BOOL,
    "train.global_batch_size": _int(1),
    "train.optimizer": Field("choice", choices=("sgd", "nesterov")),
    "train.momentum": _num(0, 1, hi_open=True),
    "train.weight_decay": _num(0),
    "train.label_smoothing": _num(0, 1, hi_open=True),
    "train.grad_clip_norm": _num(0, why="0 turns clipping off"),
    "train.skip_nonfinite_steps": _BOOL,
    "train.consistency_margin": _num(0),
    "train.diversity_margin": _num(0),
    "train.num_stages": Field("choice", choices=(1, 2)),
    "train.resource_cost": Field("choice", choices=("branches", "total")),
    "train.router_lr_multiplier": _num(0),
    "train.path_loss_input": Field("choice", choices=("noisy", "clean")),
    "train.cost_type": Field("choice", choices=("macs", "count_l1")),
    "train.cost_target": _num(0, 1, why="a share of blocks"),
    "train.cost_on_correct_only": _BOOL,
    "train.router_logit_weight": _num(0),
    "eval.batch_size": _int(1),
    "eval.threshold": _num(0, 1, lo_open=True),
    "eval.thresholds": Field("numbers", 0, 1, lo_open=True),
    "eval.static_thresholds": Field("numbers", 0, 1, lo_open=True),
    "eval.strategy": Field("choice", choices=STRATEGIES),
    "eval.dispatch.buckets": _int(1, why="the number of capacity buckets"),
    "eval.dispatch.spacing": Field("choice", choices=dispatch.strategies.SPACINGS),
    "eval.dispatch.branching": Field("choice", choices=dispatch.strategies.BRANCHINGS),
    "eval.dispatch.chunk": _int(1, allow_none=True, why="None = B/8 rows"),
    "eval.dispatch.tail_levels": _int(0, why="0 = whole chunks only"),
    "checkpoint.every_steps": _int(1),
    "checkpoint.keep": _int(1, allow_none=True, why="None keeps every checkpoint"),
    "checkpoint.async_save": _BOOL,
    "checkpoint.restart_if_damaged": _BOOL,
    "mesh.data": _int(1, also=(-1,), why="-1 = every device the other axes leave"),
    "mesh.fsdp": _int(1),
    "mesh.param_sharding": Field("choice", choices=("replicated", "fsdp")),
    "distributed.initialize": Field("choice", choices=("auto", "always", "never")),
    "distributed.coordinator_address": _STR,
    "distributed.num_processes": _int(0, why="0 = from the environment"),
    "distributed.process_id": _int(0, also=(-1,), why="-1 = from the environment"),
    "distributed.initialization_timeout": _int(1),
    "log_every_steps": _int(1),
    "eval_every_steps": _int(0, why="0 = only the final report"),
    "dry_run": _BOOL,
}

# The fields of each training stage (train.stage1, train.stage2).
STAGE_SCHEMA: dict[str, Field] = {
    "epochs": _num(0),
    "steps": _int(0, why="0 = use epochs"),
    "lr": _num(0),
    "lr_schedule": Field("choice", choices=("cosine", "multistep", "constant")),
    "lr_boundaries_epochs": Field("numbers", 0),
    "lr_decay": _num(0, lo_open=True),
    "warmup_epochs": _num(0),
    "tau_init": _num(MIN_TAU, why="smaller temperatures overflow float32 in the routers"),
    "tau_decay_per_epoch": _num(0),
    "tau_floor": _num(MIN_TAU, why="smaller temperatures overflow float32 in the routers"),
    "resource_weight": _num(0),
    "consistency_weight": _num(0),
    "diversity_weight": _num(0),
    "cost_weight": _num(0),
    "aux_weight": _num(0),
    "drop_path_rate": _num(0, 1, hi_open=True),
    "freeze_routers": _BOOL,
    "hard_decisions": _BOOL,
}


def schema() -> dict[str, Field]:
  """Every declared field by its path (stage fields once per stage)."""
  out = dict(SCHEMA)
  for stage in ("stage1", "stage2"):
    out.update({f"train.{stage}.{k}": v for k, v in STAGE_SCHEMA.items()})
  return out


def _lookup(config: Any, path: str) -> tuple[bool, Any]:
  node = config
  for part in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return False, None
    node = node[part]
  return True, node


def check_model_matches_data(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming both fields where the model's input settings differ from data's."""
  for f in ("image_size", "num_channels", "num_classes"):
    if f in config.model and config.model[f] != config.data[f]:
      raise ValueError(f"config.model.{f} ({config.model[f]}) differs from config.data.{f} "
                       f"({config.data[f]}); set both to the dataset's value.")


def set_to_none(config: ml_collections.ConfigDict, paths: Sequence[str]) -> None:
  """Sets each field 'a.b' of `paths` to None (the command line's `--config.a.b=None`).

  Raises:
    ValueError: a path that names no field of the config. Whether None is allowed is `validate`'s
      business, as for any value.
  """
  for path in paths:
    present, value = _lookup(config, path)
    if not present:
      raise ValueError(f"--config.{path}=None: config.{path} is not a field of this config.")
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      raise ValueError(f"--config.{path}=None: config.{path} is a section; set its fields.")
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = None


def check_schema(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for the first field whose value is outside its declared range.

  Fields of stages that do not run (train.stage2 with train.num_stages=1) are not checked.
  """
  stages = ("stage1", "stage2")
  num_stages = config.train.get("num_stages", 2) if "train" in config else 2
  inactive = stages[num_stages:] if num_stages in (1, 2) else ()
  for path, field in schema().items():
    if any(path.startswith(f"train.{s}.") for s in inactive):
      continue
    present, value = _lookup(config, path)
    if not present:
      continue  # Missing fields are the unknown-field check's business (config files may omit).
    if not field.ok(value):
      why = f" ({field.why})" if field.why else ""
      raise ValueError(f"config.{path} must be {field.describe()}{why}; got {value!r}.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the fields every run reads. Model fields are checked by the model's from_config.

  The checks before `check_schema` give their own messages (tests and the README quote them) and
  their order decides which of several bad fields is named; `check_schema` covers the rest.
  """
  check_known_fields(config)
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
  for t in (config.eval.threshold, *config.eval.thresholds, *config.eval.static_thresholds):
    check_threshold(t, "config.eval.threshold(s)", field=True)
  for name in ("stage1", "stage2")[:config.train.num_stages]:
    _check_stage(config.train[name], f"train.{name}")
  _check_choice(config.train.resource_cost, ("branches", "total"), "train.resource_cost")
  _check_choice(config.train.path_loss_input, ("noisy", "clean"), "train.path_loss_input")
  _check_choice(config.train.cost_type, ("macs", "count_l1"), "train.cost_type")
  _check_positive(config.train.router_lr_multiplier, "train.router_lr_multiplier", allow_zero=True)
  _check_positive(config.train.router_logit_weight, "train.router_logit_weight", allow_zero=True)
  if not 0.0 <= config.train.cost_target <= 1.0:
    raise ValueError(f"config.train.cost_target must lie in [0, 1] (a share of blocks); got "
                     f"{config.train.cost_target!r}.")
  for f in ("consistency_margin", "diversity_margin"):
    if f in config.train and config.train[f] < 0:
      raise ValueError(f"config.train.{f} must be >= 0 (a hinge margin); got {config.train[f]!r}.")
  if (config.train.stage1.consistency_weight or config.train.stage1.diversity_weight
      or config.train.stage2.consistency_weight or config.train.stage2.diversity_weight):
    if config.data.num_views < 2:
      raise ValueError("Consistency/diversity losses need config.data.num_views >= 2 augmented views "
                       f"per image; got {config.data.num_views}.")
  check_schema(config)
  eval_strategy(config)


def _check_stage(s: ml_collections.ConfigDict, prefix: str) -> None:
  """The hand-written checks of one training stage (see `validate`)."""
  for f in ("tau_init", "tau_floor"):
    _check_positive(s[f], f"{prefix}.{f}")
  if s.tau_floor > s.tau_init:
    raise ValueError(f"config.{prefix}.tau_floor ({s.tau_floor}) must not exceed "
                     f"tau_init ({s.tau_init}).")
  _check_positive(s.lr, f"{prefix}.lr", allow_zero=True)
  _check_positive(s.epochs, f"{prefix}.epochs", allow_zero=True)
  if s.steps < 0:
    raise ValueError(f"config.{prefix}.steps must be >= 0; got {s.steps!r}.")
  _check_choice(s.lr_schedule, ("cosine", "multistep", "constant"), f"{prefix}.lr_schedule")
  for f in ("resource_weight", "consistency_weight", "diversity_weight", "cost_weight",
            "aux_weight", "tau_decay_per_epoch"):
    _check_positive(s[f], f"{prefix}.{f}", allow_zero=True)
  if not 0.0 <= s.drop_path_rate < 1.0:
    raise ValueError(f"config.{prefix}.drop_path_rate must lie in [0, 1); got {s.drop_path_rate!r}.")
