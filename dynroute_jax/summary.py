"""Prints a model's parameters and MACs, derived from its definition.

  python -m dynroute_jax.summary --config=configs/drnet_cifar10.py:S [--json]

Parameters are split into backbone, routers (the model's `router_param_pattern`) and auxiliary
head (paths containing 'aux_head'; excluded from the model size, as DARTS does). MACs are per image
with every branch/block running; FLOPs = 2 x MACs. The per-cell (DRNet) or per-stage (CoDiNet)
breakdown is the model's `size_breakdown` of its own MACs table, which is checked here against an
independent count of the whole forward pass's jaxpr.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from dynroute_jax import config_lib
from dynroute_jax import costs
from dynroute_jax import models

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/drnet_cifar10.py:S.",
                                lock_config=True)
flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
flags.mark_flags_as_required(["config"])

AUX_PARAM_PATTERN = "aux_head"


def model_summary(config) -> dict[str, Any]:
  """Parameters and MACs of the config's model (nothing is trained)."""
  config_lib.validate(config)
  config_lib.check_model_matches_data(config)  # The input shape below comes from config.data.
  model = models.build_model(config.model)
  dc = config.data
  shape = (1, dc.image_size, dc.image_size, dc.num_channels)
  x = jnp.zeros(shape, jnp.float32)
  key = jax.random.key(0)
  variables = jax.jit(lambda k: model.init({"params": k, "routing": k, "dropout": k}, x, train=False))(key)
  groups = costs.params_by_group(variables["params"], {"routers": model.router_param_pattern,
                                                       "aux": AUX_PARAM_PATTERN})

  def forward(variables, x):
    return model.apply(variables, x, train=False)

  out = jax.jit(forward)(variables, x)
  table = np.asarray(out.macs_table, np.float64)
  macs_fixed = float(out.macs_fixed)
  macs_all = macs_fixed + float(table.sum())
  # Independent check: every conv/matmul of the whole forward pass, counted from its jaxpr.
  macs_traced = costs.count_macs(forward, variables, x)
  site_shape = tuple(out.site_shape)
  params_model = groups["backbone"] + groups["routers"]
  return {
      "model": config.model.name,
      "variant": config.model.get("variant", ""),
      "image_size": dc.image_size,
      "convention": costs.CONVENTION,
      "params_backbone": groups["backbone"],
      "params_routers": groups["routers"],
      "params_aux": groups["aux"],
      "params_model": params_model,
      "macs_all_branches": macs_all,
      "macs_fixed": macs_fixed,
      "macs_routed_units": float(table.sum()),
      "macs_traced_forward": macs_traced,
      "flops_all_branches": 2 * macs_all,
      "site_shape": list(site_shape),
      # 'macs_per_cell' (DRNet) or 'macs_per_stage' (CoDiNet), and 'macs_per_branch_type'.
      **model.size_breakdown(table),
  }


def format_summary(s: dict[str, Any]) -> str:
  lines = [f"{s['model']} {s['variant']} ({s['image_size']}x{s['image_size']} input)",
           f"  convention: {s['convention']}",
           f"  parameters: backbone {s['params_backbone']:,}  routers {s['params_routers']:,}  "
           f"(model {s['params_model']:,}; auxiliary head {s['params_aux']:,}, not counted)",
           f"  MACs per image, all branches: {s['macs_all_branches'] / 1e6:.2f}M "
           f"(FLOPs {s['flops_all_branches'] / 1e6:.2f}M); fixed {s['macs_fixed'] / 1e6:.2f}M, routed "
           f"units {s['macs_routed_units'] / 1e6:.2f}M; whole-forward trace {s['macs_traced_forward'] / 1e6:.2f}M"]
  # The model's structural breakdown: 'macs_per_cell', 'macs_per_stage', ...
  key = next(k for k in s if k.startswith("macs_per_") and k != "macs_per_branch_type")
  name = key.split("_")[-1]
  for i, v in enumerate(s[key]):
    lines.append(f"  {name} {i:2d}: {v / 1e6:8.3f}M MACs (routed units)")
  if s.get("macs_per_branch_type"):
    lines.append("  per branch type (all cells): " + ", ".join(
        f"{k}: {v / 1e6:.2f}M" for k, v in enumerate(s["macs_per_branch_type"])))
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    s = model_summary(FLAGS.config)
  except ValueError as e:  # A bad config: its message alone, before anything is compiled.
    print(f"summary: error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)
  if FLAGS.json:
    json.dump(s, sys.stdout)
    sys.stdout.write("\n")
  else:
    print(format_summary(s))


if __name__ == "__main__":
  app.run(main)
