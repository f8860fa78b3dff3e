"""CoDiNet's layers: residual bodies, shortcuts, the router, stem, head and the routed block.

See `dynroute_jax.models.codinet` for the routing semantics and the readings of the paper; the
model and its config live there.

Shape letters: B batch; H, W, C a feature map; N classes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynroute_jax import dispatch
from dynroute_jax import routing
from dynroute_jax.models import common
from dynroute_jax.models import ops

Array = jax.Array


# ------------------------------------------------------------------------------------------------
# Layers.
# ------------------------------------------------------------------------------------------------


def _conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
  # Kaiming-normal kernels, as the reference PyTorch ResNets.
  return common.conv(features, kernel, stride, name=name, kernel_init=common.KAIMING_NORMAL)


class BasicBody(nn.Module):
  """Residual branch of a basic block: conv3x3(stride)-BN-ReLU-conv3x3-BN (no shortcut, no ReLU)."""
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    y = _conv(self.features, 3, self.stride, "conv1")(x)
    y = nn.relu(common.batch_norm(train, "bn1")(y))
    y = _conv(self.features, 3, 1, "conv2")(y)
    return common.batch_norm(train, "bn2")(y)


class BottleneckBody(nn.Module):
  """Residual branch of a bottleneck block (ResNet v1.5: the stride is on the 3x3 conv)."""
  features: int  # inner width; output = 4 x features.
  stride: int = 1

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    y = nn.relu(common.batch_norm(train, "bn1")(_conv(self.features, 1, 1, "conv1")(x)))
    y = nn.relu(common.batch_norm(train, "bn2")(_conv(self.features, 3, self.stride, "conv2")(y)))
    return common.batch_norm(train, "bn3")(_conv(4 * self.features, 1, 1, "conv3")(y))


class Projection(nn.Module):
  """1x1 conv (stride) + BN: the projection shortcut of ImageNet ResNets; with `relu`, the official
  CoDiNet code's learned skip path."""
  features: int
  stride: int = 1
  relu: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    y = common.batch_norm(train, "bn")(_conv(self.features, 1, self.stride, "conv")(x))
    return nn.relu(y) if self.relu else y


def option_a_shortcut(x: Array, features: int, stride: int) -> Array:
  """Parameter-free CIFAR ResNet shortcut: subsample by `stride`, zero-pad channels to `features`.
  """
  if stride > 1:
    x = x[:, ::stride, ::stride, :]
  extra = features - x.shape[-1]
  if extra > 0:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  return x


class Router(nn.Module):
  """CoDiNet router (Eq. 3-4): GAP, Dense(d), sigma, Dense(2) logits (index 1 = run)."""
  hidden: int
  activation: str = "relu"

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    del train  # no batch norm; the argument makes it measurable like every other part.
    z = jnp.mean(x, axis=(1, 2))
    h = nn.Dense(self.hidden, kernel_init=common.KAIMING_NORMAL, name="fc1")(z)
    if self.activation == "relu":
      h = nn.relu(h)
    return nn.Dense(2, name="fc2")(h).astype(jnp.float32)


class Stem(nn.Module):
  """conv3x3-BN-ReLU (CIFAR) or conv7x7/2-BN-ReLU-maxpool3x3/2 (ImageNet)."""
  features: int
  imagenet: bool

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.imagenet:
      y = nn.relu(common.batch_norm(train, "bn")(_conv(self.features, 7, 2, "conv")(x)))
      return nn.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return nn.relu(common.batch_norm(train, "bn")(_conv(self.features, 3, 1, "conv")(x)))


class Head(common.Classifier):
  """Global average pool and the linear classifier (parameters under 'fc')."""
  dense_name: str | None = "fc"


# ------------------------------------------------------------------------------------------------
# Routed block.
# ------------------------------------------------------------------------------------------------


def _shortcut(kind: str, x: Array, features: int, stride: int,
              projection: Callable[[Array], Array] | None) -> Array:
  """The block's own shortcut: identity, option A, or the `projection` submodule."""
  if kind == "identity":
    return x
  if kind == "option_a":
    return option_a_shortcut(x, features, stride)
  return projection(x)


class RoutedBlock(nn.Module):
  """One residual block with its router. Returns (output, (path v, weight, executed, clean)).

  Each of the four is [B]. Static mode flags are attributes (so the block can sit under
  nn.scan); `tau` and `threshold` are call arguments (traced values allowed).
  """
  bottleneck: bool
  features: int
  out_features: int
  stride: int
  router_hidden: int
  router_activation: str
  shortcut: str
  skip: str
  train: bool
  hard: bool
  thresholded: bool
  drop_path: bool = False  # training only; the rate is a call argument (may be traced).
  strategy: dispatch.StrategySpec = "dense"  # `common.resolve_strategy`'s object, in a model.
  overridden: bool = False  # inference: v is the call's `v_override` (the static counterpart).

  def _decisions(self, logits_Bx2: Array, tau: Array, threshold: Array,
                 v_override: Array | float) -> tuple[Array, Array, Array, Array]:
    """(v, weight, executed, clean) of the call's mode (see the module docstring), each [B]."""
    clean = routing.relaxed_decision(None, logits_Bx2, tau)  # noise-free run probability.
    if self.train and not self.hard:
      v = routing.relaxed_decision(self.make_rng("routing"), logits_Bx2, tau)
      return v, v, jnp.ones_like(v), clean
    v = clean
    if self.overridden and not self.train:
      v = jnp.broadcast_to(jnp.asarray(v_override, clean.dtype), clean.shape)
    u = routing.hard_decision(v, threshold)
    if self.train:  # stage-2 fine-tuning: hard decisions, straight-through gradient.
      return v, routing.straight_through(u, v), u.astype(v.dtype), clean
    weight = u.astype(v.dtype)
    return v, weight, (weight if self.thresholded else jnp.ones_like(v)), clean

  def _dispatched(self, x: Array, executed: Array, body: nn.Module,
                  projection: nn.Module | None, skip: nn.Module | None) -> Array:
    """Inference with a threshold: run the block only where `executed` (dispatch strategy)."""
    body_fn = common.pure_fn(body)
    projection_fn = None if projection is None else common.pure_fn(projection)

    def shortcut(xs):
      return _shortcut(self.shortcut, xs, self.out_features, self.stride, projection_fn)

    def run(xs):
      return nn.relu(body_fn(xs) + shortcut(xs))

    if self.skip == "identity":
      return dispatch.select_apply(run, x, executed, None, strategy=self.strategy)
    if self.skip == "shortcut":
      # The shortcut is needed by every row (run rows add it, skipped rows are it): compute it once.
      sc = shortcut(x)
      return dispatch.select_apply(lambda xs_sc: nn.relu(body_fn(xs_sc[0]) + xs_sc[1]),
                                   (x, sc), executed, nn.relu(sc), strategy=self.strategy)
    skipped = common.pure_fn(skip)(x)
    return dispatch.select_apply(run, x, executed, skipped, strategy=self.strategy)

  @nn.compact
  def __call__(self, x: Array, tau: Array, threshold: Array, drop_rate: Array | float = 0.0,
               v_override: Array | float = 0.0):
    logits = Router(self.router_hidden, self.router_activation, name="router")(x)
    decisions = self._decisions(logits, tau, threshold, v_override)
    executed = decisions[2]
    body = (BottleneckBody if self.bottleneck else BasicBody)(self.features, self.stride,
                                                              name="body")
    projection = (Projection(self.out_features, self.stride, name="shortcut")
                  if self.shortcut == "projection" else None)
    skip = (Projection(self.out_features, self.stride, relu=True, name="skip")
            if self.skip == "conv1x1" else None)
    if (self.thresholded and dispatch.make_strategy(self.strategy).name != "dense"
        and not self.is_initializing()):
      return self._dispatched(x, executed, body, projection, skip), decisions

    # Shortcut of the block (always needed: the block's own residual add and the skip path).
    sc = _shortcut(self.shortcut, x, self.out_features, self.stride,
                   None if projection is None else functools.partial(projection,
                                                                     train=self.train))
    res = body(x, train=self.train)
    if self.train and self.drop_path:
      res = ops.drop_path(res, drop_rate, self.make_rng("dropout"), scale_mask=True)
    run = nn.relu(res + sc)

    if not self.train and not self.thresholded and not self.is_initializing():
      return run, decisions  # every block runs; the skip path is not needed.

    if self.skip == "identity":
      skipped = x
    elif self.skip == "shortcut":
      skipped = nn.relu(sc)
    else:
      skipped = skip(x, train=self.train)

    if not self.train and not self.thresholded:  # initialising in "all blocks" mode.
      return run, decisions
    if self.train:
      wb = decisions[1].astype(run.dtype)[:, None, None, None]
      y = wb * run + (1.0 - wb) * skipped
    else:
      y = jnp.where(executed.astype(bool)[:, None, None, None], run, skipped)
    return y, decisions


class ScanBody(nn.Module):
  """Adapter giving RoutedBlock the (carry, *broadcast) -> (carry, out) signature of nn.scan."""
  block_kwargs: Any

  @nn.compact
  def __call__(self, x, tau, threshold, drop_rate, v_override):
    return RoutedBlock(**dict(self.block_kwargs), name="block")(x, tau, threshold, drop_rate,
                                                                v_override)
