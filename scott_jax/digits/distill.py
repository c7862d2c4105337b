"""Stage 2 of the digits experiment: distil LCM and SCott students from the stage-1 teacher with mode train.

Each (method, seed) is one ordinary SD-style training run of mode train (`scott_jax.train`, reached through the
mode registry `scott_jax.modes`: the SD1.5 train step, discriminator, EMA, optimizers and orbax checkpoints) on
the teacher folder WORKDIR/teacher_pipeline, whose
``vae/`` is the `PixelSpace` marker: the "latents" are the grey pixels. The data source is the digits training
split with its prompts. Runs live in WORKDIR/distill/<method>_seed<k>/ and resume from their checkpoints; a
finished run writes ``done.json`` and is not rebuilt; stage 3 runs the eval job (`scott_jax.evaluate`) on its last
checkpoint as on an SD1.5 run (`scott_jax.digits.run.student_results`).

Methods (``config.digits.distill_methods``), each a set of overrides of the experiment config:

  scott         ``config.solver`` / ``config.gan`` as given (SD1.5 SCott: ER-SDE noise fn 7, order 2, skip 24,
                h = 3, GAN on)
  lcm           the ODE baseline: DDIM eta 0, h = 1, skip ``digits.lcm_skip``, no GAN
  scott_no_gan  SCott without the adversarial loss (Table 7)
  scott_ddim    SCott with the DDIM-eta teacher (eta ``digits.ablation_eta``, Table 5)
  scott_h1      SCott in one SDE step (h = 1, Table 6)
  lcm_gan       LCM + GAN (Table 7)
  ode           the ODE control with SCott's settings: ER-SDE noise fn 1 (the deterministic ODE solver), order,
                skip and h as SCott, no GAN (Table 5's teacher comparison, one change from scott_no_gan)
  scott_fixed_gan  SCott with the paper's fixed lambda_adv from step 0 (gan.weighting fixed, start_step 0)
  scott_gaussian   SCott v1's Gaussian student: SCott's teacher and ``config.gan``, the student predicting a
                   Gaussian per pixel trained with the KL consistency loss (consistency.student_output gaussian)
  scott_gaussian_no_gan  the Gaussian student without the adversarial loss
  scott_k2      SCott with the discriminator's losses on every 2nd example of the batch (gan.example_stride 2,
                half the discriminator's cost; one change from scott)
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging

from scott_jax import modes
from scott_jax.choices import DIGITS_METHODS
from scott_jax.config import ConfigDict
from scott_jax.data import arrays
from scott_jax.digits import data as data_lib

METHODS = DIGITS_METHODS
TITLES = {"scott": "SCott", "lcm": "LCM", "scott_no_gan": "SCott w/o GAN", "scott_ddim": "SCott DDIM-eta",
          "scott_h1": "SCott h=1", "lcm_gan": "LCM + GAN", "ode": "ODE control", "scott_fixed_gan": "SCott fixed GAN",
          "scott_gaussian": "SCott Gaussian", "scott_gaussian_no_gan": "SCott Gaussian w/o GAN",
          "scott_k2": "SCott, GAN on every 2nd example"}
DONE = "done.json"


def method_config(config: ConfigDict, method: str, seed: int, teacher_path: str) -> ConfigDict:
  """The training config of one student: the experiment config with ``method``'s overrides, ``seed`` and the
  teacher folder. Raises ValueError for an unknown method."""
  if method not in METHODS:
    raise ValueError(f"unknown digits distillation method '{method}'; allowed: {', '.join(METHODS)}")
  d = config.digits
  c = config.copy_and_resolve_references()
  c.seed = int(seed)
  c.model.teacher_path = teacher_path
  c.data.resolution = d.resolution
  c.train.sample_every = 0
  lcm_solver = dict(name="ddim", eta=0.0, order=1, h=1, skip=d.lcm_skip)
  if method in ("lcm", "lcm_gan"):
    c.solver.update(lcm_solver)
  if method == "scott_ddim":
    c.solver.update(dict(name="ddim", eta=d.ablation_eta, order=1))
  if method == "scott_h1":
    c.solver.h = 1
  if method == "ode":
    c.solver.noise_fn = 1
  if method == "scott_k2":
    c.gan.example_stride = 2
  if method == "scott_fixed_gan":
    c.gan.update(dict(weighting="fixed", start_step=0))
  if method in ("scott_gaussian", "scott_gaussian_no_gan"):
    c.consistency.student_output = "gaussian"
  if method in ("lcm", "scott_no_gan", "ode", "scott_gaussian_no_gan"):
    c.gan.enabled = False
    c.gan.lambda_adv = 0.0
  return c


def run_dir(workdir: str, method: str, seed: int, runs: str = "distill") -> str:
  """WORKDIR/<runs>/<method>_seed<seed>: one student run (``runs``: "distill" for mode digits, another folder
  for another experiment on the same teacher, e.g. mode evidence's)."""
  return os.path.join(workdir, runs, f"{method}_seed{seed}")


def read_done(directory: str) -> dict[str, Any] | None:
  path = os.path.join(directory, DONE)
  if not os.path.isfile(path):
    return None
  with open(path) as fh:
    return json.load(fh)


def source(config: ConfigDict, data: data_lib.DigitsData) -> Any:
  """The training split with its prompts as an in-memory source (batch at step k a function of (seed, k))."""
  captions = [data_lib.prompt(label) for label in data.train_labels]
  return arrays.ArraySource(data.train_images, captions, config.train.batch_size, config.seed)


def train_student(config: ConfigDict, workdir: str, data: data_lib.DigitsData, method: str,
                  seed: int, runs: str = "distill") -> dict[str, Any] | None:
  """Trains (or resumes, or skips when done) one student in `run_dir` (``runs``); returns its done info (method,
  seed, steps, seconds, cpu_seconds), or None when training stopped early (a signal)."""
  directory = run_dir(workdir, method, seed, runs)
  done = read_done(directory)
  if done is not None:
    return done
  c = method_config(config, method, seed, os.path.join(workdir, "teacher_pipeline"))
  t0, cpu0 = time.time(), time.process_time()
  logging.info("digits: distilling %s seed %d (%d steps of batch %d)", method, seed, c.train.num_steps,
               c.train.batch_size)
  state = modes.resolve("train")(c, directory, source=source(c, data))
  if int(state.step) < c.train.num_steps:
    return None
  # cpu_seconds: this process's CPU time over the run, all threads (what the run costs whatever else shares the
  # machine; wall seconds grow with the load beside it)
  info = {"method": method, "seed": int(seed), "steps": int(state.step), "seconds": round(time.time() - t0, 2),
          "cpu_seconds": round(time.process_time() - cpu0, 2)}
  with open(os.path.join(directory, DONE), "w") as fh:
    json.dump(info, fh, indent=2)
  return info
