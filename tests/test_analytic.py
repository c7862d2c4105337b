"""Exact eps functions against Tweedie's formula (finite differences of the marginal log-density), and the
sample_teacher CLI mode against the Gaussian closed form."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import DDPMScheduler

from scott_jax import analytic, schedules
from scott_jax import config as config_lib

SCHED = schedules.sd15()
ABAR = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod.double().numpy()


def _log_marginal(z: np.ndarray, t: int, means: np.ndarray, stds: np.ndarray, w: np.ndarray) -> np.ndarray:
  """log p_t(z) (B,) for the mixture sum_k w_k N(mu_k, s_k^2 I) pushed through z = alpha x0 + sigma eps."""
  a, s2 = math.sqrt(ABAR[t]), 1 - ABAR[t]
  v = a**2 * stds**2 + s2  # (K,)
  d = z.shape[1]
  sq = ((z[:, None, :] - a * means[None]) ** 2).sum(-1)  # (B, K)
  logp = np.log(w) - 0.5 * sq / v - 0.5 * d * np.log(2 * np.pi * v)
  mx = logp.max(1, keepdims=True)
  return (mx + np.log(np.exp(logp - mx).sum(1, keepdims=True)))[:, 0]


def _tweedie_eps(z: np.ndarray, t: int, means, stds, w, h: float = 1e-5) -> np.ndarray:
  """E[eps | z_t] = -sigma_t grad log p_t(z) by central differences in float64."""
  grad = np.zeros_like(z)
  for j in range(z.shape[1]):
    e = np.zeros_like(z)
    e[:, j] = h
    grad[:, j] = (_log_marginal(z + e, t, means, stds, w) - _log_marginal(z - e, t, means, stds, w)) / (2 * h)
  return -math.sqrt(1 - ABAR[t]) * grad


@pytest.mark.parametrize("t", [0, 50, 400, 999])
def test_mixture_eps_matches_tweedie(t):
  means = np.array([[1.0, -0.5, 0.0], [-1.0, 0.3, 0.5], [0.2, 1.2, -1.0], [3.0, 3.0, 3.0]])
  stds = np.array([0.2, 0.3, 0.1, 0.05])
  w = np.array([0.4, 0.3, 0.2, 0.1])
  mix = analytic.GaussianMixture(means, stds, w * 7.0)  # unnormalised weights are normalised
  z = np.random.default_rng(t).standard_normal((16, 3)) * 1.5
  ours = mix.eps_fn(SCHED)(jnp.asarray(z, jnp.float32), jnp.array(t))
  np.testing.assert_allclose(np.asarray(ours), _tweedie_eps(z, t, means, stds, w), atol=2e-3, rtol=2e-3)
  # per-example t gives the same as scalar t row by row
  tt = jnp.full((16,), t)
  np.testing.assert_allclose(mix.eps_fn(SCHED)(jnp.asarray(z, jnp.float32), tt), ours, rtol=1e-4, atol=1e-5)


def test_mixture_far_from_modes_is_finite():
  """logsumexp: points far from all modes at low noise must not produce NaN (naive softmax underflows)."""
  mix = analytic.GaussianMixture([[0.0, 0.0], [1.0, 1.0]], [0.01, 0.01])
  z = jnp.asarray([[40.0, -30.0], [0.5, 0.5]])
  eps = mix.eps_fn(SCHED)(z, jnp.array(0))
  assert np.all(np.isfinite(np.asarray(eps)))


def test_gaussian_eps_matches_tweedie_and_one_component_mixture():
  m, s = 0.5, 0.3
  z = np.random.default_rng(0).standard_normal((8, 2))
  t = jnp.asarray([0, 10, 100, 300, 500, 700, 900, 999])
  ours = analytic.gaussian_eps_fn(SCHED, m, s)(jnp.asarray(z, jnp.float32), t)
  for i, ti in enumerate(np.asarray(t)):
    ref = _tweedie_eps(z[i:i + 1], int(ti), np.array([[m, m]]), np.array([s]), np.array([1.0]))
    np.testing.assert_allclose(np.asarray(ours[i:i + 1]), ref, atol=1e-3, rtol=1e-3)
  one = analytic.GaussianMixture([[m, m]], [s]).eps_fn(SCHED)(jnp.asarray(z, jnp.float32), t)
  np.testing.assert_allclose(one, ours, rtol=1e-5, atol=1e-6)


def test_mixture_sample_moments():
  mix = analytic.GaussianMixture([[2.0, 0.0], [-2.0, 0.0]], [0.5, 0.5], [0.25, 0.75])
  x = np.asarray(mix.sample(jax.random.PRNGKey(0), 40000))
  # mean of x: 0.25 * 2 - 0.75 * 2 = -1; fraction on the right: 0.25 (s.e. 0.0022)
  assert abs(x[:, 0].mean() + 1.0) < 0.03
  assert abs((x[:, 0] > 0).mean() - 0.25) < 0.01
  assert abs(x[:, 1].std() - 0.5) < 0.01


def test_run_sample_teacher(capsys, tmp_path):
  cfg = config_lib.defaults()
  st = cfg.sample_teacher
  st.num_samples, st.dim, st.num_steps = 4000, 2, 20
  st.solver, st.order, st.noise_fn, st.data_mean, st.data_std = "er_sde", 2, 7, 0.5, 0.3
  out = analytic.run_sample_teacher(cfg, str(tmp_path))
  printed = capsys.readouterr().out
  assert "mean:" in printed and "std:" in printed
  assert out["mean_true"] == 0.5 and out["std_true"] == 0.3 and out["num_values"] == 8000
  n = 8000
  np.testing.assert_allclose(out["mean_se"], out["std"] / math.sqrt(n), rtol=1e-9)
  # the start mismatch N(0, I) vs the true marginal at t = 999 moves the ODE mean by -alpha m s / S (closed form)
  a2 = ABAR[999]
  np.testing.assert_allclose(out["ode_prior_mean_bias"], -math.sqrt(a2) * 0.5 * 0.3 / math.sqrt(a2 * 0.09 + 1 - a2),
                             rtol=1e-5)
  # the samples are near the data law (20 steps of a stochastic solver: loose, 5% of the scale)
  assert abs(out["mean"] - 0.5) < 0.05 * 0.5 + 4 * out["mean_se"]
  assert abs(out["std"] - 0.3) < 0.1 * 0.3
