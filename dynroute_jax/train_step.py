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
from typing import Any, Callable

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
                 tx: optax.GradientTransformation | None = None
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

  Returns:
    (abstract state, state shardings, a function that returns the initial state on the mesh).
  """
  init_key = jax.random.fold_in(jax.random.key(config.seed), STREAMS["init"])
  if tx is None:
    tx = optimizers.make_optimizer(config, stage, router_pattern=model.router_param_pattern)

  def init_fn(key):
    x = jnp.zeros(sample_shape, jnp.float32)
    variables = model.init({"params": key, "routing": key, "dropout": key}, x, train=False)
    params = variables["params"]
    return TrainState(step=jnp.asarray(stage.start, jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))

  abstract = jax.eval_shape(init_fn, init_key)
  shardings = sharding.tree_shardings(abstract, mesh, rules)
  init = jax.jit(init_fn, out_shardings=shardings)
  return abstract, shardings, lambda: init(init_key)


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


def _drop_path_rate(stage: schedules.Stage, step: Array) -> Array | float:
  """Drop-path rising linearly over the stage to its configured rate."""
  if stage.cfg.drop_path_rate <= 0:
    return 0.0  # A static 0 lets the model leave drop-path out of the graph entirely.
  frac = (step - stage.start).astype(jnp.float32) / max(stage.num_steps, 1)
  return stage.cfg.drop_path_rate * jnp.clip(frac, 0.0, 1.0)


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
  tau_fn, lr_fn = schedules.tau_schedule(stage), schedules.lr_schedule(stage)
  call_kwargs = model.train_call_kwargs(stage.cfg)

  def step_fn(state: TrainState, batch: dict[str, Array], base_key: Array):
    step = state.step
    x_BxHxWxC, labels_B = _model_inputs(batch, stream_key(base_key, step, "augment"), config.data)
    tau = tau_fn(step)
    drop_path = _drop_path_rate(stage, step)
    rngs = {"routing": stream_key(base_key, step, "routing"),
            "dropout": stream_key(base_key, step, "dropout")}

    def loss_fn(params):
      out, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats}, x_BxHxWxC,
                                  train=True, tau=tau, drop_path_rate=drop_path, rngs=rngs,
                                  mutable=["batch_stats"], **call_kwargs)
      total, terms = losses.total_loss(out, labels_B, stage.cfg, config.train,
                                       num_views=config.data.num_views, tau=tau)
      return total, (terms, out, new_vars["batch_stats"])

    (loss, (terms, out, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    new_state, finite, grad_norm = _apply_if_finite(state, tx, grads, loss, batch_stats)
    metrics = {f"loss/{k}": v for k, v in terms.items()}
    metrics.update({
        "loss/total": loss,
        "finite": finite,
        "grad_norm": grad_norm,
        "accuracy": jnp.mean(losses.correct_predictions(out.logits, labels_B)),
        "tau": tau,
        "lr": lr_fn(step - stage.start),
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
  train.skip_nonfinite_steps, carries on from the unchanged parameters.
  """
  updates, new_opt = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return TrainState(step=state.step + 1, params=keep(new_params, state.params),
                    batch_stats=keep(batch_stats, state.batch_stats),
                    opt_state=keep(new_opt, state.opt_state)), finite, grad_norm


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
