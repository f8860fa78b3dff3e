"""CPU train-step peer: our stage-1 train step against a PyTorch eager one of the same model.

Two models (`--model`):

  * `codinet_resnet32` (default): CoDiNet ResNet-32, `configs/codinet_cifar10.py:resnet32`.
  * `drnet_S`: the DRNet S supernet, `configs/drnet_cifar10.py:S`.

The JAX side is the trainer's own stage-1 step, built as `bench/train_step.py` builds it
(`routed_setup` on the config of its `CIFAR` table). Both steps run in one process, interleaved
round by round (one step each per round, after a warm-up), so machine noise hits both;
ratio = median over rounds of (JAX step time / PyTorch step time). Both use every core (XLA:CPU's
pool, torch's intra-op threads), so measure on an otherwise idle machine: with the cores busy,
torch's threads slow down many-fold (a DRNet S batch-4 step took 5-9 s with 2 threads and
0.7-0.8 s with 1 on 2 cores at load ~8).

CoDiNet ResNet-32. The PyTorch model mirrors the config layer for layer: conv3x3-BN-ReLU stem
(width 16), 3 stages of 5 basic blocks (option-A shortcuts on the downsampling blocks, the
shortcut as their skip path), a router per block (GAP, Linear(C_in), ReLU, Linear(2)), relaxed
run/skip mixing with logistic noise (y = v * block(x) + (1 - v) * skip(x)), on M = 2 augmented
views (random crop with 4-pixel padding, flip) of each image; losses: cross-entropy on both views,
a margin consistency term between the views' paths and a margin diversity term between images'
paths (weights 0.2 / 0.2, margins 0.2 / 0.5; their cost is negligible next to the convolutions);
SGD with momentum 0.9 and weight decay 1e-4.

DRNet S. The PyTorch supernet is built from our `DRNetConfig` (its `topology` from
`topology_seed` and the static per-cell plan, `DRNet.plan`), so it has the same cells, channels,
reductions and connections. Layer for layer, as `dynroute_jax/models/drnet.py` and `ops.py`:
stem conv3x3 -> 3C, BN; 5 cells (C = 15, 30, 60; cells 1 and 3 reduce), each with
preprocessing (ReLU-conv1x1-BN, or FactorizedReduce for x0 after a reduction), a RouterNet on the
raw inputs (x0 avg-pooled 2x2 when it has twice x1's resolution, concatenated with x1; twice
[conv1x1 -> W, BN, ReLU, depthwise 5x5/2, BN, ReLU], GAP, Linear -> 8 x 5 logits; W = C), and
8 connections of 5 branches each, in order:
  * max-pool 3x3 and avg-pool 3x3 (padding 1, padding not counted): no convs;
  * sep-conv 3x3 and 5x5 (DARTS, the separable pair twice: ReLU, depthwise kxk/s, conv1x1, BN,
    ReLU, depthwise kxk, conv1x1, BN): 4 convs, 2 BNs each;
  * skip: identity, or FactorizedReduce when the connection has stride 2 (ReLU, two offset
    conv1x1/2 of C/2 channels, concat, BN): 2 convs, 1 BN.
Gumbel-softmax weights at the stage's tau (3), drop-branch (0.7: each non-skip branch dropped per
(example, connection), survivors renormalised), drop-path on every non-identity branch output;
the DARTS auxiliary head on cell 3 (ReLU, avg-pool 5/3, conv1x1 -> 128, BN, ReLU, conv2x2 -> 768,
BN, ReLU, Linear); GAP and Linear classifier. Loss: cross-entropy + 0.4 x the auxiliary head's
(the resource loss has weight 0 in stage 1, so neither step has it). SGD with momentum 0.9,
weight decay 3e-4 on conv and linear weights only (our optimizer's `decay_mask`), lr 0.025.
Input: per image, random crop of the 4-pixel zero-padded image, flip, CIFAR-10 mean/std
normalisation, cutout 16 (centre uniform over the image, square clipped at the borders).
Before timing the script checks the port: the parameter count of every module (stem,
preprocessing, router, each branch of each connection, heads; 108 for S) must equal the JAX
state's, and the total without the auxiliary head must equal `drnet.size_report`'s (561,990 for
S; 995,408 with the head). `--check-forward` also loads our initial parameters into the port and
compares a train-mode forward pass (batch-statistics BN) without randomness (no Gumbel noise,
drop-branch or drop-path): logits and auxiliary logits must agree to 1e-3 (7e-6 for S).

Deliberate differences of the DRNet S peer (none changes the model's layers):
  * AutoAugment: our step applies the CIFAR-10 policy on device, inside the step (vmapped, so
    every image computes all 14 ops and selects). The PyTorch step omits it: a PyTorch user runs
    AutoAugment on PIL images in the DataLoader's workers, outside the train step, and a tensor
    port is a separate project. The JAX step therefore does strictly more work than the PyTorch
    one, so any bias of the ratio is against JAX. By operation count the share is small (28
    elementwise or gather ops on a 32x32x3 image, against ~85M MACs forward, ~3x that with the
    backward), but it is not measured: `--no-autoaugment` turns it off on the JAX side (the two
    steps then do the same work) to measure it.
  * Drop-path rate: ours rises linearly from 0 over the stage (a traced rate, so the op runs from
    the first step); the PyTorch step uses the stage's final rate, 0.1. The cost of drop-path
    does not depend on its rate.
  * Learning rate: ours follows the cosine schedule, the PyTorch step keeps the initial 0.025
    (a scalar per step either way).
  * Bookkeeping our step does and the PyTorch step does not: the finite check on loss and
    gradient norm (the update is applied only if both are finite), the noise-free router
    softmax and the step's metrics (expected MACs, branch ratios, router entropy, saturation).
    All are O(batch x 200 routing weights) or one pass over the parameters.
  * Depthwise convolutions: ours run on CPU as dense convs of a diagonal C x C kernel
    (`models.common.depthwise_conv`, faster on XLA:CPU than its grouped conv despite C times
    the multiply-adds); the PyTorch model uses grouped convs (groups = C), what a PyTorch user
    writes. Same parameters, same result.
  * Initialisation: Flax's (LeCun normal kernels) against torch's defaults; it does not change
    the step's cost.

torch is a bench-only dependency (`pip install -e ".[bench]"`, i.e. torch==2.13.0, CPU build); no
test imports it.

  python bench/peer_torch.py                 # CoDiNet ResNet-32, batch 32 (x 2 views), 10 rounds
  python bench/peer_torch.py --batch 128 --rounds 5
  python bench/peer_torch.py --model drnet_S --batch 32 --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import flax  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

import _timing  # noqa: E402  (bench/_timing.py)
import train_step as ts  # noqa: E402  (bench/train_step.py)
from dynroute_jax import input_pipeline, models, sharding, train  # noqa: E402
from dynroute_jax.models import drnet  # noqa: E402

try:
  import torch  # noqa: E402
  from torch import nn  # noqa: E402
  import torch.nn.functional as F  # noqa: E402
except ImportError:  # pragma: no cover - bench-only dependency
  sys.exit("bench/peer_torch.py needs PyTorch: pip install torch==2.13.0 (CPU build).")


# ------------------------------------------------------------------------------------------------
# CoDiNet ResNet-32.


class Block(nn.Module):
  """Basic block with its run/skip router; option-A shortcut when the shape changes."""

  def __init__(self, c_in: int, c_out: int, stride: int):
    super().__init__()
    self.c_in, self.c_out, self.stride = c_in, c_out, stride
    self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(c_out)
    self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(c_out)
    self.fc1, self.fc2 = nn.Linear(c_in, c_in), nn.Linear(c_in, 2)

  def shortcut(self, x):
    if self.stride == 1 and self.c_in == self.c_out:
      return x
    x = x[:, :, ::self.stride, ::self.stride]
    pad = (self.c_out - self.c_in) // 2
    return F.pad(x, (0, 0, 0, 0, pad, self.c_out - self.c_in - pad))

  def forward(self, x, tau: float = 1.0):
    logits = self.fc2(F.relu(self.fc1(x.mean((2, 3)))))
    u = torch.rand_like(logits[:, 0]).clamp(1e-6, 1 - 1e-6)
    v = torch.sigmoid((logits[:, 1] - logits[:, 0] + torch.log(u) - torch.log1p(-u)) / tau)
    sc = self.shortcut(x)
    run = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + sc)
    skipped = x if sc is x else F.relu(sc)
    w = v[:, None, None, None]
    return w * run + (1 - w) * skipped, v


class RoutedResNet(nn.Module):
  """CIFAR routed ResNet-(6n+2); returns (logits [B, N], paths [B, 3n])."""

  def __init__(self, n: int = 5, width: int = 16, num_classes: int = 10):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                              nn.ReLU())
    blocks, c_in = [], width
    for s in range(3):
      for i in range(n):
        c_out = width * 2 ** s
        blocks.append(Block(c_in, c_out, 2 if (s > 0 and i == 0) else 1))
        c_in = c_out
    self.blocks = nn.ModuleList(blocks)
    self.fc = nn.Linear(c_in, num_classes)

  def forward(self, x):
    paths = []
    x = self.stem(x)
    for b in self.blocks:
      x, v = b(x)
      paths.append(v)
    return self.fc(x.mean((2, 3))), torch.stack(paths, 1)


def augment(images_u8: torch.Tensor, pad: int = 4) -> torch.Tensor:
  """Random crop with zero padding and random flip, per image (NCHW float in [0, 1])."""
  x = images_u8.permute(0, 3, 1, 2).float() / 255.0
  b, _, h, w = x.shape
  xp = F.pad(x, (pad, pad, pad, pad))
  dy, dx = torch.randint(0, 2 * pad + 1, (2, b))
  rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(b, 3, h, w + 2 * pad)
  x = xp.gather(2, rows)
  cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(b, 3, h, w)
  x = x.gather(3, cols)
  flip = torch.rand(b) < 0.5
  return torch.where(flip[:, None, None, None], x.flip(3), x)


def torch_step(model, opt, images_u8, labels, views: int = 2):
  x = torch.cat([augment(images_u8) for _ in range(views)])
  logits, paths = model(x)
  loss = F.cross_entropy(logits, labels.repeat(views))
  p = paths.view(views, -1, paths.shape[-1])
  consistency = F.relu((p[0] - p[1]).norm(dim=-1) - 0.2).mean()
  d = torch.cdist(p[0], p[0])
  off_diag = ~torch.eye(d.shape[0], dtype=torch.bool)
  diversity = F.relu(0.5 - d[off_diag]).mean()
  loss = loss + 0.2 * consistency + 0.2 * diversity
  opt.zero_grad(set_to_none=True)
  loss.backward()
  opt.step()
  return float(loss.detach())


# ------------------------------------------------------------------------------------------------
# DRNet: the branches (DARTS ops, BN placement as in `dynroute_jax/models/ops.py`).


def relu_conv_bn(c_in: int, c_out: int) -> nn.Sequential:
  """Cell preprocessing: ReLU, conv1x1, BN (`ops.ReLUConvBN` with k = 1)."""
  return nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))


def sep_conv(c: int, k: int, stride: int) -> nn.Sequential:
  """DARTS separable conv, the pair applied twice; only the first depthwise conv is strided."""
  p = k // 2
  return nn.Sequential(
      nn.ReLU(), nn.Conv2d(c, c, k, stride, p, groups=c, bias=False),
      nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c),
      nn.ReLU(), nn.Conv2d(c, c, k, 1, p, groups=c, bias=False),
      nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))


class FactorizedReduce(nn.Module):
  """ReLU; conv1x1/2 of x and of x shifted by one pixel (C // 2 and the rest); concat; BN."""

  def __init__(self, c_in: int, c_out: int):
    super().__init__()
    self.conv_a = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
    self.conv_b = nn.Conv2d(c_in, c_out - c_out // 2, 1, 2, bias=False)
    self.bn = nn.BatchNorm2d(c_out)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(x)
    return self.bn(torch.cat([self.conv_a(x), self.conv_b(x[:, :, 1:, 1:])], 1))


def make_branch(kind: str, c: int, stride: int) -> nn.Module:
  """The branch `kind` of a connection with `c` channels (`drnet_layers.make_branch`)."""
  if kind == "max_pool_3x3":
    return nn.MaxPool2d(3, stride, 1)
  if kind == "avg_pool_3x3":
    return nn.AvgPool2d(3, stride, 1, count_include_pad=False)
  if kind in ("sep_conv_3x3", "sep_conv_5x5"):
    return sep_conv(c, 3 if kind == "sep_conv_3x3" else 5, stride)
  if kind == "skip_connect":
    return nn.Identity() if stride == 1 else FactorizedReduce(c, c)
  raise ValueError(f"unknown branch {kind!r}")


def drop_path(x: torch.Tensor, rate: float) -> torch.Tensor:
  """Zeroes whole examples with probability `rate`, scales the rest by 1 / (1 - rate)."""
  keep = 1.0 - rate
  mask = torch.rand((x.shape[0], 1, 1, 1)) < keep
  return torch.where(mask, x / keep, torch.zeros((), dtype=x.dtype))


class Connection(nn.Module):
  """The five branches of a connection (named as `drnet.BRANCHES`), mixed by per-example weights."""

  def __init__(self, c: int, stride: int):
    super().__init__()
    for kind in drnet.BRANCHES:
      self.add_module(kind, make_branch(kind, c, stride))

  def forward(self, x: torch.Tensor, w_BxK: torch.Tensor, drop_path_rate: float) -> torch.Tensor:
    out = None
    for b, branch in enumerate(self.children()):
      h = branch(x)
      if drop_path_rate > 0 and not isinstance(branch, nn.Identity):
        h = drop_path(h, drop_path_rate)
      term = w_BxK[:, b, None, None, None] * h
      out = term if out is None else out + term
    return out


# ------------------------------------------------------------------------------------------------
# DRNet: routing, the cell and the network.


class RouterNet(nn.Module):
  """Two blocks of [conv1x1 -> width, BN, ReLU, depthwise 5x5/2, BN, ReLU], GAP, Linear."""

  def __init__(self, c_in: int, width: int, num_connections: int):
    super().__init__()
    layers = []
    for i in range(2):
      layers += [nn.Conv2d(c_in if i == 0 else width, width, 1, bias=False),
                 nn.BatchNorm2d(width), nn.ReLU(),
                 nn.Conv2d(width, width, 5, 2, 2, groups=width, bias=False),
                 nn.BatchNorm2d(width), nn.ReLU()]
    self.body = nn.Sequential(*layers)
    self.fc = nn.Linear(width, num_connections * drnet.NUM_BRANCHES)
    self.num_connections = num_connections

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    logits = self.fc(self.body(x).mean((2, 3)))
    return logits.view(x.shape[0], self.num_connections, drnet.NUM_BRANCHES)


def gumbel_softmax(logits: torch.Tensor, tau: float) -> torch.Tensor:
  """softmax((logits + g) / tau), g ~ Gumbel(0, 1) (`routing.gumbel_softmax`)."""
  u = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)
  return F.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)


def drop_branch(w: torch.Tensor, rate: float) -> torch.Tensor:
  """Drops each non-skip branch with probability `rate`; renormalises the survivors."""
  keep = torch.rand_like(w) >= rate
  keep[..., drnet.SKIP_INDEX] = True
  kept = torch.where(keep, w, torch.zeros((), dtype=w.dtype))
  total = kept.sum(-1, keepdim=True)
  return torch.where(total > 0, kept / total.clamp_min(torch.finfo(w.dtype).tiny), w)


@dataclasses.dataclass(frozen=True)
class Routing:
  """The stage's routing hyperparameters a forward pass needs; `noise` False: plain softmax."""
  tau: float
  drop_branch_rate: float
  drop_path_rate: float
  noise: bool = True


class Cell(nn.Module):
  """One DRNet cell with its RouterNet, built from the JAX model's static `CellPlan`."""

  def __init__(self, plan: drnet.CellPlan, cfg: drnet.DRNetConfig):
    super().__init__()
    c, (h0, _, c0), (h1, _, c1) = plan.channels, plan.in0, plan.in1
    self.pool = h0 // h1  # the router pools raw x0 to x1's resolution.
    self.preprocess0 = FactorizedReduce(c0, c) if self.pool == 2 else relu_conv_bn(c0, c)
    self.preprocess1 = relu_conv_bn(c1, c)
    if cfg.router_input != "raw" or not cfg.use_router:
      raise ValueError("the peer ports the RouterNet on raw inputs only")
    self.router = RouterNet(plan.router_in[2], cfg.router_width(c), cfg.num_connections)
    self.topology = cfg.topology
    for i, (_, stride) in enumerate(plan.connections):
      self.add_module(f"conn_{i}", Connection(c, stride))

  def forward(self, s0: torch.Tensor, s1: torch.Tensor, r: Routing) -> torch.Tensor:
    states = [self.preprocess0(s0), self.preprocess1(s1)]
    raw0 = F.avg_pool2d(s0, self.pool) if self.pool > 1 else s0
    logits = self.router(torch.cat([raw0, s1], 1))
    w = gumbel_softmax(logits, r.tau) if r.noise else F.softmax(logits / r.tau, dim=-1)
    if r.drop_branch_rate > 0:
      w = drop_branch(w, r.drop_branch_rate)
    for node, srcs in enumerate(self.topology):
      total = None
      for j, src in enumerate(srcs):
        c = 2 * node + j
        y = getattr(self, f"conn_{c}")(states[src], w[:, c], r.drop_path_rate)
        total = y if total is None else total + y
      states.append(total)
    return torch.cat(states[2:], 1)


def aux_head(c_in: int, hw: int, num_classes: int, pool_stride: int) -> nn.Sequential:
  """DARTS auxiliary head on a `hw` x `hw` map (`drnet_layers.AuxHead`)."""
  win = min(5, hw)
  pooled = (hw - win) // pool_stride + 1
  return nn.Sequential(
      nn.ReLU(), nn.AvgPool2d(win, pool_stride), nn.Conv2d(c_in, 128, 1, bias=False),
      nn.BatchNorm2d(128), nn.ReLU(), nn.Conv2d(128, 768, pooled, bias=False),
      nn.BatchNorm2d(768), nn.ReLU(), nn.Flatten(), nn.Linear(768, num_classes))


class DRNetTorch(nn.Module):
  """The DRNet supernet (CIFAR stem); module names follow the Flax model's ('cell_0', ...)."""

  def __init__(self, cfg: drnet.DRNetConfig, plans: tuple[drnet.CellPlan, ...]):
    super().__init__()
    if cfg.stem != "cifar" or not cfg.aux_head:
      raise ValueError("the peer ports the CIFAR stem with the auxiliary head only")
    stem_c = cfg.stem_multiplier * cfg.init_channels
    self.stem = nn.Sequential(nn.Conv2d(cfg.num_channels, stem_c, 3, 1, 1, bias=False),
                              nn.BatchNorm2d(stem_c))
    for p in plans:
      self.add_module(f"cell_{p.index}", Cell(p, cfg))
    self.num_cells, self.aux_cell = cfg.num_cells, cfg.aux_cell
    aux_in = plans[cfg.aux_cell].out
    self.aux_head = aux_head(aux_in[2], aux_in[0], cfg.num_classes, cfg.aux_pool_stride)
    self.classifier = nn.Linear(plans[-1].out[2], cfg.num_classes)

  def forward(self, x: torch.Tensor, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Training forward pass: (logits [B, N], auxiliary logits [B, N])."""
    s0 = s1 = self.stem(x)
    aux = None
    for i in range(self.num_cells):
      s0, s1 = s1, getattr(self, f"cell_{i}")(s0, s1, r)
      if i == self.aux_cell:
        aux = self.aux_head(s1)
    return self.classifier(s1.mean((2, 3))), aux


# ------------------------------------------------------------------------------------------------
# DRNet: input, step and the port check.


def cutout(x: torch.Tensor, size: int) -> torch.Tensor:
  """DARTS cutout per image: zeroes a size x size square (centre uniform, clipped at borders)."""
  b, _, h, w = x.shape

  def band(n: int) -> torch.Tensor:  # [B, n]: the rows (or columns) inside each image's square.
    lo = torch.randint(0, n, (b, 1)) - size // 2
    at = torch.arange(n)[None]
    return (at >= lo) & (at < lo + size)

  inside = band(h)[:, :, None] & band(w)[:, None, :]
  return x.masked_fill(inside[:, None], 0.0)


def drnet_inputs(images_u8: torch.Tensor, data_cfg: ml_collections.ConfigDict) -> torch.Tensor:
  """Crop and flip (`augment`), mean/std normalisation, cutout: our input step but AutoAugment."""
  mean, std = (torch.from_numpy(a)[:, None, None] for a in input_pipeline.mean_std(data_cfg.name))
  x = (augment(images_u8, data_cfg.crop_padding) - mean) / std
  return cutout(x, data_cfg.cutout) if data_cfg.cutout > 0 else x


def drnet_torch_step(model: DRNetTorch, opt: torch.optim.Optimizer, images_u8: torch.Tensor,
                     labels: torch.Tensor, data_cfg: ml_collections.ConfigDict,
                     routing_hp: Routing, aux_weight: float) -> float:
  """One stage-1 step: augment, forward, CE + aux_weight x auxiliary CE, backward, SGD."""
  logits, aux = model(drnet_inputs(images_u8, data_cfg), routing_hp)
  loss = F.cross_entropy(logits, labels) + aux_weight * F.cross_entropy(aux, labels)
  opt.zero_grad(set_to_none=True)
  loss.backward()
  opt.step()
  return float(loss.detach())


def module_key(path: tuple[str, ...]) -> str:
  """The module a parameter counts towards: a branch of a connection, a cell part, or a head."""
  if path[0].startswith("cell_"):
    return "/".join(path[:3] if path[1].startswith("conn_") else path[:2])
  return path[0]


def param_sizes(named: Mapping[tuple[str, ...], int]) -> dict[str, int]:
  """Parameter counts per `module_key`."""
  sizes: dict[str, int] = {}
  for path, n in named.items():
    sizes[module_key(path)] = sizes.get(module_key(path), 0) + n
  return sizes


def check_port(model: DRNetTorch, jax_params: Any, jax_model: drnet.DRNet) -> None:
  """Prints both models' parameter counts; exits if any module's count differs."""
  ours = param_sizes({k: math.prod(v.shape)
                      for k, v in flax.traverse_util.flatten_dict(jax_params).items()})
  theirs = param_sizes({tuple(k.split(".")): v.numel() for k, v in model.named_parameters()})
  bad = [f"{k}: JAX {ours.get(k)} PyTorch {theirs.get(k)}"
         for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
  total = lambda d, aux: sum(v for k, v in d.items() if aux or k != "aux_head")
  report = drnet.size_report(jax_model)["params"]
  print(f"parameters: JAX {total(ours, True):,} ({total(ours, False):,} without the aux head; "
        f"size_report {report['total']:,} + aux {report['aux_head']:,}), PyTorch "
        f"{total(theirs, True):,} ({total(theirs, False):,} without); {len(ours)} modules "
        f"compared, {len(bad)} differ", flush=True)
  if bad or total(ours, False) != report["total"]:
    sys.exit("the PyTorch port does not match the JAX model:\n  " + "\n  ".join(bad))


def copy_params(model: DRNetTorch, jax_params: Any) -> None:
  """Loads our parameters into the port. Within a module (`module_key`) the Flax layers are
  numbered in call order (Conv_i, BatchNorm_i, Dense_0), the order the port registers them in."""
  layers: dict[tuple[str, str], dict[str, np.ndarray]] = {}
  for path, a in flax.traverse_util.flatten_dict(jax.device_get(jax_params)).items():
    layers.setdefault((module_key(path), path[-2]), {})[path[-1]] = np.array(a)
  seen: dict[tuple[str, type], int] = {}
  kinds = {nn.Conv2d: "Conv", nn.BatchNorm2d: "BatchNorm", nn.Linear: "Dense"}
  with torch.no_grad():
    for name, mod in model.named_modules():
      if type(mod) not in kinds:
        continue
      key = module_key(tuple(name.split(".")))
      i = seen[key, type(mod)] = seen.get((key, type(mod)), -1) + 1
      v = layers[key, f"{kinds[type(mod)]}_{i}"]
      if isinstance(mod, nn.Conv2d):  # HWIO (depthwise: H, W, 1, C) -> OIHW.
        mod.weight.copy_(torch.from_numpy(v["kernel"].transpose(3, 2, 0, 1)))
      elif isinstance(mod, nn.BatchNorm2d):
        mod.weight.copy_(torch.from_numpy(v["scale"]))
        mod.bias.copy_(torch.from_numpy(v["bias"]))
      else:
        mod.weight.copy_(torch.from_numpy(v["kernel"].T))
        mod.bias.copy_(torch.from_numpy(v["bias"]))


def check_forward(model: DRNetTorch, ours: JaxSide, tau: float) -> None:
  """With our parameters and no randomness (no Gumbel noise, drop-branch or drop-path), our
  train-mode forward and the port's must give the same logits; exits otherwise."""
  copy_params(model, ours.state.params)
  quiet = ours.config.model.copy_and_resolve_references()
  quiet.gumbel, quiet.drop_branch_rate = False, 0.0
  jax_model, dc = models.build_model(quiet), ours.config.data
  x = np.random.default_rng(1).normal(
      size=(4, dc.image_size, dc.image_size, dc.num_channels)).astype(np.float32)
  variables = {"params": ours.state.params, "batch_stats": ours.state.batch_stats}
  out, _ = jax.jit(lambda v, x: jax_model.apply(v, x, train=True, tau=tau, mutable=["batch_stats"])
                   )(variables, x)
  with torch.no_grad():
    logits, aux = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), Routing(tau, 0.0, 0.0, False))
  diff = max(np.abs(logits.numpy() - np.asarray(out.logits)).max(),
             np.abs(aux.numpy() - np.asarray(out.aux_logits)).max())
  scale = float(np.abs(np.asarray(out.logits)).max())
  print(f"forward check: max |JAX - PyTorch| over logits and aux logits {diff:.2e} "
        f"(logits up to {scale:.2f})", flush=True)
  if not diff <= 1e-3 * max(1.0, scale):
    sys.exit("the PyTorch port computes another function than the JAX model")


# ------------------------------------------------------------------------------------------------
# The peers and the interleaved timing.


@dataclasses.dataclass(frozen=True)
class JaxSide:
  """What a PyTorch peer is built from: the run's config, the stage, our model and its state."""
  config: ml_collections.ConfigDict
  stage: train.Stage
  model: Any
  state: train.TrainState


@dataclasses.dataclass(frozen=True)
class TorchPeer:
  """A built PyTorch side: its one-step function and the title line's model description."""
  step: Callable[[], float]
  title: str


def codinet_peer(ours: JaxSide, images: np.ndarray, labels: np.ndarray,
                 check: bool = False) -> TorchPeer:
  """The routed ResNet-32 on 2 views; lr 0.1, momentum 0.9, weight decay 1e-4 on every parameter."""
  del ours, check
  model = RoutedResNet()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  t_images, t_labels = torch.from_numpy(images), torch.from_numpy(labels).long()
  return TorchPeer(lambda: torch_step(model, opt, t_images, t_labels),
                   f"codinet resnet32, batch {len(images)} x 2 views")


def drnet_peer(ours: JaxSide, images: np.ndarray, labels: np.ndarray,
               check: bool = False) -> TorchPeer:
  """The DRNet supernet with the config's stage-1 hyperparameters; checks the port first
  (parameter counts always, the forward pass with `check`)."""
  cfg, dc, tc, sc = ours.model.config, ours.config.data, ours.config.train, ours.stage.cfg
  model = DRNetTorch(cfg, ours.model.plan((dc.image_size, dc.image_size, dc.num_channels)))
  check_port(model, ours.state.params, ours.model)
  if check:
    check_forward(model, ours, sc.tau_init)
  # Weight decay on kernels only (conv and linear weights), as our optimizer's decay_mask.
  decay = [p for p in model.parameters() if p.ndim > 1]
  rest = [p for p in model.parameters() if p.ndim <= 1]
  opt = torch.optim.SGD([{"params": decay, "weight_decay": tc.weight_decay},
                         {"params": rest, "weight_decay": 0.0}], lr=sc.lr, momentum=tc.momentum)
  hp = Routing(sc.tau_init, cfg.drop_branch_rate, sc.drop_path_rate)
  t_images, t_labels = torch.from_numpy(images), torch.from_numpy(labels).long()
  aa = "JAX with AutoAugment, PyTorch without" if dc.autoaugment else "neither with AutoAugment"
  return TorchPeer(lambda: drnet_torch_step(model, opt, t_images, t_labels, dc, hp, sc.aux_weight),
                   f"drnet S stage 1, batch {len(images)} ({aa})")


PEERS = {"codinet_resnet32": codinet_peer, "drnet_S": drnet_peer}


def time_rounds(jax_fn: Callable[..., Any], state: train.TrainState, batch: Any, key: jax.Array,
                torch_fn: Callable[[], float], rounds: int
                ) -> tuple[list[float], list[float], list[float]]:
  """One warm-up step each, then `rounds` interleaved rounds: (JAX s, PyTorch s, ratios)."""

  def run_jax(state):
    t0 = time.perf_counter()
    state, metrics = jax_fn(state, batch, key)
    jax.block_until_ready((state, metrics))
    return state, time.perf_counter() - t0

  def run_torch():
    t0 = time.perf_counter()
    torch_fn()
    return time.perf_counter() - t0

  state, _ = run_jax(state)
  run_torch()
  jt, tt, ratios = [], [], []
  for _ in range(rounds):
    state, a = run_jax(state)
    b = run_torch()
    jt.append(a); tt.append(b); ratios.append(a / b)
  return jt, tt, ratios


def print_results(title: str, rounds: int, compile_s: float, jt: list[float], tt: list[float],
                  ratios: list[float]) -> None:
  """The title line, the table of step times and the ratio line."""
  q = lambda xs: (min(xs), max(xs))
  print(f"{title}, {rounds} rounds; JAX compile {compile_s:.1f} s", flush=True)
  print("| step | median ms | min-max ms |\n|---|---|---|")
  print(f"| JAX (ours) | {1e3 * statistics.median(jt):.0f} | "
        f"{1e3 * q(jt)[0]:.0f}-{1e3 * q(jt)[1]:.0f} |")
  print(f"| PyTorch eager | {1e3 * statistics.median(tt):.0f} | "
        f"{1e3 * q(tt)[0]:.0f}-{1e3 * q(tt)[1]:.0f} |")
  print(f"ratio JAX / PyTorch: median {statistics.median(ratios):.2f} "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f}); target <= 3; "
        f"load average {_timing.load_average():.2f} at end")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="codinet_resnet32", choices=tuple(PEERS))
  parser.add_argument("--batch", type=int, default=32,
                      help="source images per step (x 2 views for CoDiNet)")
  parser.add_argument("--rounds", type=int, default=10, help="timed interleaved rounds")
  parser.add_argument("--no-autoaugment", action="store_true",
                      help="drnet_S: the JAX step without AutoAugment (the PyTorch step has none)")
  parser.add_argument("--check-forward", action="store_true",
                      help="drnet_S: before timing, also check the port's forward pass against "
                           "ours with our parameters (compiles our forward pass too)")
  args = parser.parse_args(argv)
  load = _timing.load_average()
  print(f"load average {load:.2f} at start (measure with it below ~1); torch {torch.__version__} "
        f"threads {torch.get_num_threads()}; jax {jax.__version__} {jax.default_backend()}; "
        f"{_timing.host()}",
        flush=True)

  file, arg, num_train = ts.CIFAR[args.model]
  config = ts.load_config(file, arg)
  config.train.global_batch_size = args.batch
  if args.no_autoaugment:
    config.data.autoaugment = False
  mesh = sharding.make_mesh(config.mesh)
  stage = train.plan_stages(config, num_train)[0]
  dc = config.data
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch, dc.image_size, dc.image_size, dc.num_channels),
                        dtype=np.uint8)
  labels = rng.integers(0, dc.num_classes, (args.batch,), dtype=np.int32)
  batch = sharding.make_global_batch({"image": images, "label": labels}, mesh)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          batch)
  key = jax.device_put(jax.random.key(0), sharding.replicated(mesh))
  jax_fn, compile_s, state = ts.routed_setup(config, stage, mesh, abstract, key)

  ours = JaxSide(config, stage, models.build_model(config.model), state)
  peer = PEERS[args.model](ours, images, labels, args.check_forward)
  jt, tt, ratios = time_rounds(jax_fn, state, batch, key, peer.step, args.rounds)
  print_results(peer.title, args.rounds, compile_s, jt, tt, ratios)


if __name__ == "__main__":
  main()
