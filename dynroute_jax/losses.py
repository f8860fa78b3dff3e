"""Model-agnostic training losses for dynamic routing networks.

Every function is pure, vectorized over the batch and jit-able. Shape letters:
  B: batch.  N: classes (cross entropy) or images (CoDiNet losses).  M: augmented views per image.
  D: path dimension.  S: routed units (see `models.base`).

Losses:
  * `cross_entropy`: softmax cross entropy with optional label smoothing (per example).
  * `resource_loss`: DRNet (WACV 2021) Eq. 8 regulariser, lambda * 1[y_hat == y] * log E[R].
  * `consistency_loss`: CoDiNet (TPAMI) Eq. 8, attraction of each image's views to their centre.
  * `diversity_loss`: CoDiNet Eq. 9, repulsion between the path centres of different images.
  * `cost_loss`: CoDiNet Eq. 11, sum_k c_k v_k with c_k from the model's MACs table.
  * `count_cost_loss`: the official CoDiNet code's cost, an L1 distance of the number of run blocks
    to a target count (an option, not the paper's).
  * `router_logit_spread`: a z-loss-like penalty (ST-MoE) on the spread of the router logits, which
    keeps routers out of saturation (where no gradient reaches them).
  * `saturation_stats`: how many routing decisions are saturated (a metric, not a loss).
  * `total_loss`: the training objective of a stage, every weighted term above that the stage's
    config turns on, summed in one fixed order.

Units: every cost is in MACs (multiply-accumulates of conv and dense layers, see `costs.CONVENTION`;
FLOPs = 2 x MACs). The L2 norms in the CoDiNet losses use `safe_norm`, whose gradient is zero (not
NaN) where the vector is exactly zero, e.g. identical views or identical path centres.
"""

from __future__ import annotations

from typing import Any, TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections
import optax

if TYPE_CHECKING:  # Only for annotations: the losses stay free of model code.
  from dynroute_jax.models import base as models_base

Array = jax.Array


def _check_margin(margin: Any, name: str) -> None:
  """Raises ValueError if a concrete margin is negative (traced margins are not checked)."""
  if isinstance(margin, jax.core.Tracer):
    return
  try:
    value = float(margin)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a real number >= 0; got {margin!r}.") from e
  if not value >= 0.0:  # Also rejects NaN.
    raise ValueError(f"{name} must be >= 0 (a hinge margin); got {margin!r}.")


def safe_norm(x: Array, axis: int = -1) -> Array:
  """L2 norm over `axis` with a finite gradient everywhere.

  The plain `jnp.linalg.norm` has gradient x / ||x|| = 0 / 0 = NaN at x = 0. Here the square root
  only ever sees a strictly positive argument, and the result (and its gradient) is exactly 0 where
  ||x|| = 0. Away from 0 the value and gradient equal the plain norm's.

  Args:
    x: array of any shape.
    axis: the axis to reduce.

  Returns:
    The norms, with `axis` removed.
  """
  sq = jnp.sum(jnp.square(x), axis=axis)
  positive = sq > 0
  safe_sq = jnp.where(positive, sq, 1.0)
  return jnp.where(positive, jnp.sqrt(safe_sq), 0.0)


def cross_entropy(logits_BxN: Array, labels_B: Array, label_smoothing: float = 0.0) -> Array:
  """Softmax cross entropy per example.

  Args:
    logits_BxN: [B, N] unnormalised class scores.
    labels_B: [B] integer class labels in [0, N).
    label_smoothing: epsilon in [0, 1); the target is (1 - eps) * one_hot + eps / N.

  Returns:
    [B] float32 losses. Take `.mean()` for the batch loss (or a masked mean for padded batches).
  """
  if not isinstance(label_smoothing, jax.core.Tracer) and not 0.0 <= float(label_smoothing) < 1.0:
    raise ValueError(f"label_smoothing must lie in [0, 1); got {label_smoothing!r}.")
  num_classes = logits_BxN.shape[-1]
  logits = logits_BxN.astype(jnp.float32)
  targets = jax.nn.one_hot(labels_B, num_classes, dtype=jnp.float32)
  targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def correct_predictions(logits_BxN: Array, labels_B: Array) -> Array:
  """[B] float32 indicator 1[argmax logits == label], with a stopped gradient."""
  return jax.lax.stop_gradient((jnp.argmax(logits_BxN, axis=-1) == labels_B).astype(jnp.float32))


def resource_loss(expected_macs_B: Array, correct_B: Array, weight: float | Array,
                  normalizer: float | Array | None = None) -> Array:
  """DRNet Eq. 8 resource regulariser, averaged over the batch.

    L_res = (1 / B) sum_i lambda * 1[y_hat_i == y_i] * log E[R]_i,
    E[R]_i = sum_{l,c,b} w~_{l,c,b}(x_i) * R(F_{l,c,b})        (the model's `expected_macs`).

  Units: `expected_macs_B` is in MACs per example (`ModelOutput.expected_macs`, which also adds the
  constant `macs_fixed`). Because of the log, the gradient, lambda * dE[R] / E[R], does not depend on
  the unit: FLOPs (2 x MACs) or a `normalizer` only add a constant to the loss value. Passing
  `normalizer` (e.g. the full model's MACs) just makes the logged value readable (log of the
  fraction of the full model's cost, <= 0).

  Args:
    expected_macs_B: [B] expected MACs per example, differentiable w.r.t. the routing weights.
    correct_B: [B] indicator (bool or 0/1) of correctly classified examples; its gradient is stopped
      here (see `correct_predictions`).
    weight: lambda (DRNet-R-lambda; the paper uses 0, 0.1 and 0.5).
    normalizer: optional positive scalar the MACs are divided by inside the log.

  Returns:
    Scalar loss.
  """
  correct = jax.lax.stop_gradient(jnp.asarray(correct_B).astype(jnp.float32))
  macs = expected_macs_B.astype(jnp.float32)
  if normalizer is not None:
    macs = macs / normalizer
  # E[R] > 0 always (fixed MACs, softmax weights); the floor only guards the log against 0.
  log_r = jnp.log(jnp.maximum(macs, jnp.finfo(jnp.float32).tiny))
  return weight * jnp.mean(correct * log_r)


def consistency_loss(paths_NxMxD: Array, margin: float | Array) -> Array:
  """CoDiNet Eq. 8: consistency of the routing paths of each image's augmented views.

    L_con = 1 / (N M) sum_{i=1..N} sum_{j=1..M} [ ||r_ij - mean_j' r_ij'||_2 - m_c ]_+^2

  Args:
    paths_NxMxD: [N, M, D] routing path r_ij of view j of image i (CoDiNet: the run probabilities
      v_k of the D routed blocks).
    margin: m_c >= 0 (0.2 in the paper). Distances below the margin cost nothing.

  Returns:
    Scalar loss. With M = 1 the loss is 0.
  """
  _check_margin(margin, "consistency margin (m_c)")
  paths = paths_NxMxD.astype(jnp.float32)
  centres = jnp.mean(paths, axis=1, keepdims=True)                       # [N, 1, D]
  dist = safe_norm(paths - centres, axis=-1)                               # [N, M]
  return jnp.mean(jnp.square(jax.nn.relu(dist - margin)))


def path_centres(paths_NxMxD: Array) -> Array:
  """[N, D] mean routing path over the M views of each image."""
  return jnp.mean(paths_NxMxD.astype(jnp.float32), axis=1)


def diversity_loss(paths_NxMxD: Array, margin: float | Array) -> Array:
  """CoDiNet Eq. 9: diversity between the path centres of different images in the batch.

    L_div = 1 / (N (N - 1)) sum_{i=1..N} sum_{j != i} [ m_d - ||c_i - c_j||_2 ]_+^2,
    c_i = mean over the M views of r_ij.

  Computed from all N x N pairwise differences (memory O(N^2 D)), exact (no Gram-matrix
  cancellation); the diagonal is masked out and `safe_norm` keeps gradients finite for i == j and
  for identical centres.

  Args:
    paths_NxMxD: [N, M, D] routing paths (M may be 1: the centre is then the path itself).
    margin: m_d >= 0 (0.5 in the paper). Centres further apart than the margin cost nothing.

  Returns:
    Scalar loss; 0 when N < 2 (no pairs).
  """
  _check_margin(margin, "diversity margin (m_d)")
  n = paths_NxMxD.shape[0]
  if n < 2:
    return jnp.zeros((), jnp.float32)
  centres = path_centres(paths_NxMxD)                                     # [N, D]
  dist = safe_norm(centres[:, None, :] - centres[None, :, :], axis=-1)   # [N, N]
  off_diagonal = 1.0 - jnp.eye(n, dtype=jnp.float32)
  hinge = jnp.square(jax.nn.relu(margin - dist)) * off_diagonal
  return jnp.sum(hinge) / (n * (n - 1))


def cost_loss(weights_BxS: Array, macs_table_S: Array,
              normalizer: float | Array | None = None) -> Array:
  """CoDiNet Eq. 11: relaxed computational cost sum_k c_k v_k, averaged over the batch.

  c_k is the MACs of routed unit k (`ModelOutput.macs_table`, derived from the model, never typed
  in) and v_k its relaxed run probability (`ModelOutput.weights`).

  Normalisation (our choice; the paper's gamma is "tuned adaptively" and the scale is not given):
  raw MACs make gamma depend on the model size (ResNet-110's blocks cost ~2e6 MACs each), so the
  training loop passes `normalizer` = the full model's MACs (`macs_fixed + macs_table.sum()`,
  every unit run). The loss is then the expected fraction of the full model's cost spent on routed
  units, in [0, 1], and one gamma transfers between backbones. `normalizer=None` gives raw MACs.

  Args:
    weights_BxS: [B, S] relaxed decisions v (or any per-unit weights).
    macs_table_S: [S] MACs per example of each unit.
    normalizer: optional positive scalar dividing the cost.

  Returns:
    Scalar loss.
  """
  cost_B = weights_BxS.astype(jnp.float32) @ macs_table_S.astype(jnp.float32)
  if normalizer is not None:
    cost_B = cost_B / normalizer
  return jnp.mean(cost_B)


def full_model_macs(macs_table_S: Array, macs_fixed: Array | float = 0.0) -> Array:
  """MACs per example with every routed unit run: the default `cost_loss` normalizer."""
  return jnp.asarray(macs_fixed, jnp.float32) + jnp.sum(jnp.asarray(macs_table_S, jnp.float32))


def count_cost_loss(weights_BxS: Array, target_fraction: float | Array,
                    correct_B: Array | None = None) -> Array:
  """The official CoDiNet code's cost: | mean_k v_k - target |, averaged over the batch.

  The code counts run blocks against a target count; dividing by the number of blocks makes the
  target a fraction in [0, 1] that transfers between depths.

  Args:
    weights_BxS: [B, S] relaxed run probabilities.
    target_fraction: the target share of blocks to run.
    correct_B: optional [B] 0/1 gate (only correctly classified examples pay).

  Returns:
    Scalar loss.
  """
  per_B = jnp.abs(jnp.mean(weights_BxS.astype(jnp.float32), axis=-1) - target_fraction)
  if correct_B is not None:
    per_B = per_B * jax.lax.stop_gradient(jnp.asarray(correct_B, jnp.float32))
  return jnp.mean(per_B)


def router_logit_spread(choices_BxUxK: Array, tau: float | Array) -> Array:
  """Mean squared centred router logit: tau * log p, centred over the K choices.

  The shift-invariant analogue of ST-MoE's router z-loss for softmax routers whose logits are only
  seen through their probabilities. For a 2-way (skip, run) router with logit gap g it is g^2 / 4.

  Args:
    choices_BxUxK: [B, U, K] noise-free router probabilities (`ModelOutput.router_choices()`).
    tau: the temperature the probabilities were computed at.

  Returns:
    Scalar penalty.
  """
  logp = jnp.log(jnp.clip(choices_BxUxK.astype(jnp.float32), 1e-30, 1.0)) * tau
  centred = logp - jnp.mean(logp, axis=-1, keepdims=True)
  return jnp.mean(jnp.square(centred))


def saturation_stats(choices_BxUxK: Array, level: float = 0.99) -> dict[str, Array]:
  """Saturation of routing decisions (the top choice's probability >= `level`).

  Returns:
    'router_saturation': share of (example, unit) pairs that are saturated;
    'routers_saturated': share of units saturated on the same choice for every example of the batch
    (such a unit receives (almost) no gradient and takes one decision for every input).
  """
  top = jnp.max(choices_BxUxK, axis=-1)
  arg = jnp.argmax(choices_BxUxK, axis=-1)
  sat = top >= level
  same = jnp.all(arg == arg[:1], axis=0)
  return {"router_saturation": jnp.mean(sat.astype(jnp.float32)),
          "routers_saturated": jnp.mean((jnp.all(sat, axis=0) & same).astype(jnp.float32))}


# ----------------------------------------------------------------------------------------------
# The training objective.


def _on(weight: float | Array) -> bool:
  """Whether a loss term is in the graph: a positive weight, or a traced one (a step shared by
  stages with different weights, `train_step.make_shared_train_step`)."""
  return not isinstance(weight, (int, float)) or weight > 0


def total_loss(out: models_base.ModelOutput, labels_B: Array, stage_cfg: ml_collections.ConfigDict,
               train_cfg: ml_collections.ConfigDict, *, num_views: int, tau: float | Array
               ) -> tuple[Array, dict[str, Array]]:
  """The stage's training loss: the sum of its weighted terms, and the terms themselves.

  The terms, each present only when its weight is positive or traced (and, for 'aux', when the
  model has an auxiliary head), in the order they are summed: 'ce', 'aux', 'resource', 'consistency',
  'diversity', 'cost', 'router_logit'. The order is part of the contract: a float sum in another
  order is another number, and resumed runs are compared bit for bit.

  Args:
    out: the train=True model output for the B = images x views examples of the batch, views of
      one image adjacent (the layout of `input_pipeline.make_views`, flattened).
    labels_B: [B] integer labels, one per example.
    stage_cfg: the stage's config (`config.train.stage1`, ...), or any object with its `*_weight`
      fields: the loss weights, Python numbers or traced scalars.
    train_cfg: `config.train`: label smoothing, margins and the cost and path options.
    num_views: M, the augmented views per image (the path losses group the examples by image).
    tau: the router temperature of the step (for `router_logit_spread`).

  Returns:
    (scalar total, {term name: scalar weighted term}).
  """
  terms = {"ce": jnp.mean(cross_entropy(out.logits, labels_B, train_cfg.label_smoothing))}
  if _on(stage_cfg.aux_weight) and out.aux_logits is not None:
    terms["aux"] = stage_cfg.aux_weight * jnp.mean(
        cross_entropy(out.aux_logits, labels_B, train_cfg.label_smoothing))
  correct_B = correct_predictions(out.logits, labels_B)
  if _on(stage_cfg.resource_weight):
    cost_B = (out.expected_routed_macs if train_cfg.resource_cost == "branches"
              else out.expected_macs)
    terms["resource"] = resource_loss(cost_B, correct_B, stage_cfg.resource_weight)
  terms.update(_path_terms(out, stage_cfg, train_cfg, num_views))
  if _on(stage_cfg.cost_weight):
    terms["cost"] = stage_cfg.cost_weight * _cost(out, correct_B, train_cfg)
  if train_cfg.router_logit_weight > 0:
    terms["router_logit"] = train_cfg.router_logit_weight * router_logit_spread(
        out.router_choices(), tau)
  # sum() keeps the historical association ((ce + aux) + resource) + ...; do not reorder.
  return sum(terms.values()), terms


def _path_terms(out: models_base.ModelOutput, stage_cfg: ml_collections.ConfigDict,
                train_cfg: ml_collections.ConfigDict, num_views: int) -> dict[str, Array]:
  """The weighted CoDiNet consistency and diversity terms over the images' routing paths."""
  terms = {}
  if _on(stage_cfg.consistency_weight) or _on(stage_cfg.diversity_weight):
    path_BxD = out.router_probs if train_cfg.path_loss_input == "clean" else out.path
    paths_NxMxD = path_BxD.reshape(-1, num_views, path_BxD.shape[-1])
    if _on(stage_cfg.consistency_weight):
      terms["consistency"] = stage_cfg.consistency_weight * consistency_loss(
          paths_NxMxD, train_cfg.consistency_margin)
    if _on(stage_cfg.diversity_weight):
      terms["diversity"] = stage_cfg.diversity_weight * diversity_loss(
          paths_NxMxD, train_cfg.diversity_margin)
  return terms


def _cost(out: models_base.ModelOutput, correct_B: Array,
          train_cfg: ml_collections.ConfigDict) -> Array:
  """The unweighted CoDiNet cost: Eq. 11 over the full model's MACs, or the count L1 option."""
  gate_B = correct_B if train_cfg.cost_on_correct_only else None
  if train_cfg.cost_type == "count_l1":
    return count_cost_loss(out.weights, train_cfg.cost_target, gate_B)
  full = full_model_macs(out.macs_table, out.macs_fixed)
  weights_BxS = out.weights if gate_B is None else out.weights * gate_B[:, None]
  return cost_loss(weights_BxS, out.macs_table, normalizer=full)
