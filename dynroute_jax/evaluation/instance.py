"""Instance awareness: does an input's compute follow how hard it is?

  * `confidence_split`: mean MACs of confident-and-correct inputs vs the others;
  * `noise_comparison`: clean vs Gaussian-noised copies of the same images (noise in normalised
    units, a deterministic per-example key, see `predict.Predictor`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from dynroute_jax.evaluation import predict

# "Confident" means the top softmax probability reaches this.
CONFIDENCE_LEVEL = 0.9
DEFAULT_NOISE_STDS = (0.1, 0.3)


def confidence_split(res: dict[str, np.ndarray], level: float = CONFIDENCE_LEVEL) -> dict[str, Any]:
  """Mean MACs of confidently correct inputs vs misclassified or low-confidence ones."""
  correct = res["prediction"] == res["label"]
  easy = correct & (res["confidence"] >= level)
  macs = res["macs"].astype(np.float64)

  def stats(sel):
    n = int(np.sum(sel))
    return {"count": n, "macs_mean": float(np.mean(macs[sel])) if n else None,
            "macs_median": float(np.median(macs[sel])) if n else None}

  out = {"confidence_level": level, "confident_correct": stats(easy),
         "misclassified_or_unconfident": stats(~easy), "misclassified": stats(~correct)}
  a, b = out["confident_correct"]["macs_mean"], out["misclassified_or_unconfident"]["macs_mean"]
  out["macs_ratio_hard_over_easy"] = (b / a) if (a and b is not None) else None
  if macs.size > 1 and np.std(macs) > 0 and np.std(res["confidence"]) > 0:
    out["corr_confidence_macs"] = float(np.corrcoef(res["confidence"], macs)[0, 1])
  else:
    out["corr_confidence_macs"] = None
  return out


def noise_comparison(clean: dict[str, np.ndarray], noisy: dict[float, dict[str, np.ndarray]]
                     ) -> dict[str, Any]:
  """Clean vs Gaussian-noised copies of the same images (matched by dataset index)."""
  clean_macs = clean["macs"].astype(np.float64)
  out = {"clean": {"accuracy": float(np.mean(clean["prediction"] == clean["label"])),
                   "macs_mean": float(np.mean(clean_macs))}}
  for std, res in sorted(noisy.items()):
    if not np.array_equal(res["index"], clean["index"]):
      raise RuntimeError("internal: noisy and clean passes cover different examples")
    macs = res["macs"].astype(np.float64)
    out[f"std_{std:g}"] = {
        "noise_std": std,
        "accuracy": float(np.mean(res["prediction"] == res["label"])),
        "macs_mean": float(np.mean(macs)),
        "macs_change": float(np.mean(macs) - np.mean(clean_macs)),
        "macs_change_relative": float(np.mean(macs) / np.mean(clean_macs) - 1.0),
        "share_more_macs": float(np.mean(macs > clean_macs)),
        "share_fewer_macs": float(np.mean(macs < clean_macs)),
    }
  return out


def instance_section(passes: predict.Passes, test_ds, threshold: float,
                     res_clean: dict[str, np.ndarray], noise_stds: Sequence[float]
                     ) -> dict[str, Any]:
  """The report's 'instance_awareness' section at `threshold` (`res_clean`: its clean pass)."""
  noisy = {float(s): passes.routed(test_ds, threshold, noise_std=float(s)) for s in noise_stds}
  return {
      "threshold": threshold,
      "confidence": confidence_split(res_clean),
      "noise": dict(noise_comparison(res_clean, noisy), noise_units="normalised (after "
                    "per-channel mean/std)", noise_seed=predict.NOISE_SEED),
  }
