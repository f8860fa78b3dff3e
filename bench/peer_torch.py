"""CPU train-step peer: our CoDiNet ResNet-32 step against a PyTorch eager one of the same model.

The PyTorch model mirrors `configs/codinet_cifar10.py:resnet32` layer for layer: conv3x3-BN-ReLU
stem (width 16), 3 stages of 5 basic blocks (option-A shortcuts on the downsampling blocks, the
shortcut as their skip path), a router per block (GAP, Linear(C_in), ReLU, Linear(2)), relaxed
run/skip mixing with logistic noise (y = v * block(x) + (1 - v) * skip(x)), on M = 2 augmented
views (random crop with 4-pixel padding, flip) of each image; losses: cross-entropy on both views,
a margin consistency term between the views' paths and a margin diversity term between images'
paths (weights 0.2 / 0.2, margins 0.2 / 0.5; their cost is negligible next to the convolutions);
SGD with momentum 0.9 and weight decay 1e-4.

The JAX side is the trainer's own stage-1 step (`bench/train_step.py`'s `routed_setup`). Both
steps run in one process, interleaved round by round (one step each per round, after a warm-up),
so machine noise hits both; ratio = median over rounds of (JAX step time / PyTorch step time).
Both use every core (XLA:CPU's pool, torch's intra-op threads).

torch is a bench-only dependency (`pip install -e ".[bench]"`, i.e. torch==2.13.0, CPU build); no
test imports it.

  python bench/peer_torch.py                 # batch 32 (x 2 views), 10 rounds
  python bench/peer_torch.py --batch 128 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import train_step as ts  # noqa: E402  (bench/train_step.py)
from dynroute_jax import sharding, train  # noqa: E402

try:
  import torch  # noqa: E402
  from torch import nn  # noqa: E402
  import torch.nn.functional as F  # noqa: E402
except ImportError:  # pragma: no cover - bench-only dependency
  sys.exit("bench/peer_torch.py needs PyTorch: pip install torch==2.13.0 (CPU build).")


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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=32, help="source images per step (x 2 views)")
  parser.add_argument("--rounds", type=int, default=10, help="timed interleaved rounds")
  args = parser.parse_args(argv)
  load = os.getloadavg()[0]
  print(f"load average {load:.2f} at start (measure with it below ~1); torch {torch.__version__} "
        f"threads {torch.get_num_threads()}; jax {jax.__version__} {jax.default_backend()}",
        flush=True)

  config = ts.load_config("codinet_cifar10", "resnet32")
  config.train.global_batch_size = args.batch
  mesh = sharding.make_mesh(config.mesh)
  stage = train.plan_stages(config, 50_000)[0]
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (args.batch,), dtype=np.int32)
  batch = sharding.make_global_batch({"image": images, "label": labels}, mesh)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          batch)
  key = jax.device_put(jax.random.key(0), sharding.replicated(mesh))
  jax_fn, compile_s, state = ts.routed_setup(config, stage, mesh, abstract, key)

  model = RoutedResNet()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  t_images, t_labels = torch.from_numpy(images), torch.from_numpy(labels).long()

  def run_jax(state):
    t0 = time.perf_counter()
    state, metrics = jax_fn(state, batch, key)
    jax.block_until_ready((state, metrics))
    return state, time.perf_counter() - t0

  def run_torch():
    t0 = time.perf_counter()
    torch_step(model, opt, t_images, t_labels)
    return time.perf_counter() - t0

  state, _ = run_jax(state)
  run_torch()
  jt, tt, ratios = [], [], []
  for _ in range(args.rounds):
    state, a = run_jax(state)
    b = run_torch()
    jt.append(a); tt.append(b); ratios.append(a / b)
  q = lambda xs: (min(xs), max(xs))
  print(f"codinet resnet32, batch {args.batch} x 2 views, {args.rounds} rounds; "
        f"JAX compile {compile_s:.1f} s", flush=True)
  print("| step | median ms | min-max ms |\n|---|---|---|")
  print(f"| JAX (ours) | {1e3 * statistics.median(jt):.0f} | "
        f"{1e3 * q(jt)[0]:.0f}-{1e3 * q(jt)[1]:.0f} |")
  print(f"| PyTorch eager | {1e3 * statistics.median(tt):.0f} | "
        f"{1e3 * q(tt)[0]:.0f}-{1e3 * q(tt)[1]:.0f} |")
  print(f"ratio JAX / PyTorch: median {statistics.median(ratios):.2f} "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f}); target <= 3; "
        f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
  main()
