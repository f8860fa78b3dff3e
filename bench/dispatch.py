"""Micro-benchmark of the dispatcher on a ResNet-110-like stack of routed residual blocks.

Every residual block is routable (skipped = identity; the stride-2 blocks fall back to the option-A
shortcut). Weights are random, batch norm is folded into the convolutions (a bias), fp32. For each
batch size and run fraction p, exactly round(p * B) random examples run each block (at batch 1:
round(p * blocks) random blocks run), so the ideal speed-up over dense masking is 1 / p of the routed
MACs (computed from the masks and the block MACs, `dynroute_jax.costs`).

  efficiency = realised speed-up / ideal speed-up,  realised = dense time / strategy time.

Columns: ms and img/s are medians over rounds; speedup is the median over rounds of the same-round
ratio dense / strategy; eff = speedup / ideal; eff_best uses the fastest time of each instead (the
least disturbed run, useful on a shared machine); compile_s is lower + compile of the whole stack.
The p = 1.00 rows (every example runs every block, ideal 1) measure what a strategy's execution
pattern costs or gains by itself (e.g. convs on 32-row chunks against one 256-row conv): divide an
efficiency by the p = 1 one to isolate the skipping.

Identical blocks of a stage run under `lax.scan`, so each distinct block is compiled once per
strategy (a 'compact' switch still compiles one copy per bucket). Timings are interleaved across
strategies (round robin per repeat) and the median is reported, so ratios come from the same run.

  python bench/dispatch.py                          # full: batch 1, 32, 256; 18 blocks per stage
  python bench/dispatch.py --batch 32 --blocks 6 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynroute_jax import costs, dispatch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

WIDTHS = (16, 32, 64)
DN = ("NHWC", "HWIO", "NHWC")

# Row name -> the strategy it runs.
VARIANTS = {
    "dense": dispatch.Dense(),
    "batch_cond": dispatch.BatchCond(),
    "per_example": dispatch.PerExample(),
    "compact": dispatch.Compact(),
    "compact_geo": dispatch.Compact(spacing="geometric"),
    "compact_chain": dispatch.Compact(branching="cond_chain"),
    "chunk": dispatch.Chunk(),
    "chunk_notail": dispatch.Chunk(tail_levels=0),
    "chunk16": dispatch.Chunk(chunk=16, tail_levels=1),
    "chunk64": dispatch.Chunk(chunk=64, tail_levels=3),
    "chunk128": dispatch.Chunk(chunk=128, tail_levels=4),  # Tail grains of 8 rows.
}
DEFAULT_VARIANTS = ("dense", "batch_cond", "per_example", "compact", "compact_chain",
                    "chunk_notail", "chunk")


def conv(x, w, stride=1):
  return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=DN)


def block(p, x, stride=1):
  """relu(shortcut(x) + bn(conv(relu(bn(conv(x)))))) with BN folded into (w, b)."""
  h = jax.nn.relu(conv(x, p["w1"], stride) + p["b1"])
  h = conv(h, p["w2"]) + p["b2"]
  return jax.nn.relu(shortcut(x, h.shape[-1], stride) + h)


def shortcut(x, cout, stride):
  """Option A: subsample and zero-pad the channels."""
  if stride == 1 and x.shape[-1] == cout:
    return x
  x = x[:, ::stride, ::stride, :]
  pad = cout - x.shape[-1]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))


def init_block(key, cin, cout, scale=0.3):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  std1 = scale * (2.0 / (9 * cin)) ** 0.5
  std2 = scale * (2.0 / (9 * cout)) ** 0.5
  return {
      "w1": std1 * jax.random.normal(k1, (3, 3, cin, cout)),
      "b1": 0.01 * jax.random.normal(k2, (cout,)),
      "w2": std2 * jax.random.normal(k3, (3, 3, cout, cout)),
      "b2": 0.01 * jax.random.normal(k4, (cout,)),
  }


def init_stack(key, blocks):
  """Stage s: an optional stride-2 block (s > 0), then identical blocks stacked for lax.scan."""
  stages = []
  for s, c in enumerate(WIDTHS):
    key, kd, kr = jax.random.split(key, 3)
    down = init_block(kd, WIDTHS[s - 1], c) if s > 0 else None
    n_rest = blocks - (1 if s > 0 else 0)
    rest = jax.vmap(lambda k, c=c: init_block(k, c, c))(jax.random.split(kr, n_rest))
    stages.append({"down": down, "rest": rest})
  return stages


def forward(stages, x, masks, strategy: dispatch.Strategy):
  """masks: per stage {'down': [B] or None, 'rest': [n, B]} bool."""
  for s, (st, m) in enumerate(zip(stages, masks)):
    if st["down"] is not None:
      fb = shortcut(x, WIDTHS[s], 2)
      x = dispatch.select_apply(lambda v, p=st["down"]: block(p, v, 2), x, m["down"], fb,
                                strategy=strategy)

    def body(h, pm):
      p, run = pm
      return dispatch.select_apply(lambda v: block(p, v), h, run, None, strategy=strategy), None

    x, _ = lax.scan(body, x, (st["rest"], m["rest"]))
  return x


def block_macs(blocks, hw=32):
  """Per-example MACs of each block site, in forward order (stage, down first)."""
  out = []
  for s, c in enumerate(WIDTHS):
    size = hw // (2 ** s)
    if s > 0:
      p = init_block(jax.random.key(0), WIDTHS[s - 1], c)
      x = jax.ShapeDtypeStruct((1, size * 2, size * 2, WIDTHS[s - 1]), jnp.float32)
      out.append(costs.count_macs(lambda v: block(p, v, 2), x))
    p = init_block(jax.random.key(0), c, c)
    x = jax.ShapeDtypeStruct((1, size, size, c), jnp.float32)
    out.extend([costs.count_macs(lambda v: block(p, v), x)] * (blocks - (1 if s > 0 else 0)))
  return np.array(out, np.float64)


def make_masks(rng, batch, blocks, frac):
  """Exactly round(frac * B) running examples per block (B > 1), or per example over blocks (B = 1)."""
  n_sites = 3 * blocks
  m = np.zeros((n_sites, batch), bool)
  if batch == 1:
    m[rng.permutation(n_sites)[:round(frac * n_sites)], 0] = True
  else:
    k = round(frac * batch)
    for i in range(n_sites):
      m[i, rng.permutation(batch)[:k]] = True
  masks, i = [], 0
  for s in range(3):
    down = None
    if s > 0:
      down = jnp.asarray(m[i])
      i += 1
    n = blocks - (1 if s > 0 else 0)
    masks.append({"down": down, "rest": jnp.asarray(m[i:i + n])})
    i += n
  return masks, m


def run(args):
  key = jax.random.key(0)
  stages = init_stack(key, args.blocks)
  macs = block_macs(args.blocks)
  rng = np.random.default_rng(0)
  print(f"platform: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
        f"{_timing.host()}; {3 * args.blocks} routed blocks, {macs.sum() / 1e6:.1f}M MACs per "
        "example (all run)")
  print(f"auto -> {[dispatch.default_strategy(jax.default_backend(), b) for b in args.batch]} "
        f"for batch {args.batch}")
  header = (f"{'batch':>5} {'p':>5} {'strategy':<13} {'ms':>9} {'img/s':>9} {'speedup':>8} "
            f"{'ideal':>6} {'eff':>5} {'eff_best':>8} {'compile_s':>9}")
  print(header)
  for batch in args.batch:
    x = jax.random.normal(jax.random.key(1), (batch, 32, 32, WIDTHS[0]))
    fns, compile_s = {}, {}
    for name in args.variants:
      f = jax.jit(lambda x, masks, strategy=VARIANTS[name]: forward(stages, x, masks, strategy))
      masks0, _ = make_masks(rng, batch, args.blocks, 0.5)
      t0 = time.perf_counter()
      fns[name] = f.lower(x, masks0).compile()
      compile_s[name] = time.perf_counter() - t0
    for frac in args.fractions:
      masks, m = make_masks(rng, batch, args.blocks, frac)
      ideal = (macs.sum() * batch) / float((m.sum(axis=1) * macs).sum())
      ref = fns["dense"](x, masks) if "dense" in fns else None
      for name in args.variants:  # warm up and check
        y = jax.block_until_ready(fns[name](x, masks))
        if ref is not None:
          np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=2e-3, atol=2e-3)
      # One round = every variant once, in a shuffled order; same-round and best-of ratios.
      times = _timing.interleaved_times(
          {name: (lambda name=name: fns[name](x, masks)) for name in args.variants},
          args.repeats, rng, warmup=False)
      stats = _timing.speedups(times, "dense")
      for name in args.variants:
        med, paired, best = stats[name]
        print(f"{batch:>5} {frac:>5.2f} {name:<13} {med * 1e3:>9.2f} {batch / med:>9.1f} "
              f"{paired:>8.2f} {ideal:>6.2f} {paired / ideal:>5.2f} {best / ideal:>8.2f} "
              f"{compile_s[name]:>9.2f}", flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
  ap.add_argument("--blocks", type=int, default=18, help="blocks per stage (ResNet-110: 18)")
  ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                  choices=list(VARIANTS), help="'dense' is needed for speed-ups")
  run(ap.parse_args(argv))


if __name__ == "__main__":
  main()
