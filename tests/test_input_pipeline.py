"""Input pipeline: offline datasets, deterministic batching, process slices, augmentation."""

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynroute_jax import config_lib
from dynroute_jax import input_pipeline as ip


def _data_config(**overrides):
  c = config_lib.base_config().data
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def digits_train():
  return ip.load_dataset(_data_config(), "train")


def _toy(n=50, h=6, w=6, c=1):
  images = np.arange(n * h * w * c, dtype=np.int64).reshape(n, h, w, c) % 251
  return ip.ArrayDataset(images.astype(np.uint8), (np.arange(n) % 10).astype(np.int32), "digits")


# ---------------------------------------------------------------------------- datasets


def test_digits_read_without_importing_scikit_learn():
  """The bundled file parsed directly is `load_digits()`, and costs no scikit-learn import."""
  code = ("import sys; from dynroute_jax import config_lib, input_pipeline as ip; "
          "ip.load_dataset(config_lib.base_config().data, 'train'); "
          "print('sklearn' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert out.stdout.strip() == "False", out.stdout + out.stderr[-2000:]
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  expected = load_digits()
  images, labels = ip.digits_arrays()
  np.testing.assert_array_equal(images, expected.images)
  np.testing.assert_array_equal(labels, expected.target)
  assert labels.dtype == np.int32 and not images.flags.writeable


def test_digits_offline_shapes_and_split(digits_train):
  test = ip.load_dataset(_data_config(), "test")
  assert digits_train.images.shape == (1438, 8, 8, 1) and test.images.shape == (359, 8, 8, 1)
  assert digits_train.images.dtype == np.uint8 and digits_train.labels.dtype == np.int32
  assert digits_train.images.max() == 255 and digits_train.images.min() == 0
  assert set(np.unique(digits_train.labels)) == set(range(10)) == set(np.unique(test.labels))
  # Stratified: every class has ~20% of its examples in test.
  counts = np.bincount(test.labels) / (np.bincount(test.labels) + np.bincount(digits_train.labels))
  np.testing.assert_allclose(counts, 0.2, atol=0.01)
  # Disjoint and fixed: the split is the same on every call.
  again = ip.load_dataset(_data_config(), "test")
  np.testing.assert_array_equal(again.images, test.images)
  with pytest.raises(ValueError, match="splits 'train' and 'test'"):
    ip.load_dataset(_data_config(), "validation")


def test_unknown_dataset_lists_allowed_names():
  with pytest.raises(ValueError, match="cifar10.*imagenet2012"):
    ip.load_dataset(_data_config(name="mnist"), "train")


def test_config_shape_mismatch_is_reported():
  with pytest.raises(ValueError, match="image_size=32"):
    ip.load_dataset(_data_config(image_size=32), "train")


def test_missing_tfds_dataset_fails_fast(tmp_path):
  config = _data_config(name="cifar100", data_dir=str(tmp_path), image_size=32, num_channels=3,
                        num_classes=100)
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as info:
    ip.load_dataset(config, "train")
  assert time.monotonic() - start < 10.0
  message = str(info.value)
  assert "cifar100" in message and str(tmp_path) in message and "tfds build cifar100" in message


def test_tfds_builders_leave_no_temporary_directories(tmp_path, monkeypatch):
  """A builder of an unprepared dataset (mocked, or missing) left an empty `tmp*tfds` behind."""
  tfds = pytest.importorskip("tensorflow_datasets")
  system_tmp = tmp_path / "system_tmp"
  system_tmp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
  config = _data_config(name="cifar10", data_dir=str(tmp_path / "data"), image_size=32,
                        num_channels=3)
  with tfds.testing.mock_data(num_examples=4):
    assert len(ip.load_dataset(config, "train")) == 4
  with pytest.raises(FileNotFoundError, match="not prepared"):
    ip.load_dataset(config, "train")
  assert tempfile.gettempdir() == str(system_tmp)
  # Directories only: TensorFlow's autograph keeps its generated files there until exit.
  assert not [p.name for p in system_tmp.iterdir() if p.is_dir()]


def test_cifar10_through_load_dataset_under_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = _data_config(name="cifar10", data_dir=str(tmp_path), image_size=32, num_channels=3)
  with tfds.testing.mock_data(num_examples=24):
    assert ip.tfds_is_mocked()
    ds = ip.load_dataset(config, "train")  # The prepared check is skipped when mocked.
    test = ip.load_dataset(config, "test", check_prepared=False)
    with pytest.raises(FileNotFoundError, match="cifar10"):
      ip.load_dataset(config, "train", check_prepared=True)
  assert not ip.tfds_is_mocked()
  assert isinstance(ds, ip.ArrayDataset) and len(ds) == 24 and len(test) == 24
  assert ds.images.shape == (24, 32, 32, 3) and ds.images.dtype == np.uint8
  assert ds.labels.dtype == np.int32 and 0 <= ds.labels.min() and ds.labels.max() < 10
  batch = ip.train_batch(ds, seed=0, step=3, global_batch_size=8)
  assert batch["image"].shape == (8, 32, 32, 3)
  out = ip.augment(jax.random.key(0), batch["image"], _data_config(name="cifar10", crop_padding=4,
                                                                     flip=True, cutout=16))
  assert out.shape == (8, 32, 32, 3) and out.dtype == jnp.float32


# ---------------------------------------------------------------------------- batching


def test_train_batch_is_a_pure_function_of_seed_and_step(digits_train):
  a = ip.train_batch(digits_train, seed=3, step=17, global_batch_size=32)
  # Another order of calls (as after a restart) gives the same batch.
  ip.epoch_permutation.cache_clear()
  for step in (40, 2, 17):
    b = ip.train_batch(digits_train, seed=3, step=step, global_batch_size=32)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], b["label"])
  c = ip.train_batch(digits_train, seed=4, step=17, global_batch_size=32)
  assert not np.array_equal(a["label"], c["label"]) or not np.array_equal(a["image"], c["image"])
  assert a["image"].shape == (32, 8, 8, 1) and a["image"].dtype == np.uint8


def test_each_example_once_per_epoch_and_epochs_differ():
  n, g = 50, 8
  spe = ip.steps_per_epoch(n, g)
  assert spe == 6
  epoch0 = np.concatenate([ip.train_indices(n, 0, s, g) for s in range(spe)])
  epoch1 = np.concatenate([ip.train_indices(n, 0, s, g) for s in range(spe, 2 * spe)])
  for e in (epoch0, epoch1):
    assert len(np.unique(e)) == spe * g  # No repeats; 2 examples dropped per epoch.
  assert not np.array_equal(epoch0, epoch1)
  with pytest.raises(ValueError, match="exceeds the training set"):
    ip.train_indices(5, 0, 0, 8)


def test_process_slices_partition_the_global_batch():
  ds = _toy()
  full = ip.train_batch(ds, seed=1, step=9, global_batch_size=12)
  parts = [ip.train_batch(ds, seed=1, step=9, global_batch_size=12, process_index=p, process_count=3)
           for p in range(3)]
  for key in ("image", "label"):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
  with pytest.raises(ValueError, match="divisible by the number of processes"):
    ip.train_batch(ds, seed=1, step=0, global_batch_size=10, process_index=0, process_count=3)


def test_eval_batches_count_every_example_once():
  ds = _toy(n=23)
  seen = []
  num = []
  for p in range(2):
    batches = list(ip.eval_batches(ds, batch_size=8, process_index=p, process_count=2))
    num.append(len(batches))
    for b in batches:
      assert b["image"].shape == (4, 6, 6, 1) and b["mask"].dtype == bool
      seen.append(b["image"][b["mask"]].reshape(-1, 36)[:, 0])
  assert num == [ip.num_eval_batches(23, 8)] * 2 == [3, 3]
  seen = np.sort(np.concatenate(seen))
  np.testing.assert_array_equal(seen, np.sort(ds.images.reshape(23, -1)[:, 0]))


def test_train_iterator_matches_train_batch():
  ds = _toy()
  it = ip.train_iterator(ds, seed=2, start_step=5, global_batch_size=8, prefetch=2)
  for step in range(5, 9):
    np.testing.assert_array_equal(next(it)["label"], ip.train_batch(ds, 2, step, 8)["label"])


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_train_iterator_with_num_steps_stops_and_closes(prefetch):
  ds = _toy()
  batches = list(ip.train_iterator(ds, seed=2, start_step=3, global_batch_size=8,
                                   prefetch=prefetch, num_steps=4))
  assert len(batches) == 4
  for step, batch in zip(range(3, 7), batches):
    expected = ip.train_batch(ds, 2, step, 8)
    np.testing.assert_array_equal(batch["image"], expected["image"])
    np.testing.assert_array_equal(batch["label"], expected["label"])
  # Closed early (a stop signal, an error), the background thread ends with the iterator.
  before = {t.name for t in threading.enumerate()}
  it = ip.train_iterator(ds, seed=2, start_step=0, global_batch_size=8, prefetch=prefetch)
  with contextlib.closing(it):
    next(it)
  assert not {t.name for t in threading.enumerate()} - before


def test_split_calibration(digits_train):
  train, calib = ip.split_calibration(digits_train, 0.1, seed=0)
  assert len(train) + len(calib) == len(digits_train)
  assert abs(len(calib) - 0.1 * len(digits_train)) <= 10
  assert set(np.unique(calib.labels)) == set(range(10))
  train2, calib2 = ip.split_calibration(digits_train, 0.1, seed=0)
  np.testing.assert_array_equal(calib.images, calib2.images)
  # Disjoint: no image row appears in both (digits has a few duplicate images, compare indices).
  kept, held = ip.stratified_split(digits_train.labels, 0.1, 0)
  assert not set(kept) & set(held) and len(kept) + len(held) == len(digits_train)


# ---------------------------------------------------------------------------- augmentation


def test_augment_shapes_dtypes_and_determinism(digits_train):
  config = _data_config(crop_padding=2, flip=True, cutout=3)
  images = digits_train.images[:16]
  fn = jax.jit(lambda k, x: ip.augment(k, x, config))
  a = fn(jax.random.key(0), images)
  b = fn(jax.random.key(0), images)
  c = fn(jax.random.key(1), images)
  assert a.shape == images.shape and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Per-example keys: an example's augmentation does not depend on the batch it is in.
  np.testing.assert_allclose(fn(jax.random.key(0), images[:4]), a[:4])


def test_eval_preprocess_is_normalisation_only(digits_train):
  config = _data_config()
  images = digits_train.images[:8]
  out = ip.preprocess_eval(images, config)
  mean, std = ip.mean_std("digits")
  np.testing.assert_allclose(out, (images / 255.0 - mean) / std, rtol=1e-5, atol=1e-6)
  # With every augmentation off, augment == preprocess_eval.
  np.testing.assert_allclose(ip.augment(jax.random.key(0), images, config), out, rtol=1e-6)


def test_flip_and_crop_change_images():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(32, 8, 8, 1)).astype(np.uint8)
  base = np.asarray(ip.preprocess_eval(images, _data_config()))
  flipped = np.asarray(ip.augment(jax.random.key(0), images, _data_config(flip=True)))
  is_flip = np.array([np.allclose(f, b[:, ::-1]) for f, b in zip(flipped, base)])
  is_same = np.array([np.allclose(f, b) for f, b in zip(flipped, base)])
  assert np.all(is_flip | is_same) and 0 < is_flip.sum() < 32
  cropped = np.asarray(ip.augment(jax.random.key(0), images, _data_config(crop_padding=2)))
  changed = np.array([not np.allclose(c, b) for c, b in zip(cropped, base)])
  assert changed.sum() > 16
  # A crop is a shift of the image with zero (black) padding: the padded value is (0 - mean) / std.
  mean, std = ip.mean_std("digits")
  black = (0.0 - mean[0]) / std[0]
  for c, b in zip(cropped, base):
    found = False
    for dy in range(-2, 3):
      for dx in range(-2, 3):
        padded = np.pad(b[..., 0], 2, constant_values=black)
        if np.allclose(padded[2 + dy:10 + dy, 2 + dx:10 + dx], c[..., 0], atol=1e-5):
          found = True
    assert found


def test_cutout_zeroes_a_square():
  images = np.full((16, 12, 12, 1), 200, np.uint8)
  out = np.asarray(ip.augment(jax.random.key(3), images, _data_config(cutout=4)))[..., 0]
  value = np.asarray(ip.preprocess_eval(images[:1], _data_config()))[0, 0, 0, 0]
  for img in out:
    zero = np.isclose(img, 0.0)
    assert np.all(np.isclose(img[~zero], value))
    ys, xs = np.nonzero(zero)
    assert 0 < zero.sum() <= 16
    # The zeroed region is an axis-aligned rectangle (a 4x4 square clipped at the border).
    assert zero.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    assert ys.max() - ys.min() < 4 and xs.max() - xs.min() < 4
  assert any(np.isclose(img, 0.0).sum() == 16 for img in out)


def test_views_differ_and_have_the_right_shape(digits_train):
  config = _data_config(crop_padding=2, flip=True)
  images = digits_train.images[:8]
  views = jax.jit(lambda k, x: ip.make_views(k, x, config, 3))(jax.random.key(0), images)
  assert views.shape == (8, 3, 8, 8, 1) and views.dtype == jnp.float32
  for j in range(3):
    for k in range(j + 1, 3):
      assert not np.allclose(views[:, j], views[:, k])


def test_autoaugment_runs_on_grey_images(digits_train):
  out = ip.augment(jax.random.key(0), digits_train.images[:4], _data_config(autoaugment=True))
  assert out.shape == (4, 8, 8, 1)
  assert bool(jnp.all(jnp.isfinite(out)))


def test_imagenet_random_access_under_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = _data_config(name="imagenet2012", data_dir=str(tmp_path), image_size=16, num_channels=3,
                        num_classes=1000)
  with tfds.testing.mock_data(num_examples=10):
    ds = ip.load_dataset(config, "train")
    assert isinstance(ds, ip.SourceDataset) and len(ds) == 10
    batch = ip.train_batch(ds, seed=0, step=1, global_batch_size=4)
    again = ip.train_batch(ds, seed=0, step=1, global_batch_size=4)
    train, calib = ip.split_calibration(ds, 0.2, seed=0)
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
  np.testing.assert_array_equal(batch["image"], again["image"])
  assert len(train) == 8 and len(calib) == 2 and not set(train.indices) & set(calib.indices)
  # Host-side resize: shorter side to the target, then a centre crop.
  img = np.zeros((20, 40, 3), np.uint8)
  img[:, 5:35] = 255
  out = ip._resize_center_crop(img, 10)  # pylint: disable=protected-access
  assert out.shape == (10, 10, 3) and out.min() == 255
