"""What the routed models share: layers, argument checks, cost tables, pure functions of submodules.

  * Layers: `conv` and `batch_norm` (PyTorch conventions, see `dynroute_jax.models.ops`) and the
    global-pool `Classifier`.
  * Checks: config fields (`check_int`, `check_bool`, `check_choice`, `check_rate`,
    `check_image_size`) and call arguments (`check_call`, `check_images`,
    `check_router_override`), each a ValueError naming the field and what it allows.
  * Costs: `module_costs` measures one submodule definition, `CostTables` holds a model's tables
    and `model_output` turns them, with the routing arrays, into the `ModelOutput`.
  * Dispatch: `pure_fn` turns a bound submodule into the pure function of a batch the dispatcher
    runs on the examples that selected it; `resolve_strategy` picks the strategy of a call.

Shape letters: B batch; H, W, C an image; N classes; S routed units (the flattened site shape).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynroute_jax import costs
from dynroute_jax import dispatch
from dynroute_jax import routing
from dynroute_jax.models import base

Array = jax.Array

BN_MOMENTUM = 0.9    # PyTorch's momentum 0.1: new = 0.9 old + 0.1 batch.
BN_EPSILON = 1e-5
KAIMING_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
ROUTERS = "routers"  # the cost group of the routers (a static network needs none).

# ------------------------------------------------------------------------------------------------
# Layers.
# ------------------------------------------------------------------------------------------------


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
  """Affine batch norm with PyTorch's defaults; batch statistics iff `train`."""
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      name=name)


def conv(features: int, kernel_size: int, stride: int = 1, groups: int = 1,
         name: str | None = None, kernel_init: Callable[..., Array] | None = None) -> nn.Conv:
  """Bias-free 2-D convolution with PyTorch-style symmetric padding k // 2.

  With symmetric padding a stride-2 conv maps an even H to H / 2, as in the reference code.
  `kernel_init` None keeps Flax's default initialiser. A depthwise conv (groups == features)
  runs through `depthwise_taps`, any other through `small_map_conv` (same parameters, same result
  up to float rounding).
  """
  p = kernel_size // 2
  init = {} if kernel_init is None else {"kernel_init": kernel_init}
  init["conv_general_dilated"] = (depthwise_taps if groups > 1 and groups == features
                                  else small_map_conv)
  return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                 padding=((p, p), (p, p)), feature_group_count=groups, use_bias=False, name=name,
                 **init)


def depthwise_conv(lhs: Array, rhs: Array, window_strides, padding, *, lhs_dilation=None,
                   rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                   precision=None, preferred_element_type=None) -> Array:
  """`lax.conv_general_dilated` for depthwise convs; on CPU as a dense conv of a diagonal kernel.

  XLA:CPU has no fast kernel for grouped convolutions. Its dense convolution, given the C x C
  kernel that is zero off the diagonal, is faster despite C times the multiply-adds: a 64x8x8x8
  depthwise 5x5 with its gradients took 15 ms grouped and 3.5 ms dense, 64x32x32x64 1463 ms and
  1029 ms, and the DRNet digits train step 841 ms and 322 ms, at the same compile time (53 s,
  50 s). A sum of k*k shifted taps ran that step in 196 ms but doubled its compile, which
  dominates every short CPU run. So the taps (`depthwise_taps`, from 2048 values per example)
  run the forward pass and this form the gradient of stride-1 convolutions, and smaller maps use
  this form throughout.
  Elsewhere, and while `costs.count_macs` traces (so MACs are counted from the depthwise
  convolution itself), it is the plain grouped convolution.
  """
  kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                dimension_numbers=dimension_numbers, precision=precision,
                preferred_element_type=preferred_element_type)
  c = lhs.shape[-1] if dimension_numbers is None else lhs.shape[dimension_numbers.lhs_spec[1]]
  if (costs.counting() or jax.default_backend() != "cpu" or feature_group_count != c
      or dimension_numbers is None or tuple(dimension_numbers.rhs_spec) != (3, 2, 0, 1)
      or rhs.shape[2] != 1 or rhs.shape[3] != c):
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding,
                                        feature_group_count=feature_group_count, **kwargs)
  # HWIO: (k, k, 1, C) * (C, C) -> (k, k, C, C), kernel[i, j, a, b] = rhs[i, j, 0, b] [a == b].
  dense = rhs * jnp.eye(c, dtype=rhs.dtype)
  return small_map_conv(lhs, dense, window_strides, padding, **kwargs)


# Inputs with fewer values per example (H * W * C) keep the diagonal kernel (`depthwise_taps`):
# DRNet S's smallest map, 8x8x60, has 3840.
TAPS_MIN_ACTIVATIONS = 2048


def depthwise_taps(lhs: Array, rhs: Array, window_strides, padding, *, lhs_dilation=None,
                   rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                   precision=None, preferred_element_type=None) -> Array:
  """`lax.conv_general_dilated` for depthwise convs; on CPU a sum of shifted taps.

  Each of the k*k taps is a strided slice of the padded map times the tap's per-channel weights;
  XLA fuses the sum into one loop over the output, k*k multiply-adds per output element. The
  dense diagonal kernel of `depthwise_conv` does C times that. XLA:CPU, forward only, batch 32,
  DRNet S's shapes: 32x32x15 5x5 0.78 ms against 4.2 ms dense, 16x16x30 3x3 0.41 against 1.6 ms,
  8x8x60 5x5 0.55 against 5.2 ms; the DRNet S forward at batch 32 takes 177 ms against 585 ms.
  Taps that read only padding (a 5x5 kernel on a 2x2 map) are left out.

  The gradient of a stride-1 conv is `depthwise_conv`'s (a custom VJP): the taps' own gradient,
  a pad per tap, doubled the compile of a DRNet train step. DRNet S's train step at batch 32 took
  0.83x the time of the diagonal kernel's (2084 against 2423 ms) and compiled in 101 s against
  83 s. Strided convs (the RouterNets', the reductions') take the taps' gradients
  (`_strided_taps_vjp`), where the diagonal kernel costs most: the DRNet S step then took 1480
  against 1590 ms, compiling in 85 s against 73 s (back to back).

  Taps also compile about twice as long per convolution (+70 ms alone on CPU). On inputs of fewer
  than `TAPS_MIN_ACTIVATIONS` values per example (the digits models' 8x8x8 to 2x2x32 maps) the
  diagonal kernel costs microseconds per example, and the compile of a routed pass (three
  copies of every branch) outweighs what the taps save, so those keep `depthwise_conv`: with
  taps on every map, a test's `chunk` report of a shrunk digits DRNet took 70 s against 55 s.
  Elsewhere, and while `costs.count_macs` traces, this is `depthwise_conv`.
  """
  kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                precision=precision, preferred_element_type=preferred_element_type)
  if (not _taps_apply(lhs, rhs, window_strides, padding, **kwargs)
      or math.prod(lhs.shape[1:]) < TAPS_MIN_ACTIVATIONS):
    return depthwise_conv(lhs, rhs, window_strides, padding, **kwargs)
  static = (tuple(window_strides), tuple(tuple(p) for p in padding),
            tuple(rhs_dilation or (1, 1)), dimension_numbers, precision)
  return _taps(lhs, rhs, static)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _taps(x: Array, w: Array, static) -> Array:
  """The sum of shifted taps (`depthwise_taps`); `static` = (strides, padding, dilation, dn,
  precision)."""
  (sh, sw), ((pt, pb), (pl, pr)), (dh, dw), _, _ = static
  n, h, wd, c = x.shape
  kh, kw = w.shape[:2]
  out_hw = ((h + pt + pb - dh * (kh - 1) - 1) // sh + 1,
            (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1)
  x_pad = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  out = None
  for i, j in _meeting_taps(x.shape, w.shape, static, out_hw):
    term = _tap(x_pad, i, j, static, out_hw) * w[i, j, 0]
    out = term if out is None else out + term
  return jnp.zeros((n, *out_hw, c), x.dtype) if out is None else out


def _taps_fwd(x, w, static):
  return _taps(x, w, static), (x, w)


def _taps_bwd(static, residuals, g):
  """Strided: the taps' own gradients (`_strided_taps_vjp`). Stride 1: the diagonal kernel's VJP
  (`depthwise_conv`), whose gradients compile fast."""
  x, w = residuals
  strides, padding, dilation, dn, precision = static
  if tuple(strides) != (1, 1):
    return _strided_taps_vjp(static, x, w, g)
  _, vjp = jax.vjp(lambda x_, w_: depthwise_conv(
      x_, w_, strides, padding, rhs_dilation=dilation, dimension_numbers=dn,
      feature_group_count=x.shape[-1], precision=precision), x, w)
  return vjp(g)


_taps.defvjp(_taps_fwd, _taps_bwd)


def _strided_taps_vjp(static, x: Array, w: Array, g: Array) -> tuple[Array, Array]:
  """The gradients of `_taps` as taps: (dx [N, H, W, C], dw [kh, kw, 1, C]) for cotangent g.

  Used for strided convolutions (the RouterNets' and the reductions'), where the diagonal kernel's
  gradients cost most: XLA:CPU, batch 32, gradients of both operands, 5x5 stride 2, 32x32x45
  14.8 ms against 38.7 ms, 16x16x30 1.3 against 3.7 ms, 8x8x60 0.8 against 6.0 ms. They compile
  in about 0.6 s per convolution against 0.2 s, which is why stride 1 (most of DRNet's
  convolutions) keeps the diagonal kernel's. Stride 1 on taps was faster alone on 5 of DRNet S's
  6 shapes, but its whole train step at batch 32 took 1631 against 1516 ms and compiled in 137
  against 81 s: the per-tap weight reductions, one pass over the map each, cost more than the
  diagonal kernel's C x C weight gradient saved (bench/RESULTS.md).
  """
  strides, ((pt, pb), (pl, pr)), dilation, _, _ = static
  out_hw = g.shape[1:3]
  taps = _meeting_taps(x.shape, w.shape, static, out_hw)
  if not taps:  # Every tap reads padding only: the output is zeros (see `_taps`).
    return jnp.zeros_like(x), jnp.zeros_like(w)
  x_pad = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  dw_ = jnp.zeros_like(w)
  for i, j in taps:  # dw[i, j] = sum over examples and outputs of the tap's input times g.
    dw_ = dw_.at[i, j, 0].set(jnp.sum(_tap(x_pad, i, j, static, out_hw) * g, axis=(0, 1, 2)))
  return _taps_input_grad(strides, (pt, pl), dilation, x.shape, w, g, taps), dw_


def _taps_input_grad(strides, lo, dilation, x_shape, w: Array, g: Array, taps) -> Array:
  """dx of `_taps` by phases: tap (i, j) sends g[o] * w[i, j] to padded position i*d + o*s, so
  the positions of one residue r = (i*d) % s form a grid on which each tap is a shift of g by
  (i*d) // s. Each residue's grid is a stride-1 sum of shifted taps of g; the grids interleave.
  """
  (sh, sw), (pt, pl), (dh, dw) = strides, lo, dilation
  n, h, wd, c = x_shape
  ho, wo = g.shape[1:3]
  qh, qw = -(-(pt + h) // sh), -(-(pl + wd) // sw)  # grid rows and columns that reach the data
  ah, aw = max(i * dh // sh for i, _ in taps), max(j * dw // sw for _, j in taps)
  g_pad = jnp.pad(g, ((0, 0), (ah, max(0, qh - ho)), (aw, max(0, qw - wo)), (0, 0)))
  grids = {}
  for i, j in taps:
    a, b = i * dh // sh, j * dw // sw
    shifted = jax.lax.slice(g_pad, (0, ah - a, aw - b, 0), (n, ah - a + qh, aw - b + qw, c))
    term = shifted * w[i, j, 0]
    r = (i * dh % sh, j * dw % sw)
    grids[r] = term if r not in grids else grids[r] + term
  zero = jnp.zeros((n, qh, qw, c), g.dtype)
  full = jnp.stack([jnp.stack([grids.get((rh, rw), zero) for rw in range(sw)], axis=3)
                    for rh in range(sh)], axis=2)  # [N, qh, sh, qw, sw, C]
  return full.reshape(n, qh * sh, qw * sw, c)[:, pt:pt + h, pl:pl + wd]


def _taps_apply(lhs, rhs, window_strides, padding, *, lhs_dilation, rhs_dilation,
                dimension_numbers, feature_group_count, precision, preferred_element_type) -> bool:
  """Whether `depthwise_taps` computes this conv as taps (CPU, NHWC/HWIO depthwise, no casts)."""
  del window_strides, precision
  c = lhs.shape[-1]
  return (not costs.counting() and jax.default_backend() == "cpu" and lhs.ndim == 4
          and (lhs_dilation in (None, 1) or tuple(lhs_dilation) == (1, 1))
          and preferred_element_type is None and not isinstance(padding, str)
          and dimension_numbers is not None
          and tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
          and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1)
          and tuple(dimension_numbers.out_spec) == (0, 3, 1, 2)
          and feature_group_count == c and rhs.shape[2] == 1 and rhs.shape[3] == c)


def _meeting_taps(x_shape, w_shape, static, out_hw) -> list[tuple[int, int]]:
  """The (i, j) taps of `_taps` that meet data (the others read padding only)."""
  (sh, sw), ((pt, _), (pl, _)), (dh, dw), _, _ = static
  return [(i, j) for i in _data_taps(w_shape[0], dh, sh, out_hw[0], pt, x_shape[1])
          for j in _data_taps(w_shape[1], dw, sw, out_hw[1], pl, x_shape[2])]


def _tap(x_pad: Array, i: int, j: int, static, out_hw) -> Array:
  """Tap (i, j) of `_taps`: the strided slice of the padded map it reads, [N, Ho, Wo, C]."""
  (sh, sw), _, (dh, dw), _, _ = static
  n, _, _, c = x_pad.shape
  limit = (n, i * dh + (out_hw[0] - 1) * sh + 1, j * dw + (out_hw[1] - 1) * sw + 1, c)
  return jax.lax.slice(x_pad, (0, i * dh, j * dw, 0), limit, (1, sh, sw, 1))


def _data_taps(k: int, dilation: int, stride: int, out_size: int, lo: int, size: int) -> list[int]:
  """The taps of one axis that meet data: output o reads padded index i*dilation + o*stride."""
  return [i for i in range(k)
          if any(lo <= i * dilation + o * stride < lo + size for o in range(out_size))]


def small_map_conv(lhs: Array, rhs: Array, window_strides, padding, *, lhs_dilation=None,
                   rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                   precision=None, preferred_element_type=None) -> Array:
  """`lax.conv_general_dilated`; on CPU, kernels larger than the feature map avoid a slow path.

  When a kernel covers more positions than its input has (a 5x5 on a 4x4 map, a 3x3 on 2x2: the
  deep cells of 8x8 inputs), XLA's algebraic simplifier swaps the operands, and XLA:CPU runs the
  swapped convolution several times slower: 2.7 ms against 0.5 ms for a 64x4x4x16 5x5 forward,
  10.3 ms against 3.8 ms with its gradients. On CPU this computes the same convolution with the
  padding applied beforehand, behind an optimization barrier, so the simplifier sees the padded
  map and keeps the operands (`_padded_conv`); a stride-1 one first drops the kernel taps that
  only ever meet padding (a 5x5 on a 2x2 map is a 3x3), and builds its input gradient the same
  way. A strided one keeps XLA's input gradient: its pre-padded form, mostly zeros, measured
  slower. Every other backend keeps XLA's convolution, and so does the MAC count
  (`costs.counting`).
  """
  kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                precision=precision, preferred_element_type=preferred_element_type)
  if not _needs_padded_conv(lhs, rhs, window_strides, padding, **kwargs):
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
  strides = tuple(window_strides)
  if strides == (1, 1):
    rhs, padding = _crop_to_map(rhs, padding, lhs.shape[1:3])
    if rhs.shape[0] * rhs.shape[1] <= lhs.shape[1] * lhs.shape[2]:
      return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
  return _padded_conv(lhs, rhs, strides, tuple(tuple(p) for p in padding), precision)


def _needs_padded_conv(lhs, rhs, window_strides, padding, *, lhs_dilation, rhs_dilation,
                       dimension_numbers, feature_group_count, precision,
                       preferred_element_type) -> bool:
  """Whether XLA would swap this convolution's operands on CPU (see `small_map_conv`)."""
  del precision
  plain = all(d in (None, 1) or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
  return (not costs.counting() and jax.default_backend() == "cpu" and plain
          and feature_group_count == 1 and preferred_element_type is None
          and not isinstance(padding, str)
          and dimension_numbers is not None
          and tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
          and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1)
          and tuple(dimension_numbers.out_spec) == (0, 3, 1, 2)
          and rhs.shape[0] * rhs.shape[1] > lhs.shape[1] * lhs.shape[2])


def _crop_to_map(rhs: Array, padding, map_hw) -> tuple[Array, list[tuple[int, int]]]:
  """The HWIO kernel without the taps a stride-1 conv only ever applies to padding.

  Output row o reads input row o + i - lo for tap i: with an H-row map and H output rows
  (padding lo + hi = k - 1) tap i meets data iff -(H - 1) <= i - lo <= H - 1.
  """
  slices, new_padding = [], []
  for d, (lo, hi) in enumerate(padding):
    k, size = rhs.shape[d], map_hw[d]
    first = max(0, lo - (size - 1)) if lo + hi == k - 1 else 0
    last = min(k, lo + size) if lo + hi == k - 1 else k
    slices.append(slice(first, last))
    new_padding.append((lo - first, hi - (k - last)))
  return rhs[slices[0], slices[1]], new_padding


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _padded_conv(x: Array, w: Array, strides: tuple[int, int],
                 padding: tuple[tuple[int, int], ...], precision) -> Array:
  """NHWC/HWIO conv of the pre-padded map (see `small_map_conv` for the gradients)."""
  return _padded_conv_fwd(x, w, strides, padding, precision)[0]


def _barrier_pad(x: Array, config) -> Array:
  return jax.lax.optimization_barrier(jax.lax.pad(x, jnp.zeros((), x.dtype), config))


def _valid_conv(x: Array, w: Array, precision, strides=(1, 1), padding="VALID") -> Array:
  return jax.lax.conv_general_dilated(x, w, strides, padding, precision=precision,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _padded_conv_fwd(x, w, strides, padding, precision):
  x_pad = _barrier_pad(x, [(0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)])
  return _valid_conv(x_pad, w, precision, strides), (x, x_pad, w)


def _padded_conv_bwd(strides, padding, precision, residuals, g):
  x, x_pad, w = residuals
  _, w_vjp = jax.vjp(lambda w_: _valid_conv(x_pad, w_, precision, strides), w)
  (dw,) = w_vjp(g)
  if strides != (1, 1):
    _, x_vjp = jax.vjp(lambda x_: _valid_conv(x_, w, precision, strides, padding), x)
    return x_vjp(g)[0], dw
  # d x_pad = the full correlation of g with the flipped, transposed kernel: pad g by k - 1.
  kh, kw = w.shape[:2]
  g_pad = _barrier_pad(g, [(0, 0, 0), (kh - 1, kh - 1, 0), (kw - 1, kw - 1, 0), (0, 0, 0)])
  dx_pad = _valid_conv(g_pad, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2), precision)
  (top, _), (left, _) = padding
  h = x_pad.shape[1] - sum(padding[0])
  wd = x_pad.shape[2] - sum(padding[1])
  return dx_pad[:, top:top + h, left:left + wd, :], dw


_padded_conv.defvjp(_padded_conv_fwd, _padded_conv_bwd)


def scan_unroll(length: int) -> int:
  """The `unroll` of a scan over `length` identical blocks: the whole scan on CPU, else 1.

  Under a while loop XLA:CPU differentiates convolutions through a slow path: five 3x3 16-channel
  convs at 64x32x32 took 3.5 s forward and backward inside `lax.scan` against 0.09 s unrolled (a
  routed ResNet-32 train step took 13 s). Unrolled, the parameters keep their stacked layout;
  only the compile grows. Accelerators keep the loop (bounded compile time).
  """
  return length if jax.default_backend() == "cpu" else 1


class Classifier(nn.Module):
  """Global average pool, dense -> classes ([B, H, W, C] -> [B, N])."""
  num_classes: int
  dense_name: str | None = None  # None: Flax's automatic name ('Dense_0').

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    del train
    return nn.Dense(self.num_classes, name=self.dense_name)(jnp.mean(x, axis=(1, 2)))


# ------------------------------------------------------------------------------------------------
# Config checks (`config.model.<field>`).
# ------------------------------------------------------------------------------------------------

PREFIX = "config.model."


def is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def check_int(value: Any, field: str, minimum: int) -> None:
  if not is_int(value) or value < minimum:
    raise ValueError(f"{PREFIX}{field} must be an int >= {minimum}; got {value!r}.")


def check_bool(value: Any, field: str) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{PREFIX}{field} must be a bool; got {value!r}.")


def check_choice(value: Any, field: str, allowed: Sequence[Any]) -> None:
  if value not in allowed:
    raise ValueError(f"{PREFIX}{field} must be one of {tuple(allowed)}; got {value!r}.")


def check_rate(value: Any, field: str) -> None:
  """A probability in [0, 1) (drop rates)."""
  if not is_number(value) or not 0.0 <= value < 1.0:
    raise ValueError(f"{PREFIX}{field} must lie in [0, 1); got {value!r}.")


def check_image_size(image_size: int, factor: int, why: str) -> None:
  """The configured image size must survive the model's `factor`-fold spatial reduction."""
  if image_size % factor:
    raise ValueError(f"{PREFIX}image_size must be divisible by {factor} ({why}); "
                     f"got {image_size!r}.")


def check_config_keys(cfg: Mapping[str, Any], allowed: Sequence[str], message: str) -> None:
  """`message.format(unknown=..., allowed=...)` unless every key of `cfg` is allowed."""
  unknown = sorted(set(cfg) - set(allowed))
  if unknown:
    raise ValueError(message.format(unknown=unknown, allowed=tuple(allowed)))


def config_dict(model_config: Any) -> dict[str, Any]:
  """A plain dict of a `config.model` ConfigDict or mapping."""
  return dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)


# ------------------------------------------------------------------------------------------------
# Call checks.
# ------------------------------------------------------------------------------------------------


def check_call(*, train: bool, tau: Any, threshold: Any, drop_path_rate: Any, strategy: Any,
               threshold_in_training: bool) -> None:
  """The keyword arguments every routed model's `__call__` takes (Python values only).

  `threshold_in_training`: whether train=True may take a threshold (CoDiNet's fine-tuning does).
  """
  routing.check_tau(tau, "tau")
  if threshold is not None:
    if train and not threshold_in_training:
      raise ValueError("threshold applies to evaluation only (train=False); got "
                       f"threshold={threshold!r} with train=True.")
    routing.check_threshold(threshold, "threshold")
  if isinstance(drop_path_rate, (int, float)) and not 0.0 <= drop_path_rate < 1.0:
    raise ValueError(f"drop_path_rate must lie in [0, 1); got {drop_path_rate!r}.")
  try:
    dispatch.make_strategy(strategy)
  except (TypeError, ValueError) as e:
    raise ValueError(f"strategy must be one of {dispatch.STRATEGIES}, a mapping dict(name=..., "
                     f"**options) or a dispatch.Strategy; got {strategy!r}: {e}") from None


def check_images(x: Array, num_channels: int, factor: int, why: str) -> None:
  """x must be [B, H, W, num_channels] with H and W multiples of the reduction `factor`."""
  if x.ndim != 4 or x.shape[-1] != num_channels:
    raise ValueError(f"x must be [B, H, W, {num_channels}] (num_channels={num_channels}); "
                     f"got shape {x.shape}.")
  h, w = x.shape[1], x.shape[2]
  if h % factor or w % factor:
    raise ValueError(f"image size {h}x{w} must be divisible by {factor} ({why}; "
                     "config.model.image_size).")


def check_router_override(router_override: Array | None, train: bool, size: int, meaning: str
                          ) -> None:
  """The static counterpart's router output: evaluation only, one value per routed unit."""
  if router_override is None:
    return
  if train:
    raise ValueError("router_override applies to evaluation only (train=False).")
  if tuple(router_override.shape) != (size,):
    raise ValueError(f"router_override must have shape [{size}] ({meaning}); "
                     f"got {router_override.shape}.")


def resolve_strategy(strategy: dispatch.StrategySpec, batch_size: int,
                     thresholded: bool) -> dispatch.Strategy:
  """The dispatch strategy of a call: 'auto' resolved; `Dense()` unless a threshold skips work.

  A frozen dataclass with its options, so that it can be a static field of a Flax module.
  """
  return dispatch.resolve(strategy, batch_size) if thresholded else dispatch.Dense()


# ------------------------------------------------------------------------------------------------
# Pure functions of submodules (for the dispatcher).
# ------------------------------------------------------------------------------------------------


def _apply_eval(definition: nn.Module, variables: Any, x: Any) -> Any:
  return definition.apply(variables, x, train=False)


def pure_fn(module: nn.Module) -> Callable[[Any], Any]:
  """`x -> module(x, train=False)` as a pure function of the batch `x`.

  `module` is a bound submodule; its definition is detached from the parent and applied to the
  submodule's variables, batch norm in inference mode, so one example's output depends on that
  example alone (what the dispatcher needs to feed a function only some rows).
  """
  definition, variables = module.unbind()
  return functools.partial(_apply_eval, definition, variables)


# ------------------------------------------------------------------------------------------------
# Costs.
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def module_costs(module: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, int]:
  """(MACs, params) of an unbound `module(x, train=False)` for one example of `in_shape`.

  `in_shape` has no batch axis. Build `module` with `parent=None`: these are called inside a
  model's forward pass, where a module created without it would become a child of the model.
  """
  shape = (1, *in_shape)
  return (costs.module_macs(module, shape, train=False),
          costs.module_params(module, shape, train=False))


@dataclasses.dataclass(frozen=True)
class CostTables:
  """Exact per-example MACs and parameters of a routed model for one input shape.

  Attributes:
    macs_table: int64 array of the site shape: MACs of each routed unit.
    params_table: the same for parameters.
    macs: MACs per named group of the parts that are not routed ('stem', 'routers', ...).
    params: parameters per group (the same keys).
    fixed_groups: the groups that run for every example; other groups (DRNet's training-only
      'aux_head', the routed units' total 'branches') are reported but not in `macs_fixed`.
  """
  macs_table: np.ndarray
  params_table: np.ndarray
  macs: Mapping[str, int]
  params: Mapping[str, int]
  fixed_groups: tuple[str, ...]

  @property
  def macs_fixed(self) -> int:
    return sum(self.macs[k] for k in self.fixed_groups)

  @property
  def params_fixed(self) -> int:
    return sum(self.params[k] for k in self.fixed_groups)

  @property
  def router_macs(self) -> int:
    return self.macs[ROUTERS]

  @property
  def router_params(self) -> int:
    return self.params[ROUTERS]

  @property
  def backbone_macs(self) -> int:
    """MACs of the network with every unit running and no routers."""
    return self.macs_fixed - self.router_macs + int(self.macs_table.sum())

  @property
  def backbone_params(self) -> int:
    return self.params_fixed - self.router_params + int(self.params_table.sum())

  @property
  def total_params(self) -> int:
    """Backbone and routers (the model size the papers report)."""
    return self.params_fixed + int(self.params_table.sum())


def model_output(*, logits: Array, aux_logits: Array | None, weights_BxS: Array,
                 executed_BxS: Array, path_BxP: Array, router_probs_BxS: Array,
                 tables: CostTables, site_shape: tuple[int, ...]) -> base.ModelOutput:
  """The `ModelOutput` of a forward pass: its routing arrays and the model's cost tables."""
  return base.ModelOutput(
      logits=logits,
      aux_logits=aux_logits,
      weights=weights_BxS,
      executed=executed_BxS,
      path=path_BxP,
      macs_table=jnp.asarray(tables.macs_table.reshape(-1), jnp.float32),
      params_table=jnp.asarray(tables.params_table.reshape(-1), jnp.float32),
      macs_fixed=jnp.asarray(tables.macs_fixed, jnp.float32),
      params_fixed=jnp.asarray(tables.params_fixed, jnp.float32),
      site_shape=site_shape,
      router_probs=router_probs_BxS,
      router_macs=jnp.asarray(tables.router_macs, jnp.float32),
  )
