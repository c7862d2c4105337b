"""Stable Diffusion XL parts against diffusers on a tiny SDXL-shaped pipeline (float32, random weights, the real
CLIP BPE vocabulary from open_clip): the two-encoder prompt encoding vs `StableDiffusionXLPipeline.encode_prompt`
(with force_zeros_for_empty_prompt on and off, negative prompts, clip_skip), the micro-conditioning ids, and the
whole folder written by diffusers' save_pretrained read back by `loading.load_pipeline`. The SDXL U-Net's
forward parity is in test_unet.py (case "sdxl")."""

import functools
import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_clip_text import _open_clip_tokenizer_module, _write_clip_tokenizer

from scott_jax import pipeline
from scott_jax.models import loading, unet
from scott_jax.models.clip_text import CLIPTextModelWithProjection, SDXLTextEncoders, tokenize

PROMPTS = ["a photo of an astronaut riding a horse on Mars", "tok " * 100, ""]
NEGATIVE = ["blurry, low quality", "", "text, watermark"]
# text_encoder (CLIP ViT-L stand-in: quick_gelu) and text_encoder_2 (OpenCLIP bigG stand-in: gelu, projection);
# both with SDXL's legacy eos_token_id 2 (pooling at the largest id).
TEXT_1 = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
              hidden_act="quick_gelu")
TEXT_2 = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu",
              projection_dim=24)
ADD_DIM = 8


def _close(ours, ref, tol: float = 1e-5) -> None:
  """Max abs error <= tol * max(1, max |ref|)."""
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  err, scale = np.abs(ours - ref).max(), max(1.0, np.abs(ref).max())
  assert err <= tol * scale, f"max abs err {err:.3g} > {tol} * {scale:.3g}"


def _perturb(*modules, scale: float = 0.05) -> None:
  """Default inits zero biases and make norms identity: perturb every parameter."""
  with torch.no_grad():
    for m in modules:
      for p in m.parameters():
        p.add_(scale * torch.randn_like(p))


def _text_model(cls, kwargs):
  config = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=0,
                                       eos_token_id=2, pad_token_id=1, **kwargs)
  return cls(config).eval()


def _sdxl_pipeline(root, force_zeros: bool = True) -> diffusers.StableDiffusionXLPipeline:
  """A tiny StableDiffusionXLPipeline: random SDXL-shaped U-Net, VAE (SDXL's scaling factor) and encoders."""
  oc = _open_clip_tokenizer_module()
  _write_clip_tokenizer(root / "tok1", oc)
  _write_clip_tokenizer(root / "tok2", oc, pad_token="!")
  torch.manual_seed(0)
  text_1 = _text_model(transformers.CLIPTextModel, TEXT_1)
  text_2 = _text_model(transformers.CLIPTextModelWithProjection, TEXT_2)
  unet_model = diffusers.UNet2DConditionModel(
    sample_size=8, block_out_channels=(32, 64), layers_per_block=1, transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
    cross_attention_dim=TEXT_1["hidden_size"] + TEXT_2["hidden_size"], addition_embed_type="text_time",
    addition_time_embed_dim=ADD_DIM, projection_class_embeddings_input_dim=TEXT_2["projection_dim"] + 6 * ADD_DIM,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
  vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                block_out_channels=(16, 32), norm_num_groups=8, scaling_factor=0.13025,
                                force_upcast=True)
  _perturb(text_1, text_2, unet_model, vae)
  scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                               steps_offset=1, timestep_spacing="leading")
  return diffusers.StableDiffusionXLPipeline(
    vae=vae.eval(), text_encoder=text_1, text_encoder_2=text_2,
    tokenizer=transformers.CLIPTokenizer.from_pretrained(str(root / "tok1")),
    tokenizer_2=transformers.CLIPTokenizer.from_pretrained(str(root / "tok2")),
    unet=unet_model.eval(), scheduler=scheduler, force_zeros_for_empty_prompt=force_zeros)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
  """(folder written by save_pretrained, torch pipeline, our loaded components)."""
  root = tmp_path_factory.mktemp("sdxl")
  pipe = _sdxl_pipeline(root)
  pipe.save_pretrained(root / "pipe")
  return root / "pipe", pipe, loading.load_pipeline(root / "pipe")


@functools.partial(jax.jit, static_argnums=(0, 1, 5))
def _encode(text_encoder, text_encoder_2, params, ids, ids_2, clip_skip):
  """`SDXLTextEncoders.encode`, compiled once per encoder pair and clip_skip (shared by the tests)."""
  return SDXLTextEncoders(text_encoder, text_encoder_2).encode(params, ids, ids_2, clip_skip)


def _ours(parts, force_zeros: bool, prompts, negative=None, clip_skip: int = 0):
  """Our (states, negative states, pooled, negative pooled), in the order of diffusers' encode_prompt."""
  encoders = SDXLTextEncoders(parts.text_encoder, parts.text_encoder_2, force_zeros)
  params = {"text_encoder": parts.text_encoder_params, "text_encoder_2": parts.text_encoder_2_params}
  ids = [tokenize(parts.tokenizer, prompts), tokenize(parts.tokenizer_2, prompts)]
  states, pooled = _encode(parts.text_encoder, parts.text_encoder_2, params, *ids, clip_skip)
  neg = [""] * len(prompts) if negative is None else negative
  neg_ids = [tokenize(parts.tokenizer, neg), tokenize(parts.tokenizer_2, neg)]
  if negative is None and force_zeros:
    neg_states, neg_pooled = encoders.encode_negative(params, *neg_ids, negative_given=False)
  else:  # what encode_negative computes then, through the compiled function
    assert not force_zeros or negative is not None
    neg_states, neg_pooled = _encode(parts.text_encoder, parts.text_encoder_2, params, *neg_ids, 0)
  return states, neg_states, pooled, neg_pooled


def _diffusers(pipe, prompts, negative=None, clip_skip=None):
  with torch.no_grad():
    return [t.numpy() for t in pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=True, negative_prompt=negative,
                                                  clip_skip=clip_skip)]


def test_tokenizers_match_diffusers(sdxl):
  """tokenizer_2 pads with "!" (id 0) like SDXL's; both give the ids diffusers' tokenizers give."""
  _, pipe, parts = sdxl
  for ours, theirs in ((parts.tokenizer, pipe.tokenizer), (parts.tokenizer_2, pipe.tokenizer_2)):
    ref = theirs(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(tokenize(ours, PROMPTS), ref)
  assert parts.tokenizer_2.pad_token_id == 0 and parts.tokenizer.pad_token_id == parts.tokenizer.eos_token_id


def test_encode_prompt_matches_diffusers(sdxl):
  """Prompt states (penultimate layers of both encoders concatenated) and pooled (encoder 2's projection) at
  1e-5; without a negative prompt and force_zeros_for_empty_prompt the unconditional embeddings are zeros."""
  _, pipe, parts = sdxl
  assert parts.force_zeros_for_empty_prompt and isinstance(parts.text_encoder_2, CLIPTextModelWithProjection)
  encoders = parts.text_encoders
  assert encoders.hidden_size == 48 and encoders.pooled_size == 24
  ours, ref = _ours(parts, True, PROMPTS), _diffusers(pipe, PROMPTS)
  assert ours[0].shape == (3, 77, 48) and ours[2].shape == (3, 24)
  for a, b in zip(ours, ref, strict=True):
    _close(a, b)
  assert not np.any(np.asarray(ours[1])) and not np.any(np.asarray(ours[3]))
  # A negative prompt is encoded whatever the flag; clip_skip moves both encoders one layer further back.
  for a, b in zip(_ours(parts, True, PROMPTS, NEGATIVE, clip_skip=1),
                  _diffusers(pipe, PROMPTS, NEGATIVE, clip_skip=1), strict=True):
    _close(a, b)
  # force_zeros_for_empty_prompt False: the unconditional input is the encoded empty prompt.
  off = diffusers.StableDiffusionXLPipeline(**{**pipe.components, "force_zeros_for_empty_prompt": False})
  ours, ref = _ours(parts, False, PROMPTS), _diffusers(off, PROMPTS)
  assert np.abs(ref[1]).max() > 0.1
  for a, b in zip(ours, ref, strict=True):
    _close(a, b)
  # encode_negative itself (uncompiled) with a given negative prompt: the encoded negative prompt.
  neg_ids = [tokenize(parts.tokenizer, NEGATIVE), tokenize(parts.tokenizer_2, NEGATIVE)]
  params = {"text_encoder": parts.text_encoder_params, "text_encoder_2": parts.text_encoder_2_params}
  states, pooled = encoders.encode_negative(params, *neg_ids, negative_given=True)
  _, neg_ref, _, neg_pooled_ref = _diffusers(pipe, PROMPTS, NEGATIVE)
  _close(states, neg_ref)
  _close(pooled, neg_pooled_ref)


def test_add_time_ids_match_diffusers(sdxl):
  _, pipe, _ = sdxl
  for original, crop, target in [((1024, 1024), (0, 0), (1024, 1024)), ((768, 1360), (64, 12), (896, 1152))]:
    ref = pipe._get_add_time_ids(original, crop, target, torch.float32, TEXT_2["projection_dim"])
    np.testing.assert_array_equal(np.asarray([unet.add_time_ids(original, crop, target)], np.float32), ref.numpy())
  with pytest.raises(ValueError, match="pairs"):
    unet.add_time_ids((1024,), (0, 0), (1024, 1024))


def test_load_sdxl_pipeline_folder(sdxl):
  """Every component of the diffusers-written folder: exact weights, configs, VAE scaling / force_upcast."""
  folder, pipe, parts = sdxl
  assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
  assert parts.is_sdxl and parts.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
  cfg = parts.unet.config
  assert cfg.addition_embed_type == "text_time" and cfg.transformer_layers_per_block == (1, 2)
  assert cfg.down_block_types[0] == "DownBlock2D" and cfg.use_linear_projection
  assert parts.vae.config.scaling_factor == pipe.vae.config.scaling_factor == 0.13025
  assert parts.vae.config.force_upcast and parts.vae.dtype == jnp.float32
  for params, module in ((parts.unet_params, pipe.unet), (parts.vae_params, pipe.vae),
                         (parts.text_encoder_params, pipe.text_encoder),
                         (parts.text_encoder_2_params, pipe.text_encoder_2)):
    ours = loading.to_state_dict(params)
    ref = {k.removeprefix("text_model."): v.numpy() for k, v in module.state_dict().items()}
    ref.pop("embeddings.position_ids", None)
    assert ours.keys() == ref.keys()
    assert all(np.array_equal(ours[k], ref[k]) for k in ref)
  # force_upcast: a float16 request computes the VAE in float32 (the U-Net and encoders in float16).
  half = loading.load_pipeline(folder, dtype=jnp.float16)
  assert half.vae.dtype == jnp.float32 and half.unet.dtype == jnp.float16
  assert half.text_encoder_2.dtype == jnp.float16


def test_sdxl_folder_errors(sdxl, tmp_path):
  """A missing SDXL part is named; an SD folder whose U-Net needs text_time inputs is refused."""
  import shutil

  folder, _, _ = sdxl
  broken = tmp_path / "no_tok2"
  shutil.copytree(folder, broken)
  shutil.rmtree(broken / "tokenizer_2")
  with pytest.raises(FileNotFoundError, match="tokenizer_2"):
    loading.load_pipeline(broken)
  no_te2 = tmp_path / "no_te2"
  shutil.copytree(broken, no_te2)
  shutil.rmtree(no_te2 / "text_encoder_2")
  index = json.loads((no_te2 / "model_index.json").read_text())
  index.update(text_encoder_2=[None, None], tokenizer_2=[None, None])
  (no_te2 / "model_index.json").write_text(json.dumps(index))
  with pytest.raises(ValueError, match="no text_encoder_2"):
    loading.load_pipeline(no_te2)


# ---------------------------------------------------------------------------------------------------------
# Sampling: the SDXL condition (both encoders' states, pooled, time ids) through the student and teacher loops.

SIZE = 16  # image height = width; latents 8x8 (the tiny VAE downsamples by 2)
COND_DIM = 32  # the student's guidance embedding width (time_cond_proj_dim)


@pytest.fixture(scope="module")
def sdxl_student(sdxl, tmp_path_factory):
  """A tiny LCM-SDXL-style pipeline (the SDXL U-Net with time_cond_proj_dim, perturbed; LCMScheduler), saved by
  diffusers and loaded by us: (torch pipeline, components, Pipeline, params)."""
  _, pipe, _ = sdxl
  torch.manual_seed(3)
  config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}  # "_use_default_values" too
  student = diffusers.UNet2DConditionModel.from_config(dict(config, time_cond_proj_dim=COND_DIM))
  assert student.config.time_cond_proj_dim == COND_DIM
  _perturb(student)
  lcm = diffusers.StableDiffusionXLPipeline(
    **{**pipe.components, "unet": student.eval(),
       "scheduler": diffusers.LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)},
    add_watermarker=False)
  folder = tmp_path_factory.mktemp("sdxl_lcm")
  lcm.save_pretrained(folder)
  parts = loading.load_pipeline(folder)
  ours, params = pipeline.from_components(parts)
  params["text"] = {"text_encoder": parts.text_encoder_params, "text_encoder_2": parts.text_encoder_2_params}
  return lcm, parts, ours, params


def _condition(parts, params, prompts, negative: bool = False):
  """Our SDXL condition dict for prompts at SIZE x SIZE, crop (0, 0); with ``negative`` the unconditional one."""
  enc = parts.text_encoders
  ids = (tokenize(parts.tokenizer, prompts), tokenize(parts.tokenizer_2, prompts))
  states, pooled = enc.encode_negative(params["text"], *ids, negative_given=False) if negative else \
      enc.encode(params["text"], *ids)
  return pipeline.sdxl_condition(states, pooled, unet.add_time_ids((SIZE, SIZE), (0, 0), (SIZE, SIZE)))


def _torch_images(pipe, z, **kwargs) -> np.ndarray:
  with torch.no_grad():
    return pipe(PROMPTS[:2], height=SIZE, width=SIZE, output_type="np",
                latents=torch.from_numpy(np.ascontiguousarray(z.transpose(0, 3, 1, 2))), **kwargs).images


@pytest.mark.slow  # ~15-30 s per case on a loaded 2-core machine
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_student_sampling_matches_diffusers_sdxl_lcm(sdxl_student, steps):
  """Same prompts, initial latents and between-step noise (LCMScheduler's generator draws): our student loop on
  the SDXL condition (w = g - 1 through the guidance embedding) gives diffusers' SDXL + LCMScheduler images."""
  lcm, parts, ours, params = sdxl_student
  shape = pipeline.latent_shape(ours, 2, SIZE, SIZE)
  z = np.asarray(jax.random.normal(jax.random.key(steps), shape), np.float32)
  gen = torch.Generator().manual_seed(11)
  draws = [torch.randn((shape[0], shape[3], shape[1], shape[2]), generator=gen) for _ in range(steps - 1)]
  noises = np.stack([d.permute(0, 2, 3, 1).numpy() for d in draws]) if draws else np.zeros((0, *shape), np.float32)
  ts = pipeline.student_timesteps(steps)

  @jax.jit
  def run(params, cond, z, noises):
    x0 = pipeline.student_latents(ours, params["unet"], cond, z, ts, jnp.full((2,), 4.0), noises)
    return pipeline.decode(ours, params["vae"], x0)

  cond = _condition(parts, params, PROMPTS[:2])
  got = np.asarray(run(params, cond, z, noises))
  ref = _torch_images(lcm, z, num_inference_steps=steps, guidance_scale=5.0,
                      generator=torch.Generator().manual_seed(11))
  assert ts.tolist() == lcm.scheduler.timesteps.tolist()
  np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)
  # The added conditions matter: other time ids (or pooled embeddings) give other images.
  for key, value in (("time_ids", jnp.zeros((2, 6))), ("text_embeds", cond["text_embeds"][::-1])):
    assert np.abs(np.asarray(run(params, {**cond, key: value}, z, noises)) - ref).max() > 1e-2


@pytest.mark.slow
def test_teacher_sampling_matches_diffusers_sdxl(sdxl):
  """The SDXL teacher with CFG (g = 5; unconditional = zeros, force_zeros_for_empty_prompt) and DDIM eta 0 against
  diffusers' StableDiffusionXLPipeline with a DDIMScheduler (set_alpha_to_one: our last step jumps to clean data)."""
  _, pipe, parts = sdxl
  ours, params = pipeline.from_components(parts)
  params["text"] = {"text_encoder": parts.text_encoder_params, "text_encoder_2": parts.text_encoder_2_params}
  sd = diffusers.StableDiffusionXLPipeline(
    **{**pipe.components, "scheduler": diffusers.DDIMScheduler.from_config(pipe.scheduler.config,
                                                                           set_alpha_to_one=True,
                                                                           clip_sample=False)},
    add_watermarker=False)
  z = np.asarray(jax.random.normal(jax.random.key(5), pipeline.latent_shape(ours, 2, SIZE, SIZE)), np.float32)
  ts = pipeline.teacher_timesteps(3)

  @jax.jit
  def run(params, z):
    x0 = pipeline.teacher_latents(ours, params["unet"], _condition(parts, params, PROMPTS[:2]),
                                  _condition(parts, params, PROMPTS[:2], negative=True), z, ts, jnp.float32(5.0),
                                  jax.random.key(0), solver="ddim", solver_kwargs={"eta": 0.0})
    return pipeline.decode(ours, params["vae"], x0)

  ref = _torch_images(sd, z, num_inference_steps=3, guidance_scale=5.0)
  assert ts.tolist() == sd.scheduler.timesteps.tolist()
  np.testing.assert_allclose(np.asarray(run(params, z)), ref, atol=2e-4, rtol=0)
