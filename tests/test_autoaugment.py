"""AutoAugment (CIFAR-10 policy): ops, policy sampling, pipeline wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynroute_jax import autoaugment as aa
from dynroute_jax import config_lib
from dynroute_jax import input_pipeline as ip


def _image(c=3, h=12, w=10, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def _data_config(**overrides):
  c = config_lib.base_config().data
  c.update(overrides)
  return c


def test_policy_table():
  policy = aa.cifar10_policy()
  assert len(policy) == 25
  for sub in policy:
    assert len(sub) == 2
    for name, prob, magnitude in sub:
      assert name in aa.OPS and 0.0 <= prob <= 1.0
      assert magnitude is None or 0 <= magnitude < aa.NUM_BINS
  assert policy[0] == (("Invert", 0.1, None), ("Contrast", 0.2, 6))


@pytest.mark.parametrize("c", [1, 3])
def test_every_op_keeps_shape_dtype_and_range(c):
  image = jnp.asarray(_image(c))
  table = aa.magnitude_table(*image.shape[:2])
  fn = jax.jit(aa.apply_op)
  for i, name in enumerate(aa.OPS):
    for b in (0, 9):
      for sign in (1.0, -1.0):
        out = fn(image, i, sign * table[i, b])
        assert out.shape == image.shape and out.dtype == jnp.uint8, name
        assert int(out.min()) >= 0 and int(out.max()) <= 255, name


def test_invert_twice_is_identity():
  image = jnp.asarray(_image())
  np.testing.assert_array_equal(aa.invert(aa.invert(image)), image)
  np.testing.assert_array_equal(aa.invert(image), 255 - _image())


def test_equalize():
  const = jnp.full((8, 8, 3), 77, jnp.uint8)
  np.testing.assert_array_equal(aa.equalize(const), const)
  # A narrow ramp is spread over the whole range (PIL needs > 255 pixels outside the top bin).
  ramp = jnp.asarray(np.tile((100 + np.arange(16))[None, :, None], (64, 1, 1)).astype(np.uint8))
  out = np.asarray(aa.equalize(ramp))
  assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) >= 12
  assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)  # Monotone (PIL clips the top bins at 255).


def test_pixel_ops_match_pil():
  pil_image_ops = pytest.importorskip("PIL.ImageOps")
  pil_image = pytest.importorskip("PIL.Image")
  image = _image(3, 16, 16, seed=3)
  image[..., 1] = image[..., 1] // 3 + 40  # A channel with a narrow range.
  pil = pil_image.fromarray(image)
  np.testing.assert_array_equal(aa.equalize(jnp.asarray(image)), np.asarray(pil_image_ops.equalize(pil)))
  np.testing.assert_array_equal(aa.auto_contrast(jnp.asarray(image)),
                                np.asarray(pil_image_ops.autocontrast(pil)))
  np.testing.assert_array_equal(aa.posterize(jnp.asarray(image), 5.0),
                                np.asarray(pil_image_ops.posterize(pil, 5)))
  np.testing.assert_array_equal(aa.solarize(jnp.asarray(image), 128.0),
                                np.asarray(pil_image_ops.solarize(pil, 128)))


@pytest.mark.parametrize("c", [1, 3])
def test_magnitude_zero_is_identity(c):
  image = jnp.asarray(_image(c))
  table = aa.magnitude_table(*image.shape[:2])
  for name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Posterize", "Contrast",
               "Color", "Brightness", "Sharpness"):
    i = aa.OP_INDEX[name]
    np.testing.assert_array_equal(aa.apply_op(image, i, table[i, 0]), image, err_msg=name)
  # Solarize at bin 0 (threshold 255) only touches pixels equal to 255, as in PIL.
  below = jnp.minimum(image, 254)
  np.testing.assert_array_equal(aa.solarize(below, table[aa.OP_INDEX["Solarize"], 0]), below)
  # Color of a grey image is the identity.
  if c == 1:
    np.testing.assert_array_equal(aa.color(image, jnp.float32(0.9)), image)


def test_geometric_ops_move_pixels():
  image = jnp.asarray(_image(1, 8, 8))
  out = np.asarray(aa.translate_x(image, jnp.float32(3.0)))
  np.testing.assert_array_equal(out[:, 3:], np.asarray(image)[:, :-3])
  assert np.all(out[:, :3] == aa.FILL)
  out = np.asarray(aa.translate_y(image, jnp.float32(-2.0)))
  np.testing.assert_array_equal(out[:-2], np.asarray(image)[2:])
  # Rotating by 90 degrees about the centre of an even square is exact (counter-clockwise).
  np.testing.assert_array_equal(aa.rotate(image, jnp.float32(90.0)), np.rot90(np.asarray(image)))


@pytest.mark.parametrize("c", [1, 3])
def test_apply_policy_deterministic_jit_vmap(c):
  image = jnp.asarray(_image(c, 16, 16))
  fn = jax.jit(aa.apply_policy)
  a = fn(jax.random.key(0), image)
  np.testing.assert_array_equal(a, fn(jax.random.key(0), image))
  outs = [np.asarray(fn(jax.random.key(k), image)) for k in range(12)]
  assert len({o.tobytes() for o in outs}) > 3
  assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
  batch = jnp.stack([image] * 6)
  keys = jax.random.split(jax.random.key(1), 6)
  out = jax.jit(jax.vmap(aa.apply_policy))(keys, batch)
  assert out.shape == batch.shape and out.dtype == jnp.uint8
  for i in range(6):
    np.testing.assert_array_equal(out[i], fn(keys[i], image))


def test_augment_with_autoaugment():
  images = np.stack([_image(3, 16, 16, seed=s) for s in range(8)])
  base = dict(name="cifar10", image_size=16, num_channels=3, crop_padding=2, flip=True, cutout=4)
  key = jax.random.key(5)
  plain = jax.jit(lambda k, x: ip.augment(k, x, _data_config(**base, autoaugment=False)))(key, images)
  with_aa = jax.jit(lambda k, x: ip.augment(k, x, _data_config(**base, autoaugment=True)))
  auto = with_aa(key, images)
  assert auto.shape == plain.shape and auto.dtype == jnp.float32 and np.all(np.isfinite(auto))
  assert not np.allclose(auto, plain)
  np.testing.assert_array_equal(auto, with_aa(key, images))  # Deterministic per key.
  assert not np.allclose(auto, with_aa(jax.random.key(6), images))
