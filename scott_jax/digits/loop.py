"""A small resumable train loop (stage 1 teacher and the digit classifier) on top of `scott_jax.checkpoint`.

The state is a pytree with a scalar int32 ``"step"`` leaf. Batches are pure functions of the step
(``batch_fn(step)``) and the step function draws its randomness from ``fold_in(key, step)``, so the data
iterator has no state and a resumed run repeats exactly what a straight run would have done. Checkpoints go to
``<directory>/checkpoints`` every ``checkpoint_every`` steps and at the end (or at ``stop_at``, or on SIGTERM);
metrics go to ``<directory>/log.jsonl`` (one JSON object per logged step; entries past the restored step are
dropped on resume) and a progress line to the absl log.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from scott_jax import checkpoint as ckpt_lib

PyTree = Any
LOG_FILE = "log.jsonl"


def read_log(directory: str) -> list[dict[str, Any]]:
  """The entries of ``<directory>/log.jsonl`` (empty list if absent)."""
  path = os.path.join(directory, LOG_FILE)
  if not os.path.isfile(path):
    return []
  with open(path) as fh:
    return [json.loads(line) for line in fh if line.strip()]


def _truncate_log(directory: str, step: int) -> None:
  entries = [e for e in read_log(directory) if e["step"] <= step]
  with open(os.path.join(directory, LOG_FILE), "w") as fh:
    fh.writelines(json.dumps(e) + "\n" for e in entries)


def _append_log(directory: str, entry: dict[str, Any]) -> None:
  with open(os.path.join(directory, LOG_FILE), "a") as fh:
    fh.write(json.dumps(entry) + "\n")


def run(*, name: str, directory: str, init_state: Callable[[], PyTree],
        step_fn: Callable[[PyTree, Any], tuple[PyTree, dict[str, jax.Array]]], batch_fn: Callable[[int], Any],
        num_steps: int, checkpoint_every: int, log_every: int,
        eval_fn: Callable[[PyTree], dict[str, float]] | None = None, stop_at: int | None = None) -> PyTree:
  """Trains from the latest checkpoint in ``directory`` (or ``init_state()``) up to ``num_steps`` updates.

  step_fn(state, batch) -> (state, metrics): jitted by the caller (donating the state is fine). metrics: float
  scalars, checked finite at every log step (a non-finite value raises FloatingPointError). eval_fn(state) ->
  extra metrics logged at step 0 and every ``log_every`` steps. ``stop_at`` ends the run early (checkpointed)
  at that step, e.g. to test resumption. Returns the final state.
  """
  directory = os.path.abspath(directory)  # orbax needs absolute checkpoint paths
  os.makedirs(directory, exist_ok=True)
  fresh = init_state()
  checkpointer = ckpt_lib.Checkpointer(os.path.join(directory, ckpt_lib.CHECKPOINT_SUBDIR), max_to_keep=2,
                                       save_every=checkpoint_every)
  restored = checkpointer.restore_latest(ckpt_lib.abstract_state(fresh))
  if restored is None:
    state = fresh
    _truncate_log(directory, -1)
    logging.info("%s: starting (no checkpoint in %s).", name, checkpointer.directory)
  else:
    step, state, _ = restored
    if int(state["step"]) != step:
      raise ValueError(f"{name}: checkpoint {step} holds state step {int(state['step'])}")
    _truncate_log(directory, step)
    logging.info("%s: resumed from checkpoint step %d.", name, step)
  del fresh
  start = int(state["step"])
  end = num_steps if stop_at is None else min(num_steps, stop_at)
  if start == 0 and eval_fn is not None:
    _append_log(directory, {"step": 0, **eval_fn(state)})
  t_last, step_last, t0 = time.time(), start, time.time()
  with ckpt_lib.PreemptionGuard() as guard:
    for step in range(start + 1, end + 1):
      state, metrics = step_fn(state, batch_fn(step - 1))
      stop = guard.should_stop(step)
      if step % log_every == 0 or step == end or stop:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
          raise FloatingPointError(f"{name}: non-finite metrics at step {step}: {bad}")
        now = time.time()
        sps = (step - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        if eval_fn is not None:
          values.update(eval_fn(state))
        _append_log(directory, {"step": step, "elapsed": now - t0, **values})
        shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        logging.info("%s: step %d/%d (%.0f%%) | %.2f steps/s | %s | ETA %.0fs", name, step, num_steps,
                     100.0 * step / num_steps, sps, shown, (end - step) / max(sps, 1e-9))
      if checkpointer.should_save(step) or step == end or stop:
        checkpointer.save(step, state, force=True)
      if stop:
        logging.warning("%s: stopped by signal after step %d; checkpoint saved.", name, step)
        break
  checkpointer.close()
  return state


def step_key(seed: int, step: jax.Array) -> jax.Array:
  """The PRNG key of update ``step``: fold_in(key(seed), step) (resumption-safe)."""
  return jax.random.fold_in(jax.random.key(seed), jnp.asarray(step, jnp.uint32))
