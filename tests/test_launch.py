"""Launch scripts: shell syntax, argument checks and the sweep's commands (nothing is launched)."""

import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")


@pytest.mark.parametrize("script", ["local.sh", "slurm.sbatch", "tpu_pod.sh"])
def test_shell_syntax_and_usage(script):
  path = os.path.join(LAUNCH, script)
  subprocess.run(["bash", "-n", path], check=True)
  env = {k: v for k, v in os.environ.items() if k not in ("TPU", "ZONE")}
  proc = subprocess.run(["bash", path], capture_output=True, text=True, env=env, timeout=60)
  assert proc.returncode == 2 and "usage" in proc.stderr


def _sweep(*args):
  proc = subprocess.run([sys.executable, os.path.join(LAUNCH, "sweep.py"), *args],
                        capture_output=True, text=True, timeout=60)
  return proc.returncode, [shlex.split(line) for line in proc.stdout.splitlines()], proc.stderr


def test_sweep_dry_local():
  rc, cmds, err = _sweep("--dry", "--root=runs/sw", "configs/drnet_cifar10.py",
                         "configs/codinet_cifar10.py:resnet110,gamma=0.1", "--variants", "S", "M",
                         "--", "--config.seed=3")
  assert rc == 0, err
  assert [c[1:] for c in cmds] == [
      ["configs/drnet_cifar10.py:S", "runs/sw/drnet_cifar10_S", "--config.seed=3"],
      ["configs/drnet_cifar10.py:M", "runs/sw/drnet_cifar10_M", "--config.seed=3"],
      ["configs/codinet_cifar10.py:resnet110,gamma=0.1", "runs/sw/codinet_cifar10_resnet110-gamma-0.1",
       "--config.seed=3"]]
  assert all(c[0].endswith("launch/local.sh") for c in cmds)


def test_sweep_dry_slurm_and_errors():
  rc, cmds, err = _sweep("--dry", "--launcher=slurm", "--sbatch_args=--nodes=2 --time=1:00:00",
                         "--root=/shared/r", "configs/drnet_cifar10.py:L")
  assert rc == 0, err
  assert cmds == [["sbatch", "--job-name=dr-drnet_cifar10_L", "--nodes=2", "--time=1:00:00",
                   os.path.join(LAUNCH, "slurm.sbatch"), "configs/drnet_cifar10.py:L",
                   "/shared/r/drnet_cifar10_L"]]
  assert _sweep("--dry", "--root=r", "configs/x.py:A", "configs/x.py:A")[0] != 0
  assert _sweep("--dry", "--root=r", "configs/x")[0] != 0


def test_tpu_launcher_refuses_a_relative_workdir(tmp_path):
  # Regression: a relative WORKDIR lay inside ~/dynroute_jax on the workers, which every launch
  # deletes and unpacks again, so the next launch wiped the earlier checkpoints.
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  (fake_bin / "gcloud").write_text("#!/bin/sh\necho gcloud called >&2\nexit 7\n")
  (fake_bin / "gcloud").chmod(0o755)
  env = dict(os.environ, TPU="t", ZONE="z", PATH=f"{fake_bin}:{os.environ['PATH']}")
  proc = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "configs/digits.py",
                         "runs/sweep/x"], capture_output=True, text=True, env=env, timeout=60)
  assert proc.returncode == 2, proc.stderr
  assert "WORKDIR must be an absolute path" in proc.stderr and "gcloud called" not in proc.stderr
  for workdir in ("/shared/runs/x", "gs://bucket/runs/x"):  # Accepted: they reach gcloud.
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "configs/digits.py",
                           workdir], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 7 and "gcloud called" in proc.stderr, proc.stderr
  rc, _, err = _sweep("--dry", "--launcher=tpu", "--root=runs/sw", "configs/drnet_cifar10.py:S")
  assert rc != 0 and "absolute --root" in err
  rc, cmds, err = _sweep("--dry", "--launcher=tpu", "--root=/shared/sw",
                         "configs/drnet_cifar10.py:S")
  assert rc == 0 and cmds[0][1:] == ["configs/drnet_cifar10.py:S", "/shared/sw/drnet_cifar10_S"]
