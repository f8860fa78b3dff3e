"""DRNet's layers: the cell topology, the five branches, the RouterNet, the cell and the heads.

See `dynroute_jax.models.drnet` for the architecture and the readings of the paper; the model and
its config live there.

Shape letters: B batch; H, W, C a feature map; N classes; C_conn (C in names) connections per
cell; K branches.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynroute_jax import dispatch
from dynroute_jax import routing
from dynroute_jax.models import common
from dynroute_jax.models import ops

Array = jax.Array

BRANCHES = ("max_pool_3x3", "avg_pool_3x3", "sep_conv_3x3", "sep_conv_5x5", "skip_connect")
SKIP_INDEX = BRANCHES.index("skip_connect")
NUM_BRANCHES = len(BRANCHES)
AUX_CHANNELS = (128, 768)


# ------------------------------------------------------------------------------------------------
# Topology and branch definitions.
# ------------------------------------------------------------------------------------------------


def make_topology(seed: int, num_nodes: int = 4) -> tuple[tuple[int, int], ...]:
  """The cell topology: per node i = 2 .. N+1, (i - 1, r) with r in {0, 1} drawn from `seed`.

  Uses numpy's legacy RandomState, whose stream is fixed across numpy versions.
  """
  picks = np.random.RandomState(seed).randint(0, 2, size=num_nodes)
  return tuple((i + 1, int(picks[i])) for i in range(num_nodes))


def make_branch(kind: str, channels: int, stride: int, **kwargs: Any) -> nn.Module:
  """The module of branch `kind` for a connection with `channels` channels and `stride`."""
  if kind == "max_pool_3x3":
    return ops.MaxPool3x3(stride=stride, **kwargs)
  if kind == "avg_pool_3x3":
    return ops.AvgPool3x3(stride=stride, **kwargs)
  if kind == "sep_conv_3x3":
    return ops.SepConv(channels, 3, stride, **kwargs)
  if kind == "sep_conv_5x5":
    return ops.SepConv(channels, 5, stride, **kwargs)
  if kind == "skip_connect":
    return ops.Identity(**kwargs) if stride == 1 else ops.FactorizedReduce(channels, **kwargs)
  raise ValueError(f"Unknown branch {kind!r}; allowed: {BRANCHES}.")


def make_preprocess(channels: int, reduce: bool, **kwargs: Any) -> nn.Module:
  """Cell input preprocessing: FactorizedReduce (halves resolution) or ReLU-conv1x1-BN."""
  if reduce:
    return ops.FactorizedReduce(channels, **kwargs)
  return ops.ReLUConvBN(channels, 1, 1, **kwargs)


# ------------------------------------------------------------------------------------------------
# Sub-modules.
# ------------------------------------------------------------------------------------------------


class Stem(nn.Module):
  """CIFAR stem (x0 = x1 = conv3x3-BN) or DARTS ImageNet stems (x0 at 1/4, x1 at 1/8)."""
  kind: str
  channels: int
  multiplier: int = 3

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
    if self.kind == "cifar":
      s = ops.conv(self.multiplier * self.channels, 3)(x)
      s = ops.batch_norm(train)(s)
      return s, s
    c = self.channels
    s0 = ops.conv(c // 2, 3, 2)(x)
    s0 = ops.batch_norm(train)(s0)
    s0 = nn.relu(s0)
    s0 = ops.conv(c, 3, 2)(s0)
    s0 = ops.batch_norm(train)(s0)
    s1 = nn.relu(s0)
    s1 = ops.conv(c, 3, 2)(s1)
    s1 = ops.batch_norm(train)(s1)
    return s0, s1


class RouterNet(nn.Module):
  """Two separable blocks (pointwise -> width, depthwise 5x5/2), global pool, dense -> [B, C, K]."""
  width: int
  num_connections: int
  num_branches: int = NUM_BRANCHES

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    for _ in range(2):
      x = ops.conv(self.width, 1)(x)
      x = nn.relu(ops.batch_norm(train)(x))
      x = ops.conv(self.width, 5, 2, groups=self.width)(x)
      x = nn.relu(ops.batch_norm(train)(x))
    x = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_connections * self.num_branches)(x)
    return logits.reshape(x.shape[0], self.num_connections, self.num_branches)


class FixedRouter(nn.Module):
  """"w/o RouterNet" ablation: one learned logit vector per connection, for every example."""
  num_connections: int
  num_branches: int = NUM_BRANCHES

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    del train
    logits = self.param("logits", nn.initializers.normal(1e-3),
                        (self.num_connections, self.num_branches))
    return jnp.broadcast_to(logits, (x.shape[0],) + logits.shape)


class AuxHead(nn.Module):
  """DARTS auxiliary head (see the module docstring for the small-map generalisation)."""
  num_classes: int
  pool_stride: int = 3

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    x = nn.relu(x)
    win = (min(5, x.shape[1]), min(5, x.shape[2]))
    x = nn.avg_pool(x, win, strides=(self.pool_stride, self.pool_stride), padding="VALID")
    x = nn.Conv(AUX_CHANNELS[0], (1, 1), use_bias=False)(x)
    x = nn.relu(ops.batch_norm(train)(x))
    x = nn.Conv(AUX_CHANNELS[1], (x.shape[1], x.shape[2]), padding="VALID", use_bias=False)(x)
    x = nn.relu(ops.batch_norm(train)(x))
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


Classifier = common.Classifier  # global average pool, dense -> classes.


def drop_branch(key: Array, weights: Array, rate: float) -> Array:
  """Drops each non-skip branch with probability `rate`; renormalises the survivors' weights."""
  keep = jax.random.bernoulli(key, 1.0 - rate, weights.shape)
  keep = keep.at[..., SKIP_INDEX].set(True)
  kept = jnp.where(keep, weights, 0.0)
  total = jnp.sum(kept, axis=-1, keepdims=True)
  return jnp.where(total > 0, kept / jnp.maximum(total, jnp.finfo(kept.dtype).tiny), weights)


class Connection(nn.Module):
  """One connection: K branch submodules (named as in `BRANCHES`), mixed by per-example weights."""
  channels: int
  stride: int = 1

  def setup(self):
    for kind in BRANCHES:
      setattr(self, kind, make_branch(kind, self.channels, self.stride))

  @property
  def branches(self) -> tuple[nn.Module, ...]:
    return tuple(getattr(self, kind) for kind in BRANCHES)

  def __call__(self, x: Array, weights: Array, mask: Array | None = None, *, train: bool,
               drop_path_rate: float | Array = 0.0,
               strategy: dispatch.StrategySpec = "dense") -> Array:
    """weights: [B, K]; mask: [B, K] bool (threshold mode) or None (every branch runs)."""
    if (dispatch.make_strategy(strategy).name != "dense" and mask is not None and not train
        and not self.is_initializing()):
      return self._dispatch(x, weights, mask, strategy)
    out = None
    for b, branch in enumerate(self.branches):
      h = branch(x, train=train)
      if (train and not isinstance(branch, ops.Identity)
          and not (isinstance(drop_path_rate, (int, float)) and drop_path_rate == 0)):
        h = ops.drop_path(h, drop_path_rate, self.make_rng("dropout"))
      term = weights[:, b, None, None, None].astype(h.dtype) * h
      if mask is not None:
        term = jnp.where(mask[:, b, None, None, None], term, jnp.zeros((), h.dtype))
      out = term if out is None else out + term
    return out

  def _dispatch(self, x: Array, weights: Array, mask: Array,
                strategy: dispatch.StrategySpec) -> Array:
    """Runs each branch only on the examples that kept it (`dispatch.mix_branches`)."""
    fns = [common.pure_fn(branch) for branch in self.branches]
    w = jnp.where(mask, weights, 0.0)
    return dispatch.mix_branches(fns, x, w, strategy=strategy)


class Cell(nn.Module):
  """A DRNet cell with its RouterNet. Returns (output, weights [B,C,K], executed [B,C,K])."""
  channels: int
  reduction: bool
  topology: tuple[tuple[int, int], ...]
  use_router: bool = True
  gumbel: bool = True
  drop_branch_rate: float = 0.0
  router_width: int = 0
  router_input: str = "raw"

  @nn.compact
  def __call__(self, s0: Array, s1: Array, *, train: bool, tau: float | Array,
               threshold: float | Array | None, drop_path_rate: float | Array,
               strategy: dispatch.StrategySpec, router_override: Array | None = None
               ) -> tuple[Array, Array, Array, Array]:
    ratio = s0.shape[1] // s1.shape[1]
    p0 = make_preprocess(self.channels, ratio == 2, name="preprocess0")(s0, train=train)
    p1 = make_preprocess(self.channels, False, name="preprocess1")(s1, train=train)
    num_conn = 2 * len(self.topology)

    if self.use_router:
      r_in = router_input(s0, s1, p0, p1, self.router_input)
      logits = RouterNet(self.router_width, num_conn, name="router")(r_in, train=train)
    else:
      logits = FixedRouter(num_conn, name="router")(s1, train=train)

    mask = None
    clean = routing.gumbel_softmax(None, logits, tau)  # noise-free router output [B, C, K].
    if train:
      key = self.make_rng("routing") if self.gumbel else None
      weights = routing.gumbel_softmax(key, logits, tau)
      mix = weights
      if self.drop_branch_rate > 0:
        mix = drop_branch(self.make_rng("dropout"), weights, self.drop_branch_rate)
      executed = jnp.ones_like(weights)
    else:
      weights = clean
      if router_override is not None:  # the static counterpart: one weight table for every input.
        weights = jnp.broadcast_to(router_override.astype(clean.dtype), clean.shape)
      if threshold is None:
        executed = jnp.ones_like(weights)
      else:
        mask, weights = routing.threshold_select(weights, threshold)
        executed = mask.astype(weights.dtype)
      mix = weights

    states = [p0, p1]
    for node, (prev, rand) in enumerate(self.topology):
      total = None
      for j, src in enumerate((prev, rand)):
        c = 2 * node + j
        stride = 2 if self.reduction and src < 2 else 1
        y = Connection(self.channels, stride, name=f"conn_{c}")(
            states[src], mix[:, c], None if mask is None else mask[:, c], train=train,
            drop_path_rate=drop_path_rate, strategy=strategy)
        total = y if total is None else total + y
      states.append(total)
    return jnp.concatenate(states[2:], axis=-1), weights, executed, clean


def router_input(s0: Array, s1: Array, p0: Array, p1: Array, kind: str) -> Array:
  """The RouterNet's input: raw x0 (pooled to x1's resolution) and x1, or the preprocessed pair."""
  if kind == "preprocessed":
    return jnp.concatenate([p0, p1], axis=-1)
  ratio = s0.shape[1] // s1.shape[1]
  if ratio > 1:
    s0 = nn.avg_pool(s0, (ratio, ratio), strides=(ratio, ratio), padding="VALID")
  return jnp.concatenate([s0, s1], axis=-1)
