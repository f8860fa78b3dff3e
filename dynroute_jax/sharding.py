"""Device mesh, batch sharding and parameter sharding rules.

One mesh with two axes, ('data', 'fsdp'), built from `config.mesh`:

* The batch is split over both axes (every device holds a different slice of the global batch).
* Parameters and optimizer state are either replicated (`config.mesh.param_sharding='replicated'`,
  plain data parallelism: XLA inserts one gradient all-reduce per step) or sharded over 'fsdp'
  (`'fsdp'`, ZeRO-3 style: each large leaf is split along one dimension over the 'fsdp' axis and
  XLA all-gathers it where it is used and reduce-scatters its gradient).

Sharding rules follow big_vision: a list of `(regex, spec)` pairs matched in order against the
'/'-joined path of every leaf; the first match wins. `spec` is a `PartitionSpec`, or the string
`'fsdp'` (shard the largest dimension divisible by the 'fsdp' axis size; replicate leaves with fewer
than `FSDP_MIN_SIZE` elements or no divisible dimension). Regexes are applied with `re.search`, so
a pattern such as `'Conv_0/kernel$'` matches the parameter `params/Conv_0/kernel` and equally its
momentum buffer inside the optimizer state (`opt_state/0/trace/params/Conv_0/kernel`): the
optimizer state mirrors the parameter paths under optax's own prefixes. The 'fsdp' choice depends
only on a leaf's shape, so a parameter and every optimizer leaf of the same shape get the same
sharding and the update needs no resharding.

Axis types: the mesh uses `AxisType.Auto` on both axes (`jax.make_mesh` defaults to `Explicit` in
this JAX). The trainer uses plain `jax.jit` with `in_shardings`/`out_shardings` and lets XLA
propagate shardings through sharding-agnostic Flax model code. Under `Explicit` axes the sharding is
part of every array's type, and model code would have to annotate reshapes, dots and convolutions
on sharded dimensions (`out_sharding=...`) and run under `jax.sharding.use_mesh`; nothing in our
models needs that control.

Device order: `jax.make_mesh` arranges devices topology-aware with 'fsdp' as the inner (fastest
varying) axis, so an 'fsdp' group sits on neighbouring devices (the same host / NVLink island /
ICI neighbours) whenever `fsdp <= jax.local_device_count()`. Keep it that way on multi-host runs:
FSDP all-gathers happen every layer, data-parallel all-reduces once per step.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# Leaves with fewer elements than this stay replicated under the 'fsdp' rule. 2**14 fp32 elements
# are 64 KiB: below that the per-layer all-gather is pure latency (tens of microseconds per
# collective) for a negligible memory saving. This replicates biases, BatchNorm statistics,
# depthwise kernels, router layers and most DRNet branch weights (see launch/README.md).
FSDP_MIN_SIZE = 2**14

FSDP = "fsdp"  # Rule value: shard the largest divisible dimension over the 'fsdp' axis.

Rule = tuple[str, Any]  # (regex, PartitionSpec | 'fsdp')

RULES: dict[str, list[Rule]] = {
    "replicated": [(".*", P())],
    "fsdp": [
        # Step counters, schedule state, hyper-parameters injected into the optimizer state and
        # other scalars: fall through to the catch-all, which replicates them because they are
        # smaller than FSDP_MIN_SIZE.
        (".*", FSDP),
    ],
}


# --------------------------------------------------------------------------------------------
# Mesh.
# --------------------------------------------------------------------------------------------


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp') mesh from `config.mesh` over `devices` (default: all devices).

  `mesh_config.data = -1` takes all devices not used by 'fsdp'. Raises ValueError, before anything
  is compiled, when the shape does not match the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  data, fsdp = mesh_config.data, mesh_config.fsdp
  for name, value, lo in (("data", data, -1), ("fsdp", fsdp, 1)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo or value == 0:
      allowed = "-1 (the rest) or an int >= 1" if name == "data" else "an int >= 1"
      raise ValueError(f"config.mesh.{name} must be {allowed}; got {value!r}.")
  if data == -1:
    if n % fsdp:
      raise ValueError(
          f"config.mesh.fsdp={fsdp} does not divide the device count {n}, so config.mesh.data=-1 "
          f"cannot take the rest. Set config.mesh.fsdp to a divisor of {n} "
          f"(e.g. {_divisors_hint(n)}).")
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(
        f"config.mesh.data={mesh_config.data} x config.mesh.fsdp={fsdp} = {data * fsdp} devices, "
        f"but {n} devices are available ({jax.process_count()} process(es) x "
        f"{n // max(jax.process_count(), 1)} local). Set config.mesh.data=-1 to use the rest, or "
        f"choose data x fsdp = {n}.")
  return jax.make_mesh((int(data), int(fsdp)), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def _divisors_hint(n: int) -> str:
  return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_batch(global_batch_size: int, mesh: Mesh, process_count: int | None = None) -> int:
  """Checks the global batch splits evenly; returns the per-process batch size.

  Call it before compiling: an indivisible batch otherwise fails deep inside XLA or in
  `make_array_from_process_local_data`.
  """
  if process_count is None:
    process_count = jax.process_count()
  n = mesh.devices.size
  if global_batch_size % n:
    lo = global_batch_size // n * n
    raise ValueError(
        f"config.train.global_batch_size={global_batch_size} is not divisible by the device count "
        f"{n} (mesh {dict(mesh.shape)}): every device needs the same number of examples. Use a "
        f"multiple of {n}, e.g. {lo or n} or {lo + n}.")
  if global_batch_size % process_count:
    raise ValueError(
        f"config.train.global_batch_size={global_batch_size} is not divisible by the process count "
        f"{process_count}: every process loads the same number of examples.")
  return global_batch_size // process_count


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ('data', 'fsdp'); other dimensions replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# --------------------------------------------------------------------------------------------
# Parameter / optimizer-state sharding rules.
# --------------------------------------------------------------------------------------------


def _key_str(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(path: Iterable[Any]) -> str:
  """'a/b/c' for a jax tree path (dict keys, attribute names and sequence indices)."""
  return "/".join(_key_str(k) for k in path)


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(getattr(leaf, "shape", np.shape(leaf)))


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """Shards the largest dimension divisible by `fsdp_size` over 'fsdp' (ties: the last one).

  Replicated when `fsdp_size == 1`, the leaf has fewer than `min_size` elements, or no dimension
  is divisible. Conv kernels (kh, kw, cin, cout) thus shard cout (or cin when larger), dense
  kernels their larger side.
  """
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return P()
  best = None
  for i, d in enumerate(shape):
    if d % fsdp_size == 0 and (best is None or d >= shape[best]):
      best = i
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = "fsdp"
  return P(*spec)


def _check_spec(spec: P, shape: tuple[int, ...], mesh: Mesh, path: str) -> None:
  if len(spec) > len(shape):
    raise ValueError(f"Sharding rule for '{path}' gives {spec} ({len(spec)} dims) but the leaf has "
                     f"shape {shape}.")
  for dim, axes in zip(shape, spec):
    if axes is None:
      continue
    axes = axes if isinstance(axes, tuple) else (axes,)
    size = 1
    for a in axes:
      if a not in mesh.shape:
        raise ValueError(f"Sharding rule for '{path}' names mesh axis {a!r}; the mesh has "
                         f"{tuple(mesh.shape)}.")
      size *= mesh.shape[a]
    if dim % size:
      raise ValueError(f"Sharding rule for '{path}' splits a dimension of size {dim} (shape {shape}) "
                       f"{size} ways ({spec}); it must divide evenly.")


def leaf_spec(path: str, shape: tuple[int, ...], mesh: Mesh, rules: Sequence[Rule],
              min_size: int = FSDP_MIN_SIZE) -> P:
  """PartitionSpec of the first rule whose regex `re.search`-matches `path`."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      if isinstance(spec, str):
        if spec != FSDP:
          raise ValueError(f"Unknown sharding rule value {spec!r} for '{pattern}'; use a "
                           f"PartitionSpec or '{FSDP}'.")
        return fsdp_spec(shape, mesh.shape.get("fsdp", 1), min_size)
      if callable(spec) and not isinstance(spec, P):
        spec = spec(shape, mesh)
      _check_spec(spec, shape, mesh, path)
      return spec
  raise ValueError(f"No sharding rule matches '{path}'. End the rule list with a catch-all "
                   f"('.*', PartitionSpec()).")


def get_rules(rules: str | Sequence[Rule]) -> list[Rule]:
  if isinstance(rules, str):
    if rules not in RULES:
      raise ValueError(f"config.mesh.param_sharding must be one of {tuple(RULES)}; got {rules!r}.")
    return list(RULES[rules])
  return list(rules)


def tree_specs(abstract_tree: Any, mesh: Mesh, rules: str | Sequence[Rule],
               min_size: int = FSDP_MIN_SIZE) -> Any:
  """Tree of PartitionSpecs (same structure as `abstract_tree`)."""
  rules = get_rules(rules)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: leaf_spec(path_str(p), _shape(x), mesh, rules, min_size), abstract_tree)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: str | Sequence[Rule],
                   min_size: int = FSDP_MIN_SIZE) -> Any:
  """Tree of NamedShardings for any pytree of arrays / ShapeDtypeStructs.

  Pass the whole train state (params, batch statistics, optimizer state, step) so that everything
  gets a sharding from the same rules. `rules` is a key of RULES ('replicated', 'fsdp') or a rule
  list. Use `jax.eval_shape(init_fn, ...)` to get the abstract tree without allocating.
  """
  specs = tree_specs(abstract_tree, mesh, rules, min_size)
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, P))


def sharding_summary(abstract_tree: Any, shardings: Any, max_rows: int = 20) -> str:
  """Bytes per device, total and sharded, plus the largest leaves and their specs."""
  rows = []
  total = per_device = 0
  flat = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  flat_s = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sh in zip(flat, flat_s):
    shape = _shape(leaf)
    nbytes = math.prod(shape) * np.dtype(getattr(leaf, "dtype", np.float32)).itemsize
    shard = sh.shard_shape(shape) if shape else shape
    shard_bytes = math.prod(shard) * np.dtype(getattr(leaf, "dtype", np.float32)).itemsize
    total += nbytes
    per_device += shard_bytes
    rows.append((nbytes, path_str(path), shape, sh.spec))
  rows.sort(key=lambda r: -r[0])
  lines = [f"state: {len(rows)} leaves, {_fmt_bytes(total)} in total, "
           f"{_fmt_bytes(per_device)} per device"]
  for nbytes, path, shape, spec in rows[:max_rows]:
    lines.append(f"  {_fmt_bytes(nbytes):>10}  {str(shape):<22} {str(spec):<22} {path}")
  if len(rows) > max_rows:
    lines.append(f"  ... {len(rows) - max_rows} smaller leaves")
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Global batches.
# --------------------------------------------------------------------------------------------


def make_global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> Any:
  """Assembles each process's slice of the batch into global jax.Arrays sharded by batch_sharding.

  Every process passes its own `global_batch_size // process_count` examples (leading dimension);
  the global array concatenates them in process order. Works for nested dicts of numpy arrays.
  """
  sharding = batch_sharding(mesh)
  n_local = len(mesh.local_devices)

  def put(path, x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % n_local:
      raise ValueError(
          f"Batch entry '{path_str(path)}' has shape {x.shape}: its leading (batch) dimension must "
          f"be divisible by the {n_local} local devices (config.train.global_batch_size / "
          f"process count = per-process batch).")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map_with_path(put, local_batch)


# --------------------------------------------------------------------------------------------
# Dry-run report.
# --------------------------------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  return f"{n}"


def _fmt_count(n: float) -> str:
  for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= div:
      return f"{n / div:.3f} {unit}"
  return f"{n:.0f}"


def _first(x: Any) -> Any:
  # Some backends / versions return one entry per device or per program.
  if isinstance(x, (list, tuple)):
    return x[0] if x else None
  return x


def _memory_fields(stats: Any) -> dict[str, float]:
  names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
           "temp_size_in_bytes", "generated_code_size_in_bytes")
  out = {}
  for name in names:
    v = stats.get(name) if isinstance(stats, Mapping) else getattr(stats, name, None)
    if isinstance(v, (int, float, np.integer, np.floating)) and v >= 0:
      out[name] = float(v)
  return out


def dry_run_report(compiled: Any, *, num_devices: int | None = None,
                   examples_per_step: int | None = None) -> str:
  """Formats `compiled.memory_analysis()` and `compiled.cost_analysis()` for a dry run.

  Both describe ONE device's partitioned program (checked on XLA:CPU with 8 devices). Their return
  types differ by backend and JAX version (an object or a dict, a list per device, None, or an
  exception when unimplemented); anything missing is reported as 'unavailable'. XLA counts a
  multiply-add as 2 FLOPs; the models' own MAC counters count it as 1.
  """
  lines = ["dry run: compiled train step"]
  try:
    stats = _first(compiled.memory_analysis())
  except Exception as e:  # pylint: disable=broad-except
    stats, err = None, e
  else:
    err = None
  mem = _memory_fields(stats) if stats is not None else {}
  if mem:
    arg = mem.get("argument_size_in_bytes", 0.0)
    out = mem.get("output_size_in_bytes", 0.0)
    alias = mem.get("alias_size_in_bytes", 0.0)
    temp = mem.get("temp_size_in_bytes", 0.0)
    code = mem.get("generated_code_size_in_bytes", 0.0)
    peak = arg + out - alias + temp + code
    lines.append(f"  memory per device: arguments {_fmt_bytes(arg)}, outputs {_fmt_bytes(out)}, "
                 f"aliased (donated) {_fmt_bytes(alias)}, temporaries {_fmt_bytes(temp)}, "
                 f"code {_fmt_bytes(code)}")
    lines.append(f"  estimated peak per device: {_fmt_bytes(peak)} "
                 f"(arguments + outputs - aliased + temporaries + code)")
  else:
    lines.append("  memory per device: unavailable on this backend"
                 + (f" ({type(err).__name__}: {err})" if err else ""))
  try:
    cost = _first(compiled.cost_analysis())
  except Exception as e:  # pylint: disable=broad-except
    cost, err = None, e
  else:
    err = None
  flops = None
  if isinstance(cost, Mapping):
    flops = cost.get("flops")
  if isinstance(flops, (int, float, np.integer, np.floating)) and flops >= 0:
    lines.append(f"  FLOPs per step per device: {_fmt_count(flops)} (XLA count, multiply-add = 2)")
    if num_devices:
      lines.append(f"  FLOPs per step, all {num_devices} devices: {_fmt_count(flops * num_devices)}")
    if examples_per_step:
      total = flops * (num_devices or 1)
      lines.append(f"  FLOPs per example (train step): {_fmt_count(total / examples_per_step)}")
    extra = []
    for key in ("transcendentals", "bytes accessed"):
      v = cost.get(key)
      if isinstance(v, (int, float, np.integer, np.floating)):
        extra.append(f"{key} {_fmt_count(v)}")
    if extra:
      lines.append("  also per device: " + ", ".join(extra))
  else:
    lines.append("  FLOPs per step: unavailable on this backend"
                 + (f" ({type(err).__name__}: {err})" if err else ""))
  return "\n".join(lines)
