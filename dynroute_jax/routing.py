"""Routing core shared by DRNet and CoDiNet: routers' weights and decisions.

Routers emit logits; the functions here turn them into branch weights (DRNet) or run/skip decisions
(CoDiNet). Running the chosen branches is the dispatcher's job (`dynroute_jax.dispatch`).

Every function is pure and takes its PRNG key explicitly: nothing here reads global random state.

Shape letters:
  B: batch (examples).
  C: connections of a cell (DRNet) or any leading site axis.
  K: branches of a connection (DRNet: 5; CoDiNet: 2, index 1 = run).
  D: routed blocks (CoDiNet).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Schedule = Callable[[Array | int], Array]

# CoDiNet: entry 1 of a router's two logits means "run the block", entry 0 "skip it" (paper Eq. 5).
RUN_INDEX = 1


def check_tau(tau: float, field: str = "tau") -> None:
  """Raises a ValueError naming `field` unless `tau` is a finite positive number.

  Only Python numbers are checked (traced values cannot be inspected without a host sync).
  """
  if isinstance(tau, (int, float)) and not (math.isfinite(tau) and tau > 0):
    raise ValueError(f"{field} must be a finite number > 0 (a softmax temperature); got {tau!r}.")


def check_threshold(threshold: float, field: str = "threshold") -> None:
  """Raises a ValueError naming `field` unless `threshold` lies in (0, 1]."""
  if isinstance(threshold, (int, float)) and not (0.0 < threshold <= 1.0):
    raise ValueError(f"{field} must lie in (0, 1] (the share of routing weight to keep); "
                     f"got {threshold!r}.")


def sample_gumbel(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
  """Gumbel(0, 1) noise g = -log(-log u), u ~ U(0, 1), clipped away from 0 and 1 for stability."""
  tiny = jnp.finfo(dtype).tiny
  u = jax.random.uniform(key, shape, dtype=dtype, minval=tiny, maxval=1.0)
  return -jnp.log(-jnp.log(u))


def gumbel_softmax(key: Array | None, logits: Array, tau: float | Array, axis: int = -1) -> Array:
  """DRNet Eq. 4: softmax((w + g) / tau) with Gumbel(0, 1) noise g.

  Args:
    key: PRNG key of the routing stream. `None` gives the noise-free softmax(w / tau) (deterministic
      evaluation, and the "softmax without Gumbel noise" ablation of DRNet Table 3).
    logits: router outputs w, any shape.
    tau: temperature > 0. Low tau approaches a one-hot sample from softmax(w) (Eq. 6); high tau
      approaches uniform weights.
    axis: the branch axis.

  Returns:
    Weights of `logits`' shape that sum to 1 along `axis`.
  """
  check_tau(tau)
  logits = logits.astype(jnp.float32)
  if key is not None:
    logits = logits + sample_gumbel(key, logits.shape, logits.dtype)
  return jax.nn.softmax(logits / tau, axis=axis)


def threshold_select(weights: Array, threshold: float | Array) -> tuple[Array, Array]:
  """Keeps per row the fewest largest weights whose sum reaches `threshold` (DRNet Sec. 3.3).

  Ties are broken deterministically: among equal weights the lower branch index is taken first.
  The kept weights are rescaled by 1/s, s = their sum, so each row of `rescaled` sums to 1.

  Args:
    weights: [..., K] non-negative weights summing to 1 over the last axis.
    threshold: T in (0, 1] (a Python number is validated; a traced one is not). Sums are compared
      with a relative slack of 1e-6, and a branch of weight 0 is never kept (unless every weight
      of its row is 0: then the first), so float rounding, of low-precision weights too, never
      makes T = 1 keep a zero-mass branch.

  Returns:
    mask: [..., K] bool, True for kept branches (at least one per row).
    rescaled: [..., K] float, kept weights / s, zero elsewhere.
  """
  check_threshold(threshold)
  # A stable argsort of -w orders by descending weight, lower index first among ties.
  order = jnp.argsort(-weights, axis=-1, stable=True)
  sorted_w = jnp.take_along_axis(weights, order, axis=-1)
  cum = jnp.cumsum(sorted_w, axis=-1)
  before = cum - sorted_w
  # Keep rank r while the mass strictly before it is below T: the first rank whose cumulative sum
  # reaches T is the last one kept.
  slack = 1e-6 * jnp.maximum(cum[..., -1:], 1e-30)
  # A zero weight adds no mass: in bfloat16 seven weights of 1/7 sum to 0.998, below T = 1 by
  # more than any fixed slack, and would keep an eighth branch of weight 0.
  keep_sorted = (before < (threshold - slack)) & (sorted_w > 0)
  keep_sorted = keep_sorted.at[..., 0].set(True)
  inverse = jnp.argsort(order, axis=-1)
  mask = jnp.take_along_axis(keep_sorted, inverse, axis=-1)
  kept = jnp.where(mask, weights, 0.0)
  s = jnp.sum(kept, axis=-1, keepdims=True)
  rescaled = kept / jnp.maximum(s, jnp.finfo(weights.dtype).tiny)
  return mask, rescaled


def relaxed_decision(key: Array | None, logits_x2: Array, tau: float | Array = 1.0) -> Array:
  """CoDiNet Eq. 6: v = softmax((U + g) / T)[run], the relaxed probability of running a block.

  The router output U is used as logits (the official code's reading; the paper's log(U) is
  undefined for a linear layer's output).

  Args:
    key: routing-stream key; None gives the noise-free softmax.
    logits_x2: [..., 2] router logits (index 1 = run).
    tau: temperature T (1 in the paper).

  Returns:
    v: [...] in (0, 1).
  """
  return gumbel_softmax(key, logits_x2, tau, axis=-1)[..., RUN_INDEX]


def hard_decision(v: Array, threshold: float | Array = 0.5) -> Array:
  """CoDiNet Eq. 13: run the block iff v >= threshold (0.5 in the paper). Returns bool."""
  return v >= threshold


def straight_through(hard: Array, soft: Array) -> Array:
  """Forward value `hard`, gradient of `soft` (for fine-tuning with hard decisions)."""
  hard = hard.astype(soft.dtype)
  return soft + jax.lax.stop_gradient(hard - soft)


# ------------------------------------------------------------------------------------------------
# Temperature schedules: functions of the global step returning a float32 scalar (jit-friendly).
# ------------------------------------------------------------------------------------------------


def constant_schedule(tau: float) -> Schedule:
  """tau(step) = tau."""
  check_tau(tau)
  return lambda step: jnp.asarray(tau, jnp.float32)


def exponential_decay_schedule(init: float, decay_per_epoch: float, floor: float,
                               steps_per_epoch: int, start_step: int = 0) -> Schedule:
  """tau(step) = max(floor, init * exp(-decay_per_epoch * epoch)), epoch = (step - start) // spe.

  DRNet stage 2: init 1.0, decay 0.0006, floor 0.5 (ImageNet: 5.0 -> 0.8). The decay is applied
  once per completed epoch, as the paper describes, not continuously.

  Args:
    init: temperature at `start_step`.
    decay_per_epoch: rate r >= 0 in exp(-r) per epoch.
    floor: lowest temperature, 0 < floor <= init.
    steps_per_epoch: optimizer steps in one epoch (> 0).
    start_step: global step at which the schedule starts (the stage's first step).
  """
  check_tau(init, "tau_init")
  check_tau(floor, "tau_floor")
  if floor > init:
    raise ValueError(f"tau_floor ({floor}) must not exceed tau_init ({init}).")
  if decay_per_epoch < 0:
    raise ValueError(f"tau_decay_per_epoch must be >= 0; got {decay_per_epoch}.")
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be > 0; got {steps_per_epoch}.")

  def schedule(step):
    epoch = jnp.maximum(jnp.asarray(step) - start_step, 0) // steps_per_epoch
    tau = init * jnp.exp(-decay_per_epoch * epoch.astype(jnp.float32))
    return jnp.maximum(tau, floor).astype(jnp.float32)

  return schedule


def entropy(weights: Array, axis: int = -1) -> Array:
  """Shannon entropy (nats) of `weights` along `axis`; 0 * log 0 counts as 0."""
  w = jnp.clip(weights, 0.0, 1.0)
  return -jnp.sum(jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), 0.0), axis=axis)
