"""SCott with an SDXL teacher end to end on a tiny SDXL-shaped random pipeline written by diffusers
(`scott_jax.testing.tiny_sd.write_tiny_sdxl_pipeline`): the batch encoding against diffusers' SDXL pipeline
(prompt states, pooled, add_time_ids from the loader's recorded original size and crop), the SD1.5-shaped
data path untouched, and (slow) `--mode train`, resume, `--mode sample`, `--mode export` with the exported
StableDiffusionXLPipeline's images matching ours, and a LoRA student's PEFT file on diffusers' SDXL pipeline via
``load_lora_weights``."""

import json
import os

import diffusers
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_export import lcm_noises

from scott_jax import config as config_lib
from scott_jax import config_files, export, main, modes, pipeline, student
from scott_jax.data import loader, sources
from scott_jax.testing.tiny_sd import write_tiny_sdxl_pipeline

TINY = config_files.load("tiny_scott")
PROMPTS = ["a red circle", "a dark blob on grass"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
  return write_tiny_sdxl_pipeline(str(tmp_path_factory.mktemp("sdxl") / "teacher"))


def sdxl_config(teacher: str, arg: str | None = None):
  cfg = TINY.get_config(arg)
  cfg.model.teacher_path = teacher
  return cfg


def _leaves(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def test_sdxl_batches_encode_as_diffusers(teacher):
  """An SDXL image batch from the loader (random crops of non-square images) holds tokenizer_2's ids and the
  micro-conditioning; `encode_batch` gives diffusers' encode_prompt states and pooled embedding (1e-5) and its
  _get_add_time_ids of (original size, crop top-left, target) per example; the frozen empty prompt is diffusers'
  unconditional embedding (zeros, force_zeros_for_empty_prompt) and `uncond_like` keeps each example's time ids."""
  cfg = sdxl_config(teacher)
  cfg.data.update(dict(source="folder", crop="random"))
  models, frozen = student.load_models(cfg)
  assert models.is_sdxl and frozen["uncond_text"].shape == (1, 16, 48) and frozen["uncond_pooled"].shape == (1, 24)
  assert not np.any(np.asarray(frozen["uncond_text"])) and not np.any(np.asarray(frozen["uncond_pooled"]))
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in ((40, 64), (96, 48), (32, 32), (50, 90))]
  src = sources.InMemorySource(images, PROMPTS * 2)
  data = loader.make_loader(cfg.data, batch_size=4, seed=1, tokenizer=models.tokenizer, max_length=16,
                            tokenizer_2=models.tokenizer_2, source=src, with_metadata=True)
  batch = next(data)
  data.close()
  assert batch["input_ids_2"].shape == (4, 16) and batch["original_size"].dtype == np.int32
  originals = [images[i].shape[:2] for i in batch["example_ids"]]
  np.testing.assert_array_equal(batch["original_size"], originals)
  # the crop offsets lie in the resized image (short side 32): along the long side only
  for (h, w), (top, left) in zip(originals, batch["crop_top_left"], strict=True):
    long_ = round(max(h, w) * 32 / min(h, w))
    assert (top == 0 if h <= w else 0 <= top <= long_ - 32) and (left == 0 if w <= h else 0 <= left <= long_ - 32)
  assert batch["crop_top_left"].any()
  z0, text, pooled = jax.jit(lambda f, b: student.encode_batch(models, f, b, None))(
    frozen, {k: batch[k] for k in ("images", "input_ids", "input_ids_2", "original_size", "crop_top_left")})
  ref = diffusers.StableDiffusionXLPipeline.from_pretrained(teacher, add_watermarker=False)
  with torch.no_grad():
    states, neg, pooled_ref, neg_pooled = (t.numpy() for t in ref.encode_prompt(
      batch["captions"], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True))
  np.testing.assert_allclose(np.asarray(text["states"]), states, atol=1e-5 * max(1, np.abs(states).max()))
  np.testing.assert_allclose(np.asarray(pooled), pooled_ref, atol=1e-5 * max(1, np.abs(pooled_ref).max()))
  assert np.array_equal(np.asarray(text["text_embeds"]), np.asarray(pooled))
  for i in range(4):
    want = ref._get_add_time_ids(tuple(batch["original_size"][i]), tuple(batch["crop_top_left"][i]), (32, 32),
                                 torch.float32, 24)
    np.testing.assert_array_equal(np.asarray(text["time_ids"][i]), want[0].numpy())
  uncond = student.uncond_like(frozen, text)
  np.testing.assert_array_equal(np.asarray(uncond["states"]), neg)
  np.testing.assert_array_equal(np.asarray(uncond["text_embeds"]), neg_pooled)
  assert uncond["time_ids"] is text["time_ids"] and z0.shape == (4, 16, 16, 4)
  # A batch without micro-conditioning (in-memory arrays, latent caches without time_ids): original = target.
  plain = student.batch_time_ids({"images": np.zeros((2, 32, 32, 3))}, (32, 32))
  np.testing.assert_array_equal(np.asarray(plain), [[32, 32, 0, 0, 32, 32]] * 2)


@pytest.mark.slow  # ~7 s on a loaded 2-core machine
def test_sdxl_latent_cache_round_trip(teacher, tmp_path):
  """`student.cache_encoder` writes both encoders' states, the pooled embedding and the time ids; the latent batch
  read back encodes to the image batch's condition."""
  cfg = sdxl_config(teacher)
  cfg.data.update(dict(source="synthetic", num_examples=4))
  models, frozen = student.load_models(cfg)
  index = loader.build_latent_cache(cfg.data, student.cache_encoder(models, frozen), str(tmp_path / "cache"),
                                    batch_size=2, tokenizer=models.tokenizer, max_length=16,
                                    tokenizer_2=models.tokenizer_2)
  assert {k: tuple(v["shape"]) for k, v in index["keys"].items()} == {
    "latents": (16, 16, 4), "text_embeds": (16, 48), "pooled_text_embeds": (24,), "time_ids": (6,)}
  cfg.data.update(dict(source="latent_cache", path=str(tmp_path / "cache"), shuffle=False))
  data = loader.make_loader(cfg.data, batch_size=2, seed=0, shard_index=0, shard_count=1)
  latent_batch = next(data)
  data.close()
  _, text, pooled = student.encode_batch(models, frozen, latent_batch, None)
  np.testing.assert_array_equal(np.asarray(text["time_ids"]), [[32, 32, 0, 0, 32, 32]] * 2)
  assert text["states"].shape == (2, 16, 48) and pooled.shape == (2, 24)


# ---------------------------------------------------------------------------------------------------------
# End to end (slow: each train call compiles the SDXL step, ~1-2 min on a loaded 2-core machine).

def _mode(name: str, cfg, workdir: str):
  """What ``python -m scott_jax.main --mode NAME`` runs after parsing: validation, then the mode function."""
  config_lib.validate(cfg)
  return modes.resolve(name)(cfg, workdir)


@pytest.fixture(scope="module")
def sdxl_run(teacher, tmp_path_factory):
  """A full SDXL student (w embedding, GAN on): 2 steps of --mode train, then resumed to 3 (sample grids at
  steps 2 and 3)."""
  root = tmp_path_factory.mktemp("sdxl_run")
  cfg = sdxl_config(teacher)
  cfg.compilation_cache = str(root / "jax_cache")  # the resumed run reuses the first run's compiled step
  cfg.train.update(dict(num_steps=2, checkpoint_every=1, sample_every=1, sample_steps=(1,)))
  workdir = str(root / "run")
  main.enable_compilation_cache(cfg.compilation_cache, workdir)
  first = _mode("train", cfg, workdir)
  cfg.train.num_steps = 3
  resumed = _mode("train", cfg, workdir)
  return cfg, workdir, first, resumed


@pytest.mark.slow
def test_sdxl_train_and_resume(sdxl_run):
  cfg, workdir, first, resumed = sdxl_run
  assert int(first.step) == 2 and int(resumed.step) == 3
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r["loss_cd"]) and np.isfinite(r["loss_d"]) for r in rows)
  assert os.path.isfile(os.path.join(workdir, "samples", "step0000003_1step.png"))
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(first.student), jax.tree.leaves(resumed.student),
                                               strict=True)]
  assert max(moved) > 0  # the resumed run trained on


@pytest.mark.slow
def test_sdxl_sample_and_export_match_diffusers(sdxl_run, tmp_path):
  """--mode sample writes the student's images; --mode export writes a Flax export (bit for bit) and a
  StableDiffusionXLPipeline folder with the LCMScheduler whose images (same latents and between-step noise, the
  run's grid timesteps) equal ours to 2e-4."""
  cfg, workdir, _, _ = sdxl_run
  cfg.sample.update(dict(steps=(1, 2), prompts=tuple(PROMPTS)))
  timings = _mode("sample", cfg, workdir)
  assert set(timings) == {"student_1step", "student_2step"}
  assert sorted(os.listdir(os.path.join(workdir, "samples", "student_2step")))[:2] == ["00000.png", "00001.png"]
  cfg.export.update(dict(out_dir=str(tmp_path / "out"), formats=("flax", "diffusers")))
  written = _mode("export", cfg, workdir)
  pipe, params = export.TrainedRun(cfg, workdir).pipeline(3, "ema")
  flax_pipe, flax_params = export.load_exported(written["flax"])
  for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
    a, b = _leaves(params[name]), _leaves(flax_params[name])
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a), name
  assert flax_pipe.is_sdxl and flax_pipe.tokenize(PROMPTS).tolist() == pipe.tokenize(PROMPTS).tolist()
  assert flax_pipe.force_zeros_for_empty_prompt
  torch_pipe = diffusers.DiffusionPipeline.from_pretrained(written["diffusers"], add_watermarker=False)
  assert isinstance(torch_pipe, diffusers.StableDiffusionXLPipeline)
  assert isinstance(torch_pipe.scheduler, diffusers.LCMScheduler)
  assert torch_pipe.unet.config.time_cond_proj_dim == 256
  shape = pipeline.latent_shape(pipe, 2, 32, 32)
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(0), shape), np.float32)
  for steps in (1, 2):
    noises = lcm_noises(steps, shape)
    sampler = pipeline.make_sampler(pipe, kind="student", steps=steps, height=32, output="float")
    ours = np.asarray(sampler(params, pipe.tokenize(PROMPTS), jax.random.PRNGKey(0), 6.0, latents=z, noises=noises))
    with torch.no_grad():
      ref = torch_pipe(PROMPTS, height=32, width=32, timesteps=sampler.timesteps.tolist(), guidance_scale=6.0,
                       latents=torch.from_numpy(z.transpose(0, 3, 1, 2).copy()), output_type="np",
                       generator=torch.Generator().manual_seed(9)).images
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0)
  flax_sampler = pipeline.make_sampler(flax_pipe, kind="student", steps=2, height=32, output="float")
  np.testing.assert_array_equal(
    np.asarray(flax_sampler(flax_params, flax_pipe.tokenize(PROMPTS), jax.random.PRNGKey(0), 6.0, latents=z,
                            noises=noises)), ours)


@pytest.mark.slow
def test_sdxl_lora_student_loads_with_load_lora_weights(teacher, tmp_path):
  """An LCM-LoRA style SDXL student (`:student=lora`, no w embedding) trained 2 steps through --mode train;
  its PEFT file on diffusers' StableDiffusionXLPipeline (load_lora_weights) gives our merged student's U-Net
  output with the SDXL added condition (1e-4 of the output scale), which differs from the teacher's."""
  cfg = sdxl_config(teacher, "student=lora,gan=off")
  cfg.train.update(dict(num_steps=2, checkpoint_every=2))
  cfg.optim.update(dict(warmup_steps=0, student_lr=1e-2))  # B moves well away from 0 in two Adam steps
  cfg.sample.params = "student"
  cfg.export.update(dict(out_dir=str(tmp_path / "out"), formats=("lora",)))
  workdir = str(tmp_path / "run")
  _mode("train", cfg, workdir)
  written = _mode("export", cfg, workdir)
  assert set(written) == {"lora"}
  trained = export.TrainedRun(cfg, workdir)
  merged = trained.student_params(2, "student")
  models, _ = trained.models()
  sd = diffusers.StableDiffusionXLPipeline.from_pretrained(teacher, add_watermarker=False)
  teacher_unet = diffusers.UNet2DConditionModel.from_pretrained(teacher, subfolder="unet").eval()
  sd.load_lora_weights(written["lora"])
  rng = np.random.default_rng(0)
  z = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
  t = np.asarray([999, 259], np.int64)
  states = rng.standard_normal((2, 16, 48)).astype(np.float32)
  pooled = rng.standard_normal((2, 24)).astype(np.float32)
  time_ids = np.asarray([[32, 32, 0, 0, 32, 32], [64, 48, 8, 0, 32, 32]], np.float32)
  cond = pipeline.sdxl_condition(jnp.asarray(states), jnp.asarray(pooled), jnp.asarray(time_ids))
  ours = np.asarray(jax.jit(lambda p, z, t, c: pipeline.unet_output(models.student, p, z, t, c))(
    merged, jnp.asarray(z), jnp.asarray(t), cond))
  args = (torch.from_numpy(z.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), torch.from_numpy(states))
  added = {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)}
  with torch.no_grad():
    ref = sd.unet(*args, added_cond_kwargs=added).sample.permute(0, 2, 3, 1).numpy()
    base = teacher_unet(*args, added_cond_kwargs=added).sample.permute(0, 2, 3, 1).numpy()
  scale = np.abs(ref).max()
  assert np.abs(ours - ref).max() <= 1e-4 * scale
  assert np.abs(base - ref).max() > 1e-2 * scale  # the LoRA changes the U-Net


@pytest.mark.slow
def test_plan_sdxl_architecture_has_diffusers_parameter_counts():
  """``mesh.plan_architecture = "sdxl"`` (mode plan without weights) builds SDXL base 1.0: its U-Net, VAE and both
  text encoders have the parameter counts of diffusers' / transformers' modules from the same configs (built on
  torch's meta device); the frozen empty prompt has SDXL's shapes (1, 77, 2048) and (1, 1280)."""
  import transformers

  from scott_jax import plan
  from scott_jax.models import lora

  cfg = config_files.load("sdxl_scott").get_config()
  cfg.mesh.plan_architecture = "sdxl"
  models, frozen = plan.abstract_models(cfg)
  unet_cfg, vae_cfg, text_cfg, _, text_2_cfg = plan.sdxl_architectures()
  with torch.device("meta"):
    refs = {
      "unet": diffusers.UNet2DConditionModel.from_config(unet_cfg.to_diffusers()),
      "vae": diffusers.AutoencoderKL(down_block_types=vae_cfg.down_block_types, up_block_types=vae_cfg.up_block_types,
                                     block_out_channels=vae_cfg.block_out_channels,
                                     layers_per_block=vae_cfg.layers_per_block),
      "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**{
        k: getattr(text_cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "max_position_embeddings", "hidden_act")})),
      "text_encoder_2": transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**{
        k: getattr(text_2_cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "max_position_embeddings", "hidden_act",
                                            "projection_dim")})),
    }
  for name, ref in refs.items():
    n_ref = sum(p.numel() for p in ref.parameters())
    assert lora.count_params(frozen[name]) == n_ref, name
  assert lora.count_params(frozen["unet"]) == 2_567_463_684
  assert frozen["uncond_text"].shape == (1, 77, 2048) and frozen["uncond_pooled"].shape == (1, 1280)
  assert models.is_sdxl and models.student.config.time_cond_proj_dim == 256
  spec = plan.batch_spec(cfg, models)
  assert spec["images"].shape == (40, 1024, 1024, 3) and spec["input_ids_2"].shape == (40, 77)
