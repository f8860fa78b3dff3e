"""The contract of a routed model: what it returns (`ModelOutput`) and what it answers
(`RoutedModel`). The registry is `dynroute_jax.models`.

Shape letters:
  B: batch.   N: classes.   S: routed units, flattened (DRNet: cells x connections x branches;
  CoDiNet: routed blocks). P: path features (DRNet: the same S weights; CoDiNet: D blocks).

Every model's `__call__(x, *, train, tau=1.0, threshold=None, drop_path_rate=0.0,
strategy='dense')` returns a `ModelOutput`:
  * train=True: Gumbel-relaxed routing with noise from the 'routing' rng stream, batch statistics,
    drop-path from the 'dropout' stream.
  * train=False, threshold=None: deterministic, every branch/block runs ("all branches").
  * train=False, threshold=T: deterministic routing; DRNet keeps the top branches whose weights
    reach T (`routing.threshold_select`), CoDiNet runs a block iff v >= T (0.5 in the paper).
    `strategy` picks how skipped work is avoided (`dynroute_jax.dispatch`: a name, a mapping
    `dict(name=..., **options)` or a `Strategy` object); 'dense' computes everything and masks,
    which is the reference the other strategies must match.
  * CoDiNet only: train=True, hard=True is stage 2's fine-tuning: the noise-free hard decisions of
    inference, with a straight-through gradient.

Everything outside `dynroute_jax.models` that depends on the model's routing structure (the
trainer's metrics and call arguments, the evaluation's selection ratios, the dynamics report, the
size summary) asks the model through `RoutedModel` instead of testing which model it has.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import flax
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Router parameters: every parameter under a submodule named 'router' (both models name their
# routers so); `re.search` on the '/'-joined parameter path.
ROUTER_PARAM_PATTERN = r"(^|/)router(/|$)"


@flax.struct.dataclass
class ModelOutput:
  """Logits plus the routing information losses and reports need.

  Attributes:
    logits: [B, N] class logits.
    aux_logits: [B, N] auxiliary-head logits (DRNet, training only) or None.
    weights: [B, S] weight of each routed unit: DRNet's recalibrated (or rescaled kept) branch weights,
      CoDiNet's run probability v (training) or hard decision (inference).
    executed: [B, S] float 0/1, the units that run for each example (all ones when every branch runs).
    path: [B, P] the routing path used by CoDiNet's consistency and diversity losses and by t-SNE.
    macs_table: [S] MACs of each routed unit for one example (a constant derived from the model).
    params_table: [S] parameters of each routed unit (for "active parameters per example").
    macs_fixed: scalar MACs always executed per example (stem, routers, heads, skip paths...).
    params_fixed: scalar parameters always used (auxiliary head excluded).
    site_shape: static shape that `weights`' S axis unflattens to, e.g. (L, C, K) or (D,).
    router_probs: [B, S] the noise-free router output in every mode (DRNet: softmax(logits / tau)
      per connection; CoDiNet: the run probability v), for saturation metrics, noise-free path
      losses and the static counterpart (the test-set mean of it).
    router_macs: scalar MACs of the routers per example (inside `macs_fixed`); a static network
      needs no routers.
  """
  logits: Array
  aux_logits: Array | None
  weights: Array
  executed: Array
  path: Array
  macs_table: Array
  params_table: Array
  macs_fixed: Array
  params_fixed: Array
  site_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  router_probs: Array | None = None
  router_macs: Array | float = 0.0

  @property
  def expected_macs(self) -> Array:
    """[B] MACs per example weighted by the routing weights (DRNet Eq. 8's sum, plus fixed MACs)."""
    return self.macs_fixed + self.weights @ self.macs_table

  @property
  def expected_routed_macs(self) -> Array:
    """[B] MACs of the routed units weighted by the routing weights: DRNet Eq. 8's sum alone."""
    return self.weights @ self.macs_table

  def router_choices(self) -> Array:
    """[B, U, K] the noise-free router distribution of each routing unit over its K choices.

    DRNet: U = L x C connections over K branches; CoDiNet: U = D blocks over (skip, run).
    """
    if self.router_probs is None:
      raise ValueError("This ModelOutput carries no router_probs.")
    if len(self.site_shape) == 3:
      return self.router_probs.reshape(self.router_probs.shape[0], -1, self.site_shape[-1])
    v = self.router_probs
    return jnp.stack([1.0 - v, v], axis=-1)

  @property
  def executed_macs(self) -> Array:
    """[B] MACs per example of the units that actually run."""
    return self.macs_fixed + self.executed @ self.macs_table

  @property
  def executed_params(self) -> Array:
    """[B] parameters per example of the units that actually run."""
    return self.params_fixed + self.executed @ self.params_table


@runtime_checkable
class RoutedModel(Protocol):
  """What the trainer, the evaluation and the reports may ask of any routed model.

  Flax reserves a module's `name` for its place in the parameter tree, so the model's registry
  name is `model_name`.

  Attributes:
    model_name: the registry name (`config.model.name`), e.g. 'drnet'.
    router_param_pattern: a regex; `re.search(pattern, path)` on a parameter's '/'-joined path
      (e.g. 'cell_0/router/Dense_0/kernel') is true exactly for router parameters.
  """
  model_name: ClassVar[str]
  router_param_pattern: ClassVar[str]

  def routing_site_shape(self, image_hw: tuple[int, int]) -> tuple[int, ...]:
    """The static shape the S axis of `ModelOutput` unflattens to, for images of `image_hw`."""

  def unit_names(self) -> list[str] | None:
    """Names of a routing unit's K choices (DRNet's branches), or None (run/skip routing)."""

  def routing_stats(self, out: ModelOutput) -> dict[str, Array]:
    """Per-step training metrics of the routing (jit-able): selection ratios, router entropy."""

  def train_call_kwargs(self, stage_cfg: Any) -> dict[str, Any]:
    """Extra keyword arguments of the train=True call in the stage `stage_cfg` configures."""

  def selection_ratios(self, executed_NxS: np.ndarray) -> dict[str, Any]:
    """Share of examples running each routed unit, in the evaluation report's layout."""

  def constant_decisions(self, executed_NxS: np.ndarray) -> dict[str, Any]:
    """The routing units (and routers) whose decision is the same for every example."""

  def size_breakdown(self, macs_table_S: np.ndarray) -> dict[str, Any]:
    """MACs of the routed units grouped by the model's structure (cells or stages)."""


def unit_means(executed_NxS: np.ndarray) -> np.ndarray:
  """[S] float64 share of the N examples that run each unit (zeros for an empty set)."""
  ex = np.asarray(executed_NxS).astype(np.float64)
  return ex.mean(axis=0) if ex.shape[0] else np.zeros(ex.shape[1:])


def constant_units(executed_NxS: np.ndarray) -> np.ndarray:
  """[S] bool, True where a unit's 0/1 decision (executed > 0.5) is the same for every example."""
  ex = np.asarray(executed_NxS) > 0.5
  return np.all(ex == ex[:1], axis=0)
