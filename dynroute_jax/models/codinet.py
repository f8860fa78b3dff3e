"""CoDiNet (Consistency and Diversity regularised dynamic routing, TPAMI): routed ResNets.

Every residual block k of a ResNet gets a router U_k (paper Sec. 3.1.2, Fig. 3b):

    z_k = GAP(a_{k-1});  U_k = W_2 sigma(W_1 z_k)  (two logits, index 1 = "run", Eq. 4-5)

and the block output is

    training (Eq. 7):           a_k = v_k F_k(a_{k-1}) + (1 - v_k) skip(a_{k-1}),
                                v_k = softmax((U_k + g) / T)[1], g ~ Gumbel, T = 1 (Eq. 6)
    fine-tuning (hard=True):    a_k = u_k F_k(a_{k-1}) + (1 - u_k) skip(a_{k-1}),
                                u_k = 1[v_k >= 0.5], v_k noise-free, straight-through gradient
    inference (Eq. 13):         a_k = F_k(a_{k-1}) if v_k >= threshold else skip(a_{k-1}),
                                v_k noise-free (deterministic; no rng needed)

Readings chosen where the paper is silent or the official code differs (each is a config field
when users may disagree):

* Router logits: the router output U_k is used as Gumbel-softmax logits (the paper's log(U_k) is
  undefined for a linear layer's output; see `routing.relaxed_decision`).
* `router_hidden` d: 0 (default) means d = C_k, the block's input channels, as in the official
  code. It reproduces Table 6's "#Param" column (ResNet-32/74/110: 0.49 / 1.21 / 1.83 M with
  routers). `router_activation`: 'relu' (Eq. 4's sigma, default) or 'none' (the official code has
  no activation between the two layers).
* skip(a): identity for blocks that keep the shape. For a shape-changing block,
  `skip_downsample='shortcut'` (default) uses the block's own shortcut followed by the block's
  final ReLU, i.e. the block with its residual branch removed: the parameter-free option-A
  shortcut (subsample + zero-pad channels) in CIFAR ResNets, the standard projection (1x1 conv +
  BN) in ResNet-50. `'conv1x1'` is the official code's separate learned skip (1x1 conv, BN, ReLU).
  Blocks end in a ReLU, so their inputs are non-negative and the ReLU leaves identity and
  option-A skips unchanged.
* Fine-tuning (stage 2, `hard=True` with `train=True`): the routers are frozen by the trainer;
  decisions are the noise-free inference decisions u_k = 1[v_k >= threshold or 0.5], so the blocks
  are fine-tuned on exactly the paths inference takes (the official code instead takes the argmax
  of a noisy Gumbel sample). The straight-through estimator still passes gradients to routers.
* Training uses every block (dense) with batch statistics. Inference with a threshold runs each
  block through `dispatch.select_apply` with the call's `strategy`: 'dense' computes every block on
  the whole batch and masks (the reference); 'auto' / 'batch_cond' / 'per_example' / 'compact' /
  'chunk' run a block's residual branch only on (a bucket or chunk of) the examples that selected
  it. The block is a pure function of its input there: its `body` (params under `<site>/body`) and
  `shortcut` submodules through `common.pure_fn`, batch norm in inference mode.

Cost convention (see `dynroute_jax.costs`): MACs of conv and dense layers; FLOPs = 2 x MACs.
`macs_table[k]` = MACs of block k's residual branch (`body`) for one example; `macs_fixed` = stem,
routers, shortcut/skip paths and classifier. Backbone sizes (routers excluded, `skip_downsample=
'shortcut'`): ResNet-32 / 74 / 110 = 464,154 / 1,144,666 / 1,727,962 params and 68.86M / 167.95M /
252.89M MACs at 32x32; ResNet-50 = 25,557,032 params and 4.09G MACs at 224x224. Learned skips
(`'conv1x1'`) are counted in `macs_fixed` as always executed (an upper bound: a real dispatcher
runs them only for the examples that skip).

Site order: the routing axis D lists the blocks in network order (stage by stage, block by block),
also under `scan_blocks=True`, where blocks 1..n-1 of a stage are one `nn.scan` over stacked
parameters (site names `stage{s}_block0` and `stage{s}_blocks`; unscanned: `stage{s}_block{i}`).

Hyperparameters live in the frozen `CoDiNetConfig` (validated on construction); `from_config`
builds it from `config.model` and the module `CoDiNet(config)`.

Shape letters: B batch; H, W, C an image or feature map; N classes; D routed blocks (= S).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dynroute_jax import dispatch
from dynroute_jax.models import base
from dynroute_jax.models import common
# The layers are part of this module's public API (codinet.Stem, codinet.Head, ...).
from dynroute_jax.models.codinet_layers import BasicBody
from dynroute_jax.models.codinet_layers import BottleneckBody
from dynroute_jax.models.codinet_layers import Head
from dynroute_jax.models.codinet_layers import option_a_shortcut
from dynroute_jax.models.codinet_layers import Projection
from dynroute_jax.models.codinet_layers import RoutedBlock
from dynroute_jax.models.codinet_layers import Router
from dynroute_jax.models.codinet_layers import ScanBody
from dynroute_jax.models.codinet_layers import Stem
from dynroute_jax.models.base import ModelOutput

Array = jax.Array

# ------------------------------------------------------------------------------------------------
# Variants.
# ------------------------------------------------------------------------------------------------

# CIFAR ResNets (He et al. 2016, Sec. 4.2): depth = 6n + 2, three stages of n basic blocks.
_CIFAR_DEPTHS = {"resnet8": 1, "resnet14": 2, "resnet20": 3, "resnet32": 5, "resnet44": 7,
                 "resnet56": 9, "resnet74": 12, "resnet110": 18}
# ImageNet bottleneck ResNets: blocks per stage. 'resnet26' (2 per stage) is a small test variant.
_IMAGENET_BLOCKS = {"resnet26": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
VARIANTS = tuple(_CIFAR_DEPTHS) + tuple(_IMAGENET_BLOCKS)

ROUTER_ACTIVATIONS = ("relu", "none")
SKIP_DOWNSAMPLE = ("shortcut", "conv1x1")

def is_cifar_variant(variant: str) -> bool:
  return variant in _CIFAR_DEPTHS


def default_width(variant: str) -> int:
  """Base channels of the first stage: 16 (CIFAR ResNets) or 64 (ImageNet ResNets)."""
  return 16 if is_cifar_variant(variant) else 64


def stage_blocks(variant: str) -> tuple[int, ...]:
  """Blocks per stage of `variant`."""
  if variant in _CIFAR_DEPTHS:
    return (_CIFAR_DEPTHS[variant],) * 3
  if variant in _IMAGENET_BLOCKS:
    return _IMAGENET_BLOCKS[variant]
  raise ValueError(f"config.model.variant must be one of {VARIANTS}; got {variant!r}.")


def input_reduction(variant: str) -> int:
  """Total spatial reduction of the network: image sizes must be multiples of it."""
  return 4 if is_cifar_variant(variant) else 32


# ------------------------------------------------------------------------------------------------
# Config.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CoDiNetConfig:
  """CoDiNet's hyperparameters (the `config.model` fields but 'name'), validated."""
  variant: str = "resnet110"
  num_classes: int = 10
  image_size: int = 32
  num_channels: int = 3
  # Channels of the first stage (16 CIFAR, 64 ImageNet); smaller values give cheap test models.
  width: int = 16
  # Router hidden width d; 0 = the block's input channels C_k (official code; Table 6 sizes).
  router_hidden: int = 0
  # sigma of Eq. 4: 'relu' (paper) or 'none' (official code: no activation).
  router_activation: str = "relu"
  # Skip path of shape-changing blocks: 'shortcut' (block's own shortcut: option A / projection)
  # or 'conv1x1' (official code: separate learned 1x1 conv + BN + ReLU).
  skip_downsample: str = "shortcut"
  # Identical blocks 1..n-1 of each stage under nn.scan (bounded compile time).
  scan_blocks: bool = True

  def __post_init__(self):
    """Raises a ValueError naming the first bad field and its allowed values."""
    common.check_choice(self.variant, "variant", VARIANTS)
    for name, minimum in (("num_classes", 1), ("num_channels", 1), ("width", 1),
                          ("router_hidden", 0), ("image_size", 1)):
      common.check_int(getattr(self, name), name, minimum)
    common.check_image_size(self.image_size, self.reduction_factor, self.reduction_reason)
    common.check_choice(self.router_activation, "router_activation", ROUTER_ACTIVATIONS)
    common.check_choice(self.skip_downsample, "skip_downsample", SKIP_DOWNSAMPLE)
    common.check_bool(self.scan_blocks, "scan_blocks")

  @property
  def reduction_factor(self) -> int:
    return input_reduction(self.variant)

  @property
  def reduction_reason(self) -> str:
    return f"the total stride of {self.variant}"

  @property
  def imagenet(self) -> bool:
    return not is_cifar_variant(self.variant)


_MODEL_FIELDS = ("name",) + tuple(f.name for f in dataclasses.fields(CoDiNetConfig))


def default_config(variant: str, num_classes: int = 10, image_size: int = 32,
                   num_channels: int = 3) -> ml_collections.ConfigDict:
  """The `config.model` section for a CoDiNet `variant` (see `VARIANTS`)."""
  common.check_choice(variant, "variant", VARIANTS)
  c = ml_collections.ConfigDict(dict(
      name="codinet", variant=variant, num_classes=num_classes, image_size=image_size,
      num_channels=num_channels, width=default_width(variant),
      # The readings of the paper (see `CoDiNetConfig`): router width C_k, Eq. 4's ReLU, the
      # block's own shortcut as its skip path; blocks 1..n-1 of a stage under nn.scan.
      router_hidden=0, router_activation="relu", skip_downsample="shortcut", scan_blocks=True))
  config_from_model_config(c)
  return c


def config_from_model_config(model_config: Any) -> CoDiNetConfig:
  """The validated `CoDiNetConfig` of a `config.model` section (before anything is compiled)."""
  cfg = common.config_dict(model_config)
  common.check_config_keys(cfg, _MODEL_FIELDS, "config.model has unknown field(s) {unknown}; "
                           "CoDiNet fields are {allowed}.")
  missing = [f for f in _MODEL_FIELDS if f not in cfg]
  if missing:
    raise ValueError(f"config.model is missing field(s) {missing} (use codinet.default_config).")
  if cfg["name"] != "codinet":
    raise ValueError(f"config.model.name must be 'codinet'; got {cfg['name']!r}.")
  return CoDiNetConfig(**{k: v for k, v in cfg.items() if k != "name"})


def from_config(model_config: Any) -> CoDiNet:
  """Validates `config.model` and builds the module."""
  return CoDiNet(config_from_model_config(model_config))


def parse_config_arg(arg: str | None, default_variant: str,
                     allowed: Sequence[str] = VARIANTS) -> tuple[str, dict[str, float]]:
  """Parses a config-file argument 'resnet110' or 'resnet110,gamma=0.04' into (variant, overrides).

  Keys: `gamma` (stage-1 cost-loss weight). An empty argument gives `default_variant`.
  """
  variant, overrides = default_variant, {}
  for part in (p.strip() for p in (arg or "").split(",")):
    if not part:
      continue
    if "=" in part:
      key, value = part.split("=", 1)
      if key.strip() != "gamma":
        raise ValueError(f"config argument: unknown key {key!r} (allowed: gamma).")
      overrides["gamma"] = float(value)
    else:
      variant = part
  if variant not in allowed:
    raise ValueError(f"config.model.variant must be one of {tuple(allowed)}; got {variant!r}.")
  return variant, overrides



# ------------------------------------------------------------------------------------------------
# Block specs and costs (static, derived from the module definitions).
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Static description of one routed block.

  Attributes:
    site: parameter-tree name of the block (a scanned group shares one name).
    index: position of the block in the routing axis D.
    bottleneck: bottleneck (ImageNet) or basic (CIFAR) block.
    in_features / features / out_features: input channels, inner width, output channels.
    stride: spatial stride of the block.
    in_hw: input spatial size (H, W).
    router_hidden: the router's hidden width d (resolved: never 0).
    shortcut: 'identity', 'option_a' or 'projection' (the block's own shortcut).
    skip: 'identity', 'shortcut' or 'conv1x1' (what replaces the block when it is skipped).
  """
  site: str
  index: int
  bottleneck: bool
  in_features: int
  features: int
  out_features: int
  stride: int
  in_hw: tuple[int, int]
  router_hidden: int
  shortcut: str
  skip: str

  def body(self) -> nn.Module:
    """An unbound instance of the block's residual branch (the routed computation)."""
    cls = BottleneckBody if self.bottleneck else BasicBody
    return cls(self.features, self.stride, parent=None)

  @property
  def in_shape(self) -> tuple[int, int, int]:
    return (*self.in_hw, self.in_features)


def _block_specs(variant: str, width: int, router_hidden: int, skip_downsample: str,
                 scan_blocks: bool, in_hw: tuple[int, int]) -> tuple[BlockSpec, ...]:
  imagenet = not is_cifar_variant(variant)
  h, w = in_hw
  if imagenet:
    h, w = (h + 1) // 2, (w + 1) // 2  # conv 7x7/2 (pad 3)
    h, w = (h + 1) // 2, (w + 1) // 2  # max pool 3x3/2 (pad 1)
  specs = []
  in_f = width
  for s, n in enumerate(stage_blocks(variant)):
    feat = width * 2 ** s
    out_f = 4 * feat if imagenet else feat
    for i in range(n):
      stride = 2 if (s > 0 and i == 0) else 1
      changes = stride != 1 or in_f != out_f
      shortcut = "identity" if not changes else ("projection" if imagenet else "option_a")
      skip = "identity" if not changes else skip_downsample
      site = f"stage{s + 1}_block{i}" if (i == 0 or not scan_blocks) else f"stage{s + 1}_blocks"
      specs.append(BlockSpec(site=site, index=len(specs), bottleneck=imagenet, in_features=in_f,
                             features=feat, out_features=out_f, stride=stride, in_hw=(h, w),
                             router_hidden=router_hidden or in_f, shortcut=shortcut, skip=skip))
      h, w = (h + stride - 1) // stride, (w + stride - 1) // stride
      in_f = out_f
  return tuple(specs)


# Cost groups; every one runs for every example (learned skips counted as always executed).
FIXED_GROUPS = ("stem", "head", common.ROUTERS, "shortcuts")


@functools.lru_cache(maxsize=None)
def _cost_tables(cfg: CoDiNetConfig, in_shape: tuple[int, int, int]) -> common.CostTables:
  """Per-example costs of every part, from `common.module_costs` of its module."""
  specs = _block_specs(cfg.variant, cfg.width, cfg.router_hidden, cfg.skip_downsample, False,
                       in_shape[:2])
  macs = {group: 0 for group in FIXED_GROUPS}
  params = dict(macs)

  def add(group, module, shape):
    m, p = common.module_costs(module, shape)
    macs[group] += m
    params[group] += p

  add("stem", Stem(cfg.width, cfg.imagenet, parent=None), in_shape)
  last = specs[-1]
  out_hw = ((last.in_hw[0] + last.stride - 1) // last.stride,
            (last.in_hw[1] + last.stride - 1) // last.stride)
  add("head", Head(cfg.num_classes, parent=None), (*out_hw, last.out_features))
  macs_D, params_D = np.zeros(len(specs), np.int64), np.zeros(len(specs), np.int64)
  for spec in specs:
    macs_D[spec.index], params_D[spec.index] = common.module_costs(spec.body(), spec.in_shape)
    add(common.ROUTERS, Router(spec.router_hidden, cfg.router_activation, parent=None),
        spec.in_shape)
    if spec.shortcut == "projection":
      add("shortcuts", Projection(spec.out_features, spec.stride, parent=None), spec.in_shape)
    if spec.skip == "conv1x1":
      add("shortcuts", Projection(spec.out_features, spec.stride, relu=True, parent=None),
          spec.in_shape)
  return common.CostTables(macs_D, params_D, macs, params, FIXED_GROUPS)


# ------------------------------------------------------------------------------------------------
# The model.
# ------------------------------------------------------------------------------------------------


class CoDiNet(nn.Module):
  """CoDiNet routed ResNet.

  Call: `model.apply(variables, x, train=..., tau=1.0, threshold=None, drop_path_rate=0.0,
  strategy='dense', hard=False, rngs=..., mutable=...)` with x: [B, H, W, C] float.

  * train=True, hard=False (stage 1): Gumbel-relaxed decisions v (rng stream 'routing'), batch
    statistics (mutable=['batch_stats']), drop-path on residual branches (stream 'dropout') unless
    drop_path_rate is a Python 0 (a traced, ramped rate is fine).
  * train=True, hard=True (stage 2 fine-tuning, routers frozen by the trainer): deterministic hard
    decisions u = 1[v >= (threshold or 0.5)] in the forward pass, straight-through gradients;
    no 'routing' rng needed. `executed` = u.
  * train=False: deterministic, no rng. threshold=None runs every block (`executed` all ones,
    `weights` = the hard decisions at 0.5); threshold=T runs block k iff v_k >= T, skipping work
    as `strategy` says (see `dynroute_jax.dispatch`; 'dense' computes everything and masks):
    a name, a mapping `dict(name=..., **options)` or a `dispatch.Strategy` object.

  Returns a `ModelOutput` with S = D = number of blocks: weights (v in training, 0/1 otherwise),
  executed, path = v (noise-free outside stage 1), macs/params tables, site_shape=(D,).
  """
  config: CoDiNetConfig = CoDiNetConfig()

  model_name: ClassVar[str] = "codinet"
  router_param_pattern: ClassVar[str] = base.ROUTER_PARAM_PATTERN

  # -- static structure ---------------------------------------------------------------------------

  def block_specs(self, image_hw: tuple[int, int]) -> tuple[BlockSpec, ...]:
    """The D routed blocks, in routing order, for inputs of spatial size `image_hw`."""
    cfg = self.config
    return _block_specs(cfg.variant, cfg.width, cfg.router_hidden, cfg.skip_downsample,
                        cfg.scan_blocks, tuple(image_hw))

  def cost_tables(self, input_shape: Sequence[int] | None = None) -> common.CostTables:
    """Exact per-example costs for inputs of shape [H, W, C] or [B, H, W, C] (default: the
    configured image)."""
    cfg = self.config
    if input_shape is None:
      input_shape = (cfg.image_size, cfg.image_size, cfg.num_channels)
    return _cost_tables(cfg, tuple(input_shape)[-3:])

  # -- the RoutedModel contract (see `base.RoutedModel`) -------------------------------------------

  def routing_site_shape(self, image_hw: tuple[int, int]) -> tuple[int]:
    """(D,): one routed unit per block."""
    return (len(self.block_specs(image_hw)),)

  def unit_names(self) -> None:
    return None  # run/skip routing: a unit has no named choices.

  def routing_stats(self, out: ModelOutput) -> dict[str, Array]:
    """Mean run probability ('run_ratio') and the mean binary entropy of the decisions."""
    v_BxD = jnp.clip(out.weights, 1e-7, 1 - 1e-7)
    return {"run_ratio": jnp.mean(out.weights),
            "router_entropy": jnp.mean(-(v_BxD * jnp.log(v_BxD)
                                         + (1 - v_BxD) * jnp.log(1 - v_BxD)))}

  def train_call_kwargs(self, stage_cfg: Any) -> dict[str, Any]:
    """{'hard': True} for a fine-tuning stage on the hard decisions of inference."""
    return {"hard": True} if stage_cfg.hard_decisions else {}

  def selection_ratios(self, executed_NxS: np.ndarray) -> dict[str, Any]:
    """Run ratio per block [D] and overall."""
    mean_D = base.unit_means(executed_NxS)
    return {"run_ratio_per_block": np.round(mean_D, 6).tolist(), "run_ratio": float(mean_D.mean())}

  def constant_decisions(self, executed_NxS: np.ndarray) -> dict[str, Any]:
    """Routers (one per block) whose run/skip decision never changes."""
    constant_D = base.constant_units(executed_NxS)
    return {"constant_routers": int(constant_D.sum()), "num_routers": int(constant_D.size),
            "constant_router_indices": np.flatnonzero(constant_D).tolist()}

  def size_breakdown(self, macs_table_S: np.ndarray) -> dict[str, Any]:
    """Routed MACs per stage (the routing axis lists blocks stage by stage)."""
    table_D = np.asarray(macs_table_S, np.float64)
    bounds = np.cumsum([0, *stage_blocks(self.config.variant)])
    return {"macs_per_stage": [float(table_D[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])],
            "macs_per_branch_type": None}

  # -- forward ------------------------------------------------------------------------------------

  @nn.compact
  def __call__(self, x: Array, *, train: bool, tau: float | Array = 1.0,
               threshold: float | Array | None = None, drop_path_rate: float = 0.0,
               strategy: dispatch.StrategySpec = "dense", hard: bool = False,
               router_override: Array | None = None) -> ModelOutput:
    cfg = self.config
    common.check_images(x, cfg.num_channels, cfg.reduction_factor, cfg.reduction_reason)
    common.check_call(train=train, tau=tau, threshold=threshold, drop_path_rate=drop_path_rate,
                      strategy=strategy, threshold_in_training=True)
    if hard and not train:
      raise ValueError("hard=True is a training mode (stage-2 fine-tuning); inference already "
                       "uses hard decisions.")
    specs = self.block_specs(x.shape[1:3])
    common.check_router_override(router_override, train, len(specs),
                                 "one run probability per routed block")
    override_D = (jnp.zeros((len(specs),), jnp.float32) if router_override is None
                  else jnp.asarray(router_override, jnp.float32))
    args = (jnp.asarray(tau, jnp.float32),
            jnp.asarray(0.5 if threshold is None else threshold, jnp.float32),
            jnp.asarray(drop_path_rate, jnp.float32))
    thresholded = (not train) and threshold is not None
    static_zero_rate = isinstance(drop_path_rate, (int, float)) and drop_path_rate == 0.0
    mode = dict(train=train, hard=hard, thresholded=thresholded,
                drop_path=train and not static_zero_rate,
                strategy=common.resolve_strategy(strategy, x.shape[0], thresholded),
                overridden=router_override is not None)

    y = Stem(cfg.width, cfg.imagenet, name="stem")(x, train=train)
    decisions = []  # per site: (v, weight, executed, clean), each [B, blocks of the site].
    i = 0
    while i < len(specs):
      spec = specs[i]
      kwargs = dict(bottleneck=spec.bottleneck, features=spec.features,
                    out_features=spec.out_features, stride=spec.stride,
                    router_hidden=spec.router_hidden, router_activation=cfg.router_activation,
                    shortcut=spec.shortcut, skip=spec.skip, **mode)
      group = [s for s in specs[i:] if s.site == spec.site]
      if len(group) == 1:
        y, d = RoutedBlock(**kwargs, name=spec.site)(y, *args, override_D[i])
        decisions.append(tuple(a[:, None] for a in d))
      else:
        scan = nn.scan(ScanBody, variable_axes={"params": 0, "batch_stats": 0},
                       split_rngs={"params": True, "routing": True, "dropout": True},
                       in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=len(group),
                       unroll=common.scan_unroll(len(group)))
        y, d = scan(tuple(sorted(kwargs.items())), name=spec.site)(
            y, *args, override_D[i:i + len(group)])
        decisions.append(tuple(a.T for a in d))
      i += len(group)

    logits = Head(cfg.num_classes, name="head")(y)
    paths, weights, executed, cleans = zip(*decisions)
    weights_BxD = jnp.concatenate(weights, axis=1)
    executed_BxD = jnp.concatenate(executed, axis=1)
    v_BxD = jnp.concatenate(paths, axis=1)
    clean_BxD = jnp.concatenate(cleans, axis=1)
    return common.model_output(
        logits=logits, aux_logits=None, weights_BxS=weights_BxD,
        executed_BxS=executed_BxD, path_BxP=v_BxD, router_probs_BxS=clean_BxD,
        tables=self.cost_tables(x.shape), site_shape=(len(specs),))


def unscanned_to_scanned(params: Any, variant: str) -> Any:
  """Restructures a `scan_blocks=False` variable collection into the `scan_blocks=True` layout.

  Blocks 1..n-1 of stage s (`stage{s}_block{i}`) are stacked along a new leading axis under
  `stage{s}_blocks/block`. Works for 'params' and 'batch_stats' collections alike.
  """
  out = {k: v for k, v in params.items() if not re.fullmatch(r"stage\d+_block\d+", k)}
  for s, n in enumerate(stage_blocks(variant), start=1):
    out[f"stage{s}_block0"] = params[f"stage{s}_block0"]
    if n > 1:
      group = [params[f"stage{s}_block{i}"] for i in range(1, n)]
      out[f"stage{s}_blocks"] = {"block": jax.tree.map(lambda *a: jnp.stack(a), *group)}
  return out
