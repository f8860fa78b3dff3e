"""Figures of an evaluation report (matplotlib, Agg backend, PNG files).

  * accuracy_vs_macs.png: accuracy against mean MACs per example over the threshold sweep, with
    the all-branches point (and the budget point when there is one).
  * selection.png: DRNet branch selection ratio per connection and branch, one panel per cell
    (DRNet Fig. 2); CoDiNet run ratio per block.
  * tsne_paths.png: t-SNE of the routing paths (`ModelOutput.path`: DRNet's kept, rescaled branch
    weights; CoDiNet's run probabilities) at the config's threshold, coloured by class and by
    executed MACs (CoDiNet Fig. 6 / 11).
  * extremes.png: the test images with the lowest and the highest executed MACs (DRNet Fig. 3,
    CoDiNet Fig. 11), titled with MACs, label and prediction.
  * the accuracy-vs-MACs figure also draws the static counterpart's sweep (report['static']);
  * macs_per_level.png: box plots of executed MACs per difficulty level (datasets with levels).

`write_all(report, res, test_ds, out_dir)` writes all of them and returns the file names; `out_dir`
may be on any filesystem etils.epath supports (gs://, ...).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from etils import epath
import numpy as np

FILES = ("accuracy_vs_macs.png", "selection.png", "tsne_paths.png", "extremes.png")
# Written too when the dataset has difficulty levels (e.g. digits_graded).
LEVEL_FILE = "macs_per_level.png"


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _mega(x: float) -> float:
  return x / 1e6


def _save(fig, path: str | os.PathLike[str]) -> str:
  """Writes the PNG through etils.epath, so `path` may be on any filesystem it supports."""
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
  _pyplot().close(fig)
  return os.fspath(path)


def accuracy_vs_macs(report: dict[str, Any], path: str | os.PathLike[str]) -> str:
  plt = _pyplot()
  sweep = report["thresholds"]
  ts = sorted(sweep, key=float)
  macs = [_mega(sweep[t]["macs_mean"]) for t in ts]
  acc = [100 * sweep[t]["accuracy"] for t in ts]
  fig, ax = plt.subplots(figsize=(5.5, 4))
  ax.plot(macs, acc, "o-", label="routed (threshold sweep)")
  for t, x, y in zip(ts, macs, acc):
    ax.annotate(f"T={t}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
  ax.plot([_mega(report["macs_all"])], [100 * report["accuracy_all"]], "s", color="k",
          label="all branches")
  st = report.get("static")
  if st and st.get("sweep"):
    pts = sorted((v["macs_mean"], v["accuracy"]) for v in st["sweep"].values())
    ax.plot([_mega(m) for m, _ in pts], [100 * a for _, a in pts], "^--", color="tab:gray",
            label="static counterpart (mean routing, no routers)")
  b = report.get("budget")
  if b and b.get("feasible") and "test" in b:
    ax.plot([_mega(b["test"]["macs_mean"])], [100 * b["test"]["accuracy"]], "*", ms=12,
            color="tab:red", label=f"budget (T={b['threshold']:.3g})")
  ax.set_xlabel("mean MACs per example (M)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"{report['model']} {report['variant']} on {report['dataset']}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def selection(report: dict[str, Any], path: str | os.PathLike[str]) -> str:
  """Branch selection ratios per cell (DRNet) or run ratio per block (CoDiNet), at the threshold."""
  plt = _pyplot()
  s = report["thresholds"][f"{report['threshold']:g}"]
  if "branch_selection" in s:
    sel = np.asarray(s["branch_selection"])  # [L, C, K]
    n_cells, n_conn, n_br = sel.shape
    names = report.get("branch_names") or [str(k) for k in range(n_br)]
    cols = min(n_cells, 4)
    rows = -(-n_cells // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.9 * rows), squeeze=False)
    for l in range(rows * cols):
      ax = axes[l // cols][l % cols]
      if l >= n_cells:
        ax.axis("off")
        continue
      im = ax.imshow(sel[l], vmin=0, vmax=1, cmap="viridis", aspect="auto")
      for c in range(n_conn):
        for k in range(n_br):
          ax.text(k, c, f"{sel[l, c, k]:.2f}", ha="center", va="center", fontsize=6,
                  color="w" if sel[l, c, k] < 0.6 else "k")
      ax.set_title(f"cell {l}", fontsize=9)
      ax.set_xticks(range(n_br))
      ax.set_xticklabels(names, rotation=60, ha="right", fontsize=6)
      ax.set_yticks(range(n_conn))
      ax.set_ylabel("connection", fontsize=7)
      ax.tick_params(axis="y", labelsize=6)
    fig.colorbar(im, ax=axes, shrink=0.8, label="branch selection ratio")
    fig.suptitle(f"Branch selection ratio at T={report['threshold']:g}", y=1.03)
  else:
    ratio = np.asarray(s.get("run_ratio_per_block", []))
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * ratio.size + 2), 3))
    ax.bar(np.arange(ratio.size), ratio, color="tab:blue")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("block")
    ax.set_ylabel("run ratio")
    ax.set_title(f"Share of test images running each block (T={report['threshold']:g})")
  return _save(fig, path)


def _subset(n: int, max_points: int) -> np.ndarray:
  if n <= max_points:
    return np.arange(n)
  return np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))


def tsne_paths(paths: np.ndarray, labels: np.ndarray, macs: np.ndarray,
               path: str | os.PathLike[str], *, max_points: int = 2000, seed: int = 0) -> str:
  """t-SNE of routing paths [N, P], coloured by class and by executed MACs."""
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  plt = _pyplot()
  idx = _subset(len(paths), max_points)
  x = np.asarray(paths, np.float64)[idx].reshape(len(idx), -1)
  lab, m = np.asarray(labels)[idx], _mega(np.asarray(macs, np.float64)[idx])
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
  if len(idx) >= 5 and np.ptp(x, axis=0).max() > 0:
    perplexity = float(min(30.0, max(2.0, (len(idx) - 1) / 3.0)))
    emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
  else:  # Too few points, or every path identical: nothing to embed.
    emb = np.zeros((len(idx), 2))
    for ax in axes:
      ax.text(0.5, 0.5, "all routing paths identical" if len(idx) >= 5 else "too few examples",
              ha="center", transform=ax.transAxes)
  few = lab.max(initial=0) < 10
  sc = axes[0].scatter(emb[:, 0], emb[:, 1], c=lab, s=8, cmap="tab10" if few else "nipy_spectral",
                       **(dict(vmin=-0.5, vmax=9.5) if few else {}))
  axes[0].set_title("routing paths (t-SNE), coloured by class")
  fig.colorbar(sc, ax=axes[0], ticks=range(10) if few else None, label="class")
  sc2 = axes[1].scatter(emb[:, 0], emb[:, 1], c=m, cmap="coolwarm", s=8)
  axes[1].set_title("coloured by executed MACs")
  fig.colorbar(sc2, ax=axes[1], label="MACs per example (M)")
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  return _save(fig, path)


def extremes(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, macs: np.ndarray,
             path: str | os.PathLike[str]) -> str:
  """Two rows of images: the first half of the arguments is drawn as "fewest MACs", the second half
  as "most MACs" (`write_all` passes the k lowest- and k highest-MACs test images)."""
  plt = _pyplot()
  k = max(1, len(images) // 2)
  fig, axes = plt.subplots(2, k, figsize=(1.6 * k, 4.2), squeeze=False)
  for r, title in enumerate(("fewest MACs", "most MACs")):
    for c in range(k):
      ax = axes[r][c]
      ax.axis("off")
      i = r * k + c
      if i >= len(images):
        continue
      img = images[i]
      if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255)
      else:
        ax.imshow(img)
      wrong = "" if predictions[i] == labels[i] else " (wrong)"
      ax.set_title(f"{_mega(macs[i]):.4g}M MACs\ny={labels[i]} pred={predictions[i]}{wrong}",
                   fontsize=7)
    axes[r][0].text(-0.15, 0.5, title, transform=axes[r][0].transAxes, rotation=90,
                    va="center", ha="right", fontsize=8)
  fig.suptitle("Test images with the fewest / most executed MACs")
  return _save(fig, path)


def write_all(report: dict[str, Any], res: dict[str, np.ndarray], test_ds,
              out_dir: str | os.PathLike[str], *, tsne_max_points: int = 2000, seed: int = 0,
              k: int = 8) -> list[str]:
  """Writes every figure into `out_dir`; `res` is the routed pass at the config's threshold."""
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  written = [accuracy_vs_macs(report, out_dir / FILES[0]),
             selection(report, out_dir / FILES[1]),
             tsne_paths(res["path"], res["label"], res["macs"], out_dir / FILES[2],
                        max_points=tsne_max_points, seed=seed)]
  order = np.argsort(res["macs"], kind="stable")
  kk = int(min(k, max(1, len(order) // 2)))
  sel = np.concatenate([order[:kk], order[::-1][:kk]])
  images, _ = test_ds.get(res["index"][sel])
  written.append(extremes(images, res["label"][sel], res["prediction"][sel], res["macs"][sel],
                          out_dir / FILES[3]))
  if "level" in res:
    written.append(macs_per_level(res["macs"], res["level"], out_dir / LEVEL_FILE))
  return [epath.Path(p).name for p in written]


def macs_per_level(macs: np.ndarray, levels: np.ndarray, path) -> str:
  """Box plots of executed MACs per example, one box per difficulty level."""
  plt = _pyplot()
  lv = np.unique(levels)
  fig, ax = plt.subplots(figsize=(5, 3.6))
  ax.boxplot([_mega(np.asarray(macs, np.float64)[levels == v]) for v in lv])
  ax.set_xticks(range(1, len(lv) + 1), [str(int(v)) for v in lv])
  ax.set_xlabel("difficulty level")
  ax.set_ylabel("executed MACs per example (M)")
  ax.set_title("compute per difficulty level")
  return _save(fig, path)


__all__ = ["FILES", "LEVEL_FILE", "macs_per_level", "accuracy_vs_macs", "selection", "tsne_paths", "extremes", "write_all"]
