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

Expected on an idle 2-core CPU: under 10 minutes each, compilation included.
Targets (test split, deterministic evaluation): level-3 MACs >= 1.3 x level-0 MACs; Spearman(MACs,
level) >= 0.4; routed accuracy >= static counterpart + 1 point at the routed mean MACs; CoDiNet
>= 8 paths each used by >= 1% of the images, at most half of the routers constant.
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
        tau_floor=0.5, resource_weight=0.5)
    c.eval.threshold = 0.8
  else:
    c.model = codinet.default_config("resnet14", num_classes=10, image_size=8, num_channels=1)
    c.data.num_views = 2
    c.train.weight_decay = 1e-4
    c.train.cost_on_correct_only = True
    c.train.stage1 = config_lib.stage_config(
        epochs=30, lr=0.1, lr_schedule="cosine", consistency_weight=0.2, diversity_weight=0.2,
        cost_weight=0.3, tau_init=5.0, tau_decay_per_epoch=0.08, tau_floor=1.0)
    c.train.stage2 = config_lib.stage_config(
        epochs=10, lr=0.01, lr_schedule="cosine", freeze_routers=True, hard_decisions=True)
    c.eval.threshold = 0.5
    c.eval.thresholds = (0.3, 0.4, 0.5, 0.6, 0.7)
  return c
