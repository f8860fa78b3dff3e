"""The dispatcher: run only the branches / blocks each example selected, under `jax.jit`.

Routed models hand this module *pure functions* of a batch (a Flax block bound to its variables with
`module.unbind()` or a closure over them, batch norm in inference mode), so that each example's output
depends on that example alone. The functions here then decide, per routing site, how the examples that
need a function are fed to it, and how its results are put back.

Shape letters:
  B: batch (examples), the leading axis of every array argument and result.
  K: branches of a mixture (DRNet: 5 per connection).
  c: rows actually fed to a function in one call (a capacity bucket or a chunk), c <= B.
  ...: any trailing per-example shape (H, W, C for images); a function may change it (stride 2).

Public API:
  select_apply(fn, x_B, run_B, fallback_B, *, strategy)      y[b] = fn(x)[b] if run[b] else fallback[b]
  mix_branches(fns, x_B, weights_BxK, *, strategy)            y[b] = sum_k w[b, k] fns[k](x)[b], w > 0 only
  default_strategy(platform, batch_size) / resolve_strategy(strategy, batch_size)
  STRATEGIES, capacity_buckets(batch_size, buckets)

Strategies (all give the same values as 'dense', up to float rounding of the order of summation):
  'dense'        compute every function on the whole batch, then mask. The reference; skips nothing.
  'batch_cond'   one `lax.cond` per function: run it on the whole batch iff any example needs it.
  'per_example'  `lax.map` over examples, a `lax.cond` per example and function. Never `vmap` a cond:
                 under `vmap` a cond becomes a `select` and computes every branch for every example.
  'compact'      order the selected rows first (an O(B) counting sort, stable), then a `lax.switch`
                 over static capacity buckets picks the smallest bucket >= count; that branch gathers
                 the first c rows, runs the function on c rows and scatters the valid results back in
                 place. Count 0 is its own branch that touches nothing; the full bucket (c = B) runs on
                 the batch as is and selects, with no gather or scatter. XLA (CPU, 0.10) copies the
                 carry once per site when several switch branches update it, a full-batch memory
                 pass; `branching='cond_chain'` (one two-way cond per bucket) avoids the copy at the
                 price of one predicate per bucket.
  'chunk'        a `while_loop` over the compacted rows in chunks of `chunk` rows (whole chunks only),
                 then a short tail: one `lax.cond` per power-of-two fraction of a chunk (chunk/2,
                 chunk/4, ... down to chunk / 2**tail_levels rows), so at most chunk / 2**tail_levels - 1
                 padding rows are computed per site. Results are scattered into the output carry in
                 place; with zero selected rows the loop runs zero times and nothing is written.
  'auto'         `default_strategy(jax.default_backend(), B)`.

Batch size 1: every strategy but 'dense' becomes a single `lax.cond` on the one example.

Padding rows (bucket or chunk rows beyond the count) are the first *unselected* rows of the batch, or
zero rows past its end; their results are dropped by the scatter (mode='drop'), never written.

In-place updates. `select_apply` with `fallback_B=None` (or `fallback_B is x_B`) means "identity": the
output carry starts as `x` itself and each selected row is read from the carry and overwritten by
`fn`'s result, so when `x` is dead after the call (a residual stack inside `lax.scan`) XLA reuses its
buffer and no full-batch copy or select pass is made. A caller-computed fallback (e.g. a stride-2
shortcut) is used as the carry the same way.

Platform defaults (`default_strategy`):
  cpu  measured (bench/dispatch.py, bench/RESULTS.md): 'chunk' for B > 1; B = 1 is a single cond.
  tpu  conditionals and loop predicates are evaluated on the device: 'compact' (big static shapes suit
       the matrix unit). NOT measured yet.
  gpu  NOT measured yet, provisional. Each conditional or while-loop predicate makes the host wait for
       the device (~10-50 us per routed site and per loop trip), so per-example execution is hopeless
       and fewer predicates per site is better: 'compact' has one predicate per site, 'chunk' one per
       chunk. At small batch the device is not saturated and skipping rows saves little, so dense
       masking may win: provisional default 'dense' for B < 64, 'compact' from 64 up. Measure before
       trusting this (bench/dispatch.py runs on any backend).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
PyTree = Any

STRATEGIES = ("auto", "dense", "batch_cond", "per_example", "compact", "chunk")
_CONCRETE = STRATEGIES[1:]

# Provisional GPU threshold (not measured, see the module docstring).
GPU_DENSE_BELOW = 64


# ------------------------------------------------------------------------------------------------
# Strategy selection.
# ------------------------------------------------------------------------------------------------


def default_strategy(platform: str, batch_size: int) -> str:
  """The strategy 'auto' resolves to on `platform` ('cpu', 'gpu', 'tpu', ...) at `batch_size`.

  See the module docstring for the reasoning; only the CPU choice is measured.
  """
  platform = platform.lower()
  if platform in ("gpu", "cuda", "rocm"):
    return "dense" if batch_size < GPU_DENSE_BELOW else "compact"  # provisional, not measured
  if platform == "tpu":
    return "compact"  # provisional, not measured
  if batch_size <= 1:
    return "batch_cond"  # a single cond; every skipping strategy is this at B = 1.
  return "chunk"


def resolve_strategy(strategy: str, batch_size: int, platform: str | None = None) -> str:
  """Validates `strategy` and maps 'auto' to `default_strategy(platform or default backend, B)`."""
  if strategy not in STRATEGIES:
    raise ValueError(f"Unknown dispatch strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}.")
  if strategy == "auto":
    return default_strategy(platform or jax.default_backend(), batch_size)
  return strategy


def capacity_buckets(batch_size: int, buckets: int | Sequence[int] = 8,
                     spacing: str = "linear") -> tuple[int, ...]:
  """Static row capacities for 'compact', ascending, always ending with `batch_size`.

  Args:
    batch_size: B.
    buckets: number of buckets, or the capacities themselves (values above B are dropped, B added).
    spacing: 'linear' (ceil(B i / n), i = 1..n: the worst padding is B / n rows at any count) or
      'geometric' (B / sqrt(2)**j: the padding is at most ~41% of the count, finer at small counts).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
  if isinstance(buckets, int):
    if buckets < 1:
      raise ValueError(f"buckets must be >= 1; got {buckets}.")
    if spacing == "linear":
      caps = [math.ceil(batch_size * i / buckets) for i in range(1, buckets + 1)]
    elif spacing == "geometric":
      caps = [math.ceil(batch_size / math.sqrt(2) ** j) for j in range(buckets)]
    else:
      raise ValueError(f"spacing must be 'linear' or 'geometric'; got {spacing!r}.")
  else:
    caps = [int(c) for c in buckets]
  caps = sorted({c for c in caps if 1 <= c < batch_size} | {batch_size})
  return tuple(caps)


def _default_chunk(batch_size: int) -> int:
  """B / 8 rounded down to a power of two (at least 1): 32 rows at B = 256."""
  target = max(1, batch_size // 8)
  return 1 << (target.bit_length() - 1)


# ------------------------------------------------------------------------------------------------
# Pytree helpers (x, fallback and outputs may be arrays or pytrees of batch-leading arrays).
# ------------------------------------------------------------------------------------------------


def _tmap(f, *trees):
  return jax.tree_util.tree_map(f, *trees)


def _batch_size(tree: PyTree) -> int:
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError("x must contain at least one array.")
  sizes = {leaf.shape[0] if np.ndim(leaf) else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"every leaf of x must share the leading batch axis; got sizes {sizes}.")
  return sizes.pop()


def _bcast(mask_B: Array, leaf: Array) -> Array:
  return mask_B.reshape(mask_B.shape + (1,) * (leaf.ndim - 1))


def _where_rows(mask_B: Array, a: PyTree, b: PyTree) -> PyTree:
  return _tmap(lambda u, v: jnp.where(_bcast(mask_B, u), u, v.astype(u.dtype)), a, b)


def _gather_rows(tree: PyTree, idx_c: Array) -> PyTree:
  # Indices >= B read zero rows (padding past the end of the batch).
  return _tmap(lambda a: a.at[idx_c].get(mode="fill", fill_value=0), tree)


def _scatter_rows(carry: PyTree, idx_c: Array, rows: PyTree, combine: str) -> PyTree:
  # Indices >= B are dropped: padding rows are never written.
  if combine == "set":
    return _tmap(lambda a, r: a.at[idx_c].set(r.astype(a.dtype), mode="drop"), carry, rows)
  return _tmap(lambda a, r: a.at[idx_c].add(r.astype(a.dtype), mode="drop"), carry, rows)


def _row(tree: PyTree, i) -> PyTree:
  return _tmap(lambda a: a[i], tree)


def _one(tree: PyTree) -> PyTree:
  return _tmap(lambda a: a[None], tree)


def _unone(tree: PyTree) -> PyTree:
  return _tmap(lambda a: a[0], tree)


def _compact_order(mask_B: Array) -> tuple[Array, Array]:
  """Stable order with the selected rows first, then the unselected ones; and the count.

  A counting sort (two cumsums and one scatter), O(B), equal to `argsort(~mask, stable=True)`.
  """
  b = mask_B.shape[0]
  m = mask_B.astype(jnp.int32)
  count = jnp.sum(m)
  pos_sel = jnp.cumsum(m) - 1
  pos_uns = count + jnp.cumsum(1 - m) - 1
  pos = jnp.where(mask_B, pos_sel, pos_uns)
  order = jnp.zeros((b,), jnp.int32).at[pos].set(jnp.arange(b, dtype=jnp.int32),
                                                  unique_indices=True)
  return order, count


# ------------------------------------------------------------------------------------------------
# The routed-update core shared by 'compact' and 'chunk'.
#
# The carry holds the output being built (the fallback, x itself for the identity, or the running
# sum of a mixture). `put_rows(carry, idx_c, valid_c)` computes the function on rows idx_c (idx_c may
# hold B, a zero row past the end) and combines the valid ones into the carry at idx_c;
# `full(carry)` does the same for the whole batch (mask_B rows only), with no gather or scatter.
# ------------------------------------------------------------------------------------------------


def _tail_sizes(chunk: int, tail_levels: int) -> list[int]:
  """chunk/2, chunk/4, ... (tail_levels of them, stopping at odd sizes)."""
  tail, size = [], chunk
  for _ in range(max(0, int(tail_levels))):
    if size % 2:
      break
    size //= 2
    tail.append(size)
  return tail


def _core(carry, mask_B, put_rows, full, strategy, opts):
  b = mask_B.shape[0]
  order, count = _compact_order(mask_B)

  if strategy == "compact":
    caps = capacity_buckets(b, opts.get("buckets", 8), opts.get("spacing", "linear"))

    def make_branch(cap):
      def branch(carry):
        if cap == b:
          return full(carry)
        return put_rows(carry, order[:cap], jnp.arange(cap) < count)
      return branch

    # The smallest capacity >= count; branch 0 (count = 0) touches nothing.
    caps_arr = jnp.asarray((0,) + caps, jnp.int32)
    index = jnp.sum(caps_arr < count).astype(jnp.int32)
    branching = opts.get("branching", "switch")
    if branching == "switch":
      branches = [lambda carry: carry] + [make_branch(c) for c in caps]
      return lax.switch(index, branches, carry)
    if branching != "cond_chain":
      raise ValueError(f"branching must be 'switch' or 'cond_chain'; got {branching!r}.")
    # One two-way cond per bucket, at most one taken: XLA updates the carry in place in each,
    # where a switch with several updating branches gets a full-batch copy of the carry.
    for i, cap in enumerate(caps):
      carry = lax.cond(index == i + 1, make_branch(cap), lambda c: c, carry)
    return carry

  if strategy != "chunk":
    raise AssertionError(strategy)
  chunk = opts.get("chunk")
  chunk = _default_chunk(b) if chunk is None else int(chunk)
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1; got {chunk}.")
  chunk = min(chunk, b)
  tail = _tail_sizes(chunk, opts.get("tail_levels", 2))
  grain = tail[-1] if tail else chunk  # rows are processed in whole grains
  per_chunk = chunk // grain
  # Padding keeps every dynamic slice in bounds (a clamped slice would shift the rows).
  order_p = jnp.concatenate([order, jnp.full((chunk,), b, jnp.int32)])
  units = (count + grain - 1) // grain
  n_loop = units // per_chunk
  rem = units % per_chunk  # < per_chunk grains left for the tail, one cond per binary digit

  def process(carry, start, cap):
    idx = lax.dynamic_slice(order_p, (start,), (cap,))
    return put_rows(carry, idx, start + jnp.arange(cap) < count)

  # A dynamic trip count: this is a while loop, zero trips when nothing runs.
  carry = lax.fori_loop(0, n_loop, lambda i, c: process(c, i * chunk, chunk), carry)
  start = n_loop * chunk
  for cap in tail:
    take = (rem // (cap // grain)) % 2 == 1
    carry = lax.cond(take, lambda c, s=start, cap=cap: process(c, s, cap), lambda c: c, carry)
    start = start + jnp.where(take, cap, 0)
  return carry

_STRATEGY_OPTS = {
    "dense": (),
    "batch_cond": (),
    "per_example": (),
    "compact": ("buckets", "spacing", "branching"),
    "chunk": ("chunk", "tail_levels"),
}


def _split_opts(strategy: str, opts: dict) -> dict:
  """Keeps the options of `strategy`; unknown option names raise, other strategies' are ignored."""
  known = {name for names in _STRATEGY_OPTS.values() for name in names}
  unknown = set(opts) - known
  if unknown:
    raise TypeError(f"unknown dispatch option(s) {sorted(unknown)}; known: {sorted(known)}.")
  return {k: v for k, v in opts.items() if k in _STRATEGY_OPTS[strategy]}


# ------------------------------------------------------------------------------------------------
# Public API.
# ------------------------------------------------------------------------------------------------


def select_apply(fn: Callable[[PyTree], PyTree], x_B: PyTree, run_B: Array,
                 fallback_B: PyTree | None = None, *, strategy: str = "auto",
                 platform: str | None = None, **opts: Any) -> PyTree:
  """y[b] = fn(x)[b] where run[b], else fallback[b]; fn runs only on (a bucket/chunk of) run rows.

  Args:
    fn: maps a batch [n, ...] to [n, ...out] for any n, each output row depending only on its input
      row (inference-mode batch norm). A pytree in and out is allowed.
    x_B: [B, ...] input (array or pytree of arrays with the same leading B).
    run_B: [B] bool (or 0/1) routing decisions.
    fallback_B: [B, ...out] values for rows that do not run (e.g. a shortcut the caller computed
      densely), or None for the identity (then fn must keep x's shape); None and `x_B` itself enable
      the in-place update (module docstring).
    strategy: one of STRATEGIES.
    platform: platform for 'auto' (default: `jax.default_backend()`).
    **opts: 'compact': buckets (int or capacities, default 8), spacing ('linear' | 'geometric'),
      branching ('switch': one lax.switch, one predicate per site; 'cond_chain': one two-way
      lax.cond per bucket, which XLA updates in place: no full-batch copy per site);
      'chunk': chunk (rows, default B/8 rounded down to a power of two), tail_levels (default 2).
      Options of other strategies are ignored, unknown names raise TypeError.

  Returns:
    [B, ...out], fallback's structure.
  """
  b = _batch_size(x_B)
  strategy = resolve_strategy(strategy, b, platform)
  opts = _split_opts(strategy, opts)
  run_B = jnp.asarray(run_B).astype(bool).reshape(-1)
  if run_B.shape != (b,):
    raise ValueError(f"run_B must have shape ({b},); got {run_B.shape}.")
  identity = fallback_B is None or fallback_B is x_B
  fallback = x_B if identity else fallback_B

  if strategy == "dense":
    return _where_rows(run_B, fn(x_B), fallback)
  if b == 1:
    return lax.cond(run_B[0], fn, lambda _: fallback, x_B)
  if strategy == "batch_cond":
    return lax.cond(jnp.any(run_B), lambda: _where_rows(run_B, fn(x_B), fallback),
                    lambda: fallback)
  if strategy == "per_example":
    def one(args):
      xb, rb, fb = args
      return lax.cond(rb, lambda: _unone(fn(_one(xb))), lambda: fb)
    return lax.map(one, (x_B, run_B, fallback))

  if identity:
    # The carry is x itself: each selected row is read from the carry and overwritten with fn's row.
    # Rows are processed once each, so a row is never read after it was written.
    def put_rows(carry, idx, valid):
      rows = fn(_gather_rows(carry, idx))
      return _scatter_rows(carry, jnp.where(valid, idx, b), rows, "set")

    def full(carry):
      return _where_rows(run_B, fn(carry), carry)

    return _core(x_B, run_B, put_rows, full, strategy, opts)

  def put_rows_x(carry, idx, valid):
    rows = fn(_gather_rows(x_B, idx))
    return _scatter_rows(carry, jnp.where(valid, idx, b), rows, "set")

  def full_x(carry):
    return _where_rows(run_B, fn(x_B), carry)

  return _core(fallback, run_B, put_rows_x, full_x, strategy, opts)


def mix_branches(fns: Sequence[Callable[[PyTree], PyTree]], x_B: PyTree, weights_BxK: Array, *,
                 strategy: str = "auto", platform: str | None = None, **opts: Any) -> PyTree:
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
  b = _batch_size(x_B)
  k_count = len(fns)
  if k_count == 0:
    raise ValueError("fns must hold at least one function.")
  weights_BxK = jnp.asarray(weights_BxK)
  if weights_BxK.shape != (b, k_count):
    raise ValueError(f"weights_BxK must have shape ({b}, {k_count}); got {weights_BxK.shape}.")
  strategy = resolve_strategy(strategy, b, platform)
  opts = _split_opts(strategy, opts)
  run_BxK = weights_BxK > 0
  out_shape = jax.eval_shape(fns[0], x_B)
  for f in fns[1:]:
    other = jax.eval_shape(f, x_B)
    if jax.tree_util.tree_structure(other) != jax.tree_util.tree_structure(out_shape) or any(
        u.shape != v.shape for u, v in zip(jax.tree_util.tree_leaves(other),
                                           jax.tree_util.tree_leaves(out_shape))):
      raise ValueError(f"all fns must share the output shape; got {out_shape} and {other}.")
  zeros = _tmap(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)

  def weighted(rows, w_c):
    # where(w > 0, ...) keeps 0 * inf / nan of a skipped row out of the sum.
    return _tmap(lambda r: jnp.where(_bcast(w_c > 0, r), r * _bcast(w_c, r).astype(r.dtype), 0),
                 rows)

  def add(a, r):
    return _tmap(lambda u, v: u + v.astype(u.dtype), a, r)

  if strategy == "dense":
    acc = zeros
    for k, f in enumerate(fns):
      acc = add(acc, weighted(f(x_B), weights_BxK[:, k]))
    return acc
  if b == 1:
    acc = _tmap(lambda z: z[:1], zeros)
    for k, f in enumerate(fns):
      w = weights_BxK[:, k]
      acc = lax.cond(w[0] > 0, lambda a, f=f, w=w: add(a, weighted(f(x_B), w)), lambda a: a, acc)
    return acc
  if strategy == "batch_cond":
    acc = zeros
    for k, f in enumerate(fns):
      w = weights_BxK[:, k]
      acc = lax.cond(jnp.any(w > 0), lambda a, f=f, w=w: add(a, weighted(f(x_B), w)),
                     lambda a: a, acc)
    return acc
  if strategy == "per_example":
    def one(args):
      xb, wb = args
      acc = _unone(_tmap(lambda z: z[:1], zeros))
      for k, f in enumerate(fns):
        acc = lax.cond(wb[k] > 0, lambda a, f=f, k=k: add(a, _unone(weighted(f(_one(xb)),
                                                                            wb[k:k + 1]))),
                       lambda a: a, acc)
      return acc
    return lax.map(one, (x_B, weights_BxK))

  acc = zeros
  for k, f in enumerate(fns):
    w = weights_BxK[:, k]

    def put_rows(carry, idx, valid, f=f, w=w):
      rows = weighted(f(_gather_rows(x_B, idx)), w.at[idx].get(mode="fill", fill_value=0))
      return _scatter_rows(carry, jnp.where(valid, idx, b), rows, "add")

    def full(carry, f=f, w=w):
      return add(carry, weighted(f(x_B), w))

    acc = _core(acc, run_BxK[:, k], put_rows, full, strategy, opts)
  return acc
