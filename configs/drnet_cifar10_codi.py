"""DRNet on CIFAR-10 trained additionally with CoDiNet's consistency and diversity losses.

Command (variant after the colon; default S):

  python -m dynroute_jax.main --config=configs/drnet_cifar10_codi.py:S --workdir=runs/drnet_codi_s

Expected runtime: about twice the plain DRNet run of the same variant per epoch, since each image
is seen in num_views = 2 augmented views (the paper's 2.5 / 5.5 GPU days for S / M become roughly
5 / 11); not measured.

What it combines: everything of configs/drnet_cifar10.py (model sizes and the DRNet paper's numbers
to compare with are listed there: S 3.66 % / 0.57M / 84.65M, M 2.84 % / 1.86M / 267.3M,
L 2.27 % / 4.41M / 603.1M all branches), plus CoDiNet's (TPAMI) consistency loss (margin 0.2) over
the 2 views of each image and diversity loss (margin 0.5) between the images of a batch, both
computed on DRNet's routing path: `ModelOutput.path`, the L x 8 x 5 branch weights of each image.
Weights alpha = beta = 0.2 as in CoDiNet, in both stages (our choice: the routers learn in both).
There is no paper number for this combination; compare against the plain DRNet run.
"""

import importlib.util
import os


def _load_base():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "drnet_cifar10.py")
  spec = importlib.util.spec_from_file_location("drnet_cifar10_base", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = "S"):
  c = _load_base().get_config(arg)
  c.data.num_views = 2
  c.train.consistency_margin = 0.2
  c.train.diversity_margin = 0.5
  for stage in (c.train.stage1, c.train.stage2):
    stage.consistency_weight = 0.2
    stage.diversity_weight = 0.2
  return c
