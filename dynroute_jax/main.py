"""Trains and evaluates a routed model from a config file.

  python -m dynroute_jax.main --config=configs/drnet_cifar10.py:S --workdir=runs/drnet_s

Running the same command again with the same workdir resumes from the newest intact checkpoint.
Config fields are overridden as `--config.train.stage1.steps=100`; `--config.<field>=None` sets a
field that allows None (`--config.checkpoint.keep=None` keeps every checkpoint).
Config files are Python and run as code: only use config files you trust.

Exit status: 0 when training and evaluation finished, and also after SIGTERM/SIGINT once the
checkpoint of the current step is saved (rerun the same command to resume); 2 for a bad input
(config, data, work directory, checkpoints), with a one-line message; 1 for a fault during
training (non-finite loss, a failed save), likewise.

Output: one line per log interval, per compile and per checkpoint, then the evaluation table;
libraries' INFO messages appear with absl's `--verbosity` (e.g. `-v 0`), see
`dynroute_jax/console.py`. Compiled steps are kept in JAX's persistent compilation cache, so a
rerun starts training sooner (`$DYNROUTE_JAX_CACHE`, see `dynroute_jax/compile_cache.py`).
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/digits.py or "
                                "configs/drnet_cifar10.py:S.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the evaluation report.")
flags.mark_flags_as_required(["config", "workdir"])

# `--config.a.b=None`: absl parses a config override by the field's type, so it cannot give an int
# field None (`checkpoint.keep=None` keeps every checkpoint). Such overrides are taken out of argv
# before parsing and applied to the parsed config; validation then checks them as any value.
_NONE_OVERRIDE = re.compile(r"--config\.([A-Za-z_][\w.]*)=None")
_NONE_PATHS: list[str] = []


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, after taking the `--config.<path>=None` overrides out of argv."""
  kept = argv[:1]
  for arg in argv[1:]:
    m = _NONE_OVERRIDE.fullmatch(arg)
    if m:
      _NONE_PATHS.append(m.group(1))
    else:
      kept.append(arg)
  return app.parse_flags_with_usage(kept)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from dynroute_jax import compile_cache
  from dynroute_jax import console
  console.configure_for_program()
  compile_cache.enable()
  # Multi-host set-up must come before any other JAX call.
  from dynroute_jax import distributed
  distributed.maybe_initialize(FLAGS.config.distributed)
  from dynroute_jax import checkpoint as ckpt_lib
  from dynroute_jax import train
  from dynroute_jax import config_lib
  try:
    config_lib.set_to_none(FLAGS.config, _NONE_PATHS)
    report = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (train.NonFiniteError, ckpt_lib.CheckpointSaveError) as e:
    _fail(e, 1)
  except (ValueError, OSError, ckpt_lib.CheckpointError) as e:
    _fail(e, 2)
  if report.get("preempted"):
    logging.warning("Stopped by a signal; checkpoint step %d is saved. Rerun the same command to "
                    "resume.", report["step"])
    return
  logging.info("Report: %s", json.dumps(report, default=str)[:2000])
  if not FLAGS.config.dry_run:
    console.info(f"Wrote {os.path.join(FLAGS.workdir, 'eval', 'report.json')}")


def _fail(error: BaseException, status: int) -> None:
  """Logs the traceback (for bug reports), then ends with the message alone as the last line."""
  logging.info("Stopping on %s:", type(error).__name__, exc_info=error)
  from dynroute_jax import console
  console.final_error(f"main: error: {type(error).__name__}: {error}")
  sys.exit(status)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
