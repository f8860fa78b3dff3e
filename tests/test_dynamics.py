"""Routing dynamics: the digits_graded dataset, the dynamics statistics, the static counterpart
and the inference facade."""

import importlib.util
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from conftest import host_variables  # pylint: disable=g-bad-import-order
import dynroute_jax
from dynroute_jax import dynamics
from dynroute_jax import evaluation
from dynroute_jax import graded_digits
from dynroute_jax import input_pipeline
from dynroute_jax import sharding
from dynroute_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config_module(name):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ------------------------------------------------------------------------------------------------
# The dataset.


def test_graded_dataset_is_deterministic_and_balanced():
  a = graded_digits.make_split("train")
  graded_digits.make_split.cache_clear()
  b = graded_digits.make_split("train")
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert a[0].shape == (1438, 8, 8, 1) and a[0].dtype == np.uint8
  for split in ("train", "test"):
    _, labels, levels = graded_digits.make_split(split)
    counts = np.bincount(levels, minlength=4)
    assert counts.max() - counts.min() <= 10, counts  # within 1 per class, 10 classes.
    for c in range(10):
      per_class = np.bincount(levels[labels == c], minlength=4)
      assert per_class.max() - per_class.min() <= 1, (split, c, per_class)


def test_graded_levels_corrupt_more_and_level0_is_clean():
  from sklearn.datasets import load_digits
  images, labels, levels = graded_digits.make_split("test")
  digits = load_digits()
  _, test_idx = input_pipeline.stratified_split(digits.target, input_pipeline.DIGITS_TEST_FRACTION,
                                                input_pipeline.DIGITS_SPLIT_SEED)
  clean = np.round(digits.images[test_idx] / 16.0 * 255.0).astype(np.uint8)[..., None]
  np.testing.assert_array_equal(images[levels == 0], clean[levels == 0])
  np.testing.assert_array_equal(labels, digits.target[test_idx])
  err = [np.mean(np.abs(images[levels == lv].astype(float) - clean[levels == lv])) for lv in range(4)]
  assert err[0] == 0 and err[1] < err[2] < err[3], err


def test_graded_dataset_loads_with_levels_through_the_pipeline():
  cfg = _config_module("digits_graded").get_config("drnet")
  ds = input_pipeline.load_dataset(cfg.data, "test")
  assert ds.levels is not None and len(ds.levels) == len(ds)
  sub = ds.subset(np.arange(5))
  np.testing.assert_array_equal(sub.levels, ds.levels[:5])
  batch = next(input_pipeline.eval_batches(ds, 8))
  np.testing.assert_array_equal(batch["level"], ds.levels[:8])


# ------------------------------------------------------------------------------------------------
# Statistics against direct NumPy / SciPy computations.


def test_spearman_matches_scipy_with_ties():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 5, 200).astype(float)
  b = a + rng.normal(0, 2, 200)
  assert dynamics.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
  np.testing.assert_allclose(dynamics.rankdata(a), stats.rankdata(a))
  assert dynamics.spearman(np.ones(10), b[:10]) is None


def test_level_stats_match_a_direct_computation():
  rng = np.random.default_rng(1)
  levels = rng.integers(0, 4, 300)
  macs = 1e5 * (1 + levels) + rng.normal(0, 1e4, 300)
  correct = rng.random(300) < 0.8
  out = dynamics.level_stats(correct, macs, levels)
  for lv in range(4):
    sel = levels == lv
    assert out["per_level"][str(lv)]["accuracy"] == pytest.approx(correct[sel].mean())
    assert out["per_level"][str(lv)]["macs_mean"] == pytest.approx(macs[sel].mean())
  assert out["spearman_macs_level"] == pytest.approx(stats.spearmanr(macs, levels).statistic)
  assert out["macs_ratio_top_over_bottom_level"] == pytest.approx(
      macs[levels == 3].mean() / macs[levels == 0].mean())


def _drnet_site_shape_3x2x5():
  from dynroute_jax.models import drnet
  cfg = drnet.default_config("tiny", image_size=8)
  cfg.num_nodes = 1
  model = models.build_model(cfg)
  assert model.routing_site_shape((8, 8)) == (3, 2, 5)
  return model


def test_path_stats_count_paths_and_constant_units():
  model = _drnet_site_shape_3x2x5()
  ex = np.zeros((10, 3, 2, 5), bool)
  ex[..., 0] = True           # every connection keeps branch 0 ...
  ex[:4, 1, 0, 1] = True      # ... connection (1, 0) also branch 1 for 4 examples.
  out = dynamics.path_stats(ex.reshape(10, -1), model)
  assert out["distinct_paths"] == 2 and out["most_common_path_share"] == pytest.approx(0.6)
  assert out["paths_used_by_1pct"] == 2
  assert out["constant_connections"] == 5 and out["num_connections"] == 6
  assert out["constant_routers"] == 2 and out["num_routers"] == 3
  # The model's function itself is accepted too; 0/1 floats read like bools.
  assert dynamics.path_stats(ex.reshape(10, -1).astype(np.float32),
                             model.constant_decisions) == out
  from dynroute_jax.models import codinet
  blocks_model = models.build_model(codinet.default_config("resnet8", image_size=8))
  blocks = np.array([[1, 0, 1], [1, 1, 1], [1, 0, 1]], bool)
  out = dynamics.path_stats(blocks, blocks_model)
  assert out["constant_routers"] == 2 and out["constant_router_indices"] == [0, 2]
  assert out["num_routers"] == 3
  assert list(out) == ["distinct_paths", "most_common_path_share", "paths_used_by_1pct",
                       "constant_routers", "num_routers", "constant_router_indices"]


def test_interpolation_and_gap():
  sweep = {"a": {"accuracy": 0.5, "macs_mean": 100.0}, "b": {"accuracy": 0.9, "macs_mean": 200.0},
           "c": {"accuracy": 0.7, "macs_mean": 200.0}}
  out = dynamics.static_comparison(0.8, 150.0, sweep)
  assert out["static_accuracy_at_routed_macs"] == pytest.approx(0.7)  # best at 200 is 0.9.
  assert out["gap_points"] == pytest.approx(10.0) and not out["extrapolated"]
  assert dynamics.static_comparison(0.8, 300.0, sweep)["extrapolated"]


# ------------------------------------------------------------------------------------------------
# The static counterpart on real models.


def _graded_report(tmp_path, variant, **model_overrides):
  cfg = _config_module("digits_graded").get_config(variant)
  if variant == "drnet":  # A third of the digits DRNet: the evaluation's compiles dominate.
    cfg.model.update(dict(num_nodes=2, init_channels=4))
  cfg.model.update(model_overrides)
  cfg.eval.static_thresholds = (0.3, 0.6, 0.9)
  cfg.eval.thresholds = (cfg.eval.threshold,)
  model = models.build_model(cfg.model)
  variables = host_variables(model, jnp.zeros((1, 8, 8, 1)))
  ds = input_pipeline.load_dataset(cfg.data, "test").subset(np.arange(64))
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  return evaluation.evaluate_and_report(cfg, model, variables, ds, mesh, str(tmp_path), tau=1.0,
                                        step=0)


def test_input_independent_routers_have_zero_static_gap(tmp_path):
  # DRNet without RouterNet: one learned weight table shared by all inputs, i.e. static by design.
  report = _graded_report(tmp_path, "drnet", use_router=False)
  d, st = report["dynamics"], report["static"]
  assert d["distinct_paths"] == 1 and d["macs"]["cv"] == 0.0
  assert d["levels"]["spearman_macs_level"] is None  # constant MACs: no rank correlation.
  # The same routing, minus the routers' MACs (the fixed router has none): identical accuracy.
  assert st["static_accuracy_at_routed_macs"] == pytest.approx(report["accuracy_routed"])
  assert st["gap_points"] == pytest.approx(0.0, abs=1e-9)


@pytest.fixture(scope="module")
def codinet_report(tmp_path_factory):
  """The graded CoDiNet's report, shared: evaluating it (and its 64 block subsets) takes seconds."""
  return _graded_report(tmp_path_factory.mktemp("codinet_report"), "codinet")


def test_codinet_report_has_dynamics_and_static_sweep(codinet_report):
  report = codinet_report
  d, st = report["dynamics"], report["static"]
  assert set(d["levels"]["per_level"]) == {"0", "1", "2", "3"}
  assert d["num_routers"] == 6 and len(st["mean_router_output"]) == 6
  assert set(st["sweep"]) >= {"0.3", "0.6", "0.9", "0.5"}
  # A static network with no block run costs the stem, shortcuts and head, no routers.
  assert min(s["macs_mean"] for s in st["sweep"].values()) < report["macs_all"]
  text = evaluation.format_table(report)
  assert "static counterpart" in text and "per level" in text


def test_best_subset_baseline_covers_every_block_subset(codinet_report):
  report = codinet_report
  bs = report["static"]["best_subset"]
  assert bs["num_subsets"] == 2 ** 6
  # The envelope of all subsets includes the nested ones: never worse than the mean-router sweep.
  assert (bs["static_accuracy_at_routed_macs"]
          >= report["static"]["static_accuracy_at_routed_macs"] - 1e-9
          or report["static"]["extrapolated"])
  assert "best fixed subset" in evaluation.format_table(report)
