"""Inference benchmark on the real routed models: each dispatch strategy against dense masking.

For each model, batch size B and routing level p (the fraction of the routed MACs that run), every
strategy of `dynroute_jax.dispatch` runs the model's thresholded inference (`train=False,
threshold=T, strategy=...`) on the same inputs and variables, and

  speedup    = dense-masked time / strategy time (median over rounds of the same-round ratio)
  ideal      = MACs with every branch / MACs executed, both from the model's own tables
               (`ModelOutput.macs_fixed + sum(macs_table)` and `ModelOutput.executed_macs`,
               summed over the batch; fixed parts such as stems, routers, heads included)
  efficiency = speedup / ideal  (eff_best: the same from the fastest run of each)

Models:
  r74, r110       CoDiNet routed ResNet-74 / ResNet-110 (configs/codinet_cifar10.py:resnet74 /
                  :resnet110), 32x32x3 inputs.
  drnet_s         DRNet S (configs/drnet_cifar10.py:S), 32x32x3 inputs.
  digits_codinet  the trained digits models (configs/digits.py:codinet / :drnet, 8x8x1 test
  digits_drnet    images) with their real routers; pass their work directories.

r74, r110 and drnet_s use random weights with the BN statistics of their inference-time inputs
(`recalibrate_batch_stats`: activations and logits of O(10), as in a trained network) and
controlled decisions (see `calibrate_codinet` and
`calibrate_drnet`): the routers' last dense layer is rewritten so that each routed unit runs for
a per-example pseudo-random fraction p of the inputs (decisions still come from the model's own
routers, on the actual activations). The digits models use their trained routers; the threshold
is chosen by bisection on the test split to give the target fraction of the routed MACs (the
nearest reachable fraction when the target is not reachable; printed as `frac`).

The `ceiling` row (B > 1, with 'dense' timed) is the dense model on round(B / ideal) rows: no
dispatch, no gather or scatter, each routed unit on as many rows as a perfect dispatcher would feed
it on average. Its efficiency is what the machine itself allows: on a small CPU a convolution on
fewer rows costs more per row (less work per thread), which no dispatcher can undo.

Batch 1 runs the example (of the calibration pool / test split) whose executed fraction is
closest to the target. Every strategy's logits and decisions are checked against 'dense'
(`dlogit` = max |difference|, `agree` = fraction of equal decisions).

`--devices N` splits every timed batch (and the ceiling's rows) over N CPU devices with a
`shard_map`: each device runs the model and dispatches its own rows, as the evaluation does on a
mesh. XLA:CPU runs the N programs in parallel; one device leaves a 2-core machine half idle in
the many small, single-threaded ops of a routed (and even a dense) forward pass.

`--dispatch OPTION=VALUE ...` gives every strategy the options it takes (`dispatch.Compact`:
buckets, spacing, branching; `dispatch.Chunk`: chunk, tail_levels), as `config.eval.dispatch`
does for an evaluation; the options are printed under the load line.

Timings are interleaved (`bench/_timing.py`): every strategy once per round, shuffled; medians,
and the spread of the same-round ratios (`eff_range`). The load average is printed at the start and
the end; `--results FILE` appends the table to FILE only when the start's load average is at most
`--max_load` (default 1.0: measure on an idle machine).

  python bench/inference.py                                   # everything (slow on a small CPU)
  python bench/inference.py --models r110 --batch 256 --fractions 0.5 --repeats 3 \
      --strategies dense chunk compact
  python bench/inference.py --models r74 --batch 256 32 --fractions 0.5 --devices 2 \
      --strategies dense chunk
  python bench/inference.py --models r74 --batch 32 --fractions 0.5 --strategies dense compact \
      --dispatch buckets=16 branching=cond_chain
  python bench/inference.py --models digits_codinet digits_drnet \
      --digits_codinet_workdir runs/digits_codinet --digits_drnet_workdir runs/digits_drnet
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dynroute_jax import dispatch  # noqa: E402
from dynroute_jax import models  # noqa: E402
from dynroute_jax.models import codinet as codinet_lib  # noqa: E402
from dynroute_jax.models import drnet as drnet_lib  # noqa: E402

import _timing  # noqa: E402

MODELS = ("r74", "r110", "drnet_s", "digits_codinet", "digits_drnet")
RESNETS = {"r74": "resnet74", "r110": "resnet110"}  # bench name -> codinet_cifar10 variant
STRATEGIES = ("dense", "batch_cond", "per_example", "compact", "chunk")
SEPCONV = [drnet_lib.BRANCHES.index("sep_conv_3x3"), drnet_lib.BRANCHES.index("sep_conv_5x5")]


# ------------------------------------------------------------------------------------------------
# The model under test.
# ------------------------------------------------------------------------------------------------


class Bench:
  """A model, its variables per routing level, inputs and the threshold/tau to run it at."""

  def __init__(self, name: str, model: Any, kind: str, image_shape: tuple[int, int, int],
               tau: float):
    self.name, self.model, self.kind, self.image_shape, self.tau = name, model, kind, image_shape, tau
    self._fns: dict[tuple, Callable] = {}

  def apply_fn(self, strategy: str, thresholded: bool, capture: bool = False,
               mesh: Mesh | None = None) -> Callable:
    """jit(variables, x, threshold) -> dict of logits, executed [B, S], path, executed_macs.

    With a `mesh` of several devices, a `shard_map` over its 'b' axis: each device runs the model
    (and dispatches) on its slice of the batch, as `evaluation.Predictor` does on a mesh.
    """
    key = (strategy, thresholded, capture, mesh)
    if key not in self._fns:
      def f(variables, x, threshold):
        kwargs = dict(train=False, tau=self.tau, threshold=threshold if thresholded else None,
                      strategy=strategy)
        if capture:
          out, state = self.model.apply(
              variables, x, capture_intermediates=lambda m, n: (
                  isinstance(m, drnet_lib.RouterNet) and n == "__call__"),
              mutable=["intermediates"], **kwargs)
          router_logits = [state["intermediates"][f"cell_{i}"]["router"]["__call__"][0]
                           for i in range(self.model.config.num_cells)]
        else:
          out = self.model.apply(variables, x, **kwargs)
          router_logits = None
        res = dict(logits=out.logits, executed=out.executed, path=out.path,
                   executed_macs=out.executed_macs,
                   macs_all=out.macs_fixed + jnp.sum(out.macs_table), macs_fixed=out.macs_fixed)
        if capture:
          res["router_logits"] = jnp.stack(router_logits, axis=1)  # [B, L, C, K]
        return res
      if mesh is not None and mesh.devices.size > 1:
        rows, same = P("b"), P()
        out_specs = dict(logits=rows, executed=rows, path=rows, executed_macs=rows,
                         macs_all=same, macs_fixed=same)
        if capture:
          out_specs["router_logits"] = rows
        f = jax.shard_map(f, mesh=mesh, in_specs=(same, rows, same), out_specs=out_specs,
                          check_vma=False)
      self._fns[key] = jax.jit(f)
    return self._fns[key]


def routed_fraction(res: dict) -> np.ndarray:
  """[B] fraction of the routed MACs executed, per example."""
  macs_fixed = float(res["macs_fixed"])
  routed_all = float(res["macs_all"]) - macs_fixed
  return (np.asarray(res["executed_macs"], np.float64) - macs_fixed) / routed_all


def random_images(key: jax.Array, batch: int, shape: tuple[int, int, int]) -> jax.Array:
  """Gaussian noise plus a per-example, per-channel offset and horizontal gradient, so that the
  pooled features the routers see vary between examples (pure noise averages out)."""
  k1, k2, k3 = jax.random.split(key, 3)
  h, w, c = shape
  noise = jax.random.normal(k1, (batch, h, w, c))
  offset = jax.random.normal(k2, (batch, 1, 1, c))
  ramp = jax.random.normal(k3, (batch, 1, 1, c)) * jnp.linspace(-1.0, 1.0, w)[None, None, :, None]
  return noise + offset + ramp


def init_variables(model: Any, shape: tuple[int, int, int], seed: int = 0) -> dict:
  """Random variables with the model's parameter shapes, without compiling the initialiser.

  (Tracing `init` is cheap; compiling it for DRNet S takes minutes on a small CPU.) Kernels:
  Kaiming normal over the fan-in (all but the last axis); biases, BN shifts and means 0; BN
  scales and variances 1; DRNet's fixed-router logits N(0, 1e-3).
  """
  key = jax.random.key(seed)
  x = jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init({"params": key, "routing": key, "dropout": key},
                                                 x, train=False), x)
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      fan_in = int(np.prod(s.shape[-4:-1] if len(s.shape) >= 4 else s.shape[:-1]))
      if any(str(getattr(p, "key", p)).endswith("blocks") for p in path):  # scanned: [n, ...]
        fan_in = int(np.prod(s.shape[1:-1]))
      return jnp.asarray(rng.normal(0.0, math.sqrt(2.0 / max(fan_in, 1)), s.shape), s.dtype)
    if name in ("scale", "var"):
      return jnp.ones(s.shape, s.dtype)
    if name == "logits":
      return jnp.asarray(rng.normal(0.0, 1e-3, s.shape), s.dtype)
    return jnp.zeros(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def batch_norm_input_stats(model: Any, variables: dict, x: jax.Array, **call: Any) -> dict:
  """{BN module path: (mean [C], var [C])} of each BatchNorm's input in one inference pass on x.

  In that pass every BatchNorm normalises with the statistics of its own input instead of its
  running ones, so each layer sees what it would see in inference with the returned statistics
  installed. `call` holds the model's keyword arguments (train=False is added).
  """
  def f(v, x):
    stats = {}

    def intercept(next_fun, args, kwargs, context):
      bn = context.module
      if not (isinstance(bn, nn.BatchNorm) and context.method_name == "__call__"):
        return next_fun(*args, **kwargs)
      h = args[0].astype(jnp.float32)
      axes = tuple(range(h.ndim - 1))
      mean, var = jnp.mean(h, axes), jnp.var(h, axes)
      stats[bn.path] = (mean, var)
      y = (h - mean) * jax.lax.rsqrt(var + bn.epsilon)
      if bn.use_scale:
        y = y * bn.get_variable("params", "scale")
      if bn.use_bias:
        y = y + bn.get_variable("params", "bias")
      return y

    with nn.intercept_methods(intercept):
      model.apply(v, x, train=False, **call)
    return stats

  return jax.jit(f)(variables, x)


def recalibrate_batch_stats(model: Any, variables: dict, x: jax.Array, **call: Any) -> dict:
  """`variables` with every BN's running statistics set to its inference-time input statistics.

  Random weights with unit running variances let the activations of a deep routed net grow by
  orders of magnitude (ResNet-110: ~1e10; router logits above 1e4), and statistics collected in
  training mode do not fix it: training mixes branches with soft, noisy gates, so inference with
  hard decisions feeds every layer other inputs. A trained network's running statistics are
  (nearly) the statistics of its inference-time inputs, which `batch_norm_input_stats` measures
  with every branch / block running (`threshold=None`).
  """
  stats = batch_norm_input_stats(model, variables, x, **call)
  new = jax.tree_util.tree_map(lambda a: a, variables["batch_stats"])  # A copy to write into.
  for path, (mean, var) in stats.items():
    node = new
    for name in path:
      node = node[name]
    node["mean"], node["var"] = mean, var
  return {**variables, "batch_stats": new}


def activation_scale(model: Any, variables: dict, x: jax.Array, **call: Any) -> dict[str, float]:
  """Magnitudes that tell a numerically sane network: the largest |BN output| and |logit|.

  (Not for models under `nn.scan`: the interception cannot reach into it.)
  """
  def f(v, x):
    peaks = []

    def intercept(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
        peaks.append(jnp.max(jnp.abs(out)))
      return out

    with nn.intercept_methods(intercept):
      out = model.apply(v, x, train=False, **call)
    return jnp.max(jnp.stack(peaks)), jnp.max(jnp.abs(out.logits))

  bn, logits = jax.jit(f)(variables, x)
  return {"bn_out_max": float(bn), "logit_max": float(logits)}


# ------------------------------------------------------------------------------------------------
# Controlled decisions.
# ------------------------------------------------------------------------------------------------


def _logit(v: np.ndarray) -> np.ndarray:
  v = np.clip(np.asarray(v, np.float64), 1e-30, 1.0 - 1e-7)
  return np.log(v) - np.log1p(-v)


def _np_tree(tree):
  return jax.tree_util.tree_map(lambda a: np.array(a), tree)


def _codinet_slots(model: Any, hw: tuple[int, int]) -> list[tuple[str, int | None]]:
  """Per routed block d: (site, index in the scanned stack or None)."""
  slots, seen = [], {}
  for spec in model.block_specs(hw):
    if spec.site.endswith("_blocks"):
      j = seen.get(spec.site, 0)
      seen[spec.site] = j + 1
      slots.append((spec.site, j))
    else:
      slots.append((spec.site, None))
  return slots


def _fc2(params: dict, slot) -> dict:
  site, j = slot
  return params[site]["block"]["router"]["fc2"] if j is not None else params[site]["router"]["fc2"]


def calibrate_codinet(bench: Bench, variables: dict, x_cal: jax.Array, p: float,
                      iterations: int = 2) -> dict:
  """CoDiNet variables whose routers run each block for a fraction p of the examples.

  Router k's logit difference d_k = U_k[run] - U_k[skip] is an affine function of its hidden
  features: d_k = w_k . h + b_k (the original fc2). The rewritten fc2 gives
  d'_k = a_k (w_k . h + b_k - q_k) (skip logit 0), so block k runs (v >= 0.5) iff the original
  difference exceeds q_k; q_k is its (1 - p) quantile on the calibration batch and a_k =
  1 / std, both measured first in all-blocks mode, then re-measured `iterations` times in
  thresholded mode with the earlier blocks routed (the inputs a router sees depend on them).
  The pattern over examples comes from the random weights acting on each example's features.
  """
  params = _np_tree(variables["params"])
  slots = _codinet_slots(bench.model, bench.image_shape[:2])
  w0, b0 = [], []
  for slot in slots:
    fc = _fc2(params, slot)
    k, b = (fc["kernel"], fc["bias"]) if slot[1] is None else (fc["kernel"][slot[1]],
                                                                 fc["bias"][slot[1]])
    w0.append(k[:, 1] - k[:, 0])
    b0.append(b[1] - b[0])

  def rewrite(a, q):
    new = _np_tree(params)
    for d, slot in enumerate(slots):
      fc = _fc2(new, slot)
      kern = np.stack([np.zeros_like(w0[d]), a[d] * w0[d]], axis=-1)
      bias = np.asarray([0.0, a[d] * (b0[d] - q[d])], fc["bias"].dtype)
      if slot[1] is None:
        fc["kernel"], fc["bias"] = kern.astype(fc["kernel"].dtype), bias
      else:
        fc["kernel"][slot[1]], fc["bias"][slot[1]] = kern, bias
    return {**variables, "params": jax.tree_util.tree_map(jnp.asarray, new)}

  res = bench.apply_fn("dense", False)(variables, x_cal, jnp.float32(0.5))
  raw = _logit(res["path"])  # [B, D] original differences (all blocks run)
  a = q = None
  for it in range(iterations + 1):
    if it > 0:
      res = bench.apply_fn("dense", True)(cur, x_cal, jnp.float32(0.5))
      raw = _logit(res["path"]) / a + q
    a = 1.0 / np.maximum(raw.std(axis=0), 1e-12)
    q = np.quantile(raw, 1.0 - p, axis=0)
    cur = rewrite(a, q)
  return cur


def calibrate_drnet(bench: Bench, variables: dict, x_cal: jax.Array, p: float, threshold: float,
                    sharpness: float = 8.0, iterations: int = 2) -> dict:
  """DRNet variables whose routers keep each separable-conv branch for a fraction p of examples.

  The RouterNet's last dense layer is rewritten per cell: the logits of the two separable-conv
  branches (the branches that hold nearly all the MACs) become a (z - q) with z their original
  logit, q its (1 - p) quantile on the calibration batch and a = sharpness / std; the pooling and
  skip branches get logit 0. With threshold 0.8: both separable convs 'on' -> both kept (~0.5
  each), one on -> that one alone, none -> the three cheap branches. Quantiles are measured in
  all-branches mode, then re-measured `iterations` times in thresholded mode (router logits
  captured with `capture_intermediates`).
  """
  params = _np_tree(variables["params"])
  num_cells, k = bench.model.config.num_cells, drnet_lib.NUM_BRANCHES
  dense_names = [f"cell_{i}" for i in range(num_cells)]
  orig = [(params[c]["router"]["Dense_0"]["kernel"].copy(),
           params[c]["router"]["Dense_0"]["bias"].copy()) for c in dense_names]

  def rewrite(a, q):  # a, q: [L, C, K] (used on the separable-conv branches only)
    new = _np_tree(params)
    for i, c in enumerate(dense_names):
      kern, bias = orig[i]
      w = kern.reshape(kern.shape[0], -1, k)
      bb = bias.reshape(-1, k)
      nw = np.zeros_like(w)
      nb = np.zeros_like(bb)
      for br in SEPCONV:
        nw[:, :, br] = a[i, :, br] * w[:, :, br]
        nb[:, br] = a[i, :, br] * (bb[:, br] - q[i, :, br])
      new[c]["router"]["Dense_0"]["kernel"] = nw.reshape(kern.shape)
      new[c]["router"]["Dense_0"]["bias"] = nb.reshape(bias.shape)
    return {**variables, "params": jax.tree_util.tree_map(jnp.asarray, new)}

  thr = jnp.float32(threshold)
  raw = np.asarray(bench.apply_fn("dense", False, capture=True)(variables, x_cal, thr)[
      "router_logits"], np.float64)  # [B, L, C, K]
  a = q = None
  for it in range(iterations + 1):
    if it > 0:
      got = np.asarray(bench.apply_fn("dense", True, capture=True)(cur, x_cal, thr)[
          "router_logits"], np.float64)
      raw = np.where(a > 0, got / np.where(a > 0, a, 1.0) + q, raw)
    a = np.zeros(raw.shape[1:])
    q = np.zeros(raw.shape[1:])
    a[..., SEPCONV] = sharpness / np.maximum(raw[..., SEPCONV].std(axis=0), 1e-12)
    q[..., SEPCONV] = np.quantile(raw[..., SEPCONV], 1.0 - p, axis=0)
    cur = rewrite(a, q)
  return cur


# ------------------------------------------------------------------------------------------------
# Building the models.
# ------------------------------------------------------------------------------------------------


def build_controlled(name: str, args) -> tuple[Bench, dict, float, str]:
  """Bench, base variables, threshold and a note on their scale, of r74 / r110 / drnet_s (random
  weights).

  The BN statistics come from `recalibrate_batch_stats` on random images; for the ResNets on their
  unscanned twin (the interception it uses cannot reach into `nn.scan`), whose variables are then
  stacked into the scanned layout that is timed.
  """
  from configs import codinet_cifar10, drnet_cifar10  # pylint: disable=g-import-not-at-top
  if name in RESNETS:
    cfg = codinet_cifar10.get_config(RESNETS[name])
    threshold = 0.5
  else:
    cfg = drnet_cifar10.get_config("S")
    cfg.model.aux_head = False  # training only; not part of inference
    threshold = 0.8
  model = models.build_model(cfg.model)
  shape = (32, 32, 3)
  bench = Bench(name, model, cfg.model.name, shape, tau=1.0)
  x_stats = random_images(jax.random.key(7), 64, shape)
  call = dict(tau=1.0, threshold=None, strategy="dense")
  if name in RESNETS:
    twin_cfg = cfg.model.copy_and_resolve_references()
    twin_cfg.scan_blocks = False
    twin = models.build_model(twin_cfg)
    twin_vars = recalibrate_batch_stats(twin, init_variables(twin, shape), x_stats, **call)
    variables = {c: codinet_lib.unscanned_to_scanned(v, cfg.model.variant)
                 for c, v in twin_vars.items()}
    scale = activation_scale(twin, twin_vars, random_images(jax.random.key(8), 64, shape), **call)
  else:
    variables = recalibrate_batch_stats(model, init_variables(model, shape), x_stats, **call)
    scale = activation_scale(model, variables, random_images(jax.random.key(8), 64, shape), **call)
  note = (f"# {name}: random weights, BN statistics from inference-mode inputs; on other images "
          f"max |BN output| {scale['bn_out_max']:.3g}, max |logit| {scale['logit_max']:.3g}")
  return bench, variables, threshold, note


def build_digits(name: str, workdir: str) -> tuple[Bench, dict, np.ndarray]:
  """Bench, restored variables and preprocessed test images of a trained digits run."""
  from dynroute_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from dynroute_jax import evaluate  # pylint: disable=g-import-not-at-top
  from dynroute_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  if not workdir:
    raise SystemExit(f"--{name}_workdir is needed for model {name} (a finished digits run).")
  config = evaluate.load_config(workdir)
  model = models.build_model(config.model)
  restored = ckpt_lib.restore_for_eval(os.path.join(workdir, "checkpoints"))
  step = int(restored.meta.get("step", -1))
  train_ds = input_pipeline.load_dataset(config.data, config.data.train_split)
  tau, _ = evaluate.eval_temperature(config, step, restored.meta.get("stage"), len(train_ds))
  test_ds = input_pipeline.load_dataset(config.data, config.data.eval_split)
  images, _ = test_ds.get(np.arange(len(test_ds)))
  x = np.asarray(input_pipeline.preprocess_eval(images, config.data))
  dc = config.data
  bench = Bench(name, model, config.model.name, (dc.image_size, dc.image_size, dc.num_channels),
                tau=float(tau))
  variables = {"params": restored.params, "batch_stats": restored.batch_stats}
  return bench, variables, x


def threshold_for_fraction(bench: Bench, variables: dict, x: jax.Array, p: float,
                           steps: int = 14) -> tuple[float, float]:
  """Bisection on the threshold for a mean routed-MACs fraction p on x; (threshold, fraction)."""
  f = bench.apply_fn("dense", True)

  def frac(t):
    return float(routed_fraction(f(variables, x, jnp.float32(t))).mean())

  lo, hi = 1e-4, 1.0
  f_lo, f_hi = frac(lo), frac(hi)
  increasing = f_hi > f_lo
  if (p - f_lo) * (p - f_hi) > 0:  # not reachable: the nearest end
    return (lo, f_lo) if abs(p - f_lo) < abs(p - f_hi) else (hi, f_hi)
  best = (lo, f_lo) if abs(p - f_lo) < abs(p - f_hi) else (hi, f_hi)
  for _ in range(steps):
    mid = 0.5 * (lo + hi)
    fm = frac(mid)
    if abs(fm - p) < abs(best[1] - p):
      best = (mid, fm)
    if (fm < p) == increasing:
      lo = mid
    else:
      hi = mid
  return best


# ------------------------------------------------------------------------------------------------
# The benchmark.
# ------------------------------------------------------------------------------------------------


HEADER = (f"{'model':<15} {'batch':>5} {'target':>6} {'frac':>5} {'T':>6} {'strategy':<12} "
          f"{'ms':>9} {'img/s':>9} {'speedup':>7} {'ideal':>6} {'eff':>5} {'eff_range':>9} "
          f"{'eff_best':>8} {'compile_s':>9} {'dlogit':>8} {'agree':>6}")


def place(tree: Any, mesh: Mesh | None, replicate: bool = False) -> Any:
  """`tree` on `mesh`: replicated, or split along its leading (batch) axis; as is without one."""
  if mesh is None:
    return tree
  return jax.device_put(tree, NamedSharding(mesh, P() if replicate else P("b")))


def run_model(name: str, args, rng: np.random.Generator, emit: Callable[[str], None]) -> None:
  """Times every strategy on `name` at each batch and level; `emit` gets each printed line."""
  t0 = time.perf_counter()
  levels = {}  # p -> (variables, threshold, x_pool for batch 1, pool fractions)
  if name in (*RESNETS, "drnet_s"):
    bench, variables, threshold, note = build_controlled(name, args)
    emit(note)
    x_cal = random_images(jax.random.key(11), args.calib_batch, bench.image_shape)
    for p in args.fractions:
      if bench.kind == "codinet":
        v = calibrate_codinet(bench, variables, x_cal, p)
      else:
        v = calibrate_drnet(bench, variables, x_cal, p, threshold)
      fr = routed_fraction(bench.apply_fn("dense", True)(v, x_cal, jnp.float32(threshold)))
      levels[p] = (v, threshold, x_cal, fr)

    def batch_x(b):
      return random_images(jax.random.key(100 + b), b, bench.image_shape)
  else:
    bench, variables, x_test = build_digits(name, getattr(args, f"{name}_workdir"))
    x_all = jnp.asarray(x_test)
    for p in args.fractions:
      t, _ = threshold_for_fraction(bench, variables, x_all, p)
      fr = routed_fraction(bench.apply_fn("dense", True)(variables, x_all, jnp.float32(t)))
      levels[p] = (variables, t, x_all, fr)

    def batch_x(b):
      idx = np.arange(b) % x_all.shape[0]
      return x_all[idx]
  emit(f"# {name}: {bench.kind}, input {bench.image_shape}, tau {bench.tau:.3f}, setup "
       f"{time.perf_counter() - t0:.0f} s; calibration-set routed fraction per level: "
       + ", ".join(f"{p}: {fr.mean():.3f}" for p, (_, _, _, fr) in levels.items()))

  mesh = args.mesh
  for b in args.batch:
    compiled, compile_s = {}, {}
    for p in args.fractions:
      v, thr, pool, fr = levels[p]
      if b == 1:
        x = pool[int(np.argmin(np.abs(fr - p)))][None]
      else:
        x = batch_x(b)
      thr_arr = jnp.float32(thr)
      v, x = place(v, mesh, replicate=True), place(x, mesh)
      for s in args.strategies:
        if s not in compiled:
          t1 = time.perf_counter()
          spec = dispatch.make_strategy(s, **args.dispatch)  # 'dense' ignores the options
          compiled[s] = bench.apply_fn(spec, True, mesh=mesh).lower(v, x, thr_arr).compile()
          compile_s[s] = time.perf_counter() - t1
      outs = {s: jax.block_until_ready(compiled[s](v, x, thr_arr)) for s in args.strategies}
      ref = outs.get("dense", outs[args.strategies[0]])
      macs_all = float(ref["macs_all"]) * b
      executed = float(np.sum(np.asarray(ref["executed_macs"], np.float64)))
      ideal = macs_all / executed
      frac = float(routed_fraction(ref).mean())
      fns = {s: (lambda s=s: compiled[s](v, x, thr_arr)) for s in args.strategies}
      names = list(args.strategies)
      if args.ceiling and b > 1 and "dense" in args.strategies:
        # The dense model on b / ideal rows: what a dispatcher with no overhead at all would take
        # if every routed unit ran on that many rows (fixed parts shrink too: an upper bound).
        d = 1 if mesh is None else mesh.devices.size  # rows split evenly over the devices
        n = max(d, d * round(b / ideal / d))
        xn = place(x[:n], mesh)
        t1 = time.perf_counter()
        ceiling = bench.apply_fn("dense", True, mesh=mesh).lower(v, xn, thr_arr).compile()
        compile_s["ceiling"] = time.perf_counter() - t1
        fns["ceiling"] = lambda: ceiling(v, xn, thr_arr)
        names.append("ceiling")
      times = _timing.interleaved_times(fns, args.repeats, rng, warmup="ceiling" in fns)
      stats = _timing.speedups(times, "dense")
      for s in names:
        med, paired, best = stats[s]
        lo, hi = _timing.ratio_range(times, s, "dense")
        if s == "ceiling":
          dlogit = agree = float("nan")
        else:
          dlogit = float(np.max(np.abs(np.asarray(outs[s]["logits"])
                                       - np.asarray(ref["logits"]))))
          agree = float(np.mean(np.asarray(outs[s]["executed"]) == np.asarray(ref["executed"])))
        emit(f"{name:<15} {b:>5} {p:>6.2f} {frac:>5.2f} {thr:>6.3f} {s:<12} {med * 1e3:>9.2f} "
             f"{b / med:>9.1f} {paired:>7.2f} {ideal:>6.2f} {paired / ideal:>5.2f} "
             f"{f'{lo / ideal:.2f}-{hi / ideal:.2f}':>9} {best / ideal:>8.2f} "
             f"{compile_s[s]:>9.1f} {dlogit:>8.1e} {agree:>6.3f}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
  ap.add_argument("--fractions", type=float, nargs="+", default=[0.75, 0.5, 0.25],
                  help="target fractions of the routed MACs")
  ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES),
                  choices=list(dispatch.STRATEGIES), help="'dense' is needed for speed-ups")
  ap.add_argument("--dispatch", nargs="*", default=[], metavar="OPTION=VALUE",
                  help="options of the strategies, e.g. buckets=16 branching=cond_chain chunk=8 "
                       "(each strategy takes its own: dispatch.Compact, dispatch.Chunk)")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                  help="also time the 'ceiling' row: the dense model on batch / ideal rows")
  ap.add_argument("--calib_batch", type=int, default=64,
                  help="calibration batch of the controlled decisions (r74, r110, drnet_s)")
  ap.add_argument("--digits_codinet_workdir", default="")
  ap.add_argument("--digits_drnet_workdir", default="")
  ap.add_argument("--devices", type=int, default=1,
                  help="CPU devices to split each batch over (a shard_map: each device runs the "
                       "model and dispatches on its rows; XLA:CPU runs the devices in parallel)")
  ap.add_argument("--results", default="",
                  help="markdown file to append the table to (e.g. bench/RESULTS.md); only when "
                       "the load average at the start is at most --max_load")
  ap.add_argument("--max_load", type=float, default=1.0,
                  help="highest 1-minute load average at the start a recorded table may have")
  args = ap.parse_args(argv)
  args.dispatch = _dispatch_options(ap, args.dispatch)
  if args.devices < 1 or any(b % args.devices for b in args.batch):
    ap.error(f"--batch values must be multiples of --devices={args.devices}; got {args.batch}.")
  if args.devices > 1:  # before anything initialises the CPU backend
    jax.config.update("jax_num_cpu_devices", args.devices)
  args.mesh = (None if args.devices == 1 else
               Mesh(np.array(jax.devices()[:args.devices]), ("b",)))
  rng = np.random.default_rng(0)
  load_start = _timing.load_average()
  lines: list[str] = []

  def emit(line: str) -> None:
    print(line, flush=True)
    lines.append(line)

  auto = [dispatch.default_strategy(jax.default_backend(), b // args.devices) for b in args.batch]
  emit(f"platform: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax "
       f"{jax.__version__}, {_timing.host()}; auto -> {auto} for batch {args.batch}; "
       + ("one device" if args.mesh is None
          else f"each batch split over {args.devices} devices (shard_map)"))
  emit(f"load average {load_start:.2f} at the start (an idle machine reads below ~1)")
  if args.dispatch:
    emit(f"dispatch options: {dispatch.describe(dict(name='auto', **args.dispatch))}")
  emit("frac = routed MACs executed / routed MACs (dense run of the timed batch); ideal and eff "
       "count all MACs (fixed parts included); eff = median of same-round ratios / ideal, "
       "eff_range = lowest-highest same-round ratio / ideal; 'ceiling' = the dense model on "
       "round(batch / ideal) rows (no dispatch at all, every unit on that many rows): the "
       "efficiency this machine allows any dispatcher")
  emit(HEADER)
  for name in args.models:
    run_model(name, args, rng, emit)
  emit(f"load average {_timing.load_average():.2f} at the end")
  if args.results:
    _record(args.results, lines, load_start, args.max_load, argv)


def _dispatch_options(ap: argparse.ArgumentParser, items: list[str]) -> dict[str, Any]:
  """`--dispatch` as a dict, each value a Python literal (or else the string), checked."""
  options = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      ap.error(f"--dispatch takes OPTION=VALUE items; got {item!r}.")
    try:
      options[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      options[key] = value
  try:
    dispatch.make_strategy("auto", **options)
  except (TypeError, ValueError) as e:
    ap.error(f"--dispatch: {e}")
  return options


def _record(path: str, lines: list[str], load_start: float, max_load: float,
            argv: list[str] | None) -> None:
  """Appends the table to `path`, unless the machine was busy when the run began."""
  if not load_start <= max_load:
    print(f"Not writing {path}: the load average was {load_start:.2f} at the start, above "
          f"--max_load={max_load}. Rerun on an idle machine.", flush=True)
    return
  command = " ".join(["python bench/inference.py", *(sys.argv[1:] if argv is None else argv)])
  with open(path, "a") as f:
    f.write(f"\n## Inference skipping efficiency ({time.strftime('%Y-%m-%d')})\n\n"
            f"`{command}`\n\n```\n" + "\n".join(lines) + "\n```\n")
  print(f"Appended the table to {path}.", flush=True)


if __name__ == "__main__":
  main()
