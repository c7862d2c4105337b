"""The discriminator probe: the SCott train step's discriminator update alone, against a frozen student.

Each probe step is the train step's discriminator update: the gradients of `scott_jax.step.make_gradients`
(the very function the train step uses) on the next batch of the run's data, then the discriminator's AdamW
update of `scott_jax.step.make_train_step`; the student, its EMA and its optimizer state are never updated (the
untrained student: the teacher with a zero guidance projection), so the discriminator always sees the same
generator. XLA drops what the discriminator's update does not need (the student's backward pass, the teacher's
solve), so a probe step costs a fraction of a train step. It answers "can this discriminator, at these
settings, tell the data from the student's samples?" apart from the game with the student, and it is the evidence
behind ``gan.head_init`` and the digits discriminator learning rate (``docs/evidence.md``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

from scott_jax import step as step_lib
from scott_jax import student
from scott_jax.config import ConfigDict
from scott_jax.data import batches

PROBE_METRICS = ("loss_d", "disc_accuracy", "d_real", "d_fake")


def run_probes(config: ConfigDict, source: Any, arms: Sequence[tuple[str, float]], num_steps: int,
               log_every: int = 10) -> list[list[dict[str, float]]]:
  """Runs ``num_steps`` probe steps per arm (head init, disc lr) -> per arm [{"step", "loss_d", "disc_accuracy",
  "d_real", "d_fake"}] every ``log_every`` steps and at the last one; each value is the mean over the steps since
  the previous entry. Every arm starts from the same seed and sees the same batches.

  ``config``: a train config with the GAN on (its model.teacher_path a pipeline folder; its own head init and disc
  lr are replaced by each arm's); ``source``: the data as for `scott_jax.data.batches.make_data` (e.g. an
  `arrays.ArraySource` of global batches). Runs on one device. The arms share one compiled step: the disc lr is
  an argument (the AdamW update after clipping is linear in it: the unit-lr update times lr) and the head init
  only changes the initial parameters.
  """
  if not config.gan.enabled:
    raise ValueError("the discriminator probe needs config.gan.enabled = True")
  models, frozen = student.load_models(config)
  gradients = step_lib.make_gradients(config, models)
  tx_unit, _ = step_lib.make_optimizer(1.0, config.optim)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state: step_lib.TrainState, batch: dict[str, Any], frozen: Any,
           lr: jax.Array) -> tuple[step_lib.TrainState, dict]:
    _, g_disc, metrics, key = gradients(state, batch, frozen)
    updates, opt_disc = tx_unit.update(g_disc, state.opt_disc, state.disc)
    updates = jax.tree_util.tree_map(lambda u: lr * u, updates)
    state = state.replace(step=state.step + 1, disc=optax.apply_updates(state.disc, updates), opt_disc=opt_disc,
                          key=key)
    return state, {m: metrics[m] for m in PROBE_METRICS}

  curves = []
  for head_init, lr in arms:
    arm = config.copy_and_resolve_references()
    arm.gan.head_init, arm.optim.disc_lr = head_init, float(lr)
    data = batches.make_data(arm, models, source)
    batch = next(data)
    arm_models = dataclasses.replace(models, disc=dataclasses.replace(models.disc, head_init=head_init))
    state = step_lib.init_state(arm, arm_models, frozen, batch)
    out, window = [], []
    for k in range(1, num_steps + 1):
      state, metrics = step(state, batch, frozen, np.float32(lr))
      window.append(metrics)
      if k % log_every == 0 or k == num_steps:
        values = jax.device_get(window)
        out.append({"step": k, **{m: float(np.mean([v[m] for v in values])) for m in PROBE_METRICS}})
        window = []
      batch = next(data)
    data.close()
    curves.append(out)
  return curves
