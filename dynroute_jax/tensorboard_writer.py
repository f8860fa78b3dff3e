"""TensorBoard scalar summaries without TensorFlow, behind CLU's `MetricWriter` method names.

CLU's `SummaryWriter` writes through `tf.summary`, and importing anything from
`clu.metric_writers` imports TensorFlow: about 3.3 s of every command's start-up on a 2-core CPU
(4.8 s against 1.5 s for jax, flax, optax and orbax), although the trainer only writes scalars and
the digits job never needs TensorFlow otherwise. This writer produces the same event files
(`events.out.tfevents.*`, one `Event` record per write, TF2 scalar summaries: a float32 scalar
tensor with the 'scalars' plugin's metadata, as `tf.summary.scalar` writes them) from
TensorBoard's own protos and record writer, which need no TensorFlow. The file is opened through
`etils.epath`, so any filesystem it supports (`gs://...`) works as for the checkpoints.

It offers the subset of `clu.metric_writers.MetricWriter` the trainer uses (`write_scalars`,
`flush`, `close`), so a CLU writer can stand in for it. With `echo=True` every write is also logged
as CLU's `LoggingWriter` logs it (`[step] key=value, ...`), which verbose runs show.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from typing import Mapping

from absl import logging
from etils import epath
import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

# Tells two writers of one process apart in their file names, as TensorFlow's writer does.
_FILE_COUNTER = itertools.count()


def scalar_summary(scalars: Mapping[str, float]) -> summary_pb2.Summary:
  """One `Summary` of float32 scalars, as `tf.summary.scalar` writes each of them."""
  return summary_pb2.Summary(value=[
      summary_pb2.Summary.Value(
          tag=tag, tensor=tensor_util.make_tensor_proto(np.float32(value)),
          metadata=scalar_metadata.create_summary_metadata(display_name=tag, description=""))
      for tag, value in scalars.items()])


class SummaryWriter:
  """Scalar summaries into `logdir/events.out.tfevents.<time>.<host>.<pid>.<n>.v2`.

  Args:
    logdir: the directory (created if missing); None writes no file (processes other than 0).
    echo: also log each write as `[step] key=value, ...` at INFO (CLU's `LoggingWriter` format).
  """

  def __init__(self, logdir: str | os.PathLike[str] | None, echo: bool = False):
    self.echo = echo
    self._file = self._records = None
    if logdir is not None:
      path = epath.Path(logdir)
      path.mkdir(parents=True, exist_ok=True)
      name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
              f"{os.getpid()}.{next(_FILE_COUNTER)}.v2")
      self._file = (path / name).open("wb")
      self._records = RecordWriter(self._file)
      self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event: event_pb2.Event) -> None:
    self._records.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes `scalars` (numbers, or 0-d arrays) at `step`."""
    if self.echo:
      values = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in sorted(scalars.items())]
      logging.info("[%d] %s", step, ", ".join(values))
    if self._records is not None:
      self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                  summary=scalar_summary(scalars)))

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = self._records = None


__all__ = ["SummaryWriter", "scalar_summary"]
