"""Sharding tests on 8 fake CPU devices.

The device count must be fixed before JAX initialises its backend, and other test modules may
already have done so in this process. So `test_on_8_fake_devices` re-runs this module in a fresh
subprocess with DYNROUTE_SHARDING_8DEV=1; there the module sets 8 CPU devices at import and the
`inner_*` tests run. Outside that subprocess the inner tests are skipped.
"""

import os
import subprocess
import sys

import pytest

from conftest import xla_flags  # pylint: disable=g-bad-import-order

_INNER = os.environ.get("DYNROUTE_SHARDING_8DEV") == "1"

if _INNER:
  import jax

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 8)

inner = pytest.mark.skipif(not _INNER, reason="runs inside test_on_8_fake_devices' subprocess")


@pytest.mark.skipif(_INNER, reason="outer driver")
def test_on_8_fake_devices():
  env = dict(os.environ, DYNROUTE_SHARDING_8DEV="1", JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = xla_flags()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
       "-o", "addopts=", os.path.abspath(__file__)],
      cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
  assert " passed" in proc.stdout, proc.stdout[-2000:]


# ----------------------------------------------------------------------------------------------
# Inner tests (8 fake CPU devices).
# ----------------------------------------------------------------------------------------------


def _mesh_cfg(data=-1, fsdp=1):
  import ml_collections
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, param_sharding="replicated"))


@inner
def test_inner_mesh_shapes():
  from dynroute_jax import sharding
  assert jax.device_count() == 8
  for (d, f), want in {(-1, 1): (8, 1), (-1, 2): (4, 2), (-1, 8): (1, 8), (2, 4): (2, 4),
                       (8, 1): (8, 1)}.items():
    mesh = sharding.make_mesh(_mesh_cfg(d, f))
    assert mesh.axis_names == ("data", "fsdp")
    assert tuple(mesh.shape.values()) == want
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  one = sharding.make_mesh(_mesh_cfg(), devices=jax.devices()[:1])
  assert dict(one.shape) == {"data": 1, "fsdp": 1}


@inner
def test_inner_mesh_errors():
  from dynroute_jax import sharding
  with pytest.raises(ValueError, match=r"config\.mesh\.fsdp=3.*device count 8"):
    sharding.make_mesh(_mesh_cfg(-1, 3))
  with pytest.raises(ValueError, match=r"config\.mesh\.data=2 x config\.mesh\.fsdp=2 = 4.*8 devices"):
    sharding.make_mesh(_mesh_cfg(2, 2))
  with pytest.raises(ValueError, match=r"config\.mesh\.data"):
    sharding.make_mesh(_mesh_cfg(0, 1))
  with pytest.raises(ValueError, match=r"config\.mesh\.fsdp"):
    sharding.make_mesh(_mesh_cfg(-1, 0))


@inner
def test_inner_check_batch():
  from dynroute_jax import sharding
  mesh = sharding.make_mesh(_mesh_cfg())
  assert sharding.check_batch(128, mesh, 1) == 128
  assert sharding.check_batch(128, mesh, 2) == 64
  with pytest.raises(ValueError, match=r"config\.train\.global_batch_size=100.*device count 8"):
    sharding.check_batch(100, mesh, 1)
  with pytest.raises(ValueError, match=r"global_batch_size=8 .*process count 16"):
    sharding.check_batch(8, mesh, 16)


def _train_state(hidden=256, dim=128):
  """Abstract params + optax SGD-momentum state with the nesting optax really produces."""
  import jax.numpy as jnp
  import optax
  params = {"params": {
      "Dense_0": {"kernel": jnp.zeros((dim, hidden)), "bias": jnp.zeros((hidden,))},
      "Conv_0": {"kernel": jnp.zeros((3, 3, 64, 96))},                  # 55296 elems
      "router": {"kernel": jnp.zeros((40, 10))},                         # small
      "odd": {"kernel": jnp.zeros((127, 131))},                          # big, indivisible
  }}
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.inject_hyperparams(optax.sgd)(
      learning_rate=0.1, momentum=0.9))
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  return jax.eval_shape(lambda: state)


@inner
def test_inner_fsdp_rules_shard_big_and_replicate_small():
  from jax.sharding import PartitionSpec as P
  from dynroute_jax import sharding
  mesh = sharding.make_mesh(_mesh_cfg(-1, 4))
  abstract = _train_state()
  shardings = sharding.tree_shardings(abstract, mesh, "fsdp")
  flat = {sharding.path_str(p): s.spec for p, s in
          jax.tree_util.tree_flatten_with_path(shardings)[0]}
  p = "params/params/"
  assert flat[p + "Dense_0/kernel"] == P(None, "fsdp")      # 256 > 128: the larger dim
  assert flat[p + "Conv_0/kernel"] == P(None, None, None, "fsdp")
  assert flat[p + "Dense_0/bias"] == P()                      # 256 elements < 2**14
  assert flat[p + "router/kernel"] == P()
  assert flat[p + "odd/kernel"] == P()                        # no dim divisible by 4
  assert flat["step"] == P()
  # Optimizer state mirrors parameter paths under optax prefixes and gets the same specs.
  moms = {k: v for k, v in flat.items() if k.startswith("opt_state") and "trace" in k}
  assert len(moms) == 5, flat.keys()
  for k, v in moms.items():
    assert v == flat[p + k.split("/params/", 1)[1]], k
  assert all(v == P() for k, v in flat.items() if "hyperparams" in k)
  # Replicated rules: everything P().
  rep = sharding.tree_shardings(abstract, mesh, "replicated")
  assert all(s.spec == P() for s in jax.tree_util.tree_leaves(rep))
  # fsdp axis of size 1: replicated.
  flat1 = sharding.tree_specs(abstract, sharding.make_mesh(_mesh_cfg(-1, 1)), "fsdp")
  assert all(s == P() for s in jax.tree_util.tree_leaves(flat1, is_leaf=lambda x: isinstance(x, P)))
  text = sharding.sharding_summary(abstract, shardings)
  assert "per device" in text and "Conv_0/kernel" in text


@inner
def test_inner_custom_rules_and_errors():
  from jax.sharding import PartitionSpec as P
  from dynroute_jax import sharding
  mesh = sharding.make_mesh(_mesh_cfg(-1, 2))
  abstract = _train_state()
  rules = [("Conv_0/kernel$", P(None, None, "fsdp", None)), ("router", P()), (".*", "fsdp")]
  specs = sharding.tree_specs(abstract, mesh, rules)
  flat = {sharding.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, P))[0]}
  conv = [v for k, v in flat.items() if k.endswith("Conv_0/kernel")]
  assert len(conv) == 2 and all(v == P(None, None, "fsdp", None) for v in conv)
  with pytest.raises(ValueError, match="No sharding rule matches"):
    sharding.tree_specs(abstract, mesh, [("Conv", P())])
  with pytest.raises(ValueError, match="must divide evenly"):
    sharding.tree_specs(abstract, mesh, [("odd", P("fsdp")), (".*", P())])
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    sharding.tree_specs(abstract, mesh, [(".*kernel", P("model")), (".*", P())])
  with pytest.raises(ValueError, match="param_sharding"):
    sharding.tree_specs(abstract, mesh, "zero3")


def _sgd_steps(mesh, param_sharding, x, y, w0, steps=3):
  """A jitted data-parallel least-squares SGD step (mean of squares), run `steps` times."""
  import jax.numpy as jnp
  from dynroute_jax import sharding
  params = {"w": w0, "b": jnp.zeros((w0.shape[1],))}
  p_sh = sharding.tree_shardings(jax.eval_shape(lambda: params), mesh, param_sharding)
  b_sh = sharding.batch_sharding(mesh)

  def loss_fn(p, x, y):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

  @jax.jit
  def step(p, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), loss

  step = jax.jit(step, in_shardings=(p_sh, b_sh, b_sh), out_shardings=(p_sh, sharding.replicated(mesh)))
  params = jax.device_put(params, p_sh)
  batch = sharding.make_global_batch({"x": x, "y": y}, mesh)
  assert batch["x"].sharding == b_sh
  losses = []
  for _ in range(steps):
    params, loss = step(params, batch["x"], batch["y"])
    losses.append(float(loss))
  return jax.device_get(params), losses, params


@inner
def test_inner_one_vs_eight_devices_same_result():
  import numpy as np
  from jax.sharding import PartitionSpec as P
  from dynroute_jax import sharding
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 128)).astype(np.float32)
  y = rng.normal(size=(64, 128)).astype(np.float32)
  w0 = (0.05 * rng.normal(size=(128, 128))).astype(np.float32)  # 2**14 elements: FSDP-sharded
  ref, ref_losses, _ = _sgd_steps(sharding.make_mesh(_mesh_cfg(), jax.devices()[:1]), "replicated",
                                  x, y, w0)
  for cfg, mode in ((_mesh_cfg(-1, 1), "replicated"), (_mesh_cfg(-1, 2), "fsdp"),
                    (_mesh_cfg(2, 4), "fsdp")):
    mesh = sharding.make_mesh(cfg)
    got, losses, live = _sgd_steps(mesh, mode, x, y, w0)
    if mode == "fsdp":
      assert live["w"].sharding.spec == P(None, "fsdp")
      assert live["w"].addressable_shards[0].data.shape == (128, 128 // mesh.shape["fsdp"])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for k in ref:
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-7)


@inner
def test_inner_make_global_batch():
  import numpy as np
  from dynroute_jax import sharding
  mesh = sharding.make_mesh(_mesh_cfg(-1, 2))
  local = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
           "label": np.arange(16, dtype=np.int32), "nested": {"mask": np.ones((16,), bool)}}
  batch = sharding.make_global_batch(local, mesh)
  assert batch["image"].shape == (16, 3) and batch["label"].dtype == np.int32
  np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])
  np.testing.assert_array_equal(np.asarray(batch["nested"]["mask"]), local["nested"]["mask"])
  # Each device holds 2 consecutive examples; the devices cover the batch in mesh order.
  for shard in batch["label"].addressable_shards:
    assert shard.data.shape == (2,)
    np.testing.assert_array_equal(np.asarray(shard.data), local["label"][shard.index[0]])
  with pytest.raises(ValueError, match="divisible by the 8 local devices"):
    sharding.make_global_batch({"x": np.zeros((12, 2))}, mesh)


@inner
def test_inner_dry_run_report():
  import jax.numpy as jnp
  from dynroute_jax import sharding
  mesh = sharding.make_mesh(_mesh_cfg())
  f = jax.jit(lambda x, w: jnp.sum((x @ w) ** 2),
              in_shardings=(sharding.batch_sharding(mesh), sharding.replicated(mesh)))
  compiled = f.lower(jax.ShapeDtypeStruct((64, 32), jnp.float32),
                     jax.ShapeDtypeStruct((32, 16), jnp.float32)).compile()
  text = sharding.dry_run_report(compiled, num_devices=8, examples_per_step=64)
  assert "memory per device: arguments" in text and "FLOPs per step per device" in text, text

  class Broken:
    def memory_analysis(self):
      raise NotImplementedError("nope")

    def cost_analysis(self):
      return [None]

  text = sharding.dry_run_report(Broken())
  assert "unavailable" in text and "NotImplementedError" in text

  class Dicts:
    def memory_analysis(self):
      return [{"argument_size_in_bytes": 2048, "temp_size_in_bytes": 1 << 20}]

    def cost_analysis(self):
      return [{"flops": 2.5e9}]

  text = sharding.dry_run_report(Dicts(), num_devices=4)
  assert "1.00 MiB" in text and "2.500 G" in text and "10.000 G" in text, text
