"""Exact eps predictions for analytic data distributions, and the ``sample_teacher`` CLI mode.

For data x0 ~ p and z_t = alpha_t x0 + sigma_t eps the optimal (MMSE) eps prediction is E[eps | z_t]; for a
Gaussian or an isotropic Gaussian mixture it is available in closed form. These closures stand in for a
perfectly trained teacher in tests, the CLI demo and the toy2d experiment.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scott_jax import solvers
from scott_jax.schedules import NoiseSchedule

Array = jax.Array
EpsFn = Callable[[Array, Array], Array]


def gaussian_eps_fn(schedule: NoiseSchedule, mean: float | Array, std: float | Array) -> EpsFn:
  """eps(z, t) for data N(mean, std^2 I): sigma_t (z - alpha_t mean) / (alpha_t^2 std^2 + sigma_t^2).

  z (B, ...) any trailing shape, t () or (B,) integer timesteps; mean a scalar or broadcastable to z[0].
  """
  mean = jnp.asarray(mean)
  var = jnp.asarray(std) ** 2

  def eps_fn(z: Array, t: Array) -> Array:
    a, s = schedule.alpha_sigma(t, z)
    return s * (z - a * mean.astype(z.dtype)) / (a**2 * var.astype(z.dtype) + s**2)

  return eps_fn


def gaussian_x0_posterior(schedule: NoiseSchedule, mean: float, std: float, t: Array | int) -> tuple[Array, Array]:
  """For data N(mean, std^2 I): (gain, var) with E[x0 | z_t] = mean + gain (z_t - alpha_t mean) and
  Var[x0 | z_t] = var; shapes of t. Used to state the exact law of a sampler's final x0 jump."""
  abar = schedule.abar_at(t)
  v = abar * std**2 + (1.0 - abar)
  gain = jnp.sqrt(abar) * std**2 / v
  return gain, std**2 * (1.0 - abar) / v


class GaussianMixture:
  """Isotropic Gaussian mixture in R^D: sum_k w_k N(means_k, stds_k^2 I).

  means (K, D), stds (K,), weights (K,) (normalised here). Pure data holder; arrays are jnp.
  """

  def __init__(self, means: Array | Sequence[Sequence[float]], stds: Array | Sequence[float] | float,
               weights: Array | Sequence[float] | None = None):
    self.means = jnp.asarray(means)
    if self.means.ndim != 2:
      raise ValueError(f"means must have shape (K, D), got {self.means.shape}")
    k = self.means.shape[0]
    self.stds = jnp.broadcast_to(jnp.asarray(stds, self.means.dtype), (k,))
    w = jnp.ones((k,), self.means.dtype) if weights is None else jnp.asarray(weights, self.means.dtype)
    if w.shape != (k,):
      raise ValueError(f"weights must have shape ({k},), got {w.shape}")
    self.weights = w / jnp.sum(w)

  @property
  def dim(self) -> int:
    return int(self.means.shape[1])

  def sample(self, key: Array, n: int) -> Array:
    """n samples (n, D) from the mixture."""
    k1, k2 = jax.random.split(key)
    comp = jax.random.choice(k1, self.weights.shape[0], (n,), p=self.weights)
    noise = jax.random.normal(k2, (n, self.dim), self.means.dtype)
    return self.means[comp] + self.stds[comp][:, None] * noise

  def eps_fn(self, schedule: NoiseSchedule) -> EpsFn:
    """Exact eps(z, t) = E[eps | z_t = z] for z (B, D), t () or (B,).

    Component k gives z_t ~ N(alpha mu_k, v_k I), v_k = alpha^2 s_k^2 + sigma^2, posterior responsibilities
    r_k (z) by a logsumexp softmax, and E[eps | z, k] = sigma (z - alpha mu_k) / v_k.
    """
    means, stds, logw = self.means, self.stds, jnp.log(self.weights)

    def eps_fn(z: Array, t: Array) -> Array:
      a, s = schedule.alpha_sigma(t, z)  # t.shape + (1,) or t.shape + (1,)
      a, s = a[..., None], s[..., None]  # broadcast over (B, K, D)
      mu = means.astype(z.dtype)[None]  # (1, K, D)
      v = a**2 * stds.astype(z.dtype)[None, :, None] ** 2 + s**2  # (*, K, 1)
      diff = z[:, None, :] - a * mu  # (B, K, D)
      logp = logw.astype(z.dtype)[None] - 0.5 * jnp.sum(diff**2, axis=-1) / v[..., 0] \
          - 0.5 * z.shape[-1] * jnp.log(v[..., 0])  # (B, K)
      resp = jax.nn.softmax(logp, axis=-1)
      return jnp.sum(resp[..., None] * s * diff / v, axis=1)

    return eps_fn


def run_sample_teacher(config: Any, workdir: str) -> dict[str, float]:
  """CLI mode ``sample_teacher``: sample Gaussian data N(m, s^2 I) with a solver and the exact eps.

  Draws ``config.sample_teacher.num_samples`` points of dimension ``dim`` from N(0, I) at t = 999 (timesteps
  round(linspace(num_train - 1, 0, num_steps)), diffusers' "linspace" spacing), runs ``solvers.sample`` with
  solver/num_steps/eta/order/noise_fn from ``config.sample_teacher`` on the schedule ``config.schedule``
  (seed ``config.seed``) and prints the sample mean and std against the true ones with their Monte-Carlo
  standard errors, and the two known exact deviations (the N(0, I) start instead of the true marginal at
  t = 999; the final x0 jump at t = 0). Returns the printed numbers as a dict.
  """
  st = config.sample_teacher
  schedule = NoiseSchedule.from_config(config.schedule)
  n_train = schedule.num_train_timesteps
  eps_fn = gaussian_eps_fn(schedule, st.data_mean, st.data_std)
  timesteps = solvers.ddim_timesteps(st.num_steps, n_train, spacing="linspace")
  options = dict(eta=st.eta, order=st.order, noise_fn=st.noise_fn)
  kwargs = solvers.solver_kwargs(st.solver, options)
  key_z, key_s = jax.random.split(jax.random.PRNGKey(config.seed))
  z_T = jax.random.normal(key_z, (st.num_samples, st.dim), jnp.float32)

  @jax.jit
  def run(z: Array, key: Array) -> Array:
    return solvers.sample(eps_fn, z, timesteps, solver=st.solver, schedule=schedule, key=key, **kwargs)

  x = np.asarray(run(z_T, key_s), np.float64)
  n = x.size
  mean, std = float(x.mean()), float(x.std(ddof=1))
  se_mean, se_std = std / math.sqrt(n), std / math.sqrt(2 * (n - 1))
  m, s = float(st.data_mean), float(st.data_std)
  # Two known, exactly computable deviations from the data law (not solver errors):
  # (1) the start N(0, I) instead of the marginal N(alpha_T m, S_T^2) at T: the exact probability-flow ODE,
  #     affine for Gaussian data, maps it to mean m - alpha_T m s / S_T;
  # (2) the last step returns E[x0 | z_t_last], whose std is s * sqrt(gain_last * alpha_last).
  abar_T = float(schedule.abar_at(int(timesteps[0])))
  prior_bias = -math.sqrt(abar_T) * m * s / math.sqrt(abar_T * s**2 + 1 - abar_T)
  gain, _ = gaussian_x0_posterior(schedule, m, s, int(timesteps[-1]))
  std_last = s * math.sqrt(float(gain) * math.sqrt(float(schedule.abar_at(int(timesteps[-1])))))
  result = dict(mean=mean, mean_true=m, mean_se=se_mean, std=std, std_true=s, std_se=se_std,
                ode_prior_mean_bias=prior_bias, std_after_final_jump=std_last, num_values=float(n))
  print(f"sample_teacher: solver={st.solver} steps={st.num_steps} {kwargs} samples={st.num_samples} dim={st.dim}")
  print(f"mean: {mean:.5f} (data {m:.5f}, MC s.e. {se_mean:.5f}; an exact ODE flow from N(0, I) at t = "
        f"{timesteps[0]} gives {m + prior_bias:.5f}, z {(mean - m - prior_bias) / se_mean:+.2f})")
  print(f"std:  {std:.5f} (data {s:.5f}, MC s.e. {se_std:.5f}; E[x0|z] at the last timestep {timesteps[-1]} has "
        f"{std_last:.5f}); the rest of the gap is discretisation error, O(1/num_steps) for first-order solvers")
  if workdir:
    os.makedirs(workdir, exist_ok=True)
  return result
