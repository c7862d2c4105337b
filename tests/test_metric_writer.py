"""scott_jax.metric_writer against TensorBoard's own event reader and clu's log-line format."""

import logging

import pytest
from tensorboard.backend.event_processing import event_accumulator

from scott_jax import metric_writer


def test_scalars_read_back_by_tensorboard_and_logged_as_clu_lines(tmp_path, caplog):
  writer = metric_writer.MetricWriter(str(tmp_path))
  with caplog.at_level(logging.INFO, logger="absl"):
    writer.write_scalars(1, {"loss": 0.5, "lr": 1e-4, "count": 3})
    writer.write_scalars(2, {"loss": 0.25, "lr": 2e-4, "count": 4})
  writer.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert sorted(acc.Tags()["scalars"]) == ["count", "loss", "lr"]
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
  assert [e.value for e in acc.Scalars("lr")] == pytest.approx([1e-4, 2e-4], rel=1e-6)  # float32 on disk
  assert [e.value for e in acc.Scalars("count")] == [3.0, 4.0]
  # clu's LoggingWriter line (keys sorted, floats to 6 significant digits), which tests/test_parallel.py parses.
  lines = [r.getMessage() for r in caplog.records]
  assert "[1] count=3, loss=0.5, lr=0.0001" in lines and "[2] count=4, loss=0.25, lr=0.0002" in lines


def test_without_a_logdir_it_only_logs(tmp_path, caplog, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no event file anywhere, not even in the working directory
  writer = metric_writer.MetricWriter(None)
  with caplog.at_level(logging.INFO, logger="absl"):
    writer.write_scalars(7, {"loss": 1.0})
  writer.close()
  assert "[7] loss=1" in [r.getMessage() for r in caplog.records]
  assert not list(tmp_path.iterdir())
