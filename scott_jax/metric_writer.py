"""The train loop's metric writer: TensorBoard scalars without TensorFlow, and one log line per logged step.

`MetricWriter.write_scalars(step, values)` logs ``[step] key=value, ...`` (keys sorted, floats to 6 significant
digits: the line of clu's ``LoggingWriter``, which the multi-process tests parse) and, where it has a log
directory, appends an event with one ``simple_value`` per key to ``LOGDIR/events.out.tfevents.*`` through
TensorBoard's own event-file writer. TensorBoard reads these as scalars (``tensorboard --logdir WORKDIR``).
clu's default writer did the same through ``tf.summary`` and cost every train process a TensorFlow import (5-9 s
of start-up on 2 cores); this module imports only TensorBoard's protobufs (about 0.4 s).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from absl import logging


class MetricWriter:
  """Scalar metrics to the log and, with ``logdir``, to a TensorBoard event file (processes other than 0 pass
  None: log only)."""

  def __init__(self, logdir: str | None):
    self._events = None
    if logdir is not None:
      from tensorboard.summary.writer.event_file_writer import EventFileWriter

      self._events = EventFileWriter(logdir)

  def write_scalars(self, step: int, values: Mapping[str, float | int]) -> None:
    """``values``: name -> Python or numpy scalar, the metrics of update ``step``."""
    line = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(values.items()))
    logging.info("[%d] %s", step, line)
    if self._events is not None:
      from tensorboard.compat.proto import event_pb2, summary_pb2

      summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                           for k, v in sorted(values.items())])
      self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None
