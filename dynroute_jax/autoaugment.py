"""AutoAugment with the CIFAR-10 policy (Cubuk et al. 2019), on device in JAX.

The policy and the magnitude mapping follow torchvision's `AutoAugment(AutoAugmentPolicy.CIFAR10)`
(10 magnitude bins, indices 0..9; a random sign with probability 1/2 for the geometric and the
enhance ops), the ops follow PIL / torchvision's uint8 semantics:

  * ShearX/ShearY: shear factor in linspace(0, 0.3, 10), about the top-left corner, signed.
  * TranslateX/TranslateY: int(linspace(0, 150/331 * W (or H), 10)) pixels, signed.
  * Rotate: linspace(0, 30, 10) degrees about the image centre, counter-clockwise for positive
    angles, signed.
  * Geometric ops sample the nearest source pixel and fill pixels that come from outside the image
    with `FILL` = 0 (torchvision's default fill, and the same black as the zero-padded random crop;
    the original TensorFlow implementation used 128).
  * Brightness/Color/Contrast/Sharpness: PIL enhance blends `degenerate + f (image - degenerate)`
    with f = 1 + m, m in linspace(0, 0.9, 10), signed; clipped to 0..255 and truncated to uint8.
    Color blends with the greyscale image (identity for C = 1); Contrast with the mean grey level;
    Sharpness with the 3x3 [[1,1,1],[1,5,1],[1,1,1]]/13 smoothed image (border pixels unchanged).
  * Posterize: keeps 8 - round(i / 2.25) bits (8, 8, 7, 7, 6, 6, 5, 5, 4, 4 for bins 0..9).
  * Solarize: inverts pixels >= threshold, threshold in linspace(255, 0, 10) (bin 0 still inverts
    pixels equal to 255, as PIL and torchvision do).
  * AutoContrast: per channel, stretches [min, max] to [0, 255] (unchanged where max == min).
  * Equalize: PIL's per-channel histogram equalisation (256-bin histogram, cumulative LUT).
  * Invert: 255 - x.

Every op maps one [H, W, C] uint8 image to a uint8 image of the same shape with static shapes, so
`apply_policy` works under jit and vmap; the op is chosen with `lax.switch` on a traced index.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

FILL = 0
NUM_BINS = 10

OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "AutoContrast", "Invert",
       "Equalize", "Solarize", "Posterize", "Contrast", "Color", "Brightness", "Sharpness")
OP_INDEX = {name: i for i, name in enumerate(OPS)}
SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Contrast", "Color",
                    "Brightness", "Sharpness"})


def cifar10_policy() -> tuple[tuple[tuple[str, float, int | None], tuple[str, float, int | None]], ...]:
  """The 25 CIFAR-10 sub-policies: pairs of (op name, probability, magnitude bin or None)."""
  return (
      (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
      (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
      (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
      (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
      (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
      (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
      (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
      (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
      (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
      (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
      (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
      (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
      (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
      (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
      (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
      (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
      (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
      (("Color", 0.9, 9), ("Equalize", 0.6, None)),
      (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
      (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
      (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
      (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
      (("AutoContrast", 0.9, None), ("Solarize", 0.2, 3)),
      (("Equalize", 0.8, None), ("Invert", 0.1, None)),
      (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
  )


def magnitude_table(height: int, width: int) -> np.ndarray:
  """[len(OPS), NUM_BINS] float32: the unsigned magnitude of every op at every bin (torchvision's)."""
  table = np.zeros((len(OPS), NUM_BINS), np.float32)
  lin = lambda hi: np.linspace(0.0, hi, NUM_BINS)
  table[OP_INDEX["ShearX"]] = lin(0.3)
  table[OP_INDEX["ShearY"]] = lin(0.3)
  table[OP_INDEX["TranslateX"]] = np.trunc(lin(150.0 / 331.0 * width))
  table[OP_INDEX["TranslateY"]] = np.trunc(lin(150.0 / 331.0 * height))
  table[OP_INDEX["Rotate"]] = lin(30.0)
  for name in ("Brightness", "Color", "Contrast", "Sharpness"):
    table[OP_INDEX[name]] = lin(0.9)
  table[OP_INDEX["Posterize"]] = 8 - np.round(np.arange(NUM_BINS) / ((NUM_BINS - 1) / 4))
  table[OP_INDEX["Solarize"]] = np.linspace(255.0, 0.0, NUM_BINS)
  return table


# ---------------------------------------------------------------------------------------- ops
# Each op: (image [H, W, C] uint8, magnitude float32 scalar, already signed) -> [H, W, C] uint8.


def _to_uint8(x: Array) -> Array:
  return jnp.floor(jnp.clip(x, 0.0, 255.0)).astype(jnp.uint8)


def _affine(image: Array, a, b, c, d, e, f) -> Array:
  """Output pixel centre (x, y) samples the input at (a x + b y + c, d x + e y + f), nearest."""
  h, w, _ = image.shape
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5,
                        jnp.arange(w, dtype=jnp.float32) + 0.5, indexing="ij")
  sx = jnp.floor(a * xs + b * ys + c).astype(jnp.int32)
  sy = jnp.floor(d * xs + e * ys + f).astype(jnp.int32)
  inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
  out = image[jnp.clip(sy, 0, h - 1), jnp.clip(sx, 0, w - 1)]
  return jnp.where(inside[..., None], out, jnp.asarray(FILL, image.dtype))


def shear_x(image: Array, m: Array) -> Array:
  return _affine(image, 1.0, m, 0.0, 0.0, 1.0, 0.0)


def shear_y(image: Array, m: Array) -> Array:
  return _affine(image, 1.0, 0.0, 0.0, m, 1.0, 0.0)


def translate_x(image: Array, m: Array) -> Array:
  """Shifts the content right by m pixels (left for m < 0)."""
  return _affine(image, 1.0, 0.0, -m, 0.0, 1.0, 0.0)


def translate_y(image: Array, m: Array) -> Array:
  """Shifts the content down by m pixels (up for m < 0)."""
  return _affine(image, 1.0, 0.0, 0.0, 0.0, 1.0, -m)


def rotate(image: Array, m: Array) -> Array:
  """Rotates by m degrees counter-clockwise about the image centre."""
  h, w, _ = image.shape
  t = jnp.deg2rad(m)
  cos, sin = jnp.cos(t), jnp.sin(t)
  cx, cy = w / 2.0, h / 2.0
  # Source offset = R(t) applied to the output offset from the centre (y pointing down).
  return _affine(image, cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)


def auto_contrast(image: Array, m: Array = 0.0) -> Array:
  del m
  x = image.astype(jnp.float32)
  lo = x.min(axis=(0, 1), keepdims=True)
  hi = x.max(axis=(0, 1), keepdims=True)
  scale = 255.0 / jnp.maximum(hi - lo, 1.0)
  out = jnp.where(hi > lo, (x - lo) * scale, x)
  return _to_uint8(out)


def invert(image: Array, m: Array = 0.0) -> Array:
  del m
  return (255 - image.astype(jnp.int32)).astype(jnp.uint8)


def _equalize_channel(channel: Array) -> Array:
  """PIL's ImageOps.equalize on one [H, W] uint8 channel."""
  flat = channel.reshape(-1).astype(jnp.int32)
  hist = jax.ops.segment_sum(jnp.ones_like(flat), flat, num_segments=256)
  last_nonzero = jnp.max(jnp.where(hist > 0, jnp.arange(256), -1))
  step = (flat.size - hist[last_nonzero]) // 255
  safe_step = jnp.maximum(step, 1)
  cum_before = jnp.cumsum(hist) - hist
  lut = jnp.clip((safe_step // 2 + cum_before) // safe_step, 0, 255)
  return jnp.where(step > 0, lut[flat], flat).reshape(channel.shape).astype(jnp.uint8)


def equalize(image: Array, m: Array = 0.0) -> Array:
  del m
  return jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(image)


def solarize(image: Array, m: Array) -> Array:
  """Inverts the pixels >= m."""
  return jnp.where(image.astype(jnp.float32) >= m, invert(image), image)


def posterize(image: Array, m: Array) -> Array:
  """Keeps the m most significant bits."""
  bits = jnp.clip(m, 0, 8).astype(jnp.int32)
  mask = (0xFF << (8 - bits)) & 0xFF
  return (image.astype(jnp.int32) & mask).astype(jnp.uint8)


def _grey(x: Array) -> Array:
  """[H, W, C] float -> [H, W, 1] greyscale (ITU-R 601-2 luma, truncated as for uint8)."""
  if x.shape[-1] == 1:
    return x
  return jnp.floor(x[..., 0:1] * 0.299 + x[..., 1:2] * 0.587 + x[..., 2:3] * 0.114)


def _blend(degenerate: Array, x: Array, factor: Array) -> Array:
  return _to_uint8(degenerate + factor * (x - degenerate))


def brightness(image: Array, m: Array) -> Array:
  x = image.astype(jnp.float32)
  return _blend(jnp.zeros_like(x), x, 1.0 + m)


def color(image: Array, m: Array) -> Array:
  if image.shape[-1] == 1:
    return image
  x = image.astype(jnp.float32)
  return _blend(jnp.broadcast_to(_grey(x), x.shape), x, 1.0 + m)


def contrast(image: Array, m: Array) -> Array:
  x = image.astype(jnp.float32)
  return _blend(jnp.full_like(x, jnp.mean(_grey(x))), x, 1.0 + m)


def sharpness(image: Array, m: Array) -> Array:
  x = image.astype(jnp.float32)
  h, w, _ = x.shape
  if h < 3 or w < 3:
    return image
  kernel = jnp.array([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  smooth = sum(kernel[i, j] * x[i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3))
  degenerate = x.at[1:-1, 1:-1].set(jnp.round(smooth))
  return _blend(degenerate, x, 1.0 + m)


OP_FNS = {
    "ShearX": shear_x, "ShearY": shear_y, "TranslateX": translate_x, "TranslateY": translate_y,
    "Rotate": rotate, "AutoContrast": auto_contrast, "Invert": invert, "Equalize": equalize,
    "Solarize": solarize, "Posterize": posterize, "Contrast": contrast, "Color": color,
    "Brightness": brightness, "Sharpness": sharpness,
}


def apply_op(image: Array, op_index: Array, magnitude: Array) -> Array:
  """Applies OPS[op_index] (traced) with a signed magnitude to one [H, W, C] uint8 image."""
  branches = [OP_FNS[name] for name in OPS]
  return jax.lax.switch(op_index, branches, image, jnp.asarray(magnitude, jnp.float32))


def _policy_arrays():
  policy = cifar10_policy()
  ops = np.array([[OP_INDEX[o] for o, _, _ in sub] for sub in policy], np.int32)
  probs = np.array([[p for _, p, _ in sub] for sub in policy], np.float32)
  bins = np.array([[0 if b is None else b for _, _, b in sub] for sub in policy], np.int32)
  return ops, probs, bins


def apply_policy(key: Array, image: Array) -> Array:
  """AutoAugment one [H, W, C] uint8 image with the CIFAR-10 policy.

  Picks one of the 25 sub-policies uniformly, then applies each of its two ops with its
  probability (magnitudes negated with probability 1/2 for signed ops).

  Args:
    key: PRNG key.
    image: [H, W, C] uint8 (C = 1 or 3).

  Returns:
    [H, W, C] uint8.
  """
  image = jnp.asarray(image)
  if image.dtype != jnp.uint8:
    image = _to_uint8(jnp.round(image))
  h, w, _ = image.shape
  ops, probs, bins = _policy_arrays()
  table = jnp.asarray(magnitude_table(h, w))
  signed = jnp.asarray([name in SIGNED for name in OPS])
  k_sub, k_ops = jax.random.split(key)
  sub = jax.random.randint(k_sub, (), 0, ops.shape[0])
  for j in range(ops.shape[1]):  # The two ops of the sub-policy (static), not a loop over examples.
    k_apply, k_sign = jax.random.split(jax.random.fold_in(k_ops, j))
    op = jnp.asarray(ops)[sub, j]
    magnitude = table[op, jnp.asarray(bins)[sub, j]]
    negate = signed[op] & jax.random.bernoulli(k_sign)
    magnitude = jnp.where(negate, -magnitude, magnitude)
    out = apply_op(image, op, magnitude)
    image = jnp.where(jax.random.bernoulli(k_apply, jnp.asarray(probs)[sub, j]), out, image)
  return image
