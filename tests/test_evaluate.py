"""Tests of evaluation from checkpoints: dynroute_jax.evaluate, evaluation and plots.

One tiny work directory is built per module: the digits DRNet config with a freshly initialised
model saved through checkpoint.Checkpointer (step 3 in stage 1 with an optimizer state, step 5 in
stage 2 without one), so the whole evaluation runs once here without training.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import host_variables, xla_flags  # pylint: disable=g-bad-import-order

from dynroute_jax import checkpoint as ckpt_lib
from dynroute_jax import evaluate
from dynroute_jax import evaluation
from dynroute_jax import input_pipeline
from dynroute_jax import plots
from dynroute_jax import schedules
from dynroute_jax import train
from dynroute_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One pytest-xdist worker runs the module (`--dist loadgroup`, Makefile), and the `run` fixture is
# session-scoped: its evaluation is made once, not once per worker, nor again when the worker's
# order puts another module's test between two of these.
pytestmark = pytest.mark.xdist_group("evaluate_run")


def _load_digits_config_module():
  spec = importlib.util.spec_from_file_location("digits_config",
                                                os.path.join(REPO, "configs", "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


digits = _load_digits_config_module()
REQUIRED_KEYS = ("accuracy_all", "accuracy_routed", "macs_all", "macs_routed_mean", "thresholds",
                 "eval_tau", "budget", "instance_awareness", "all", "step", "plots")
PER_THRESHOLD_KEYS = ("accuracy", "macs_mean", "macs_median", "macs_p90", "params_mean",
                      "macs_reduction", "distinct_paths", "mean_path_length", "branch_selection",
                      "branch_ratio")


def small_config(variant="drnet"):
  """The digits config with 3 + 2 steps; DRNet with 2 nodes per cell and 4 channels.

  The shrunk model keeps what evaluation touches (cells, nodes fed by earlier nodes, all five
  branches, routers) at about a third of the full digits DRNet's inference graphs, whose compiles
  dominate every test that evaluates.
  """
  cfg = digits.get_config(variant)
  cfg.train.stage1.steps = 3
  cfg.train.stage2.steps = 2
  # One static threshold: the default sweeps 20, a pass over the test split each (test_dynamics.py
  # tests the static counterpart).
  cfg.eval.static_thresholds = (0.5,)
  if variant == "drnet":
    cfg.model.num_nodes = 2
    cfg.model.init_channels = 4
  return cfg


def init_variables(cfg, seed=0, abstract=False):
  """(model, variables) drawn on the host (`conftest.host_variables`: nothing compiled);
  `abstract`: their shapes only."""
  model = models.build_model(cfg.model)
  x = jnp.zeros((1, cfg.data.image_size, cfg.data.image_size, cfg.data.num_channels))
  if abstract:
    key = jax.random.key(seed)
    return model, jax.eval_shape(lambda x: model.init(
        {"params": key, "routing": key, "dropout": key}, x, train=False), x)
  return model, host_variables(model, x, seed)


def save_run(workdir, cfg, variables, steps=((3, 1, True), (5, 2, False)), fingerprint="config"):
  """Writes config.json and checkpoints as the trainer does; (step, stage, with optimizer state)."""
  os.makedirs(workdir, exist_ok=True)
  train._save_config(cfg, workdir)
  fp = train.model_fingerprint(cfg) if fingerprint == "config" else fingerprint
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), fingerprint=fp,
                               async_save=False, keep=None)
  params, bs = variables["params"], variables.get("batch_stats", {})
  for step, stage, with_opt in steps:
    opt = optax.sgd(0.1, momentum=0.9).init(params) if with_opt else None
    ckpt.save(step, params=params, batch_stats=bs, opt_state=opt, force=True,
              meta={"stage": stage, "model": cfg.model.name, "variant": cfg.model.variant})
  ckpt.close()


@pytest.fixture(scope="session")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("eval_run"))
  cfg = small_config()
  model, variables = init_variables(cfg)
  save_run(workdir, cfg, variables)
  # A budget between the cheapest and the full model: 85% of the all-branches MACs.
  t = model.cost_tables()
  macs_full = float(t.macs_fixed + np.sum(t.macs_table))
  target = 0.85 * macs_full
  report = evaluate.evaluate_workdir(workdir, thresholds="0.3,0.5,0.8,1.0", target_macs=target,
                                     tsne_max_points=150)
  return dict(workdir=workdir, cfg=cfg, model=model, variables=variables, report=report,
              target=target, macs_full=macs_full)


# ------------------------------------------------------------------------------------------------
# The full run.


def test_report_keys_and_files(run):
  report = run["report"]
  for k in REQUIRED_KEYS:
    assert k in report, k
  assert set(report["thresholds"]) == {"0.3", "0.5", "0.8", "1"}
  # [cells, connections (2 inputs x 2 nodes), branches]
  assert report["site_shape"] == [3, 4, 5] and report["branch_names"] == list(models.drnet.BRANCHES)
  for s in report["thresholds"].values():
    for k in PER_THRESHOLD_KEYS:
      assert k in s, k
    assert np.asarray(s["branch_selection"]).shape == (3, 4, 5)
  assert report["step"] == 5 and report["checkpoint"]["stage"] == 2
  out = os.path.join(run["workdir"], "eval")
  with open(os.path.join(out, "report.json")) as f:
    on_disk = json.load(f)
  assert on_disk["accuracy_all"] == report["accuracy_all"]
  assert on_disk["budget"]["threshold"] == report["budget"]["threshold"]
  for name in plots.FILES:
    path = os.path.join(out, name)
    assert os.path.getsize(path) > 1000, name
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert sorted(report["plots"]) == sorted(plots.FILES)


def test_threshold_one_runs_every_branch(run):
  report = run["report"]
  s = report["thresholds"]["1"]
  # Softmax weights are positive, so T = 1 keeps every branch: the same cost and predictions.
  assert s["macs_mean"] == pytest.approx(report["macs_all"], rel=1e-6)
  assert report["macs_all"] == pytest.approx(run["macs_full"], rel=1e-6)
  assert s["accuracy"] == pytest.approx(report["accuracy_all"], abs=1e-9)
  assert s["distinct_paths"] == 1
  np.testing.assert_allclose(s["branch_selection"], 1.0)


def test_macs_monotone_in_threshold_for_drnet(run):
  sweep = run["report"]["thresholds"]
  ts = sorted(sweep, key=float)
  macs = [sweep[t]["macs_mean"] for t in ts]
  assert all(b >= a for a, b in zip(macs, macs[1:])), macs
  assert macs[0] < macs[-1]
  paths = [sweep[t]["mean_path_length"] for t in ts]
  assert all(b >= a for a, b in zip(paths, paths[1:])), paths
  r = run["report"]
  assert r["macs_routed_mean"] == sweep["0.8"]["macs_mean"]
  assert r["accuracy_routed"] == sweep["0.8"]["accuracy"]


def test_accuracy_all_matches_a_direct_computation(run):
  restored = ckpt_lib.restore_for_eval(os.path.join(run["workdir"], "checkpoints"))
  assert restored.meta["step"] == 5
  cfg, model = run["cfg"], run["model"]
  test_ds = input_pipeline.load_dataset(cfg.data, "test")
  x = input_pipeline.preprocess_eval(test_ds.images, cfg.data)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False, tau=1.0))(
      {"params": restored.params, "batch_stats": restored.batch_stats}, x)
  acc = float(np.mean(np.asarray(jnp.argmax(out.logits, -1)) == test_ds.labels))
  assert run["report"]["accuracy_all"] == pytest.approx(acc, abs=1e-9)
  assert run["report"]["all"]["num_examples"] == len(test_ds)


def test_eval_tau_follows_the_stage_schedule(run):
  assert run["report"]["eval_tau"] == pytest.approx(1.0)  # stage 2 starts at tau_init = 1.
  cfg = digits.get_config("drnet")
  train_ds, _ = schedules.training_splits(cfg)
  n = len(train_ds)
  s1, s2 = schedules.plan_stages(cfg, n)
  spe, decay = s2.steps_per_epoch, cfg.train.stage2.tau_decay_per_epoch
  # The temperature of the last step that ran: step start + 5 epochs - 1 lies in epoch 4.
  tau, stage = evaluate.eval_temperature(cfg, s2.start + 5 * spe, 2, n)
  assert stage == 2 and tau == pytest.approx(np.exp(-decay * 4), rel=1e-5)
  tau_end, _ = evaluate.eval_temperature(cfg, s2.end, None, n)
  assert tau_end == pytest.approx(max(cfg.train.stage2.tau_floor,
                                      np.exp(-decay * ((s2.num_steps - 1) // spe))))
  assert tau_end == pytest.approx(0.5)  # the floor, as training ends.
  assert evaluate.eval_temperature(cfg, 10, None, n) == (pytest.approx(3.0), 1)
  assert s1.end == s2.start


def test_budget_meets_the_target_on_calibration_data(run):
  b = run["report"]["budget"]
  assert b["feasible"] is True
  assert 0 < b["threshold"] <= 1
  assert b["macs"] <= run["target"]
  # The largest calibration MACs not exceeding the budget among the thresholds tried.
  feasible = [m for _, m in b["evaluated"] if m <= run["target"]]
  assert b["macs"] == max(feasible)
  assert b["calibration_examples"] == 143
  assert b["test"]["macs_mean"] <= run["macs_full"]
  assert 0.0 <= b["test"]["accuracy"] <= 1.0


def test_instance_awareness_section(run):
  ia = run["report"]["instance_awareness"]
  c = ia["confidence"]
  n = run["report"]["all"]["num_examples"]
  assert c["confident_correct"]["count"] + c["misclassified_or_unconfident"]["count"] == n
  noise = ia["noise"]
  assert noise["clean"]["macs_mean"] == pytest.approx(run["report"]["macs_routed_mean"])
  for k in ("std_0.1", "std_0.3"):
    assert noise[k]["macs_mean"] > 0
    assert 0 <= noise[k]["share_more_macs"] <= 1


def test_restore_does_not_need_optimizer_state(run):
  restored = ckpt_lib.restore_for_eval(os.path.join(run["workdir"], "checkpoints"), step=5)
  assert "opt_state" not in restored.meta["items"]
  ref = run["variables"]["params"]
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Step 3 carries an optimizer state: evaluation ignores it.
  r3 = ckpt_lib.restore_for_eval(os.path.join(run["workdir"], "checkpoints"), step=3)
  assert "opt_state" in r3.meta["items"] and r3.meta["stage"] == 1


# ------------------------------------------------------------------------------------------------
# Bad input: every error is raised before anything is compiled.


def test_missing_or_empty_workdir(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    evaluate.evaluate_workdir(str(tmp_path / "nope"))
  (tmp_path / "a_file").write_text("")  # Said "does not exist" before.
  with pytest.raises(ValueError, match="a_file is a file, not a directory"):
    evaluate.evaluate_workdir(str(tmp_path / "a_file"))
  with pytest.raises(ValueError, match="config.json not found"):
    evaluate.evaluate_workdir(str(tmp_path))
  with pytest.raises(ValueError, match="empty"):
    evaluate.evaluate_workdir("")
  # A config but no checkpoints.
  train._save_config(small_config(), str(tmp_path))
  with pytest.raises(ckpt_lib.CheckpointNotFoundError, match="holds no checkpoints"):
    evaluate.evaluate_workdir(str(tmp_path))


def test_step_that_does_not_exist_lists_available(run):
  with pytest.raises(ckpt_lib.CheckpointNotFoundError, match=r"step 4 .*available steps: 3, 5"):
    evaluate.evaluate_workdir(run["workdir"], step=4)


def test_checkpoint_of_another_model(run, tmp_path):
  # config.json of CoDiNet next to DRNet checkpoints.
  wd = str(tmp_path / "other")
  shutil.copytree(os.path.join(run["workdir"], "checkpoints"), os.path.join(wd, "checkpoints"))
  train._save_config(small_config("codinet"), wd)
  with pytest.raises(ckpt_lib.FingerprintMismatchError, match="another model"):
    evaluate.evaluate_workdir(wd)


def test_parameters_of_another_shape_without_a_recorded_fingerprint(tmp_path):
  wd = str(tmp_path / "shapes")
  cfg = small_config()
  other = small_config()
  other.model.init_channels = 6
  _, abstract = init_variables(other, abstract=True)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
  save_run(wd, cfg, zeros, steps=((5, 2, False),), fingerprint=None)
  with pytest.raises(ckpt_lib.FingerprintMismatchError, match="parameter"):
    evaluate.evaluate_workdir(wd)


@pytest.mark.parametrize("thresholds", ["0.5,1.5", "0", "-0.2", "abc", "0.5,,0.8", "nan"])
def test_bad_thresholds(run, thresholds):
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    evaluate.evaluate_workdir(run["workdir"], thresholds=thresholds)


@pytest.mark.parametrize("target", [-5.0, 0.0, float("nan"), float("inf"), "abc"])
def test_bad_target_macs(run, target):
  with pytest.raises(ValueError, match="target_macs"):
    evaluate.evaluate_workdir(run["workdir"], target_macs=target)


def test_bad_strategy_and_step(run):
  with pytest.raises(ValueError, match="strategy"):
    evaluate.evaluate_workdir(run["workdir"], strategy="fast")
  with pytest.raises(ValueError, match="step"):
    evaluate.evaluate_workdir(run["workdir"], step=-1)


def test_config_strategy_and_options_reach_the_report(run, tmp_path):
  """config.eval.strategy and config.eval.dispatch pick the report's strategy (--strategy unset);
  a bad option is refused, naming the fields, before anything compiles."""
  cfg = small_config()
  cfg.eval.strategy = "chunk"
  cfg.eval.dispatch.chunk = 4
  wd = str(tmp_path / "chunk")
  save_run(wd, cfg, run["variables"], steps=((5, 2, False),))
  report = evaluate.evaluate_workdir(wd, thresholds="0.8", plots=False, instance_awareness=False)
  assert report["strategy"] == "chunk(chunk=4)"
  assert run["report"]["strategy"] == "dense"
  ref = run["report"]["thresholds"]["0.8"]
  assert report["thresholds"]["0.8"]["accuracy"] == pytest.approx(ref["accuracy"])
  assert report["thresholds"]["0.8"]["macs_mean"] == pytest.approx(ref["macs_mean"], rel=1e-6)
  # A bad option in a saved config is refused at restore, even with --strategy naming another.
  cfg.eval.dispatch.chunk = 0
  save_run(wd, cfg, run["variables"], steps=((5, 2, False),))
  with pytest.raises(ValueError, match=r"config.eval.dispatch.chunk must be an int >= 1"):
    evaluate.evaluate_workdir(wd, thresholds="0.8", strategy="auto", plots=False,
                              instance_awareness=False)


def test_predict_fn_checks_images_before_compiling(run):
  cfg, model = run["cfg"], run["model"]
  predictor = evaluation.make_predict_fn(model, cfg.data, tau=1.0, routed=True)

  def must_not_compile(*args, **kwargs):
    raise AssertionError("compiled despite bad input")

  predictor._jitted = must_not_compile
  v = run["variables"]
  with pytest.raises(ValueError, match=r"expected uint8 \[B, 8, 8, 1\].*got shape \(2, 8, 8, 3\)"):
    predictor(v, np.zeros((2, 8, 8, 3), np.uint8), 0.8)
  with pytest.raises(ValueError, match=r"got shape \(8, 8, 1\)"):
    predictor(v, np.zeros((8, 8, 1), np.uint8), 0.8)
  with pytest.raises(ValueError, match="dtype uint8.*got dtype float32"):
    predictor(v, np.zeros((2, 8, 8, 1), np.float32), 0.8)
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    predictor(v, np.zeros((2, 8, 8, 1), np.uint8), 1.5)
  with pytest.raises(ValueError, match="array"):
    predictor(v, [[1, 2]], 0.8)


def test_a_one_device_mesh_shares_the_program_made_without_a_mesh(run):
  """The evaluation (a mesh) and the `inference` facade (no mesh) of one model on one device
  compile each input shape once between them, not once each."""
  from dynroute_jax import sharding  # pylint: disable=g-import-not-at-top
  cfg, model = run["cfg"], run["model"]
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  plain = evaluation.make_predict_fn(model, cfg.data, tau=1.0, routed=True, strategy="chunk")
  on_mesh = evaluation.make_predict_fn(model, cfg.data, tau=1.0, routed=True, strategy="chunk",
                                       mesh=mesh)
  assert on_mesh._jitted is plain._jitted


def test_predictors_of_different_temperatures_share_one_compiled_pass(run):
  """The temperature is an argument of the compiled pass, not a constant of it: checkpoints of an
  annealed stage (one temperature each) reuse one compilation, in memory and on disk."""
  cfg, model, v = run["cfg"], run["model"], run["variables"]
  images = np.zeros((4, 8, 8, 1), np.uint8)
  hlo = []
  for tau in (1.0, 0.5):
    predictor = evaluation.make_predict_fn(model, cfg.data, tau=tau, routed=True)
    real = predictor._jitted
    predictor._jitted = lambda *a, real=real: hlo.append(real.lower(*a).as_text()) or real(*a)
    out = predictor(v, images, 0.8)
    assert np.all(np.isfinite(np.asarray(out["logits"])))
  assert hlo[0] == hlo[1]
  with pytest.raises(ValueError, match="tau"):
    evaluation.make_predict_fn(model, cfg.data, tau=0.0, routed=True)


def test_predictors_of_one_model_share_traces_and_compilations(run):
  """A second evaluation of the same model (an older checkpoint, the `inference` facade) reuses the
  first one's traced and compiled passes: a model rebuilt from the config and a copied data config
  compare equal, and other temperatures are an argument."""
  cfg, v = run["cfg"], run["variables"]
  images = np.zeros((4, 8, 8, 1), np.uint8)
  first = evaluation.make_predict_fn(models.build_model(cfg.model), cfg.data, tau=1.0, routed=True)
  first(v, images, 0.8)
  traced = first._jitted._cache_size()  # pylint: disable=protected-access
  again = evaluation.make_predict_fn(models.build_model(cfg.model),
                                     cfg.data.copy_and_resolve_references(), tau=0.5, routed=True)
  assert again._jitted is first._jitted  # pylint: disable=protected-access
  again(v, images, 0.3)
  assert first._jitted._cache_size() == traced  # pylint: disable=protected-access
  # Another strategy or an unrouted pass is another program.
  other = evaluation.make_predict_fn(models.build_model(cfg.model), cfg.data, tau=1.0, routed=False)
  assert other._jitted is not first._jitted  # pylint: disable=protected-access


# ------------------------------------------------------------------------------------------------
# Budget search, selection ratios, plots: pure functions.


def test_choose_threshold_rising_falling_and_infeasible():
  rising = lambda t: 100.0 + 900.0 * t  # DRNet-like: more is kept as T grows.
  r = evaluation.choose_threshold(rising, 550.0)
  assert r["feasible"] and r["macs"] <= 550.0 and r["macs"] > 545.0
  assert r["threshold"] == pytest.approx(0.5, abs=0.01)
  falling = lambda t: 1000.0 - 900.0 * t  # CoDiNet-like: fewer blocks run as T grows.
  r = evaluation.choose_threshold(falling, 550.0)
  assert r["feasible"] and 545.0 < r["macs"] <= 550.0
  r = evaluation.choose_threshold(rising, 2000.0)
  assert r["feasible"] and r["threshold"] == 1.0
  r = evaluation.choose_threshold(rising, 50.0)
  assert not r["feasible"] and r["threshold"] is None
  assert "below the cheapest achievable" in r["message"] and r["cheapest_macs"] == pytest.approx(100.0, abs=0.01)
  steps = lambda t: 100.0 if t < 0.42 else 300.0  # Flat pieces: the largest feasible level.
  r = evaluation.choose_threshold(steps, 200.0)
  assert r["macs"] == 100.0 and r["threshold"] < 0.42


def test_infeasible_budget_is_said_in_the_table():
  report = {"model": "drnet", "variant": "tiny", "dataset": "digits", "step": 1, "eval_tau": 1.0,
            "threshold": 0.8, "macs_all": 10.0, "accuracy_all": 0.5,
            "all": dict(accuracy=0.5, macs_mean=10.0, macs_median=10.0, macs_p90=10.0,
                        params_mean=5.0, macs_reduction=0.0),
            "thresholds": {}, "budget": evaluation.choose_threshold(lambda t: 5.0 + t, 1.0)}
  table = evaluation.format_table(report)
  assert "INFEASIBLE" in table and "below the cheapest achievable" in table


def test_summary_means_are_exact_for_float32_counts():
  # Regression: the params mean was taken in float32 (the MACs' in float64), so 359 examples of
  # 101370 parameters each read 101370.0078 in report.json.
  counts = dict(prediction=np.zeros(359), label=np.zeros(359),
                macs=np.full(359, 1226368, np.float32), params=np.full(359, 101370, np.float32))
  summary = evaluation.summarize(counts, 1226368.0)
  assert summary["params_mean"] == 101370 and summary["macs_mean"] == 1226368


def test_selection_ratios_and_codinet_plot(tmp_path):
  # The models lay out the selection ratios of a pass (`evaluation.summarize` asks them).
  drnet = models.build_model(small_config("drnet").model)
  site_shape = drnet.routing_site_shape((8, 8))
  assert site_shape == (3, 4, 5)
  ex = np.zeros((4, int(np.prod(site_shape))), bool)
  ex[:2, 0] = True
  r = drnet.selection_ratios(ex)
  assert np.asarray(r["branch_selection"]).shape == site_shape
  assert r["branch_selection"][0][0][0] == 0.5
  codinet = models.build_model(small_config("codinet").model)
  num_blocks = codinet.routing_site_shape((8, 8))[0]
  ex = np.zeros((2, num_blocks), bool)
  ex[:, 0], ex[0, 2], ex[1, 1] = True, True, True
  r = codinet.selection_ratios(ex)
  assert r["run_ratio_per_block"][:3] == [1.0, 0.5, 0.5] and len(r["run_ratio_per_block"]) == num_blocks
  summary = evaluation.summarize(dict(prediction=np.zeros(2), label=np.zeros(2), macs=np.ones(2),
                                      params=np.ones(2), executed=ex), 2.0, codinet)
  assert summary["run_ratio_per_block"] == r["run_ratio_per_block"]
  r = {"run_ratio_per_block": [1.0, 0.5, 0.5], "run_ratio": 2 / 3}
  report = {"threshold": 0.5, "thresholds": {"0.5": r}}
  path = plots.selection(report, str(tmp_path / "sel.png"))
  assert os.path.getsize(path) > 1000
  # t-SNE with identical paths does not fail.
  path = plots.tsne_paths(np.ones((20, 4)), np.arange(20) % 10, np.full(20, 1e6),
                          str(tmp_path / "t.png"))
  assert os.path.getsize(path) > 1000


# ------------------------------------------------------------------------------------------------
# The command line.


def _cli(args, env_extra=None):
  env = dict(os.environ, **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "dynroute_jax.evaluate", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)


def test_cli_errors_are_clear(tmp_path):
  p = _cli([f"--workdir={tmp_path / 'missing'}"])
  assert p.returncode == 2
  assert "evaluate: error:" in p.stderr and "does not exist" in p.stderr
  assert "Traceback" not in p.stderr


def test_cli_on_two_devices_matches(run, tmp_path):
  """A smoke run of the program on a 2-device mesh: same numbers as the in-process evaluation."""
  wd = str(tmp_path / "copy")
  os.makedirs(wd)
  shutil.copy(os.path.join(run["workdir"], "config.json"), wd)
  shutil.copytree(os.path.join(run["workdir"], "checkpoints"), os.path.join(wd, "checkpoints"))
  p = _cli([f"--workdir={wd}", "--thresholds=0.8", "--noplots", "--noinstance_awareness"],
           {"XLA_FLAGS": xla_flags(2), "JAX_PLATFORMS": "cpu"})
  assert p.returncode == 0, p.stderr[-3000:]
  with open(os.path.join(wd, "eval", "report.json")) as f:
    report = json.load(f)
  assert report["num_devices"] == 2
  assert report["accuracy_all"] == pytest.approx(run["report"]["accuracy_all"], abs=1e-9)
  assert report["macs_routed_mean"] == pytest.approx(run["report"]["macs_routed_mean"], rel=1e-6)
  assert "threshold" in p.stdout and "0.8*" in p.stdout


_PER_DEVICE_SCRIPT = r"""
import re, sys
import numpy as np, jax
sys.path.insert(0, "tests")
from conftest import host_variables, make_tiny_config
from dynroute_jax import evaluation, models, sharding
cfg = make_tiny_config("codinet")
model = models.build_model(cfg.model)
images = np.random.RandomState(0).randint(0, 256, (16, 8, 8, 1)).astype(np.uint8)
v = host_variables(model, np.zeros((1, 8, 8, 1), np.float32))
mesh = sharding.make_mesh(cfg.mesh)
one = evaluation.make_predict_fn(model, cfg.data, tau=1.0, routed=True, strategy="chunk")
two = evaluation.make_predict_fn(model, cfg.data, tau=1.0, routed=True, strategy="chunk", mesh=mesh)
batch = sharding.make_global_batch({"image": images}, mesh)["image"]
hlo = two._jitted.lower(jax.device_put(v, sharding.replicated(mesh)), batch, np.float32(0.7),
                        np.arange(16, dtype=np.int32), np.float32(0), None,
                        np.float32(1)).compile().as_text()
a, b = one(v, images, 0.7), two(v, batch, 0.7)  # 0.7: some blocks run, others not
collectives = len(re.findall(r"= [^=]*(all-gather|all-reduce)", hlo))
print("devices", mesh.devices.size, "collectives", collectives,
      "executed", float(np.mean(np.asarray(a["executed"]))),
      "same", bool(np.array_equal(np.asarray(a["executed"]), np.asarray(b["executed"])) and
                   np.allclose(np.asarray(a["logits"]), np.asarray(b["logits"]), atol=1e-5)))
"""


def test_routed_pass_on_two_devices_dispatches_per_device():
  """On a mesh, each device orders, gathers and loops over its own selected rows: no collective
  in the compiled pass (partitioned by `jit` alone, a routed pass all-gathers the batch around
  every block), and the outputs of one device."""
  p = subprocess.run([sys.executable, "-c", _PER_DEVICE_SCRIPT], cwd=REPO, capture_output=True,
                     text=True, timeout=600,
                     env=dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu"))
  assert p.returncode == 0, p.stderr[-3000:]
  words = p.stdout.split()
  fields = dict(zip(words[::2], words[1::2]))
  assert fields["devices"] == "2" and fields["same"] == "True", p.stdout
  assert 0.0 < float(fields["executed"]) < 1.0, p.stdout  # some blocks run, some are skipped
  assert fields["collectives"] == "0", p.stdout


def test_restore_facade_matches_the_evaluation(run):
  import dynroute_jax  # pylint: disable=g-import-not-at-top
  clf = dynroute_jax.restore(run["workdir"])
  assert clf.image_shape == (8, 8, 1) and clf.step == 5 and clf.threshold == 0.8
  test_ds = input_pipeline.load_dataset(run["cfg"].data, "test")
  out = clf(test_ds.images, strategy="dense")
  report = run["report"]
  assert out["logits"].shape == (len(test_ds), 10) and out["macs"].shape == (len(test_ds),)
  assert out["executed"].dtype == bool and out["executed"].shape[0] == len(test_ds)
  assert np.mean(out["prediction"] == test_ds.labels) == pytest.approx(report["accuracy_routed"])
  assert np.mean(out["macs"]) == pytest.approx(report["macs_routed_mean"], rel=1e-6)
  # Per example, the same logits as the evaluation's predictor on the same checkpoint.
  predictor = evaluation.make_predict_fn(run["model"], run["cfg"].data, tau=report["eval_tau"],
                                         routed=True)
  ref = predictor(run["variables"], test_ds.images, 0.8)
  np.testing.assert_allclose(out["logits"], np.asarray(ref["logits"]), rtol=1e-5, atol=1e-5)
  # A skipping strategy returns the same outputs (on the whole split: the dense pass compiled
  # above serves another threshold).
  chunk = clf(test_ds.images, threshold=0.5, strategy="chunk")
  dense = clf(test_ds.images, threshold=0.5, strategy="dense")
  np.testing.assert_allclose(chunk["logits"], dense["logits"], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(chunk["executed"], dense["executed"])
  with pytest.raises(ValueError, match="threshold"):
    clf(test_ds.images[:2], threshold=1.5)
