"""Each loss against a direct loop transcription of its paper equation."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import ml_collections

from dynroute_jax import config_lib
from dynroute_jax import losses
from dynroute_jax.models import base as models_base


def _np_norm(v):
  return math.sqrt(sum(float(x) ** 2 for x in v))


def ref_consistency(paths, m_c):
  """CoDiNet Eq. 8 with explicit loops."""
  n, m, d = paths.shape
  total = 0.0
  for i in range(n):
    centre = [sum(float(paths[i, j, k]) for j in range(m)) / m for k in range(d)]
    for j in range(m):
      dist = _np_norm([paths[i, j, k] - centre[k] for k in range(d)])
      total += max(0.0, dist - m_c) ** 2
  return total / (n * m)


def ref_diversity(paths, m_d):
  """CoDiNet Eq. 9 with explicit loops."""
  n, m, d = paths.shape
  centres = [[sum(float(paths[i, j, k]) for j in range(m)) / m for k in range(d)] for i in range(n)]
  total = 0.0
  for i in range(n):
    for j in range(n):
      if j == i:
        continue
      dist = _np_norm([centres[i][k] - centres[j][k] for k in range(d)])
      total += max(0.0, m_d - dist) ** 2
  return total / (n * (n - 1))


def ref_cost(weights, table, normalizer=None):
  """CoDiNet Eq. 11 with explicit loops, mean over the batch."""
  b, s = weights.shape
  total = 0.0
  for i in range(b):
    total += sum(float(table[k]) * float(weights[i, k]) for k in range(s))
  total /= b
  return total / normalizer if normalizer else total


def ref_resource(expected, correct, lam):
  """DRNet Eq. 8 regulariser with explicit loops, mean over the batch."""
  return sum(lam * float(c) * math.log(float(e)) for e, c in zip(expected, correct)) / len(expected)


def ref_cross_entropy(logits, labels, eps):
  out = []
  for row, y in zip(logits, labels):
    n = len(row)
    mx = max(row)
    lse = mx + math.log(sum(math.exp(v - mx) for v in row))
    loss = 0.0
    for k in range(n):
      t = (1 - eps) * (k == y) + eps / n
      loss -= t * (row[k] - lse)
    out.append(loss)
  return np.array(out)


class LossesTest(chex.TestCase, parameterized.TestCase):

  def _paths(self, n=6, m=3, d=5, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, m, d)).astype(np.float32) * scale + 0.2

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((0.0,), (0.05,), (0.2,), (10.0,))
  def test_consistency_matches_equation(self, margin):
    paths = self._paths(scale=0.6)
    fn = self.variant(losses.consistency_loss, static_argnums=1)
    np.testing.assert_allclose(fn(paths, margin), ref_consistency(paths, margin), rtol=1e-5, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((0.0,), (0.3,), (0.5,), (5.0,))
  def test_diversity_matches_equation(self, margin):
    paths = self._paths(n=7, m=2, d=4, seed=1)
    fn = self.variant(losses.diversity_loss, static_argnums=1)
    np.testing.assert_allclose(fn(paths, margin), ref_diversity(paths, margin), rtol=1e-5, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_cost_matches_equation(self):
    rng = np.random.default_rng(2)
    w = rng.uniform(size=(5, 9)).astype(np.float32)
    table = rng.uniform(1e5, 3e6, size=(9,)).astype(np.float32)
    fn = self.variant(losses.cost_loss)
    np.testing.assert_allclose(fn(w, table), ref_cost(w, table), rtol=1e-5)
    full = float(losses.full_model_macs(table, 1e6))
    np.testing.assert_allclose(full, 1e6 + table.astype(np.float64).sum(), rtol=1e-6)
    np.testing.assert_allclose(fn(w, table, full), ref_cost(w, table, full), rtol=1e-5)
    self.assertLessEqual(float(fn(w, table, full)), 1.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_resource_matches_equation(self):
    rng = np.random.default_rng(3)
    expected = rng.uniform(1e7, 9e7, size=(8,)).astype(np.float32)
    correct = (rng.uniform(size=(8,)) > 0.4).astype(np.float32)
    fn = self.variant(losses.resource_loss)
    np.testing.assert_allclose(fn(expected, correct, 0.1), ref_resource(expected, correct, 0.1), rtol=1e-5)
    # A normalizer shifts the value by a constant but leaves the gradient unchanged.
    g1 = jax.grad(lambda e: losses.resource_loss(e, correct, 0.5))(expected)
    g2 = jax.grad(lambda e: losses.resource_loss(e, correct, 0.5, normalizer=1e8))(expected)
    np.testing.assert_allclose(g1, g2, rtol=1e-5)
    np.testing.assert_allclose(g1, 0.5 * correct / expected / 8, rtol=1e-5)

  def test_resource_stops_gradient_through_correct(self):
    expected = jnp.array([2.0, 3.0])
    g = jax.grad(lambda c: losses.resource_loss(expected, c, 1.0))(jnp.array([1.0, 0.0]))
    np.testing.assert_array_equal(g, 0.0)
    logits = jnp.array([[2.0, 1.0], [0.0, 1.0], [3.0, -1.0]])
    np.testing.assert_array_equal(losses.correct_predictions(logits, jnp.array([0, 0, 0])), [1, 0, 1])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((0.0,), (0.1,))
  def test_cross_entropy_matches_equation(self, eps):
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=(6,)).astype(np.int32)
    fn = self.variant(losses.cross_entropy, static_argnums=2)
    out = fn(logits, labels, eps)
    chex.assert_shape(out, (6,))
    np.testing.assert_allclose(out, ref_cross_entropy(logits.tolist(), labels.tolist(), eps), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradients_finite_for_identical_paths(self):
    # All views and all centres identical: every norm is exactly 0.
    paths = jnp.full((4, 3, 6), 0.5, jnp.float32)
    for loss_fn, margin in ((losses.consistency_loss, 0.0), (losses.consistency_loss, 0.2),
                            (losses.diversity_loss, 0.5), (losses.diversity_loss, 0.0)):
      fn = self.variant(jax.value_and_grad(loss_fn), static_argnums=1)
      value, grad = fn(paths, margin)
      self.assertTrue(np.isfinite(value))
      self.assertTrue(np.all(np.isfinite(grad)), msg=f"{loss_fn.__name__} margin={margin}")
    # Diversity with identical centres: value m_d^2 (every pair at distance 0).
    np.testing.assert_allclose(losses.diversity_loss(paths, 0.5), 0.25, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradients_match_finite_differences(self):
    paths = jnp.asarray(self._paths(n=4, m=3, d=3, seed=5, scale=0.8), jnp.float64
                        if jax.config.jax_enable_x64 else jnp.float32)
    for loss_fn, margin in ((losses.consistency_loss, 0.05), (losses.diversity_loss, 0.9)):
      grad = self.variant(jax.grad(loss_fn), static_argnums=1)(paths, margin)
      self.assertTrue(np.all(np.isfinite(grad)))
      self.assertGreater(float(jnp.abs(grad).sum()), 0.0)
      # Directional finite difference in float64 on the NumPy reference.
      rng = np.random.default_rng(6)
      direction = rng.normal(size=paths.shape)
      ref = ref_consistency if loss_fn is losses.consistency_loss else ref_diversity
      p = np.asarray(paths, np.float64)
      h = 1e-4
      fd = (ref(p + h * direction, margin) - ref(p - h * direction, margin)) / (2 * h)
      np.testing.assert_allclose(float(jnp.sum(grad * direction)), fd, rtol=2e-2, atol=1e-4)

  def test_negative_margins_raise(self):
    paths = jnp.zeros((2, 2, 3))
    with self.assertRaisesRegex(ValueError, "consistency margin"):
      losses.consistency_loss(paths, -0.1)
    with self.assertRaisesRegex(ValueError, "diversity margin"):
      losses.diversity_loss(paths, -1.0)
    with self.assertRaisesRegex(ValueError, "diversity margin"):
      losses.diversity_loss(paths, float("nan"))
    with self.assertRaisesRegex(ValueError, "label_smoothing"):
      losses.cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), 1.0)

  def test_edge_cases(self):
    # One view: every path is its own centre, no consistency loss.
    self.assertEqual(float(losses.consistency_loss(jnp.ones((3, 1, 4)), 0.0)), 0.0)
    # One image: no pairs, no diversity loss.
    self.assertEqual(float(losses.diversity_loss(jnp.ones((1, 2, 4)), 0.5)), 0.0)
    # safe_norm equals the plain norm away from 0.
    x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(losses.safe_norm(x), [5.0, 0.0])
    np.testing.assert_array_equal(jax.grad(lambda v: losses.safe_norm(v).sum())(x)[1], 0.0)


def _output(num_images=4, num_views=2, num_classes=5, num_units=3, seed=0, aux=True):
  """A CoDiNet-like ModelOutput (run/skip routing over `num_units` blocks) with random values."""
  rng = np.random.default_rng(seed)
  b = num_images * num_views
  v_BxS = jnp.asarray(rng.uniform(0.05, 0.95, (b, num_units)), jnp.float32)
  return models_base.ModelOutput(
      logits=jnp.asarray(rng.normal(size=(b, num_classes)), jnp.float32),
      aux_logits=jnp.asarray(rng.normal(size=(b, num_classes)), jnp.float32) if aux else None,
      weights=v_BxS, executed=jnp.ones_like(v_BxS), path=v_BxS * 0.9,
      macs_table=jnp.asarray([100.0, 200.0, 300.0]), params_table=jnp.ones((num_units,)),
      macs_fixed=jnp.asarray(50.0), params_fixed=jnp.asarray(1.0), site_shape=(num_units,),
      router_probs=v_BxS)


def _configs(**train_overrides):
  train_cfg = ml_collections.ConfigDict(dict(
      label_smoothing=0.1, resource_cost="branches", path_loss_input="noisy",
      consistency_margin=0.05, diversity_margin=0.5, cost_on_correct_only=False, cost_type="macs",
      cost_target=0.5, router_logit_weight=0.02))
  train_cfg.update(train_overrides)
  stage_cfg = config_lib.stage_config(aux_weight=0.4, resource_weight=0.1, consistency_weight=0.2,
                                      diversity_weight=0.3, cost_weight=0.1)
  return stage_cfg, train_cfg


class TotalLossTest(absltest.TestCase):

  def test_terms_in_order_and_summed_in_that_order(self):
    out, labels_B = _output(), jnp.asarray([0, 0, 1, 1, 2, 2, 3, 3])
    stage_cfg, train_cfg = _configs()
    total, terms = losses.total_loss(out, labels_B, stage_cfg, train_cfg, num_views=2, tau=1.5)
    self.assertEqual(list(terms), ["ce", "aux", "resource", "consistency", "diversity", "cost",
                                   "router_logit"])
    # Each term by hand from the individual losses.
    paths = out.path.reshape(4, 2, 3)
    correct = losses.correct_predictions(out.logits, labels_B)
    expected = {
        "ce": jnp.mean(losses.cross_entropy(out.logits, labels_B, 0.1)),
        "aux": 0.4 * jnp.mean(losses.cross_entropy(out.aux_logits, labels_B, 0.1)),
        "resource": losses.resource_loss(out.expected_routed_macs, correct, 0.1),
        "consistency": 0.2 * losses.consistency_loss(paths, 0.05),
        "diversity": 0.3 * losses.diversity_loss(paths, 0.5),
        "cost": 0.1 * losses.cost_loss(out.weights, out.macs_table,
                                       normalizer=losses.full_model_macs(out.macs_table, 50.0)),
        "router_logit": 0.02 * losses.router_logit_spread(out.router_choices(), 1.5),
    }
    for k, v in expected.items():
      np.testing.assert_allclose(terms[k], v, rtol=1e-6, err_msg=k)
    # The total is the left-to-right float32 sum of the terms, exactly.
    acc = np.float32(0.0)
    for k in expected:
      acc = np.float32(acc + np.float32(terms[k]))
    self.assertEqual(np.float32(total), acc)

  def test_terms_follow_the_weights_and_options(self):
    out, labels_B = _output(aux=False), jnp.asarray([0, 0, 1, 1, 2, 2, 3, 3])
    stage_cfg, train_cfg = _configs(router_logit_weight=0.0, cost_type="count_l1",
                                    cost_on_correct_only=True, path_loss_input="clean")
    stage_cfg.consistency_weight = 0.0
    stage_cfg.resource_weight = 0.0
    total, terms = losses.total_loss(out, labels_B, stage_cfg, train_cfg, num_views=2, tau=1.0)
    self.assertEqual(list(terms), ["ce", "diversity", "cost"])  # No aux head: no aux term.
    gate = losses.correct_predictions(out.logits, labels_B)
    np.testing.assert_allclose(terms["cost"], 0.1 * losses.count_cost_loss(out.weights, 0.5, gate),
                               rtol=1e-6)
    np.testing.assert_allclose(
        terms["diversity"], 0.3 * losses.diversity_loss(out.router_probs.reshape(4, 2, 3), 0.5),
        rtol=1e-6)
    self.assertEqual(float(total), float(terms["ce"] + terms["diversity"] + terms["cost"]))


if __name__ == "__main__":
  absltest.main()
