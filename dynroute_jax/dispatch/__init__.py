"""The dispatcher: run only the branches / blocks each example selected, under `jax.jit`.

Routed models hand this package *pure functions* of a batch (a Flax block bound to its variables with
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
  STRATEGIES, check_name(name, field)                         the strategy names
  Strategy, Dense, BatchCond, PerExample, Compact, Chunk, Auto  the strategies (frozen dataclasses)
  make_strategy(spec, **options), from_config(mapping)        a strategy from a name or a mapping
  describe(spec), option_defaults()                           its name and options as text; defaults
  resolve(spec, B) / resolve_strategy(spec, B)                'auto' resolved: the object / its name
  default_strategy(platform, batch_size), capacity_buckets(batch_size, buckets)

`strategy` is a name with keyword options (`strategy="chunk", chunk=64`), a mapping
(`dict(name="chunk", chunk=64)`) or an object (`Chunk(chunk=64)`). A config names it in
`config.eval.strategy` and gives the options in `config.eval.dispatch` (`config_lib.eval_strategy`).

Modules: `strategies` (the protocol, the dataclasses, platform defaults), `factory` (names, options
and configs to objects), `apply` (the front-ends above), `rows` (row-wise pytree operations).

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
                 then a second loop over the rest in grains of chunk / 2**tail_levels rows, so at
                 most chunk / 2**tail_levels - 1 padding rows are computed per site, and each site
                 compiles two copies of its function (three with the full-batch one). Results are
                 scattered into the output carry in place; with zero selected rows the loop runs
                 zero times and nothing is written; with every row selected, one cond runs the
                 function on the batch as it is.
  'auto'         `default_strategy(jax.default_backend(), B)`.

Batch size 1: every strategy but 'dense' becomes a single `lax.cond` on the one example.

Padding rows (bucket or chunk rows beyond the count) are *unselected* rows of the batch: the first
ones, then the last one again where a chunk runs past the end of the batch. Their results are
dropped by the scatter (mode='drop'), never written.

In-place updates. `select_apply` with `fallback_B=None` (or `fallback_B is x_B`) means "identity": the
output carry starts as `x` itself and each selected row is read from the carry and overwritten by
`fn`'s result, so when `x` is dead after the call (a residual stack inside `lax.scan`) XLA reuses its
buffer and no full-batch copy or select pass is made. A caller-computed fallback (e.g. a stride-2
shortcut) is used as the carry the same way.

Platform defaults (`default_strategy`):
  cpu  measured (bench/dispatch.py, bench/RESULTS.md): 'chunk' for B > 1; B = 1 is a single cond.
       Small chunks cost most where XLA:CPU convolves with Eigen (convolutions with at most 16
       channels: YNNPACK takes only wider ones), which gains little from a second core below about
       16 rows. At B = 32 'compact' with 16 buckets and `branching='cond_chain'` was 7-8% faster
       on the CIFAR ResNets (ResNet-110 on every site, ResNet-74 on its 16-channel sites),
       compiling 1.7x longer; at B = 256 it was slower.
  tpu  conditionals and loop predicates are evaluated on the device: 'compact' (big static shapes suit
       the matrix unit). NOT measured yet.
  gpu  NOT measured yet, provisional. Each conditional or while-loop predicate makes the host wait for
       the device (~10-50 us per routed site and per loop trip), so per-example execution is hopeless
       and fewer predicates per site is better: 'compact' has one predicate per site, 'chunk' one per
       chunk. At small batch the device is not saturated and skipping rows saves little, so dense
       masking may win: provisional default 'dense' for B < 64, 'compact' from 64 up. Measure before
       trusting this (bench/dispatch.py runs on any backend).
"""

from dynroute_jax.dispatch.apply import mix_branches
from dynroute_jax.dispatch.apply import select_apply
from dynroute_jax.dispatch.factory import check_name
from dynroute_jax.dispatch.factory import describe
from dynroute_jax.dispatch.factory import from_config
from dynroute_jax.dispatch.factory import make_strategy
from dynroute_jax.dispatch.factory import option_defaults
from dynroute_jax.dispatch.factory import resolve
from dynroute_jax.dispatch.factory import resolve_strategy
from dynroute_jax.dispatch.factory import STRATEGIES
from dynroute_jax.dispatch.factory import StrategySpec
from dynroute_jax.dispatch.strategies import Auto
from dynroute_jax.dispatch.strategies import BatchCond
from dynroute_jax.dispatch.strategies import capacity_buckets
from dynroute_jax.dispatch.strategies import Chunk
from dynroute_jax.dispatch.strategies import Compact
from dynroute_jax.dispatch.strategies import default_strategy
from dynroute_jax.dispatch.strategies import Dense
from dynroute_jax.dispatch.strategies import GPU_DENSE_BELOW
from dynroute_jax.dispatch.strategies import PerExample
from dynroute_jax.dispatch.strategies import RoutedCall
from dynroute_jax.dispatch.strategies import Site
from dynroute_jax.dispatch.strategies import Strategy

__all__ = [
    "Auto", "BatchCond", "Chunk", "Compact", "Dense", "GPU_DENSE_BELOW", "PerExample",
    "RoutedCall", "STRATEGIES", "Site", "Strategy", "StrategySpec", "capacity_buckets",
    "check_name", "default_strategy", "describe", "from_config", "make_strategy", "mix_branches",
    "option_defaults", "resolve", "resolve_strategy", "select_apply",
]
