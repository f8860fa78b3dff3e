"""Behaviour of the CoDiNet model: routing modes, skipping semantics, exact sizes and costs."""

from __future__ import annotations

import functools
import re
import types
from unittest import mock

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from dynroute_jax import costs
from dynroute_jax import dispatch
from dynroute_jax import models
from dynroute_jax.models import base
from dynroute_jax.models import codinet
from dynroute_jax.train_step import INIT_COMPILER_OPTIONS

# One worker runs this file: its tests share cached models and variables (_init), which two
# workers would each build again.
pytestmark = pytest.mark.xdist_group("test_codinet")

# Tiny CIFAR-style net: 3 blocks per stage (so blocks 1-2 of each stage are scanned), 4 channels.
TINY = dict(variant="resnet20", width=4, image_size=8)
B = 2


def _model(scan=True, **overrides):
  cfg = codinet.default_config(TINY["variant"], num_classes=5, image_size=TINY["image_size"])
  cfg.width = TINY["width"]
  cfg.scan_blocks = scan
  cfg.update(overrides)
  return codinet.from_config(cfg)


def _images(seed=0, batch=B, size=TINY["image_size"]):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


@functools.lru_cache(maxsize=None)
def _init(scan=True, **overrides):
  model = _model(scan, **overrides)
  init = jax.jit(lambda x: model.init({"params": jax.random.key(0)}, x, train=False),
                 compiler_options=INIT_COMPILER_OPTIONS)
  variables = init(_images())
  return model, variables


@functools.lru_cache(maxsize=None)
def _japply(model):
  """model.apply under jit (eager Flax dispatch compiles every small op: slow on shared CPUs)."""
  return jax.jit(model.apply, static_argnames=("train", "threshold", "hard", "mutable",
                                               "drop_path_rate", "strategy"))


def _set_router_bias(params, run_logit_minus_skip):
  """Zero every router's last layer and set its bias so logits = (0, delta): v = sigmoid(delta)."""
  def fix(path, leaf):
    p = costs.path_str(path)
    if "router/fc2/kernel" in p:
      return jnp.zeros_like(leaf)
    if "router/fc2/bias" in p:
      return jnp.zeros_like(leaf).at[..., 1].set(run_logit_minus_skip)
    return leaf
  return jax.tree_util.tree_map_with_path(fix, params)


class ForwardTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("train", "train"), ("eval_all", "eval_all"),
                                  ("eval_threshold", "eval_threshold"), ("finetune", "finetune"))
  def test_shapes_and_finite(self, mode):
    model, variables = _init()
    x = _images()
    d = 9

    def fwd(variables, x, key):
      if mode == "train":
        return model.apply(variables, x, train=True, rngs={"routing": key}, mutable=["batch_stats"])
      if mode == "finetune":
        return model.apply(variables, x, train=True, hard=True, mutable=["batch_stats"])
      thr = None if mode == "eval_all" else 0.5
      return model.apply(variables, x, train=False, threshold=thr), {}

    out, _ = self.variant(fwd)(variables, x, jax.random.key(1))
    self.assertIsInstance(out, base.ModelOutput)
    chex.assert_shape(out.logits, (B, 5))
    chex.assert_shape([out.weights, out.executed, out.path], (B, d))
    chex.assert_shape([out.macs_table, out.params_table], (d,))
    chex.assert_shape([out.macs_fixed, out.params_fixed], ())
    self.assertEqual(out.site_shape, (d,))
    self.assertIsNone(out.aux_logits)
    chex.assert_tree_all_finite(out)
    chex.assert_shape([out.expected_macs, out.executed_macs, out.executed_params], (B,))
    path = np.asarray(out.path)
    self.assertTrue(np.all((path > 0) & (path < 1)))
    if mode in ("train", "eval_all"):
      np.testing.assert_array_equal(out.executed, 1.0)
    else:
      self.assertTrue(np.all((np.asarray(out.executed) == 0) | (np.asarray(out.executed) == 1)))
    if mode == "train":
      np.testing.assert_allclose(out.weights, out.path)
      np.testing.assert_allclose(out.expected_macs, out.macs_fixed + out.path @ out.macs_table,
                                 rtol=1e-6)
    else:
      np.testing.assert_array_equal(np.asarray(out.weights) >= 0.5, path >= 0.5)
      np.testing.assert_array_equal(out.weights, (path >= 0.5).astype(np.float32))

  def test_rng_determinism(self):
    model, variables = _init()
    x = _images()
    fwd = jax.jit(lambda key: model.apply(variables, x, train=True, rngs={"routing": key},
                                          mutable=["batch_stats"])[0])
    a, b, c = fwd(jax.random.key(3)), fwd(jax.random.key(3)), fwd(jax.random.key(4))
    chex.assert_trees_all_equal(a, b)
    self.assertFalse(np.allclose(a.path, c.path))
    self.assertFalse(np.allclose(a.logits, c.logits))

  def test_training_needs_routing_rng(self):
    model, variables = _init()
    with self.assertRaises(Exception):
      model.apply(variables, _images(), train=True, mutable=["batch_stats"])

  def test_eval_deterministic_without_rng(self):
    model, variables = _init()
    x = _images()
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False, threshold=0.5))
    chex.assert_trees_all_equal(fwd(variables, x), fwd(variables, x))

  def test_gradients_reach_every_router(self):
    model, variables = _init()
    x = _images()

    def loss(params):
      out, _ = model.apply({**variables, "params": params}, x, train=True,
                           rngs={"routing": jax.random.key(5)}, mutable=["batch_stats"])
      return jnp.sum(out.logits ** 2) + jnp.sum(out.expected_macs) * 1e-6

    grads = jax.jit(jax.grad(loss))(variables["params"])
    router_grads = {costs.path_str(p): g for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]
                    if "router" in costs.path_str(p) and p[-1].key == "kernel"}
    self.assertLen(router_grads, 2 * 6)  # fc1 and fc2 of 3 stages x (first block + scanned group).
    for name, g in router_grads.items():
      g = np.abs(np.asarray(g))
      if "blocks" in name:  # scanned: every stacked block gets its own gradient.
        self.assertTrue(np.all(g.reshape(g.shape[0], -1).sum(axis=1) > 0), name)
      else:
        self.assertGreater(g.sum(), 0, name)

  def test_finetune_hard_decisions_straight_through(self):
    model, variables = _init()
    x = _images()

    def loss(params):
      out, _ = model.apply({**variables, "params": params}, x, train=True, hard=True,
                           mutable=["batch_stats"])
      return jnp.sum(out.logits ** 2), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    w = np.asarray(out.weights)
    np.testing.assert_allclose(w, np.round(w), atol=1e-6)
    np.testing.assert_array_equal(out.executed, (np.asarray(out.path) >= 0.5).astype(np.float32))
    g = grads["stage1_block0"]["router"]["fc2"]["kernel"]
    self.assertGreater(float(jnp.abs(g).sum()), 0.0)

  def test_drop_path_uses_dropout_stream(self):
    model, variables = _init()
    out, _ = jax.jit(lambda k: model.apply(variables, _images(), train=True, drop_path_rate=0.5,
                                           rngs={"routing": k, "dropout": k},
                                           mutable=["batch_stats"]))(jax.random.key(0))
    chex.assert_tree_all_finite(out.logits)
    # The trainer ramps the rate: a traced value must work too.
    out_t, _ = jax.jit(lambda k, r: model.apply(variables, _images(), train=True, drop_path_rate=r,
                                                rngs={"routing": k, "dropout": k},
                                                mutable=["batch_stats"]))(jax.random.key(0), 0.5)
    np.testing.assert_allclose(out_t.logits, out.logits, rtol=1e-5, atol=1e-5)


class SkipSemanticsTest(parameterized.TestCase):

  def _all_skipped_reference(self, model, variables, x):
    """Stem, then every block replaced by its skip path (identity / option-A), then the head."""
    p, bs = variables["params"], variables["batch_stats"]
    stem = codinet.Stem(model.config.width, False)
    y = stem.apply({"params": p["stem"], "batch_stats": bs["stem"]}, x, train=False)
    for spec in model.block_specs(x.shape[1:3]):
      if spec.skip != "identity":
        y = codinet.option_a_shortcut(y, spec.out_features, spec.stride)
    return codinet.Head(model.config.num_classes).apply({"params": p["head"]}, y)

  @parameterized.parameters(True, False)
  def test_all_skipped_equals_shortcut_network(self, scan):
    model, variables = _init(scan)
    variables = {**variables, "params": _set_router_bias(variables["params"], -20.0)}
    x = _images(1)
    out = _japply(model)(variables, x, train=False, threshold=0.5)
    np.testing.assert_array_equal(out.executed, 0.0)
    np.testing.assert_allclose(out.executed_macs, out.macs_fixed)
    ref = jax.jit(functools.partial(self._all_skipped_reference, model))(variables, x)
    np.testing.assert_allclose(out.logits, ref, rtol=1e-5, atol=1e-5)
    # Everything forced to run equals "all blocks".
    variables_run = {**variables, "params": _set_router_bias(variables["params"], 20.0)}
    run = _japply(model)(variables_run, x, train=False, threshold=0.5)
    full = _japply(model)(variables_run, x, train=False)
    np.testing.assert_array_equal(run.executed, 1.0)
    np.testing.assert_allclose(run.logits, full.logits, rtol=1e-5, atol=1e-5)

  def test_single_skipped_block_is_identity(self):
    """Skipping one block of stage 2 equals a manual composition that leaves it out."""
    model, variables = _init(False)
    params = _set_router_bias(variables["params"], 20.0)
    params["stage2_block1"]["router"]["fc2"]["bias"] = jnp.array([0.0, -20.0])
    x = _images(2)
    out = _japply(model)({**variables, "params": params}, x, train=False, threshold=0.5)
    expected = np.ones((B, 9), np.float32)
    expected[:, 4] = 0
    np.testing.assert_array_equal(out.executed, expected)

    # Manual: run every block's body except stage2_block1.
    bs = variables["batch_stats"]
    y = codinet.Stem(model.config.width, False).apply(
        {"params": params["stem"], "batch_stats": bs["stem"]}, x, train=False)
    for spec in model.block_specs(x.shape[1:3]):
      if spec.site == "stage2_block1":
        continue
      body = spec.body().apply({"params": params[spec.site]["body"],
                                "batch_stats": bs[spec.site]["body"]}, y, train=False)
      sc = y if spec.shortcut == "identity" else codinet.option_a_shortcut(
          y, spec.out_features, spec.stride)
      y = jax.nn.relu(body + sc)
    ref = codinet.Head(model.config.num_classes).apply({"params": params["head"]}, y)
    np.testing.assert_allclose(out.logits, ref, rtol=1e-5, atol=1e-5)

  def test_tiny_threshold_equals_all_blocks(self):
    model, variables = _init()
    x = _images(3)
    a = _japply(model)(variables, x, train=False, threshold=1e-6)
    b = _japply(model)(variables, x, train=False)
    np.testing.assert_array_equal(a.executed, 1.0)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-6, atol=1e-6)

  def test_conv1x1_skip_option(self):
    model, variables = _init(True, skip_downsample="conv1x1", router_activation="none")
    self.assertIn("skip", variables["params"]["stage2_block0"])
    variables = {**variables, "params": _set_router_bias(variables["params"], -20.0)}
    out = _japply(model)(variables, _images(), train=False, threshold=0.5)
    np.testing.assert_array_equal(out.executed, 0.0)
    chex.assert_tree_all_finite(out.logits)
    chunked = _japply(model)(variables, _images(), train=False, threshold=0.5, strategy="chunk")
    np.testing.assert_allclose(chunked.logits, out.logits, rtol=1e-5, atol=1e-5)
    summary = model.cost_tables((8, 8, 3))
    self.assertGreater(summary.params["shortcuts"], 0)


class DispatchTest(parameterized.TestCase):

  @parameterized.parameters(("chunk", True), ("compact", True), ("batch_cond", False),
                            ("per_example", False), ("auto", False))
  def test_strategies_match_dense(self, strategy, scan):
    """Really skipping blocks gives the dense-and-mask reference's outputs."""
    model, variables = _init(scan)
    x = _images(6, batch=4)
    # Mixed decisions: shift router biases so roughly half of the (example, block) pairs run.
    ref = _japply(model)(variables, x, train=False, threshold=0.5)
    executed = np.asarray(ref.executed)
    self.assertTrue(0 < executed.sum() < executed.size, executed)
    out = _japply(model)(variables, x, train=False, threshold=0.5, strategy=strategy)
    np.testing.assert_array_equal(out.executed, executed)
    np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-5, atol=1e-5)

  @parameterized.parameters(True, False)
  def test_strategy_options_reach_the_dispatcher(self, scan):
    """A strategy object with options runs every block (scanned or not) with those options."""
    model, variables = _init(scan)
    x = _images(6, batch=4)
    ref = _japply(model)(variables, x, train=False, threshold=0.5)
    compact = dispatch.Compact(buckets=(1, 2), branching="cond_chain")
    seen = []
    update = dispatch.Compact.update
    with mock.patch.object(dispatch.Compact, "update",
                           lambda s, *a: seen.append(s) or update(s, *a)):
      out = _japply(model)(variables, x, train=False, threshold=0.5, strategy=compact)
    self.assertEqual(set(seen), {compact})
    np.testing.assert_array_equal(out.executed, ref.executed)
    np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-5, atol=1e-5)

  def test_projection_shortcut_strategy(self):
    """Bottleneck blocks (projection shortcut kept by skipped blocks) under a skipping strategy."""
    cfg = codinet.default_config("resnet26", num_classes=3, image_size=32)
    cfg.width = 2
    model = codinet.from_config(cfg)
    x = _images(7, batch=3, size=32)
    variables = jax.jit(lambda x: model.init({"params": jax.random.key(0)}, x, train=False),
                        compiler_options=INIT_COMPILER_OPTIONS)(x)
    ref = _japply(model)(variables, x, train=False, threshold=0.5)
    out = _japply(model)(variables, x, train=False, threshold=0.5, strategy="compact")
    np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    chex.assert_shape(out.path, (3, 8))


class ScanEquivalenceTest(parameterized.TestCase):

  def test_scan_matches_unscanned(self):
    m_loop, v_loop = _init(False)
    m_scan, v_scan = _init(True)
    self.assertEqual(costs.count_params(v_loop["params"]), costs.count_params(v_scan["params"]))
    restructured = {c: codinet.unscanned_to_scanned(v_loop[c], "resnet20") for c in v_loop}
    chex.assert_trees_all_equal_shapes(restructured, v_scan)
    x = _images(4)
    for thr in (None, 0.5):
      a = _japply(m_loop)(v_loop, x, train=False, threshold=thr)
      b = _japply(m_scan)(restructured, x, train=False, threshold=thr)
      chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-5)
    # Training: batch statistics updated identically (routing noise differs by construction).
    _, st_a = _japply(m_loop)(v_loop, x, train=True, hard=True, mutable=("batch_stats",))
    _, st_b = _japply(m_scan)(restructured, x, train=True, hard=True, mutable=("batch_stats",))
    chex.assert_trees_all_close(codinet.unscanned_to_scanned(st_a["batch_stats"], "resnet20"),
                                st_b["batch_stats"], rtol=1e-5, atol=1e-6)


  def test_scanned_blocks_unrolled_on_cpu(self):
    """On CPU the scanned blocks lower without a while loop (XLA:CPU's conv gradients in a loop
    made a ResNet-32 train step 27x slower); the stacked parameter layout is unchanged."""
    model, variables = _init(True)
    x = _images(2)

    def loss(params):
      out = model.apply({**variables, "params": params}, x, train=False)
      return jnp.sum(out.logits)

    hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).as_text()
    self.assertEqual("while" in hlo, jax.default_backend() != "cpu")
    stacked = variables["params"]["stage1_blocks"]
    self.assertEqual(jax.tree.leaves(stacked)[0].shape[0], 2)  # blocks 1-2 of stage 1

def _abstract_variables(model, shape):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False), x), x


class SizeTest(parameterized.TestCase):

  @parameterized.parameters(
      ("resnet32", 464_154, 68_862_592, 0.49),
      ("resnet74", 1_144_666, 167_953_024, 1.21),
      ("resnet110", 1_727_962, 252_887_680, 1.83),
  )
  def test_cifar_backbone_exact(self, variant, params, macs, paper_total_m):
    model = codinet.from_config(codinet.default_config(variant))
    variables, x = _abstract_variables(model, (1, 32, 32, 3))
    groups = costs.params_by_group(variables["params"], {"routers": "router"})
    self.assertEqual(groups["backbone"], params)
    summary = model.cost_tables((32, 32, 3))
    self.assertEqual(summary.backbone_params, params)
    self.assertEqual(summary.backbone_macs, macs)
    self.assertEqual(summary.router_params, groups["routers"])
    self.assertEqual(round(summary.total_params / 1e6, 2), paper_total_m)  # Table 6 "#Param".
    self.assertLen(summary.macs_table, 3 * (int(variant[6:]) - 2) // 6)
    # The tables add up to a trace of the whole eval-all forward pass (batch 2).
    xb = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    traced = costs.count_macs(lambda v, x: model.apply(v, x, train=False).logits, variables, xb)
    self.assertEqual(traced, 2 * (summary.macs_fixed + sum(summary.macs_table)))

  def test_resnet50_backbone(self):
    model = codinet.from_config(codinet.default_config("resnet50", num_classes=1000,
                                                       image_size=224))
    variables, _ = _abstract_variables(model, (1, 224, 224, 3))
    groups = costs.params_by_group(variables["params"], {"routers": "router"})
    self.assertEqual(groups["backbone"], 25_557_032)  # torchvision resnet50.
    summary = model.cost_tables((224, 224, 3))
    self.assertEqual(summary.backbone_params, 25_557_032)
    self.assertEqual(summary.backbone_macs, 4_089_184_256)  # ~4.09 GMACs (8.18 GFLOPs).
    self.assertLen(summary.macs_table, 16)

  def test_tiny_tables_match_trace(self):
    for scan in (True, False):
      model, variables = _init(scan)
      out = _japply(model)(variables, _images(), train=False)
      traced = costs.count_macs(lambda v, x: model.apply(v, x, train=False).logits, variables,
                                jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
      self.assertEqual(traced, int(out.macs_fixed) + int(np.sum(out.macs_table)))
      self.assertEqual(costs.count_params(variables["params"]),
                       int(out.params_fixed) + int(np.sum(out.params_table)))


class ConfigValidationTest(parameterized.TestCase):

  @parameterized.parameters(
      ("variant", "resnet18", "variant"),
      ("image_size", 30, "image_size"),
      ("router_activation", "gelu", "router_activation"),
      ("skip_downsample", "option_b", "skip_downsample"),
      ("router_hidden", -1, "router_hidden"),
      ("width", 0, "width"),
      ("num_classes", 0, "num_classes"),
      ("scan_blocks", 1, "scan_blocks"),
  )
  def test_bad_field(self, field, value, name):
    cfg = codinet.default_config("resnet32")
    with cfg.ignore_type():
      cfg[field] = value
    with self.assertRaisesRegex(ValueError, name):
      codinet.from_config(cfg)
    with self.assertRaisesRegex(ValueError, name):
      models.build_model(cfg)

  def test_unknown_variant_lists_allowed(self):
    with self.assertRaisesRegex(ValueError, "resnet110"):
      codinet.default_config("resnet111")

  def test_unknown_field(self):
    cfg = codinet.default_config("resnet32")
    cfg.router_hiden = 3
    with self.assertRaisesRegex(ValueError, "router_hiden"):
      codinet.from_config(cfg)

  def test_imagenet_size_multiple_of_32(self):
    with self.assertRaisesRegex(ValueError, "image_size"):
      codinet.default_config("resnet50", image_size=100)

  def test_bad_call_arguments(self):
    model, variables = _init()
    x = _images()
    with self.assertRaisesRegex(ValueError, "threshold"):
      model.apply(variables, x, train=False, threshold=0.0)
    with self.assertRaisesRegex(ValueError, "tau"):
      model.apply(variables, x, train=False, tau=-1.0)
    with self.assertRaisesRegex(ValueError, "strategy"):
      model.apply(variables, x, train=False, strategy="bogus")
    with self.assertRaisesRegex(ValueError, "hard"):
      model.apply(variables, x, train=False, hard=True)
    with self.assertRaisesRegex(ValueError, "image size"):
      model.apply(variables, _images(size=6), train=False)


class ConfigFilesTest(parameterized.TestCase):

  @parameterized.parameters(
      ("codinet_cifar10", "resnet32", "cifar10"), ("codinet_cifar10", "", "cifar10"),
      ("codinet_cifar100", "resnet74", "cifar100"), ("codinet_svhn", "", "svhn_cropped"),
      ("codinet_imagenet", "", "imagenet2012"), ("codinet_cifar10", "resnet110,gamma=0.04",
                                                 "cifar10"))
  def test_config_file(self, module, arg, dataset):
    import importlib.util
    import pathlib

    from dynroute_jax import config_lib
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{module}.py"
    spec = importlib.util.spec_from_file_location(module, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config(arg) if arg else mod.get_config()
    config_lib.validate(config)
    self.assertEqual(config.data.name, dataset)
    self.assertEqual(config.model.image_size, config.data.image_size)
    self.assertEqual(config.model.num_classes, config.data.num_classes)
    self.assertEqual(config.data.flip, dataset != "svhn_cropped")
    self.assertTrue(config.train.stage2.freeze_routers and config.train.stage2.hard_decisions)
    self.assertIsInstance(models.build_model(config.model), codinet.CoDiNet)
    if "gamma" in arg:
      self.assertEqual(config.train.stage1.cost_weight, 0.04)


class RoutedModelContractTest(parameterized.TestCase):

  def test_contract(self):
    model, variables = _init()
    self.assertIsInstance(model, base.RoutedModel)
    self.assertEqual(model.model_name, "codinet")
    self.assertEqual(model.routing_site_shape((8, 8)), (9,))
    self.assertIsNone(model.unit_names())
    self.assertEqual(model.train_call_kwargs(types.SimpleNamespace(hard_decisions=True)),
                     {"hard": True})
    self.assertEqual(model.train_call_kwargs(types.SimpleNamespace(hard_decisions=False)), {})
    # Router parameters: exactly those whose path contains 'router' (scanned groups included).
    flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
    routers = {k for k in flat if re.search(model.router_param_pattern, k)}
    self.assertEqual(routers, {k for k in flat if "router" in k})
    self.assertTrue(any("blocks/" in k for k in routers))
    out = _japply(model)(variables, _images(), train=False, threshold=0.5)
    stats = model.routing_stats(out)
    self.assertEqual(list(stats), ["run_ratio", "router_entropy"])
    np.testing.assert_allclose(stats["run_ratio"], np.mean(out.weights), rtol=1e-6)
    ex = np.asarray(out.executed) > 0.5
    mean = ex.astype(np.float64).mean(0)
    self.assertEqual(model.selection_ratios(ex), {"run_ratio_per_block": np.round(mean, 6).tolist(),
                                                  "run_ratio": float(mean.mean())})
    self.assertEqual(model.constant_decisions(ex)["num_routers"], 9)
    table = np.asarray(out.macs_table, np.float64)
    size = model.size_breakdown(table)
    self.assertEqual(size["macs_per_stage"], [float(table[0:3].sum()), float(table[3:6].sum()),
                                              float(table[6:9].sum())])
    self.assertIsNone(size["macs_per_branch_type"])
