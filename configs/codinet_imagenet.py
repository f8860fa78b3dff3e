"""CoDiNet on ImageNet (ILSVRC2012, TPAMI paper Table 3): routed ResNet-50 at 224x224.

Run:

  python -m dynroute_jax.main --config=configs/codinet_imagenet.py --workdir=runs/codinet_r50

(`:resnet50,gamma=G` sets the cost weight.)

Expected runtime (estimate, not measured): 90 + 10 epochs of 1.28 M images with M = 2 views, i.e.
~2x a standard ResNet-50 run: on the order of days on 8 modern GPUs. Needs a prepared
imagenet2012 TFDS directory (no download is possible).

Recipe: paper Sec. 4.1: SGD momentum 0.9, weight decay 1e-4, lr 0.1 decayed x0.1 every 30 epochs,
alpha = beta = 0.2, m_c = 0.2, m_d = 0.5; random crop + flip. Paper silent, our choices: 90
stage-1 epochs (boundaries 30, 60), batch 256, M = 2 views, gamma = 0, stage 2 = 10 epochs at lr
0.001 with frozen routers and hard decisions. Data: `crop_padding` is the CIFAR-style pad-and-crop
field; the ImageNet pipeline's random-resized crop is the data module's business.

Model: ResNet-50 v1.5 (torchvision: stride on the 3x3 conv), projection shortcuts, 16 routed
blocks; a skipped shape-changing block keeps its projection shortcut (skip_downsample='shortcut').
Backbone 25,557,032 params, 4.09 G MACs per image (8.18 GFLOPs). Routers with d = C_k (official
code; the paper gives no ResNet-50 router width) add 15,968,736 params but only 15.96 M MACs
(0.4 %); set model.router_hidden (e.g. 128) for a lighter router.

Paper numbers to compare with (Table 3, top-1 %): ResNet-50 77.15 % at "3.8 GFLOPs"; vanilla
dynamic routing 75.46 % at 3.0; CoDiNet 76.63 % at 3.1. The 3.8 is the ResNet paper's
multiply-add count of ResNet-50 v1 (stride on the first 1x1 conv: about 3.9 G MACs), i.e. MACs, not
2 x MACs as in the CIFAR tables: compare our MACs (v1.5: 4.09 G) with it.
"""

from dynroute_jax import config_lib
from dynroute_jax.models import codinet

VARIANTS = ("resnet50",)


def get_config(arg: str = "resnet50"):
  variant, overrides = codinet.parse_config_arg(arg, "resnet50", VARIANTS)
  c = config_lib.base_config()
  c.model = codinet.default_config(variant, num_classes=1000, image_size=224, num_channels=3)

  c.data.name = "imagenet2012"
  c.data.image_size = 224
  c.data.num_channels = 3
  c.data.num_classes = 1000
  c.data.crop_padding = 0
  c.data.flip = True
  c.data.cutout = 0
  c.data.num_views = 2

  c.train.global_batch_size = 256
  c.train.optimizer = "sgd"
  c.train.momentum = 0.9
  c.train.weight_decay = 1e-4
  c.train.consistency_margin = 0.2
  c.train.diversity_margin = 0.5
  c.train.num_stages = 2
  c.train.stage1 = config_lib.stage_config(
      epochs=90.0, lr=0.1, lr_schedule="multistep", lr_boundaries_epochs=(30, 60),
      lr_decay=0.1, tau_init=1.0, tau_floor=1.0, consistency_weight=0.2, diversity_weight=0.2,
      cost_weight=overrides.get("gamma", 0.0))
  c.train.stage2 = config_lib.stage_config(
      epochs=10.0, lr=0.001, lr_schedule="constant", tau_init=1.0, tau_floor=1.0,
      freeze_routers=True, hard_decisions=True)

  c.eval.threshold = 0.5
  c.eval.thresholds = (0.3, 0.4, 0.5, 0.6, 0.7)
  c.eval.batch_size = 128
  return c
