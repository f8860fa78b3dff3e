"""Deterministic input pipeline and on-device augmentation.

Determinism contract: the training data order is a pure function of (seed, step). Epoch e uses the
permutation `np.random.default_rng([seed, e]).permutation(N)`; global batch k of that epoch is
entries [k G, (k + 1) G) of it (G = global batch size, the last partial batch of an epoch is dropped,
epochs wrap). A run resumed at step s therefore sees exactly the batches an uninterrupted run sees,
whatever happened before s, and each example appears once per epoch. Process p of P gets the
contiguous slice [p G/P, (p + 1) G/P) of every global batch, so the processes partition it.

Datasets (`config.data.name`):
  * 'digits': scikit-learn's `load_digits()`, embedded, offline: 1797 grey 8x8 images with values
    0..16, stored as uint8 round(v * 255 / 16) with shape [8, 8, 1], 10 classes. Split: a fixed
    stratified 80/20 split (seed 0, per class the first round(0.2 n_c) of a seeded permutation go to
    'test'): 'train' has 1438 images, 'test' 359.
  * 'digits_graded': the same images and splits, each with a difficulty level 0-3 (clean to heavily
    corrupted) stored in `ArrayDataset.levels`; see `graded_digits`.
  * 'cifar10', 'cifar100', 'svhn_cropped': TensorFlow Datasets read from `config.data.data_dir`
    (or $TFDS_DATA_DIR, or tfds' default ~/tensorflow_datasets), never downloaded: the whole split
    is loaded into host memory as numpy (uint8 images, int32 labels). Any tfds split string works
    ('train', 'test', 'extra', 'train[:90%]', ...).
  * 'imagenet2012': random access through the builder's data source (`as_data_source`, needs the
    dataset prepared in the array_record file format). Images are decoded on the host, resized so
    the shorter side is `image_size` (bilinear) and centre-cropped to image_size x image_size.
    Limitations: no random-resized-crop (training augmentation is the on-device pad-crop/flip/cutout
    below), decoding runs in the calling thread (use `train_iterator`'s prefetch), and calibration
    splits are not stratified (labels are not read up front).

A dataset that is not prepared fails within seconds, naming the dataset, the data dir and the
command that prepares it; tfds is never allowed to start a download.

Augmentation runs on device in JAX, per example, from one key (`augment`, `make_views`,
`preprocess_eval`): random crop with zero padding, horizontal flip, AutoAugment with the CIFAR-10
policy (`autoaugment=True`, see `autoaugment.py`), per-dataset mean/std normalisation, cutout
(zeroes a square after normalisation, as in DARTS).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib.util
import itertools
import os
import pathlib
import tempfile
from typing import Any, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from dynroute_jax import autoaugment as autoaugment_lib
from dynroute_jax import console

Array = jax.Array

DATASETS = ("digits", "digits_graded", "cifar10", "cifar100", "svhn_cropped", "imagenet2012")
TFDS_DATASETS = ("cifar10", "cifar100", "svhn_cropped", "imagenet2012")

# Per-channel mean and std of pixel values scaled to [0, 1] (training sets; digits: whole dataset).
MEAN_STD = {
    "digits": ((0.30531,), (0.37589,)),
    "digits_graded": ((0.26956,), (0.31456,)),
    "cifar10": ((0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)),
    "cifar100": ((0.50707516, 0.48654887, 0.44091784), (0.26733429, 0.25643846, 0.27615047)),
    "svhn_cropped": ((0.4376821, 0.4437697, 0.47280442), (0.19803012, 0.20101562, 0.19703614)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


# ----------------------------------------------------------------------------------------------
# Datasets.


class Dataset(Protocol):
  """What the batching functions need: a length, random access and subsetting."""

  name: str

  def __len__(self) -> int: ...

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images [n, H, W, C] uint8, labels [n] int32) for the given indices."""

  def subset(self, indices: np.ndarray) -> "Dataset": ...


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
  """A split held in host memory.

  Attributes:
    images: [N, H, W, C] uint8.
    labels: [N] int32.
    name: dataset name (selects the normalisation constants).
    levels: [N] int32 difficulty level of each example ('digits_graded'), or None. Reported by the
      evaluation, never an input of the model.
  """
  images: np.ndarray
  labels: np.ndarray
  name: str = ""
  levels: np.ndarray | None = None

  def __post_init__(self):
    if self.images.ndim != 4 or self.images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 [N, H, W, C]; got {self.images.dtype} {self.images.shape}.")
    if self.labels.shape != (self.images.shape[0],):
      raise ValueError(f"labels must have shape [{self.images.shape[0]}]; got {self.labels.shape}.")
    if self.levels is not None and self.levels.shape != self.labels.shape:
      raise ValueError(f"levels must have shape {self.labels.shape}; got {self.levels.shape}.")

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]

  def subset(self, indices: np.ndarray) -> "ArrayDataset":
    indices = np.asarray(indices, np.int64)
    levels = None if self.levels is None else self.levels[indices]
    return ArrayDataset(self.images[indices], self.labels[indices].astype(np.int32), self.name,
                        levels)


@dataclasses.dataclass(frozen=True)
class SourceDataset:
  """A random-access split decoded on the host (imagenet2012).

  Attributes:
    source: a sequence of examples {'image': [h, w, 3] uint8, 'label': int} (a tfds data source).
    image_size: output side; images are resized (shorter side) and centre-cropped to it.
    indices: [N] the source indices this dataset exposes (a subset after `subset`).
    name: dataset name.
  """
  source: Any
  image_size: int
  indices: np.ndarray
  name: str = "imagenet2012"

  def __len__(self) -> int:
    return int(self.indices.shape[0])

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keys = [int(i) for i in self.indices[np.asarray(indices, np.int64)]]
    records = [self.source[k] for k in keys]  # Host-side reads and decoding, one record at a time.
    images = np.stack([_resize_center_crop(np.asarray(r["image"]), self.image_size) for r in records])
    labels = np.asarray([int(r["label"]) for r in records], np.int32)
    return images, labels

  def subset(self, indices: np.ndarray) -> "SourceDataset":
    return dataclasses.replace(self, indices=self.indices[np.asarray(indices, np.int64)])


def _resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes the shorter side to `size` (bilinear), then centre-crops size x size. uint8 in/out."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  h, w = image.shape[:2]
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  top, left = (nh - size) // 2, (nw - size) // 2
  return resized[top:top + size, left:left + size]


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits indices into (kept, held_out), holding out round(fraction * n_c) of every class c.

  The held-out examples of class c are the first ones of `default_rng([seed, c]).permutation`
  of that class's indices. Both outputs are sorted, so the result depends only on (labels,
  fraction, seed).
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"fraction must lie in [0, 1); got {fraction!r}.")
  labels = np.asarray(labels)
  held = []
  for c in np.unique(labels):  # Loop over classes, not examples.
    idx = np.flatnonzero(labels == c)
    perm = np.random.default_rng([seed, int(c)]).permutation(idx)
    held.append(perm[:int(round(fraction * idx.size))])
  held_out = np.sort(np.concatenate(held)) if held else np.zeros((0,), np.int64)
  kept = np.setdiff1d(np.arange(labels.size), held_out)
  return kept, held_out


def split_calibration(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
  """Holds out a calibration split of a training set (for threshold budgeting).

  Stratified by class for in-memory datasets (`stratified_split`); a plain seeded random split
  for `SourceDataset` (labels are not read up front).

  Args:
    ds: the training split.
    fraction: share of `ds` to hold out, in [0, 1).
    seed: split seed (independent of the training seed is fine; the split is a pure function of it).

  Returns:
    (train, calibration), disjoint, together covering `ds`.
  """
  if isinstance(ds, ArrayDataset):
    kept, held = stratified_split(ds.labels, fraction, seed)
  else:
    if not 0.0 <= fraction < 1.0:
      raise ValueError(f"fraction must lie in [0, 1); got {fraction!r}.")
    perm = np.random.default_rng([seed, 1 << 20]).permutation(len(ds))
    n_held = int(round(fraction * len(ds)))
    held, kept = np.sort(perm[:n_held]), np.sort(perm[n_held:])
  return ds.subset(kept), ds.subset(held)


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits as (images [1797, 8, 8] float64 in 0..16, labels [1797] int32).

  Read straight from the file scikit-learn bundles (what `load_digits()` parses): importing
  scikit-learn takes most of a second, which every run and every test process would pay. Falls
  back to `load_digits()` where the file is not where it has always been. Read-only arrays.
  """
  spec = importlib.util.find_spec("sklearn")  # Locates the package without importing it.
  path = (pathlib.Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
          if spec and spec.submodule_search_locations else None)
  if path is not None and path.is_file():
    data = np.loadtxt(path, delimiter=",")
    images, labels = data[:, :-1].reshape(-1, 8, 8), data[:, -1]
  else:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images, labels = digits.images, digits.target
  images, labels = images.astype(np.float64), labels.astype(np.int32)
  for a in (images, labels):
    a.setflags(write=False)
  return images, labels


def _load_digits(split: str) -> ArrayDataset:
  images_0to16, labels = digits_arrays()
  images = np.round(images_0to16 * (255.0 / 16.0)).astype(np.uint8)[..., None]
  train_idx, test_idx = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
  if split == "train":
    idx = train_idx
  elif split == "test":
    idx = test_idx
  else:
    raise ValueError(f"digits has splits 'train' and 'test'; got {split!r}.")
  return ArrayDataset(images[idx], labels[idx], "digits")


def resolve_data_dir(data_dir: str | None) -> str:
  """config.data.data_dir, else $TFDS_DATA_DIR, else tfds' default (~/tensorflow_datasets)."""
  if data_dir:
    return os.path.expanduser(str(data_dir))
  if os.environ.get("TFDS_DATA_DIR"):
    return os.path.expanduser(os.environ["TFDS_DATA_DIR"])
  return os.path.expanduser(os.path.join("~", "tensorflow_datasets"))


def _prepare_hint(name: str, data_dir: str) -> str:
  if name == "imagenet2012":
    return (f"ImageNet needs a manual download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
            f"in {data_dir}/downloads/manual, then run `tfds build imagenet2012 --data_dir={data_dir} "
            f"--file_format=array_record`.")
  return (f"Prepare it on a machine with network access with `tfds build {name} --data_dir={data_dir}` "
          f"(then copy the directory here if needed), or point config.data.data_dir / $TFDS_DATA_DIR "
          f"at a directory where it is prepared.")


def _tfds():
  """tensorflow_datasets, imported on first use: only tfds datasets need TensorFlow, whose import
  costs seconds and prints a native banner (imported quietly, see `console.import_quietly`)."""
  console.import_quietly("tensorflow")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def tfds_is_mocked() -> bool:
  """True inside `tfds.testing.mock_data` (its builders generate examples and are never prepared)."""
  tfds = _tfds()

  as_dataset = tfds.core.DatasetBuilder.as_dataset
  return getattr(as_dataset, "__module__", "").startswith("tensorflow_datasets.testing")


@contextlib.contextmanager
def _stray_tempdirs_removed() -> Iterator[None]:
  """Temporary directories made inside the block are removed at its end.

  tfds (4.9) builds the metadata of a dataset that is not prepared (a mocked dataset, or a missing
  one before our error) in a fresh `tempfile.mkdtemp('tfds')` and never removes it: without this,
  every such builder left an empty `tmp*tfds` directory in the system temp directory. Set-up runs
  on one thread, which the process-wide `tempfile.tempdir` this swaps relies on.
  """
  with tempfile.TemporaryDirectory(prefix="dynroute_tfds_") as scratch:
    saved, tempfile.tempdir = tempfile.tempdir, scratch
    try:
      yield
    finally:
      tempfile.tempdir = saved


def _tfds_builder(name: str, data_dir: str, check_prepared: bool | None):
  tfds = _tfds()

  if check_prepared is None:
    check_prepared = not tfds_is_mocked()
  with _stray_tempdirs_removed():
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  if check_prepared and not builder.is_prepared():
    raise FileNotFoundError(
        f"Dataset '{name}' is not prepared in data dir '{data_dir}' (looked for {builder.data_dir}); "
        f"it is never downloaded at run time. {_prepare_hint(name, data_dir)}")
  return builder


def _load_tfds_in_memory(builder, name: str, split: str) -> ArrayDataset:
  tfds = _tfds()

  # Fixed-size chunks rather than batch_size=-1: the latter needs the split's example count from
  # the metadata, which sliced splits and mocked builders do not always have.
  ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False).batch(8192)
  images, labels = [], []
  for x, y in tfds.as_numpy(ds):
    images.append(x)
    labels.append(y)
  if not images:
    raise ValueError(f"Dataset '{name}' split {split!r} is empty.")
  images = np.concatenate(images).astype(np.uint8)
  if images.ndim == 3:
    images = images[..., None]
  return ArrayDataset(images, np.concatenate(labels).astype(np.int32), name)


def load_dataset(data_config: Any, split: str, *, check_prepared: bool | None = None) -> Dataset:
  """Loads one split of `data_config.name`.

  Args:
    data_config: `config.data` (name, data_dir, image_size, num_channels, num_classes).
    split: split name ('train', 'test', or any tfds split string for tfds datasets).
    check_prepared: fail fast if a tfds dataset is not prepared in the data dir. None (default):
      check, except under `tfds.testing.mock_data`, whose builders generate fake examples and are
      never "prepared" (`tfds_is_mocked`). True/False force it on/off.

  Returns:
    An `ArrayDataset` (in memory) or, for imagenet2012, a `SourceDataset` (random access).

  Raises:
    ValueError: unknown dataset name, or data that does not match the config's image shape or
      number of classes.
    FileNotFoundError: the dataset is not prepared in the data dir (raised within seconds).
  """
  name = data_config.name
  if name not in DATASETS:
    raise ValueError(f"config.data.name must be one of {DATASETS}; got {name!r}.")
  if name == "digits":
    ds = _load_digits(split)
  elif name == "digits_graded":
    from dynroute_jax import graded_digits  # pylint: disable=g-import-not-at-top
    ds = ArrayDataset(*graded_digits.make_split(split)[:2], name, graded_digits.make_split(split)[2])
  else:
    data_dir = resolve_data_dir(data_config.get("data_dir", ""))
    builder = _tfds_builder(name, data_dir, check_prepared)
    if name == "imagenet2012":
      try:
        source = builder.as_data_source(split=split)
      except Exception as e:  # The error tfds raises for a tfrecord-only build is not specific.
        raise ValueError(
            f"Could not open imagenet2012 split {split!r} in '{data_dir}' for random access ({e}). "
            f"It must be prepared in the array_record format: {_prepare_hint(name, data_dir)}") from e
      return SourceDataset(source, int(data_config.image_size), np.arange(len(source)), name)
    ds = _load_tfds_in_memory(builder, name, split)
  expected = (int(data_config.image_size), int(data_config.image_size), int(data_config.num_channels))
  if ds.images.shape[1:] != expected:
    raise ValueError(f"Dataset '{name}' has images of shape {ds.images.shape[1:]}, but config.data says "
                     f"image_size={expected[0]}, num_channels={expected[2]}.")
  if ds.labels.size and (ds.labels.min() < 0 or ds.labels.max() >= int(data_config.num_classes)):
    raise ValueError(f"Dataset '{name}' has labels in [{ds.labels.min()}, {ds.labels.max()}], outside "
                     f"config.data.num_classes={data_config.num_classes}.")
  return ds


# ----------------------------------------------------------------------------------------------
# Batching.


def _local_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"Need 0 <= process_index < process_count; got {process_index}, {process_count}.")
  if global_batch_size % process_count:
    raise ValueError(f"The global batch size ({global_batch_size}) must be divisible by the number of "
                     f"processes ({process_count}).")
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the n training examples in `epoch`: a pure function of (seed, epoch, n)."""
  perm = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
  perm.setflags(write=False)
  return perm


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global batches per epoch (the remainder is dropped)."""
  return num_examples // global_batch_size


def train_indices(num_examples: int, seed: int, step: int, global_batch_size: int,
                  process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """The example indices of this process's share of global batch `step` (see module docstring)."""
  sl = _local_slice(global_batch_size, process_index, process_count)
  spe = steps_per_epoch(num_examples, global_batch_size)
  if spe == 0:
    raise ValueError(f"The global batch size ({global_batch_size}) exceeds the training set "
                     f"({num_examples} examples).")
  if step < 0:
    raise ValueError(f"step must be >= 0; got {step}.")
  epoch, k = divmod(int(step), spe)
  batch = epoch_permutation(seed, epoch, num_examples)[k * global_batch_size:(k + 1) * global_batch_size]
  return batch[sl]


def train_batch(ds: Dataset, seed: int, step: int, global_batch_size: int,
                process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
  """This process's part of global training batch `step`, a pure function of (seed, step).

  Args:
    ds: the training dataset.
    seed: data seed.
    step: global step (0-based); epoch = step // steps_per_epoch, wrapping around.
    global_batch_size: examples per step over all processes (divisible by process_count).
    process_index, process_count: this process and the number of processes.

  Returns:
    dict(image=[b, H, W, C] uint8, label=[b] int32), b = global_batch_size // process_count.
  """
  idx = train_indices(len(ds), seed, step, global_batch_size, process_index, process_count)
  images, labels = ds.get(idx)
  return dict(image=images, label=labels)


def train_iterator(ds: Dataset, seed: int, start_step: int, global_batch_size: int,
                   process_index: int = 0, process_count: int = 1, prefetch: int = 2,
                   num_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Yields `train_batch` of steps start_step, start_step + 1, ...: `num_steps` of them, or forever.

  With prefetch > 0 the next `prefetch` batches are assembled in a background thread (useful when
  decoding on the host, e.g. imagenet2012). The batches are the same as without prefetching: each
  is the pure function `train_batch` of its step. Closing the iterator (`contextlib.closing`, or
  the end of the steps) cancels the batches not yet started and waits for the one in progress.
  """
  make = functools.partial(train_batch, ds, seed, global_batch_size=global_batch_size,
                           process_index=process_index, process_count=process_count)
  start = int(start_step)
  steps = itertools.count(start) if num_steps is None else range(start, start + int(num_steps))
  if prefetch <= 0:
    for step in steps:
      yield make(step=step)
    return
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="train-batches")
  try:
    queue = collections.deque()
    for step in steps:
      queue.append(pool.submit(make, step=step))
      if len(queue) > prefetch:
        yield queue.popleft().result()
    while queue:
      yield queue.popleft().result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  """Global evaluation batches needed to cover every example once (the last one padded)."""
  return -(-num_examples // batch_size)


def eval_batches(ds: Dataset, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's part of each global evaluation batch, in dataset order.

  Global batch k covers examples [k G, (k + 1) G) (G = batch_size); the last one is padded (with
  copies of example 0) and `mask` is False on the padding, so summing masked metrics over all
  batches and processes counts every example exactly once. Every process yields the same number
  of batches (`num_eval_batches`), as collectives require.

  Args:
    ds: the evaluation dataset.
    batch_size: global evaluation batch size (divisible by process_count).
    process_index, process_count: this process and the number of processes.

  Yields:
    dict(image=[b, H, W, C] uint8, label=[b] int32, mask=[b] bool), b = batch_size // process_count,
    plus level=[b] int32 when the dataset has difficulty levels.
  """
  sl = _local_slice(batch_size, process_index, process_count)
  n = len(ds)
  for k in range(num_eval_batches(n, batch_size)):
    idx = np.arange(k * batch_size, (k + 1) * batch_size)[sl]
    mask = idx < n
    safe = np.where(mask, idx, 0)
    images, labels = ds.get(safe)
    batch = dict(image=images, label=labels, mask=mask)
    if getattr(ds, "levels", None) is not None:
      batch["level"] = np.asarray(ds.levels)[safe].astype(np.int32)
    yield batch


# ----------------------------------------------------------------------------------------------
# On-device augmentation.


def mean_std(name: str) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (mean, std) of `name` for pixel values in [0, 1]."""
  if name not in MEAN_STD:
    raise ValueError(f"config.data.name must be one of {DATASETS}; got {name!r}.")
  mean, std = MEAN_STD[name]
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def _normalise(images01: Array, name: str) -> Array:
  mean, std = mean_std(name)
  return (images01 - mean) / std


def preprocess_eval(images: Array, data_config: Any) -> Array:
  """uint8 [B, H, W, C] -> float32 normalised images (no augmentation)."""
  return _normalise(jnp.asarray(images).astype(jnp.float32) / 255.0, data_config.name)


# Folded into an example's key for its AutoAugment stream (independent of crop/flip/cutout).
_AUTOAUGMENT_STREAM = 0x41417567


def _augment_one(key: Array, image01: Array, *, padding: int, flip: bool, cutout: int,
                 mean: np.ndarray, std: np.ndarray, autoaugment: bool = False) -> Array:
  """One [H, W, C] image in [0, 1] -> augmented, normalised float32 image."""
  h, w, _ = image01.shape
  k_crop_y, k_crop_x, k_flip, k_cut_y, k_cut_x = jax.random.split(key, 5)
  x = image01
  if padding > 0:
    # Zero padding in pixel space (black borders, as torchvision's RandomCrop(padding=p)).
    x = jnp.pad(x, ((padding, padding), (padding, padding), (0, 0)))
    oy = jax.random.randint(k_crop_y, (), 0, 2 * padding + 1)
    ox = jax.random.randint(k_crop_x, (), 0, 2 * padding + 1)
    x = jax.lax.dynamic_slice(x, (oy, ox, 0), image01.shape)
  if flip:
    x = jnp.where(jax.random.bernoulli(k_flip), x[:, ::-1, :], x)
  if autoaugment:
    # On the 0..255 image after crop/flip and before normalisation (torchvision/DARTS order).
    x255 = jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)
    x255 = autoaugment_lib.apply_policy(jax.random.fold_in(key, _AUTOAUGMENT_STREAM), x255)
    x = x255.astype(jnp.float32) / 255.0
  x = (x - mean) / std
  if cutout > 0:
    # DARTS' Cutout: centre uniform over the image, square clipped at the borders, applied to the
    # normalised image.
    cy = jax.random.randint(k_cut_y, (), 0, h)
    cx = jax.random.randint(k_cut_x, (), 0, w)
    ys = jnp.arange(h)[:, None]
    xs = jnp.arange(w)[None, :]
    inside = ((ys >= cy - cutout // 2) & (ys < cy - cutout // 2 + cutout)
              & (xs >= cx - cutout // 2) & (xs < cx - cutout // 2 + cutout))
    x = jnp.where(inside[..., None], 0.0, x)
  return x


def augment(key: Array, images: Array, data_config: Any) -> Array:
  """Training augmentation on device, independently per example.

  In order: random crop of the zero-padded image (`crop_padding` pixels per side; 0 = off),
  horizontal flip with probability 1/2 (`flip`), AutoAugment with the CIFAR-10 policy on the uint8
  image (`autoaugment`; `autoaugment.apply_policy`), normalisation with the dataset's mean/std,
  cutout of a `cutout` x `cutout` square (0 = off; zeroes the normalised pixels, clipped at the
  borders). Example i uses `jax.random.fold_in(key, i)`, so its augmentation does not depend on the
  batch size or on the other examples; AutoAugment draws from a key folded out of that one, so
  crop, flip and cutout are the same with and without it.

  Args:
    key: PRNG key.
    images: [B, H, W, C] uint8 (or float in 0..255).
    data_config: `config.data` (name, crop_padding, flip, cutout, autoaugment); read at trace time.

  Returns:
    [B, H, W, C] float32 normalised images.
  """
  mean, std = mean_std(data_config.name)
  images = jnp.asarray(images).astype(jnp.float32) / 255.0
  keys = jax.vmap(functools.partial(jax.random.fold_in, key))(jnp.arange(images.shape[0]))
  one = functools.partial(_augment_one, padding=int(data_config.get("crop_padding", 0)),
                          flip=bool(data_config.get("flip", False)),
                          cutout=int(data_config.get("cutout", 0)), mean=mean, std=std,
                          autoaugment=bool(data_config.get("autoaugment", False)))
  return jax.vmap(one)(keys, images)


def make_views(key: Array, images: Array, data_config: Any, num_views: int) -> Array:
  """M independently augmented views of every image (CoDiNet's similar-image generation).

  Args:
    key: PRNG key; view j uses `fold_in(key, j)`.
    images: [B, H, W, C] uint8.
    data_config: `config.data`.
    num_views: M >= 1.

  Returns:
    [B, M, H, W, C] float32 normalised images.
  """
  if num_views < 1:
    raise ValueError(f"num_views must be >= 1; got {num_views}.")
  views = jnp.stack([augment(jax.random.fold_in(key, j), images, data_config)
                     for j in range(num_views)], axis=1)  # Loop over views (static M), not examples.
  return views
