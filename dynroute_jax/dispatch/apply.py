"""The dispatcher's front-ends: a routed block (`select_apply`) and a routed mixture (`mix_branches`).

Each checks its arguments, picks the concrete strategy, and describes the work as a
`strategies.RoutedCall` (an output carry and the sites that update it) for the strategy to execute.

Shape letters:
  B: batch (examples), the leading axis of every array argument and result.
  K: branches of a mixture.
  c: rows fed to a function in one go (a capacity bucket or a chunk), c <= B.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp

from dynroute_jax.dispatch import factory
from dynroute_jax.dispatch import rows
from dynroute_jax.dispatch import strategies

Array = jax.Array
PyTree = Any
Site = strategies.Site
RoutedCall = strategies.RoutedCall


def select_apply(fn: Callable[[PyTree], PyTree], x_B: PyTree, run_B: Array,
                 fallback_B: PyTree | None = None, *,
                 strategy: factory.StrategySpec = "auto", platform: str | None = None,
                 **opts: Any) -> PyTree:
  """y[b] = fn(x)[b] where run[b], else fallback[b]; fn runs only on (a bucket/chunk of) run rows.

  Args:
    fn: maps a batch [n, ...] to [n, ...out] for any n, each output row depending only on its input
      row (inference-mode batch norm). A pytree in and out is allowed.
    x_B: [B, ...] input (array or pytree of arrays with the same leading B).
    run_B: [B] bool (or 0/1) routing decisions.
    fallback_B: [B, ...out] values for rows that do not run (e.g. a shortcut the caller computed
      densely), or None for the identity (then fn must keep x's shape); None and `x_B` itself enable
      the in-place update (`dynroute_jax.dispatch` docstring).
    strategy: one of STRATEGIES, a mapping `dict(name=..., **options)`, or a `Strategy` object.
    platform: platform for 'auto' (default: `jax.default_backend()`).
    **opts: options with a strategy name ('compact': buckets, spacing, branching; 'chunk': chunk,
      tail_levels; see `Compact` and `Chunk`). Options of other strategies are ignored, unknown
      names raise TypeError.

  Returns:
    [B, ...out], fallback's structure and dtypes (x's for the identity): every strategy casts fn's
    rows to them, so that all of them, and the skipped rows, agree on one dtype.
  """
  b = rows.batch_size(x_B)
  chosen = factory.resolve(strategy, b, platform, **opts)
  run_B = jnp.asarray(run_B).astype(bool).reshape(-1)
  if run_B.shape != (b,):
    raise ValueError(f"run_B must have shape ({b},); got {run_B.shape}.")
  if fallback_B is None or fallback_B is x_B:
    return chosen.apply(_identity_call(fn, x_B, run_B))
  return chosen.apply(_fallback_call(fn, x_B, run_B, fallback_B))


def _identity_call(fn: Callable[[PyTree], PyTree], x_B: PyTree, run_B: Array) -> RoutedCall:
  """Skipped rows keep x: the carry is x itself, its selected rows overwritten by fn's.

  Each selected row is read from the carry and written once, so a row is never read after it was
  written, and when x is dead after the call XLA reuses its buffer (no full-batch copy or select).
  """

  def make_sites(data):
    _, run = data

    def some_rows(carry, idx_c, valid_c):
      out_c = fn(rows.gather_rows(carry, idx_c))
      return rows.scatter_rows(carry, jnp.where(valid_c, idx_c, run.shape[0]), out_c, "set")

    # Cast to the carry's dtypes: a `lax.cond` needs the same types from the branch that runs fn
    # and the one that leaves the carry alone.
    yield Site(mask_B=run,
               masked=lambda carry: rows.where_rows(run, rows.cast_like(fn(carry), carry), carry),
               some_rows=some_rows, every_row=lambda carry: rows.cast_like(fn(carry), carry))

  return RoutedCall(data_B=(x_B, run_B), init=lambda data: data[0], make_sites=make_sites)


def _fallback_call(fn: Callable[[PyTree], PyTree], x_B: PyTree, run_B: Array,
                   fallback_B: PyTree) -> RoutedCall:
  """Skipped rows take the fallback: the carry starts as the fallback, run rows are overwritten."""

  def make_sites(data):
    x, run, _ = data

    def some_rows(carry, idx_c, valid_c):
      out_c = fn(rows.gather_rows(x, idx_c))
      return rows.scatter_rows(carry, jnp.where(valid_c, idx_c, run.shape[0]), out_c, "set")

    yield Site(mask_B=run,
               masked=lambda carry: rows.where_rows(run, rows.cast_like(fn(x), carry), carry),
               some_rows=some_rows, every_row=lambda carry: rows.cast_like(fn(x), carry))

  return RoutedCall(data_B=(x_B, run_B, fallback_B), init=lambda data: data[2],
                    make_sites=make_sites)


def mix_branches(fns: Sequence[Callable[[PyTree], PyTree]], x_B: PyTree, weights_BxK: Array, *,
                 strategy: factory.StrategySpec = "auto", platform: str | None = None,
                 **opts: Any) -> PyTree:
  """y[b] = sum_k weights[b, k] * fns[k](x)[b], running fns[k] only on rows with weights[b, k] > 0.

  The mixture-of-experts dispatch of a DRNet connection: for each branch k, the rows that kept it
  are grouped (bucketed capacity or chunks), the branch runs on them, and the weighted results are
  added into the output in place. Rows whose weights are all zero get zeros.

  Args:
    fns: K functions with a common output shape (and dtype), per-example independent.
    x_B: [B, ...] input (array or pytree).
    weights_BxK: [B, K] non-negative weights (e.g. `routing.threshold_select`'s rescaled weights);
      a weight of exactly 0 means "do not run".
    strategy, platform, **opts: as for `select_apply`.

  Returns:
    [B, ...out] in the dtype of fns[0]'s output.
  """
  fns = list(fns)
  b = rows.batch_size(x_B)
  k_count = len(fns)
  if k_count == 0:
    raise ValueError("fns must hold at least one function.")
  weights_BxK = jnp.asarray(weights_BxK)
  if weights_BxK.shape != (b, k_count):
    raise ValueError(f"weights_BxK must have shape ({b}, {k_count}); got {weights_BxK.shape}.")
  chosen = factory.resolve(strategy, b, platform, **opts)
  run_BxK = weights_BxK > 0
  out_shape = _common_output_shape(fns, x_B)
  return chosen.apply(_mixture_call(fns, out_shape, x_B, weights_BxK, run_BxK))


def _common_output_shape(fns: Sequence[Callable[[PyTree], PyTree]], x_B: PyTree) -> PyTree:
  """fns[0]'s output shapes and dtypes, checked to be every function's shapes."""
  out_shape = jax.eval_shape(fns[0], x_B)
  for f in fns[1:]:
    other = jax.eval_shape(f, x_B)
    if jax.tree.structure(other) != jax.tree.structure(out_shape) or any(
        u.shape != v.shape for u, v in zip(jax.tree.leaves(other), jax.tree.leaves(out_shape))):
      raise ValueError(f"all fns must share the output shape; got {out_shape} and {other}.")
  return out_shape


def _mixture_call(fns: Sequence[Callable[[PyTree], PyTree]], out_shape: PyTree, x_B: PyTree,
                  weights_BxK: Array, run_BxK: Array) -> RoutedCall:
  """The output starts at zeros; site k adds branch k's weighted rows where run[:, k]."""

  def init(data):
    n = rows.leading_size(data)
    return jax.tree.map(lambda s: jnp.zeros((n,) + s.shape[1:], s.dtype), out_shape)

  def make_sites(data) -> Iterator[Site]:
    x, weights, run = data
    for k, f in enumerate(fns):
      w_B = weights[:, k]

      def some_rows(carry, idx_c, valid_c, f=f, w_B=w_B):
        out_c = rows.weighted_rows(f(rows.gather_rows(x, idx_c)),
                                   rows.gather_rows(w_B, idx_c))
        return rows.scatter_rows(carry, jnp.where(valid_c, idx_c, run.shape[0]), out_c, "add")

      def masked(carry, f=f, w_B=w_B):
        # The weights are 0 off the mask: the weighted sum needs no select.
        return rows.add_trees(carry, rows.weighted_rows(f(x), w_B))

      yield Site(mask_B=run[:, k], masked=masked, some_rows=some_rows, every_row=masked)

  return RoutedCall(data_B=(x_B, weights_BxK, run_BxK), init=init, make_sites=make_sites)
