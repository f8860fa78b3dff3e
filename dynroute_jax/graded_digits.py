"""`digits_graded`: scikit-learn's digits with a known difficulty level per image (offline, embedded).

A dynamic-routing network should spend more compute on hard inputs. Plain digits is easy for
every image (a static 3-block path reaches 98-99%), so nothing can be learned or measured about
compute following difficulty. This dataset makes difficulty a known, controlled variable:

  * every image of `sklearn.datasets.load_digits()` (1797 grey 8x8 images, values 0..16) gets a
    difficulty level in {0, 1, 2, 3}; per split and class the levels are assigned round-robin over a
    seeded permutation, so they are balanced (within 1) in every split and every class;
  * level 0 is the clean image; levels 1-3 apply the corruption mix below with strength s = level/3,
    each random choice drawn from `default_rng([GRADED_SEED, split id, index])`, so the bytes are a
    pure function of the seed (same seed, same bytes, on every machine with the same numpy);
  * the level is stored with the example (`ArrayDataset.levels`) for the evaluation report and is
    never an input of the model.

Corruption mix (in this order, on the image scaled to [0, 1], `IMAGE_SIZE` x `IMAGE_SIZE`):
  1. translation by up to 1 pixel in x and y (zero fill);
  2. lowered contrast: x <- c * x with c = 1 - 0.4 s (levels 1..3: 0.87, 0.73, 0.6);
  3. levels 2 and 3, one of (drawn with probability 1/2 each):
       - a distractor: another digit of a different class (drawn from the same
         split), shifted by up to 2 pixels, added at intensity 0.25 s (0.17 / 0.25);
       - an occluding square of side 2 pixels at a random position, set to a random grey in
         [0, 1] (level 3: two such squares);
  4. additive Gaussian noise of std 0.2 s (0.067, 0.133, 0.2), then clipping to [0, 1].

Image size: the native 8x8 (no upscaling). It keeps the configs within their CPU time budget (a
DRNet cell costs 4x more at 16x16); the models' reductions still have room (DRNet tiny: 8 -> 4 -> 2;
CoDiNet ResNet-14: 8 -> 4 -> 2).

Splits: the same discipline as 'digits': a fixed stratified 80/20 train/test split by class (1438 /
359 images; the trainer holds a calibration share out of 'train').
"""

from __future__ import annotations

import functools

import numpy as np

GRADED_SEED = 0
NUM_LEVELS = 4
IMAGE_SIZE = 8
_SPLIT_IDS = {"train": 1, "test": 2}


def _shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """Translates a [H, W] image by (dy, dx) pixels with zero fill."""
  h, w = img.shape
  out = np.zeros_like(img)
  ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
  xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
  out[yd, xd] = img[ys, xs]
  return out


def corrupt(image01: np.ndarray, level: int, rng: np.random.Generator,
            distractors: np.ndarray, distractor_labels: np.ndarray, label: int) -> np.ndarray:
  """Applies the level's corruption mix (module docstring) to one [H, W] image in [0, 1].

  Args:
    image01: [H, W] float image in [0, 1].
    level: 0 (returned unchanged) .. 3.
    rng: the image's own generator (every random choice comes from it).
    distractors: [N, H, W] images in [0, 1] to draw a distractor digit from.
    distractor_labels: [N] their labels (the distractor has another class than `label`).
    label: the image's class.

  Returns:
    [H, W] float64 image in [0, 1].
  """
  if level == 0:
    return image01.astype(np.float64)
  s = level / (NUM_LEVELS - 1)
  x = _shift(image01.astype(np.float64), *rng.integers(-1, 2, size=2))
  x = x * (1.0 - 0.4 * s)
  if level >= 2:
    if rng.random() < 0.5:
      others = np.flatnonzero(distractor_labels != label)
      other = distractors[others[rng.integers(others.size)]]
      x = x + 0.25 * s * _shift(other.astype(np.float64), *rng.integers(-2, 3, size=2))
    else:
      for _ in range(level - 1):
        y0, x0 = rng.integers(0, x.shape[0] - 1), rng.integers(0, x.shape[1] - 1)
        x[y0:y0 + 2, x0:x0 + 2] = rng.random()
  x = x + rng.normal(0.0, 0.2 * s, size=x.shape)
  return np.clip(x, 0.0, 1.0)


def assign_levels(labels: np.ndarray, seed: int, split_id: int) -> np.ndarray:
  """Balanced levels: per class, round-robin over a seeded permutation of that class's examples."""
  levels = np.zeros(labels.shape, np.int32)
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    perm = np.random.default_rng([seed, split_id, 1000 + int(c)]).permutation(idx)
    levels[perm] = np.arange(perm.size) % NUM_LEVELS
  return levels


@functools.lru_cache(maxsize=4)
def make_split(split: str, seed: int = GRADED_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images [N, 8, 8, 1] uint8, labels [N] int32, levels [N] int32) of one split.

  Deterministic: a pure function of (split, seed). Cached; the arrays are read-only.
  """
  from dynroute_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  if split not in _SPLIT_IDS:
    raise ValueError(f"digits_graded has splits 'train' and 'test'; got {split!r}.")
  images_all, labels_all = input_pipeline.digits_arrays()
  train_idx, test_idx = input_pipeline.stratified_split(
      labels_all, input_pipeline.DIGITS_TEST_FRACTION, input_pipeline.DIGITS_SPLIT_SEED)
  idx = train_idx if split == "train" else test_idx
  clean = images_all[idx] / 16.0
  labels = labels_all[idx]
  split_id = _SPLIT_IDS[split]
  levels = assign_levels(labels, seed, split_id)
  out = np.empty_like(clean)
  for i in range(clean.shape[0]):  # Per image: each has its own generator (order-independent).
    rng = np.random.default_rng([seed, split_id, i])
    out[i] = corrupt(clean[i], int(levels[i]), rng, clean, labels, int(labels[i]))
  images = np.round(out * 255.0).astype(np.uint8)[..., None]
  for a in (images, labels, levels):
    a.setflags(write=False)
  return images, labels, levels
