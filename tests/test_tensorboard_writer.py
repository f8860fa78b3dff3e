"""The TensorBoard writer: files TensorFlow reads back, written without importing TensorFlow."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np

from dynroute_jax import tensorboard_writer

REPO = Path(__file__).resolve().parents[1]


def _read_events(logdir: Path):
  """(step, tag, value, plugin) of every summary value, read by TensorFlow's own reader."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  files = sorted(logdir.glob("events.out.tfevents.*"))
  assert len(files) == 1, files
  out = []
  for event in tf.compat.v1.train.summary_iterator(str(files[0])):
    for v in event.summary.value:
      out.append((event.step, v.tag, float(tf.make_ndarray(v.tensor)),
                  v.metadata.plugin_data.plugin_name))
  return out


def test_scalars_read_back_by_tensorflow(tmp_path):
  writer = tensorboard_writer.SummaryWriter(tmp_path / "logs")
  writer.write_scalars(0, {"loss/total": 2.5, "accuracy": np.float32(0.125)})
  writer.write_scalars(7, {"loss/total": np.asarray(1.25), "stage": 2})
  writer.flush()
  writer.close()
  got = _read_events(tmp_path / "logs")
  assert got == [(0, "loss/total", 2.5, "scalars"), (0, "accuracy", 0.125, "scalars"),
                 (7, "loss/total", 1.25, "scalars"), (7, "stage", 2.0, "scalars")]


def test_echo_logs_clus_key_value_line(tmp_path, caplog):
  writer = tensorboard_writer.SummaryWriter(None, echo=True)  # A process other than 0: no file.
  with caplog.at_level(logging.INFO):
    writer.write_scalars(3, {"b": 0.123456789, "a": 2})
  assert "[3] a=2, b=0.123457" in caplog.text
  writer.close()
  assert not list(tmp_path.iterdir())


def test_writer_and_digits_data_need_no_tensorflow(tmp_path):
  """The digits job's writer and data never import TensorFlow (seconds of every start-up)."""
  code = (
      "import sys, ml_collections\n"
      "from dynroute_jax import hooks, input_pipeline, main, train\n"
      f"w = hooks.metric_writer({str(tmp_path)!r})\n"
      "w.write_scalars(1, {'x': 1.0}); w.close()\n"
      "input_pipeline.load_dataset(ml_collections.ConfigDict(dict(name='digits', data_dir='',"
      " image_size=8, num_channels=1, num_classes=10)), 'test')\n"
      "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert list(tmp_path.glob("events.out.tfevents.*"))
