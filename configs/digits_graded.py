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

Measured wall times (2-core CPU shared with other jobs, so upper bounds): DRNet 12 min, CoDiNet
2 min, compilation and evaluation included.
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

CoDiNet (ResNet-14; all-block MACs 1.639M; cost Eq. 11 on correctly classified images only):
| run | change | acc routed | MACs | paths (>= 1%) | const | L3/L0 | Sp(level) | Sp(loss) | gap |
|---|---|---|---|---|---|---|---|---|---|
| c1 | paper losses, tau 5 -> 1, gated cost 0.3 | 0.847 | 1.107M | 2 (2) | 5/6 | 1.10 | +0.27 | +0.12 | -0.99 |
| c2 | + router logit penalty 0.02 | 0.866 | 1.322M | 8 (7) | 3/6 | 1.18 | +0.36 | -0.00 | +0.10 |
| c3 | c2 + router lr x3 | 0.861 | 1.186M | 9 (8) | 2/6 | 1.35 | +0.55 | +0.05 | -0.84 |
| c4 | penalty 0.05, clean path losses, diversity 1.0 | 0.852 | 1.247M | 15 (11) | 1/6 | 1.24 | +0.40 | +0.03 | +1.21 |
| c5 (default) | c4 + router lr x3 | 0.861 | 1.238M | 16 (12) | 1/6 | 1.27 | +0.46 | +0.08 | +0.37 |
| c6 | c5 + cost 0.5 | 0.847 | 1.165M | 17 (13) | 1/6 | 1.25 | +0.37 | +0.06 | -0.05 |
| c7 | c4, cost on every image | 0.855 | 1.252M | 13 (11) | 1/6 | 1.24 | +0.37 | +0.01 | +0.28 |
"""

from dynroute_jax import config_lib
from dynroute_jax.models import codinet
from dynroute_jax.models import drnet


def get_config(arg: str = "drnet"):
  if arg not in ("drnet", "codinet"):
    raise ValueError(f"configs/digits_graded.py variant must be 'drnet' or 'codinet'; got {arg!r}.")
  c = config_lib.base_config()
  c.seed = 0
  c.data.update(dict(name="digits_graded", image_size=8, num_channels=1, num_classes=10,
                     crop_padding=1, flip=False, cutout=0))
  c.train.global_batch_size = 64
  c.train.weight_decay = 3e-4
  c.eval.batch_size = 360
  c.checkpoint.every_steps = 200
  c.log_every_steps = 100

  if arg == "drnet":
    c.model = drnet.default_config("tiny", num_classes=10, image_size=8, num_channels=1)
    c.model.aux_head = False
    c.train.stage1 = config_lib.stage_config(
        epochs=20, lr=0.05, lr_schedule="cosine", tau_init=3.0, tau_floor=3.0)
    c.train.stage2 = config_lib.stage_config(
        epochs=15, lr=0.01, lr_schedule="cosine", tau_init=1.0, tau_decay_per_epoch=0.05,
        tau_floor=0.5, resource_weight=1.0)
    c.train.router_lr_multiplier = 3.0
    c.eval.threshold = 0.8
  else:
    c.model = codinet.default_config("resnet14", num_classes=10, image_size=8, num_channels=1)
    c.data.num_views = 2
    c.train.weight_decay = 1e-4
    c.train.cost_on_correct_only = True
    c.train.router_logit_weight = 0.05
    c.train.path_loss_input = "clean"
    c.train.router_lr_multiplier = 3.0
    c.train.stage1 = config_lib.stage_config(
        epochs=30, lr=0.1, lr_schedule="cosine", consistency_weight=0.2, diversity_weight=1.0,
        cost_weight=0.3, tau_init=5.0, tau_decay_per_epoch=0.08, tau_floor=1.0)
    c.train.stage2 = config_lib.stage_config(
        epochs=10, lr=0.01, lr_schedule="cosine", freeze_routers=True, hard_decisions=True)
    c.eval.threshold = 0.5
    c.eval.thresholds = (0.3, 0.4, 0.5, 0.6, 0.7)
  return c
