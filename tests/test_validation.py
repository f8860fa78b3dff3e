"""Bad inputs: each one fails with a message naming what is wrong, before anything is compiled,
and without touching what an earlier run saved in the work directory.

Each case of `CASES` is (name, how it is tried, expected exception, expected message pattern, a
function that tries it and returns the message). `python tests/test_validation.py` prints the
table of cases and the messages they give (the README quotes it).
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest

from conftest import xla_flags  # pylint: disable=g-bad-import-order

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dynroute_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
from dynroute_jax import config_lib
from dynroute_jax import evaluation
from dynroute_jax import train
from dynroute_jax import models

TINY = {"train.stage1.steps": 4, "train.stage2.steps": 2, "checkpoint.every_steps": 2,
        "model.num_nodes": 1, "model.init_channels": 4, "train.global_batch_size": 16}
CLI_TIMEOUT_S = 300


class CompileReached(AssertionError):
  """Raised if a bad input got as far as building the train state (the first compile)."""


def digits_config(overrides=None, variant: str = "drnet"):
  """configs/digits.py made tiny, with `overrides` ({'a.b': value}) applied."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("digits_config", REPO / "configs" / "digits.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  for key, value in {**(TINY if variant == "drnet" else {}), **(overrides or {})}.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def snapshot(root) -> dict[str, str]:
  """sha256 of every file under root, by relative path."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def make_earlier_run(workdir, config=None) -> None:
  """A work directory as an earlier run leaves it: config.json and a (small) checkpoint."""
  config = config or digits_config()
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(json.loads(config.to_json_best_effort()), f, indent=2, sort_keys=True)
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False,
                             fingerprint=train.model_fingerprint(config)) as ckpt:
    ckpt.save(2, params={"w": np.arange(3.0, dtype=np.float32)},
              meta={"stage": 1, "model": config.model.name})


def train_message(config, workdir, monkeypatch, expected=Exception) -> str:
  """Runs train_and_evaluate on a work directory holding an earlier run; returns the error.

  Fails if the state would have been built (the first compile) or the earlier run's files changed.
  """
  workdir = str(workdir)
  if not os.path.exists(workdir):
    make_earlier_run(workdir)
  before = snapshot(workdir)

  def no_compile(*args, **kwargs):
    raise CompileReached("a bad input reached the compile stage")

  monkeypatch.setattr(train, "create_state", no_compile)
  with pytest.raises(expected) as e:
    train.train_and_evaluate(config, workdir)
  assert not isinstance(e.value, CompileReached), "the error did not come before compiling"
  monkeypatch.undo()
  assert snapshot(workdir) == before, "files of the earlier run changed"
  return f"{type(e.value).__name__}: {e.value}"


def cli_message(args, env_extra=None, module="dynroute_jax.main") -> str:
  """Runs a command-line entry point; returns its last line of output (it must fail)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.update(env_extra or {})
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
  assert proc.returncode != 0, proc.stderr[-2000:]
  lines = [l.strip() for l in proc.stderr.splitlines() if l.strip()]
  # absl prints flag errors as "FATAL Flags parsing error:", the flag's error (for a config file
  # that raised: a traceback ending with the exception), then a usage hint.
  for i, line in enumerate(lines):
    if "Flags parsing error" in line:
      block = [l for l in lines[i + 1:] if not l.startswith("Pass --help")]
      if "Traceback (most recent call last):" in block:
        return f"{line} {block[0]} ... {block[-1]}"
      return " ".join([line] + block)
  return lines[-1]


# ----------------------------------------------------------------------------------------------
# The cases. Each returns the message the user sees.


def c_misspelled_field_file(tmp_path, mp):
  config = digits_config()
  config.train.skip_nonfinite_step = True  # A typo in a config file: ConfigDicts accept new fields.
  return train_message(config, tmp_path / "w", mp, ValueError)


def c_misspelled_field_cli(tmp_path, mp):
  return cli_message(["--config=configs/digits.py", "--config.train.stage1.lr_schedul=constant",
                      f"--workdir={tmp_path / 'w'}"])


def c_misspelled_model_field(tmp_path, mp):
  config = digits_config()
  config.model.num_cell = 3
  return train_message(config, tmp_path / "w", mp, ValueError)


def c_wrong_type_cli(tmp_path, mp):
  return cli_message(["--config=configs/digits.py", "--config.train.global_batch_size=sixty",
                      f"--workdir={tmp_path / 'w'}"])


def c_wrong_type_file(tmp_path, mp):
  config = digits_config()
  with pytest.raises(TypeError) as e:
    config.eval.threshold = "0.8"  # In a config file; ml_collections checks the type.
  return f"TypeError: {e.value}"


def c_threshold_out_of_range(tmp_path, mp):
  return train_message(digits_config({"eval.threshold": 1.5}), tmp_path / "w", mp, ValueError)


def c_sweep_threshold_zero(tmp_path, mp):
  return train_message(digits_config({"eval.thresholds": (0.0, 0.5)}), tmp_path / "w", mp,
                       ValueError)


def c_tau_zero(tmp_path, mp):
  return train_message(digits_config({"train.stage2.tau_init": 0.0}), tmp_path / "w", mp,
                       ValueError)


def c_tau_floor_above_init(tmp_path, mp):
  return train_message(digits_config({"train.stage2.tau_floor": 2.0}), tmp_path / "w", mp,
                       ValueError)


def c_batch_not_divisible(tmp_path, mp):
  return cli_message(["--config=configs/digits.py", "--config.train.global_batch_size=30",
                      f"--workdir={tmp_path / 'w'}"],
                     {"XLA_FLAGS": xla_flags(4)})


def c_none_for_an_int_field(tmp_path, mp):
  return cli_message(["--config=configs/digits.py", "--config.train.global_batch_size=None",
                      f"--workdir={tmp_path / 'w'}"])


def c_batch_exceeds_dataset(tmp_path, mp):
  return train_message(digits_config({"train.global_batch_size": 4096}), tmp_path / "w", mp,
                       ValueError)


def c_mesh_too_big(tmp_path, mp):
  return train_message(digits_config({"mesh.data": 64}), tmp_path / "w", mp, ValueError)


def c_image_size_vs_reductions(tmp_path, mp):
  return train_message(digits_config({"model.image_size": 10, "data.image_size": 10}),
                       tmp_path / "w", mp, ValueError)


def c_model_data_mismatch(tmp_path, mp):
  return train_message(digits_config({"model.image_size": 16}), tmp_path / "w", mp, ValueError)


def c_data_shape_mismatch(tmp_path, mp):
  return train_message(digits_config({"model.image_size": 16, "data.image_size": 16}),
                       tmp_path / "w", mp, ValueError)


def c_unknown_dataset(tmp_path, mp):
  return train_message(digits_config({"data.name": "mnist"}), tmp_path / "w", mp, ValueError)


def _cifar_shape():
  return {"data.name": "cifar10", "data.image_size": 32, "data.num_channels": 3,
          "model.image_size": 32, "model.num_channels": 3}


def c_missing_dataset(tmp_path, mp):
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  t0 = time.time()
  msg = train_message(digits_config({**_cifar_shape(), "data.data_dir": str(data_dir)}),
                      tmp_path / "w", mp, FileNotFoundError)
  assert time.time() - t0 < 60, "a missing dataset must fail fast, not retry a download"
  return msg


def c_wrong_data_dir(tmp_path, mp):
  return train_message(digits_config({**_cifar_shape(), "data.data_dir": str(tmp_path / "nope")}),
                       tmp_path / "w", mp, FileNotFoundError)


def c_workdir_of_another_model(tmp_path, mp):
  workdir = tmp_path / "w"
  make_earlier_run(workdir, digits_config(variant="codinet"))
  return train_message(digits_config(), workdir, mp, ValueError)


def c_checkpoints_of_another_model(tmp_path, mp):
  workdir = tmp_path / "w"
  make_earlier_run(workdir, digits_config(variant="codinet"))
  os.remove(workdir / "config.json")  # Only the checkpoints tell.
  return train_message(digits_config(), workdir, mp, ckpt_lib.FingerprintMismatchError)


def c_read_only_workdir(tmp_path, mp):
  workdir = tmp_path / "w"
  make_earlier_run(workdir)
  if os.geteuid() != 0:
    os.chmod(workdir, 0o555)
  else:  # root ignores permissions: simulate a read-only file system under the work directory.
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
      if str(path).startswith(str(workdir)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
      return real_open(path, flags, *args, **kwargs)

    mp.setattr(os, "open", read_only_open)
    real_builtin_open = builtins.open  # What pathlib-style (etils.epath) writes go through.

    def read_only_builtin_open(file, mode="r", *args, **kwargs):
      if str(file).startswith(str(workdir)) and any(c in mode for c in "wax+"):
        raise OSError(errno.EROFS, "Read-only file system", str(file))
      return real_builtin_open(file, mode, *args, **kwargs)

    mp.setattr(builtins, "open", read_only_builtin_open)
  try:
    config = digits_config()
    before = snapshot(workdir)
    with pytest.raises(OSError) as e:
      train.train_and_evaluate(config, str(workdir))
  finally:
    mp.undo()
    os.chmod(workdir, 0o755)
  assert snapshot(workdir) == before
  return f"{type(e.value).__name__}: {e.value}"


def c_workdir_is_a_file(tmp_path, mp):
  path = tmp_path / "w"
  path.write_text("not a directory")
  config = digits_config()
  with pytest.raises(OSError) as e:
    train.train_and_evaluate(config, str(path))
  assert path.read_text() == "not a directory"
  return f"{type(e.value).__name__}: {e.value}"


def c_consistency_without_views(tmp_path, mp):
  config = digits_config({"data.num_views": 1}, variant="codinet")
  return train_message(config, tmp_path / "w", mp, ValueError)


def c_unknown_variant(tmp_path, mp):
  return cli_message(["--config=configs/digits.py:resnet", f"--workdir={tmp_path / 'w'}"])


def c_missing_config_file(tmp_path, mp):
  return cli_message(["--config=configs/nope.py", f"--workdir={tmp_path / 'w'}"])


def _eval_workdir(tmp_path) -> Path:
  workdir = tmp_path / "w"
  make_earlier_run(workdir)
  return workdir


def c_eval_missing_step(tmp_path, mp):
  from dynroute_jax import evaluate  # pylint: disable=g-import-not-at-top
  workdir = _eval_workdir(tmp_path)
  before = snapshot(workdir)
  with pytest.raises(ckpt_lib.CheckpointNotFoundError) as e:
    evaluate.evaluate_workdir(str(workdir), step=999, plots=False, instance_awareness=False)
  assert snapshot(workdir) == before
  return f"{type(e.value).__name__}: {e.value}"


def c_eval_no_checkpoints(tmp_path, mp):
  from dynroute_jax import evaluate  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "config.json").write_text(digits_config().to_json_best_effort())
  with pytest.raises(ckpt_lib.CheckpointNotFoundError) as e:
    evaluate.evaluate_workdir(str(workdir), plots=False, instance_awareness=False)
  return f"{type(e.value).__name__}: {e.value}"


def c_eval_damaged_step(tmp_path, mp):
  from dynroute_jax import evaluate  # pylint: disable=g-import-not-at-top
  workdir = _eval_workdir(tmp_path)
  data = [p for p in (workdir / "checkpoints" / "2" / "params").rglob("*") if p.is_file()]
  target = max(data, key=lambda p: p.stat().st_size)
  raw = bytearray(target.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  target.write_bytes(bytes(raw))
  before = snapshot(workdir)
  with pytest.raises(ckpt_lib.DamagedCheckpointError) as e:
    evaluate.evaluate_workdir(str(workdir), step=2, plots=False, instance_awareness=False)
  assert snapshot(workdir) == before
  return f"{type(e.value).__name__}: {e.value}"


def c_eval_wrong_image_shape(tmp_path, mp):
  config = digits_config()
  model = models.build_model(config.model)
  predict = evaluation.make_predict_fn(model, config.data, tau=1.0, routed=True)
  images = np.zeros((4, 16, 16, 1), np.uint8)  # 16x16 images for a model of 8x8 digits.
  with pytest.raises(ValueError) as e:
    predict({}, images, 0.8)  # The check comes before the variables are used or anything compiled.
  return f"{type(e.value).__name__}: {e.value}"


def c_eval_threshold_out_of_range(tmp_path, mp):
  from dynroute_jax import evaluate  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError) as e:
    evaluate.evaluate_workdir(str(_eval_workdir(tmp_path)), thresholds="0.5,1.2", plots=False)
  return f"{type(e.value).__name__}: {e.value}"


def c_eval_tsne_max_points_zero(tmp_path, mp):
  from dynroute_jax import evaluate  # pylint: disable=g-import-not-at-top
  workdir = _eval_workdir(tmp_path)
  before = snapshot(workdir)
  with pytest.raises(ValueError) as e:
    evaluate.evaluate_workdir(str(workdir), tsne_max_points=0)
  assert snapshot(workdir) == before  # Refused before any plot or report was written.
  return f"{type(e.value).__name__}: {e.value}"


def _predictor_case(name, threshold=0.8, noise_std=0.0, indices=None, noise=False):
  """A bad argument to the evaluation predictor: refused before anything is traced or compiled."""
  def fn(tmp_path, mp):
    config = digits_config()
    model = models.build_model(config.model)
    predict = evaluation.make_predict_fn(model, config.data, tau=1.0, routed=True, noise=noise)
    images = np.zeros((4, 8, 8, 1), np.uint8)
    with pytest.raises(ValueError) as e:
      predict({}, images, threshold, indices=indices, noise_std=noise_std)  # {}: nothing runs.
    return f"{type(e.value).__name__}: {e.value}"
  fn.__name__ = f"c_{name}"
  return fn


c_eval_threshold_array_out_of_range = _predictor_case(
    "eval_threshold_array_out_of_range", threshold=np.array([0.5, 1.5], np.float32))
c_eval_noise_std_nan = _predictor_case("eval_noise_std_nan", noise_std=float("nan"), noise=True)
c_eval_noise_std_negative = _predictor_case("eval_noise_std_negative", noise_std=-0.1, noise=True)
c_eval_indices_wrong_length = _predictor_case("eval_indices_wrong_length",
                                              indices=np.arange(3, dtype=np.int32), noise=True)


def _config_case(name, overrides):
  """A case whose bad value is a config field: refused by config_lib's schema."""
  def fn(tmp_path, mp):
    return train_message(digits_config(overrides), tmp_path / "w", mp, ValueError)
  fn.__name__ = f"c_{name}"
  return fn


c_every_steps_zero = _config_case("every_steps_zero", {"checkpoint.every_steps": 0})
c_log_every_steps_zero = _config_case("log_every_steps_zero", {"log_every_steps": 0})
c_eval_batch_size_zero = _config_case("eval_batch_size_zero", {"eval.batch_size": 0})
c_grad_clip_negative = _config_case("grad_clip_negative", {"train.grad_clip_norm": -1.0})
c_momentum_out_of_range = _config_case("momentum_out_of_range", {"train.momentum": -1.5})
c_warmup_negative = _config_case("warmup_negative", {"train.stage1.warmup_epochs": -1.0})
c_crop_padding_negative = _config_case("crop_padding_negative", {"data.crop_padding": -1})
c_keep_zero = _config_case("keep_zero", {"checkpoint.keep": 0})
c_seed_negative = _config_case("seed_negative", {"seed": -1})
c_calibration_fraction_one = _config_case("calibration_fraction_one", {"data.calibration_fraction": 1.0})
c_tiny_temperature = _config_case("tiny_temperature", {"train.stage1.tau_init": 1e-30, "train.stage1.tau_floor": 1e-30})
c_stage_moved_under_checkpoint = _config_case("stage_moved_under_checkpoint",
                                              {"train.stage1.steps": 1})
c_no_training_steps = _config_case("no_training_steps", {
    "train.stage1.steps": 0, "train.stage1.epochs": 0.0, "train.stage2.steps": 0,
    "train.stage2.epochs": 0.0})


def c_no_verifying_checkpoint(tmp_path, mp):
  workdir = tmp_path / "w"
  make_earlier_run(workdir)
  data = [p for p in (workdir / "checkpoints" / "2" / "params").rglob("*") if p.is_file()]
  target = max(data, key=lambda p: p.stat().st_size)
  raw = bytearray(target.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  target.write_bytes(bytes(raw))
  return train_message(digits_config(), workdir, mp, ckpt_lib.NoGoodCheckpointError)


def c_workdir_locked(tmp_path, mp):
  from dynroute_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "w"
  make_earlier_run(workdir)
  (workdir / workdir_lock.LOCK_NAME).write_text(json.dumps({
      "pid": 4242, "host": "node-7", "started": "2024-05-01T10:00:00+00:00",
      "argv": ["dynroute_jax/main.py", "--config=configs/digits.py", f"--workdir={workdir}"],
      "token": "0" * 32}))
  return train_message(digits_config(), workdir, mp, workdir_lock.WorkdirLockedError)


class Case(NamedTuple):
  name: str
  how: str
  fn: Callable
  pattern: str


CASES = [
    Case("misspelled field (config file)", "`config.train.skip_nonfinite_step = True` in a config "
         "file", c_misspelled_field_file, r"Unknown config field config\.train\.skip_nonfinite_step\. "
         r"Did you mean config\.train\.skip_nonfinite_steps\?"),
    Case("misspelled field (command line)", "`--config.train.stage1.lr_schedul=constant`",
         c_misspelled_field_cli, r"lr_schedul"),
    Case("misspelled model field", "`config.model.num_cell = 3`", c_misspelled_model_field,
         r"Unknown config\.model field\(s\) \['num_cell'\]"),
    Case("wrong type (command line)", "`--config.train.global_batch_size=sixty`",
         c_wrong_type_cli, r"global_batch_size.*sixty|sixty.*global_batch_size"),
    Case("wrong type (config file)", "`config.eval.threshold = \"0.8\"` in a config file",
         c_wrong_type_file, r"threshold"),
    Case("threshold out of range", "`--config.eval.threshold=1.5`", c_threshold_out_of_range,
         r"config\.eval\.threshold\(s\) must lie in \(0, 1\]; got 1\.5"),
    Case("threshold 0 in the sweep", "`--config.eval.thresholds=(0.0,0.5)`",
         c_sweep_threshold_zero, r"must lie in \(0, 1\]; got 0\.0"),
    Case("tau <= 0", "`--config.train.stage2.tau_init=0`", c_tau_zero,
         r"config\.train\.stage2\.tau_init must be a number > 0; got 0\.0"),
    Case("tau floor above its start", "`--config.train.stage2.tau_floor=2`",
         c_tau_floor_above_init, r"tau_floor \(2\.0\) must not exceed tau_init \(1\.0\)"),
    Case("batch not divisible by the devices", "4 devices, `--config.train.global_batch_size=30`",
         c_batch_not_divisible, r"global_batch_size=30 is not divisible by the device count 4"),
    Case("None for a field that takes none", "`--config.train.global_batch_size=None`",
         c_none_for_an_int_field,
         r"config\.train\.global_batch_size must be a positive int; got None\."),
    Case("batch larger than the dataset", "`--config.train.global_batch_size=4096` on digits",
         c_batch_exceeds_dataset, r"global_batch_size \(4096\) exceeds the \d+ training examples"),
    Case("mesh larger than the machine", "`--config.mesh.data=64` on 1 device", c_mesh_too_big,
         r"config\.mesh\.data=64 .* but 1 devices are available"),
    Case("image size versus reductions", "`--config.model.image_size=10 "
         "--config.data.image_size=10`", c_image_size_vs_reductions,
         r"image_size must be divisible by 4"),
    Case("model and data disagree", "`--config.model.image_size=16` (data: 8)",
         c_model_data_mismatch, r"config\.model\.image_size \(16\) differs from config\.data"),
    Case("data not of the configured shape", "`--config.model.image_size=16 "
         "--config.data.image_size=16` on 8x8 digits", c_data_shape_mismatch,
         r"has images of shape \(8, 8, 1\), but config\.data says image_size=16"),
    Case("unknown dataset", "`--config.data.name=mnist`", c_unknown_dataset,
         r"config\.data\.name must be one of"),
    Case("missing dataset", "cifar10 with an empty `--config.data.data_dir`", c_missing_dataset,
         r"Dataset 'cifar10' is not prepared in data dir .* it is never downloaded at run time"),
    Case("wrong data dir", "cifar10 with `--config.data.data_dir=/no/such/dir`",
         c_wrong_data_dir, r"Dataset 'cifar10' is not prepared in data dir '.*nope'"),
    Case("workdir of another model", "digits DRNet into the workdir of a digits CoDiNet run",
         c_workdir_of_another_model, r"holds a run of another model .*Use a new --workdir"),
    Case("checkpoints of another model", "as above, with config.json removed",
         c_checkpoints_of_another_model, r"holds checkpoints of a different model"),
    Case("read-only workdir", "work directory on a read-only file system (simulated for root)",
         c_read_only_workdir, r"Cannot write to work directory .*(Read-only file system|"
         r"Permission denied)"),
    Case("workdir is a file", "`--workdir=` an existing file", c_workdir_is_a_file,
         r"Cannot write to work directory .*File exists"),
    Case("consistency loss with one view", "CoDiNet digits with `--config.data.num_views=1`",
         c_consistency_without_views, r"need config\.data\.num_views >= 2"),
    Case("unknown config variant", "`--config=configs/digits.py:resnet`", c_unknown_variant,
         r"variant must be 'drnet' or 'codinet'; got 'resnet'"),
    Case("missing config file", "`--config=configs/nope.py`", c_missing_config_file,
         r"nope\.py"),
    Case("missing checkpoint step", "`evaluate --step=999`", c_eval_missing_step,
         r"no checkpoint for step 999 in .*; available steps: 2"),
    Case("evaluate before training", "`evaluate --workdir=` a run without checkpoints",
         c_eval_no_checkpoints, r"holds no checkpoints"),
    Case("damaged checkpoint (evaluate)", "`evaluate --step=2` after flipping a byte of step 2",
         c_eval_damaged_step, r"checkpoint step 2 in .* is damaged or incomplete: checksum "
         r"mismatch in params/"),
    Case("wrong image shape at evaluation", "16x16 images to the predictor of an 8x8 model",
         c_eval_wrong_image_shape,
         r"images must have shape \[B, 8, 8, 1\].*got shape \(4, 16, 16, 1\)"),
    Case("evaluation threshold out of range", "`evaluate --thresholds=0.5,1.2`",
         c_eval_threshold_out_of_range, r"1\.2"),
    Case("checkpoint interval 0", "`--config.checkpoint.every_steps=0`", c_every_steps_zero,
         r"config\.checkpoint\.every_steps must be an int >= 1; got 0\."),
    Case("log interval 0", "`--config.log_every_steps=0`", c_log_every_steps_zero,
         r"config\.log_every_steps must be an int >= 1; got 0\."),
    Case("evaluation batch 0", "`--config.eval.batch_size=0`", c_eval_batch_size_zero,
         r"config\.eval\.batch_size must be an int >= 1; got 0\."),
    Case("negative gradient clipping", "`--config.train.grad_clip_norm=-1`", c_grad_clip_negative,
         r"config\.train\.grad_clip_norm must be a number >= 0 \(0 turns clipping off\); "
         r"got -1\.0\."),
    Case("momentum out of range", "`--config.train.momentum=-1.5`", c_momentum_out_of_range,
         r"config\.train\.momentum must be a number in \[0, 1\); got -1\.5\."),
    Case("negative warm-up", "`--config.train.stage1.warmup_epochs=-1`", c_warmup_negative,
         r"config\.train\.stage1\.warmup_epochs must be a number >= 0; got -1\.0\."),
    Case("negative crop padding", "`--config.data.crop_padding=-1`", c_crop_padding_negative,
         r"config\.data\.crop_padding must be an int >= 0; got -1\."),
    Case("keep no checkpoint", "`--config.checkpoint.keep=0`", c_keep_zero,
         r"config\.checkpoint\.keep must be an int >= 1, or None .*; got 0\."),
    Case("negative seed", "`--config.seed=-1`", c_seed_negative,
         r"config\.seed must be an int in \[0, 4294967295\]; got -1\."),
    Case("calibration takes the whole train split", "`--config.data.calibration_fraction=1.0`",
         c_calibration_fraction_one,
         r"config\.data\.calibration_fraction must be a number in \[0, 1\) .*; got 1\.0\."),
    Case("tiny temperature", "`--config.train.stage1.tau_init=1e-30 "
         "--config.train.stage1.tau_floor=1e-30`", c_tiny_temperature,
         r"config\.train\.stage1\.tau_init must be a number >= 0\.001 .*; got 1e-30\."),
    Case("t-SNE of no points", "`evaluate --tsne_max_points=0`", c_eval_tsne_max_points_zero,
         r"--tsne_max_points must be an int >= 1 .*; got 0\."),
    Case("stage lengths changed under a checkpoint", "resuming the earlier run (checkpoint "
         "step 2, stage 1) with `--config.train.stage1.steps=1`", c_stage_moved_under_checkpoint,
         r"Cannot resume from checkpoint step 2: it was saved in stage 1, but this config's stage "
         r"lengths .* put step 2 in stage 2\."),
    Case("no training step", "`--config.train.stage1.steps=0 --config.train.stage1.epochs=0` "
         "and the same for stage 2", c_no_training_steps,
         r"config\.train\.stage1 and config\.train\.stage2 train 0 steps: .*set "
         r"config\.train\.stage1\.steps \(or \.epochs\) above 0"),
    Case("no checkpoint verifies at resume", "the only checkpoint (step 2) with a flipped byte",
         c_no_verifying_checkpoint,
         r"NoGoodCheckpointError: Cannot resume: no checkpoint in .* verifies \(step 2: checksum "
         r"mismatch in params/.*\)\. Nothing was changed\..*"
         r"--config\.checkpoint\.restart_if_damaged=True"),
    Case("threshold array out of range at evaluation", "the predictor called with thresholds "
         "`np.array([0.5, 1.5])`", c_eval_threshold_array_out_of_range,
         r"threshold must lie in \(0, 1\] .*every entry of an array too; got 1\.5 in an array "
         r"of shape \(2,\)"),
    Case("noise std NaN at evaluation", "the noisy predictor called with `noise_std=nan`",
         c_eval_noise_std_nan, r"noise_std must be one finite number >= 0 .*; got nan"),
    Case("negative noise std at evaluation", "the noisy predictor called with `noise_std=-0.1`",
         c_eval_noise_std_negative, r"noise_std must be one finite number >= 0 .*; got -0\.1"),
    Case("indices of the wrong length at evaluation", "3 indices for 4 images",
         c_eval_indices_wrong_length,
         r"indices must hold one int per image, shape \(4,\); got shape \(3,\) \(int32\)"),
    Case("workdir used by another training", "a lock file held by pid 4242 on host node-7",
         c_workdir_locked,
         r"is in use by another training: pid 4242 on host 'node-7', started 2024-05-01.*"
         r"use another --workdir"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.fn.__name__[2:] for c in CASES])
def test_bad_input(case, tmp_path, monkeypatch):
  import re  # pylint: disable=g-import-not-at-top
  message = case.fn(tmp_path, monkeypatch)
  assert re.search(case.pattern, message), message


def test_none_from_the_command_line(tmp_path):
  # Regression: absl parses `--config.checkpoint.keep=None` as an int and refused it, so the value
  # the keep message names ("None keeps every checkpoint") could not be given on the command line.
  # Here both None overrides pass, and the run stops at the next check, the batch size.
  message = cli_message(["--config=configs/digits.py", "--config.checkpoint.keep=None",
                         "--config.eval.dispatch.chunk=None",
                         "--config.train.global_batch_size=4096", f"--workdir={tmp_path / 'w'}"])
  assert "global_batch_size (4096) exceeds" in message, message
  config = digits_config()
  config_lib.set_to_none(config, ["checkpoint.keep", "eval.dispatch.chunk"])
  assert config.checkpoint.keep is None and config.eval.dispatch.chunk is None
  config_lib.validate(config)
  with pytest.raises(ValueError, match=r"config\.eval\.dispatch is a section"):
    config_lib.set_to_none(config, ["eval.dispatch"])
  with pytest.raises(ValueError, match=r"config\.checkpoint\.kep is not a field"):
    config_lib.set_to_none(config, ["checkpoint.kep"])


def test_all_configs_validate():
  """The shipped configs pass the unknown-field check (it must not reject legitimate fields)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  for path in sorted((REPO / "configs").glob("*.py")):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config_lib.validate(module.get_config())


def test_unknown_fields_are_refused_by_the_lock():
  """check_known_fields writes a config into a locked base_config: ml_collections refuses a new key."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = digits_config()
  config_lib.check_known_fields(config)  # The shipped config has only known fields.
  config.train.stage2 = ml_collections.ConfigDict(dict(config.train.stage2.to_dict(), tau_flor=1.0))
  with pytest.raises(ValueError, match=r"Unknown config field config\.train\.stage2\.tau_flor\. "
                     r"Did you mean config\.train\.stage2\.tau_floor\?"):
    config_lib.validate(config)
  # Values are not type-checked by the lock (the schema does it, naming the field).
  config = digits_config()
  config.checkpoint.keep = None
  config_lib.check_known_fields(config)
  with config.ignore_type():
    config.seed = ml_collections.ConfigDict(dict(a=1))
  with pytest.raises(ValueError, match=r"config\.seed must be an int"):
    config_lib.validate(config)


@pytest.mark.parametrize("value,kwargs,message", [
    (1.5, {}, r"^threshold must lie in \(0, 1\] \(the routing threshold\); got 1\.5\.$"),
    ("abc", {"source": "--thresholds entry"},
     r"^--thresholds entry must be a number in \(0, 1\]; got 'abc'\.$"),
    (float("nan"), {}, r"must lie in \(0, 1\] .*; got nan"),
    (0.0, {"source": "config.eval.threshold(s)", "field": True},
     r"^config\.eval\.threshold\(s\) must lie in \(0, 1\]; got 0\.0\.$"),
    ("0.8", {"source": "config.eval.threshold(s)", "field": True},
     r"^config\.eval\.threshold\(s\) must lie in \(0, 1\]; got '0\.8'\.$"),
    (np.array([0.5, 1.5]), {}, r"every entry of an array too; got 1\.5 in an array of shape \(2,\)"),
])
def test_one_threshold_validator(value, kwargs, message):
  with pytest.raises(ValueError, match=message):
    config_lib.check_threshold(value, **kwargs)


def test_one_threshold_validator_accepts_the_range():
  assert config_lib.check_threshold("0.5") == 0.5 and config_lib.check_threshold(1) == 1.0
  assert config_lib.check_threshold(1e-6, field=True) == 1e-6
  values = np.array([0.1, 1.0])
  assert config_lib.check_threshold(values) is values
  from dynroute_jax import evaluate  # pylint: disable=g-import-not-at-top
  assert evaluate.parse_thresholds("0.5, 1") == [0.5, 1.0]
  assert evaluation.check_threshold is config_lib.check_threshold


def _config_leaves(node, prefix=""):
  for key, value in node.items():
    path = f"{prefix}{key}"
    if path == "model":
      continue  # Checked by each model's from_config.
    if hasattr(value, "keys"):
      yield from _config_leaves(value, path + ".")
    else:
      yield path


def test_every_config_field_has_a_schema_entry():
  missing = sorted(set(_config_leaves(config_lib.base_config())) - set(config_lib.schema()))
  assert not missing, (f"config fields without a declared type and range: {missing}; add them "
                       "to config_lib.SCHEMA (or STAGE_SCHEMA for a stage field)")


def _out_of_range(field):
  """Values of `field`'s kind just outside its range (none for bool/str fields)."""
  integer = field.kind == "int"
  step = 1 if integer else 0.5
  values = []
  if field.lo is not None:
    v = field.lo if field.lo_open else field.lo - step
    while v in field.also:
      v -= step
    values.append(int(v) if integer else float(v))
  if field.hi is not None:
    values.append(int(field.hi + 1) if integer else
                  float(field.hi if field.hi_open else field.hi + step))
  if not integer:
    values.append(float("nan"))
  if field.kind == "numbers":
    values = [(0.5, v) if field.lo is not None and field.lo < 0.5 else (v,) for v in values]
  return values


_NUMERIC = sorted(p for p, f in config_lib.schema().items() if f.kind in ("int", "number", "numbers"))


@pytest.mark.parametrize("path", _NUMERIC)
def test_schema_refuses_out_of_range_values(path):
  """Walks the schema: each numeric field, just outside its range, is refused by name."""
  import re  # pylint: disable=g-import-not-at-top
  field = config_lib.schema()[path]
  values = _out_of_range(field)
  assert values, path
  for value in values:
    config = digits_config()
    config_lib.validate(config)  # Valid as shipped.
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError) as e:
      config_lib.validate(config)
    msg = str(e.value)
    name = re.escape(f"config.{path}")
    if "threshold" in path:  # One hand-written check covers every threshold field.
      name += r"|config\.eval\.threshold\(s\)"
    assert re.search(name, msg), (value, msg)
    shown = repr(value[-1] if isinstance(value, tuple) else value)
    assert shown in msg or str(value) in msg, (value, msg)


def test_schema_accepts_the_bounds():
  """The range's closed ends are allowed (a bound off by one would refuse a legitimate value)."""
  for path, field in config_lib.schema().items():
    for bound, is_open in ((field.lo, field.lo_open), (field.hi, field.hi_open)):
      if bound is None or is_open or field.kind == "numbers":
        continue
      assert field.ok(int(bound) if field.kind == "int" else float(bound)), (path, bound)


def _table(tmp_root: Path) -> str:
  """Runs every case and returns the Markdown table of messages."""

  class _MonkeyPatch:
    def __init__(self):
      self._mp = pytest.MonkeyPatch()

    def setattr(self, *a, **k):
      self._mp.setattr(*a, **k)

    def undo(self):
      self._mp.undo()

  rows = ["| bad input | how it was tried | message (from a real run) | test |",
          "|---|---|---|---|"]
  for i, case in enumerate(CASES):
    tmp = tmp_root / f"case{i}"
    tmp.mkdir(parents=True)
    mp = _MonkeyPatch()
    try:
      msg = case.fn(tmp, mp)
    finally:
      mp.undo()
    msg = msg.replace(str(tmp), "<tmp>").replace("|", "\\|")
    quoted = f"`` {msg} ``" if "`" in msg else f"`{msg}`"
    rows.append(f"| {case.name} | {case.how} | {quoted} | "
                f"`test_validation.py::test_bad_input[{case.fn.__name__[2:]}]` |")
  return "\n".join(rows)


if __name__ == "__main__":
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as d:
    print(_table(Path(d)))
