"""The optimizer of a training stage, as one optax chain.

SGD (momentum or Nesterov) on the stage's learning-rate schedule, with weight decay on kernels only,
an optional global-norm clip, an optional learning-rate multiplier for the routers, and, for a
stage that freezes them, a zero update for the routers. Built once per stage: the parameter labels
are functions of the parameter tree, so the same transformation serves the state's initialisation
and its updates.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import flax
import jax
import ml_collections
import optax

from dynroute_jax import schedules
from dynroute_jax.models import base as models_base

PyTree = Any


def path_mask(params: PyTree, predicate: Callable[[str], bool]) -> PyTree:
  """A tree like `params` of `predicate(path)`, path the leaf's '/'-joined name."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  return flax.traverse_util.unflatten_dict({k: predicate(k) for k in flat}, sep="/")


def router_mask(params: PyTree, pattern: str = models_base.ROUTER_PARAM_PATTERN) -> PyTree:
  """True for router parameters: their path matches `pattern` (`re.search`)."""
  return path_mask(params, lambda path: re.search(pattern, path) is not None)


def decay_mask(params: PyTree) -> PyTree:
  """Weight decay on kernels only (not on biases nor batch-norm scales), as in the peers' code."""
  return path_mask(params, lambda path: path.endswith("kernel"))


def make_optimizer(config: ml_collections.ConfigDict, stage: schedules.Stage, *,
                   router_pattern: str = models_base.ROUTER_PARAM_PATTERN,
                   learning_rate: optax.Schedule | None = None) -> optax.GradientTransformation:
  """The optimizer of `stage`; each stage starts a fresh state of it.

  Args:
    config: the run's config (`config.train` holds the optimizer's fields).
    stage: the stage; its `cfg` gives the learning-rate schedule and `freeze_routers`.
    router_pattern: regex on parameter paths that selects the routers (the model's
      `router_param_pattern`).
    learning_rate: the schedule of the step count since the stage began; None gives
      `schedules.lr_schedule(stage)` (a step shared by stages passes the active stage's).

  Returns:
    The optax transformation of the stage's updates.
  """
  train_cfg = config.train
  routers = functools.partial(router_mask, pattern=router_pattern)
  tx = optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip_norm) if train_cfg.grad_clip_norm > 0
      else optax.identity(),
      optax.add_decayed_weights(train_cfg.weight_decay, mask=decay_mask),
      optax.sgd(learning_rate or schedules.lr_schedule(stage), momentum=train_cfg.momentum,
                nesterov=train_cfg.optimizer == "nesterov"),
  )
  if train_cfg.router_lr_multiplier != 1.0:
    # SGD updates are linear in the learning rate: scaling the routers' updates scales their lr.
    tx = optax.chain(tx, optax.masked(optax.scale(train_cfg.router_lr_multiplier), routers))
  if stage.cfg.freeze_routers:
    # Frozen routers get a zero update and no optimizer state: they provably do not change.
    def labels(params: PyTree) -> PyTree:
      return jax.tree.map(lambda r: "frozen" if r else "train", routers(params))
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx
