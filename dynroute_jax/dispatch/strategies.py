"""Dispatch strategies: frozen dataclasses holding their options, one primitive each.

A strategy executes a `RoutedCall`: an output carry and the sites that update it in order, each site
a function that needs only the rows its mask selects. `Strategy.apply(call)` is the one primitive;
`select_apply` (one site) and `mix_branches` (one site per branch) build the calls. The module
docstring of `dynroute_jax.dispatch` describes what each strategy compiles to and when it pays.

Shape letters:
  B: batch (examples), the leading axis of every array of a call.
  c: rows fed to a function in one go (a capacity bucket or a chunk), c <= B.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Callable, ClassVar, Iterable, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
from jax import lax

from dynroute_jax.dispatch import rows

Array = jax.Array
PyTree = Any

# Provisional GPU threshold (not measured, see the `dynroute_jax.dispatch` docstring).
GPU_DENSE_BELOW = 64
SPACINGS = ("linear", "geometric")
BRANCHINGS = ("switch", "cond_chain")


# ------------------------------------------------------------------------------------------------
# What a strategy executes.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Site:
  """One routed function of a call, in the three forms the strategies run it.

  Attributes:
    mask_B: [B] bool, the rows that need the function.
    masked: carry -> carry; runs the function on the whole batch and writes the mask rows only.
    some_rows: (carry, idx_c, valid_c) -> carry; runs it on rows idx_c (each in [0, B): padding
      slots point at unselected rows) and writes the valid ones back at idx_c, in place.
    every_row: carry -> carry; runs it on the whole batch and writes every row, with no mask: for a
      batch of one example that a `lax.cond` already found selected.
  """
  mask_B: Array
  masked: Callable[[PyTree], PyTree]
  some_rows: Callable[[PyTree, Array, Array], PyTree]
  every_row: Callable[[PyTree], PyTree]


@dataclasses.dataclass(frozen=True)
class RoutedCall:
  """An output carry and the sites that update it, in order: what `Strategy.apply` executes.

  The sites are built from `data_B` rather than closed over, so that 'per_example' can build them
  again from one example's rows under `lax.map`.

  Attributes:
    data_B: every batch-leading array (a pytree) the sites read: inputs, fallback, weights, masks.
    init: data -> the carry before any site runs (the fallback, x itself, or zeros).
    make_sites: data -> the sites in order; a generator, so that each site's slices are traced just
      before the strategy runs that site.
  """
  data_B: PyTree
  init: Callable[[PyTree], PyTree]
  make_sites: Callable[[PyTree], Iterable[Site]]

  @property
  def batch_size(self) -> int:
    return rows.leading_size(self.data_B)

  def on(self, data_B: PyTree) -> RoutedCall:
    """The same call on other rows (one example's, for 'per_example')."""
    return dataclasses.replace(self, data_B=data_B)


# ------------------------------------------------------------------------------------------------
# The protocol and the strategies.
# ------------------------------------------------------------------------------------------------


@runtime_checkable
class Strategy(Protocol):
  """How the rows that need a function are fed to it; `name` is the config / keyword spelling."""

  name: ClassVar[str]

  def resolve(self, batch_size: int, platform: str | None = None) -> Strategy:
    """The concrete strategy that runs at `batch_size`: itself, except for `Auto`."""
    del batch_size, platform
    return self

  def apply(self, call: RoutedCall) -> PyTree:
    """`call.init(data)` updated by every site on the rows of its mask."""
    ...


def _one_example(call: RoutedCall) -> PyTree:
  """Batch size 1: one `lax.cond` per site on the example's decision (every skipping strategy)."""
  carry = call.init(call.data_B)
  for site in call.make_sites(call.data_B):
    carry = lax.cond(site.mask_B[0], site.every_row, lambda c: c, carry)
  return carry


@dataclasses.dataclass(frozen=True)
class Dense(Strategy):
  """Every function on the whole batch, then masked. The reference; skips nothing."""

  name: ClassVar[str] = "dense"

  def apply(self, call: RoutedCall) -> PyTree:
    carry = call.init(call.data_B)
    for site in call.make_sites(call.data_B):
      carry = site.masked(carry)
    return carry


@dataclasses.dataclass(frozen=True)
class BatchCond(Strategy):
  """One `lax.cond` per function: it runs on the whole batch iff any example needs it."""

  name: ClassVar[str] = "batch_cond"

  def apply(self, call: RoutedCall) -> PyTree:
    if call.batch_size == 1:
      return _one_example(call)
    carry = call.init(call.data_B)
    for site in call.make_sites(call.data_B):
      carry = lax.cond(jnp.any(site.mask_B), site.masked, lambda c: c, carry)
    return carry


@dataclasses.dataclass(frozen=True)
class PerExample(Strategy):
  """`lax.map` over the examples of the batch-of-one path: a `lax.cond` per example and function.

  Never `vmap` a cond instead: under `vmap` it becomes a `select` and computes every branch for
  every example.
  """

  name: ClassVar[str] = "per_example"

  def apply(self, call: RoutedCall) -> PyTree:
    if call.batch_size == 1:
      return _one_example(call)

    def one(example):
      return rows.drop_batch_axis(_one_example(call.on(rows.add_batch_axis(example))))

    return lax.map(one, call.data_B)


class _Compacting(Strategy):
  """Runs each site on its selected rows moved to the front (`rows.compact_order`)."""

  def apply(self, call: RoutedCall) -> PyTree:
    if call.batch_size == 1:
      return _one_example(call)
    carry = call.init(call.data_B)
    for site in call.make_sites(call.data_B):
      order_B, count = rows.compact_order(site.mask_B)
      carry = self.update(carry, site, order_B, count)
    return carry

  def update(self, carry: PyTree, site: Site, order_B: Array, count: Array) -> PyTree:
    """The carry with `site` run on the rows order_B[:count]."""
    raise NotImplementedError


def _check_int(value: Any, field: str, lo: int, allow_none: bool = False) -> int | None:
  """`value` as an int >= lo (None too if `allow_none`); a ValueError naming `field` otherwise."""
  if value is None and allow_none:
    return None
  try:
    if isinstance(value, bool):
      raise TypeError
    value = operator.index(value)
  except TypeError:
    allowed = f"an int >= {lo}" + (" or None" if allow_none else "")
    raise ValueError(f"{field} must be {allowed}; got {value!r}.") from None
  if value < lo:
    raise ValueError(f"{field} must be >= {lo}; got {value}.")
  return value


@dataclasses.dataclass(frozen=True)
class Compact(_Compacting):
  """A `lax.switch` over static capacity buckets: the smallest bucket >= the count runs.

  That bucket's branch gathers the first c compacted rows, runs the function on c rows and scatters
  the valid results back in place. Count 0 is its own branch that touches nothing; the full bucket
  (c = B) runs on the batch as is and masks, with no gather or scatter.

  Attributes:
    buckets: the number of buckets, or the capacities themselves (`capacity_buckets`).
    spacing: 'linear' or 'geometric' capacities (`capacity_buckets`).
    branching: 'switch' (one `lax.switch`: one predicate per site) or 'cond_chain' (one two-way
      `lax.cond` per bucket). XLA (CPU, 0.10) copies the carry once per site when several switch
      branches update it, a full-batch memory pass; the chain is updated in place.
  """

  name: ClassVar[str] = "compact"
  buckets: int | tuple[int, ...] = 8
  spacing: str = "linear"
  branching: str = "switch"

  def __post_init__(self):
    if isinstance(self.buckets, Sequence) and not isinstance(self.buckets, str):
      object.__setattr__(self, "buckets",
                         tuple(_check_int(c, "buckets", 1) for c in self.buckets))
    else:
      object.__setattr__(self, "buckets", _check_int(self.buckets, "buckets", 1))
    if self.spacing not in SPACINGS:
      raise ValueError(f"spacing must be 'linear' or 'geometric'; got {self.spacing!r}.")
    if self.branching not in BRANCHINGS:
      raise ValueError(f"branching must be 'switch' or 'cond_chain'; got {self.branching!r}.")

  def update(self, carry: PyTree, site: Site, order_B: Array, count: Array) -> PyTree:
    b = order_B.shape[0]
    caps = capacity_buckets(b, self.buckets, self.spacing)

    def make_branch(cap):
      def branch(carry):
        if cap == b:
          return site.masked(carry)
        return site.some_rows(carry, order_B[:cap], jnp.arange(cap) < count)
      return branch

    # The smallest capacity >= count; branch 0 (count = 0) touches nothing.
    caps_arr = jnp.asarray((0,) + caps, jnp.int32)
    index = jnp.sum(caps_arr < count).astype(jnp.int32)
    if self.branching == "switch":
      branches = [lambda carry: carry] + [make_branch(c) for c in caps]
      return lax.switch(index, branches, carry)
    # One two-way cond per bucket, at most one taken: XLA updates the carry in place in each,
    # where a switch with several updating branches gets a full-batch copy of the carry.
    for i, cap in enumerate(caps):
      carry = lax.cond(index == i + 1, make_branch(cap), lambda c: c, carry)
    return carry


@dataclasses.dataclass(frozen=True)
class Chunk(_Compacting):
  """A `while_loop` over the compacted rows in whole chunks, then a shorter loop over the rest.

  The rest (fewer than `chunk` rows) runs in grains of chunk / 2**tail_levels rows, so at most
  chunk / 2**tail_levels - 1 padding rows are computed per site. The tail is a second `while_loop`
  of at most 2**tail_levels - 1 trips, so each site holds two compiled copies of its function
  (the chunk and the grain) whatever `tail_levels` is, besides the full-batch one below. A tail
  of one `lax.cond` per halving (chunk/2, chunk/4, ...) held a copy per cond: DRNet S at batch 32
  compiled in 48.7 s with those conds, 36.1 s with the loop, at the same speed (skipping
  efficiency 0.88 and 0.89, CPU).
  Results are scattered into the carry in place; with zero selected rows the loops run zero
  times and nothing is written. With every row selected, a `lax.cond` runs the function on the
  batch as it is instead (no gather, scatter or loop: routed ResNet-110, CPU, every block
  selected, 1.30x dense time at batch 32 before, 1.06x after).

  Attributes:
    chunk: rows per loop trip; None: B/8 rounded down to a power of two (32 rows at B = 256).
      Capped at B.
    tail_levels: halvings of the chunk that give the tail's grain (stopping early at an odd
      size); 0 or less: no tail, whole chunks only.
  """

  name: ClassVar[str] = "chunk"
  chunk: int | None = None
  tail_levels: int = 2

  def __post_init__(self):
    object.__setattr__(self, "chunk", _check_int(self.chunk, "chunk", 1, allow_none=True))
    try:
      object.__setattr__(self, "tail_levels", operator.index(self.tail_levels))
    except TypeError:
      raise ValueError(f"tail_levels must be an int; got {self.tail_levels!r}.") from None

  def update(self, carry: PyTree, site: Site, order_B: Array, count: Array) -> PyTree:
    b = order_B.shape[0]
    # Every row selected: run on the batch as it is, with no gather, scatter or loop, and leave
    # nothing to the chunks. (Two conds with one updating branch each, not one cond with two:
    # XLA updates the carry in place only in the former.)
    full = count == b
    carry = lax.cond(full, site.every_row, lambda c: c, carry)
    return self._chunks(carry, site, order_B, jnp.where(full, 0, count))

  def _chunks(self, carry: PyTree, site: Site, order_B: Array, count: Array) -> PyTree:
    """The carry with `site` run on the rows order_B[:count], chunk by chunk."""
    b = order_B.shape[0]
    chunk = min(_default_chunk(b) if self.chunk is None else self.chunk, b)
    grain = _grain(chunk, self.tail_levels)  # rows are processed in whole grains
    per_chunk = chunk // grain
    # Padding keeps every dynamic slice in bounds (a clamped slice would shift the rows). It
    # repeats the last row of the order, an unselected one (count < b here), so that every
    # gathered index is a real row and the gather needs no zero fill.
    order_p = jnp.concatenate([order_B, jnp.broadcast_to(order_B[-1], (chunk,))])
    units = (count + grain - 1) // grain
    n_loop = units // per_chunk
    rem = units % per_chunk  # < per_chunk grains left for the tail

    def process(carry, start, cap):
      idx_c = lax.dynamic_slice(order_p, (start,), (cap,))
      return site.some_rows(carry, idx_c, start + jnp.arange(cap) < count)

    # Dynamic trip counts: these are while loops, zero trips when nothing runs.
    carry = lax.fori_loop(0, n_loop, lambda i, c: process(c, i * chunk, chunk), carry)
    if per_chunk > 1:
      start = n_loop * chunk
      carry = lax.fori_loop(0, rem, lambda i, c: process(c, start + i * grain, grain), carry)
    return carry


@dataclasses.dataclass(frozen=True)
class Auto(Strategy):
  """`default_strategy(platform, B)`, with the options of the two strategies that have any.

  Attributes:
    compact: what runs when 'compact' is picked.
    chunk: what runs when 'chunk' is picked.
  """

  name: ClassVar[str] = "auto"
  compact: Compact = Compact()
  chunk: Chunk = Chunk()

  def __post_init__(self):
    for field, cls in (("compact", Compact), ("chunk", Chunk)):
      if not isinstance(getattr(self, field), cls):
        raise ValueError(f"Auto.{field} must be a {cls.__name__}; got {getattr(self, field)!r}.")

  def resolve(self, batch_size: int, platform: str | None = None) -> Strategy:
    picked = default_strategy(platform or jax.default_backend(), batch_size)
    candidates = (Dense(), BatchCond(), PerExample(), self.compact, self.chunk)
    return next(s for s in candidates if s.name == picked)

  def apply(self, call: RoutedCall) -> PyTree:
    return self.resolve(call.batch_size).apply(call)


# The strategies in their documented order; `name` is how configs and keywords spell them.
CLASSES: tuple[type[Strategy], ...] = (Auto, Dense, BatchCond, PerExample, Compact, Chunk)


# ------------------------------------------------------------------------------------------------
# Platform defaults and static sizes.
# ------------------------------------------------------------------------------------------------


def default_strategy(platform: str, batch_size: int) -> str:
  """The strategy 'auto' resolves to on `platform` ('cpu', 'gpu', 'tpu', ...) at `batch_size`.

  See the `dynroute_jax.dispatch` docstring for the reasoning; only the CPU choice is measured.
  """
  platform = platform.lower()
  if platform in ("gpu", "cuda", "rocm"):
    return "dense" if batch_size < GPU_DENSE_BELOW else "compact"  # provisional, not measured
  if platform == "tpu":
    return "compact"  # provisional, not measured
  if batch_size <= 1:
    return "batch_cond"  # a single cond; every skipping strategy is this at B = 1.
  return "chunk"


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


def _grain(chunk: int, tail_levels: int) -> int:
  """chunk halved tail_levels times (stopping at an odd size): the tail's rows per trip."""
  for _ in range(max(0, tail_levels)):
    if chunk % 2:
      break
    chunk //= 2
  return chunk
