"""DRNet(L) on ImageNet (ILSVRC-2012), 224x224 (paper Table 2).

Command:

  python -m dynroute_jax.main --config=configs/drnet_imagenet.py --workdir=runs/drnet_imagenet

Expected runtime: not reported by the paper and not measured here; DARTS-sized ImageNet models take
several GPU days per 250 epochs, and this config runs two stages of 250 epochs each.

Paper numbers to compare with (Table 2, DRNet(L)-R-0.01-T-0.8, dynamic routing at T=0.8):
  top-1 error 29.8 %, 3.8M params, 351M FLOPs (= MACs); "T=0.8 reduces FLOPs by 27.63%", so the
  all-branch model is about 351 / (1 - 0.2763) = 485M MACs.

Measured (per 224x224 image, all branches, auxiliary head excluded):
  backbone 4,225,080 params / 434.2M MACs; routers 674,768 / 71.6M; total 4,899,848 params /
  505.9M MACs (+4.3% against the implied 485M); auxiliary head 1,229,544 params / 1.4M MACs.
  The paper gives no all-branch parameter count for ImageNet.

Architecture: DARTS ImageNet stems (stem0: conv3x3/2 -> C/2, BN, ReLU, conv3x3/2 -> C, BN;
stem1: ReLU, conv3x3/2 -> C, BN), 10 cells of 32 initial channels (DRNet(L)), DARTS ImageNet
auxiliary head (avg-pool 5 stride 2).

Our choices where the paper is silent: stage 1 keeps tau fixed at its initial 5; stage 2 starts at
5 and decays per epoch so that it reaches 0.8 at the end of its 250 epochs
(rate ln(5 / 0.8) / 250); learning rate 0.1 (DARTS ImageNet) in stage 1 and 0.02 in stage 2 (the
CIFAR ratio 0.005 / 0.025); both decayed by 0.97 per epoch ("250 epochs of 0.97 learning rate
decay"); no drop-path or drop-branch (the paper gives those for CIFAR-10 only); batch 128.
"""

import math

from dynroute_jax import config_lib
from dynroute_jax.models import drnet

EPOCHS = 250


def get_config(arg: str = "L"):
  variant = arg or "L"
  if variant not in ("S", "M", "L"):
    raise ValueError(f"configs/drnet_imagenet.py takes a variant in ('S', 'M', 'L'); got {arg!r}.")
  c = config_lib.base_config()
  c.model = drnet.default_config(variant, num_classes=1000, image_size=224, num_channels=3)
  c.model.stem = "imagenet"
  c.model.aux_pool_stride = 2

  c.data.name = "imagenet2012"
  c.data.image_size = 224
  c.data.num_channels = 3
  c.data.num_classes = 1000
  c.data.crop_padding = 0
  c.data.flip = True
  c.data.cutout = 0
  c.data.autoaugment = True

  c.train.global_batch_size = 128
  c.train.optimizer = "nesterov"
  c.train.momentum = 0.9
  c.train.weight_decay = 3e-5
  c.train.label_smoothing = 0.1
  c.train.num_stages = 2
  per_epoch = tuple(float(e) for e in range(1, EPOCHS))
  c.train.stage1 = config_lib.stage_config(
      epochs=float(EPOCHS), lr=0.1, lr_schedule="multistep", lr_boundaries_epochs=per_epoch,
      lr_decay=0.97, tau_init=5.0, tau_decay_per_epoch=0.0, tau_floor=5.0,
      resource_weight=0.0, aux_weight=0.4, drop_path_rate=0.0)
  c.train.stage2 = config_lib.stage_config(
      epochs=float(EPOCHS), lr=0.02, lr_schedule="multistep", lr_boundaries_epochs=per_epoch,
      lr_decay=0.97, tau_init=5.0, tau_decay_per_epoch=math.log(5.0 / 0.8) / EPOCHS,
      tau_floor=0.8, resource_weight=0.01, aux_weight=0.4, drop_path_rate=0.0)

  c.eval.threshold = 0.8
  c.eval.batch_size = 128
  return c
