"""The training loop every trainer shares: `scott_jax.train` (the SCott student) and the digits stages (teacher,
classifier) call `run` after restoring their state.

From step ``start + 1`` to ``end``: one update per step, the metrics of every step checked finite one step
later (so the host does not wait on the device), at every log step a progress line and one JSON object
``{"step", **metrics, "steps_per_sec"[, "images_per_sec"], **eval metrics}`` appended to the metrics file, the
checkpoint policy of the `scott_jax.checkpoint.Checkpointer` (and always the last step), and SIGTERM handled by
`scott_jax.checkpoint.PreemptionGuard` (checkpoint, then return). Entries of the metrics file past ``start``
are dropped first (a resumed run logs them again; a fresh run starts an empty file).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import logging

from scott_jax import checkpoint as ckpt_lib

PyTree = Any
METRICS_FILE = "metrics.jsonl"  # one JSON object of the logged scalars per log step


def check_finite(step: int, metrics: dict[str, Any]) -> dict[str, float]:
  """The metrics as floats; raises FloatingPointError naming the non-finite ones."""
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  bad = {k: v for k, v in values.items() if not math.isfinite(v)}
  if bad:
    raise FloatingPointError(f"non-finite training metrics at step {step}: {bad}")
  return values


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The entries of a metrics file (empty list if absent); a line cut by a kill mid-write is skipped."""
  if not os.path.isfile(path):
    return []
  out = []
  with open(path) as fh:
    for line in fh:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def truncate_metrics(path: str, step: int) -> None:
  """Drops the entries of a metrics file past ``step`` (a run resumed from checkpoint ``step`` logs them again)."""
  if os.path.isfile(path):
    keep = [e for e in read_metrics(path) if isinstance(e.get("step"), int) and e["step"] <= step]
    with open(path, "w") as fh:
      fh.writelines(json.dumps(e) + "\n" for e in keep)


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s"


def _describe(values: dict[str, float]) -> str:
  return " ".join(f"{k} {v:.4g}" for k, v in values.items() if k not in ("steps_per_sec", "images_per_sec"))


def run(*, name: str, state: PyTree, start: int, end: int, num_steps: int,
        step_fn: Callable[[PyTree, int], tuple[PyTree, dict[str, jax.Array]]], checkpointer: ckpt_lib.Checkpointer,
        log_every: int, metrics_path: str | None, batch_size: int | None = None,
        eval_fn: Callable[[PyTree], dict[str, float]] | None = None,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        after_step: Callable[[int, PyTree], None] | None = None,
        data_state: Callable[[], Any] | None = None,
        describe: Callable[[dict[str, float]], str] = _describe) -> tuple[PyTree, bool]:
  """Runs updates ``start + 1`` .. ``end`` (of ``num_steps`` in all) from ``state``; returns (state, stopped by a
  signal).

  step_fn(state, step) -> (state, metrics): update number ``step`` (1-based; it fetches its own batch). metrics: float
  scalars. eval_fn(state) -> extra metrics for the log steps (and step 0 of a fresh run). on_log(step, values): called
  at every log step with the logged values (e.g. `metric_writer.MetricWriter.write_scalars`). after_step(step, state):
  after every update (e.g. sampling). data_state() -> what the checkpoint keeps beside the state. describe(values) ->
  the metrics part of the progress line. ``metrics_path`` None: no metrics file (processes other than 0).
  ``batch_size``: adds images_per_sec.
  """
  if metrics_path is not None:
    truncate_metrics(metrics_path, start if start else -1)
  if start == 0 and eval_fn is not None and metrics_path is not None:
    with open(metrics_path, "a") as fh:
      fh.write(json.dumps({"step": 0, **eval_fn(state)}) + "\n")
  pending: tuple[int, Any] | None = None
  stopped = False
  t_last, step_last = time.time(), start
  with ckpt_lib.PreemptionGuard() as guard:
    for step in range(start + 1, end + 1):
      state, metrics = step_fn(state, step)
      if pending is not None:
        check_finite(*pending)
      pending = (step, metrics)
      stop = guard.should_stop(step)
      if step % log_every == 0 or step == end or stop:
        values = check_finite(*pending)
        now = time.time()
        sps = (step - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        values["steps_per_sec"] = sps
        if batch_size:
          values["images_per_sec"] = sps * batch_size
        if eval_fn is not None:
          values.update(eval_fn(state))
        if on_log is not None:
          on_log(step, values)
        if metrics_path is not None:
          with open(metrics_path, "a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        rate = f"{sps:.3f} steps/s" + (f", {sps * batch_size:.2f} images/s" if batch_size else "")
        logging.info("%s: step %d/%d (%.1f%%) | %s | %s | ETA %s", name, step, num_steps, 100.0 * step / num_steps,
                     rate, describe(values), format_eta((end - step) / max(sps, 1e-9)))
      if after_step is not None:
        after_step(step, state)
      if checkpointer.should_save(step) or step == end or stop:
        check_finite(*pending)
        checkpointer.save(step, state, data_state=None if data_state is None else data_state(), force=True)
      if stop:
        logging.warning("%s: Stopped by signal after step %d; checkpoint saved.", name, step)
        stopped = True
        break
  if pending is not None:
    check_finite(*pending)
  return state, stopped
