#!/usr/bin/env python3
"""Launches several config variants, each with its own workdir.

  python launch/sweep.py --root=runs/sweep configs/drnet_cifar10.py --variants S M L
  python launch/sweep.py --launcher=slurm --root=/shared/runs configs/drnet_cifar10.py:S \\
      configs/codinet_cifar10.py:resnet110,gamma=0.1 -- --config.train.global_batch_size=256
  python launch/sweep.py --dry ...      # print the commands only

Each positional spec is one run, `CONFIG_FILE[:ARG]`, passed to --config unchanged (config
arguments may contain commas). `--variants A B` turns every spec without ':' into one run per
variant (`x.py:A`, `x.py:B`). Flags after `--` are passed to every run. The workdir of
`configs/x.py:S` is `ROOT/x_S` (characters other than letters, digits, '_', '.', '-' become '-').

Launchers:
  local  runs the variants one after another on this host (launch/local.sh); stops at the first
         failure unless --keep_going.
  slurm  submits one job per variant (sbatch launch/slurm.sbatch); they run concurrently as the
         cluster allows. Extra sbatch options go in --sbatch_args, e.g. "--nodes=2 --time=4:00:00".
  tpu    runs the variants one after another on the TPU slice $TPU in $ZONE (launch/tpu_pod.sh);
         a slice runs one job at a time. For many small CIFAR runs, several small slices
         (one per variant) use a pod better than one big slice: see launch/README.md.
Paths are relative to the current directory; the tpu launcher needs an absolute --root or a
bucket URL (each launch replaces the code directory the workers run in, where a relative one
would be). Rerunning the same sweep resumes every unfinished run from its checkpoints.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

LAUNCH_DIR = os.path.dirname(os.path.abspath(__file__))


def expand_specs(specs: list[str], variants: list[str] | None = None) -> list[str]:
  out = []
  for spec in specs:
    path, sep, arg = spec.partition(":")
    if not path.endswith(".py"):
      raise SystemExit(f"not a config file (CONFIG.py[:ARG]): {spec!r}")
    if sep and not arg:
      raise SystemExit(f"empty config argument in {spec!r}")
    if sep or not variants:
      out.append(spec)
    else:
      out.extend(f"{path}:{v}" for v in variants)
  if len(set(out)) != len(out):
    raise SystemExit(f"duplicate runs in {out}")
  return out


def workdir_for(root: str, spec: str) -> str:
  path, _, variant = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  if variant:
    name += "_" + re.sub(r"[^A-Za-z0-9_.-]+", "-", variant)
  return os.path.join(root, name)


def command_for(launcher: str, spec: str, workdir: str, extra: list[str],
                sbatch_args: list[str]) -> list[str]:
  if launcher == "local":
    return [os.path.join(LAUNCH_DIR, "local.sh"), spec, workdir, *extra]
  if launcher == "slurm":
    job = "dr-" + os.path.basename(workdir)
    return ["sbatch", f"--job-name={job}", *sbatch_args, os.path.join(LAUNCH_DIR, "slurm.sbatch"),
            spec, workdir, *extra]
  if launcher == "tpu":
    return [os.path.join(LAUNCH_DIR, "tpu_pod.sh"), spec, workdir, *extra]
  raise ValueError(launcher)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  extra: list[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1:]
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("specs", nargs="+", help="CONFIG.py[:ARG], one run each")
  parser.add_argument("--variants", nargs="+", default=None,
                      help="one run per variant for every spec given without ':'")
  parser.add_argument("--root", required=True, help="parent directory of the per-run workdirs")
  parser.add_argument("--launcher", choices=("local", "slurm", "tpu"), default="local")
  parser.add_argument("--sbatch_args", default="", help="extra sbatch options (slurm launcher)")
  parser.add_argument("--keep_going", action="store_true",
                      help="local/tpu: continue after a failed run")
  parser.add_argument("--dry", action="store_true", help="print the commands, run nothing")
  args = parser.parse_args(argv)

  runs = expand_specs(args.specs, args.variants)
  sbatch_args = shlex.split(args.sbatch_args)
  if args.launcher == "tpu" and not args.dry and not (os.environ.get("TPU") and os.environ.get("ZONE")):
    parser.error("the tpu launcher needs TPU and ZONE in the environment")
  if args.launcher == "tpu" and not (os.path.isabs(args.root) or "://" in args.root):
    parser.error(f"the tpu launcher needs an absolute --root every worker sees, or a bucket URL "
                 f"(gs://...); got {args.root!r}, which would lie in the code directory each "
                 "launch replaces")
  commands = [command_for(args.launcher, spec, workdir_for(args.root, spec), extra, sbatch_args)
              for spec in runs]
  failed = []
  for spec, cmd in zip(runs, commands):
    print(shlex.join(cmd), flush=True)
    if args.dry:
      continue
    rc = subprocess.call(cmd)
    if rc:
      failed.append(spec)
      print(f"[sweep] {spec}: exit status {rc}", file=sys.stderr, flush=True)
      if args.launcher != "slurm" and not args.keep_going:
        break
  if failed:
    print(f"[sweep] failed: {' '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
