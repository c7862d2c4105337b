"""Export of a trained student: (a) the Flax export round-trips bit for bit through `export.load_exported`;
(b) the diffusers folder loads with `DiffusionPipeline.from_pretrained` as a LatentConsistencyModelPipeline and
gives our images for the same latents, prompts and noise; (c) the PEFT LoRA writer; checkpoint reading."""

import os
import shutil

import diffusers
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from scott_jax import checkpoint, config_files, export, pipeline, student, train
from scott_jax import checkpoint as ckpt_lib
from scott_jax import step as step_lib
from scott_jax.testing.tiny_sd import write_tiny_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = config_files.load("tiny_scott")
PROMPTS = ["a red circle", "a dark blob on grass"]


def tiny_config(teacher: str):
  cfg = TINY.get_config()
  cfg.model.teacher_path = teacher
  cfg.gan.enabled = False
  return cfg


def lcm_noises(steps: int, shape: tuple[int, ...], seed: int = 9) -> np.ndarray:
  """The (steps - 1, B, h, w, C) renoising draws diffusers' LCM loop takes from ``torch.Generator().manual_seed(seed)``
  (NCHW draws of ``shape`` transposed to NHWC), to feed our sampler the same noise."""
  gen = torch.Generator().manual_seed(seed)
  b, h, w, c = shape
  draws = [torch.randn((b, c, h, w), generator=gen).permute(0, 2, 3, 1).numpy() for _ in range(steps - 1)]
  return np.stack(draws) if draws else np.zeros((0, *shape), np.float32)


def perturb(tree, seed: int, scale: float = 0.02):
  """tree + scale * N(0, 1) noise drawn on the host (numpy; no per-shape device compiles)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape).astype(x.dtype)),
                      tree)


def write_checkpoints(cfg, workdir: str, steps=(3,), seed: int = 0) -> dict[int, dict]:
  """Train states of the tiny config (step_lib.init_state layout) with the student and EMA perturbed away from
  the teacher (cond_proj included, so w matters), saved with scott_jax.checkpoint. Returns {step: state}."""
  models, frozen = student.load_models(cfg)
  spec = {"images": jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
          "input_ids": jax.ShapeDtypeStruct((2, models.max_length), jnp.int32)}
  base = step_lib.init_state(cfg, models, frozen, spec)
  out = {}
  with ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), max_to_keep=None, save_every=1) as ck:
    for i, step in enumerate(steps):
      state = base.replace(step=jnp.asarray(step, jnp.int32), student=perturb(base.student, 2 * (seed + i)),
                           ema=perturb(base.ema, 2 * (seed + i) + 1))
      ck.save(step, state, data_state={"step": step}, force=True)
      out[step] = state
  return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  teacher = write_tiny_pipeline(str(root / "teacher"))
  cfg = tiny_config(teacher)
  workdir = str(root / "run")
  states = write_checkpoints(cfg, workdir)
  cfg.export.out_dir = str(root / "out")
  written = export.run_export(cfg, workdir)
  return cfg, workdir, states, written


def _leaves(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def test_flax_export_round_trips_bit_for_bit(run):
  cfg, workdir, states, written = run
  pipe, params = export.load_exported(written["flax"])
  saved = _leaves(states[3].ema)  # cfg.sample.params = "ema", the latest step
  got = _leaves(params["unet"])
  assert set(got) == set(saved)
  for k in saved:
    assert got[k].dtype == saved[k].dtype and np.array_equal(got[k], saved[k]), k
  models, frozen = student.load_models(cfg)
  for name in ("vae", "text_encoder"):
    ref, mine = _leaves(frozen[name]), _leaves(params[name])
    assert set(ref) == set(mine) and all(np.array_equal(ref[k], mine[k]) for k in ref)
  assert np.array_equal(np.asarray(pipe.schedule.abar), np.asarray(models.schedule.abar))
  assert pipe.unet.config == models.student.config and pipe.guidance_embed_dim == 256
  assert (pipe.timestep_scaling, pipe.original_steps) == (10.0, 50)
  assert pipe.tokenize(PROMPTS).tolist() == models.tokenizer(PROMPTS, padding="max_length", max_length=16,
                                                             truncation=True)["input_ids"]


def test_diffusers_export_gives_our_images(run):
  """The exported folder in diffusers (DiffusionPipeline -> LatentConsistencyModelPipeline, torch) against our
  pipeline on the checkpoint: same latents and the LCMScheduler's between-step noise fed to ours. 1 step and 2
  steps (the run's grid timesteps passed to diffusers as ``timesteps``); float32 [0, 1] images agree to 2e-4."""
  cfg, workdir, states, written = run
  torch_pipe = diffusers.DiffusionPipeline.from_pretrained(written["diffusers"])
  assert isinstance(torch_pipe, diffusers.LatentConsistencyModelPipeline)
  assert isinstance(torch_pipe.scheduler, diffusers.LCMScheduler)
  assert torch_pipe.unet.config.time_cond_proj_dim == 256
  pipe, params = export.TrainedRun(cfg, workdir).pipeline(3, "ema")
  shape = pipeline.latent_shape(pipe, 2, 32, 32)
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(0), shape), np.float32)
  for steps in (1, 2):
    noises = lcm_noises(steps, shape)
    sampler = pipeline.make_sampler(pipe, kind="student", steps=steps, height=32, output="float")
    assert sampler.timesteps.tolist() == [999, 495][:steps]  # the run's skip-24 grid (consistency.timestep_rule)
    ours = np.asarray(sampler(params, pipe.tokenize(PROMPTS), jax.random.PRNGKey(0), 6.0, latents=z, noises=noises))
    with torch.no_grad():
      ref = torch_pipe(PROMPTS, height=32, width=32, timesteps=sampler.timesteps.tolist(), guidance_scale=6.0,
                       latents=torch.from_numpy(z.transpose(0, 3, 1, 2).copy()), output_type="np",
                       generator=torch.Generator().manual_seed(9)).images
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0)
  # The guidance embedding is live (non-zero cond_proj): another scale gives other images.
  other = np.asarray(sampler(params, pipe.tokenize(PROMPTS), jax.random.PRNGKey(0), 2.0, latents=z, noises=noises))
  assert np.abs(other - ours).max() > 1e-3


def test_lora_file_round_trip_and_skip(run, tmp_path):
  from scott_jax.models import lora

  cfg, workdir, states, written = run
  assert "lora" not in written  # the student is a full U-Net: (c) is skipped
  assert not student.is_lora_student(states[3].ema)
  params = states[3].ema
  overlay = lora.init(jax.random.PRNGKey(1), params["params"], ["attention"], 4)
  overlay = jax.tree.map(lambda x: x + 0.01, overlay)  # non-zero B
  assert any(lora.LORA_B in p for p in _leaves(overlay))
  path = export.export_lora(str(tmp_path / "lora.safetensors"), overlay, 8.0)
  back, alpha = lora.import_peft(path)
  assert alpha == 8.0
  a, b = _leaves(overlay), _leaves(back)
  assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_checkpoint_listing_and_errors(run, tmp_path):
  cfg, workdir, states, written = run
  directory = str(ckpt_lib.checkpoint_dir(workdir))
  copy = tmp_path / "checkpoints"
  shutil.copytree(directory, copy)
  shutil.copytree(copy / "3", copy / "7.orbax-checkpoint-tmp-1234")
  steps, pending = checkpoint.finalised_steps(copy)
  assert steps == [3] and pending == ["7.orbax-checkpoint-tmp-1234"]
  ema = checkpoint.restore_subtree(copy, 3, "ema")
  assert all(np.array_equal(v, _leaves(states[3].ema)[k]) for k, v in _leaves(ema).items())
  with pytest.raises(checkpoint.CheckpointReadError, match="step 5 does not exist"):
    checkpoint.restore_subtree(copy, 5, "ema")
  with pytest.raises(checkpoint.CheckpointReadError, match="no field 'nope'"):
    checkpoint.restore_subtree(copy, 3, "nope")
  # Truncate every array file of step 3: a clear error naming the step.
  for root, _, files in os.walk(copy / "3" / "state"):
    for f in files:
      if "ocdbt" in root or f.startswith("d"):
        open(os.path.join(root, f), "wb").close()
  with pytest.raises(checkpoint.CheckpointReadError, match="step 3 .* cannot be read"):
    checkpoint.restore_subtree(copy, 3, "ema")


def lora_config(teacher: str, out_dir: str, embed: int = 0):
  """The tiny config with an LCM-LoRA style student (`:student=lora,gan=off`: rank 4, alpha 4), exporting the
  online student; ``embed`` > 0 keeps the guidance embedding (trained in full next to the overlay)."""
  cfg = TINY.get_config("student=lora,gan=off")
  cfg.model.teacher_path = teacher
  cfg.consistency.guidance_embed_dim = embed
  cfg.sample.params = "student"
  cfg.export.out_dir = out_dir
  return cfg


@pytest.fixture(scope="module")
def lora_run(run, tmp_path_factory):
  """Checkpoints of a LoRA student (step_lib.init_state layout, overlay A and B perturbed) exported in every format."""
  root = tmp_path_factory.mktemp("lora_export")
  cfg = lora_config(run[0].model.teacher_path, str(root / "out"))
  workdir = str(root / "run")
  write_checkpoints(cfg, workdir)
  return cfg, workdir, export.run_export(cfg, workdir)


def check_lora_export(cfg, workdir: str, written: dict[str, str], step: int) -> None:
  """Format (c) of a LoRA student: diffusers' `load_lora_weights` on the teacher's pipeline gives our merged
  student U-Net (float32, 1e-4 of the output scale), which is not the teacher; the Flax export holds the merged
  weights bit for bit and the skip-24 sampling grid; the EMA state merges as well; a full-student config
  cannot read the run."""
  from scott_jax.models import lora

  assert set(written) == {"flax", "diffusers", "lora"}  # no guidance embedding: no guidance_projection file
  trained = export.TrainedRun(cfg, workdir)
  state = trained.student_state(step, "student")
  b_max = max(float(np.abs(b).max()) for p, b in _leaves(state["lora"]).items() if p[-1] == lora.LORA_B)
  assert student.is_lora_student(state) and b_max > 1e-3
  merged = trained.student_params(step, "student")
  models, frozen = trained.models()
  sd = diffusers.StableDiffusionPipeline.from_pretrained(cfg.model.teacher_path, safety_checker=None,
                                                         requires_safety_checker=False)
  teacher_unet = diffusers.UNet2DConditionModel.from_pretrained(cfg.model.teacher_path, subfolder="unet").eval()
  sd.load_lora_weights(written["lora"])
  rng = np.random.default_rng(0)
  z = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
  t = np.asarray([999, 259], np.int64)
  text = rng.standard_normal((2, 16, 32)).astype(np.float32)
  ours = np.asarray(jax.jit(models.student.apply)(merged, jnp.asarray(z), jnp.asarray(t), jnp.asarray(text)))
  args = (torch.from_numpy(z.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), torch.from_numpy(text))
  with torch.no_grad():
    ref = sd.unet(*args).sample.permute(0, 2, 3, 1).numpy()
    base = teacher_unet(*args).sample.permute(0, 2, 3, 1).numpy()
  scale = np.abs(ref).max()
  assert np.abs(ours - ref).max() <= 1e-4 * scale
  assert np.abs(base - ref).max() > 1e-2 * scale  # the LoRA changes the U-Net
  pipe, params = export.load_exported(written["flax"])
  got, want = _leaves(params["unet"]), _leaves(merged)
  assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
  assert pipe.guidance_embed_dim is None and pipe.sampling_grid == tuple(range(15, 1000, 24))
  _, ema_params = trained.pipeline(step, "ema")
  expected = lora.merge(frozen["unet"], trained.student_state(step, "ema")["lora"], cfg.model.student_lora_alpha)
  for a, b in zip(jax.tree.leaves(ema_params["unet"]), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  with pytest.raises(checkpoint.CheckpointReadError, match="LoRA student but config.model.student_lora_rank = 0"):
    export.TrainedRun(tiny_config(cfg.model.teacher_path), workdir).student_params(step)


def test_lora_student_exports_a_diffusers_lora(lora_run):
  check_lora_export(*lora_run, step=3)


def test_lora_student_with_guidance_embedding_exports_the_projection(run, tmp_path):
  """With the guidance embedding the fully trained cond_proj goes to guidance_projection.safetensors (torch
  layout, the checkpoint's kernel transposed) next to the LoRA file."""
  from safetensors.numpy import load_file

  cfg = lora_config(run[0].model.teacher_path, str(tmp_path / "out"), embed=256)
  cfg.export.formats = ("lora",)
  states = write_checkpoints(cfg, str(tmp_path / "run"))
  written = export.run_export(cfg, str(tmp_path / "run"))
  assert set(written) == {"lora", "lora_guidance"}
  kernel = np.asarray(states[3].student["full"]["params"]["time_embedding"]["cond_proj"]["kernel"])
  assert kernel.shape == (256, 32) and np.abs(kernel).max() > 0
  sd = load_file(written["lora_guidance"])
  assert list(sd) == ["time_embedding.cond_proj.weight"]
  np.testing.assert_array_equal(sd["time_embedding.cond_proj.weight"], kernel.T)


@pytest.mark.slow
def test_lora_training_run_exports(run, tmp_path):
  """A 2-step LCM-LoRA style training run through `train.train` (a sample grid at step 2 from the merged LoRA
  student) exports a LoRA file that diffusers loads onto the teacher (`check_lora_export`)."""
  cfg = lora_config(run[0].model.teacher_path, str(tmp_path / "out"))
  cfg.train.update(dict(num_steps=2, checkpoint_every=2, sample_every=2, sample_steps=(1,)))
  cfg.optim.update(dict(warmup_steps=0, student_lr=1e-2))  # B moves well away from 0 in two Adam steps
  workdir = str(tmp_path / "run")
  train.train(cfg, workdir)
  assert os.path.isfile(os.path.join(workdir, "samples", "step0000002_1step.png"))
  check_lora_export(cfg, workdir, export.run_export(cfg, workdir), step=2)


@pytest.mark.slow
def test_gaussian_student_exports(tmp_path):
  """A Gaussian student (consistency.student_output gaussian): the Flax export holds both halves (8 output channels,
  ``student_output`` gaussian) bit for bit and samples by drawing or by the mean; the diffusers export is the
  standard U-Net of the mean half (4 channels, a note in the folder) and gives our images sampled with the mean."""
  teacher = write_tiny_pipeline(str(tmp_path / "teacher"))
  cfg = tiny_config(teacher)
  cfg.consistency.student_output = "gaussian"
  cfg.consistency.logvar_init = -4.0  # draws visibly different from the mean
  workdir = str(tmp_path / "run")
  states = write_checkpoints(cfg, workdir)
  cfg.export.out_dir = str(tmp_path / "out")
  written = export.run_export(cfg, workdir)
  pipe, params = export.load_exported(written["flax"])
  assert pipe.student_output == "gaussian" and pipe.unet.config.out_channels == 8
  saved, got = _leaves(states[3].ema), _leaves(params["unet"])
  assert set(got) == set(saved) and all(np.array_equal(got[k], saved[k]) for k in saved)
  assert os.path.isfile(os.path.join(written["diffusers"], export.GAUSSIAN_NOTE))
  torch_pipe = diffusers.DiffusionPipeline.from_pretrained(written["diffusers"])
  assert torch_pipe.unet.config.out_channels == 4
  shape = pipeline.latent_shape(pipe, 2, 32, 32)
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(0), shape), np.float32)
  noises = lcm_noises(2, shape)
  mean_sampler = pipeline.make_sampler(pipe, kind="student", steps=2, height=32, output="float", gaussian="mean")
  ours = np.asarray(mean_sampler(params, pipe.tokenize(PROMPTS), jax.random.PRNGKey(0), 6.0, latents=z,
                                 noises=noises))
  with torch.no_grad():
    ref = torch_pipe(PROMPTS, height=32, width=32, timesteps=mean_sampler.timesteps.tolist(), guidance_scale=6.0,
                     latents=torch.from_numpy(z.transpose(0, 3, 1, 2).copy()), output_type="np",
                     generator=torch.Generator().manual_seed(9)).images
  np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0)
  drawn = pipeline.make_sampler(pipe, kind="student", steps=2, height=32, output="float", gaussian="sample")
  a = np.asarray(drawn(params, pipe.tokenize(PROMPTS), jax.random.PRNGKey(0), 6.0, latents=z, noises=noises))
  b = np.asarray(drawn(params, pipe.tokenize(PROMPTS), jax.random.PRNGKey(1), 6.0, latents=z, noises=noises))
  assert np.abs(a - ours).max() > 1e-3 and np.abs(a - b).max() > 1e-3  # the draws depend on the key alone


@pytest.mark.slow
def test_gaussian_lora_student_exports(run, tmp_path):
  """A Gaussian LoRA student: the LoRA file plus guidance_projection.safetensors carrying the fully trained
  conv_out cut to its mean half (torch layout); diffusers' teacher U-Net with `load_lora_weights` and that file
  (strict=False) gives our merged student's mean half; the Flax export holds both halves bit for bit."""
  from safetensors.numpy import load_file

  cfg = lora_config(run[0].model.teacher_path, str(tmp_path / "out"))
  cfg.consistency.student_output = "gaussian"
  cfg.consistency.logvar_init = -4.0
  workdir = str(tmp_path / "run")
  states = write_checkpoints(cfg, workdir)
  written = export.run_export(cfg, workdir)
  assert {"lora", "lora_guidance", "flax", "diffusers"} <= set(written)
  conv = states[3].student["full"]["params"]["conv_out"]
  kernel, bias = np.asarray(conv["kernel"]), np.asarray(conv["bias"])
  assert kernel.shape[-1] == 8 and bias.shape == (8,)
  sd = load_file(written["lora_guidance"])
  assert set(sd) == {"conv_out.weight", "conv_out.bias"}
  np.testing.assert_array_equal(sd["conv_out.weight"], kernel[..., :4].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(sd["conv_out.bias"], bias[:4])
  trained = export.TrainedRun(cfg, workdir)
  merged = trained.student_params(3, "student")
  models, _ = trained.models()
  unet = diffusers.UNet2DConditionModel.from_pretrained(cfg.model.teacher_path, subfolder="unet").eval()
  sd_pipe = diffusers.StableDiffusionPipeline.from_pretrained(cfg.model.teacher_path, unet=unet, safety_checker=None,
                                                              requires_safety_checker=False)
  sd_pipe.load_lora_weights(written["lora"])
  missing, unexpected = sd_pipe.unet.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
  assert not unexpected
  rng = np.random.default_rng(0)
  z = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
  t = np.asarray([999, 259], np.int64)
  text = rng.standard_normal((2, 16, 32)).astype(np.float32)
  ours = np.asarray(jax.jit(models.student.apply)(merged, jnp.asarray(z), jnp.asarray(t), jnp.asarray(text)))
  with torch.no_grad():
    ref = sd_pipe.unet(torch.from_numpy(z.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                       torch.from_numpy(text)).sample.permute(0, 2, 3, 1).numpy()
  assert ours.shape[-1] == 8
  np.testing.assert_allclose(ours[..., :4], ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
  pipe, params = export.load_exported(written["flax"])
  assert pipe.student_output == "gaussian" and pipe.unet.config.out_channels == 8
  got, want = _leaves(params["unet"]), _leaves(merged)
  assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_gaussian_run_through_the_sample_and_eval_modes(tmp_path):
  """`--mode sample` and the eval job on a Gaussian student's run: PNGs and rows for both ``sample.gaussian``
  settings; the drawn images differ from the mean's, and the eval rows of the two differ as well."""
  from PIL import Image

  from scott_jax import config as config_lib
  from scott_jax import evaluate, sample

  cfg = tiny_config(write_tiny_pipeline(str(tmp_path / "teacher")))
  cfg.consistency.student_output = "gaussian"
  cfg.consistency.logvar_init = -2.0
  workdir = str(tmp_path / "run")
  write_checkpoints(cfg, workdir)
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(f'{{"caption": "{p}"}}\n' for p in PROMPTS * 4))  # 8 > coverage k
  ref = np.random.default_rng(0).standard_normal((64, evaluate.RANDOM_PROJECTION_DIM))
  evaluate.write_reference(str(tmp_path / "ref.npz"), ref, len(ref))
  images, rows = {}, {}
  for how in ("mean", "sample"):
    c = cfg.copy_and_resolve_references()
    c.sample.update(dict(gaussian=how, steps=(2,), batch_size=2, resolution=32, prompts=tuple(PROMPTS)))
    c.eval.update(dict(prompt_file=str(prompts), reference_stats=str(tmp_path / "ref.npz"),
                       features="random_projection", sample_steps=(2,), params=("ema",), batch_size=4))
    config_lib.validate(c)
    timings = sample.run_sample(c, workdir)  # WORKDIR/samples/student_2step/ (rewritten by each setting)
    assert set(timings) == {"student_2step"}
    folder = os.path.join(workdir, "samples", "student_2step")
    images[how] = np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:05d}.png"))) for i in range(len(PROMPTS))])
    rows[how] = evaluate.run_eval(c, str(tmp_path / f"eval_{how}"), export.TrainedRun(c, workdir))
    assert len(rows[how]) == 1 and np.isfinite(rows[how][0]["fid"])
  assert np.abs(images["mean"].astype(int) - images["sample"]).max() > 2
  assert rows["mean"][0]["fid"] != rows["sample"][0]["fid"]
