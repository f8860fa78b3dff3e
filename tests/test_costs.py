"""MACs are counted from traced computations; parameters from the params collection."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from dynroute_jax import costs


def _sds(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_conv_dense_grouped():
  assert costs.module_macs(nn.Conv(8, (3, 3)), (1, 8, 8, 3)) == 8 * 8 * 8 * 3 * 9
  assert costs.module_macs(nn.Conv(8, (3, 3), strides=2), (2, 8, 8, 3)) == 2 * 4 * 4 * 8 * 3 * 9
  # Depthwise: each output accumulates over one input channel only.
  assert costs.module_macs(nn.Conv(6, (5, 5), feature_group_count=6), (1, 8, 8, 6)) == 8 * 8 * 6 * 25
  assert costs.module_macs(nn.Dense(7), (3, 11)) == 3 * 7 * 11


def test_pooling_and_elementwise_are_free():
  f = lambda x: nn.max_pool(jax.nn.relu(x) * 2 + 1, (3, 3), padding="SAME")
  assert costs.count_macs(f, _sds(1, 8, 8, 4)) == 0


def test_scan_multiplies_and_cond_takes_max():
  w = jnp.ones((4, 4))

  def scanned(x):
    return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]

  assert costs.count_macs(scanned, _sds(2, 4)) == 5 * 2 * 4 * 4

  def branched(p, x):
    return jax.lax.cond(p, lambda x: x @ w @ w, lambda x: x, x)

  assert costs.count_macs(branched, jax.ShapeDtypeStruct((), jnp.bool_), _sds(2, 4)) == 2 * 2 * 4 * 4


def test_params():
  assert costs.module_params(nn.Conv(8, (3, 3)), (1, 8, 8, 3)) == 8 * 27 + 8
  params = {"router": {"kernel": jnp.zeros((3, 4))}, "conv": {"kernel": jnp.zeros((2, 2))},
            "aux_head": {"bias": jnp.zeros(5)}}
  chex.assert_trees_all_equal(costs.params_by_group(params, {"routers": "router", "aux": "aux_head"}),
                              {"routers": 12, "aux": 5, "backbone": 4})
