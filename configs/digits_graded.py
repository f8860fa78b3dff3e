"""Adaptive compute on data of known difficulty: `digits_graded` (offline, embedded).

  python -m dynroute_jax.main --config=configs/digits_graded.py --workdir=runs/graded_drnet
  python -m dynroute_jax.main --config=configs/digits_graded.py:codinet --workdir=runs/graded_codinet

The dataset (`dynroute_jax/graded_digits.py`) is scikit-learn's digits with a difficulty level
0-3 per image (clean; then shifted, lower-contrast, occluded or overlaid with another digit, and
noisier as the level rises), balanced per split and class. The level is never an input; the
evaluation report breaks accuracy and MACs down by it (`report['dynamics']['levels']`) and compares
the routed model with its static counterpart at equal cost (`report['static']`).

Variants: drnet (default, DRNet tiny), codinet (routed ResNet-14). Same splits as digits (1295
train, 143 calibration, 359 test).

Measured wall times on a 2-core CPU shared with other jobs (so upper bounds), compilation and
evaluation included: DRNet 6m45s (d2 below; 12 min under heavier load), CoDiNet 1-4 min (57 s
with a warm compilation cache).
Targets (test split, deterministic evaluation): level-3 MACs >= 1.3 x level-0 MACs; Spearman(MACs,
level) >= 0.4; routed accuracy >= static counterpart + 1 point at the routed mean MACs; CoDiNet
>= 8 paths each used by >= 1% of the images, at most half of the routers constant.

Ablations (seed 0, test split, threshold 0.8 DRNet / v >= 0.5 CoDiNet; "paths" = distinct paths
(used by >= 1% of images); "const" = routers constant over the test set; L3/L0 = mean MACs of
level-3 over level-0 images; "gap" = routed - static accuracy at the routed mean MACs, in points).

DRNet (tiny; all-branch MACs 1.226M):
| run | change | acc routed | MACs | paths | L3/L0 | Spearman(MACs, level) | Spearman(MACs, loss) | gap |
|---|---|---|---|---|---|---|---|---|
| d1 | Eq. 8 over branch costs, lambda 0.5 | 0.780 | 0.830M | 359 (0) | 1.10 | +0.50 | +0.48 | -0.56 |
| d2 (default) | lambda 1.0, router lr x3 | 0.713 | 0.351M | 343 (0) | 1.09 | +0.40 | +0.34 | +2.86 |
| d3 | lambda 1.0, router lr x10 | 0.699 | 0.305M | 3 (3) | 1.00 | n/a (constant MACs) | n/a | +4.46 (extrapolated: below the static sweep's cheapest point) |

DRNet's masks differ per image (d1, d2) but its MACs barely do (CV 7%): the kept branches change,
their costs do not. d2 ranks MACs by level (+0.40) and beats the static counterpart, yet level-3
images cost only 9% more than clean ones.

CoDiNet (ResNet-14; all-block MACs 1.639M; cost Eq. 11 on correctly classified images only):
| run | change | acc routed | MACs | paths (>= 1%) | const | L3/L0 | Sp(level) | Sp(loss) | gap |
|---|---|---|---|---|---|---|---|---|---|
| c1 | paper losses, tau 5 -> 1, gated cost 0.3 | 0.847 | 1.107M | 2 (2) | 5/6 | 1.10 | +0.27 | +0.12 | -0.99 |
| c2 | + router logit penalty 0.02 | 0.866 | 1.322M | 8 (7) | 3/6 | 1.18 | +0.36 | -0.00 | +0.10 |
| c3 | c2 + router lr x3 | 0.861 | 1.186M | 9 (8) | 2/6 | 1.35 | +0.55 | +0.05 | -0.84 |
| c4 | penalty 0.05, clean path losses, diversity 1.0 | 0.852 | 1.247M | 15 (11) | 1/6 | 1.24 | +0.40 | +0.03 | +1.21 |
| c5 | c4 + router lr x3 | 0.861 | 1.238M | 16 (12) | 1/6 | 1.27 | +0.46 | +0.08 | +0.37 |
| c5, seed 1 | the same, another seed | 0.852 | 1.233M | 19 (12) | 1/6 | 1.27 | +0.46 | +0.11 | +0.29 |
| c6 | c5 + cost 0.5 | 0.847 | 1.165M | 17 (13) | 1/6 | 1.25 | +0.37 | +0.06 | -0.05 |
| c7 | c4, cost on every image | 0.855 | 1.252M | 13 (11) | 1/6 | 1.24 | +0.37 | +0.01 | +0.28 |
| c8 | c5 + penalty 0.1 | 0.872 | 1.184M | 17 (13) | 1/6 | 1.28 | +0.40 | -0.01 | +0.73 |
| c9 | c5 + stage 1 of 45 epochs (not 30) | 0.866 | 1.103M | 18 (15) | 1/6 | 1.29 | +0.40 | +0.09 | +8.07 (best subset -1.17) |
| c11 (default) | c9 with penalty 0.02 | 0.847 | 1.111M | 14 (12) | 1/6 | 1.31 | +0.46 | +0.20 | -0.13 (best subset -0.75) |
| c12 | c9 with router lr x5 | 0.852 | 1.055M | 18 (13) | 1/6 | 1.34 | +0.44 | +0.13 | -2.43 (best subset -2.51) |

Read c9's gap with care: the mean-router sweep of a 6-block network only holds the 7 subsets nested
by mean run probability (0.82M: 0.688, 1.34M: 0.866), so the interpolation at 1.10M is low. The
report's `static.best_subset` tries all 64 fixed subsets and takes the upper envelope, choosing
on the test set itself (optimistic for the static side). Against it c9 is -1.17 points (0.866 vs
0.878): a fixed subset of blocks matches this routed model. The default, c11, meets the level
targets (1.31x, +0.46) but not the gap (-0.13 points against the mean-router sweep, -0.75 against
the best subset): the more compute follows the level (c3, c12), the closer the static network
gets.
"""

from dynroute_jax import config_lib


def get_config(arg: str = "drnet"):
  if arg not in ("drnet", "codinet"):
    raise ValueError(f"configs/digits_graded.py variant must be 'drnet' or 'codinet'; got {arg!r}.")
  # The digits recipe (model, splits, batch, schedule lengths) on the graded images.
  c = config_lib.sibling_config(__file__, "digits").get_config(arg)
  c.data.name = "digits_graded"
  if arg == "drnet":
    c.train.resource_cost = "branches"  # Eq. 8 as the paper writes it.
    c.train.router_lr_multiplier = 3.0
    c.train.stage2.resource_weight = 1.0
  else:
    c.train.cost_on_correct_only = True
    c.train.router_logit_weight = 0.02
    c.train.path_loss_input = "clean"
    c.train.router_lr_multiplier = 3.0
    c.train.stage1.update(dict(epochs=45, diversity_weight=1.0, cost_weight=0.3, tau_init=5.0,
                               tau_decay_per_epoch=0.08, tau_floor=1.0))
  return c
