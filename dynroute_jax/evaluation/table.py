"""The plain-text table an evaluation prints: the threshold sweep, dynamics, static counterpart,
budget and instance-awareness lines of a report (`format_table`)."""

from __future__ import annotations

from typing import Any


def _fmt_macs(x: float) -> str:
  return f"{x / 1e6:.4g}M" if x >= 1e5 else f"{x:.4g}"


def format_table(report: dict[str, Any]) -> str:
  """A plain-text table of the sweep (plus budget and instance-awareness lines when present)."""
  lines = [f"{report['model']} {report['variant']} on {report['dataset']} (step {report['step']}, "
           f"eval tau {report['eval_tau']:.3g}, strategy {report.get('strategy', 'dense')}); "
           "MACs per example, FLOPs = 2 x MACs",
           f"{'threshold':>10} {'accuracy':>9} {'MACs mean':>10} {'median':>10} {'p90':>10} "
           f"{'params':>10} {'reduction':>9} {'paths':>6} {'path len':>8}"]

  def row(name, s):
    return (f"{name:>10} {s['accuracy']:9.4f} {_fmt_macs(s['macs_mean']):>10} "
            f"{_fmt_macs(s['macs_median']):>10} {_fmt_macs(s['macs_p90']):>10} "
            f"{_fmt_macs(s['params_mean']):>10} {s['macs_reduction']:9.1%} "
            f"{s.get('distinct_paths', ''):>6} {s.get('mean_path_length', float('nan')):8.2f}")

  lines.append(row("all", report["all"]))
  for t, s in report["thresholds"].items():
    mark = "*" if float(t) == float(report["threshold"]) else ""
    lines.append(row(t + mark, s))
  lines.append(f"(* = the config's threshold; reduction against all branches: "
               f"{_fmt_macs(report['macs_all'])} MACs)")
  lines.extend(_dynamics_lines(report))
  b = report.get("budget")
  if b:
    if b["feasible"]:
      tst = b.get("test", {})
      lines.append(f"budget {_fmt_macs(b['target_macs'])} MACs: threshold {b['threshold']:.4g} "
                   f"(calibration {_fmt_macs(b['macs'])} MACs); test accuracy "
                   f"{tst.get('accuracy', float('nan')):.4f}, {_fmt_macs(tst.get('macs_mean', 0.0))} MACs")
    else:
      lines.append("budget: INFEASIBLE. " + b["message"])
  ia = report.get("instance_awareness")
  if ia:
    c = ia["confidence"]
    e, h = c["confident_correct"], c["misclassified_or_unconfident"]
    fm = lambda s: "n/a" if s["macs_mean"] is None else _fmt_macs(s["macs_mean"])
    lines.append(f"instance awareness at threshold {ia['threshold']:g}: confident (>= "
                 f"{c['confidence_level']:g}) and correct {fm(e)} MACs (n={e['count']}) vs "
                 f"misclassified or unconfident {fm(h)} MACs (n={h['count']})")
    n = ia["noise"]
    parts = [f"clean {_fmt_macs(n['clean']['macs_mean'])} (acc {n['clean']['accuracy']:.3f})"]
    for k, v in n.items():
      if k.startswith("std_"):
        parts.append(f"noise std {v['noise_std']:g}: {_fmt_macs(v['macs_mean'])} "
                     f"({v['macs_change_relative']:+.1%}, acc {v['accuracy']:.3f})")
    lines.append("  MACs " + "; ".join(parts))
  return "\n".join(lines)


def _fmt(x: Any, spec: str = ".3f") -> str:
  return "n/a" if x is None else format(x, spec)


def _dynamics_lines(report: dict[str, Any]) -> list[str]:
  """The dynamics and static-counterpart lines of the table."""
  d, st = report.get("dynamics"), report.get("static")
  if not d:
    return []
  m = d["macs"]
  lines = [f"dynamics at threshold {report['threshold']:g}: MACs mean {_fmt_macs(m['mean'])} "
           f"CV {m['cv']:.1%} min {_fmt_macs(m['min'])} max {_fmt_macs(m['max'])}; "
           f"{d['distinct_paths']} paths (most common {d['most_common_path_share']:.1%}, "
           f"{d['paths_used_by_1pct']} used by >= 1%); constant routers {d['constant_routers']}/"
           f"{d['num_routers']}" + (f", constant connections {d['constant_connections']}/"
                                    f"{d['num_connections']}" if "constant_connections" in d else "")
           + f"; Spearman(MACs, loss) {_fmt(d.get('spearman_macs_loss'), '+.3f')}"]
  lv = d.get("levels")
  if lv:
    per = "; ".join(f"L{k}: acc {v['accuracy']:.3f} MACs {_fmt_macs(v['macs_mean'])}"
                    for k, v in lv["per_level"].items())
    lines.append(f"  per level: {per}; Spearman(MACs, level) "
                 f"{_fmt(lv['spearman_macs_level'], '+.3f')}; top/bottom level MACs "
                 f"{_fmt(lv['macs_ratio_top_over_bottom_level'], '.3f')}x")
  if st:
    lines.append(f"  static counterpart (mean router output, no routers): "
                 f"{st['static_accuracy_at_routed_macs']:.4f} at {_fmt_macs(st['routed_macs'])} MACs"
                 f"{' (extrapolated)' if st['extrapolated'] else ''}; routed - static = "
                 f"{st['gap_points']:+.2f} points")
    bs = st.get("best_subset")
    if bs:
      lines.append(f"  best fixed subset of blocks (of {bs['num_subsets']}, picked on this set): "
                   f"{bs['static_accuracy_at_routed_macs']:.4f}; routed - best subset = "
                   f"{bs['gap_points']:+.2f} points")
  return lines
