"""Cost accounting derived from the model definition: parameters and multiply-accumulates (MACs).

Convention used everywhere in dynroute_jax: a MAC is one multiply-accumulate of a convolution or a
dense (matmul) layer; FLOPs = 2 x MACs. Pooling, batch norm, activations and additions are not
counted (as in DARTS, DRNet and CoDiNet's tables). Parameters count every entry of the `params`
collection (not batch-norm running statistics).

MACs are never typed in by hand: `count_macs` traces a function to a jaxpr and sums the MACs of
every `conv_general_dilated` and `dot_general` it finds, from their static shapes. Models call
`module_macs` on a branch or block definition to build their per-unit MACs tables. While
`count_macs` traces, `counting()` is True: layers that compute a convolution some other way for
speed (the depthwise convolutions on CPU, `models.common.depthwise_conv` and `depthwise_taps`)
then emit the plain convolution, so the count sees one `conv_general_dilated` whichever
implementation runs.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import threading
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

PyTree = Any

CONVENTION = "MACs = multiply-accumulates of conv and dense layers; FLOPs = 2 x MACs."


def _eqn_macs(eqn) -> int:
  """MACs of one jaxpr equation (0 for anything that is not a conv or a matmul)."""
  name = eqn.primitive.name
  if name == "conv_general_dilated":
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    # rhs_spec = (out feature dim, in feature dim, *spatial dims) as indices into rhs.
    rhs_spec = dn.rhs_spec
    in_per_group = rhs[rhs_spec[1]]
    spatial = math.prod(rhs[i] for i in rhs_spec[2:])
    # Each output element accumulates over (in features per group) x (kernel window).
    return int(math.prod(out)) * int(in_per_group) * int(spatial)
  if name == "dot_general":
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    contract = math.prod(lhs[i] for i in lhs_contract)
    out = eqn.outvars[0].aval.shape
    return int(math.prod(out)) * int(contract)
  return 0


def _sub_jaxprs(eqn) -> Iterable[Any]:
  for param in eqn.params.values():
    items = param if isinstance(param, (tuple, list)) else (param,)
    for item in items:
      if isinstance(item, jax_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax_core.Jaxpr):
        yield item


def jaxpr_macs(jaxpr, *, cond_policy: str = "max") -> int:
  """Sums conv/matmul MACs over a jaxpr, descending into sub-jaxprs.

  Args:
    jaxpr: a `jax.core.Jaxpr` (or ClosedJaxpr).
    cond_policy: how to count a `cond` (switch): "max" (worst case over branches) or "sum".

  Returns:
    MACs as a Python int. `scan` bodies are multiplied by their trip count; `while` loops, whose trip
    count is dynamic, are counted once per body.
  """
  if isinstance(jaxpr, jax_core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "cond":
      branches = [jaxpr_macs(b, cond_policy=cond_policy) for b in eqn.params["branches"]]
      total += max(branches) if cond_policy == "max" else sum(branches)
      continue
    if name == "scan":
      total += eqn.params["length"] * jaxpr_macs(eqn.params["jaxpr"], cond_policy=cond_policy)
      continue
    total += _eqn_macs(eqn)
    for sub in _sub_jaxprs(eqn):
      total += jaxpr_macs(sub, cond_policy=cond_policy)
  return total


_COUNTING = threading.local()


def counting() -> bool:
  """True while `count_macs` traces (in this thread)."""
  return getattr(_COUNTING, "depth", 0) > 0


@contextlib.contextmanager
def _counting():
  _COUNTING.depth = getattr(_COUNTING, "depth", 0) + 1
  try:
    yield
  finally:
    _COUNTING.depth -= 1


def count_macs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
  """MACs of calling `fn(*args, **kwargs)`, from its jaxpr (arguments may be ShapeDtypeStructs)."""
  with _counting():
    return jaxpr_macs(jax.make_jaxpr(functools.partial(fn, **kwargs))(*args))


def module_macs(module: nn.Module, input_shape: tuple[int, ...], dtype=jnp.float32,
                **call_kwargs: Any) -> int:
  """MACs of one forward pass of an unbound Flax `module` on an input of `input_shape`.

  The module is initialised abstractly (nothing is allocated); initialisation runs the forward
  pass once, and only conv/matmul equations are counted, so random initialisers add nothing.
  Pass the batch dimension in `input_shape` and divide by it for per-example MACs.
  """
  x = jax.ShapeDtypeStruct(input_shape, dtype)
  rngs = {"params": jax.random.key(0)}

  def init(x):
    return module.init(rngs, x, **call_kwargs)

  return count_macs(init, x)


def module_params(module: nn.Module, input_shape: tuple[int, ...], dtype=jnp.float32,
                  **call_kwargs: Any) -> int:
  """Number of parameters of an unbound Flax `module` initialised on `input_shape`."""
  x = jax.ShapeDtypeStruct(input_shape, dtype)
  variables = jax.eval_shape(lambda x: module.init({"params": jax.random.key(0)}, x, **call_kwargs), x)
  return count_params(variables.get("params", {}))


def count_params(tree: PyTree) -> int:
  """Total number of array entries in a pytree (of arrays or ShapeDtypeStructs)."""
  return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(tree)))


def path_str(path: tuple[Any, ...]) -> str:
  """'a/b/c' for a pytree key path (DictKey/GetAttrKey/SequenceKey entries)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def params_by_group(params: PyTree, groups: Mapping[str, str], default: str = "backbone"
                    ) -> dict[str, int]:
  """Counts parameters per group, a parameter joining the first group whose regex matches its path.

  Args:
    params: the `params` collection.
    groups: ordered {group name: regex searched in 'a/b/c' paths}, e.g. {'routers': 'router'}.
    default: group of parameters no regex matches.

  Returns:
    {group: count}, every group present (possibly 0).
  """
  counts = {name: 0 for name in groups}
  counts.setdefault(default, 0)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    p = path_str(path)
    for name, pattern in groups.items():
      if re.search(pattern, p):
        counts[name] += math.prod(np.shape(leaf))
        break
    else:
      counts[default] += math.prod(np.shape(leaf))
  return {k: int(v) for k, v in counts.items()}
