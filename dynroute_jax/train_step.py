"""The train state, its initialisation, and the jitted train step of one stage.

Randomness is explicit and replayable: the per-step key is fold_in(base, step), split into named
streams (routing = Gumbel noise, dropout = drop-path / drop-branch, augment = data augmentation),
so a step's random bits depend on nothing but (seed, step). A step whose loss or gradients are not
finite never reaches the state: the step returns the old state (with the step counter advanced)
and `metrics['finite'] == False`, and the host decides (see `hooks.CheckFinite`).

Shape letters: B batch (examples fed to the model), I images, M views per image, H/W/C image.
"""

from __future__ import annotations

import time
import types
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dynroute_jax import input_pipeline
from dynroute_jax import losses
from dynroute_jax import optimizers
from dynroute_jax import schedules
from dynroute_jax import sharding

Array = jax.Array
PyTree = Any
StepFn = Callable[["TrainState", dict[str, Array], Array], tuple["TrainState", dict[str, Array]]]

# The initializer runs once, so it is compiled for compile speed, not run speed: its hundreds of
# random initializers take XLA:CPU 52 s to compile for the digits DRNet at the default level, 36 s
# at level 0 (and 40 ms to run either way).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}

# Named random streams: a stream's id is folded into the per-step key.
STREAMS = {"init": 0, "routing": 1, "dropout": 2, "augment": 3}


@flax.struct.dataclass
class TrainState:
  step: Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree


def stream_key(base: Array, step: Array | int, stream: str) -> Array:
  """The key of `stream` at `step`: fold_in(fold_in(base, step), stream id)."""
  return jax.random.fold_in(jax.random.fold_in(base, step), STREAMS[stream])


def create_state(config: ml_collections.ConfigDict, model: nn.Module, mesh: jax.sharding.Mesh,
                 stage: schedules.Stage, sample_shape: tuple[int, ...], rules: Any,
                 tx: optax.GradientTransformation | None = None, variables: PyTree | None = None
                 ) -> tuple[TrainState, TrainState, Callable[[], TrainState]]:
  """The abstract state of `stage`, its shardings, and an initializer that places it directly.

  Args:
    config: the run's config (the seed, and the optimizer when `tx` is None).
    model: the routed model.
    mesh: the device mesh.
    stage: the stage whose optimizer state the state holds.
    sample_shape: [1, H, W, C], the shape the parameters are initialised from.
    rules: the parameter sharding rules (`sharding.RULES[...]`).
    tx: the stage's optimizer; built from the config when None.
    variables: `{'params', 'batch_stats'}` of an earlier call's abstract state for the same model
      and sample shape: reused instead of tracing the model's initialisation again (seconds for
      a DRNet), as a run does for its second stage.

  Returns:
    (abstract state, state shardings, a function that returns the initial state on the mesh).
  """
  init_key = jax.random.fold_in(jax.random.key(config.seed), STREAMS["init"])
  if tx is None:
    tx = optimizers.make_optimizer(config, stage, router_pattern=model.router_param_pattern)

  def init_fn(key):
    x = jnp.zeros(sample_shape, jnp.float32)
    initial = model.init({"params": key, "routing": key, "dropout": key}, x, train=False)
    params = initial["params"]
    return TrainState(step=jnp.asarray(stage.start, jnp.int32), params=params,
                      batch_stats=initial.get("batch_stats", {}), opt_state=tx.init(params))

  if variables is None:  # Traced once: `init` below lowers from the same trace.
    abstract = jax.eval_shape(init_fn, init_key)
  else:
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=variables["params"],
                          batch_stats=variables["batch_stats"],
                          opt_state=jax.eval_shape(tx.init, variables["params"]))
  shardings = sharding.tree_shardings(abstract, mesh, rules)

  def init():  # Compiled on first use only: a resumed run never needs it.
    lowered = jax.jit(init_fn, out_shardings=shardings).lower(init_key)
    return lowered.compile(compiler_options=INIT_COMPILER_OPTIONS)(init_key)

  return abstract, shardings, init


def _model_inputs(batch: dict[str, Array], key: Array, data_cfg: ml_collections.ConfigDict
                  ) -> tuple[Array, Array]:
  """(augmented images [B, H, W, C], labels [B]); B = I x M, the M views of an image adjacent."""
  labels_I = batch["label"]
  num_views = data_cfg.num_views
  if num_views > 1:
    views_IxMxHxWxC = input_pipeline.make_views(key, batch["image"], data_cfg, num_views)
    x_BxHxWxC = views_IxMxHxWxC.reshape((-1,) + views_IxMxHxWxC.shape[2:])
    return x_BxHxWxC, jnp.repeat(labels_I, num_views)
  return input_pipeline.augment(key, batch["image"], data_cfg), labels_I


# Stage fields that change the step's graph: stages that differ in one never share a step.
STRUCTURAL_FIELDS = ("freeze_routers", "hard_decisions")
# Loss weights; stages may differ in them (and in every schedule) and still share one step.
WEIGHT_FIELDS = ("resource_weight", "consistency_weight", "diversity_weight", "cost_weight",
                 "aux_weight")


def share_groups(stages: Sequence[schedules.Stage]) -> list[tuple[schedules.Stage, ...]]:
  """The stages grouped by what one compiled step can serve, in order of their first stage.

  Stages that agree on `STRUCTURAL_FIELDS` share a step: the learning rate, the temperature and
  the drop-path rate are each stage's own schedule, chosen in the step by the stage the state's
  step counter lies in, and the loss weights are looked up the same way. Compiling once instead of
  once per stage halves the start-up of a two-stage run, which on XLA:CPU is mostly compilation.
  """
  groups: dict[tuple[Any, ...], list[schedules.Stage]] = {}
  for stage in stages:
    groups.setdefault(tuple(stage.cfg[f] for f in STRUCTURAL_FIELDS), []).append(stage)
  return [tuple(g) for g in groups.values()]


def _stage_index(stages: Sequence[schedules.Stage], step: Array) -> Array | int:
  """Which of `stages` (sorted by start) the global `step` lies in; a Python 0 for one stage."""
  if len(stages) == 1:
    return 0
  return sum((step >= s.start).astype(jnp.int32) for s in stages[1:])


def _per_stage(index: Array | int, fns: Sequence[Callable[[Array], Array]], x: Array) -> Array:
  """fns[index](x): each stage's own schedule, evaluated exactly as that stage alone would."""
  if len(fns) == 1:
    return fns[0](x)
  return jax.lax.switch(index, fns, x)


def _loss_weights(stages: Sequence[schedules.Stage], index: Array | int) -> types.SimpleNamespace:
  """The active stage's loss weights: a Python float where the stages agree, else traced.

  A weight that is 0 in every stage stays a Python 0, so its loss term is left out of the graph.
  """
  weights = {}
  for f in WEIGHT_FIELDS:
    values = [float(s.cfg[f]) for s in stages]
    weights[f] = values[0] if len(set(values)) == 1 else jnp.asarray(values, jnp.float32)[index]
  return types.SimpleNamespace(**weights)


def _drop_path_rate(stage: schedules.Stage, step: Array) -> Array | float:
  """Drop-path rising linearly over the stage to its configured rate."""
  if stage.cfg.drop_path_rate <= 0:
    return 0.0  # A static 0 lets the model leave drop-path out of the graph entirely.
  frac = (step - stage.start).astype(jnp.float32) / max(stage.num_steps, 1)
  return stage.cfg.drop_path_rate * jnp.clip(frac, 0.0, 1.0)


def _shared_drop_path_rate(stages: Sequence[schedules.Stage], index: Array | int, step: Array
                           ) -> Array | float:
  """The active stage's drop-path rate; a static 0 when no stage drops paths."""
  if all(s.cfg.drop_path_rate <= 0 for s in stages):
    return 0.0
  fns = [lambda t, s=s: jnp.asarray(_drop_path_rate(s, t), jnp.float32) for s in stages]
  return _per_stage(index, fns, step)


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module, stage: schedules.Stage,
                    tx: optax.GradientTransformation) -> StepFn:
  """The (unjitted) train step of one stage: (state, batch, base_key) -> (state, metrics).

  Args:
    config: the run's config.
    model: a `models_base.RoutedModel`.
    stage: the stage (schedules, loss weights, frozen routers).
    tx: the stage's optimizer (`optimizers.make_optimizer`).

  Returns:
    The step; `metrics` holds 'loss/<term>' for each of `losses.total_loss`'s terms,
    'loss/total', 'finite', 'grad_norm', 'accuracy', 'tau', 'lr', 'drop_path_rate',
    'macs_expected_mean', the model's `routing_stats` and `losses.saturation_stats`.
  """
  return _make_step(config, model, (stage,), lambda lr: tx)


def make_shared_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                           stages: Sequence[schedules.Stage]) -> StepFn:
  """One train step serving every stage of `stages` (a group of `share_groups`).

  The step finds its stage from the state's step counter and runs that stage's learning rate,
  temperature, drop-path and loss weights, so a state of any of the stages gives what
  `make_train_step` of that stage gives. Each stage still starts a fresh optimizer state (the
  learning-rate schedule counts from it); a loss term is present in every stage if it is in any,
  with weight 0 where it is off.

  Args:
    config: the run's config.
    model: a `models_base.RoutedModel`.
    stages: stages that agree on `STRUCTURAL_FIELDS`, sorted by start.

  Returns:
    The step, (state, batch, base_key) -> (state, metrics), metrics as in `make_train_step`.
  """
  stages = tuple(sorted(stages, key=lambda s: s.start))
  for f in STRUCTURAL_FIELDS:
    if len({s.cfg[f] for s in stages}) > 1:
      raise ValueError(f"stages {[s.index for s in stages]} differ in {f}; they need a step each.")
  def tx_for(lr):
    return optimizers.make_optimizer(config, stages[0], learning_rate=lr,
                                     router_pattern=model.router_param_pattern)

  return _make_step(config, model, stages, tx_for)


def _make_step(config: ml_collections.ConfigDict, model: nn.Module,
               stages: tuple[schedules.Stage, ...],
               tx_for: Callable[[optax.Schedule], optax.GradientTransformation]) -> StepFn:
  """The step of `make_shared_train_step`; `tx_for(the active stage's lr schedule)` gives the
  optimizer."""
  tau_fns = [schedules.tau_schedule(s) for s in stages]
  lr_fns = [schedules.lr_schedule(s) for s in stages]
  starts = jnp.asarray([s.start for s in stages], jnp.int32)
  call_kwargs = model.train_call_kwargs(stages[0].cfg)

  def step_fn(state: TrainState, batch: dict[str, Array], base_key: Array):
    step = state.step
    index = _stage_index(stages, step)
    x_BxHxWxC, labels_B = _model_inputs(batch, stream_key(base_key, step, "augment"), config.data)
    tau = _per_stage(index, tau_fns, step)
    drop_path = _shared_drop_path_rate(stages, index, step)
    weights = _loss_weights(stages, index)
    rngs = {"routing": stream_key(base_key, step, "routing"),
            "dropout": stream_key(base_key, step, "dropout")}

    def loss_fn(params):
      out, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats}, x_BxHxWxC,
                                  train=True, tau=tau, drop_path_rate=drop_path, rngs=rngs,
                                  mutable=["batch_stats"], **call_kwargs)
      total, terms = losses.total_loss(out, labels_B, weights, config.train,
                                       num_views=config.data.num_views, tau=tau)
      return total, (terms, out, new_vars["batch_stats"])

    (loss, (terms, out, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    tx = tx_for(lambda count: _per_stage(index, lr_fns, count))
    new_state, finite, grad_norm = _apply_if_finite(state, tx, grads, loss, batch_stats)
    metrics = {f"loss/{k}": v for k, v in terms.items()}
    metrics.update({
        "loss/total": loss,
        "finite": finite,
        "grad_norm": grad_norm,
        "accuracy": jnp.mean(losses.correct_predictions(out.logits, labels_B)),
        "tau": tau,
        "lr": _per_stage(index, lr_fns, step - starts[index]),
        "drop_path_rate": drop_path,
        "macs_expected_mean": jnp.mean(out.expected_macs),
        **model.routing_stats(out),
        **losses.saturation_stats(out.router_choices()),
    })
    return new_state, metrics

  return step_fn


def _apply_if_finite(state: TrainState, tx: optax.GradientTransformation, grads: PyTree,
                     loss: Array, batch_stats: PyTree) -> tuple[TrainState, Array, Array]:
  """(next state, finite, grad_norm): the update applied only if loss and gradients are finite.

  A non-finite step never reaches the state: the host either stops with a clear message or, with
  train.skip_nonfinite_steps, carries on from the unchanged parameters, statistics and momenta.
  The optimizer's step counts still advance, so that the learning rate, like the temperature and
  drop-path, stays the schedule's value at the step (and the logged 'lr' the one applied).
  """
  updates, new_opt = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  def keep_opt(path, n, o):
    is_count = (bool(path) and isinstance(path[-1], jax.tree_util.GetAttrKey)
                and path[-1].name == "count")
    return n if is_count else jnp.where(finite, n, o)

  opt_state = jax.tree_util.tree_map_with_path(keep_opt, new_opt, state.opt_state)
  return TrainState(step=state.step + 1, params=keep(new_params, state.params),
                    batch_stats=keep(batch_stats, state.batch_stats),
                    opt_state=opt_state), finite, grad_norm


def compile_step(step_fn: StepFn, abstract: TrainState, shardings: TrainState,
                 mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict
                 ) -> tuple[Any, float]:
  """Compiles `step_fn` ahead of time for the run's batch; returns (compiled step, seconds).

  The state is donated; the batch is split over the mesh's batch axes, the key and the metrics
  replicated.
  """
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  image_shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
  batch_size = config.train.global_batch_size
  batch_abstract = {
      "image": jax.ShapeDtypeStruct((batch_size,) + image_shape, jnp.uint8,
                                    sharding=batch_sharding),
      "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sharding)}
  key = jax.random.key(config.seed)
  key_abstract = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
  jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sharding, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))
  t0 = time.time()
  compiled = jitted.lower(abstract, batch_abstract, key_abstract).compile()
  return compiled, time.time() - t0
