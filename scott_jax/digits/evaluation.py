"""Sampling rows and their metrics for the digits experiment.

A row is a way to generate digits from prompts: ``sample_fn(labels (n,), key) -> images (n, R, R, C)`` float32
in [-1, 1], where by convention ``k_z, k_rest = split(key)`` and the initial noise is
``normal(k_z, (n, R, R, C))``, so rows evaluated with the same key start from the same noise ("same seeds").
Every row generates ``samples_per_digit`` images of each digit (labels ``tile(arange(10), n)``) in chunks of
``min(eval_batch, N)``, chunk i with key ``fold_in(key(eval_seed), i)``. The student rows are sampled by the
eval job (`scott_jax.evaluate`, `scott_jax.digits.run.student_results`), whose `scott_jax.pipeline` sampler
follows the same convention (``k_latents, k_rest = split(key)``, batch i keyed ``fold_in(key, i)``), so every
row, teacher or student, starts from the same noise.

Metrics, all on the digit classifier (`scott_jax.digits.classifier`), generated vs the real TEST split:
accuracy (argmax == prompted digit; the CLIP-score analogue), FID (Frechet distance of the classifier
features' Gaussians, `scott_jax.metrics.fid`), and precision / recall / density / coverage with k =
``coverage_k`` (`scott_jax.metrics.coverage.prdc`, the real set being the test split).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scott_jax import solvers
from scott_jax.digits.data import NUM_CLASSES, UNCOND, to_uint8
from scott_jax.metrics import coverage as coverage_lib
from scott_jax.metrics import fid as fid_lib
from scott_jax.schedules import NoiseSchedule

Array = jax.Array
PyTree = Any
SampleFn = Callable[[np.ndarray, Array], np.ndarray]

SOLVER_TITLES = {"ddim": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)", "er_sde": "ER-SDE", "addim": "aDDIM"}


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the results table. ``evals_per_image``: U-Net evaluations per generated image (CFG counts 2)."""

  name: str
  method: str
  steps: int
  evals_per_image: int
  sample_fn: SampleFn
  seed: int | None = None  # the training seed of a student row (rows of one method differ only in it)

  @property
  def slug(self) -> str:
    return slug(self.name)


def slug(name: str) -> str:
  """A row name as a file name stem: lower case, every non-alphanumeric character "_"."""
  return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def eval_labels(samples_per_digit: int) -> np.ndarray:
  """(10 * n,) int32 labels 0..9 repeated n times (every chunk holds all digits)."""
  return np.tile(np.arange(NUM_CLASSES, dtype=np.int32), samples_per_digit)


def teacher_timesteps(num_steps: int, num_train: int = 1000) -> np.ndarray:
  """The teacher rows' grid: diffusers' "trailing" spacing (starts at num_train - 1, where z_T ~ N(0, I) is the
  best match), num_steps descending timesteps; the sampler's last step goes to clean data."""
  return solvers.ddim_timesteps(num_steps, num_train, spacing="trailing")


def make_teacher_sample_fn(unet: Any, params: PyTree, table: np.ndarray, schedule: NoiseSchedule, *,
                           solver: str, num_steps: int, guidance_scale: float,
                           solver_options: dict[str, Any] | None = None) -> SampleFn:
  """A teacher row: ``solver`` over `teacher_timesteps(num_steps)` with CFG scale g (LCM form, w = g - 1: one
  U-Net call on [uncond; cond] per step). ``table`` is the (11, L, D) prompt table; ``solver_options`` are
  filtered with `solvers.solver_kwargs` (e.g. config.solver's order and noise_fn for er_sde)."""
  kwargs = solvers.solver_kwargs(solver, solver_options or {})
  timesteps = jnp.asarray(teacher_timesteps(num_steps, schedule.num_train_timesteps))
  table = jnp.asarray(table)
  w = jnp.float32(float(guidance_scale) - 1.0)

  # The weights, prompt table and w are arguments, not constants of the program: the rows of one solver and step
  # count at every CFG scale are one program (one compile, then JAX's persistent cache).
  @jax.jit
  def run(params: PyTree, table: Array, w: Array, labels: Array, key: Array) -> Array:
    def eps_fn(z: Array, t: Array, context: Array) -> Array:
      return schedule.to_eps(unet.apply(params, z, t, context).astype(jnp.float32), z, t)

    k_z, k_solver = jax.random.split(key)
    res = unet.config.sample_size
    z = jax.random.normal(k_z, (labels.shape[0], res, res, unet.config.in_channels), jnp.float32)
    guided = solvers.make_guided_eps_fn(eps_fn, table[labels], table[UNCOND][None], w)
    return solvers.sample(guided, z, timesteps, solver=solver, schedule=schedule, key=k_solver, **kwargs)

  return lambda labels, key: np.asarray(run(params, table, w, jnp.asarray(labels, jnp.int32), key))


def generate(sample_fn: SampleFn, labels: np.ndarray, seed: int, batch: int) -> tuple[np.ndarray, float]:
  """Runs ``sample_fn`` over ``labels`` in chunks of ``batch`` (chunk i: key fold_in(key(seed), i); the last
  chunk padded to the full batch so one compiled shape serves all). Returns (images (N, R, R, C) float32,
  seconds spent after the first chunk's compilation, scaled to all N images)."""
  out, seconds, timed = [], 0.0, 0
  batch = min(batch, len(labels))  # as `scott_jax.pipeline.generate`: the same noise as the eval job's rows
  base = jax.random.key(seed)
  for i, start in enumerate(range(0, len(labels), batch)):
    chunk = labels[start:start + batch]
    n = len(chunk)
    padded = np.concatenate([chunk, np.zeros(batch - n, chunk.dtype)]) if n < batch else chunk
    t0 = time.time()
    images = sample_fn(padded, jax.random.fold_in(base, i))[:n]
    if i > 0 or len(labels) <= batch:  # the first of several chunks pays the compilation
      seconds += time.time() - t0
      timed += n
    out.append(np.asarray(images, np.float32))
  return np.concatenate(out), seconds * len(labels) / max(timed, 1)


def metrics(logits: np.ndarray, features: np.ndarray, labels: np.ndarray, real_features: np.ndarray,
            k: int) -> dict[str, float]:
  """accuracy against ``labels``, min per-digit accuracy, FID and prdc against ``real_features``."""
  pred = np.argmax(logits, axis=-1)
  per_digit = [float(np.mean(pred[labels == c] == c)) for c in range(NUM_CLASSES) if np.any(labels == c)]
  out = {"accuracy": float(np.mean(pred == labels)), "min_digit_accuracy": min(per_digit),
         "fid": fid_lib.fid_from_features(real_features, features)}
  out.update(coverage_lib.prdc(real_features, features, k))
  return out


def write_grid(path: str, images: np.ndarray, labels: np.ndarray, per_digit: int = 8, scale: int = 4) -> None:
  """PNG grid: column c shows the first ``per_digit`` images of digit c (rows top to bottom), each image
  ``scale`` x nearest-upsampled; images uint8 (N, R, R, 3) or model-space floats in [-1, 1]."""
  from PIL import Image

  imgs = images if images.dtype == np.uint8 else to_uint8(images)
  r = imgs.shape[1]
  pad = 1
  grid = np.full((per_digit * (r + pad) + pad, NUM_CLASSES * (r + pad) + pad, 3), 255, np.uint8)
  for c in range(NUM_CLASSES):
    for j, i in enumerate(np.flatnonzero(labels == c)[:per_digit]):
      y, x = pad + j * (r + pad), pad + c * (r + pad)
      grid[y:y + r, x:x + r] = imgs[i]
  Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
