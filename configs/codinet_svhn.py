"""CoDiNet on SVHN (TPAMI paper, Table 4): routed CIFAR ResNet-110.

Run:

  python -m dynroute_jax.main --config=configs/codinet_svhn.py --workdir=runs/codinet_svhn_r110

(`:resnet110,gamma=G` sets the cost weight; `:resnet32` / `:resnet74` also work.)

Expected runtime (estimate, not measured): 73,257 training images (the core split, no "extra"),
40 + 10 epochs with M = 2 views: about an hour or two on one modern GPU.

Recipe: paper Sec. 4.1: random crop only (pad 4, no flip: digits are not mirror-symmetric), SGD
momentum 0.9, weight decay 1e-4, lr 0.1 multistep x0.1, alpha = beta = 0.2, m_c = 0.2, m_d = 0.5.
Paper silent, our choices: 40 stage-1 epochs with decays at 20 and 30 (the usual SVHN ResNet
schedule: the CIFAR schedule of 220 epochs over-trains this larger, easier set), M = 2 views,
gamma = 0, batch 128, stage 2 = 10 epochs at lr 0.001 with frozen routers and hard decisions.

Paper numbers to compare with (Table 4, top-1 %): ResNet-110 94.19 % at 0.50 GFLOPs; vanilla
dynamic routing 93.15 % at 0.38 GFLOPs; CoDiNet 94.28 % at 0.39 GFLOPs (GFLOPs = 2 x MACs; our
ResNet-110 backbone is 252.89 M MACs = 0.51 GFLOPs).
"""

from dynroute_jax import config_lib
from dynroute_jax.models import codinet

_CIFAR10 = config_lib.sibling_config(__file__, "codinet_cifar10")
VARIANTS = _CIFAR10.VARIANTS


def get_config(arg: str = "resnet110"):
  _, overrides = codinet.parse_config_arg(arg, "resnet110", VARIANTS)
  c = _CIFAR10.get_config(arg)
  c.data.name = "svhn_cropped"
  c.data.flip = False
  c.train.stage1 = config_lib.stage_config(
      epochs=40.0, lr=0.1, lr_schedule="multistep", lr_boundaries_epochs=(20, 30),
      lr_decay=0.1, tau_init=1.0, tau_floor=1.0, consistency_weight=0.2, diversity_weight=0.2,
      cost_weight=overrides.get("gamma", 0.0))
  c.train.stage2.epochs = 10.0
  return c
