"""`python -m dynroute_jax.summary`: a model's size from its config, and its bad inputs."""

import json
import os
import subprocess
import sys

import pytest

from dynroute_jax import summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _summary(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "dynroute_jax.summary", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_json_summary_of_the_digits_model():
  proc = _summary("--config=configs/digits.py", "--json")
  assert proc.returncode == 0, proc.stderr[-2000:]
  s = json.loads(proc.stdout)
  assert s["model"] == "drnet" and s["image_size"] == 8
  assert s["params_model"] == s["params_backbone"] + s["params_routers"] > 0
  # The MACs tables against the independent count of the traced forward pass.
  assert s["macs_all_branches"] == pytest.approx(s["macs_traced_forward"])


def test_bad_inputs_are_refused_in_one_line(tiny_config):
  # Regression: without --config the command ended in an AttributeError traceback, and a model
  # input size that differs from the data's was summarised at the data's size.
  proc = _summary()
  assert proc.returncode != 0 and "--config must have a value" in proc.stderr
  proc = _summary("--config=configs/digits.py", "--config.model.image_size=16")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "summary: error: ValueError: config.model.image_size (16) differs from "
      "config.data.image_size (8); set both to the dataset's value.")
  config = tiny_config("codinet")
  config.model.num_classes = 3
  with pytest.raises(ValueError, match=r"config\.model\.num_classes \(3\) differs"):
    summary.model_summary(config)
