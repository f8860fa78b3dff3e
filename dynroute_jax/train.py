"""Two-stage sharded training of routed models: the library function `train_and_evaluate`.

One compiled train step serves every stage that has the same structure, with explicit in/out
shardings over a device Mesh (data parallel by default, FSDP selectable), the state donated.
Stage 1 and stage 2 differ in learning rate, temperature schedule and loss weights, which the
shared step looks up by the stage its step counter lies in, and (CoDiNet) in frozen routers with
hard decisions, which take a step of their own; each stage starts a fresh optimizer state and
keeps the parameters. The pieces:

  * `workdir`: the checks of the work directory, all before anything is compiled or written.
  * `train_step`: the state, its initialisation and the step (`losses.total_loss` inside).
  * `optimizers` and `schedules`: the stage's optax optimizer, learning rate and temperature.
  * `hooks`: stop signals, the finiteness check and the progress reports around the steps.
  * `input_pipeline.train_iterator`: the batches, assembled ahead in a background thread.

The data order and every random bit are pure functions of (seed, step), so a resumed run sees
exactly what an uninterrupted one would and ends bit for bit where it does.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dynroute_jax import checkpoint as ckpt_lib
from dynroute_jax import config_lib
from dynroute_jax import console
from dynroute_jax import evaluation
from dynroute_jax import hooks
from dynroute_jax import input_pipeline
from dynroute_jax import manifest
from dynroute_jax import models
from dynroute_jax import optimizers
from dynroute_jax import sharding
from dynroute_jax import train_step
from dynroute_jax import workdir as workdir_lib
from dynroute_jax.models import base as models_base
# Re-exported: the trainer's public names from before its pieces had modules of their own.
from dynroute_jax.hooks import NonFiniteError  # noqa: F401
from dynroute_jax.optimizers import make_optimizer  # noqa: F401
from dynroute_jax.schedules import (  # noqa: F401
    Stage, final_tau, lr_schedule, plan_stages, stage_at, tau_schedule, training_splits)
from dynroute_jax.train_step import (  # noqa: F401
    STREAMS, TrainState, create_state, make_shared_train_step, make_train_step, share_groups,
    stream_key)

# The work directory's checks under their earlier names.
_prepare_workdir = workdir_lib.prepare_workdir
_check_config_json = workdir_lib.check_config_json
_save_config = workdir_lib.save_config

# Batches assembled ahead of the step that needs them.
PREFETCH_BATCHES = 2

MetricsCallback = Callable[[int, dict[str, float]], None]


# One fingerprint, stored in every checkpoint's meta (re-exported for the trainer's callers).
model_fingerprint = manifest.model_fingerprint


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the stages of one `train_and_evaluate` call share."""
  config: ml_collections.ConfigDict
  workdir: str
  model: models_base.RoutedModel
  mesh: jax.sharding.Mesh
  stages: list[Stage]
  train_ds: input_pipeline.Dataset
  test_ds: input_pipeline.Dataset
  ckpt: ckpt_lib.Checkpointer
  writer: Any  # `tensorboard_writer.SummaryWriter`, or any clu metric writer.
  # The compiled steps, one per `train_step.share_groups` group, keyed by its first stage index.
  compiled: dict[int, Any] = dataclasses.field(default_factory=dict)
  # The abstract model variables, traced once for every stage (`train_step.create_state`).
  variables: dict[str, Any] = dataclasses.field(default_factory=dict)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       metrics_callback: MetricsCallback | None = None) -> dict[str, Any]:
  """Trains every stage the config asks for, evaluates, and returns the evaluation report.

  Resumes from the newest intact checkpoint in `workdir/checkpoints` when there is one. When
  checkpoints exist but none verifies, raises `checkpoint.NoGoodCheckpointError` naming each
  damaged step, unless `config.checkpoint.restart_if_damaged` allows starting from step 0.
  Holds the work directory's lock (`workdir_lock`) while it runs: a second training on the same
  work directory raises `workdir_lock.WorkdirLockedError` naming the first. A stop signal
  (SIGTERM/SIGINT) during the final evaluation stops it cleanly: the final checkpoint is saved,
  so the same call evaluates again.

  Args:
    config: a config from `configs/` (see `config_lib.base_config`).
    workdir: directory for the resolved config, checkpoints, metrics and `eval/report.json`.
    metrics_callback: optional `f(step, scalars)`, called on every process after every train step
      with that step's metrics as Python floats (`scalars['loss/total']`, ...), one step late so
      dispatch stays asynchronous. For tests and custom logging; the metric writer is unaffected.

  Returns:
    The evaluation report (also written to `workdir/eval/report.json`); with `config.dry_run` the
    dry-run report instead, without training; after a stop signal `{'preempted': True, 'step':
    the checkpointed step}`.
  """
  # Released whatever the way out: the work directory's lock, the evaluation's signal handlers.
  with contextlib.ExitStack() as cleanup:
    try:
      return _train_and_evaluate(config, workdir, metrics_callback, cleanup)
    except hooks.EvaluationInterrupted as e:
      logging.warning("Received signal %d during the final evaluation; it was stopped. Checkpoint "
                      "step %d (the end of training) is saved: rerun the same command to evaluate.",
                      e.signum, e.step)
      return {"preempted": True, "step": e.step, "interrupted": "evaluation"}


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        metrics_callback: MetricsCallback | None,
                        cleanup: contextlib.ExitStack) -> dict[str, Any]:
  """`train_and_evaluate`; what must be undone on the way out is pushed onto `cleanup`."""
  run, restored_step = _prepare(config, workdir, cleanup)
  state, start_step, stopped = None, 0, False
  if restored_step is not None:
    start_step = restored_step
    # A dry run only sizes the step that would run next: it never reads the saved state back.
    if not (config.dry_run and restored_step < run.stages[-1].end):
      state = _restore(run, restored_step)
  with hooks.Preemption(on_error=run.ckpt.close) as preemption:
    for stage in run.stages:
      if start_step >= stage.end:
        continue  # Trained before the resume.
      state, compiled, compile_s = _begin_stage(run, stage, state, start_step)
      if config.dry_run:
        return _dry_run(run, stage, compiled, compile_s)
      run.writer.write_scalars(max(start_step, stage.start), {"compile_seconds": compile_s})
      state, stopped = _train_stage(run, stage, state, compiled, start_step, preemption,
                                    metrics_callback)
      if stopped:
        break
      start_step = stage.end
  run.ckpt.wait_until_finished()
  if stopped:
    run.ckpt.close()
    run.writer.flush()
    return {"preempted": True, "step": int(jax.device_get(state.step))}
  return _evaluate(run, state, cleanup)


def _prepare(config: ml_collections.ConfigDict, workdir: str, cleanup: contextlib.ExitStack
             ) -> tuple[_Run, int | None]:
  """Every check that may refuse the run, then the first write; returns (run, step to resume).

  The order matters: nothing is written before the config, the devices and the work directory
  passed, and a refused resume leaves the work directory as it was.
  """
  config_lib.validate(config)
  config_lib.check_model_matches_data(config)
  model = models.build_model(config.model)  # Validates the model fields.
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.train.global_batch_size, mesh, jax.process_count())
  workdir_lib.prepare_workdir(workdir)
  workdir_lib.lock_workdir(workdir, cleanup)
  train_ds, _ = training_splits(config)
  test_ds = input_pipeline.load_dataset(config.data, config.data.eval_split)
  stages = plan_stages(config, len(train_ds))
  # Both checks of the work directory's model come before config.json is written.
  workdir_lib.check_config_json(config, workdir)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                               async_save=config.checkpoint.async_save,
                               fingerprint=model_fingerprint(config))
  restored_step = workdir_lib.resume_step(ckpt, config)
  if restored_step is not None:
    workdir_lib.check_resume_stage(ckpt, restored_step, stages)
  workdir_lib.save_config(config, workdir)
  writer = hooks.metric_writer(workdir)
  cleanup.callback(writer.close)
  run = _Run(config=config, workdir=workdir, model=model, mesh=mesh, stages=stages,
             train_ds=train_ds, test_ds=test_ds, ckpt=ckpt, writer=writer)
  return run, restored_step


def _create_state(run: _Run, stage: Stage, tx: optax.GradientTransformation | None = None
                  ) -> tuple[TrainState, TrainState, Callable[[], TrainState]]:
  """`create_state` of `stage` on the run's mesh (called through this module: tests replace it)."""
  data = run.config.data
  abstract, shardings, init = create_state(
      run.config, run.model, run.mesh, stage,
      (1, data.image_size, data.image_size, data.num_channels),
      sharding.RULES[run.config.mesh.param_sharding], tx=tx, variables=run.variables or None)
  run.variables.update(params=abstract.params, batch_stats=abstract.batch_stats)
  return abstract, shardings, init


def _restore(run: _Run, step: int) -> TrainState:
  """The state saved at `step`, placed with the shardings of its stage's state."""
  stage = run.stages[int(run.ckpt.read_meta(step)["stage"]) - 1]
  abstract, shardings, _ = _create_state(run, stage)
  names = ("params", "batch_stats", "opt_state")
  items, _ = run.ckpt.restore(step, abstract={k: getattr(abstract, k) for k in names},
                              shardings={k: getattr(shardings, k) for k in names})
  state = TrainState(step=_replicated_array(lambda: jnp.asarray(step, jnp.int32), run.mesh),
                     params=items["params"], batch_stats=items["batch_stats"],
                     opt_state=items["opt_state"])
  console.info(f"Resumed from step {step} (stage {stage.index}).")
  return state


def _begin_stage(run: _Run, stage: Stage, state: TrainState | None, start_step: int
                 ) -> tuple[TrainState, Any, float]:
  """(the state entering `stage`, its compiled step, compile seconds).

  The step is compiled once per group of stages that can share it (`train_step.share_groups`); a
  later stage of a group reuses it (0 compile seconds).
  """
  tx = optimizers.make_optimizer(run.config, stage,
                                 router_pattern=run.model.router_param_pattern)
  abstract, shardings, init = _create_state(run, stage, tx)
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="init") as pool:
    # A fresh run's initializer (hundreds of random initializers: compiling or loading it takes
    # seconds, running it milliseconds) is compiled and run in the background while this thread
    # traces and compiles the step: XLA compiles outside Python's lock, on another core.
    # A dry run only sizes the step: it never builds the state it would allocate.
    initializing = pool.submit(init) if state is None and not run.config.dry_run else None
    if state is not None and (
        jax.tree.structure(state.opt_state) != jax.tree.structure(abstract.opt_state)
        or start_step == stage.start):
      # A new stage: keep parameters and statistics, start a fresh optimizer state.
      opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(state.params)
      state = state.replace(opt_state=opt_state)
    compiled, compile_s = _stage_step(run, stage, abstract, shardings)
    if initializing is not None:
      state = initializing.result()
  return state, compiled, compile_s


def _stage_step(run: _Run, stage: Stage, abstract: TrainState, shardings: TrainState
                ) -> tuple[Any, float]:
  """`stage`'s compiled step, compiled for the first stage of its group (`share_groups`) and
  reused by the others (0 seconds); says which on the console."""
  group = next(g for g in train_step.share_groups(run.stages) if stage in g)
  if group[0].index in run.compiled:
    console.info(f"stage {stage.index}  reuses the train step compiled for stage {group[0].index}")
    return run.compiled[group[0].index], 0.0
  compiled, compile_s = train_step.compile_step(
      train_step.make_shared_train_step(run.config, run.model, group), abstract, shardings,
      run.mesh, run.config)
  run.compiled[group[0].index] = compiled
  shared = ("" if len(group) == 1
            else f" (shared by stages {', '.join(str(g.index) for g in group)})")
  console.info(f"stage {stage.index}  compiled the train step in {compile_s:.1f} s{shared}")
  return compiled, compile_s


def _dry_run(run: _Run, stage: Stage, compiled: Any, compile_s: float) -> dict[str, Any]:
  """The compiled step's memory and cost report, instead of training."""
  examples = run.config.train.global_batch_size * run.config.data.num_views
  report = {"stage": stage.index, "compile_seconds": compile_s,
            "report": sharding.dry_run_report(compiled, num_devices=run.mesh.size,
                                              examples_per_step=examples)}
  print(report["report"])
  run.ckpt.close()
  return report


def _train_stage(run: _Run, stage: Stage, state: TrainState, compiled: Any, start_step: int,
                 preemption: hooks.Preemption, metrics_callback: MetricsCallback | None
                 ) -> tuple[TrainState, bool]:
  """Runs `stage` from `start_step` to its end; returns (state, whether a stop signal ended it)."""
  config, ckpt = run.config, run.ckpt
  first = max(start_step, stage.start)
  base_key = _replicated_array(lambda: jax.random.key(config.seed), run.mesh)
  progress = hooks.ReportProgress(run.writer, stage.index, run.stages[-1].end,
                                  config.log_every_steps)
  monitor = hooks.StepHooks(
      [hooks.CheckFinite(skip=config.train.skip_nonfinite_steps)]
      + ([hooks.MetricsCallback(metrics_callback)] if metrics_callback else []) + [progress])
  batches = input_pipeline.train_iterator(
      run.train_ds, config.seed, first, config.train.global_batch_size, jax.process_index(),
      jax.process_count(), prefetch=PREFETCH_BATCHES, num_steps=stage.end - first)
  with contextlib.closing(batches):
    for step, local_batch in zip(range(first, stage.end), batches):
      state, metrics = compiled(state, sharding.make_global_batch(local_batch, run.mesh), base_key)
      monitor.push(step, metrics)
      done = step + 1
      if preemption.should_stop(done, stage.end):
        monitor.flush()
        _save(ckpt, done, state, stage, config, force=True)
        ckpt.wait_until_finished()
        logging.warning("Saved step %d after a stop signal (%s); rerun the same command to resume.",
                        done, preemption.signum)
        return state, True
      at_end = done == stage.end
      if at_end or done % config.checkpoint.every_steps == 0:
        monitor.flush()  # A non-finite step stops training before a checkpoint can include it.
        # The metrics up to the checkpoint go to disk with it: after a crash the resumed run
        # starts after them, so metrics still in the file buffer would be lost for good.
        run.writer.flush()
        # The stage's end is always saved, and before its evaluation: an evaluation that fails
        # never costs the stage's last steps.
        _save(ckpt, done, state, stage, config, force=at_end)
      if config.eval_every_steps and done % config.eval_every_steps == 0 and (
          done != run.stages[-1].end):  # The final report evaluates the last step.
        monitor.flush()  # The step's progress line first, and a finite step evaluated.
        progress.exclude(_periodic_eval(run, stage, state, done))
  monitor.flush()
  return state, False


def _periodic_eval(run: _Run, stage: Stage, state: TrainState, step: int) -> float:
  """`config.eval_every_steps`: the headline numbers after `step` steps, as eval/* summaries and
  one console line. Returns the seconds it took."""
  t0 = time.time()
  out = evaluation.evaluate_headline(
      run.config, run.model, {"params": state.params, "batch_stats": state.batch_stats},
      run.test_ds, run.mesh, tau=final_tau(stage, step))
  run.writer.write_scalars(step, {f"eval/{k}": v for k, v in out.items()})
  seconds = time.time() - t0
  console.info(f"eval     step {step}  acc {out['accuracy_routed']:.4f} routed at "
               f"T {out['threshold']:g} ({out['macs_routed_mean'] / 1e6:.4g}M MACs), "
               f"{out['accuracy_all']:.4f} all branches ({out['macs_all'] / 1e6:.4g}M)  "
               f"{console.format_duration(seconds)}")
  return seconds


def _evaluate(run: _Run, state: TrainState | None, cleanup: contextlib.ExitStack
              ) -> dict[str, Any]:
  """The final evaluation of the trained state; a stop signal ends it at once."""
  if state is None:  # Every stage was already done: restore the final parameters for evaluation.
    raise RuntimeError("internal: no state after training")
  step = int(jax.device_get(state.step))
  cleanup.enter_context(hooks.StopEvaluationOnSignal(step))
  # The temperature the final step trained at, as `evaluate` takes it from the checkpoint's stage.
  last = stage_at(run.stages, step) or run.stages[-1]
  report = evaluation.evaluate_and_report(
      run.config, run.model, {"params": state.params, "batch_stats": state.batch_stats},
      run.test_ds, run.mesh, run.workdir, tau=final_tau(last, last.end), step=step)
  run.writer.write_scalars(last.end, {f"eval/{k}": v for k, v in report.items()
                                      if isinstance(v, (int, float))})
  run.writer.flush()
  run.ckpt.close()
  return report


def _replicated_array(make: Callable[[], jax.Array], mesh: jax.sharding.Mesh) -> jax.Array:
  """`make()`'s value, replicated on every device of every process.

  `jax.device_put(value, sharding)` refuses a sharding that spans other processes' devices
  (multi-host); a jitted computation with `out_shardings` works with one process or many.
  """
  return jax.jit(make, out_shardings=sharding.replicated(mesh))()


def _save(ckpt: ckpt_lib.Checkpointer, step: int, state: TrainState, stage: Stage,
          config: ml_collections.ConfigDict, force: bool = False) -> None:
  """Saves `state` as checkpoint `step` (unless not due and not forced), with the stage's meta."""
  meta = {"step": step, "stage": stage.index, "model": config.model.name,
          "variant": config.model.get("variant", ""), "time": time.time()}
  started = ckpt.save(step, params=state.params, batch_stats=state.batch_stats,
                      opt_state=state.opt_state, meta=meta, force=force)
  if started:
    console.info(f"checkpoint step {step}" + ("  (saving in the background)"
                                               if config.checkpoint.async_save else "  saved"))
