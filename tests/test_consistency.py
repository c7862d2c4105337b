"""LCM consistency parameterisation against diffusers' LCMScheduler / LCM pipeline and closed forms."""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import LCMScheduler

from scott_jax import consistency, schedules


def _diffusers_guidance_embedding():
  """`LatentConsistencyModelPipeline.get_guidance_scale_embedding`, compiled from diffusers' installed source.

  Importing the pipeline module needs transformers' image processors (torchvision), which the test environment
  lacks; the method uses only torch and not `self`, so it is lifted out of the source file as is.
  """
  root = pathlib.Path(importlib.util.find_spec("diffusers").origin).parent
  path = root / "pipelines" / "latent_consistency_models" / "pipeline_latent_consistency_text2img.py"
  tree = ast.parse(path.read_text())
  name = "get_guidance_scale_embedding"
  fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
  namespace = {"torch": torch}
  exec(compile(ast.Module([fn], type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
  return namespace[name]


def _lcm_scheduler(**kw) -> LCMScheduler:
  return LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **kw)


@pytest.mark.parametrize("timestep_scaling", [10.0, 1.0])
def test_boundary_scalings_match_diffusers(timestep_scaling):
  sched = _lcm_scheduler(timestep_scaling=timestep_scaling)
  ts = np.concatenate([np.arange(0, 30), np.arange(30, 1000, 13), [999]])
  c_skip, c_out = consistency.boundary_scalings(jnp.asarray(ts), timestep_scaling=timestep_scaling)
  ref = np.array([sched.get_scalings_for_boundary_condition_discrete(int(t)) for t in ts])
  np.testing.assert_allclose(np.asarray(c_skip), ref[:, 0], rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(np.asarray(c_out), ref[:, 1], rtol=1e-6, atol=1e-9)
  assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0


@pytest.mark.parametrize("dim", [256, 512, 7])
def test_guidance_embedding_matches_diffusers_pipeline(dim):
  w = np.array([0.0, 0.5, 1.0, 4.5, 7.0, 14.0], np.float32)
  ref = _diffusers_guidance_embedding()(None, torch.from_numpy(w), embedding_dim=dim)
  ours = consistency.guidance_embedding(jnp.asarray(w), dim=dim)
  assert ours.shape == (len(w), dim)
  # sin/cos of float32 arguments up to w * 1000 = 14000: the frequencies exp(-k log(1e4) / (dim/2 - 1)) from
  # XLA and torch may differ by one float32 ulp, which moves the argument by |arg| * 2^-23. Allow 4 such ulps.
  half = dim // 2
  freq = np.exp(-np.arange(half) * np.log(10000.0) / (half - 1))
  arg = np.abs(w.astype(np.float64)[:, None] * 1000.0 * freq[None, :])
  tol = np.concatenate([arg, arg], axis=1) * 4 * 2.0**-23 + 1e-6
  if dim % 2:
    tol = np.pad(tol, ((0, 0), (0, 1)), constant_values=1e-6)
  assert np.all(np.abs(np.asarray(ours) - ref.numpy()) <= tol)


def test_ddim_grid_is_lcm_training_grid():
  grid = np.asarray(consistency.ddim_grid(50, 1000))
  sched = _lcm_scheduler()
  sched.set_timesteps(num_inference_steps=50, original_inference_steps=50)  # the whole training grid
  np.testing.assert_array_equal(grid, np.sort(sched.timesteps.numpy()))
  assert grid[0] == 19 and grid[-1] == 999 and grid.dtype == np.int32
  with pytest.raises(ValueError):
    consistency.ddim_grid(0, 1000)


@pytest.mark.parametrize("original_steps", [50, 25])
def test_lcm_timesteps_match_diffusers(original_steps):
  sched = _lcm_scheduler()
  for k in [1, 2, 3, 4, 5, 8, original_steps]:
    sched.set_timesteps(num_inference_steps=k, original_inference_steps=original_steps)
    np.testing.assert_array_equal(consistency.lcm_timesteps(k, original_steps), sched.timesteps.numpy())
  with pytest.raises(ValueError):
    consistency.lcm_timesteps(original_steps + 1, original_steps)


def test_lcm_timesteps_notes_values():
  assert consistency.lcm_timesteps(1).tolist() == [999]
  assert consistency.lcm_timesteps(2).tolist() == [999, 499]
  assert consistency.lcm_timesteps(4).tolist() == [999, 759, 499, 259]


def test_sample_grid_index_uniform():
  n, batch = 50, 100_000
  idx = np.asarray(consistency.sample_grid_index(jax.random.key(0), batch, n))
  assert idx.shape == (batch,) and idx.min() == 0 and idx.max() == n - 1
  counts = np.bincount(idx, minlength=n)
  # Pearson chi-square with 49 degrees of freedom: 99.9% quantile is about 85.
  chi2 = np.sum((counts - batch / n) ** 2 / (batch / n))
  assert chi2 < 85.0


# --- the consistency function around a model output ------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_consistency_output_matches_lcm_scheduler_denoised(prediction_type):
  """f = c_skip z + c_out x0_hat equals `LCMScheduler.step(...).denoised` for every prediction type."""
  schedule = schedules.sd15(prediction_type)
  ts = [999, 759, 499, 259, 39, 5, 1, 0]
  sched = _lcm_scheduler(prediction_type=prediction_type)
  sched.set_timesteps(timesteps=ts)
  rng = np.random.default_rng(0)
  z = rng.standard_normal((len(ts), 4, 4, 3)).astype(np.float32)
  out = rng.standard_normal((len(ts), 4, 4, 3)).astype(np.float32)
  f, x0 = consistency.consistency_output(jnp.asarray(out), jnp.asarray(z), jnp.asarray(ts), schedule)
  for i, t in enumerate(ts):
    _, denoised = sched.step(torch.from_numpy(out[i : i + 1]), t, torch.from_numpy(z[i : i + 1]),
                             return_dict=False)
    np.testing.assert_allclose(np.asarray(f[i : i + 1]), denoised.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(x0), np.asarray(schedule.to_x0(jnp.asarray(out), jnp.asarray(z),
                                                                       jnp.asarray(ts))), rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_consistency_fn_boundary_is_exact(prediction_type):
  """f(z, 0) = z bit for bit, whatever the model outputs; per-example t broadcasts over (B, H, W, C)."""
  schedule = schedules.sd15(prediction_type)
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.standard_normal((3, 5, 5, 4)).astype(np.float32))
  garbage = jnp.asarray(1e3 * rng.standard_normal((3, 5, 5, 4)).astype(np.float32))
  t = jnp.asarray([0, 19, 0])
  f = jax.jit(lambda z, t: consistency.consistency_fn(lambda z, t: garbage, z, t, schedule))(z, t)
  np.testing.assert_array_equal(np.asarray(f[0]), np.asarray(z[0]))
  np.testing.assert_array_equal(np.asarray(f[2]), np.asarray(z[2]))
  assert np.abs(np.asarray(f[1] - z[1])).max() > 1.0  # away from t = 0 the model output matters


def _gaussian_posterior_x0(z, a, sg, m, s):
  """E[x0 | z_t] for x0 ~ N(m, s^2) per coordinate, z_t = a x0 + sg eps."""
  return m + a * s**2 * (z - a * m) / (a**2 * s**2 + sg**2)


def _pf_ode_to_index0(z, t, abar, m, s):
  """The exact PF-ODE solution at timestep 0 from z_t, for Gaussian data (float64 closed form).

  In VE coordinates x = z / alpha, lam = sigma / alpha, x_lam ~ N(m, s^2 + lam^2) and the PF-ODE is
  dx/dlam = E[eps | x] = lam (x - m) / (s^2 + lam^2), so (x - m) / sqrt(s^2 + lam^2) is constant along it.
  """
  a_t, a_0 = np.sqrt(abar[t]), np.sqrt(abar[0])
  lam_t, lam_0 = np.sqrt((1 - abar[t]) / abar[t]), np.sqrt((1 - abar[0]) / abar[0])
  return a_0 * (m + (z / a_t - m) * np.sqrt((s**2 + lam_0**2) / (s**2 + lam_t**2)))


def test_pf_ode_closed_form_matches_numerical_integration():
  from scipy.integrate import solve_ivp

  abar = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
  m, s = 0.3, 0.5
  z = np.array([-2.0, -0.3, 0.4, 1.7])
  for t in [1, 10, 250, 999]:
    lam_t, lam_0 = np.sqrt((1 - abar[t]) / abar[t]), np.sqrt((1 - abar[0]) / abar[0])
    sol = solve_ivp(lambda lam, x: lam * (x - m) / (s**2 + lam**2), (lam_t, lam_0), z / np.sqrt(abar[t]),
                    rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(np.sqrt(abar[0]) * sol.y[:, -1], _pf_ode_to_index0(z, t, abar, m, s),
                               rtol=1e-8)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_gaussian_data_exact_model_consistency_near_boundary(prediction_type):
  """Gaussian data N(m, s^2), exact model: f agrees with the exact PF-ODE map to timestep 0 at the boundary.

  f with the exact denoiser is c_skip z + c_out E[x0 | z_t] (checked to float32 precision). At t = 0 it equals
  the ODE map exactly; for small t the gap is first order in the noise variance 1 - abar_t (the ratio
  gap / (1 - abar_t) stays within a factor 1.5 over t = 1..10); far from the boundary the exact denoiser is
  not the ODE map (the gap is of the order of the data scale), which is what distillation has to learn.
  """
  schedule = schedules.sd15(prediction_type)
  abar = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)  # float64, as diffusers
  np.testing.assert_allclose(np.asarray(schedule.abar), abar, rtol=1e-6)
  m, s = 0.3, 0.5
  rng = np.random.default_rng(2)
  x0 = m + s * rng.standard_normal((4000,))
  eps = rng.standard_normal((4000,))

  def f_exact(t: int) -> tuple[np.ndarray, np.ndarray]:
    a, sg = np.sqrt(abar[t]), np.sqrt(1 - abar[t])
    z = a * x0 + sg * eps
    x0_hat = _gaussian_posterior_x0(z, a, sg, m, s)
    eps_hat = (z - a * x0_hat) / sg
    tt = jnp.full((z.shape[0],), t)
    out = schedule.from_x0_eps(jnp.asarray(x0_hat, jnp.float32), jnp.asarray(eps_hat, jnp.float32), tt)
    f, _ = consistency.consistency_output(out, jnp.asarray(z, jnp.float32), tt, schedule)
    c_skip, c_out = (0.25 / ((10.0 * t) ** 2 + 0.25), 10.0 * t / np.sqrt((10.0 * t) ** 2 + 0.25))
    np.testing.assert_allclose(np.asarray(f), c_skip * z + c_out * x0_hat, atol=2e-5)
    return np.asarray(f, np.float64), z

  f0, z0 = f_exact(0)
  assert np.array_equal(f0, z0.astype(np.float32).astype(np.float64))
  np.testing.assert_allclose(_pf_ode_to_index0(z0, 0, abar, m, s), z0, rtol=1e-12)
  ratios = []
  for t in range(1, 11):
    f, z = f_exact(t)
    gap = np.abs(f - _pf_ode_to_index0(z, t, abar, m, s)).max()
    ratios.append(gap / (1 - abar[t]))
  assert max(ratios) < 1.5 * min(ratios), ratios
  f, z = f_exact(999)
  assert np.abs(f - _pf_ode_to_index0(z, 999, abar, m, s)).max() > s


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_multistep_sample_matches_lcm_scheduler(num_steps, monkeypatch):
  """`multistep_sample` equals diffusers' LCM loop (set_timesteps + step) fed the same model and noise."""
  import diffusers.schedulers.scheduling_lcm as lcm_module

  schedule = schedules.sd15()
  shape = (2, 4, 4, 3)
  key = jax.random.key(7)
  ts = consistency.lcm_timesteps(num_steps)
  # The noise multistep_sample draws at step i (split of the key, one normal draw per step).
  noises = [np.array(jax.random.normal(k, shape, jnp.float32)) for k in jax.random.split(key, len(ts))]
  feed = iter(noises)
  monkeypatch.setattr(lcm_module, "randn_tensor", lambda *a, **k: torch.from_numpy(next(feed)))

  def eps_model(z, t):  # a smooth stand-in network, same in numpy/torch and jax
    return 0.3 * z + 0.01 * t / 1000.0

  z_T = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
  ours = consistency.multistep_sample(
    lambda z, t: consistency.consistency_fn(eps_model, z, t, schedule), jnp.asarray(z_T), ts, schedule, key)

  sched = _lcm_scheduler()
  sched.set_timesteps(num_inference_steps=num_steps, original_inference_steps=50)
  z = torch.from_numpy(z_T)
  for t in sched.timesteps:
    z, denoised = sched.step(eps_model(z, float(t)), t, z, return_dict=False)
  np.testing.assert_allclose(np.asarray(ours), denoised.numpy(), rtol=1e-4, atol=1e-5)


def test_skip_grid_closes_the_chain_and_matches_lcm_for_skip_20():
  np.testing.assert_array_equal(consistency.skip_grid(20), consistency.ddim_grid(50))
  grid = np.asarray(consistency.skip_grid(24))
  assert grid[-1] == 999 and grid[0] == 15 and len(grid) == 42
  targets = grid - 24
  assert all(t in set(grid.tolist()) or t < 0 for t in targets)
  np.testing.assert_array_equal(consistency.training_grid("ddim", skip=24), consistency.ddim_grid(50))
  with pytest.raises(ValueError, match="skip, ddim"):
    consistency.training_grid("uniform", skip=24)


def test_grid_timesteps_on_the_training_grid():
  """k-step sampling times from a training grid: on the grid, strictly descending, k long, starting at its top;
  on LCM's ddim grid (and on the skip-20 grid, the same points) equal to diffusers' LCMScheduler timesteps."""
  sched = _lcm_scheduler()
  for k in (1, 2, 3, 4, 8, 50):
    sched.set_timesteps(num_inference_steps=k, original_inference_steps=50)
    np.testing.assert_array_equal(consistency.grid_timesteps(k, consistency.ddim_grid(50)), sched.timesteps.numpy())
    np.testing.assert_array_equal(consistency.grid_timesteps(k, consistency.skip_grid(20)), sched.timesteps.numpy())
  grid = np.asarray(consistency.skip_grid(24))
  for k in (1, 2, 3, 4, 7, 42):
    ts = consistency.grid_timesteps(k, grid)
    assert len(ts) == k and ts[0] == 999 and np.all(np.diff(ts) < 0) and set(ts.tolist()) <= set(grid.tolist())
  assert consistency.grid_timesteps(2, grid).tolist() == [999, 495]
  assert consistency.grid_timesteps(4, grid).tolist() == [999, 759, 495, 255]
  # Two of LCM's 4 steps (499, 259) are off the skip-24 grid: the reason for the rule.
  assert set(consistency.lcm_timesteps(4).tolist()) - set(grid.tolist()) == {499, 259}
  np.testing.assert_array_equal(consistency.sampling_grid("grid", "skip", skip=24), grid)
  np.testing.assert_array_equal(consistency.sampling_grid("lcm", "skip", skip=24), consistency.ddim_grid(50))
  with pytest.raises(ValueError, match=r"num_steps must be in \[1, 42\]"):
    consistency.grid_timesteps(43, grid)
  with pytest.raises(ValueError, match="ascending"):
    consistency.grid_timesteps(2, grid[::-1])
  with pytest.raises(ValueError, match="grid, lcm"):
    consistency.sampling_grid("uniform", "skip", skip=24)
