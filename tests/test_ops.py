"""Tests of the DARTS-style ops: shapes, parameter and MAC counts, pooling and drop-path semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynroute_jax import costs
from dynroute_jax.models import ops


def _normal(seed, shape):
  """Standard normal float32 values drawn on the host: an eager `jax.random.normal` compiles a
  random-number program per shape (about half a second each on a 2-core CPU)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _init_apply(module, x, train=False):
  variables = module.init(jax.random.key(0), x, train=train)
  return variables, module.apply(variables, x, train=train, mutable=["batch_stats"])[0]


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
def test_sep_conv_shape_params_macs(k, stride):
  c, h = 6, 8
  module = ops.SepConv(c, k, stride)
  x = jnp.ones((2, h, h, c))
  variables, y = _init_apply(module, x, train=True)
  ho = h // stride
  assert y.shape == (2, ho, ho, c)
  # Two (depthwise kxk + pointwise 1x1) pairs and two affine batch norms.
  assert costs.count_params(variables["params"]) == 2 * (k * k * c + c * c) + 2 * 2 * c
  # The first depthwise runs at the output resolution (strided); everything else too.
  expected = ho * ho * 2 * (k * k * c + c * c)
  assert costs.module_macs(module, (1, h, h, c), train=False) == expected


def test_factorized_reduce():
  module = ops.FactorizedReduce(6)
  x = _normal(1, (2, 8, 8, 5))
  variables, y = _init_apply(module, x)
  assert y.shape == (2, 4, 4, 6)
  assert costs.count_params(variables["params"]) == 5 * 3 * 2 + 2 * 6
  assert costs.module_macs(module, (1, 8, 8, 5), train=False) == 4 * 4 * 5 * 6
  with pytest.raises(ValueError, match="even"):
    module.init(jax.random.key(0), jnp.ones((1, 7, 7, 5)))


def test_relu_conv_bn():
  module = ops.ReLUConvBN(7)
  variables, y = _init_apply(module, jnp.ones((2, 4, 4, 3)))
  assert y.shape == (2, 4, 4, 7)
  assert costs.count_params(variables["params"]) == 3 * 7 + 2 * 7


def test_avg_pool_excludes_padding_and_max_pool_ignores_it():
  x = jnp.ones((1, 4, 4, 2))
  y = ops.AvgPool3x3(1).apply({}, x)
  np.testing.assert_allclose(y, 1.0)  # counting the padding would give 4/9 in the corners.
  xm = -jnp.ones((1, 4, 4, 2))
  np.testing.assert_allclose(ops.MaxPool3x3(1).apply({}, xm), -1.0)  # padding never wins.
  assert ops.MaxPool3x3(2).apply({}, x).shape == (1, 2, 2, 2)
  assert ops.AvgPool3x3(2).apply({}, x).shape == (1, 2, 2, 2)
  assert costs.module_macs(ops.AvgPool3x3(1), (1, 4, 4, 2)) == 0
  np.testing.assert_array_equal(ops.Identity().apply({}, x), x)


def test_batch_norm_settings():
  bn = ops.batch_norm(train=True)
  assert bn.momentum == 0.9 and bn.epsilon == 1e-5 and not bn.use_running_average
  assert ops.batch_norm(train=False).use_running_average


def test_drop_path():
  x = jnp.ones((4000, 1, 1, 2))
  module = ops.DropPath()
  np.testing.assert_array_equal(module.apply({}, x, 0.3, deterministic=True), x)
  np.testing.assert_array_equal(module.apply({}, x, 0.0, deterministic=False), x)
  y = module.apply({}, x, 0.25, deterministic=False, rngs={"dropout": jax.random.key(3)})
  values = np.unique(np.asarray(y))
  np.testing.assert_allclose(values, [0.0, 1.0 / 0.75], rtol=1e-6)
  # Per example: both channels of an example share the mask.
  np.testing.assert_array_equal(y[..., 0], y[..., 1])
  assert abs(float(jnp.mean(y)) - 1.0) < 0.05
  # A traced rate works inside jit.
  f = jax.jit(lambda r: module.apply({}, x, r, deterministic=False,
                                     rngs={"dropout": jax.random.key(3)}))
  np.testing.assert_allclose(f(jnp.float32(0.25)), y)
  with pytest.raises(ValueError, match="drop_path_rate"):
    module.apply({}, x, 1.0, deterministic=False, rngs={"dropout": jax.random.key(3)})


def _depthwise_case(c, size, k, stride, dilation):
  """(x [3, size, size, c], w [k, k, 1, c], the conv's keyword arguments) of a depthwise conv with
  symmetric padding dilation * (k // 2)."""
  x = _normal(1, (3, size, size, c))
  w = _normal(2, (k, k, 1, c))
  p = dilation * (k // 2)
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  kwargs = dict(window_strides=(stride, stride), padding=((p, p), (p, p)),
                rhs_dilation=(dilation, dilation), dimension_numbers=dn, feature_group_count=c)
  return x, w, kwargs


def _assert_matches_xla_conv(conv_fn, x, w, kwargs):
  """conv_fn(x, w, **kwargs) equals XLA's conv (grouped or not), values and gradients of a sin-sum
  loss."""
  loss = lambda f, x, w: jnp.sum(jnp.sin(f(x, w, **kwargs)))
  np.testing.assert_allclose(conv_fn(x, w, **kwargs), jax.lax.conv_general_dilated(x, w, **kwargs),
                             rtol=1e-5, atol=1e-5)
  g_ours = jax.grad(lambda x, w: loss(conv_fn, x, w), argnums=(0, 1))(x, w)
  g_xla = jax.grad(lambda x, w: loss(jax.lax.conv_general_dilated, x, w), argnums=(0, 1))(x, w)
  for a, b in zip(g_ours, g_xla):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,stride,dilation", [(3, 1, 1), (5, 2, 1), (3, 1, 2), (5, 1, 2)])
def test_depthwise_conv_matches_grouped_conv_and_counts_the_same(k, stride, dilation):
  """The CPU depthwise conv (a dense conv of a diagonal kernel) equals XLA's grouped conv, value
  and gradients, and its MACs are counted as the depthwise conv's."""
  from dynroute_jax.models import common  # pylint: disable=g-import-not-at-top
  c, h = 8, 9
  x, w, kwargs = _depthwise_case(c, h, k, stride, dilation)
  _assert_matches_xla_conv(common.depthwise_conv, x, w, kwargs)
  # On CPU the dense conv is what runs (no grouped convolution in the jaxpr) ...
  fn = lambda x, w: common.depthwise_conv(x, w, **kwargs)
  if jax.default_backend() == "cpu":
    assert f"feature_group_count={c}" not in str(jax.make_jaxpr(fn)(x, w))
  # ... yet MACs are counted from the one convolution: Ho*Wo*C*k*k per image.
  p = dilation * (k // 2)
  ho = (h + 2 * p - dilation * (k - 1) - 1) // stride + 1
  assert costs.count_macs(fn, x[:1], w) == ho * ho * c * k * k


@pytest.mark.parametrize("size,k,stride,dilation", [
    (9, 3, 1, 1), (8, 5, 2, 1), (9, 3, 1, 2), (8, 5, 1, 2), (2, 5, 1, 1), (2, 5, 2, 1),
    (1, 3, 1, 1), (4, 5, 2, 2)])
def test_depthwise_taps_matches_grouped_conv_and_counts_the_same(size, k, stride, dilation,
                                                               monkeypatch):
  """The taps depthwise conv (a sum of shifted taps on CPU) equals XLA's grouped conv, value and
  gradients, also on maps smaller than the kernel (taps that read only padding are left out), has
  no convolution in its forward pass on CPU, nor in its gradients when strided (stride 1 keeps the
  diagonal kernel's VJP), and counts the depthwise conv's MACs."""
  from dynroute_jax.models import common  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(common, "TAPS_MIN_ACTIVATIONS", 0)  # taps on these small maps too
  c = 6
  x, w, kwargs = _depthwise_case(c, size, k, stride, dilation)
  _assert_matches_xla_conv(common.depthwise_taps, x, w, kwargs)
  fn = lambda x, w: common.depthwise_taps(x, w, **kwargs)
  if jax.default_backend() == "cpu":
    assert "conv_general_dilated" not in str(jax.make_jaxpr(fn)(x, w))
    grads = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(fn(x, w) ** 2), argnums=(0, 1)))(x, w)
    assert ("conv_general_dilated" in str(grads)) == (stride == 1)
  ho = jax.eval_shape(fn, x, w).shape[1]
  assert costs.count_macs(fn, x[:1], w) == ho * ho * c * k * k


@pytest.mark.parametrize("train", [False, True])
def test_sep_conv_runs_its_depthwise_convs_as_taps(train, monkeypatch):
  """A SepConv's depthwise convs are taps on CPU in both modes (its two pointwise convs remain in
  the forward pass); values and parameter gradients are those of the diagonal-kernel convs."""
  from dynroute_jax.models import common  # pylint: disable=g-import-not-at-top
  module = ops.SepConv(8, 5, 1)
  x = _normal(3, (2, 16, 16, 8))  # 2048 values per example: taps (TAPS_MIN_ACTIVATIONS)
  variables = module.init(jax.random.key(0), x, train=False)

  def loss(params, x):
    y = module.apply({**variables, "params": params}, x, train=train, mutable=["batch_stats"])[0]
    return jnp.sum(jnp.sin(y))

  if jax.default_backend() == "cpu":
    assert str(jax.make_jaxpr(loss)(variables["params"], x)).count("conv_general_dilated[") == 2
  ours = jax.value_and_grad(loss)(variables["params"], x)
  monkeypatch.setattr(common, "depthwise_taps", common.depthwise_conv)
  diagonal = jax.value_and_grad(loss)(variables["params"], x)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(diagonal)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_strided_taps_whose_taps_read_only_padding(monkeypatch):
  """A 1x1 kernel with stride 4 on a 1x1 map padded by 2 reads padding only: zero outputs and
  zero gradients, as XLA's grouped conv."""
  from dynroute_jax.models import common  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(common, "TAPS_MIN_ACTIVATIONS", 0)
  x, w = _normal(1, (2, 1, 1, 3)), _normal(2, (1, 1, 1, 3))
  kwargs = dict(window_strides=(4, 4), padding=((2, 2), (2, 2)), feature_group_count=3,
                dimension_numbers=jax.lax.conv_dimension_numbers(
                    x.shape, w.shape, ("NHWC", "HWIO", "NHWC")))
  _assert_matches_xla_conv(common.depthwise_taps, x, w, kwargs)
  assert not np.any(jax.grad(lambda w: jnp.sum(common.depthwise_taps(x, w, **kwargs)))(w))


def test_depthwise_taps_keep_the_diagonal_kernel_on_small_maps():
  """Below TAPS_MIN_ACTIVATIONS values per example the depthwise conv stays the (faster-compiling)
  diagonal kernel; from there on it is taps."""
  from dynroute_jax.models import common  # pylint: disable=g-import-not-at-top
  w = _normal(2, (3, 3, 1, 8))
  kwargs = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), feature_group_count=8,
                dimension_numbers=jax.lax.conv_dimension_numbers(
                    (1, 16, 16, 8), w.shape, ("NHWC", "HWIO", "NHWC")))
  for hw, taps in ((15, False), (16, True)):  # 15 * 15 * 8 = 1800 and 16 * 16 * 8 = 2048 values
    x = _normal(1, (2, hw, hw, 8))
    jaxpr = str(jax.make_jaxpr(lambda x, w: common.depthwise_taps(x, w, **kwargs))(x, w))
    if jax.default_backend() == "cpu":
      assert ("conv_general_dilated" not in jaxpr) == taps
    np.testing.assert_allclose(common.depthwise_taps(x, w, **kwargs),
                               jax.lax.conv_general_dilated(x, w, **kwargs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,k,stride,groups", [
    (4, 5, 1, 1), (2, 3, 1, 1), (2, 5, 1, 1), (1, 3, 1, 1), (3, 5, 1, 4), (4, 5, 2, 1),
    (2, 3, 2, 4), (8, 5, 1, 1), (8, 3, 2, 4)])
def test_conv_on_maps_smaller_than_the_kernel_matches_xla(size, k, stride, groups):
  """`common.conv`'s convolution (kernel taps that only meet padding dropped, the padding applied
  ahead behind a barrier) equals XLA's, value and gradients, and counts the same MACs."""
  from dynroute_jax.models import common  # pylint: disable=g-import-not-at-top
  c = 4
  x = _normal(1, (3, size, size, c))
  w = _normal(2, (k, k, c // groups, c))
  p = k // 2
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  kwargs = dict(window_strides=(stride, stride), padding=((p, p), (p, p)), dimension_numbers=dn,
                feature_group_count=groups)
  ours = common.depthwise_conv if groups > 1 else common.small_map_conv
  _assert_matches_xla_conv(ours, x, w, kwargs)
  ho = (size + 2 * p - k) // stride + 1
  macs = costs.count_macs(lambda x, w: ours(x, w, **kwargs), x[:1], w)
  assert macs == ho * ho * k * k * (c // groups) * c


def test_conv_on_a_map_smaller_than_the_kernel_keeps_its_operands_on_cpu():
  """XLA:CPU swaps the operands of a convolution whose kernel covers more positions than its
  input (its algebraic simplifier) and runs the swapped form several times slower; the layers'
  convolution keeps the feature map as the input, forward and backward."""
  if jax.default_backend() != "cpu":
    pytest.skip("a CPU compiler behaviour")
  from dynroute_jax.models import common  # pylint: disable=g-import-not-at-top
  x = jnp.ones((8, 4, 4, 16))
  module = common.conv(16, 5)
  params = module.init(jax.random.key(0), x)
  hlo = jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply(p, x) ** 2), argnums=(0, 1))).lower(
      params, x).compile().as_text()
  convs = [l for l in hlo.splitlines() if " convolution(" in l]
  assert len(convs) == 3, convs  # Forward, input gradient, kernel gradient.
  # A swapped convolution reverses its window (the kernel becomes the data); none here.
  assert not [l for l in convs if "rhs_reversal" in l], convs


@pytest.mark.parametrize("shape", [(3, 7, 7, 2), (2, 8, 8, 3), (2, 4, 4, 5), (2, 2, 2, 1),
                                   (1, 1, 1, 2), (2, 5, 6, 2)])
@pytest.mark.parametrize("stride", [1, 2])
def test_max_pool_matches_xla_values_and_gradients_with_ties(shape, stride):
  """`ops.max_pool_3x3` (slices, own gradient) equals XLA's reduce-window max pool, and its
  gradient goes where XLA's does: to the first maximum of each window, also among ties (small
  integers tie often, as flat regions of real images do)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(stride).integers(0, 3, shape), jnp.float32)
  xla = lambda x: nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)))
  ours = lambda x: ops.max_pool_3x3(x, stride)
  np.testing.assert_array_equal(ours(x), xla(x))
  np.testing.assert_array_equal(jax.jit(ours)(x), xla(x))
  # Integer weights: sums of gradients are exact whatever their order, so the same winners give
  # bitwise the same gradient; with real weights the order of those sums may differ in the last bit.
  for w, check in ((jnp.asarray(np.random.default_rng(3).integers(1, 9, xla(x).shape), jnp.float32),
                    np.testing.assert_array_equal),
                   (_normal(4, xla(x).shape),
                    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6))):
    check(jax.grad(lambda x: jnp.sum(ours(x) * w))(x), jax.grad(lambda x: jnp.sum(xla(x) * w))(x))


def test_max_pool_gradient_is_elementwise_on_cpu():
  """The pool's gradient compiles to no select-and-scatter (XLA:CPU's slow path) on CPU."""
  if jax.default_backend() != "cpu":
    pytest.skip("a CPU compiler behaviour")
  x = jnp.ones((4, 8, 8, 3))
  module = ops.MaxPool3x3(2)
  hlo = jax.jit(jax.grad(lambda x: jnp.sum(module.apply({}, x) ** 2))).lower(x).as_text()
  assert "select_and_scatter" not in hlo and "reduce_window" not in hlo
