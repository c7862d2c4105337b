"""Noise schedules against diffusers' DDPMScheduler; prediction-type conversions against closed forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import DDPMScheduler

from scott_jax import schedules
from scott_jax.schedules import NoiseSchedule

CONFIGS = [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000),
    dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000),
    dict(beta_schedule="linear", beta_start=0.001, beta_end=0.03, num_train_timesteps=50),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['beta_schedule']}-{c['num_train_timesteps']}")
def test_abar_matches_diffusers(cfg):
  ref = DDPMScheduler(**cfg).alphas_cumprod.double().numpy()
  sched = NoiseSchedule.from_config(cfg)
  assert sched.num_train_timesteps == cfg["num_train_timesteps"]
  # diffusers accumulates the product in float32; ours in float64 then rounds, so allow float32 round-off.
  np.testing.assert_allclose(np.asarray(sched.abar, np.float64), ref, rtol=2e-5, atol=1e-9)


def test_sd15_and_config_dict():
  import ml_collections

  from scott_jax import config as config_lib

  a = schedules.sd15()
  b = NoiseSchedule.from_config(config_lib.defaults().schedule)
  c = NoiseSchedule.from_config(ml_collections.ConfigDict(CONFIGS[0]))
  np.testing.assert_array_equal(a.abar, b.abar)
  np.testing.assert_array_equal(a.abar, c.abar)
  assert a.prediction_type == "epsilon"


def test_bad_values_raise():
  with pytest.raises(ValueError, match="cosine_typo"):
    NoiseSchedule.from_config(dict(beta_schedule="cosine_typo"))
  with pytest.raises(ValueError, match="x_prediction"):
    NoiseSchedule.from_config(dict(prediction_type="x_prediction"))


def test_coefficients_gather_any_shape():
  sched = schedules.sd15()
  ab = np.asarray(sched.abar, np.float64)
  t = jnp.array([[0, 5], [999, 500]])
  np.testing.assert_allclose(sched.abar_at(t), ab[np.asarray(t)], rtol=1e-6)
  np.testing.assert_allclose(sched.alpha(t), np.sqrt(ab[np.asarray(t)]), rtol=1e-6)
  np.testing.assert_allclose(sched.sigma(t), np.sqrt(1 - ab[np.asarray(t)]), rtol=1e-6)
  np.testing.assert_allclose(sched.lam(t), np.sqrt((1 - ab[np.asarray(t)]) / ab[np.asarray(t)]), rtol=1e-5)
  # t < 0 is clean data: abar = 1, lambda = 0.
  assert float(sched.abar_at(-1)) == 1.0 and float(sched.lam(-1)) == 0.0
  # scaled_linear, SD1.5: abar_0 = 1 - 0.00085.
  np.testing.assert_allclose(float(sched.abar_at(0)), 1 - 0.00085, rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_conversions_round_trip(prediction_type):
  """A model that outputs the exact target of (x0, eps) is converted back to that x0, eps and v."""
  sched = schedules.sd15(prediction_type)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  x0 = jax.random.normal(k1, (3, 4, 2))
  eps = jax.random.normal(k2, (3, 4, 2))
  t = jnp.array([10, 500, 990])
  z = sched.add_noise(x0, eps, t)
  a = np.sqrt(np.asarray(sched.abar)[np.asarray(t)])[:, None, None]
  s = np.sqrt(1 - np.asarray(sched.abar)[np.asarray(t)])[:, None, None]
  np.testing.assert_allclose(z, a * x0 + s * eps, rtol=1e-5, atol=1e-6)
  out = sched.target(x0, eps, t)
  expected_out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]
  np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sched.to_x0(out, z, t), x0, atol=2e-4)
  np.testing.assert_allclose(sched.to_eps(out, z, t), eps, atol=2e-4)
  np.testing.assert_allclose(sched.to_v(out, z, t), a * eps - s * x0, atol=2e-4)
  np.testing.assert_allclose(sched.from_eps(eps, z, t), out, atol=2e-4)
  # scalar t broadcasts over the batch
  np.testing.assert_allclose(sched.add_noise(x0, eps, jnp.array(7)), sched.add_noise(x0, eps, jnp.full((3,), 7)))


def test_schedule_is_a_pytree_under_jit():
  sched = schedules.sd15("v_prediction")

  @jax.jit
  def f(sc, z, t):
    return sc.to_x0(jnp.zeros_like(z), z, t)

  z = jnp.ones((2, 3))
  np.testing.assert_allclose(f(sched, z, jnp.array([0, 999])), np.asarray(sched.alpha(jnp.array([0, 999])))[:, None]
                             * np.ones((2, 3)), rtol=1e-6)
