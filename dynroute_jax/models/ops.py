"""DARTS-style operations as small Flax linen modules (NHWC).

Every operation is called as `op(x, train=...)` so that routed models can treat them alike:
  * `train=True`: batch norm normalises with the batch statistics and updates the running
    averages (the 'batch_stats' collection must be mutable);
  * `train=False`: batch norm uses the running averages; the op is a pure function of one example
    (needed by the dispatcher, which feeds an op only the examples that selected it).

Conventions (the DARTS reference, PyTorch semantics):
  * Batch norm: `use_running_average = not train`, momentum 0.9 (PyTorch's 0.1), epsilon 1e-5,
    learned scale and bias (DARTS' evaluation networks use affine batch norm).
  * Convolutions have no bias (a batch norm follows each) and symmetric explicit padding
    (k // 2), so a stride-2 op maps an even H to H / 2 as in PyTorch.
  * Pools are 3x3 with padding 1; average pooling does not count the padding.
  * Drop-path multiplies a branch output by a per-example Bernoulli(keep) mask divided by keep,
    training only, and is never applied to an identity.

MACs of these ops are counted from their jaxprs by `dynroute_jax.costs`: pooling, batch norm and
activations contribute none.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynroute_jax.models import common

Array = jax.Array

# The shared conv and batch norm (PyTorch conventions), re-exported for the ops' users.
BN_MOMENTUM = common.BN_MOMENTUM
BN_EPSILON = common.BN_EPSILON
batch_norm = common.batch_norm
conv = common.conv


class ReLUConvBN(nn.Module):
  """ReLU, conv kxk (stride s), batch norm. DARTS' cell preprocessing uses k = 1."""
  features: int
  kernel_size: int = 1
  stride: int = 1

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    x = nn.relu(x)
    x = conv(self.features, self.kernel_size, self.stride)(x)
    return batch_norm(train)(x)


class SepConv(nn.Module):
  """DARTS separable convolution: the separable pair applied twice.

  ReLU, depthwise kxk (stride s), pointwise 1x1 C_in -> C_in, BN; then ReLU, depthwise kxk
  (stride 1), pointwise 1x1 C_in -> features, BN. Only the first depthwise conv is strided.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    c_in = x.shape[-1]
    x = nn.relu(x)
    x = conv(c_in, self.kernel_size, self.stride, groups=c_in)(x)
    x = conv(c_in, 1)(x)
    x = batch_norm(train)(x)
    x = nn.relu(x)
    x = conv(c_in, self.kernel_size, 1, groups=c_in)(x)
    x = conv(self.features, 1)(x)
    return batch_norm(train)(x)


class FactorizedReduce(nn.Module):
  """DARTS factorized reduce: halves H and W with two offset 1x1 stride-2 convs.

  ReLU; conv1x1/2 on x and conv1x1/2 on x shifted by one pixel (x[:, 1:, 1:]), each producing
  half of `features` (the first gets features // 2, the second the rest); concat; BN.
  Needs even H and W.
  """
  features: int

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    if x.shape[1] % 2 or x.shape[2] % 2:
      raise ValueError(f"FactorizedReduce needs even spatial sizes; got input shape {x.shape}.")
    x = nn.relu(x)
    half = self.features // 2
    a = nn.Conv(half, (1, 1), strides=(2, 2), padding="VALID", use_bias=False)(x)
    b = nn.Conv(self.features - half, (1, 1), strides=(2, 2), padding="VALID",
                use_bias=False)(x[:, 1:, 1:, :])
    return batch_norm(train)(jnp.concatenate([a, b], axis=-1))


class MaxPool3x3(nn.Module):
  """3x3 max pooling, padding 1 (padded entries never win), stride 1 or 2. No parameters."""
  stride: int = 1

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    del train
    if jax.default_backend() == "cpu":
      return max_pool_3x3(x, self.stride)
    return nn.max_pool(x, (3, 3), strides=(self.stride, self.stride), padding=((1, 1), (1, 1)))


def _taps_3x3(x_pad: Array, stride: int, out_hw: tuple[int, int]) -> list[Array]:
  """The 9 windows' taps of a padded NHWC map, each [B, Ho, Wo, C], in row-major window order."""
  (ho, wo), (b, _, _, c) = out_hw, x_pad.shape
  return [jax.lax.slice(x_pad, (0, i, j, 0),
                        (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                        (1, stride, stride, 1)) for i in range(3) for j in range(3)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_3x3(x: Array, stride: int) -> Array:
  """3x3 max pooling, padding 1, as the maximum of 9 strided slices, with its own gradient.

  XLA:CPU runs `reduce_window` max slowly, and its gradient (a select-and-scatter) more slowly
  still. Forward and backward of a 64x32x32x16 map at stride 1 took 46.6 ms with XLA's pool and
  8.5 ms with this one (64x8x8x24: 2.9 and 1.0 ms), and the digits DRNet train step 126 -> 120 ms;
  compiles are no slower. On other backends `MaxPool3x3` keeps XLA's pool. Here the forward is
  an elementwise maximum of the 9 taps, and the gradient goes, as XLA's does, to the first
  (row-major) tap of each window holding the maximum: the forward records that tap's index (int8)
  and the backward sums, for each input position, the gradients of the windows whose winner it
  was: 9 shifted reads of the (stride-dilated) gradient, all elementwise.
  """
  return _max_pool_fwd(x, stride)[0]


def _max_pool_fwd(x: Array, stride: int) -> tuple[Array, tuple[Array, tuple[int, int]]]:
  hw = x.shape[1:3]
  out_hw = ((hw[0] - 1) // stride + 1, (hw[1] - 1) // stride + 1)
  x_pad = jax.lax.pad(x, jnp.array(-jnp.inf, x.dtype),
                      [(0, 0, 0), (1, 1, 0), (1, 1, 0), (0, 0, 0)])
  taps = _taps_3x3(x_pad, stride, out_hw)
  y = functools.reduce(jnp.maximum, taps)
  first = jnp.full(y.shape, len(taps) - 1, jnp.int8)
  for k in range(len(taps) - 2, -1, -1):
    first = jnp.where(taps[k] == y, jnp.int8(k), first)
  return y, (first, hw)


def _max_pool_bwd(stride: int, residuals, g: Array) -> tuple[Array]:
  first, (h, w) = residuals
  # Output q's tap k = (i, j) read input row stride * q + i - 1. Dilated by the stride (zeros
  # between rows; index -1 never wins) and padded by 2 on the left, g and the winners' indices
  # hold, at row p + 3 - i, the output that read input row p through tap k, if any: the gradient
  # is one elementwise sum over 9 shifted windows (no scatter).
  def spread(v, fill):
    cfg = [(0, 0, 0), (2, h - stride * (v.shape[1] - 1), stride - 1),
           (2, w - stride * (v.shape[2] - 1), stride - 1), (0, 0, 0)]
    return jax.lax.pad(v, jnp.asarray(fill, v.dtype), cfg)

  def window(v, i, j):
    return jax.lax.slice(v, (0, 3 - i, 3 - j, 0), (v.shape[0], 3 - i + h, 3 - j + w, v.shape[3]))

  g_pad, first_pad = spread(g, 0), spread(first, -1)
  zero = jnp.zeros((), g.dtype)
  parts = [jnp.where(window(first_pad, *divmod(k, 3)) == k, window(g_pad, *divmod(k, 3)), zero)
           for k in range(9)]
  return (functools.reduce(jnp.add, parts),)


max_pool_3x3.defvjp(_max_pool_fwd, _max_pool_bwd)


class AvgPool3x3(nn.Module):
  """3x3 average pooling, padding 1 not counted in the average, stride 1 or 2. No parameters."""
  stride: int = 1

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    del train
    return nn.avg_pool(x, (3, 3), strides=(self.stride, self.stride), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


class Identity(nn.Module):
  """x -> x (the skip branch of a stride-1 connection)."""

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    del train
    return x


def drop_path(x: Array, rate: float | Array, key: Array, *, scale_mask: bool = False) -> Array:
  """Zeroes whole examples with probability `rate` and scales the rest by 1 / (1 - rate).

  `rate` may be a traced scalar (a schedule inside a jitted step). The kept examples are
  x / keep (DARTS), or with `scale_mask` x * (mask / keep), the arithmetic CoDiNet's residual
  branches were trained with; the two differ in the last bit, so each model keeps its own.
  """
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  if scale_mask:
    mask_B = jax.random.bernoulli(key, keep, (x.shape[0],))
    return x * (mask_B.astype(x.dtype) / keep)[(slice(None),) + (None,) * (x.ndim - 1)]
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))


class DropPath(nn.Module):
  """Drop-path (per-example) with the rate given per call; training only.

  With `deterministic=True`, or a Python-number rate of 0, the input is returned unchanged and no
  random key is drawn. Otherwise the key comes from the 'dropout' rng stream.
  """

  @nn.compact
  def __call__(self, x: Array, rate: float | Array = 0.0, *, deterministic: bool) -> Array:
    if deterministic:
      return x
    if isinstance(rate, (int, float)):
      if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must lie in [0, 1); got {rate!r}.")
      if rate == 0.0:
        return x
    return drop_path(x, rate, self.make_rng("dropout"))


__all__ = [
    "BN_MOMENTUM", "BN_EPSILON", "batch_norm", "conv", "ReLUConvBN", "SepConv",
    "FactorizedReduce", "MaxPool3x3", "AvgPool3x3", "max_pool_3x3", "Identity", "drop_path",
    "DropPath",
]
