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

from scott_jax import consistency


def _diffusers_guidance_embedding():
  """`LatentConsistencyModelPipeline.get_guidance_scale_embedding`, compiled from the installed diffusers source.

  Importing the pipeline module needs transformers' image processors (torchvision), which the test environment
  lacks; the method uses only torch and not `self`, so it is lifted out of the source file as is.
  """
  root = pathlib.Path(importlib.util.find_spec("diffusers").origin).parent
  path = root / "pipelines" / "latent_consistency_models" / "pipeline_latent_consistency_text2img.py"
  tree = ast.parse(path.read_text())
  fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "get_guidance_scale_embedding")
  namespace = {"torch": torch}
  exec(compile(ast.Module([fn], type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
  return namespace["get_guidance_scale_embedding"]


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
  # sin/cos of float32 arguments up to w * 1000 = 14000: the frequencies exp(-k log(1e4) / (dim/2 - 1)) from XLA
  # and torch may differ by one float32 ulp, which moves the argument by |arg| * 2^-23. Allow 4 such ulps.
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
