"""DRNet: Dynamic Routing Networks (Cai, Shu & Wang, WACV 2021), in Flax linen.

Architecture (paper Sec. 3 and 4.1; DARTS conventions where the paper is silent):
  * Stem: CIFAR, conv3x3 3 -> stem_multiplier * C, BN (both first cell inputs are the stem output);
    ImageNet (DARTS ImageNet), stem0 = conv3x3/2 -> C/2, BN, ReLU, conv3x3/2 -> C, BN and
    stem1 = ReLU, conv3x3/2 -> C, BN (x0 = stem0, x1 = stem1, a 1/8 resolution).
  * L cells; cells L//3 and 2L//3 (0-based) are reductions: channels doubled, resolution halved.
    Cell inputs x0, x1 are the outputs of the two previous cells, preprocessed to the cell's C
    channels by ReLU-conv1x1-BN, or by a FactorizedReduce for x0 when it has twice x1's resolution
    (the previous cell was a reduction).
  * N = num_nodes intermediate nodes. Node x_i (i = 2 .. N+1) sums two connections: one from
    x_{i-1} and one from x0 or x1, drawn once from `topology_seed`. The topology is shared by all
    cells ("L structurally identical cells") and exposed as the static `DRNet.topology`:
    a tuple over nodes of (index of x_{i-1}, index of the random input in {0, 1}). Node 2's first
    input is x1 (x_{i-1} with i = 2), so node 2 may read x1 twice, through two connections with
    their own weights. Connection c = 2 * node + j (j = 0: from x_{i-1}, j = 1: the random input).
    The cell output concatenates the N nodes (N * C channels). C_conn = 2 N connections per cell.
  * Connection: K = 5 branches, in this order (`BRANCHES`): 3x3 max-pool, 3x3 avg-pool, 3x3 sep-conv,
    5x5 sep-conv (DARTS separable conv applied twice), skip (identity; FactorizedReduce when
    stride 2). In a reduction cell the connections reading x0 or x1 have stride 2 ("nodes directly
    connected to input nodes are downsampled with stride 2"), all their branches included.
  * RouterNet (one per cell, param paths contain 'router'): input x0 and x1 as the cell receives
    them (`router_input='raw'`, the default), concatenated on channels. When x0 has twice x1's
    resolution (after a reduction) x0 is first average-pooled 2x2/2 (no parameters, no MACs) to
    x1's resolution. Then two blocks of [pointwise conv -> W, BN, ReLU, depthwise 5x5 stride 2, BN,
    ReLU], global average pool and a dense layer to C_conn x K logits. Width W =
    round(router_width_multiplier * C) with C the cell's channels. `router_input='preprocessed'`
    feeds the concatenated preprocessed inputs (2C channels) instead (a cheaper reading).
    This reading (raw inputs, W = C) is the one that reproduces the paper's model sizes (see
    configs/drnet_cifar10.py for the measured figures); the paper does not give the widths.
    `use_router=False` is the "w/o RouterNet" ablation: one learned logit vector per connection
    (param 'router/logits', [C_conn, K], shared by all examples).
  * Auxiliary head (param paths contain 'aux_head'): DARTS CIFAR head on the output of cell 2L//3:
    ReLU, avg-pool 5 stride `aux_pool_stride` (3 CIFAR, 2 ImageNet; window min(5, H) on small
    maps), conv1x1 -> 128, BN, ReLU, conv -> 768 with a kernel covering the pooled map (2x2 on the
    paper's sizes), BN, ReLU, dense -> classes. Training only (`aux_logits` is None otherwise);
    excluded from `params_fixed` and from model sizes, as in DARTS.
  * Classifier: global average pool, dense -> classes.

Routing (`__call__`):
  * train=True: w = routing.gumbel_softmax(key, logits, tau) with the key from the 'routing' rng
    stream (`gumbel=False`, the "Softmax" ablation: no noise). Connection output sum_b w_b F_b(x).
  * train=False, threshold=None: w = softmax(logits / tau) (noise-free; `tau` is the evaluation
    temperature, normally the final training temperature), every branch runs.
  * train=False, threshold=T: mask, w = routing.threshold_select(softmax(logits / tau), T); output
    sum over kept branches of w_b F_b(x). `strategy='dense'` computes every branch and masks;
    other strategies go through `dynroute_jax.dispatch.mix_branches`, which runs each branch only
    on the examples that kept it (each branch is its own submodule, called as a pure function
    through `common.pure_fn`); 'auto' takes the dispatcher's platform default. `strategy` (a
    name, a mapping `dict(name=..., **options)` or a `dispatch.Strategy`) is ignored in training
    and without a threshold.
  * Drop-connection (`drop_path_rate`, per call, training only, 'dropout' rng): DARTS drop-path on
    the output of every branch but the identity.
  * Drop-branch (`drop_branch_rate`, a model field; the paper's "drop-branch 0.7" is not defined
    further). Our reading: in training, for every (example, connection) each branch except the skip
    branch is dropped independently with probability p, and the weights of the surviving branches
    are renormalised to sum to 1 (the skip branch always survives, so a connection never loses all
    its branches). The mask comes from the 'dropout' stream. `ModelOutput.weights` reports the
    router's weights before drop-branch (the distribution the resource loss acts on). 0 disables.

Costs (`ModelOutput`): `macs_table` / `params_table` [L*C_conn*K] hold each branch's MACs and
parameters for one example, from `common.module_costs` of the branch definition at its input
shape (cached). `macs_fixed` / `params_fixed` cover the stem, the
preprocessing, the routers and the classifier (not the auxiliary head). MACs are multiply-
accumulates of conv and dense layers (FLOPs = 2 x MACs; the paper's "FLOPs" are MACs).

Hyperparameters live in the frozen `DRNetConfig` (validated on construction); `from_config`
builds it from `config.model` and the module `DRNet(config)`.

Shape letters: B batch; H, W, C an image or feature map; N classes; L cells; C_conn (C in names)
connections per cell; K branches; S = L x C_conn x K routed units.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dynroute_jax import dispatch
from dynroute_jax import routing
from dynroute_jax.models import base
from dynroute_jax.models import common
# The layers are part of this module's public API (drnet.Cell, drnet.BRANCHES, ...).
from dynroute_jax.models.drnet_layers import AuxHead
from dynroute_jax.models.drnet_layers import BRANCHES
from dynroute_jax.models.drnet_layers import Cell
from dynroute_jax.models.drnet_layers import Classifier
from dynroute_jax.models.drnet_layers import Connection
from dynroute_jax.models.drnet_layers import drop_branch
from dynroute_jax.models.drnet_layers import FixedRouter
from dynroute_jax.models.drnet_layers import make_branch
from dynroute_jax.models.drnet_layers import make_preprocess
from dynroute_jax.models.drnet_layers import make_topology
from dynroute_jax.models.drnet_layers import NUM_BRANCHES
from dynroute_jax.models.drnet_layers import router_input
from dynroute_jax.models.drnet_layers import RouterNet
from dynroute_jax.models.drnet_layers import SKIP_INDEX
from dynroute_jax.models.drnet_layers import Stem

Array = jax.Array

# variant -> (num_cells, init_channels). 'tiny' is for tests and the digits demo.
VARIANTS = {"tiny": (3, 8), "S": (5, 15), "M": (10, 20), "L": (10, 32)}
STEMS = ("cifar", "imagenet")
ROUTER_INPUTS = ("raw", "preprocessed")
# Cost groups that run for every example (the auxiliary head runs in training only).
FIXED_GROUPS = ("stem", "preprocess", common.ROUTERS, "classifier")


# ------------------------------------------------------------------------------------------------
# Config.
# ------------------------------------------------------------------------------------------------


def _stem_reduction(stem: str) -> int:
  return 1 if stem == "cifar" else 8


@dataclasses.dataclass(frozen=True)
class DRNetConfig:
  """DRNet's hyperparameters (the `config.model` fields but 'name' and 'variant'), validated."""
  num_classes: int = 10
  num_cells: int = 5
  init_channels: int = 15
  num_nodes: int = 4
  inputs_per_node: int = 2
  topology_seed: int = 0
  use_router: bool = True
  gumbel: bool = True
  aux_head: bool = True
  drop_branch_rate: float = 0.0
  router_width_multiplier: float = 1.0
  router_input: str = "raw"
  stem: str = "cifar"
  stem_multiplier: int = 3
  aux_pool_stride: int = 3
  image_size: int = 32
  num_channels: int = 3

  def __post_init__(self):
    """Raises a ValueError naming the first bad field and its allowed values."""
    common.check_int(self.num_cells, "num_cells", 3)
    common.check_int(self.init_channels, "init_channels", 1)
    common.check_int(self.num_nodes, "num_nodes", 1)
    if self.inputs_per_node != 2 or not common.is_int(self.inputs_per_node):
      raise ValueError(f"config.model.inputs_per_node must be 2 (x_(i-1) and x0 or x1, the "
                       f"paper's plain topology); got {self.inputs_per_node!r}.")
    common.check_int(self.topology_seed, "topology_seed", 0)
    for name in ("use_router", "gumbel", "aux_head"):
      common.check_bool(getattr(self, name), name)
    common.check_rate(self.drop_branch_rate, "drop_branch_rate")
    v = self.router_width_multiplier
    if not common.is_number(v) or not (math.isfinite(v) and v > 0):
      raise ValueError(f"config.model.router_width_multiplier must be a number > 0; got {v!r}.")
    common.check_choice(self.router_input, "router_input", ROUTER_INPUTS)
    common.check_choice(self.stem, "stem", STEMS)
    for name in ("stem_multiplier", "aux_pool_stride", "num_classes", "num_channels",
                 "image_size"):
      common.check_int(getattr(self, name), name, 1)
    common.check_image_size(self.image_size, self.reduction_factor, self.reduction_reason)

  @property
  def reduction_factor(self) -> int:
    """Total spatial reduction: the stem's, then two reduction cells."""
    return 4 * _stem_reduction(self.stem)

  @property
  def reduction_reason(self) -> str:
    return (f"the {self.stem} stem reduces by {_stem_reduction(self.stem)}, then two reduction "
            "cells halve the resolution twice")

  @property
  def topology(self) -> tuple[tuple[int, int], ...]:
    """Per node (x_{i-1} index, random input index in {0, 1}); shared by every cell."""
    return make_topology(self.topology_seed, self.num_nodes)

  @property
  def num_connections(self) -> int:
    return self.inputs_per_node * self.num_nodes

  @property
  def reduction_cells(self) -> tuple[int, int]:
    return (self.num_cells // 3, 2 * self.num_cells // 3)

  @property
  def aux_cell(self) -> int:
    """0-based index of the cell whose output feeds the auxiliary head (DARTS: 2L//3)."""
    return 2 * self.num_cells // 3

  @property
  def site_shape(self) -> tuple[int, int, int]:
    return (self.num_cells, self.num_connections, NUM_BRANCHES)

  def router_width(self, channels: int) -> int:
    return max(1, int(round(self.router_width_multiplier * channels)))


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(DRNetConfig))
CONFIG_FIELDS = ("name", "variant") + FIELD_NAMES


def _check_variant(variant: Any) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"config.model.variant must be one of {tuple(VARIANTS)} "
                     f"('S', 'M', 'L' from the paper, 'tiny' for tests); got {variant!r}.")


def default_config(variant: str = "S", num_classes: int = 10, image_size: int = 32,
                   num_channels: int = 3) -> ml_collections.ConfigDict:
  """The `config.model` section of a DRNet variant ('S', 'M', 'L', or 'tiny' for tests)."""
  _check_variant(variant)
  num_cells, channels = VARIANTS[variant]
  return ml_collections.ConfigDict(dict(
      name="drnet",
      variant=variant,
      num_cells=num_cells,
      init_channels=channels,
      num_nodes=4,
      inputs_per_node=2,
      topology_seed=0,
      use_router=True,          # False: "w/o RouterNet" ablation (learned logits per connection).
      gumbel=True,              # False: "Softmax" ablation (no Gumbel noise in training).
      aux_head=True,
      drop_branch_rate=0.0,     # see the module docstring for the reading; 0 disables.
      router_width_multiplier=1.0,  # router width = round(multiplier * cell channels).
      router_input="raw",       # 'raw' (x0, x1 as received) or 'preprocessed'.
      stem="cifar",             # 'cifar' or 'imagenet' (two stride-2 stems, DARTS ImageNet).
      stem_multiplier=3,
      aux_pool_stride=3,        # DARTS: 3 (CIFAR head), 2 (ImageNet head).
      num_classes=num_classes,
      image_size=image_size,
      num_channels=num_channels,
  ))


def config_from_model_config(model_config: ml_collections.ConfigDict | dict) -> DRNetConfig:
  """The validated `DRNetConfig` of a `config.model` section (see `default_config`)."""
  cfg = common.config_dict(model_config)
  common.check_config_keys(cfg, CONFIG_FIELDS,
                           "Unknown config.model field(s) {unknown}; allowed: {allowed}.")
  if cfg.get("name", "drnet") != "drnet":
    raise ValueError(f"config.model.name must be 'drnet' here; got {cfg.get('name')!r}.")
  _check_variant(cfg.get("variant"))
  return DRNetConfig(**{k: v for k, v in cfg.items() if k in FIELD_NAMES})


def from_config(model_config: ml_collections.ConfigDict | dict) -> DRNet:
  """Validates `config.model` (see `default_config`) and builds the DRNet; nothing is compiled."""
  return DRNet(config_from_model_config(model_config))


# ------------------------------------------------------------------------------------------------
# Static plan and cost tables.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CellPlan:
  """Static shapes of one cell ((h, w, c) without batch)."""
  index: int
  channels: int
  reduction: bool
  in0: tuple[int, int, int]
  in1: tuple[int, int, int]
  out: tuple[int, int, int]
  router_in: tuple[int, int, int]
  # Per connection: (input shape (h, w, c), stride).
  connections: tuple[tuple[tuple[int, int, int], int], ...]


@functools.lru_cache(maxsize=None)
def _plan(cfg: DRNetConfig, hwc: tuple[int, int, int]) -> tuple[CellPlan, ...]:
  h, w, _ = hwc
  c = cfg.init_channels
  if cfg.stem == "cifar":
    s0 = s1 = (h, w, cfg.stem_multiplier * c)
  else:
    s0 = (h // 4, w // 4, c)
    s1 = (h // 8, w // 8, c)
  plans = []
  reductions = cfg.reduction_cells
  for i in range(cfg.num_cells):
    if i in reductions:
      c *= 2
    reduction = i in reductions
    hi, wi = s1[0], s1[1]
    ho, wo = (hi // 2, wi // 2) if reduction else (hi, wi)
    router_c = s0[2] + s1[2] if cfg.router_input == "raw" else 2 * c
    conns = []
    for prev, rand in cfg.topology:
      for src in (prev, rand):
        if src < 2:
          conns.append(((hi, wi, c), 2 if reduction else 1))
        else:
          conns.append(((ho, wo, c), 1))
    out = (ho, wo, cfg.num_nodes * c)
    plans.append(CellPlan(i, c, reduction, s0, s1, out, (hi, wi, router_c), tuple(conns)))
    s0, s1 = s1, out
  return tuple(plans)


@functools.lru_cache(maxsize=None)
def _cost_tables(cfg: DRNetConfig, hwc: tuple[int, int, int]) -> common.CostTables:
  plans = _plan(cfg, hwc)
  macs_LxCxK = np.zeros(cfg.site_shape, np.int64)
  params_LxCxK = np.zeros_like(macs_LxCxK)
  macs = dict(stem=0, preprocess=0, routers=0, classifier=0, branches=0, aux_head=0)
  params = dict(macs)

  def add(group, module, in_shape):
    m, p = common.module_costs(module, in_shape)
    macs[group] += m
    params[group] += p

  add("stem", Stem(cfg.stem, cfg.init_channels, cfg.stem_multiplier, parent=None), hwc)
  for p in plans:
    add("preprocess", make_preprocess(p.channels, p.in0[0] == 2 * p.in1[0], parent=None), p.in0)
    add("preprocess", make_preprocess(p.channels, False, parent=None), p.in1)
    if cfg.use_router:
      add(common.ROUTERS, RouterNet(cfg.router_width(p.channels), cfg.num_connections,
                                    parent=None), p.router_in)
    else:
      add(common.ROUTERS, FixedRouter(cfg.num_connections, parent=None), p.in1)
    for c, (shape, stride) in enumerate(p.connections):
      for b, kind in enumerate(BRANCHES):
        macs_LxCxK[p.index, c, b], params_LxCxK[p.index, c, b] = common.module_costs(
            make_branch(kind, p.channels, stride, parent=None), shape)
  add("classifier", Classifier(cfg.num_classes, parent=None), plans[-1].out)
  if cfg.aux_head:
    add("aux_head", AuxHead(cfg.num_classes, cfg.aux_pool_stride, parent=None),
        plans[cfg.aux_cell].out)
  macs["branches"] = int(macs_LxCxK.sum())
  params["branches"] = int(params_LxCxK.sum())
  return common.CostTables(macs_LxCxK, params_LxCxK, macs, params, FIXED_GROUPS)


def size_report(model: DRNet, input_shape: tuple[int, ...] | None = None
                ) -> dict[str, dict[str, int]]:
  """Per-example parameters and MACs, split into backbone / routers / aux head.

  'backbone' = stem + preprocessing + every branch + classifier. 'total' = backbone + routers
  (the model size the paper reports; the auxiliary head is excluded). MACs count every branch.
  """
  t = model.cost_tables(input_shape)

  def split(d):
    backbone = d["stem"] + d["preprocess"] + d["branches"] + d["classifier"]
    return dict(backbone=backbone, routers=d["routers"], aux_head=d["aux_head"],
                total=backbone + d["routers"])

  return dict(params=split(t.params), macs=split(t.macs))


# ------------------------------------------------------------------------------------------------
# The model.
# ------------------------------------------------------------------------------------------------


class DRNet(nn.Module):
  """Dynamic Routing Network. See the module docstring; build it with `from_config`."""
  config: DRNetConfig = DRNetConfig()

  model_name: ClassVar[str] = "drnet"
  router_param_pattern: ClassVar[str] = base.ROUTER_PARAM_PATTERN

  # ---- static structure ------------------------------------------------------------------------

  @property
  def topology(self) -> tuple[tuple[int, int], ...]:
    return self.config.topology

  @property
  def site_shape(self) -> tuple[int, int, int]:
    return self.config.site_shape

  def plan(self, input_shape: tuple[int, ...]) -> tuple[CellPlan, ...]:
    """Static shapes of every cell for an input of `input_shape` ([B,] H, W, C)."""
    return _plan(self.config, tuple(input_shape[-3:]))

  def cost_tables(self, input_shape: tuple[int, ...] | None = None) -> common.CostTables:
    """Per-example cost tables for inputs of `input_shape` (default: the configured image)."""
    if input_shape is None:
      input_shape = (self.config.image_size, self.config.image_size, self.config.num_channels)
    return _cost_tables(self.config, tuple(input_shape[-3:]))

  # ---- the RoutedModel contract (see `base.RoutedModel`) -----------------------------------------

  def routing_site_shape(self, image_hw: tuple[int, int]) -> tuple[int, int, int]:
    """(L, C, K): cells x connections x branches, whatever the image size."""
    del image_hw
    return self.site_shape

  def unit_names(self) -> list[str]:
    return list(BRANCHES)

  def routing_stats(self, out: base.ModelOutput) -> dict[str, Array]:
    """Mean weight of each branch type ('branch_ratio/<k>') and the mean router entropy."""
    stats = {}
    w_BxLxCxK = out.weights.reshape(out.weights.shape[0], *out.site_shape)
    ratio_K = jnp.mean(w_BxLxCxK, axis=(0, 1, 2))
    for k in range(ratio_K.shape[0]):
      stats[f"branch_ratio/{k}"] = ratio_K[k]
    stats["router_entropy"] = jnp.mean(routing.entropy(w_BxLxCxK, axis=-1))
    return stats

  def train_call_kwargs(self, stage_cfg: Any) -> dict[str, Any]:
    del stage_cfg  # every DRNet stage trains with relaxed routing.
    return {}

  def selection_ratios(self, executed_NxS: np.ndarray) -> dict[str, Any]:
    """Branch selection per connection [L][C][K], per cell [L][K] and per branch type [K]."""
    sel_LxCxK = base.unit_means(executed_NxS).reshape(self.site_shape)
    return {"branch_selection": np.round(sel_LxCxK, 6).tolist(),
            "branch_selection_per_cell": np.round(sel_LxCxK.mean(axis=1), 6).tolist(),
            "branch_ratio": np.round(sel_LxCxK.mean(axis=(0, 1)), 6).tolist()}

  def constant_decisions(self, executed_NxS: np.ndarray) -> dict[str, Any]:
    """Connections whose kept branch set never changes, and routers (cells) all of whose are."""
    conn_LxC = base.constant_units(executed_NxS).reshape(self.site_shape).all(axis=-1)
    return {"constant_connections": int(conn_LxC.sum()),
            "num_connections": int(conn_LxC.size),
            "constant_routers": int(conn_LxC.all(axis=1).sum()),  # one router per cell.
            "num_routers": int(self.site_shape[0])}

  def size_breakdown(self, macs_table_S: np.ndarray) -> dict[str, Any]:
    """Routed MACs per cell and per branch type."""
    per_unit_LxCxK = np.asarray(macs_table_S, np.float64).reshape(self.site_shape)
    return {"macs_per_cell": [float(v) for v in per_unit_LxCxK.sum(axis=(1, 2))],
            "macs_per_branch_type": [float(v) for v in per_unit_LxCxK.sum(axis=(0, 1))]}

  # ---- forward ---------------------------------------------------------------------------------

  @nn.compact
  def __call__(self, x: Array, *, train: bool, tau: float | Array = 1.0,
               threshold: float | Array | None = None, drop_path_rate: float | Array = 0.0,
               strategy: dispatch.StrategySpec = "dense",
               router_override: Array | None = None) -> base.ModelOutput:
    cfg = self.config
    common.check_router_override(router_override, train, math.prod(self.site_shape),
                                 f"the flattened site shape {self.site_shape}")
    common.check_call(train=train, tau=tau, threshold=threshold, drop_path_rate=drop_path_rate,
                      strategy=strategy, threshold_in_training=False)
    common.check_images(x, cfg.num_channels, cfg.reduction_factor, cfg.reduction_reason)
    strategy = common.resolve_strategy(strategy, x.shape[0], threshold is not None)
    override_LxCxK = (None if router_override is None
                      else router_override.reshape(self.site_shape))

    s0, s1 = Stem(cfg.stem, cfg.init_channels, cfg.stem_multiplier, name="stem")(x, train=train)
    weights, executed, cleans = [], [], []
    aux_logits = None
    for p in self.plan(x.shape):
      out, w, e, cw = Cell(p.channels, p.reduction, cfg.topology, cfg.use_router, cfg.gumbel,
                           cfg.drop_branch_rate, cfg.router_width(p.channels), cfg.router_input,
                           name=f"cell_{p.index}")(
                               s0, s1, train=train, tau=tau, threshold=threshold,
                               drop_path_rate=drop_path_rate, strategy=strategy,
                               router_override=(None if override_LxCxK is None
                                                else override_LxCxK[p.index]))
      assert out.shape[1:] == p.out, (out.shape, p.out)
      s0, s1 = s1, out
      weights.append(w)
      executed.append(e)
      cleans.append(cw)
      if p.index == cfg.aux_cell and cfg.aux_head and (train or self.is_initializing()):
        aux = AuxHead(cfg.num_classes, cfg.aux_pool_stride, name="aux_head")(s1, train=train)
        aux_logits = aux if train else None
    logits = Classifier(cfg.num_classes, name="classifier")(s1)

    b = x.shape[0]
    weights_BxS = jnp.stack(weights, axis=1).reshape(b, -1)
    return common.model_output(
        logits=logits, aux_logits=aux_logits, weights_BxS=weights_BxS,
        executed_BxS=jnp.stack(executed, axis=1).reshape(b, -1), path_BxP=weights_BxS,
        router_probs_BxS=jnp.stack(cleans, axis=1).reshape(b, -1),
        tables=self.cost_tables(x.shape), site_shape=self.site_shape)


__all__ = [
    "BRANCHES", "SKIP_INDEX", "NUM_BRANCHES", "VARIANTS", "DRNet", "DRNetConfig", "Cell",
    "Connection", "RouterNet", "FixedRouter", "AuxHead", "Stem", "Classifier", "CellPlan",
    "make_topology", "make_branch", "drop_branch", "default_config", "config_from_model_config",
    "from_config", "size_report",
]
