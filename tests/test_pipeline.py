"""Text-to-image pipeline: student sampling against diffusers' LatentConsistencyModelPipeline (LCMScheduler
stepping, same U-Net weights, same initial latents and same between-step noise), teacher sampling against
diffusers' StableDiffusionPipeline with DDIM, timestep lists, prompt files and the sample mode."""

import json
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from scott_jax import config_files, pipeline, sample
from scott_jax.testing.tiny_sd import write_tiny_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = config_files.load("tiny_scott")
PROMPTS = ["a red circle on a white table", "a dark blob"]
COND_DIM = 256  # the guidance embedding width (config.consistency.guidance_embed_dim)


def write_tiny_lcm(folder: str, seed: int = 1) -> str:
  """A random tiny LatentConsistencyModelPipeline folder: the tiny SD pipeline of configs/tiny_scott.py with a
  student U-Net (time_cond_proj_dim, every weight perturbed) and an LCMScheduler."""
  teacher = os.path.join(folder, "teacher")
  write_tiny_pipeline(teacher)
  sd = diffusers.StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None)
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel.from_config(dict(sd.unet.config, time_cond_proj_dim=COND_DIM)).eval()
  with torch.no_grad():
    for p in unet.parameters():
      p.add_(0.05 * torch.randn_like(p))
  sched = diffusers.LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
  lcm = diffusers.LatentConsistencyModelPipeline(
    vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet, scheduler=sched,
    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  out = os.path.join(folder, "lcm")
  lcm.save_pretrained(out)
  return out


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
  return write_tiny_lcm(str(tmp_path_factory.mktemp("tiny_lcm")))


@pytest.fixture(scope="module")
def ours(lcm_folder):
  return pipeline.load_diffusers(lcm_folder)


@pytest.fixture(scope="module")
def torch_lcm(lcm_folder):
  return diffusers.LatentConsistencyModelPipeline.from_pretrained(lcm_folder, safety_checker=None,
                                                                   requires_safety_checker=False)


def _nhwc(x: torch.Tensor) -> np.ndarray:
  return x.permute(0, 2, 3, 1).numpy()


def _diffusers_images(pipe, latents_nhwc, **kwargs) -> np.ndarray:
  latents = torch.from_numpy(np.ascontiguousarray(latents_nhwc.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    return pipe(PROMPTS, height=32, width=32, latents=latents, output_type="np", **kwargs).images


@pytest.mark.parametrize("steps", [1, 4])
def test_student_equals_diffusers_lcm_pipeline(ours, torch_lcm, steps):
  """Same prompts, initial latents and noise: LCMScheduler draws its between-step noise from the generator,
  K - 1 draws of the latent shape in order; we pass the same draws as ``noises``. float32 on CPU: |diff| of the
  [0, 1] images below 2e-4 (the U-Net/VAE parity tolerance accumulated over K steps)."""
  pipe, params = ours
  shape = pipeline.latent_shape(pipe, len(PROMPTS), 32, 32)
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(steps), shape), np.float32)
  gen = torch.Generator().manual_seed(123)
  draws = [torch.randn((shape[0], shape[3], shape[1], shape[2]), generator=gen) for _ in range(steps - 1)]
  noises = np.stack([_nhwc(d) for d in draws]) if draws else np.zeros((0, *shape), np.float32)
  sampler = pipeline.make_sampler(pipe, kind="student", steps=steps, height=32, output="float")
  got = np.asarray(sampler(params, pipe.tokenize(PROMPTS), jax.random.PRNGKey(0), 8.0, latents=z, noises=noises))
  ref = _diffusers_images(torch_lcm, z, num_inference_steps=steps, guidance_scale=8.0,
                          generator=torch.Generator().manual_seed(123))
  assert sampler.timesteps.tolist() == torch_lcm.scheduler.timesteps.tolist()
  assert got.shape == ref.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)
  # The noise matters (the test would catch ignoring it): other noise gives other images for K > 1.
  if steps > 1:
    other = np.asarray(sampler(params, pipe.tokenize(PROMPTS), jax.random.PRNGKey(0), 8.0, latents=z,
                               noises=noises[::-1] * -1.0))
    assert np.abs(other - ref).max() > 1e-2


def test_explicit_timesteps_and_guidance(ours, torch_lcm):
  """A custom timestep list (LCMScheduler's ``timesteps=``) and another guidance scale (w = g - 1)."""
  pipe, params = ours
  ts = [899, 299]
  shape = pipeline.latent_shape(pipe, 2, 32, 32)
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(7), shape), np.float32)
  gen = torch.Generator().manual_seed(5)
  noises = _nhwc(torch.randn((2, 4, 16, 16), generator=gen))[None]
  sampler = pipeline.make_sampler(pipe, kind="student", steps=ts, height=32, output="float")
  got = np.asarray(sampler(params, pipe.tokenize(PROMPTS), jax.random.PRNGKey(0), 3.0, latents=z, noises=noises))
  ref = _diffusers_images(torch_lcm, z, timesteps=ts, guidance_scale=3.0, generator=torch.Generator().manual_seed(5))
  np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)
  with pytest.raises(ValueError, match="descending"):
    pipeline.make_sampler(pipe, kind="student", steps=[199, 599], height=32)


def test_uint8_output_keyed_and_deterministic(ours):
  pipe, params = ours
  sampler = pipeline.make_sampler(pipe, kind="student", steps=1, height=32)
  ids = pipe.tokenize(PROMPTS)
  a = np.asarray(sampler(params, ids, jax.random.PRNGKey(0), 8.0))
  b = np.asarray(sampler(params, ids, jax.random.PRNGKey(0), 8.0))
  c = np.asarray(sampler(params, ids, jax.random.PRNGKey(1), 8.0))
  assert a.dtype == np.uint8 and a.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a.astype(int) - c.astype(int)).max() > 0
  f = pipeline.make_sampler(pipe, kind="student", steps=1, height=32, output="float")
  np.testing.assert_array_equal(a, np.round(np.asarray(f(params, ids, jax.random.PRNGKey(0), 8.0)) * 255))


def test_teacher_ddim_equals_diffusers(lcm_folder):
  """The teacher sampler (DDIM eta 0, CFG g = 7.5, leading spacing with steps_offset 1) against diffusers'
  StableDiffusionPipeline with a DDIMScheduler(set_alpha_to_one=True) (our last step jumps to clean data)."""
  teacher = os.path.join(os.path.dirname(lcm_folder), "teacher")
  pipe, params = pipeline.load_diffusers(teacher)
  sd = diffusers.StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None,
                                                         requires_safety_checker=False)
  sd.scheduler = diffusers.DDIMScheduler.from_config(sd.scheduler.config, set_alpha_to_one=True)
  shape = pipeline.latent_shape(pipe, 2, 32, 32)
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(3), shape), np.float32)
  sampler = pipeline.make_sampler(pipe, kind="teacher", steps=4, height=32, output="float", solver="ddim",
                                  solver_kwargs={"eta": 0.0}, spacing="leading", offset=1)
  got = np.asarray(sampler(params, pipe.tokenize(PROMPTS), jax.random.PRNGKey(0), 7.5, latents=z))
  ref = _diffusers_images(sd, z, num_inference_steps=4, guidance_scale=7.5)
  assert sampler.timesteps.tolist() == sd.scheduler.timesteps.tolist()
  np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)


def test_student_without_guidance_embedding_on_a_sampling_grid(lcm_folder):
  """An LCM-LoRA style student (a U-Net without time_cond_proj_dim: w is not an input) on a pipeline with a
  sampling grid (the skip-24 training grid: 2 steps -> [999, 495]) against diffusers' LCM-LoRA recipe on the same
  U-Net with those ``timesteps``; the guidance scale then changes nothing."""
  import dataclasses

  from scott_jax import consistency

  teacher = os.path.join(os.path.dirname(lcm_folder), "teacher")
  pipe, params = pipeline.load_diffusers(teacher)
  assert pipe.guidance_embed_dim is None
  pipe = dataclasses.replace(pipe, sampling_grid=tuple(int(t) for t in consistency.skip_grid(24)))
  # diffusers' LCM-LoRA recipe: StableDiffusionPipeline + LCMScheduler, CFG off (guidance_scale 1).
  lcm = diffusers.StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None, requires_safety_checker=False)
  lcm.scheduler = diffusers.LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
  shape = pipeline.latent_shape(pipe, 2, 32, 32)
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(4), shape), np.float32)
  noises = _nhwc(torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(8)))[None]
  sampler = pipeline.make_sampler(pipe, kind="student", steps=2, height=32, output="float")
  assert sampler.timesteps.tolist() == [999, 495]
  ids = pipe.tokenize(PROMPTS)
  got = np.asarray(sampler(params, ids, jax.random.PRNGKey(0), 8.0, latents=z, noises=noises))
  ref = _diffusers_images(lcm, z, timesteps=[999, 495], guidance_scale=1.0,
                          generator=torch.Generator().manual_seed(8))
  np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)
  np.testing.assert_array_equal(got, np.asarray(sampler(params, ids, jax.random.PRNGKey(0), 2.0, latents=z,
                                                        noises=noises)))


def test_read_prompts(tmp_path):
  p = tmp_path / "caps.jsonl"
  p.write_text('{"caption": "a cat"}\n\n{"prompt": "a dog", "id": 3}\n')
  assert pipeline.read_prompts(str(p)) == ["a cat", "a dog"]
  t = tmp_path / "caps.txt"
  t.write_text("one\ntwo\n")
  assert pipeline.read_prompts(str(t)) == ["one", "two"]
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(ValueError, match="no prompts"):
    pipeline.read_prompts(str(empty))
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    pipeline.read_prompts(str(tmp_path / "missing.jsonl"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"url": "x"}\n')
  with pytest.raises(ValueError, match="no caption"):
    pipeline.read_prompts(str(bad))


def test_sample_mode_writes_pngs_and_timing(lcm_folder, tmp_path, capsys):
  from scott_jax import config as config_lib

  cfg = TINY.get_config()
  cfg.sample.update(dict(path=lcm_folder, steps=(1,), batch_size=2, resolution=32,
                         prompts=tuple(PROMPTS), num_per_prompt=2))
  config_lib.validate(cfg)
  timings = sample.run_sample(cfg, str(tmp_path))
  assert set(timings) == {"student_1step"}
  for label in timings:
    files = sorted(os.listdir(tmp_path / "samples" / label))
    assert files == ["00000.png", "00001.png", "00002.png", "00003.png", "prompts.json"]
    assert (tmp_path / "samples" / f"{label}_grid.png").is_file()
    meta = json.loads((tmp_path / "samples" / label / "prompts.json").read_text())
    assert meta["prompts"] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
  assert "s/image after compilation" in capsys.readouterr().out
  # Same key, prompts repeated: the two copies of a prompt differ (batch-level noise), rows are not duplicates.
  from PIL import Image

  a, b = (np.asarray(Image.open(tmp_path / "samples" / "student_1step" / f)) for f in ("00000.png", "00001.png"))
  assert np.abs(a.astype(int) - b.astype(int)).max() > 0


def test_generate_pads_last_batch(ours):
  pipe, params = ours
  sampler = pipeline.make_sampler(pipe, kind="student", steps=1, height=32)
  ids = pipe.tokenize(PROMPTS + ["a third one"])
  out = pipeline.generate(sampler, params, ids, jax.random.PRNGKey(0), 8.0, batch_size=2)
  assert out.shape == (3, 32, 32, 3)
  first = np.asarray(sampler(params, ids[:2], jax.random.fold_in(jax.random.PRNGKey(0), 0), 8.0))
  np.testing.assert_array_equal(out[:2], first)
  assert jnp.asarray(out).dtype == jnp.uint8
