"""CoDiNet on CIFAR-100 (TPAMI paper, Sec. 4): routed CIFAR ResNet-32 / 74 / 110.

Run (default variant resnet110; `:resnet32`, `:resnet74`; append `,gamma=G` for the cost weight):

  python -m dynroute_jax.main --config=configs/codinet_cifar100.py:resnet110 --workdir=runs/codinet_c100_r110

Expected runtime (estimate, not measured): as CIFAR-10, a few GPU-hours for ResNet-110 on one
modern GPU; impractical on a 2-core CPU (~7 s per ResNet-110 step of 128 inputs).

Recipe: identical to configs/codinet_cifar10.py (same paper settings and the same choices where
the paper is silent: M = 2 views, 220 stage-1 epochs with decays at 150 and 200, gamma = 0,
stage 2 = 20 epochs at lr 0.001 with frozen routers and hard decisions, batch 128); 100 classes.

Paper numbers to compare with (Table 6, CIFAR-100, top-1 %, K = average executed blocks):
  ResNet-32 69.2 % K=12 of 15 (plain ResNet 68.7 %; vanilla dynamic routing 66.4 %, K=10),
  ResNet-74 70.9 % K=22 of 36 (70.5 %; vanilla 69.7 %, K=22),
  ResNet-110 72.9 % K=24 of 54 (71.2 %; vanilla 70.3 %, K=23).
  #Param with routers 0.49 / 1.21 / 1.83 M (ours with 100 classes: 494,610 / 1,215,148 /
  1,832,752). Backbone MACs per image 68.86 / 167.95 / 252.89 M (+5,760 for the larger classifier).
"""

from dynroute_jax import config_lib
from dynroute_jax.models import codinet

VARIANTS = ("resnet32", "resnet74", "resnet110")


def get_config(arg: str = "resnet110"):
  variant, overrides = codinet.parse_config_arg(arg, "resnet110", VARIANTS)
  c = config_lib.base_config()
  c.model = codinet.default_config(variant, num_classes=100, image_size=32, num_channels=3)

  c.data.name = "cifar100"
  c.data.image_size = 32
  c.data.num_channels = 3
  c.data.num_classes = 100
  c.data.crop_padding = 4
  c.data.flip = True
  c.data.cutout = 0
  c.data.num_views = 2

  c.train.global_batch_size = 128
  c.train.optimizer = "sgd"
  c.train.momentum = 0.9
  c.train.weight_decay = 1e-4
  c.train.consistency_margin = 0.2
  c.train.diversity_margin = 0.5
  c.train.num_stages = 2
  c.train.stage1 = config_lib.stage_config(
      epochs=220.0, lr=0.1, lr_schedule="multistep", lr_boundaries_epochs=(150, 200),
      lr_decay=0.1, tau_init=1.0, tau_floor=1.0, consistency_weight=0.2, diversity_weight=0.2,
      cost_weight=overrides.get("gamma", 0.0))
  c.train.stage2 = config_lib.stage_config(
      epochs=20.0, lr=0.001, lr_schedule="constant", tau_init=1.0, tau_floor=1.0,
      freeze_routers=True, hard_decisions=True)

  c.eval.threshold = 0.5
  c.eval.thresholds = (0.3, 0.4, 0.5, 0.6, 0.7)
  return c
