"""Routing core: Gumbel-softmax statistics, threshold selection, decisions and schedules."""

import math

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynroute_jax import routing


def _normal(seed, shape):
  """Standard normal float32 values drawn on the host: an eager `jax.random.normal` compiles a
  random-number program per shape (about half a second each on a 2-core CPU)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


class GumbelSoftmaxTest(parameterized.TestCase):

  def test_small_tau_samples_categorical(self):
    """DRNet Eq. 6: as tau -> 0 the argmax is a sample from softmax(w) (chi-square test)."""
    logits = jnp.log(jnp.array([0.1, 0.2, 0.3, 0.15, 0.25]))
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    w = jax.vmap(lambda k: routing.gumbel_softmax(k, logits, 0.01))(keys)
    picks = np.asarray(jnp.argmax(w, -1))
    counts = np.bincount(picks, minlength=5)
    expected = n * np.asarray(jax.nn.softmax(logits))
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    # 4 degrees of freedom: P(chi2 > 18.47) = 0.001.
    self.assertLess(chi2, 18.47, msg=f"counts {counts} vs expected {expected}")
    # And the weights are nearly one-hot at this temperature.
    self.assertGreater(float(jnp.mean(jnp.max(w, -1))), 0.99)

  def test_chi_square_detects_wrong_distribution(self):
    """The test above can fail: samples from another distribution are rejected."""
    logits = jnp.log(jnp.array([0.1, 0.2, 0.3, 0.15, 0.25]))
    n = 20000
    keys = jax.random.split(jax.random.key(1), n)
    w = jax.vmap(lambda k: routing.gumbel_softmax(k, jnp.zeros(5), 0.01))(keys)
    counts = np.bincount(np.asarray(jnp.argmax(w, -1)), minlength=5)
    expected = n * np.asarray(jax.nn.softmax(logits))
    self.assertGreater(float(np.sum((counts - expected) ** 2 / expected)), 18.47)

  def test_large_tau_is_uniform(self):
    logits = _normal(2, (64, 5)) * 3
    w = routing.gumbel_softmax(jax.random.key(3), logits, 1e4)
    chex.assert_trees_all_close(w, jnp.full_like(w, 0.2), atol=2e-3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_rows_sum_to_one_and_keys_matter(self):
    logits = _normal(4, (3, 8, 5))
    f = self.variant(lambda k, l: routing.gumbel_softmax(k, l, 1.0))
    w1, w2, w3 = f(jax.random.key(5), logits), f(jax.random.key(5), logits), f(jax.random.key(6), logits)
    chex.assert_trees_all_close(jnp.sum(w1, -1), jnp.ones((3, 8)), atol=1e-6)
    chex.assert_trees_all_equal(w1, w2)
    self.assertGreater(float(jnp.max(jnp.abs(w1 - w3))), 1e-3)

  def test_no_key_is_plain_softmax(self):
    logits = _normal(7, (4, 5))
    chex.assert_trees_all_close(routing.gumbel_softmax(None, logits, 2.0),
                                jax.nn.softmax(logits / 2.0), atol=1e-7)

  def test_gradient_flows_to_logits(self):
    logits = _normal(8, (5,))
    g = jax.grad(lambda l: routing.gumbel_softmax(jax.random.key(9), l, 1.0)[2])(logits)
    self.assertTrue(bool(jnp.all(jnp.isfinite(g))))
    self.assertGreater(float(jnp.linalg.norm(g)), 0.0)

  @parameterized.parameters(0.0, -1.0, float("nan"), float("inf"))
  def test_bad_tau(self, tau):
    with self.assertRaisesRegex(ValueError, "tau"):
      routing.gumbel_softmax(None, jnp.zeros(5), tau)


def _reference_select(w, t):
  """Direct transcription: sort descending (lower index first on ties), keep until the sum reaches t."""
  order = sorted(range(len(w)), key=lambda i: (-w[i], i))
  kept, s = [], 0.0
  for i in order:
    kept.append(i)
    s += w[i]
    if s >= t * (1 - 1e-6):
      break
  mask = np.zeros(len(w), bool)
  mask[kept] = True
  return mask


class ThresholdSelectTest(parameterized.TestCase):

  @parameterized.parameters(0.3, 0.5, 0.8, 0.95, 1.0)
  def test_matches_reference_on_random_rows(self, t):
    rng = np.random.default_rng(int(t * 100))
    w = jax.nn.softmax(jnp.asarray(rng.normal(size=(200, 5)) * 2, jnp.float32))
    mask, rescaled = routing.threshold_select(w, t)
    w_np = np.asarray(w)
    for row in range(w_np.shape[0]):
      np.testing.assert_array_equal(np.asarray(mask[row]), _reference_select(w_np[row], t))
    chex.assert_trees_all_close(jnp.sum(rescaled, -1), jnp.ones(200), atol=1e-5)
    # Properties: kept mass reaches t; dropping the smallest kept weight falls below t.
    kept_mass = jnp.sum(jnp.where(mask, w, 0), -1)
    self.assertTrue(bool(jnp.all(kept_mass >= t - 1e-5)))
    smallest_kept = jnp.min(jnp.where(mask, w, jnp.inf), -1)
    self.assertTrue(bool(jnp.all(kept_mass - smallest_kept < t)))
    # Every kept weight is >= every dropped weight.
    self.assertTrue(bool(jnp.all(smallest_kept >= jnp.max(jnp.where(mask, -jnp.inf, w), -1))))
    # Rescaling is by 1/s with s the kept mass.
    chex.assert_trees_all_close(rescaled, jnp.where(mask, w / kept_mass[:, None], 0), atol=1e-6)

  def test_ties_are_deterministic(self):
    w = jnp.full((1, 5), 0.2)
    mask, rescaled = routing.threshold_select(w, 0.5)
    np.testing.assert_array_equal(np.asarray(mask[0]), [True, True, True, False, False])
    chex.assert_trees_all_close(rescaled[0], jnp.array([1 / 3, 1 / 3, 1 / 3, 0, 0]), atol=1e-6)

  @parameterized.parameters(jnp.float32, jnp.bfloat16, jnp.float16)
  def test_zero_weights_are_never_kept(self, dtype):
    # Regression: bfloat16 / float16 weights of 1/7 sum to less than 1 - 1e-6, so T = 1 kept the
    # eighth, zero-weight branch.
    w = jnp.asarray([[1 / 7] * 7 + [0.0], [0.5, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype)
    mask, rescaled = routing.threshold_select(w, 1.0)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(w) > 0)
    self.assertEqual(rescaled.dtype, dtype)
    mask, _ = routing.threshold_select(jnp.zeros((1, 4), dtype), 1.0)  # all zero: the first
    np.testing.assert_array_equal(np.asarray(mask[0]), [True, False, False, False])

  def test_one_hot_keeps_one(self):
    w = jnp.array([[0.0, 0.0, 1.0, 0.0, 0.0]])
    mask, _ = routing.threshold_select(w, 1.0)
    self.assertEqual(int(mask.sum()), 1)

  def test_at_least_one_kept_for_tiny_threshold(self):
    w = jax.nn.softmax(_normal(0, (10, 5)))
    mask, _ = routing.threshold_select(w, 1e-6)
    np.testing.assert_array_equal(np.asarray(mask.sum(-1)), np.ones(10))

  @chex.variants(with_jit=True, without_jit=True)
  def test_traced_threshold(self):
    w = jax.nn.softmax(_normal(1, (6, 8, 5)))
    f = self.variant(routing.threshold_select)
    m1, r1 = f(w, jnp.float32(0.8))
    m2, r2 = routing.threshold_select(w, 0.8)
    chex.assert_trees_all_equal(m1, m2)
    chex.assert_trees_all_close(r1, r2)

  @parameterized.parameters(0.0, -0.1, 1.5)
  def test_bad_threshold(self, t):
    with self.assertRaisesRegex(ValueError, r"threshold must lie in \(0, 1\]"):
      routing.threshold_select(jnp.ones((1, 5)) / 5, t)


class DecisionTest(parameterized.TestCase):

  def test_relaxed_decision_is_run_probability(self):
    logits = jnp.array([[0.0, 2.0], [3.0, -1.0]])
    v = routing.relaxed_decision(None, logits, 1.0)
    chex.assert_trees_all_close(v, jax.nn.softmax(logits)[:, 1], atol=1e-7)
    np.testing.assert_array_equal(np.asarray(routing.hard_decision(v)), [True, False])

  def test_relaxed_decision_noise_frequency(self):
    """With Gumbel noise, P(v > 0.5) = softmax(U)[run]."""
    logits = jnp.array([0.3, 1.1])
    v = jax.vmap(lambda k: routing.relaxed_decision(k, logits))(jax.random.split(jax.random.key(0), 20000))
    p = float(jax.nn.softmax(logits)[1])
    freq = float(jnp.mean(v > 0.5))
    self.assertAlmostEqual(freq, p, delta=4 * math.sqrt(p * (1 - p) / 20000))

  def test_hard_decision_boundary(self):
    np.testing.assert_array_equal(np.asarray(routing.hard_decision(jnp.array([0.49, 0.5, 0.51]))),
                                  [False, True, True])

  def test_straight_through(self):
    soft = jnp.array([0.3, 0.7])
    y, g = jax.value_and_grad(lambda s: jnp.sum(routing.straight_through(s >= 0.5, s) * jnp.array([2.0, 3.0])))(soft)
    self.assertEqual(float(y), 3.0)
    chex.assert_trees_all_close(g, jnp.array([2.0, 3.0]))


class ScheduleTest(parameterized.TestCase):

  def test_constant(self):
    self.assertEqual(float(routing.constant_schedule(3.0)(12345)), 3.0)

  def test_exponential_decay_per_epoch_with_floor(self):
    s = routing.exponential_decay_schedule(1.0, 0.0006, 0.5, steps_per_epoch=10, start_step=100)
    self.assertEqual(float(s(100)), 1.0)
    self.assertEqual(float(s(109)), 1.0)  # Decays once per completed epoch, not per step.
    self.assertAlmostEqual(float(s(110)), math.exp(-0.0006), places=6)
    self.assertAlmostEqual(float(s(100 + 10 * 500)), math.exp(-0.3), places=5)
    self.assertEqual(float(s(100 + 10 * 5000)), 0.5)  # exp(-3) < 0.5: the floor holds.
    self.assertEqual(float(s(0)), 1.0)  # Before the stage starts.
    self.assertEqual(float(jax.jit(s)(jnp.int32(110))), float(s(110)))

  def test_imagenet_schedule(self):
    s = routing.exponential_decay_schedule(5.0, 0.0006, 0.8, steps_per_epoch=1)
    self.assertAlmostEqual(float(s(1000)), 5.0 * math.exp(-0.6), places=4)

  @parameterized.named_parameters(
      ("zero_init", dict(init=0.0, decay_per_epoch=0.1, floor=0.5, steps_per_epoch=1), "tau_init"),
      ("neg_floor", dict(init=1.0, decay_per_epoch=0.1, floor=-0.5, steps_per_epoch=1), "tau_floor"),
      ("floor_above", dict(init=1.0, decay_per_epoch=0.1, floor=2.0, steps_per_epoch=1), "tau_floor"),
      ("neg_decay", dict(init=1.0, decay_per_epoch=-0.1, floor=0.5, steps_per_epoch=1), "decay"),
      ("zero_spe", dict(init=1.0, decay_per_epoch=0.1, floor=0.5, steps_per_epoch=0), "steps_per_epoch"),
  )
  def test_bad_arguments(self, kwargs, field):
    with self.assertRaisesRegex(ValueError, field):
      routing.exponential_decay_schedule(**kwargs)


def test_entropy():
  chex.assert_trees_all_close(routing.entropy(jnp.full((5,), 0.2)), jnp.log(5.0), atol=1e-6)
  assert float(routing.entropy(jnp.array([1.0, 0.0, 0.0]))) == 0.0


if __name__ == "__main__":
  pytest.main([__file__])
