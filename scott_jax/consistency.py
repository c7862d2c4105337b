"""LCM consistency parameterisation: boundary conditions, guidance embedding, timestep grids (notes 2, 4, 6).

The consistency function of a (w-conditioned) diffusion model output is

  f_theta(z, t, c, w) = c_skip(t) z + c_out(t) x0_hat(z, t),   s = timestep_scaling * t,
  c_skip = sigma_data^2 / (s^2 + sigma_data^2),   c_out = s / sqrt(s^2 + sigma_data^2),

so f(z, 0) = z exactly (c_skip(0) = 1, c_out(0) = 0). x0_hat comes from the model output through the
noise schedule's conversion (eps, v or x0 prediction). Timesteps t are integers 0..num_train-1 (they may be
passed as floats; the scalings are evaluated at the given value). Everything here is a pure function of
arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from scott_jax.choices import GAUSSIAN_SAMPLING, GRIDS, TIMESTEP_RULES
from scott_jax.schedules import expand

if TYPE_CHECKING:
  from scott_jax.schedules import NoiseSchedule

Array = jax.Array


def boundary_scalings(t: Array | float, timestep_scaling: float = 10.0,
                      sigma_data: float = 0.5) -> tuple[Array, Array]:
  """LCM boundary-condition scalings (c_skip(t), c_out(t)), each with the shape of ``t``.

  Same formula as diffusers `LCMScheduler.get_scalings_for_boundary_condition_discrete`; t is the integer
  timestep (any shape), dimensionless.
  """
  s = jnp.asarray(t, jnp.float32) * timestep_scaling
  c_skip = sigma_data**2 / (s**2 + sigma_data**2)
  c_out = s / jnp.sqrt(s**2 + sigma_data**2)
  return c_skip, c_out


def guidance_embedding(w: Array, dim: int = 256, dtype: jnp.dtype = jnp.float32) -> Array:
  """Sinusoidal embedding of the guidance scale w (B,) -> (B, dim), as diffusers' LCM pipeline.

  Matches `LatentConsistencyModelPipeline.get_guidance_scale_embedding`: the argument is w * 1000,
  frequencies exp(-log(10000) k / (dim/2 - 1)), k = 0..dim/2-1, output [sin, cos] (zero-padded by one column
  if dim is odd). w is the LCM guidance weight (CFG scale g = 1 + w).
  """
  w = jnp.asarray(w)
  if w.ndim != 1:
    raise ValueError(f"w must have shape (B,), got {w.shape}")
  half = dim // 2
  # Same float operation order as diffusers (log in the working dtype), so large w * 1000 arguments agree.
  step = jnp.log(jnp.asarray(10000.0, dtype)) / (half - 1)
  freq = jnp.exp(jnp.arange(half, dtype=dtype) * -step)
  arg = (w * 1000.0).astype(dtype)[:, None] * freq[None, :]
  emb = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=1)
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def consistency_output(model_out: Array, z: Array, t: Array, schedule: NoiseSchedule, *,
                       timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple[Array, Array]:
  """f = c_skip(t) z + c_out(t) x0_hat and x0_hat, both shaped like z (B, ...).

  ``model_out`` (B, ...) is the network output in the schedule's prediction type (eps, v or x0); ``t`` (B,) or
  () integer timesteps. x0_hat = ``schedule.to_x0(model_out, z, t)``.
  """
  x0_hat = schedule.to_x0(model_out, z, t)
  c_skip, c_out = boundary_scalings(t, timestep_scaling, sigma_data)
  f = expand(c_skip, z).astype(z.dtype) * z + expand(c_out, z).astype(z.dtype) * x0_hat
  return f, x0_hat


def split_gaussian(model_out: Array) -> tuple[Array, Array]:
  """A Gaussian student's network output (B, ..., 2C) -> (prediction (B, ..., C), log-variance (B, ..., C)):
  the first half of the channels is the usual model output (eps, v or x0), the second the log-variance of x0_hat
  (per element, in squared data units)."""
  c = model_out.shape[-1]
  if c % 2:
    raise ValueError(f"a Gaussian student's output needs an even channel count (prediction, log-variance), got {c}")
  return model_out[..., :c // 2], model_out[..., c // 2:]


def gaussian_consistency_output(model_out: Array, z: Array, t: Array, schedule: NoiseSchedule, *,
                                timestep_scaling: float = 10.0,
                                sigma_data: float = 0.5) -> tuple[Array, Array, Array]:
  """The Gaussian consistency function (SCott v1): (mean, logvar, x0_hat), each shaped like z (B, ...).

  ``model_out`` (B, ..., 2C): `split_gaussian` halves (prediction, log-variance of x0_hat). mean =
  c_skip(t) z + c_out(t) x0_hat (`consistency_output` of the first half); the variance of f is c_out(t)^2
  exp(logvar_net) (DECISION, docs/decisions.md: the network's log-variance is that of its x0 prediction, scaled
  by the boundary condition as x0_hat is), so logvar = logvar_net + 2 log c_out(t), float32, -inf at t = 0
  (f(z, 0) = z exactly: zero variance).
  """
  pred, logvar_net = split_gaussian(model_out)
  mean, x0_hat = consistency_output(pred, z, t, schedule, timestep_scaling=timestep_scaling, sigma_data=sigma_data)
  _, c_out = boundary_scalings(t, timestep_scaling, sigma_data)
  log_c2 = jnp.where(c_out > 0, 2.0 * jnp.log(jnp.where(c_out > 0, c_out, 1.0)), -jnp.inf)
  return mean, logvar_net.astype(jnp.float32) + expand(log_c2, z), x0_hat


def gaussian_draw(mean: Array, logvar: Array, noise: Array) -> Array:
  """x = mean + exp(logvar / 2) * noise (B, ...): a reparameterised draw from N(mean, exp(logvar)) (zero
  variance where logvar = -inf); differentiable in mean and logvar."""
  return mean + (jnp.exp(0.5 * logvar) * noise).astype(mean.dtype)


def consistency_fn(model_fn: Callable[[Array, Array], Array], z: Array, t: Array, schedule: NoiseSchedule, *,
                   timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> Array:
  """The consistency function f(z, t) (B, ...) around ``model_fn(z, t) -> model output`` (B, ...).

  ``model_fn`` closes over its parameters and conditioning (prompt embedding c, guidance weight w); its output
  is in the schedule's prediction type. f(z, 0) = z exactly.
  """
  f, _ = consistency_output(model_fn(z, t), z, t, schedule, timestep_scaling=timestep_scaling,
                            sigma_data=sigma_data)
  return f


def ddim_grid(num_ddim_timesteps: int = 50, num_train: int = 1000) -> Array:
  """LCM training timesteps (num_ddim_timesteps,) int32, ascending: [19, 39, ..., 999] for (50, 1000).

  As the LCM distillation script's `DDIMSolver`: round(arange(1, N + 1) * (num_train // N)) - 1.
  """
  if not 1 <= num_ddim_timesteps <= num_train:
    raise ValueError(f"num_ddim_timesteps must be in [1, {num_train}], got {num_ddim_timesteps}")
  step = num_train // num_ddim_timesteps
  return jnp.asarray(np.round(np.arange(1, num_ddim_timesteps + 1) * step) - 1, jnp.int32)


def skip_grid(skip: int, num_train: int = 1000) -> Array:
  """Training timesteps spaced by the teacher's skip, ascending: {num_train - 1 - k * skip >= 0}.

  Every target time t_m = t_n - skip is then itself a training time (or is clamped to 0), so the chain of
  consistency constraints closes. For skip 20 this is exactly `ddim_grid(50)`; for the paper's skip 24 it is
  [15, 39, ..., 975, 999] (42 points).
  """
  if not 1 <= skip < num_train:
    raise ValueError(f"skip must be in [1, {num_train - 1}], got {skip}")
  return jnp.asarray(np.arange(num_train - 1, -1, -skip)[::-1].copy(), jnp.int32)


def training_grid(kind: str, *, skip: int, num_ddim_timesteps: int = 50, num_train: int = 1000) -> Array:
  """The t_n grid of CD training (ascending int32). DECISION (config ``consistency.grid``): "skip" spaces it by
  the teacher's skip (`skip_grid`); "ddim" is LCM's `ddim_grid(num_ddim_timesteps)` whatever the skip (with
  skip 24 on a 20-spaced grid the targets then fall between training times; the toy2d experiment shows the
  chain then drifts)."""
  if kind == "skip":
    return skip_grid(skip, num_train)
  if kind == "ddim":
    return ddim_grid(num_ddim_timesteps, num_train)
  raise ValueError(f"unknown training grid '{kind}'; allowed: {', '.join(GRIDS)}")


def sample_grid_index(key: Array, batch: int, num_ddim_timesteps: int = 50) -> Array:
  """Uniform indices (batch,) int32 into `ddim_grid` (t_n = ddim_grid(...)[index])."""
  return jax.random.randint(key, (batch,), 0, num_ddim_timesteps, dtype=jnp.int32)


def lcm_timesteps(num_steps: int, original_steps: int = 50, num_train: int = 1000) -> np.ndarray:
  """Multistep consistency sampling timesteps (num_steps,) int64, descending, as `LCMScheduler.set_timesteps`.

  `grid_timesteps` on LCM's training grid `ddim_grid(original_steps)` = k * (1..original_steps) - 1
  (k = num_train // original_steps): 1 -> [999], 2 -> [999, 499], 4 -> [999, 759, 499, 259] for the defaults.
  """
  if not 1 <= original_steps <= num_train:
    raise ValueError(f"original_steps must be in [1, {num_train}], got {original_steps}")
  if not 1 <= num_steps <= original_steps:
    raise ValueError(f"num_steps must be in [1, original_steps={original_steps}], got {num_steps}")
  return grid_timesteps(num_steps, ddim_grid(original_steps, num_train))


def grid_timesteps(num_steps: int, grid: Array | np.ndarray) -> np.ndarray:
  """k-step sampling timesteps (num_steps,) int64, descending, all points of the training ``grid`` (ascending).

  The rule of diffusers' `LCMScheduler.set_timesteps`, for any grid: the grid reversed (its top first), taken at
  indices floor(linspace(0, N, k, endpoint=False)) (N = grid size). On LCM's `ddim_grid(50)` this is
  `lcm_timesteps`; on the paper's skip-24 grid (`skip_grid(24)`, 42 points) 2 -> [999, 495] and
  4 -> [999, 759, 495, 255], where LCM's [999, 759, 499, 259] would fall between training times.
  """
  desc = np.asarray(grid, np.int64)[::-1]
  if desc.ndim != 1 or desc.size == 0 or np.any(np.diff(desc) >= 0):
    raise ValueError(f"grid must be a non-empty strictly ascending 1-D list, got {np.asarray(grid).tolist()}")
  if not 1 <= num_steps <= desc.size:
    raise ValueError(f"num_steps must be in [1, {desc.size}] (the grid size), got {num_steps}")
  index = np.floor(np.linspace(0, desc.size, num=num_steps, endpoint=False)).astype(np.int64)
  return desc[index]


def sampling_grid(rule: str, kind: str, *, skip: int, num_ddim_timesteps: int = 50,
                  num_train: int = 1000) -> np.ndarray:
  """The grid (ascending int64) k-step student sampling picks its timesteps from (`grid_timesteps`).

  DECISION (config ``consistency.timestep_rule``): "grid" = the CD training grid `training_grid(kind)` (so every
  sampling time is a time the student was trained at; with ``grid="ddim"`` identical to "lcm"); "lcm" = LCM's
  `ddim_grid(num_ddim_timesteps)` whatever the training grid (diffusers' LCMScheduler default).
  """
  if rule == "grid":
    return np.asarray(training_grid(kind, skip=skip, num_ddim_timesteps=num_ddim_timesteps, num_train=num_train),
                      np.int64)
  if rule == "lcm":
    return np.asarray(ddim_grid(num_ddim_timesteps, num_train), np.int64)
  raise ValueError(f"unknown timestep rule '{rule}'; allowed: {', '.join(TIMESTEP_RULES)}")


def multistep_sample(f_fn: Callable[[Array, Array], Array], z_T: Array, timesteps: Array | np.ndarray,
                     schedule: NoiseSchedule, key: Array | None = None, *, gaussian: str | None = None,
                     noises: Array | None = None, draws: Array | None = None) -> Array:
  """Multistep consistency sampling (notes section 6; diffusers `LCMScheduler.step`); the one k-step student
  sampler (`scott_jax.pipeline.student_latents` runs it on a U-Net).

  ``f_fn(z, t) -> f`` is the consistency function (B, ...) at a scalar int timestep t; ``timesteps`` (K,)
  descending ints (e.g. `lcm_timesteps(K)`). x0 = f(z_t, t); between steps z_t' = alpha_t' x0 + sigma_t' xi.
  Returns the last x0 (B, ...). One lax.scan: jit-able with f_fn closed over.

  The noise: ``key`` (xi at step i from split(key, K)[i]), or ``noises`` (K - 1, B, ...) standard normal used
  in order (as LCMScheduler draws them), one of the two.

  A Gaussian student (``gaussian`` "sample" or "mean", `GAUSSIAN_SAMPLING`): ``f_fn(z, t) -> (mean, logvar)``
  (`gaussian_consistency_output`) and x0 is a draw `gaussian_draw` or the mean. A draw's noise comes from
  fold_in(step key, 1) with ``key``, else from ``draws`` (K, B, ...) standard normal. The renoising draws are
  those of the point student's loop.
  """
  if gaussian is not None and gaussian not in GAUSSIAN_SAMPLING:
    raise ValueError(f"unknown Gaussian sampling '{gaussian}'; allowed: {', '.join(GAUSSIAN_SAMPLING)}")
  if (key is None) == (noises is None):
    raise ValueError("multistep_sample needs exactly one of key and noises")
  ts = jnp.asarray(timesteps, jnp.int32)
  k = ts.shape[0]
  nxt = jnp.concatenate([ts[1:], ts[-1:]])
  if key is not None:
    randomness = (jax.random.split(key, k),)
  else:
    if noises.shape[0] != k - 1:
      raise ValueError(f"noises must have {k - 1} entries for {k} timesteps, got {noises.shape[0]}")
    xi = jnp.concatenate([jnp.asarray(noises, z_T.dtype), jnp.zeros((1,) + z_T.shape, z_T.dtype)], axis=0)
    if gaussian == "sample" and (draws is None or draws.shape[0] != k):
      raise ValueError(f"Gaussian draws need {k} entries of noise in draws, got "
                       f"{None if draws is None else draws.shape[0]}")
    randomness = (xi, jnp.asarray(draws, z_T.dtype)) if gaussian == "sample" else (xi,)

  def body(z, inp):
    t, t_next = inp[:2]
    if key is not None:
      step_key = inp[2]
      xi_t = jax.random.normal(step_key, z.shape, z.dtype)
      draw = jax.random.normal(jax.random.fold_in(step_key, 1), z.shape, z.dtype) if gaussian == "sample" else None
    else:
      xi_t, draw = inp[2], (inp[3] if gaussian == "sample" else None)
    x0 = f_fn(z, t)
    if gaussian == "sample":
      x0 = gaussian_draw(x0[0], x0[1], draw)
    elif gaussian == "mean":
      x0 = x0[0]
    return schedule.add_noise(x0, xi_t, t_next), x0

  _, x0s = jax.lax.scan(body, z_T, (ts, nxt, *randomness))
  return x0s[-1]
