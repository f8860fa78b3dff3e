"""One process of a multi-process test run (started by tests/test_multiprocess.py, not by pytest).

  python tests/mp_driver.py --workdir=DIR --out=OUT.json [--num_processes=2 --process_id=I --port=P]
                            [--restore_from=OTHER_WORKDIR] [--override field=value ...]

Trains the tiny config of `tiny_config()` (CoDiNet's routed ResNet-8 on CIFAR-10 under
`tfds.testing.mock_data`) with `train.train_and_evaluate`, recording every step's metrics through
its `metrics_callback`. Process 0 writes OUT.json: the per-step losses, the evaluation report, the
device and process counts. With several processes it then runs `train_and_evaluate` again on the
same workdir (every process resumes, finds every stage done, and re-evaluates), recording that
under 'rerun'. With `--restore_from` (single process only) it also restores that
workdir's final checkpoint with `checkpoint.restore_for_eval`, compares it with its own, and
re-runs `train_and_evaluate` on a copy of that workdir (which resumes, finds every stage done, and
only evaluates), recording the results under 'restored'.

The device count comes from the environment (XLA_FLAGS=--xla_force_host_platform_device_count=N,
JAX_PLATFORMS=cpu), set by the caller before this process starts.
"""

import argparse
import faulthandler
import json
import os
import shutil
import signal
import sys
import time

T0 = time.time()

# Mock examples per split: 3 steps of 16 use 48 of them; 52 test examples leave a padded last
# evaluation batch (52 = 32 + 20), so the evaluation's masking is exercised.
NUM_EXAMPLES = 52


def tiny_config(overrides=()):
  """conftest's tiny CoDiNet on CIFAR-10, one stage of 3 steps; `overrides`: 'field.path=json value'.

  CoDiNet rather than DRNet: its step compiles about 3 times faster (3.8 against 12.4 s on 8 fake
  devices), and it draws Gumbel noise from the same routing stream, so the losses of 2 x 4 and
  1 x 8 devices still agree only if that noise does not depend on the partition.
  """
  from conftest import make_tiny_config
  c = make_tiny_config("codinet", "cifar10", stage1_steps=3, stage2_steps=0, batch=16)
  c.train.num_stages = 1
  for item in overrides:
    key, _, value = item.partition("=")
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value if isinstance(node[leaf], str) else type(node[leaf])(json.loads(value))
  return c


def _run(config, workdir):
  from dynroute_jax import train
  import tensorflow_datasets as tfds
  losses = {}

  def on_metrics(step, scalars):
    losses[int(step)] = scalars["loss/total"]
    print(f"[{time.time() - T0:.1f} s] step {step} loss {scalars['loss/total']:.6f}", flush=True)

  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    report = train.train_and_evaluate(config, workdir, metrics_callback=on_metrics)
  return losses, report


def main():
  # `kill -USR1` prints every thread's stack: the test sends it to a process that overran its time.
  faulthandler.register(signal.SIGUSR1, all_threads=True)
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--timeout", type=int, default=120)
  parser.add_argument("--restore_from", default="")
  parser.add_argument("--override", action="append", default=[])
  args = parser.parse_args()

  from absl import logging
  logging.set_verbosity(logging.INFO)
  logging.set_stderrthreshold(logging.INFO)
  logging.use_absl_handler()
  import ml_collections
  from dynroute_jax import distributed
  dist = ml_collections.ConfigDict(dict(initialize="never", coordinator_address="", num_processes=0,
                                        process_id=-1, initialization_timeout=args.timeout))
  if args.port:
    dist.update(initialize="auto", coordinator_address=f"127.0.0.1:{args.port}",
                num_processes=args.num_processes, process_id=args.process_id)
  config = tiny_config(args.override)
  config.distributed = dist
  distributed.maybe_initialize(config.distributed)

  import jax
  import numpy as np
  losses, report = _run(config, args.workdir)
  result = {"process_count": jax.process_count(), "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(),
            "losses": {str(k): v for k, v in sorted(losses.items())}, "report": report}

  if jax.process_count() > 1:
    # Again on the same workdir: every process resumes from the final checkpoint, finds every
    # stage done, and only re-evaluates (the multi-process resume path).
    rerun_losses, rerun_report = _run(config, args.workdir)
    result["rerun"] = {"losses": {str(k): v for k, v in rerun_losses.items()},
                       "report": rerun_report}

  if args.restore_from:
    from dynroute_jax import checkpoint
    mine = checkpoint.restore_for_eval(os.path.join(args.workdir, "checkpoints"))
    theirs = checkpoint.restore_for_eval(os.path.join(args.restore_from, "checkpoints"))
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         (mine.params, mine.batch_stats), (theirs.params, theirs.batch_stats))
    same_tree = (jax.tree.structure((mine.params, mine.batch_stats))
                 == jax.tree.structure((theirs.params, theirs.batch_stats)))
    copy = args.workdir + "_resumed"
    shutil.copytree(args.restore_from, copy)
    resumed_losses, resumed_report = _run(config, copy)
    result["restored"] = {
        "meta_step": theirs.meta.get("step"), "same_structure": same_tree,
        "max_abs_diff": max(jax.tree.leaves(diffs)),
        "num_leaves": len(jax.tree.leaves(theirs.params)),
        "resumed_losses": {str(k): v for k, v in resumed_losses.items()},
        "resumed_report": resumed_report}

  if jax.process_index() == 0:
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
      json.dump(result, f, indent=1, default=str)
    os.replace(tmp, args.out)
  print(f"driver process {jax.process_index()} done", flush=True)


if __name__ == "__main__":
  sys.exit(main())
