"""Trains and evaluates a routed model from a config file.

  python -m dynroute_jax.main --config=configs/drnet_cifar10.py:S --workdir=runs/drnet_s

Running the same command again with the same workdir resumes from the newest intact checkpoint.
Config files are Python and run as code: only use config files you trust.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/digits.py or "
                                "configs/drnet_cifar10.py:S.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the evaluation report.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Multi-host set-up must come before any other JAX call.
  from dynroute_jax import distributed
  distributed.maybe_initialize(FLAGS.config.distributed)
  from dynroute_jax import train
  report = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  logging.info("Report: %s", json.dumps(report, default=str)[:2000])


if __name__ == "__main__":
  app.run(main)
