"""Max pooling on XLA:CPU: XLA's reduce-window pool against `ops.max_pool_3x3`, and their match.

For each map and stride, the jitted forward and the jitted gradient of sum(sin(pool(x))) are
timed (median of 30 calls after a warm-up) with the compile time of the gradient; then values and
gradients are compared on small-integer maps, where windows tie (integer weights keep the sums of
gradients exact, so the same winners give bitwise the same gradient).

  python bench/max_pool.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dynroute_jax.models import ops  # noqa: E402

import _timing  # noqa: E402  (bench/_timing.py)

SHAPES = [(64, 8, 8, 24), (64, 4, 4, 48), (64, 32, 32, 16), (32, 16, 16, 32)]


def xla_pool(x, stride):
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)))


def our_pool(x, stride):
  return ops.max_pool_3x3(x, stride)


def median_ms(fn, *args, n: int = 30) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def main() -> None:
  print(f"load average {_timing.load_average():.2f} at start; jax {jax.__version__} "
        f"{jax.default_backend()}; {_timing.host()}")
  print("| map, stride | XLA fwd / fwd+bwd ms | ours fwd / fwd+bwd ms | compile s XLA / ours |")
  print("|---|---|---|---|")
  for shape in SHAPES:
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    for stride in (1, 2):
      cells = []
      for pool in (xla_pool, our_pool):
        fwd = jax.jit(lambda x, pool=pool: pool(x, stride))
        grad = jax.jit(jax.grad(lambda x, pool=pool: jnp.sum(jnp.sin(pool(x, stride)))))
        t0 = time.perf_counter()
        grad.lower(x).compile()
        cells.append((median_ms(fwd, x), median_ms(grad, x), time.perf_counter() - t0))
      (xf, xb, xc), (of, ob, oc) = cells
      print(f"| {'x'.join(map(str, shape))}, {stride} | {xf:.2f} / {xb:.2f} | {of:.2f} / {ob:.2f} "
            f"| {xc:.2f} / {oc:.2f} |")
  x = jnp.asarray(np.random.default_rng(1).integers(0, 3, (4, 7, 7, 3)), jnp.float32)
  for stride in (1, 2):
    np.testing.assert_array_equal(our_pool(x, stride), xla_pool(x, stride))
    w = jnp.asarray(np.random.default_rng(2).integers(1, 9, xla_pool(x, stride).shape), jnp.float32)
    grads = [jax.grad(lambda x, pool=pool: jnp.sum(pool(x, stride) * w))(x)
             for pool in (xla_pool, our_pool)]
    np.testing.assert_array_equal(*grads)
  print("values and gradients equal, ties included; "
        f"load average {_timing.load_average():.2f} at end")


if __name__ == "__main__":
  main()
