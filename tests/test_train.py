"""Training: end-to-end runs, overfitting, bitwise resume, sharding invariance, frozen routers, bad input.

Every model is tiny (ResNet-8 of width 4, or a 3-cell DRNet of 1 node and 4 channels) so that the
compile, which dominates on CPU, stays a few seconds per stage.
"""

import hashlib
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dynroute_jax import checkpoint as ckpt_lib
from dynroute_jax import config_lib
from dynroute_jax import distributed
from dynroute_jax import evaluate
from dynroute_jax import evaluation
from dynroute_jax import hooks
from dynroute_jax import input_pipeline
from dynroute_jax import sharding
from dynroute_jax import tensorboard_writer
from dynroute_jax import train
from dynroute_jax import models
from dynroute_jax.models import base as models_base

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent
REPORT_KEYS = ("accuracy_all", "accuracy_routed", "macs_all", "macs_routed_mean", "params_all",
               "thresholds", "step", "model", "variant", "dataset")


def _flat(tree):
  return {sharding.path_str(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _restore(workdir, step=None, items=("params", "batch_stats", "opt_state")):
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    restored, meta = ckpt.restore(step, items=items)
  finally:
    ckpt.close()
  return {k: _flat(v) for k, v in restored.items()}, meta


def _assert_bitwise_equal(a, b, what):
  assert a.keys() == b.keys(), what
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what}: {k}"
    assert np.array_equal(a[k], b[k]), f"{what}: {k} differs"


def _is_router(path):
  return re.search(models_base.ROUTER_PARAM_PATTERN, path) is not None


# ------------------------------------------------------------------------------------------------
# End to end through train_and_evaluate on mocked CIFAR-10.


def _run_e2e(config, workdir):
  tfds = pytest.importorskip("tensorflow_datasets")
  seen = []
  with tfds.testing.mock_data(num_examples=16):
    report = train.train_and_evaluate(config, str(workdir),
                                      metrics_callback=lambda s, m: seen.append((s, m)))
  return report, seen


def _check_e2e(config, workdir, report, seen):
  total = config.train.stage1.steps + config.train.stage2.steps
  for k in REPORT_KEYS:
    assert k in report, k
  assert report["step"] == total and report["dataset"] == "cifar10"
  for k in ("accuracy_all", "accuracy_routed", "macs_all", "macs_routed_mean"):
    assert math.isfinite(report[k]), k
  assert 0.0 <= report["accuracy_routed"] <= 1.0 and report["macs_routed_mean"] <= report["macs_all"]
  # Every step reported once, with finite metrics and the stage's loss terms.
  assert [s for s, _ in seen] == list(range(total))
  for s, m in seen:
    assert m["finite"] == 1.0, (s, m)
    bad = {k: v for k, v in m.items() if not math.isfinite(v)}
    assert not bad, (s, bad)
  # Files: the resolved config, one checkpoint per stage end, the evaluation report.
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"] == config.model.to_dict()
  assert saved["train"]["global_batch_size"] == config.train.global_batch_size
  assert json.loads((workdir / "eval" / "report.json").read_text())["step"] == total
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  assert ckpt.all_steps() == [config.train.stage1.steps, total]
  assert ckpt.latest_good_step() == total
  assert ckpt.read_meta(total)["stage"] == 2
  ckpt.close()
  return dict(seen)


@pytest.mark.slow
def test_drnet_two_stages_end_to_end(tiny_config, tmp_path):
  config = tiny_config("drnet", "cifar10", batch=8, data_dir=str(tmp_path / "tfds"))
  assert config.model.aux_head and config.model.drop_branch_rate > 0
  workdir = tmp_path / "run"
  report, seen = _run_e2e(config, workdir)
  metrics = _check_e2e(config, workdir, report, seen)
  assert report["model"] == "drnet"
  # One step serves both stages: stage 1's resource term is there with weight 0.
  assert "loss/aux" in metrics[0] and metrics[0]["loss/resource"] == 0.0
  assert "loss/resource" in metrics[3]  # Stage 2: DRNet-R-0.1.
  assert metrics[0]["tau"] == 3.0 and metrics[3]["tau"] <= 1.0
  assert all(f"branch_ratio/{k}" in metrics[0] for k in range(5))


@pytest.mark.slow
def test_codinet_two_stages_end_to_end(tiny_config, tmp_path, monkeypatch, capsys):
  config = tiny_config("codinet", "cifar10", batch=8, data_dir=str(tmp_path / "tfds"))
  assert config.data.num_views == 2 and config.train.stage2.freeze_routers
  config.eval_every_steps = 1
  written = []
  write = tensorboard_writer.SummaryWriter.write_scalars
  monkeypatch.setattr(tensorboard_writer.SummaryWriter, "write_scalars",
                      lambda self, step, s: written.append((step, dict(s))) or write(self, step, s))
  workdir = tmp_path / "run"
  report, seen = _run_e2e(config, workdir)
  metrics = _check_e2e(config, workdir, report, seen)
  assert report["model"] == "codinet"
  # The periodic evaluation: after every step but the last (the final report's), in summaries
  # named as the final report's and one console line each.
  total = config.train.stage1.steps + config.train.stage2.steps
  evals = {step: s for step, s in written if "eval/accuracy_routed" in s}
  assert sorted(evals) == list(range(1, total + 1)), sorted(evals)
  for step in range(1, total):
    assert set(evals[step]) == {"eval/accuracy_all", "eval/accuracy_routed", "eval/macs_all",
                                "eval/macs_routed_mean", "eval/threshold"}
    assert 0.0 <= evals[step]["eval/accuracy_routed"] <= 1.0
    assert evals[step]["eval/macs_routed_mean"] <= evals[step]["eval/macs_all"]
  assert evals[total]["eval/macs_all"] == pytest.approx(evals[1]["eval/macs_all"])
  out = capsys.readouterr().out
  assert [line.split("  acc")[0] for line in out.splitlines() if line.startswith("eval ")] == [
      f"eval     step {step}" for step in range(1, total)]
  for term in ("ce", "consistency", "diversity", "cost"):
    assert f"loss/{term}" in metrics[0], term
  assert "loss/consistency" not in metrics[3]
  # Stage 2 froze the routers: bitwise the same at the end of stage 1 and after stage 2.
  first, _ = _restore(workdir, 2, items=("params",))
  last, _ = _restore(workdir, 4, items=("params",))
  routers = [k for k in first["params"] if _is_router(k)]
  assert routers
  for k in routers:
    np.testing.assert_array_equal(first["params"][k], last["params"][k], err_msg=k)
  assert any(not np.array_equal(first["params"][k], last["params"][k])
             for k in first["params"] if not _is_router(k))


# ------------------------------------------------------------------------------------------------
# One stage driven directly: create_state + make_train_step.


def _direct(config, stage_index, num_train):
  """(model, stage, state, jitted step) for `config` on one device, as train_and_evaluate builds them."""
  model = models.build_model(config.model)
  mesh = sharding.make_mesh(config.mesh)
  stage = train.plan_stages(config, num_train)[stage_index - 1]
  dc = config.data
  shape = (1, dc.image_size, dc.image_size, dc.num_channels)
  _, _, init = train.create_state(config, model, mesh, stage, shape,
                                  sharding.RULES[config.mesh.param_sharding])
  state = init()
  tx = train.make_optimizer(config, stage, router_pattern=model.router_param_pattern)
  step = jax.jit(train.make_train_step(config, model, stage, tx), donate_argnums=(0,))
  return stage, state, step


def test_stages_share_a_step_unless_their_structure_differs(tiny_config):
  drnet = train.plan_stages(tiny_config("drnet"), 1000)
  assert [tuple(s.index for s in g) for g in train.share_groups(drnet)] == [(1, 2)]
  # CoDiNet's fine-tune freezes the routers and decides hard: a step of its own.
  codinet = train.plan_stages(tiny_config("codinet"), 1000)
  assert [tuple(s.index for s in g) for g in train.share_groups(codinet)] == [(1,), (2,)]
  with pytest.raises(ValueError, match="freeze_routers"):
    train.make_shared_train_step(tiny_config("codinet"), None, codinet)


@pytest.mark.slow
def test_shared_step_is_each_stages_own_step(tiny_config):
  """At a state of either stage, the shared step gives what that stage's own step gives.

  Up to float rounding: the shared graph holds terms a stage does not (a drop-path of rate 0,
  losses of weight 0), and XLA may fuse and reduce a different graph in another order. The tiny
  CoDiNet compiles in a fraction of DRNet's time; its stage 2 is made shareable (routers trained,
  relaxed decisions) and differs from stage 1 in every schedule and loss weight.
  """
  config = tiny_config("codinet", batch=16, stage1_steps=3, stage2_steps=3)
  config.train.stage1.update(tau_init=2.0, tau_floor=2.0)
  config.train.stage2.update(freeze_routers=False, hard_decisions=False, drop_path_rate=0.2,
                             tau_decay_per_epoch=0.5, tau_floor=0.5)
  ds = input_pipeline.load_dataset(config.data, "train")
  batch = input_pipeline.train_batch(ds, seed=0, step=0, global_batch_size=16)
  model = models.build_model(config.model)
  stages = train.plan_stages(config, len(ds))
  assert len(train.share_groups(stages)) == 1
  shared = jax.jit(train.make_shared_train_step(config, model, stages))
  key = jax.random.key(0)
  for stage in stages:
    _, state, own = _direct(config, stage.index, len(ds))
    state = state.replace(step=jnp.asarray(stage.start + 1, jnp.int32))
    want_state, want = own(jax.tree.map(jnp.copy, state), batch, key)
    got_state, got = shared(state, batch, key)
    got_params, want_params = _flat(got_state.params), _flat(want_state.params)
    assert got_params.keys() == want_params.keys()
    for k, v in want_params.items():
      np.testing.assert_allclose(got_params[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    for k, v in want.items():
      np.testing.assert_allclose(float(got[k]), float(v), rtol=1e-5, atol=1e-7, err_msg=k)
    # Stage 2 has none of stage 1's path and cost losses: they are there with weight 0.
    path_terms = {"loss/consistency", "loss/diversity", "loss/cost"}
    assert set(got) - set(want) == (path_terms if stage.index == 2 else set())
    assert all(float(got[k]) == 0.0 for k in set(got) - set(want))
    assert float(got["tau"]) == (2.0 if stage.index == 1 else 1.0)
    assert (float(got["drop_path_rate"]) > 0) == (stage.index == 2)


def test_state_initializer_gives_the_models_initial_variables(tiny_config):
  """The initializer is compiled at a low optimisation level (`INIT_COMPILER_OPTIONS`): same values."""
  config = tiny_config("codinet")
  model = models.build_model(config.model)
  stage = train.plan_stages(config, 1000)[0]
  _, _, init = train.create_state(config, model, sharding.make_mesh(config.mesh), stage,
                                  (1, 8, 8, 1), sharding.RULES["replicated"])
  state = init()
  key = jax.random.fold_in(jax.random.key(config.seed), train.STREAMS["init"])
  init_fn = jax.jit(lambda k: model.init({"params": k, "routing": k, "dropout": k},
                                         jnp.zeros((1, 8, 8, 1)), train=False))
  # Against XLA's default level, whatever level the suite compiles at (tests/conftest.py).
  want = init_fn.lower(key).compile(compiler_options={"xla_backend_optimization_level": 3})(key)
  got, expected = _flat(state.params), _flat(want["params"])
  assert got.keys() == expected.keys()
  for k, v in expected.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
  assert int(state.step) == stage.start


@pytest.mark.slow
def test_tiny_model_overfits_a_fixed_batch(tiny_config):
  config = tiny_config("codinet", "digits", batch=32)
  config.model.width = 8
  config.data.num_views = 1
  config.data.crop_padding = 0  # The very same images every step.
  config.train.weight_decay = 0.0
  config.train.stage1 = config_lib.stage_config(steps=40, lr=0.05, lr_schedule="constant")
  ds = input_pipeline.load_dataset(config.data, "train")
  batch = input_pipeline.train_batch(ds, seed=0, step=0, global_batch_size=32)
  _, state, step = _direct(config, 1, len(ds))
  key = jax.random.key(0)
  losses = []
  for _ in range(40):
    state, metrics = step(state, batch, key)
    losses.append(float(metrics["loss/total"]))
  assert all(map(math.isfinite, losses))
  assert np.mean(losses[-3:]) < 0.25 * losses[0], losses
  assert float(metrics["accuracy"]) >= 0.9, losses


@pytest.mark.slow
def test_codinet_stage2_freezes_routers(tiny_config):
  config = tiny_config("codinet", "digits")
  config.train.weight_decay = 1e-2  # Decay must not reach the routers either.
  config.train.stage2.lr = 0.1
  assert config.train.stage2.freeze_routers and config.train.stage2.hard_decisions
  ds = input_pipeline.load_dataset(config.data, "train")
  stage, state, step = _direct(config, 2, len(ds))
  before = _flat(jax.device_get(state.params))
  key = jax.random.key(1)
  for s in range(stage.start, stage.start + 2):
    state, metrics = step(state, input_pipeline.train_batch(ds, 0, s, 16), key)
    assert bool(metrics["finite"])
  after = _flat(jax.device_get(state.params))
  routers = [k for k in before if _is_router(k)]
  others = [k for k in before if not _is_router(k)]
  assert routers and others
  for k in routers:
    np.testing.assert_array_equal(before[k], after[k], err_msg=k)
  # Weight decay alone moves every kernel that is not a router's.
  for k in others:
    if k.endswith("kernel"):
      assert not np.array_equal(before[k], after[k]), k
  # The frozen routers carry no optimizer state at all (optax.set_to_zero).
  opt = _flat(state.opt_state)
  assert opt and not any(_is_router(k) for k in opt if k.endswith(("kernel", "bias")))


# ------------------------------------------------------------------------------------------------
# The trainer's pieces: optimizer, hooks.


def test_optimizer_freezes_routers_whatever_the_tree_it_is_given(tiny_config):
  """One optimizer per stage: its labels are computed from the tree it initialises and updates."""
  config = tiny_config("codinet", "digits")
  stage = train.plan_stages(config, 1000)[1]
  assert stage.cfg.freeze_routers
  tx = train.make_optimizer(config, stage)
  params = {"block0": {"router": {"kernel": jnp.ones((2, 2))}, "conv": {"kernel": jnp.ones((2,))}}}
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["block0"]["router"]["kernel"], 0.0)
  assert np.all(np.asarray(updates["block0"]["conv"]["kernel"]) != 0.0)
  # A pattern of the model's choosing selects its routers.
  tx = train.make_optimizer(config, stage, router_pattern=r"conv")
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["block0"]["conv"]["kernel"], 0.0)


def test_progress_rate_leaves_excluded_time_out(monkeypatch, capsys):
  """Time spent evaluating between steps counts in neither step/s nor the ETA."""
  clock = [1000.0]
  monkeypatch.setattr(hooks.time, "time", lambda: clock[0])
  written = []
  writer = types.SimpleNamespace(write_scalars=lambda step, s: written.append((step, s)))
  progress = hooks.ReportProgress(writer, stage_index=1, total_steps=40, every_steps=10)
  metrics = {"loss/total": 1.0}
  for step in range(20):
    clock[0] += 0.5  # two steps per second
    if step == 12:
      clock[0] += 30.0  # an evaluation after step 11
      progress.exclude(30.0)
    progress(step, metrics, force=False)
  assert [s for s, _ in written] == [10, 20]
  assert written[1][1]["steps_per_sec"] == pytest.approx(2.0)
  assert written[1][1]["eta_minutes"] == pytest.approx(20 / 2.0 / 60)
  assert "2 step/s  ETA 10s" in capsys.readouterr().out


def test_step_hooks_run_one_step_late_in_order():
  seen = []
  monitor = hooks.StepHooks([lambda step, m, force: seen.append(("a", step, force)),
                             lambda step, m, force: seen.append(("b", step, force))])
  monitor.push(0, {})
  assert not seen  # Step 0 is read only once step 1 is dispatched.
  monitor.push(1, {})
  monitor.flush()
  monitor.flush()
  assert seen == [("a", 0, False), ("b", 0, False), ("a", 1, True), ("b", 1, True)]


def test_a_skipped_step_keeps_the_state_but_advances_the_schedule():
  # Regression: a skipped non-finite step froze the optimizer's count, so the learning rate lagged
  # the step (the logged 'lr', from the step, was not the one applied) and never reached its end.
  from dynroute_jax import train_step  # pylint: disable=g-import-not-at-top
  schedule = optax.cosine_decay_schedule(0.1, 6)
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(schedule, momentum=0.9))
  params = {"w": jnp.ones(3)}
  state = train.TrainState(step=jnp.asarray(0), params=params, batch_stats={},
                           opt_state=tx.init(params))
  grads = {"w": jnp.full(3, 0.5)}
  state, finite, _ = train_step._apply_if_finite(state, tx, grads, jnp.float32(1.0), {})
  assert bool(finite)
  moved, trace = state.params["w"], state.opt_state[1][0].trace["w"]
  state, finite, _ = train_step._apply_if_finite(state, tx, grads, jnp.float32(jnp.nan), {})
  assert not bool(finite) and int(state.step) == 2
  np.testing.assert_array_equal(state.params["w"], moved)
  np.testing.assert_array_equal(state.opt_state[1][0].trace["w"], trace)
  assert int(state.opt_state[1][1].count) == 2  # the schedule is at the step's value
  updates, _ = tx.update(grads, state.opt_state, state.params)
  # Momentum 0.9: the update is -lr * (0.9 * trace + grad + decay), with lr = schedule(2).
  want = -schedule(2) * (0.9 * trace + grads["w"] + 1e-4 * moved)
  np.testing.assert_allclose(updates["w"], want, rtol=1e-6)


def test_check_finite_raises_or_skips(caplog):
  bad = {"finite": jnp.asarray(False), "loss/ce": jnp.asarray(jnp.nan),
         "grad_norm": jnp.asarray(1.0)}
  hooks.CheckFinite(skip=False)(3, {"finite": jnp.asarray(True)}, False)
  with pytest.raises(train.NonFiniteError, match="Non-finite value at step 3 in loss/ce"):
    hooks.CheckFinite(skip=False)(3, bad, False)
  hooks.CheckFinite(skip=True)(3, bad, False)
  assert "Skipped step 3" in caplog.text


def test_preemption_agrees_every_step_on_one_process(monkeypatch):
  calls = []
  monkeypatch.setattr(distributed, "any_process", lambda flag: calls.append(flag) or flag)
  with hooks.Preemption() as preemption:
    assert not preemption.should_stop(1, 5)
    preemption.signum = 15
    assert preemption.should_stop(2, 5)
  assert calls == [False, True]


# ------------------------------------------------------------------------------------------------
# Resume: bitwise the same as an uninterrupted run.


class _StopAt:
  """Stands in for `distributed.any_process`: reports a stop signal at the `stop`-th step of a run.

  On one process the trainer asks after every step, so the calls count the steps this run executed.
  """

  def __init__(self, stop=None):
    self.stop, self.calls = stop, 0

  def __call__(self, flag):
    self.calls += 1
    return bool(flag) or self.calls == self.stop


def _train(config, workdir, monkeypatch, stop=None):
  stopper = _StopAt(stop)
  monkeypatch.setattr(distributed, "any_process", stopper)
  report = train.train_and_evaluate(config, str(workdir))
  return report, stopper.calls


@pytest.fixture
def no_eval(monkeypatch):
  """Resume tests compare parameters: skip the evaluation and its compile."""
  monkeypatch.setattr(evaluation, "evaluate_and_report",
                      lambda config, model, variables, test_ds, mesh, workdir, **kw: {"step": kw["step"]})


def test_a_stage_is_saved_before_its_last_step_is_evaluated(tiny_config, tmp_path, monkeypatch,
                                                            capsys):
  """The periodic evaluation at a stage's end ran before the stage's checkpoint: when it failed,
  the stage's last steps were lost."""
  config = tiny_config("codinet", "digits", stage1_steps=2, stage2_steps=2)
  config.eval_every_steps = 2

  def failing_eval(run, stage, state, step):
    print(f"eval     step {step}")
    raise RuntimeError("evaluation failed")

  monkeypatch.setattr(train, "_periodic_eval", failing_eval)
  with pytest.raises(RuntimeError, match="evaluation failed"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  restored, _ = _restore(tmp_path / "run", 2, items=("params",))
  assert restored["params"]
  lines = [line for line in capsys.readouterr().out.splitlines()
           if line.startswith(("checkpoint", "eval "))]
  assert len(lines) == 2 and lines[0].startswith("checkpoint step 2"), lines
  assert lines[1] == "eval     step 2", lines


def test_the_final_report_takes_the_temperature_of_the_last_stage_that_trained(
    tiny_config, tmp_path, monkeypatch):
  # Regression: with a stage 2 of 0 steps the report took stage 2's starting temperature while
  # the run ended in stage 1, and `evaluate` (the checkpoint's stage) disagreed with it.
  config = tiny_config("codinet", "digits", stage1_steps=2, stage2_steps=0)
  config.train.stage2.epochs = 0.0
  config.train.stage1.tau_init = config.train.stage1.tau_floor = 2.0
  taus = []

  def report(config, model, variables, test_ds, mesh, workdir, **kw):
    taus.append(kw["tau"])
    return {"step": kw["step"]}

  monkeypatch.setattr(evaluation, "evaluate_and_report", report)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  meta = ckpt_lib.Checkpointer(str(tmp_path / "run" / "checkpoints")).read_meta(2)
  n = len(train.training_splits(config)[0])
  assert taus == [pytest.approx(2.0)]
  assert evaluate.eval_temperature(config, 2, meta["stage"], n)[0] == pytest.approx(taus[0])


def _steps_on_disk(workdir) -> set[int]:
  """The steps of the train metrics in the TensorBoard files, as far as they reached the disk."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  steps = set()
  for path in pathlib.Path(workdir).glob("events.out.tfevents.*"):
    data, pos = path.read_bytes(), 0
    while pos + 12 <= len(data):  # TFRecords: length (8 bytes), its CRC, payload, payload CRC.
      n = int.from_bytes(data[pos:pos + 8], "little")
      if pos + 16 + n > len(data):
        break
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      if any(v.tag == "steps_per_sec" for v in event.summary.value):  # a progress record
        steps.add(event.step)
      pos += 16 + n
  return steps


def test_metrics_reach_the_disk_before_each_checkpoint(tiny_config, tmp_path, monkeypatch,
                                                       no_eval):
  # Regression: the summary file was flushed only at the end or on a stop signal. A crash after a
  # checkpoint lost the metrics still in its buffer, and the resumed run started after them.
  config = tiny_config("codinet", "digits", stage1_steps=6, stage2_steps=0)
  config.train.stage2.epochs = 0.0
  config.checkpoint.every_steps = 2
  config.log_every_steps = 1
  workdir = tmp_path / "run"
  on_disk, real_save = {}, train._save

  def save(ckpt, step, *args, **kwargs):
    on_disk[step] = _steps_on_disk(workdir)
    return real_save(ckpt, step, *args, **kwargs)

  monkeypatch.setattr(train, "_save", save)
  train.train_and_evaluate(config, str(workdir))
  written = _steps_on_disk(workdir)
  assert sorted(on_disk) == [2, 4, 6] and written
  for step, steps in on_disk.items():
    assert steps == {s for s in written if s <= step}, (step, sorted(steps), sorted(written))


def _resume_config(tiny_config):
  config = tiny_config("codinet", "digits", stage1_steps=3, stage2_steps=2)
  config.train.stage1.drop_path_rate = 0.2  # Exercise every random stream.
  return config


@pytest.mark.slow
def test_resume_is_bitwise_identical(tiny_config, tmp_path, monkeypatch, no_eval):
  """Interrupted runs end bitwise where an uninterrupted one does (params, statistics, optimizer).

  Run A stops mid stage 1, resumes across the stage boundary (fresh stage-2 optimizer, frozen
  routers), stops mid stage 2, and resumes from the restored stage-2 optimizer state to the end.
  Run B trains stage 1 only, then the same workdir with stage 2 added resumes exactly at the
  boundary.
  """
  config = _resume_config(tiny_config)
  reference = tmp_path / "reference"
  model_cls = type(models.build_model(config.model))
  inits, real_init = [], model_cls.init
  monkeypatch.setattr(model_cls, "init", lambda *a, **k: inits.append(1) or real_init(*a, **k))
  report, calls = _train(config, reference, monkeypatch)
  assert report["step"] == 5 and calls == 5
  # The model's initialisation is traced once: the initializer compiles from the trace of the
  # first stage's abstract state, and the second stage reuses its variables.
  assert len(inits) == 1
  monkeypatch.setattr(model_cls, "init", real_init)
  expected, _ = _restore(reference, 5)
  expected3, _ = _restore(reference, 3, items=("params",))

  run_a = tmp_path / "a"
  report, calls = _train(config, run_a, monkeypatch, stop=2)
  assert report == {"preempted": True, "step": 2} and calls == 2
  report, calls = _train(config, run_a, monkeypatch, stop=2)
  assert report == {"preempted": True, "step": 4} and calls == 2
  _, meta = _restore(run_a, 4, items=("params",))
  assert meta["stage"] == 2
  report, calls = _train(config, run_a, monkeypatch)
  assert report["step"] == 5 and calls == 1
  got, _ = _restore(run_a, 5)
  for item in ("params", "batch_stats", "opt_state"):
    _assert_bitwise_equal(expected[item], got[item], f"run A {item}")
  got3, _ = _restore(run_a, 3, items=("params",))
  _assert_bitwise_equal(expected3["params"], got3["params"], "run A params at step 3")

  run_b = tmp_path / "b"
  one_stage = config.copy_and_resolve_references()
  one_stage.train.num_stages = 1
  report, calls = _train(one_stage, run_b, monkeypatch)
  assert report["step"] == 3 and calls == 3
  report, calls = _train(config, run_b, monkeypatch)
  assert report["step"] == 5 and calls == 2
  got, _ = _restore(run_b, 5)
  for item in ("params", "batch_stats", "opt_state"):
    _assert_bitwise_equal(expected[item], got[item], f"run B {item}")


# ------------------------------------------------------------------------------------------------
# 1 device against 8 fake CPU devices.

_DEVICES_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import jax
    from conftest import make_tiny_config
    from dynroute_jax import evaluation, train
    evaluation.evaluate_and_report = lambda *a, **k: {{}}
    out = {{"devices": jax.device_count(), "threefry_partitionable": jax.config.jax_threefry_partitionable}}
    config = make_tiny_config("codinet", "digits", stage1_steps=3, batch=16)
    config.train.num_stages = 1
    config.train.stage1.drop_path_rate = 0.2
    if jax.device_count() > 1:
      bad = config.copy_and_resolve_references()
      bad.train.global_batch_size = 12
      try:
        train.train_and_evaluate(bad, os.path.abspath("bad"))
      except ValueError as e:
        out["indivisible_error"] = str(e)
    losses = {{}}
    # Work directories in the test's own folder (the script's cwd), not in the system temp dir.
    train.train_and_evaluate(config, os.path.abspath(f"run_{{jax.device_count()}}"),
                             metrics_callback=lambda s, m: losses.update({{s: m["loss/total"]}}))
    out["losses"] = [losses[s] for s in sorted(losses)]
    print("RESULT " + json.dumps(out))
""")


def _run_devices(n, tmp_path):
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT.format(tests=str(TESTS))],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_one_device_and_eight_fake_devices_give_the_same_losses(tmp_path):
  one = _run_devices(1, tmp_path)
  eight = _run_devices(8, tmp_path)
  assert one["devices"] == 1 and eight["devices"] == 8
  # Random bits (augmentation, Gumbel noise, drop-path) do not depend on how arrays are sharded:
  # jit draws the same values whatever the output sharding (with jax_threefry_partitionable, the
  # default, each device computes only its shard). Both sides must use the same setting.
  assert one["threefry_partitionable"] == eight["threefry_partitionable"]
  assert len(one["losses"]) == len(eight["losses"]) == 3
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5, atol=0)
  # Bad input before compiling: 12 examples cannot be split over 8 devices.
  msg = eight["indivisible_error"]
  assert "global_batch_size=12" in msg and "8" in msg


# ------------------------------------------------------------------------------------------------
# Dry run.


def test_dry_run_compiles_the_step_and_never_builds_the_state(tiny_config, tmp_path, monkeypatch):
  """A dry run reports what the step needs per device: it neither builds nor places the state
  (which is what it is there to size before a pod allocates it)."""
  config = tiny_config("codinet", "digits")
  config.dry_run = True
  real, inits = train._create_state, []  # pylint: disable=protected-access

  def create_state(*args, **kwargs):
    abstract, shardings, init = real(*args, **kwargs)
    return abstract, shardings, lambda: inits.append(1) or init()

  monkeypatch.setattr(train, "_create_state", create_state)
  report = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert report["stage"] == 1 and report["compile_seconds"] > 0
  assert "FLOPs per step" in report["report"]
  assert not inits
  assert not list((tmp_path / "run" / "checkpoints").glob("[0-9]*"))
  # On a work directory with a checkpoint to resume, it does not restore the state either.
  config.dry_run, config.train.num_stages = False, 1
  train.train_and_evaluate(config, str(tmp_path / "resumable"))  # Stage 1 only: step 2 saved.
  config.dry_run, config.train.num_stages = True, 2
  restores = []
  inits.clear()
  monkeypatch.setattr(train, "_restore", lambda *a: restores.append(a))
  report = train.train_and_evaluate(config, str(tmp_path / "resumable"))
  assert report["stage"] == 2 and not restores and not inits


# ------------------------------------------------------------------------------------------------
# Bad input, refused before anything is compiled or written.


def test_unknown_dataset_is_refused_before_anything_is_written(tiny_config, tmp_path):
  config = tiny_config("codinet", "digits")
  config.data.name = "mnist"
  with pytest.raises(ValueError, match="data.name"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_misspelled_config_field_is_refused(tiny_config, tmp_path):
  # A locked config (what main's --config flag gives) refuses a misspelled field at once ...
  config = tiny_config("codinet", "digits")
  config.lock()
  with pytest.raises(AttributeError, match="global_batch_sizee"):
    config.train.global_batch_sizee = 8
  config.train.global_batch_size = 8  # ... and takes the right one.
  # ... and so do the command-line overrides of main's flag.
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  path = str(REPO / "configs" / "digits.py")

  def parse(*overrides):
    argv = ["main", f"--config={path}:codinet", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config

  assert parse("--config.train.stage1.steps=3").train.stage1.steps == 3
  with pytest.raises(Exception, match="stepz"):
    parse("--config.train.stage1.stepz=3")
  # An unlocked config with a misspelled field is refused by train_and_evaluate, nothing written.
  config = tiny_config("codinet", "digits")
  config.train.skip_nonfinite_step = True
  with pytest.raises(ValueError, match="skip_nonfinite_step"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def _snapshot(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = (os.stat(p).st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
  return out


def _other_model_workdir(tiny_config, workdir, with_config_json):
  """A workdir holding a DRNet run's checkpoint (and config.json)."""
  other = tiny_config("drnet", "digits")
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False,
                               fingerprint=train.model_fingerprint(other))
  ckpt.save(3, params={"w": np.zeros((2,), np.float32)}, meta={"stage": 1, "model": "drnet"})
  ckpt.close()
  if with_config_json:
    (workdir / "config.json").write_text(other.to_json_best_effort())


@pytest.mark.parametrize("with_config_json", [True, False])
def test_workdir_of_another_model_is_refused_untouched(tiny_config, tmp_path, with_config_json):
  workdir = tmp_path / "run"
  _other_model_workdir(tiny_config, workdir, with_config_json)
  before = _snapshot(workdir)
  config = tiny_config("codinet", "digits")
  with pytest.raises((ValueError, ckpt_lib.CheckpointError), match="(?i)model"):
    train.train_and_evaluate(config, str(workdir))
  assert _snapshot(workdir) == before
