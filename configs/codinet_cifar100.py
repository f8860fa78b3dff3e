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

_CIFAR10 = config_lib.sibling_config(__file__, "codinet_cifar10")
VARIANTS = _CIFAR10.VARIANTS


def get_config(arg: str = "resnet110"):
  c = _CIFAR10.get_config(arg)
  c.model.num_classes = 100
  c.data.name = "cifar100"
  c.data.num_classes = 100
  return c
