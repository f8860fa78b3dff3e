"""Two-stage sharded training of routed models: the library function `train_and_evaluate`.

One jitted train step per stage, with explicit in/out shardings over a device Mesh (data parallel by
default, FSDP selectable), the state donated. Stage 1 and stage 2 differ in learning rate, temperature
schedule, loss weights and (CoDiNet) frozen routers with hard decisions; each stage starts a fresh
optimizer state and keeps the parameters.

Randomness is explicit and replayable: the per-step key is fold_in(base, step), split into named streams
(routing = Gumbel noise, dropout = drop-path / drop-branch, augment = data augmentation); the data order
is a pure function of (seed, step). A resumed run therefore sees exactly what an uninterrupted one would.

Shape letters: B batch (images), M views per image, H/W/C image, N classes, S routed units, P path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable
import uuid

from absl import logging
from etils import epath
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dynroute_jax import checkpoint as ckpt_lib
from dynroute_jax import config_lib
from dynroute_jax import console
from dynroute_jax import distributed
from dynroute_jax import evaluation
from dynroute_jax import input_pipeline
from dynroute_jax import losses
from dynroute_jax import routing
# Re-exported: the trainer's public names from before schedules had a module of their own.
from dynroute_jax.schedules import (  # noqa: F401
    Stage, final_tau, lr_schedule, plan_stages, tau_schedule, training_splits)
from dynroute_jax import sharding
from dynroute_jax import workdir_lock
from dynroute_jax import models
from dynroute_jax.models import base as models_base

Array = jax.Array
PyTree = Any

# Named random streams: a stream's id is folded into the per-step key.
STREAMS = {"init": 0, "routing": 1, "dropout": 2, "augment": 3}
ROUTER_REGEX = "router"
# Multi-host: how often processes agree on whether a stop signal arrived anywhere.
PREEMPTION_CHECK_STEPS = 10


@flax.struct.dataclass
class TrainState:
  step: Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree


class NonFiniteError(FloatingPointError):
  """A loss term or the gradients became NaN/Inf."""


def stream_key(base: Array, step: Array | int, stream: str) -> Array:
  """The key of `stream` at `step`: fold_in(fold_in(base, step), stream id)."""
  return jax.random.fold_in(jax.random.fold_in(base, step), STREAMS[stream])


def _router_mask(params: PyTree) -> PyTree:
  """True for router parameters (their path contains 'router')."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  return flax.traverse_util.unflatten_dict({k: ROUTER_REGEX in k for k in flat}, sep="/")


def _decay_mask(params: PyTree) -> PyTree:
  """Weight decay on kernels only (not on biases nor batch-norm scales), as in the peers' code."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  return flax.traverse_util.unflatten_dict({k: k.endswith("kernel") for k in flat}, sep="/")


def make_optimizer(config: ml_collections.ConfigDict, stage: Stage, params: PyTree
                   ) -> optax.GradientTransformation:
  """SGD (momentum or Nesterov) with decoupled-from-BN weight decay; routers frozen if asked."""
  tc = config.train
  tx = optax.chain(
      optax.clip_by_global_norm(tc.grad_clip_norm) if tc.grad_clip_norm > 0 else optax.identity(),
      optax.add_decayed_weights(tc.weight_decay, mask=_decay_mask),
      optax.sgd(lr_schedule(stage), momentum=tc.momentum, nesterov=tc.optimizer == "nesterov"),
  )
  if tc.router_lr_multiplier != 1.0:
    # SGD updates are linear in the learning rate: scaling the routers' updates scales their lr.
    tx = optax.chain(tx, optax.masked(optax.scale(tc.router_lr_multiplier), _router_mask))
  if stage.cfg.freeze_routers:
    # Frozen routers get a zero update and no optimizer state: they provably do not change.
    labels = jax.tree.map(lambda r: "frozen" if r else "train", _router_mask(params))
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx


def model_fingerprint(config: ml_collections.ConfigDict) -> str:
  """Identifies the architecture: checkpoints of another model must not be resumed into this one."""
  blob = json.dumps({"model": config.model.to_dict(), "num_classes": config.data.num_classes,
                     "image_size": config.data.image_size,
                     "num_channels": config.data.num_channels}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _routing_stats(out: models_base.ModelOutput) -> dict[str, Array]:
  """Branch-selection ratios and router entropy, so a collapsed router is visible."""
  stats = {}
  if len(out.site_shape) == 3:  # DRNet: (L, C, K) branch weights.
    w = out.weights.reshape(out.weights.shape[0], *out.site_shape)
    ratio_k = jnp.mean(w, axis=(0, 1, 2))
    for k in range(ratio_k.shape[0]):
      stats[f"branch_ratio/{k}"] = ratio_k[k]
    stats["router_entropy"] = jnp.mean(routing.entropy(w, axis=-1))
  else:  # CoDiNet: run probability per block.
    v = jnp.clip(out.weights, 1e-7, 1 - 1e-7)
    stats["run_ratio"] = jnp.mean(out.weights)
    stats["router_entropy"] = jnp.mean(-(v * jnp.log(v) + (1 - v) * jnp.log(1 - v)))
  return stats


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module, stage: Stage,
                    tx: optax.GradientTransformation) -> Callable:
  """The (unjitted) train step of one stage: (state, batch, base_key) -> (state, metrics)."""
  sc, dc, tc = stage.cfg, config.data, config.train
  num_views = dc.num_views
  tau_fn, lr_fn = tau_schedule(stage), lr_schedule(stage)
  extra = {"hard": True} if (sc.hard_decisions and config.model.name == "codinet") else {}

  def step_fn(state: TrainState, batch: dict[str, Array], base_key: Array):
    step = state.step
    labels_B = batch["label"]
    images = batch["image"]
    if num_views > 1:
      views_BxM = input_pipeline.make_views(stream_key(base_key, step, "augment"), images, dc, num_views)
      x = views_BxM.reshape((-1,) + views_BxM.shape[2:])
      labels = jnp.repeat(labels_B, num_views)
    else:
      x = input_pipeline.augment(stream_key(base_key, step, "augment"), images, dc)
      labels = labels_B
    tau = tau_fn(step)
    frac = (step - stage.start).astype(jnp.float32) / max(stage.num_steps, 1)
    # A static 0 lets the model leave drop-path out of the graph entirely.
    drop_path = sc.drop_path_rate * jnp.clip(frac, 0.0, 1.0) if sc.drop_path_rate > 0 else 0.0
    rngs = {"routing": stream_key(base_key, step, "routing"),
            "dropout": stream_key(base_key, step, "dropout")}

    def loss_fn(params):
      out, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                                  tau=tau, drop_path_rate=drop_path, rngs=rngs,
                                  mutable=["batch_stats"], **extra)
      terms = {}
      ce_B = losses.cross_entropy(out.logits, labels, tc.label_smoothing)
      terms["ce"] = jnp.mean(ce_B)
      if sc.aux_weight > 0 and out.aux_logits is not None:
        terms["aux"] = sc.aux_weight * jnp.mean(
            losses.cross_entropy(out.aux_logits, labels, tc.label_smoothing))
      correct = jnp.argmax(out.logits, -1) == labels
      if sc.resource_weight > 0:
        cost = out.expected_routed_macs if tc.resource_cost == "branches" else out.expected_macs
        terms["resource"] = losses.resource_loss(cost, correct, sc.resource_weight)
      if sc.consistency_weight > 0 or sc.diversity_weight > 0:
        path = out.router_probs if tc.path_loss_input == "clean" else out.path
        paths = path.reshape(-1, num_views, path.shape[-1])
        if sc.consistency_weight > 0:
          terms["consistency"] = sc.consistency_weight * losses.consistency_loss(
              paths, tc.consistency_margin)
        if sc.diversity_weight > 0:
          terms["diversity"] = sc.diversity_weight * losses.diversity_loss(paths, tc.diversity_margin)
      if sc.cost_weight > 0:
        gate = losses.correct_predictions(out.logits, labels) if tc.cost_on_correct_only else None
        if tc.cost_type == "count_l1":
          cost = losses.count_cost_loss(out.weights, tc.cost_target, gate)
        else:
          full = losses.full_model_macs(out.macs_table, out.macs_fixed)
          w = out.weights if gate is None else out.weights * gate[:, None]
          cost = losses.cost_loss(w, out.macs_table, normalizer=full)
        terms["cost"] = sc.cost_weight * cost
      if tc.router_logit_weight > 0:
        terms["router_logit"] = tc.router_logit_weight * losses.router_logit_spread(
            out.router_choices(), tau)
      total = sum(terms.values())
      aux = {"terms": terms, "correct": correct, "out": out, "batch_stats": new_vars["batch_stats"]}
      return total, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step never reaches the state: the host either stops with a clear message or, with
    # train.skip_nonfinite_steps, carries on from the unchanged parameters.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=step + 1, params=keep(new_params, state.params),
                           batch_stats=keep(aux["batch_stats"], state.batch_stats),
                           opt_state=keep(new_opt, state.opt_state))
    out = aux["out"]
    metrics = {f"loss/{k}": v for k, v in aux["terms"].items()}
    metrics.update({
        "loss/total": loss,
        "finite": finite,
        "grad_norm": grad_norm,
        "accuracy": jnp.mean(aux["correct"]),
        "tau": tau,
        "lr": lr_fn(step - stage.start),
        "drop_path_rate": drop_path,
        "macs_expected_mean": jnp.mean(out.expected_macs),
        **_routing_stats(out),
        **losses.saturation_stats(out.router_choices()),
    })
    return new_state, metrics

  return step_fn


class _Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop checks at step boundaries (main thread only).

  `on_error` runs when the block ends with an exception (a second Ctrl-C excepted): training
  passes the checkpointer's close, so a save still in flight completes with its manifest.
  """

  def __init__(self, on_error: Callable[[], None] | None = None):
    self.signum = None
    self._old = {}
    self._on_error = on_error

  def __enter__(self):
    self._old = _install_stop_handlers(self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C stops at once.
    logging.warning("Received signal %d: saving a checkpoint at the next step boundary.", signum)
    self.signum = signum

  def __exit__(self, exc_type, exc, tb):
    for s, h in self._old.items():
      signal.signal(s, h)
    if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt) and self._on_error:
      try:
        self._on_error()
      except Exception:  # pylint: disable=broad-except
        logging.exception("While stopping on %s, finishing the last checkpoint failed:",
                          exc_type.__name__)
    return False


def _install_stop_handlers(handler: Callable[[int, Any], None]) -> dict[int, Any]:
  """Installs `handler` for SIGTERM and SIGINT (main thread only); returns the previous ones."""
  if threading.current_thread() is not threading.main_thread():
    return {}
  return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}


class _EvaluationInterrupted(BaseException):
  """A stop signal arrived during the final evaluation (BaseException: nothing may swallow it)."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"signal {signum} during the final evaluation")
    self.signum, self.step = signum, step


class _StopEvaluationOnSignal:
  """During the final evaluation, turns SIGTERM/SIGINT into `_EvaluationInterrupted`.

  Training's handler is gone by then, and the default one would kill the process (exit -15)
  although the final checkpoint is safe. Evaluation holds no state worth saving (its report is
  written atomically, at its end), so it is stopped at once rather than at a step boundary.
  """

  def __init__(self, step: int):
    self.step = step
    self._old = {}

  def __enter__(self):
    self._old = _install_stop_handlers(self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.__exit__()  # A second signal meets the previous handlers.
    raise _EvaluationInterrupted(signum, self.step)

  def __exit__(self, *exc):
    old, self._old = self._old, {}
    for s, h in old.items():
      signal.signal(s, h)
    return False


def _lock_workdir(workdir: str, cleanup: contextlib.ExitStack) -> None:
  """Takes the work directory's lock (process 0) until `cleanup` unwinds; every process agrees.

  Raises workdir_lock.WorkdirLockedError on every process when process 0 could not take it, so
  the others do not wait forever in the first collective.
  """
  if "://" in os.fspath(workdir):  # An object store (gs://...) has no atomic exclusive create.
    logging.warning("Work directory %s is not on a local file system: it is not locked against a "
                    "second training.", workdir)
    return
  lock = workdir_lock.WorkdirLock(os.fspath(workdir), enabled=jax.process_index() == 0)
  error = None
  try:
    lock.acquire()
  except workdir_lock.WorkdirLockedError as e:
    error = e
  # One process decides alone (no collective, so the step loop's agreement calls stay per step).
  failed = (distributed.any_process(error is not None) if jax.process_count() > 1
            else error is not None)
  if failed:
    raise error or workdir_lock.WorkdirLockedError(
        f"Process 0 could not lock work directory {workdir}: another training uses it (process "
        "0's error names it).")
  cleanup.callback(lock.release)


def _resume_step(ckpt: ckpt_lib.Checkpointer, config: ml_collections.ConfigDict) -> int | None:
  """The step to resume from: the newest that verifies; None to start from step 0.

  Checkpoints that exist but of which none verifies are never silently ignored (that would train
  from nothing and report it as the run): NoGoodCheckpointError names every damaged step, unless
  config.checkpoint.restart_if_damaged is set.
  """
  step = ckpt.latest_good_step()
  if step is not None or not ckpt.all_steps():
    return step
  damaged = ckpt.damage_report()
  listing = "; ".join(f"step {s}: {ckpt_lib._summarise(p)}"  # pylint: disable=protected-access
                      for s, p in sorted(damaged.items(), reverse=True))
  if not config.checkpoint.restart_if_damaged:
    raise ckpt_lib.NoGoodCheckpointError(
        f"Cannot resume: no checkpoint in {ckpt.directory} verifies ({listing}). Nothing was "
        "changed. Restore the checkpoints from a copy, use another --workdir, or start over "
        "from step 0 with --config.checkpoint.restart_if_damaged=True (the damaged steps are "
        "then moved to the quarantine/ folder when their step numbers are saved again).",
        damaged)
  logging.warning("No checkpoint in %s verifies (%s); config.checkpoint.restart_if_damaged is "
                  "set, so training starts from step 0.", ckpt.directory, listing)
  return None


def _prepare_workdir(workdir: str | os.PathLike[str]) -> None:
  """Creates the work directory and checks that a file can be written there, before any compile.

  Any filesystem etils.epath supports works (local, gs://, ...), through the same calls.
  """
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{uuid.uuid4().hex}"
    probe.write_text("")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    # Remote backends raise their own error types (e.g. tf.errors.OpError); report them alike.
    raise OSError(getattr(e, "errno", None), f"Cannot write to work directory {workdir} "
                  f"({getattr(e, 'strerror', None) or e}). Choose another --workdir or fix its "
                  "permissions; nothing was written.") from e


def _save_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]) -> None:
  """Writes the resolved config; a workdir holding another model's config is refused untouched."""
  path = epath.Path(workdir) / "config.json"
  new = _check_config_json(config, workdir)
  if jax.process_index() == 0:
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(new, indent=2, sort_keys=True))
    tmp.replace(path)  # Atomic on local filesystems; a copy and delete on object stores.


def _check_config_json(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]
                       ) -> dict[str, Any]:
  """Raises if workdir/config.json belongs to another model; returns the config as JSON data."""
  path = epath.Path(workdir) / "config.json"
  new = json.loads(config.to_json_best_effort())
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except json.JSONDecodeError:
      old = None
    if isinstance(old, dict) and old.get("model") != new.get("model"):
      raise ValueError(
          f"Workdir {workdir} holds a run of another model (config.json model section differs: "
          f"{old.get('model', {}).get('name')}/{old.get('model', {}).get('variant')} there, "
          f"{new['model'].get('name')}/{new['model'].get('variant')} now). Use a new --workdir; "
          "nothing was changed.")
  return new


def _metric_writer(workdir: str | os.PathLike[str]):
  """TensorBoard summaries of every metric (process 0), echoed as key=value lines only if verbose.

  CLU's default writer always echoes each write as one long INFO line; the console gets the short
  progress lines of `console.step_line` instead.
  """
  from clu import metric_writers  # Imported lazily: it pulls TensorFlow's summary writer.
  writers = []
  if jax.process_index() == 0:
    writers.append(metric_writers.SummaryWriter(os.fspath(workdir)))
  if console.is_verbose():
    writers.append(metric_writers.LoggingWriter())
  return metric_writers.AsyncMultiWriter(writers)


def _host_scalars(metrics: dict[str, Array]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _nonfinite_message(step: int, metrics: dict[str, float]) -> str:
  bad = [k for k, v in metrics.items() if k.startswith("loss/") and not math.isfinite(v)]
  if not math.isfinite(metrics.get("grad_norm", 0.0)):
    bad.append("gradients")
  return (f"Non-finite value at step {step} in {', '.join(bad) or 'the loss'} "
          f"(metrics: {metrics}). The parameters of step {step} were not applied and the last "
          "checkpoint is intact. Lower the learning rate, enable train.grad_clip_norm, or set "
          "train.skip_nonfinite_steps=True to skip such steps.")


def create_state(config, model, mesh, stage, sample_shape, rules):
  """Abstract state, its shardings, and a jitted initializer that places it directly."""
  init_key = jax.random.fold_in(jax.random.key(config.seed), STREAMS["init"])

  def init_fn(key):
    x = jnp.zeros(sample_shape, jnp.float32)
    variables = model.init({"params": key, "routing": key, "dropout": key}, x, train=False)
    params = variables["params"]
    tx = make_optimizer(config, stage, params)
    return TrainState(step=jnp.asarray(stage.start, jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))

  abstract = jax.eval_shape(init_fn, init_key)
  shardings = sharding.tree_shardings(abstract, mesh, rules)
  init = jax.jit(init_fn, out_shardings=shardings)
  return abstract, shardings, lambda: init(init_key)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       metrics_callback: Callable[[int, dict[str, float]], None] | None = None
                       ) -> dict[str, Any]:
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
    except _EvaluationInterrupted as e:
      logging.warning("Received signal %d during the final evaluation; it was stopped. Checkpoint "
                      "step %d (the end of training) is saved: rerun the same command to evaluate.",
                      e.signum, e.step)
      return {"preempted": True, "step": e.step, "interrupted": "evaluation"}


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        metrics_callback: Callable[[int, dict[str, float]], None] | None,
                        cleanup: contextlib.ExitStack) -> dict[str, Any]:
  """`train_and_evaluate`; what must be undone on the way out is pushed onto `cleanup`."""
  config_lib.validate(config)
  for f in ("image_size", "num_channels", "num_classes"):
    if f in config.model and config.model[f] != config.data[f]:
      raise ValueError(f"config.model.{f} ({config.model[f]}) differs from config.data.{f} "
                       f"({config.data[f]}); set both to the dataset's value.")
  model = models.build_model(config.model)  # Validates the model fields.
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.train.global_batch_size, mesh, jax.process_count())
  _prepare_workdir(workdir)
  _lock_workdir(workdir, cleanup)

  train_ds, _ = training_splits(config)
  test_ds = input_pipeline.load_dataset(config.data, config.data.eval_split)
  stages = plan_stages(config, len(train_ds))
  total_steps = stages[-1].end
  fingerprint = model_fingerprint(config)
  # Both checks of the work directory's model come before config.json is written.
  _check_config_json(config, workdir)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                               async_save=config.checkpoint.async_save, fingerprint=fingerprint)
  # Settled before anything is written: a refusal to resume leaves the work directory as it was.
  restored_step = _resume_step(ckpt, config)
  _save_config(config, workdir)

  rules = sharding.RULES[config.mesh.param_sharding]
  local_bs = config.train.global_batch_size // jax.process_count()
  sample_shape = (1, config.data.image_size, config.data.image_size, config.data.num_channels)
  batch_sharding = sharding.batch_sharding(mesh)
  base_key = jax.random.key(config.seed)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  writer = _metric_writer(workdir)
  start_step = 0
  state = None
  stage = stages[0]
  if restored_step is not None:
    meta = ckpt.read_meta(restored_step)
    stage = stages[int(meta["stage"]) - 1]
    abstract, shardings, _ = create_state(config, model, mesh, stage, sample_shape, rules)
    items, meta = ckpt.restore(restored_step, abstract={
        "params": abstract.params, "batch_stats": abstract.batch_stats,
        "opt_state": abstract.opt_state}, shardings={
        "params": shardings.params, "batch_stats": shardings.batch_stats,
        "opt_state": shardings.opt_state})
    state = TrainState(step=_replicated(lambda: jnp.asarray(restored_step, jnp.int32), replicated),
                       params=items["params"], batch_stats=items["batch_stats"],
                       opt_state=items["opt_state"])
    start_step = restored_step
    console.info(f"Resumed from step {restored_step} (stage {stage.index}).")

  preempted = False
  with _Preemption(on_error=ckpt.close) as preemption:
    for stage in stages:
      if start_step >= stage.end:
        continue
      abstract, shardings, init = create_state(config, model, mesh, stage, sample_shape, rules)
      if state is None:
        state = init()
      elif jax.tree.structure(state.opt_state) != jax.tree.structure(abstract.opt_state) or (
          start_step == stage.start):
        # A new stage: keep parameters and statistics, start a fresh optimizer state.
        tx0 = make_optimizer(config, stage, state.params)
        opt = jax.jit(tx0.init, out_shardings=shardings.opt_state)(state.params)
        state = state.replace(opt_state=opt)
      tx = make_optimizer(config, stage, state.params)
      step_fn = make_train_step(config, model, stage, tx)
      batch_abstract = {
          "image": jax.ShapeDtypeStruct((config.train.global_batch_size,) + sample_shape[1:], jnp.uint8,
                                        sharding=batch_sharding),
          "label": jax.ShapeDtypeStruct((config.train.global_batch_size,), jnp.int32,
                                        sharding=batch_sharding)}
      jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sharding, replicated),
                       out_shardings=(shardings, replicated), donate_argnums=(0,))
      t0 = time.time()
      compiled = jitted.lower(abstract, batch_abstract, jax.ShapeDtypeStruct(
          base_key.shape, base_key.dtype, sharding=replicated)).compile()
      compile_s = time.time() - t0
      console.info(f"stage {stage.index}  compiled the train step in {compile_s:.1f} s")
      if config.dry_run:
        report = {"stage": stage.index, "compile_seconds": compile_s,
                  "report": sharding.dry_run_report(
                      compiled, num_devices=mesh.size,
                      examples_per_step=config.train.global_batch_size * config.data.num_views)}
        print(report["report"])
        ckpt.close()
        return report
      writer.write_scalars(stage.start if start_step < stage.start else start_step,
                           {"compile_seconds": compile_s})
      base_key_r = _replicated(lambda: jax.random.key(config.seed), replicated)

      monitor = _StepMonitor(config, writer, stage, total_steps, metrics_callback)
      for step in range(max(start_step, stage.start), stage.end):
        local = input_pipeline.train_batch(train_ds, config.seed, step, config.train.global_batch_size,
                                           jax.process_index(), jax.process_count())
        batch = sharding.make_global_batch(local, mesh)
        state, metrics = compiled(state, batch, base_key_r)
        monitor.push(step, metrics)
        done = step + 1
        # Every process must stop at the same step, or the others wait forever in the next
        # all-reduce: agree on the signal at fixed steps (a no-op collective on a single host).
        if done % PREEMPTION_CHECK_STEPS == 0 or done == stage.end or jax.process_count() == 1:
          stop = distributed.any_process(preemption.signum is not None)
        else:
          stop = False
        if stop:
          monitor.flush()
          _save(ckpt, done, state, stage, config, force=True)
          ckpt.wait_until_finished()
          logging.warning("Saved step %d after a stop signal (%s); rerun the same command to resume.",
                          done, preemption.signum)
          preempted = True
          break
        if done % config.checkpoint.every_steps == 0 and done != stage.end:
          monitor.flush()  # A non-finite step stops training before a checkpoint can include it.
          _save(ckpt, done, state, stage, config)
      if preempted:
        break
      monitor.flush()
      _save(ckpt, stage.end, state, stage, config, force=True)
      start_step = stage.end

  ckpt.wait_until_finished()
  if preempted:
    ckpt.close()
    writer.flush()
    return {"preempted": True, "step": int(jax.device_get(state.step))}

  if state is None:  # Every stage was already done: restore the final parameters for evaluation.
    raise RuntimeError("internal: no state after training")
  cleanup.enter_context(_StopEvaluationOnSignal(int(jax.device_get(state.step))))
  report = evaluation.evaluate_and_report(config, model, {"params": state.params,
                                                          "batch_stats": state.batch_stats},
                                          test_ds, mesh, workdir,
                                          tau=final_tau(stages[-1], stages[-1].end),
                                          step=int(jax.device_get(state.step)))
  writer.write_scalars(total_steps, {f"eval/{k}": v for k, v in report.items()
                                     if isinstance(v, (int, float))})
  writer.flush()
  ckpt.close()
  return report


def _replicated(make: Callable[[], Array], sharding: jax.sharding.Sharding) -> Array:
  """`make()`'s value, replicated on every device of every process.

  `jax.device_put(value, sharding)` refuses a sharding that spans other processes' devices
  (multi-host); a jitted computation with `out_shardings` works with one process or many.
  """
  return jax.jit(make, out_shardings=sharding)()


def _save(ckpt, step: int, state: TrainState, stage: Stage, config, force: bool = False) -> None:
  meta = {"step": step, "stage": stage.index, "model": config.model.name,
          "variant": config.model.get("variant", ""), "time": time.time()}
  started = ckpt.save(step, params=state.params, batch_stats=state.batch_stats,
                      opt_state=state.opt_state, meta=meta, force=force)
  if started:
    console.info(f"checkpoint step {step}" + ("  (saving in the background)"
                                               if config.checkpoint.async_save else "  saved"))


class _StepMonitor:
  """Checks each step's finiteness one step late (so dispatch stays asynchronous) and logs metrics."""

  def __init__(self, config, writer, stage: Stage, total_steps: int, callback=None):
    self.config, self.writer, self.stage, self.total_steps = config, writer, stage, total_steps
    self.callback = callback
    self.pending = None
    self.last_time, self.last_step = time.time(), None

  def push(self, step: int, metrics: dict[str, Array]) -> None:
    if self.pending is not None:
      self._check(*self.pending)
    self.pending = (step, metrics)

  def flush(self) -> None:
    if self.pending is not None:
      self._check(*self.pending, force=True)
      self.pending = None

  def _check(self, step: int, metrics: dict[str, Array], force: bool = False) -> None:
    """Raises on a non-finite step (unless skipping is on); writes metrics every log_every_steps."""
    config = self.config
    if self.last_step is None:
      self.last_step = step
    if not bool(jax.device_get(metrics["finite"])):
      host = _host_scalars(metrics)
      if not config.train.skip_nonfinite_steps:
        raise NonFiniteError(_nonfinite_message(step, host))
      logging.warning("Skipped step %d: %s", step, _nonfinite_message(step, host).split(" (")[0])
    if self.callback is not None:
      self.callback(step, _host_scalars(metrics))
    if force or (step + 1) % config.log_every_steps == 0:
      host = _host_scalars(metrics)
      now = time.time()
      sps = max(step - self.last_step, 1) / max(now - self.last_time, 1e-9)
      self.last_time, self.last_step = now, step
      host["steps_per_sec"] = sps
      host["eta_minutes"] = (self.total_steps - step - 1) / max(sps, 1e-9) / 60
      host["stage"] = self.stage.index
      self.writer.write_scalars(step + 1, host)
      console.info(console.step_line(self.stage.index, step + 1, self.total_steps, host, sps,
                                     host["eta_minutes"] * 60))
