"""The digits stages' resumable training (stage 1 teacher and the digit classifier) on `scott_jax.loop`.

The state is a pytree with a scalar int32 ``"step"`` leaf. Batches are pure functions of the step
(``batch_fn(step)``) and the step function draws its randomness from ``fold_in(key, step)``, so the data
iterator has no state and a resumed run repeats exactly what a straight run would have done. Checkpoints go to
``<directory>/checkpoints`` every ``checkpoint_every`` steps and at the end (or at ``stop_at``, or on SIGTERM);
metrics go to ``<directory>/log.jsonl`` (`scott_jax.loop`'s metrics file).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from scott_jax import checkpoint as ckpt_lib
from scott_jax import loop

PyTree = Any
LOG_FILE = "log.jsonl"


def read_log(directory: str) -> list[dict[str, Any]]:
  """The entries of ``<directory>/log.jsonl`` (empty list if absent)."""
  return loop.read_metrics(os.path.join(directory, LOG_FILE))


def run(*, name: str, directory: str, init_state: Callable[[], PyTree],
        step_fn: Callable[[PyTree, Any], tuple[PyTree, dict[str, jax.Array]]], batch_fn: Callable[[int], Any],
        num_steps: int, checkpoint_every: int, log_every: int,
        eval_fn: Callable[[PyTree], dict[str, float]] | None = None, stop_at: int | None = None) -> PyTree:
  """Trains from the latest checkpoint in ``directory`` (or ``init_state()``) up to ``num_steps`` updates.

  step_fn(state, batch) -> (state, metrics): jitted by the caller (donating the state is fine). metrics: float
  scalars, checked finite (a non-finite value raises FloatingPointError). eval_fn(state) -> extra metrics logged
  at step 0 and every ``log_every`` steps. ``stop_at`` ends the run early (checkpointed) at that step, e.g. to
  test resumption. Returns the final state.
  """
  directory = os.path.abspath(directory)  # orbax needs absolute checkpoint paths
  os.makedirs(directory, exist_ok=True)
  fresh = init_state()
  checkpointer = ckpt_lib.Checkpointer(os.path.join(directory, ckpt_lib.CHECKPOINT_SUBDIR), max_to_keep=2,
                                       save_every=checkpoint_every)
  restored = checkpointer.restore_latest(ckpt_lib.abstract_state(fresh))
  if restored is None:
    # Committed to the device as a restored state is: the same jit signature, so a resumed run's step is the
    # fresh run's program (a hit in the persistent compilation cache instead of a second compile).
    state = jax.device_put(fresh, jax.devices()[0])
    logging.info("%s: starting (no checkpoint in %s).", name, checkpointer.directory)
  else:
    step, state, _ = restored
    if int(state["step"]) != step:
      raise ValueError(f"{name}: checkpoint {step} holds state step {int(state['step'])}")
    logging.info("%s: resumed from checkpoint step %d.", name, step)
  del fresh
  start = int(state["step"])
  end = num_steps if stop_at is None else min(num_steps, stop_at)
  state, _ = loop.run(name=name, state=state, start=start, end=end, num_steps=num_steps,
                      step_fn=lambda s, step: step_fn(s, batch_fn(step - 1)), checkpointer=checkpointer,
                      log_every=log_every, metrics_path=os.path.join(directory, LOG_FILE), eval_fn=eval_fn)
  checkpointer.close()
  return state


def step_key(seed: int, step: jax.Array) -> jax.Array:
  """The PRNG key of update ``step``: fold_in(key(seed), step) (resumption-safe)."""
  return jax.random.fold_in(jax.random.key(seed), jnp.asarray(step, jnp.uint32))
