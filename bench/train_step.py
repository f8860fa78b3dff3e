"""Train-step benchmark of every shipped model config: images/s, compile time, routing overhead.

For each model the real trainer step (`train.make_train_step`, stage 1 of the config unless
`--stage 2`: augmentation, Gumbel routing, every loss term of the stage, SGD update, donated
state, jitted with the trainer's shardings over all devices) is compiled and timed, and so is a
baseline "the same backbone without routers":

  * DRNet: the same supernet with `model.use_router=False`, the paper's "w/o RouterNet" ablation:
    one learned logit vector per connection replaces each cell's RouterNet, everything else
    (every branch computed, Gumbel softmax, drop-branch, auxiliary head, losses) is unchanged.
    The ratio therefore measures the RouterNets (and their input pooling) only.
  * CoDiNet: a plain ResNet of the same blocks (stem, the same basic/bottleneck bodies and
    shortcuts, identical blocks under nn.scan as in the routed model, same head) trained with
    cross-entropy only, on the same M augmented views, with the same optimizer. The ratio
    measures the routers, the relaxed run/skip mixing and the consistency/diversity/cost losses.

  ratio = median over timed rounds of (routed step time / baseline step time), both measured in
  the same round (interleaved), so machine noise affects both; target <= 1.15.
  images/s = source images per second (a CoDiNet step trains on M = data.num_views views of each).
  compile_s = lower + compile of the step.

  python bench/train_step.py                              # CIFAR-10 configs at batch 128
  python bench/train_step.py --models drnet_S,codinet_resnet32 --batch 32 --steps 3
  python bench/train_step.py --imagenet --models drnet_imagenet_L,codinet_resnet50 --batch 64
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import _timing  # noqa: E402  (bench/_timing.py)

from dynroute_jax import input_pipeline, losses, sharding, train  # noqa: E402
from dynroute_jax import models  # noqa: E402
from dynroute_jax.models import codinet  # noqa: E402
from dynroute_jax.models import common  # noqa: E402

# name -> (config file, config argument, training examples for the schedules)
CIFAR = {
    "drnet_S": ("drnet_cifar10", "S", 50_000),
    "drnet_M": ("drnet_cifar10", "M", 50_000),
    "drnet_L": ("drnet_cifar10", "L", 50_000),
    "codinet_resnet32": ("codinet_cifar10", "resnet32", 50_000),
    "codinet_resnet74": ("codinet_cifar10", "resnet74", 50_000),
    "codinet_resnet110": ("codinet_cifar10", "resnet110", 50_000),
}
IMAGENET = {
    "drnet_imagenet_L": ("drnet_imagenet", "L", 1_281_167),
    "codinet_resnet50": ("codinet_imagenet", "resnet50", 1_281_167),
}


def load_config(file: str, arg: str):
  spec = importlib.util.spec_from_file_location(f"bench_cfg_{file}", REPO / "configs" / f"{file}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# ------------------------------------------------------------------------------------------------
# CoDiNet baseline: the plain ResNet of the same blocks.


class _PlainBlock(nn.Module):
  """One residual block without a router: relu(body(x) + shortcut(x)). nn.scan signature."""
  bottleneck: bool
  features: int
  out_features: int
  stride: int
  shortcut: str
  train: bool

  @nn.compact
  def __call__(self, x, _=None):
    if self.shortcut == "identity":
      sc = x
    elif self.shortcut == "option_a":
      sc = codinet.option_a_shortcut(x, self.out_features, self.stride)
    else:
      sc = codinet.Projection(self.out_features, self.stride, name="shortcut")(x, train=self.train)
    body = codinet.BottleneckBody if self.bottleneck else codinet.BasicBody
    return nn.relu(body(self.features, self.stride, name="body")(x, train=self.train) + sc), None


class PlainResNet(nn.Module):
  variant: str
  num_classes: int
  width: int

  @nn.compact
  def __call__(self, x, *, train: bool):
    specs = codinet._block_specs(self.variant, self.width, 0, "shortcut", True, tuple(x.shape[1:3]))  # pylint: disable=protected-access
    y = codinet.Stem(self.width, not codinet.is_cifar_variant(self.variant), name="stem")(x, train=train)
    i = 0
    while i < len(specs):
      s = specs[i]
      group = [t for t in specs[i:] if t.site == s.site]
      kw = dict(bottleneck=s.bottleneck, features=s.features, out_features=s.out_features,
                stride=s.stride, shortcut=s.shortcut, train=train)
      if len(group) == 1:
        y, _ = _PlainBlock(**kw, name=s.site)(y)
      else:
        scan = nn.scan(_PlainBlock, variable_axes={"params": 0, "batch_stats": 0},
                       split_rngs={"params": True}, length=len(group),
                       unroll=common.scan_unroll(len(group)))
        y, _ = scan(**kw, name=s.site)(y, None)
      i += len(group)
    return codinet.Head(self.num_classes, name="head")(y)


def plain_resnet_step(config, model: PlainResNet, stage: train.Stage, tx):
  """Cross-entropy train step of the plain ResNet on the same augmented views."""
  dc, tc = config.data, config.train

  def step_fn(state: train.TrainState, batch, base_key):
    key = train.stream_key(base_key, state.step, "augment")
    if dc.num_views > 1:
      views = input_pipeline.make_views(key, batch["image"], dc, dc.num_views)
      x = views.reshape((-1,) + views.shape[2:])
      labels = jnp.repeat(batch["label"], dc.num_views)
    else:
      x = input_pipeline.augment(key, batch["image"], dc)
      labels = batch["label"]

    def loss_fn(params):
      logits, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats}, x,
                                     train=True, mutable=["batch_stats"])
      return jnp.mean(losses.cross_entropy(logits, labels, tc.label_smoothing)), new_vars

    (loss, new_vars), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt = tx.update(grads, state.opt_state, state.params)
    new_state = train.TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                 batch_stats=new_vars["batch_stats"], opt_state=opt)
    return new_state, {"loss/total": loss}

  return step_fn


# ------------------------------------------------------------------------------------------------
# Compiling and timing.


def _compile(step_fn, abstract, shardings, mesh, batch_abstract, key):
  rep = sharding.replicated(mesh)
  jitted = jax.jit(step_fn, in_shardings=(shardings, sharding.batch_sharding(mesh), rep),
                   out_shardings=(shardings, rep), donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = jitted.lower(abstract, batch_abstract,
                          jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)).compile()
  return compiled, time.perf_counter() - t0


def routed_setup(config, stage, mesh, batch_abstract, key):
  model = models.build_model(config.model)
  dc = config.data
  shape = (1, dc.image_size, dc.image_size, dc.num_channels)
  abstract, shardings, init = train.create_state(config, model, mesh, stage, shape,
                                                 sharding.RULES[config.mesh.param_sharding])
  tx = train.make_optimizer(config, stage, router_pattern=model.router_param_pattern)
  compiled, secs = _compile(train.make_train_step(config, model, stage, tx), abstract, shardings,
                            mesh, batch_abstract, key)
  return compiled, secs, init()


def plain_setup(config, stage, mesh, batch_abstract, key):
  m = config.model
  model = PlainResNet(m.variant, m.num_classes, m.width)
  dc = config.data
  x = jnp.zeros((1, dc.image_size, dc.image_size, dc.num_channels), jnp.float32)

  def init_fn(k):
    variables = model.init({"params": k}, x, train=False)
    tx = train.make_optimizer(config, stage)
    return train.TrainState(step=jnp.asarray(stage.start, jnp.int32), params=variables["params"],
                            batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))

  k0 = jax.random.key(config.seed)
  abstract = jax.eval_shape(init_fn, k0)
  shardings = sharding.tree_shardings(abstract, mesh, sharding.RULES[config.mesh.param_sharding])
  tx = train.make_optimizer(config, stage)
  compiled, secs = _compile(plain_resnet_step(config, model, stage, tx), abstract, shardings, mesh,
                            batch_abstract, key)
  return compiled, secs, jax.jit(init_fn, out_shardings=shardings)(k0)


def bench_model(name: str, file: str, arg: str, num_train: int, args) -> dict[str, Any]:
  config = load_config(file, arg)
  if args.batch:
    config.train.global_batch_size = args.batch
  mesh = sharding.make_mesh(config.mesh)
  batch_size = sharding.check_batch(config.train.global_batch_size, mesh, 1)
  stage = train.plan_stages(config, num_train)[args.stage - 1]
  dc = config.data
  rng = np.random.default_rng(0)
  local = {"image": rng.integers(0, 256, (batch_size, dc.image_size, dc.image_size, dc.num_channels),
                                 dtype=np.uint8),
           "label": rng.integers(0, dc.num_classes, (batch_size,), dtype=np.int32)}
  batch = sharding.make_global_batch(local, mesh)
  batch_abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), batch)
  key = jax.device_put(jax.random.key(config.seed), sharding.replicated(mesh))

  routed, routed_compile, routed_state = routed_setup(config, stage, mesh, batch_abstract, key)
  if config.model.name == "drnet":
    base_cfg = config.copy_and_resolve_references()
    base_cfg.model.use_router = False
    base, base_compile, base_state = routed_setup(base_cfg, stage, mesh, batch_abstract, key)
    baseline = "use_router=False"
  else:
    base, base_compile, base_state = plain_setup(config, stage, mesh, batch_abstract, key)
    baseline = "plain ResNet"

  def run(fn, state):
    t0 = time.perf_counter()
    state, metrics = fn(state, batch, key)
    jax.block_until_ready((state, metrics))
    return state, time.perf_counter() - t0, float(metrics["loss/total"])

  # One warm-up step each, then interleaved timed rounds.
  routed_state, _, _ = run(routed, routed_state)
  base_state, _, _ = run(base, base_state)
  rt, bt, ratios = [], [], []
  for _ in range(args.steps):
    routed_state, t_r, loss_r = run(routed, routed_state)
    base_state, t_b, loss_b = run(base, base_state)
    if not (np.isfinite(loss_r) and np.isfinite(loss_b)):
      raise FloatingPointError(f"{name}: non-finite loss ({loss_r}, {loss_b})")
    rt.append(t_r); bt.append(t_b); ratios.append(t_r / t_b)
  r_med, b_med = statistics.median(rt), statistics.median(bt)
  return dict(model=name, batch=config.train.global_batch_size, views=dc.num_views,
              routed_ips=config.train.global_batch_size / r_med, routed_ms=1e3 * r_med,
              routed_compile=routed_compile, base_ips=config.train.global_batch_size / b_med,
              base_ms=1e3 * b_med, base_compile=base_compile, ratio=statistics.median(ratios),
              baseline=baseline)


def format_table(rows) -> str:
  head = ("| model | batch | views | routed img/s | routed ms | routed compile s | baseline | "
          "base img/s | base ms | base compile s | ratio | <= 1.15 |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['batch']} | {r['views']} | {r['routed_ips']:.1f} | {r['routed_ms']:.0f} | "
        f"{r['routed_compile']:.1f} | {r['baseline']} | {r['base_ips']:.1f} | {r['base_ms']:.0f} | "
        f"{r['base_compile']:.1f} | {r['ratio']:.3f} | {'yes' if r['ratio'] <= 1.15 else 'NO'} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="", help="comma-separated subset of: "
                      + ", ".join(list(CIFAR) + list(IMAGENET)) + " (default: every CIFAR-10 config, "
                      "plus the ImageNet ones with --imagenet)")
  parser.add_argument("--imagenet", action="store_true", help="include the ImageNet configs (224x224)")
  parser.add_argument("--batch", type=int, default=0, help="global batch (default: each config's, 128)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per model (after 1 warm-up)")
  parser.add_argument("--stage", type=int, default=1, choices=(1, 2), help="training stage to time")
  args = parser.parse_args(argv)
  known = {**CIFAR, **IMAGENET}
  names = [m for m in args.models.split(",") if m] or list(CIFAR) + (list(IMAGENET) if args.imagenet else [])
  for n in names:
    if n not in known:
      parser.error(f"unknown model {n!r}; choose from {', '.join(known)}")
  dev = jax.devices()
  print(f"platform: {jax.default_backend()} ({len(dev)} x {dev[0].device_kind}), jax {jax.__version__}, "
        f"{_timing.host()}, stage {args.stage}, {args.steps} timed steps, "
        f"batch {args.batch or 'per config'}", flush=True)
  rows = []
  for n in names:
    rows.append(bench_model(n, *known[n], args))
    r = rows[-1]
    print(f"  {n}: routed {r['routed_ms']:.0f} ms (compile {r['routed_compile']:.1f} s), "
          f"{r['baseline']} {r['base_ms']:.0f} ms (compile {r['base_compile']:.1f} s), "
          f"ratio {r['ratio']:.3f}", flush=True)
  print(format_table(rows))


if __name__ == "__main__":
  main()
