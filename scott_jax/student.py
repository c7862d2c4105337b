"""The student model of SCott, not its training: the networks (`Models`), loading and building them, the
student state (init, shapes, the LoRA merge), the student and guided-teacher functions, and the student's
sampling (grid, timesteps, pipeline, sampler).

The student is the teacher's U-Net with ``time_cond_proj_dim`` = guidance_embed_dim (the w embedding,
zero-initialised projection, so it starts equal to the teacher; guidance_embed_dim 0: no w embedding). With
``model.student_lora_rank`` r >= 1 the student state is a LoRA overlay instead (LCM-LoRA style): {"lora":
rank-r overlay of the teacher's kernels (B = 0), "full": the parameters the teacher lacks, trained in full (the
guidance projection cond_proj; {} without it)}, merged onto the frozen teacher at every use
(`student_unet_params`; in the train step's student forward + backward per layer instead, ``model.student_lora_apply``).
A Gaussian student (``consistency.student_output``) has twice the output channels
(prediction, log-variance).

Batches are dicts with either ``images`` (B, H, W, 3) float32 in [-1, 1] and ``input_ids`` (B, L) int32, or
precomputed ``latents`` (B, h, w, C) (already multiplied by the VAE scaling factor), ``text_embeds`` (B, L, D)
and ``pooled_text_embeds`` (B, D); `encode_batch` turns either into the step's inputs.

SDXL teachers (a folder with ``text_encoder_2/``; `Models.is_sdxl`): image batches also hold ``input_ids_2``
(B, L) (tokenizer_2) and, where the data records them, the micro-conditioning ``original_size`` and
``crop_top_left`` (B, 2) int32 pixels (else original = target = the image size, crop (0, 0)); latent batches
``time_ids`` (B, 6) (else the same default). The text condition the student, teacher and discriminator see is
then `scott_jax.pipeline.sdxl_condition`'s dict (states (B, L, D1 + D2), text_embeds = pooled (B, P),
time_ids (B, 6)) instead of the states array; the unconditional input is the encoded empty prompt as diffusers'
SDXL pipeline makes it (zeros with ``force_zeros_for_empty_prompt``) with the example's own time ids.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from scott_jax import consistency, solvers
from scott_jax import discriminator as disc_lib
from scott_jax import pipeline as pipeline_lib
from scott_jax.choices import LORA_APPLY
from scott_jax.config import ConfigDict, ConfigError, ConfigPathError
from scott_jax.models import loading, lora
from scott_jax.models import unet as unet_lib
from scott_jax.models.clip_text import SDXLTextMixin, tokenize
from scott_jax.models.unet import UNet2DConditionModel
from scott_jax.models.vae import encode_to_latents
from scott_jax.schedules import NoiseSchedule

Array = jax.Array
PyTree = Any

LATENT_KEYS = ("latents", "text_embeds", "pooled_text_embeds")
STUDENT_LORA, STUDENT_FULL = "lora", "full"  # the two parts of a LoRA student state
IMAGE_KEYS = ("images", "input_ids")
SDXL_IDS = "input_ids_2"  # an SDXL image batch's tokenizer_2 ids (B, L)
MICRO_KEYS = ("original_size", "crop_top_left")  # SDXL micro-conditioning of an image batch, (B, 2) int32 pixels
TIME_IDS = "time_ids"  # an SDXL latent batch's add_time_ids (B, 6)


@dataclasses.dataclass(frozen=True)
class Models(SDXLTextMixin):
  """The networks as (stateless) Flax modules plus the schedule; parameters live elsewhere.

  teacher: the teacher U-Net (also the discriminator's base); student: the same architecture with the guidance
  embedding (``time_cond_proj_dim``); vae, text_encoder: frozen; tokenizer: a transformers CLIP tokenizer (host
  side); disc: the discriminator or None when the GAN is off. SDXL: text_encoder_2 (`CLIPTextModelWithProjection`)
  and tokenizer_2 too, and the folder's force_zeros_for_empty_prompt; None / False otherwise.
  """

  teacher: Any
  student: Any
  vae: Any
  text_encoder: Any
  tokenizer: Any
  schedule: NoiseSchedule
  disc: disc_lib.Discriminator | None
  max_length: int
  text_encoder_2: Any = None
  tokenizer_2: Any = None
  force_zeros_for_empty_prompt: bool = False


  def tokenize(self, prompts: Any) -> np.ndarray:
    """Prompts -> token ids (B, L) int32, or for SDXL (B, 2, L) (tokenizer, tokenizer_2), as `Pipeline.tokenize`."""
    ids = tokenize(self.tokenizer, prompts, self.max_length)
    if not self.is_sdxl:
      return ids
    return np.stack([ids, tokenize(self.tokenizer_2, prompts, self.max_length)], axis=1)


def check_schedule(config: ConfigDict, scheduler_config: dict[str, Any]) -> None:
  """Raises ValueError if the teacher's scheduler config disagrees with ``config.schedule``."""
  for key in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "prediction_type"):
    if key not in scheduler_config:
      continue
    ours, theirs = config.schedule[key], scheduler_config[key]
    same = math.isclose(float(ours), float(theirs), rel_tol=1e-6) if isinstance(ours, float) else ours == theirs
    if not same:
      raise ConfigError(f"config.schedule.{key} = {ours!r} but the teacher's scheduler config has {theirs!r}; "
                       "set config.schedule to the teacher's values")


def unet_options(config: ConfigDict) -> dict[str, Any]:
  """The U-Net module options of ``config.model``: attention implementation ("auto" is resolved by the U-Net at
  trace time, `scott_jax.models.unet.resolve_attention`), its chunk size, remat and its policy."""
  m = config.model
  if m.attention == "cudnn" and m.dtype == "float32":
    raise ConfigError("config.model.attention='cudnn' needs config.model.dtype bfloat16 or float16 (cuDNN's fused "
                     "attention has no float32 kernel); use attention='chunked' or 'xla' in float32")
  return {"attention": m.attention, "attention_chunk_size": int(m.attention_chunk_size), "remat": bool(m.remat),
          "remat_policy": m.remat_policy}


def build_models(config: ConfigDict, unet_config: Any, vae: Any, text_encoder: Any, tokenizer: Any,
                 max_length: int, text_encoder_2: Any = None, tokenizer_2: Any = None,
                 force_zeros_for_empty_prompt: bool = False) -> Models:
  """The Models around a teacher U-Net architecture (``UNetConfig``) and given VAE / text encoder modules.

  Teacher and student get ``config.model``'s dtype and `unet_options`; the student adds the guidance embedding
  (``time_cond_proj_dim``) and, a Gaussian student (``consistency.student_output``), twice the output channels
  (prediction, log-variance); the discriminator (GAN on) is built on the teacher module. Used by `load_models`
  (real weights) and `scott_jax.plan.abstract_models` (shapes only), so both build the same program. SDXL:
  ``text_encoder_2`` / ``tokenizer_2`` given, and the U-Net must take the text_time added condition.
  """
  if (text_encoder_2 is not None) != (unet_config.addition_embed_type == "text_time"):
    raise ConfigError(f"the teacher U-Net has addition_embed_type={unet_config.addition_embed_type!r} but "
                      f"{'a' if text_encoder_2 is not None else 'no'} second text encoder was given: an SDXL "
                      "teacher needs both (text_encoder_2/, tokenizer_2/), an SD teacher neither")
  dtype = loading.compute_dtype(config.model.dtype)
  options = unet_options(config)
  teacher = UNet2DConditionModel(unet_config, dtype=dtype, **options)
  out_channels = unet_config.out_channels * (2 if config.consistency.student_output == "gaussian" else 1)
  student = UNet2DConditionModel(
    dataclasses.replace(unet_config, time_cond_proj_dim=config.consistency.guidance_embed_dim or None,
                        out_channels=out_channels), dtype=dtype, **options)
  disc = None
  if config.gan.enabled:
    disc = disc_lib.Discriminator(teacher, variant=config.gan.variant, lora_targets=tuple(config.gan.lora_targets),
                                  lora_rank=config.gan.lora_rank, lora_alpha=config.gan.lora_alpha,
                                  norm_groups=unet_config.norm_num_groups, dtype=dtype,
                                  head_init=config.gan.head_init, lora_apply=config.gan.lora_apply)
  schedule = NoiseSchedule.from_config(config.schedule)
  return Models(teacher, student, vae, text_encoder, tokenizer, schedule, disc, int(max_length), text_encoder_2,
                tokenizer_2, bool(force_zeros_for_empty_prompt))


def load_models(config: ConfigDict) -> tuple[Models, dict[str, PyTree]]:
  """Loads the teacher pipeline named by ``config.model`` -> (Models, frozen params pytree).

  frozen = {"unet", "vae", "text_encoder": params, "uncond_text": (1, L, D), "uncond_pooled": (1, D)} where the
  last two are the encoded empty prompt. SDXL adds "text_encoder_2", and the empty prompt is `uncond_prompt`'s
  (both encoders' penultimate states (1, L, D1 + D2) and encoder 2's projection (1, P); zeros with the folder's
  force_zeros_for_empty_prompt, as diffusers). A missing folder raises FileNotFoundError naming it.
  """
  path = config.model.teacher_path
  if not path or not os.path.isdir(path):
    raise ConfigPathError(f"teacher folder config.model.teacher_path='{path}' does not exist; it must be a "
                            "diffusers-format Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/)")
  dtype = loading.compute_dtype(config.model.dtype)
  parts = loading.load_pipeline(path, dtype=dtype, **unet_options(config))
  vae, vae_params = parts.vae, parts.vae_params
  if config.model.vae_path:
    if not os.path.isdir(config.model.vae_path):
      raise ConfigPathError(f"VAE folder config.model.vae_path='{config.model.vae_path}' does not exist")
    vae, vae_params = loading.load_vae(config.model.vae_path, dtype=dtype)
  check_schedule(config, dict(parts.scheduler_config))
  tokenizer = parts.tokenizer
  max_length = pipeline_lib.text_max_length(tokenizer, parts.text_encoder)
  if parts.is_sdxl:
    max_length = min(max_length, pipeline_lib.text_max_length(parts.tokenizer_2, parts.text_encoder_2))
  models = build_models(config, parts.unet.config, vae, parts.text_encoder, tokenizer, max_length,
                        parts.text_encoder_2, parts.tokenizer_2, parts.force_zeros_for_empty_prompt)
  frozen = {"unet": parts.unet_params, "vae": vae_params, "text_encoder": parts.text_encoder_params}
  if parts.is_sdxl:
    frozen["text_encoder_2"] = parts.text_encoder_2_params
  frozen["uncond_text"], frozen["uncond_pooled"] = uncond_prompt(models, frozen)
  return models, frozen


def uncond_prompt(models: Models, frozen: PyTree) -> tuple[Array, Array]:
  """The encoded empty prompt (states (1, L, D), pooled (1, P)): CLIP's last hidden state and pooler output, or
  for SDXL diffusers' unconditional embeddings (`SDXLTextEncoders.encode_negative`, zeros with
  force_zeros_for_empty_prompt). ``frozen``'s text-encoder leaves may be abstract (under ``jax.eval_shape``)."""
  if models.is_sdxl:
    ids = models.tokenize([""])
    return models.text_encoders.encode_negative(frozen, jnp.asarray(ids[:, 0]), jnp.asarray(ids[:, 1]),
                                                negative_given=False)
  out = models.text_encoder.apply(frozen["text_encoder"], jnp.asarray(models.tokenize([""])))
  return out.last_hidden_state, out.pooler_output


CONV_OUT = "conv_out"  # the U-Net's output conv: twice the teacher's channels in a Gaussian student


def _student_layout(models: Models, teacher_params: PyTree) -> tuple[dict, dict, dict]:
  """Flat {path: (teacher leaf, spec)} of the parameters the student shares with the teacher, flat {path: spec}
  of the ones it adds (only the guidance projection ``cond_proj``) and flat {path: (teacher leaf, spec)} of the
  output conv of a Gaussian student (``conv_out`` kernel and bias with twice the teacher's output channels;
  empty for a point student); anything else raises."""
  shapes = unet_lib.abstract_params(models.student.config)
  teacher_flat = traverse_util.flatten_dict(teacher_params)
  doubled = models.student.config.out_channels == 2 * models.teacher.config.out_channels
  shared, extra, halves = {}, {}, {}
  for path, spec in traverse_util.flatten_dict(shapes).items():
    if path in teacher_flat:
      leaf = teacher_flat[path]
      if doubled and CONV_OUT in path[-2:-1] and tuple(spec.shape) == (*leaf.shape[:-1], 2 * leaf.shape[-1]):
        halves[path] = (leaf, spec)
        continue
      if tuple(leaf.shape) != tuple(spec.shape):
        raise ValueError(f"student parameter {'/'.join(path)} {spec.shape} != teacher's {leaf.shape}")
      shared[path] = (leaf, spec)
    elif path[-2:] == ("cond_proj", "kernel"):
      extra[path] = spec
    else:
      raise ValueError(f"student parameter {'/'.join(path)} has no counterpart in the teacher")
  return shared, extra, halves


def _gaussian_conv_out(halves: dict, logvar_init: float) -> dict:
  """A Gaussian student's initial conv_out (flat {path: array}): the mean half is the teacher's kernel and bias,
  the log-variance half a zero kernel and the bias ``logvar_init`` (DECISION: the student starts equal to the
  teacher and near-deterministic, variance c_out^2 exp(logvar_init) everywhere)."""
  out = {}
  for path, (leaf, spec) in halves.items():
    leaf = jnp.asarray(leaf, spec.dtype)
    fill = logvar_init if path[-1] == "bias" else 0.0
    out[path] = jnp.concatenate([leaf, jnp.full(leaf.shape, fill, spec.dtype)], axis=-1)
  return out


def _without_conv_out(teacher_params: PyTree) -> PyTree:
  """The teacher's parameters without conv_out (a Gaussian LoRA student trains its doubled conv_out in full)."""
  flat = traverse_util.flatten_dict(teacher_params)
  return traverse_util.unflatten_dict({p: v for p, v in flat.items() if CONV_OUT not in p[-2:-1]})


def init_student_params(models: Models, teacher_params: PyTree, config: ConfigDict | None = None) -> PyTree:
  """The student's initial state.

  Full student (``config`` None or ``model.student_lora_rank`` 0): a copy of the teacher's parameters plus the
  guidance projection ``cond_proj`` set to zero. LoRA student: {"lora": `lora.init` of
  ``model.student_lora_targets`` at the rank (key fold_in(seed, 3), B = 0), "full": {cond_proj: 0} or {}}.
  A Gaussian student (``consistency.student_output``; needs ``config``) has the doubled conv_out of
  `_gaussian_conv_out` (logvar bias ``consistency.logvar_init``), in the "full" part of a LoRA state (the overlay
  then never targets conv_out). Either starts equal to the teacher. Any other parameter the student has and the
  teacher lacks raises.
  """
  shared, extra, halves = _student_layout(models, teacher_params)
  zeros = {p: jnp.zeros(spec.shape, spec.dtype) for p, spec in extra.items()}  # DECISION (notes section 2)
  if halves:
    if config is None:
      raise ValueError("a Gaussian student's initialisation needs the config (consistency.logvar_init)")
    zeros.update(_gaussian_conv_out(halves, float(config.consistency.logvar_init)))
  if config is None or config.model.student_lora_rank == 0:
    out = {p: jnp.array(leaf, dtype=spec.dtype, copy=True) for p, (leaf, spec) in shared.items()}
    return traverse_util.unflatten_dict({**out, **zeros})

  m = config.model
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 3)
  base = _without_conv_out(teacher_params) if halves else teacher_params
  overlay = lora.init(key, base, tuple(m.student_lora_targets), m.student_lora_rank)
  return {STUDENT_LORA: overlay, STUDENT_FULL: traverse_util.unflatten_dict(zeros)}


def student_shapes(config: ConfigDict, models: Models, teacher_params: PyTree) -> PyTree:
  """`init_student_params`' shapes and dtypes (jax.ShapeDtypeStruct leaves); ``teacher_params`` may be abstract."""
  if config.model.student_lora_rank == 0:
    return jax.eval_shape(lambda p: init_student_params(models, p, config), teacher_params)

  _, extra, halves = _student_layout(models, teacher_params)
  m = config.model
  base = _without_conv_out(teacher_params) if halves else teacher_params
  full = {**extra, **{p: jax.ShapeDtypeStruct(spec.shape, spec.dtype) for p, (_, spec) in halves.items()}}
  return {STUDENT_LORA: lora.init_shapes(base, tuple(m.student_lora_targets), m.student_lora_rank),
          STUDENT_FULL: traverse_util.unflatten_dict(full)}


def is_lora_student(student: PyTree) -> bool:
  """True for a LoRA student state (`init_student_params` with student_lora_rank >= 1)."""
  return isinstance(student, dict) and STUDENT_LORA in student


def student_base_params(student: PyTree, teacher_params: PyTree) -> PyTree:
  """A LoRA student state's U-Net parameters without its overlay: the teacher's plus the state's "full" part."""
  flat = traverse_util.flatten_dict(teacher_params)
  flat.update(traverse_util.flatten_dict(student.get(STUDENT_FULL, {})))
  return traverse_util.unflatten_dict(flat)


def student_unet_params(student: PyTree, teacher_params: PyTree, lora_alpha: float) -> PyTree:
  """The student's U-Net parameters {"params": ...} from its state: a full student as it is; a LoRA state as
  `student_base_params` with the overlay merged, W + (alpha / r) A B (`lora.merge`). Pure and jit-able."""
  if not is_lora_student(student):
    return student
  return lora.merge(student_base_params(student, teacher_params), student[STUDENT_LORA], lora_alpha)


def _check_batch(batch: dict[str, Any]) -> str:
  if all(k in batch for k in LATENT_KEYS):
    return "latents"
  if all(k in batch for k in IMAGE_KEYS):
    return "images"
  raise KeyError(f"a batch needs keys {IMAGE_KEYS} (images in [-1, 1] and token ids) or {LATENT_KEYS} "
                 f"(precomputed); got {sorted(batch)}")


def batch_time_ids(batch: dict[str, Any], target_size: tuple[int, int]) -> Array:
  """SDXL's add_time_ids (B, 6) float32 of a batch: its ``time_ids``, or (`scott_jax.models.unet.add_time_ids`
  per example) its ``original_size`` and ``crop_top_left`` (B, 2) with the target ``target_size`` (height,
  width) px; without them original = target and crop (0, 0)."""
  if TIME_IDS in batch:
    return jnp.asarray(batch[TIME_IDS], jnp.float32)
  b = np.shape(next(iter(batch.values())))[0]
  target = jnp.broadcast_to(jnp.asarray(target_size, jnp.float32), (b, 2))
  original = jnp.asarray(batch[MICRO_KEYS[0]], jnp.float32) if MICRO_KEYS[0] in batch else target
  crop = jnp.asarray(batch[MICRO_KEYS[1]], jnp.float32) if MICRO_KEYS[1] in batch else jnp.zeros((b, 2))
  return jnp.concatenate([original, crop, target], axis=-1)


def encode_batch(models: Models, frozen: PyTree, batch: dict[str, Array],
                 key: Array | None) -> tuple[Array, Any, Array]:
  """(latents z0 (B, h, w, C), text (B, L, D), pooled text (B, D)), all float32, from either batch kind.

  ``key`` samples the VAE posterior (None: its mean). SDXL (`Models.is_sdxl`): text is the condition dict
  `scott_jax.pipeline.sdxl_condition` (states (B, L, D1 + D2), text_embeds (B, P), time_ids (B, 6),
  `batch_time_ids` at the image size) and pooled its text_embeds.
  """
  kind = _check_batch(batch)
  if kind == "latents":
    z0, text, pooled = (jnp.asarray(batch[k], jnp.float32) for k in LATENT_KEYS)
  else:
    z0 = encode_to_latents(models.vae, frozen["vae"], jnp.asarray(batch["images"]), key)
    if models.is_sdxl:
      if SDXL_IDS not in batch:
        raise KeyError(f"an SDXL teacher's image batch needs '{SDXL_IDS}' (tokenizer_2's ids); got {sorted(batch)}")
      text, pooled = models.text_encoders.encode(frozen, jnp.asarray(batch["input_ids"], jnp.int32),
                                                 jnp.asarray(batch[SDXL_IDS], jnp.int32))
    else:
      out = models.text_encoder.apply(frozen["text_encoder"], jnp.asarray(batch["input_ids"], jnp.int32))
      text, pooled = out.last_hidden_state, out.pooler_output
  sg = lambda x: jax.lax.stop_gradient(x.astype(jnp.float32))  # noqa: E731
  z0, text, pooled = sg(z0), sg(text), sg(pooled)
  if models.is_sdxl:
    size = tuple(int(n) for n in (batch["images"].shape[1:3] if kind == "images" else
                                  np.asarray(z0.shape[1:3]) * models.vae.config.downsample_factor))
    text = pipeline_lib.sdxl_condition(text, pooled, sg(batch_time_ids(batch, size)))
  return z0, text, pooled


def encode_shapes(models: Models, frozen: PyTree, batch_spec: dict[str, Any]) -> tuple[Any, Any, Any]:
  """ShapeDtypeStructs of `encode_batch`'s outputs for a batch of ``batch_spec`` (arrays or structs)."""
  return jax.eval_shape(lambda f, b: encode_batch(models, f, b, None), frozen, batch_spec)


def cache_encoder(models: Models, frozen: PyTree) -> Callable[[dict[str, Any]], dict[str, np.ndarray]]:
  """The ``encode_fn`` of `scott_jax.data.loader.build_latent_cache` for this teacher: an image batch (VAE mean)
  -> {"latents" (B, h, w, C), "text_embeds" (B, L, D), "pooled_text_embeds" (B, P)} float32 host arrays, for
  SDXL text_embeds being both encoders' states (D1 + D2) and with "time_ids" (B, 6) (`batch_time_ids`), the
  keys `encode_batch` reads from a latent batch."""
  keys = IMAGE_KEYS + ((SDXL_IDS, *MICRO_KEYS) if models.is_sdxl else ())
  run = jax.jit(lambda f, b: encode_batch(models, f, b, None))

  def encode_fn(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    z0, text, pooled = run(frozen, {k: np.asarray(batch[k]) for k in keys if k in batch})
    out = {"latents": z0, "pooled_text_embeds": pooled}
    if isinstance(text, dict):
      out.update(text_embeds=text["states"], time_ids=text["time_ids"])
    else:
      out["text_embeds"] = text
    return {k: np.asarray(v) for k, v in out.items()}

  return encode_fn


def uncond_like(frozen: PyTree, text: Any) -> Any:
  """The unconditional input of CFG for the condition ``text`` of `encode_batch`: the encoded empty prompt
  ``frozen["uncond_text"]`` broadcast to the states' shape, and for SDXL the empty prompt's pooled embedding with
  ``text``'s own time ids (diffusers' SDXL pipeline uses the same add_time_ids for both halves)."""
  if isinstance(text, dict):
    states, pooled = text["states"], text["text_embeds"]
    return {"states": jnp.broadcast_to(frozen["uncond_text"], states.shape).astype(states.dtype),
            "text_embeds": jnp.broadcast_to(frozen["uncond_pooled"], pooled.shape).astype(pooled.dtype),
            "time_ids": text["time_ids"]}
  return jnp.broadcast_to(frozen["uncond_text"], text.shape).astype(text.dtype)


def make_student_fn(models: Models, guidance_embed_dim: int, teacher_params: PyTree | None = None,
                    lora_alpha: float = 1.0, lora_apply: str = "merged") -> Callable:
  """student_fn(params, z, t, cond) -> model output (float32); cond = {"text": (B, L, D) or the SDXL condition
  dict (`encode_batch`), "w": (B,)}.

  ``params``: the student's U-Net parameters, or with ``teacher_params`` given any student state. A LoRA state
  runs on them with its overlay ``lora_apply`` (one of `LORA_APPLY`, the same function): "merged" onto the
  kernels first (`student_unet_params`; the cheaper form for a forward without gradients wrt the overlay, such
  as the EMA target's) or "factorised" per layer (`lora.factorised`: rank-r parameter gradients, the cheaper form
  for the online student's forward + backward, ``model.student_lora_apply``). guidance_embed_dim 0: the student
  does not see w."""
  if lora_apply not in LORA_APPLY:
    raise ValueError(f"unknown LoRA application '{lora_apply}'; allowed: {', '.join(LORA_APPLY)}")

  def student_fn(params: PyTree, z: Array, t: Array, cond: PyTree) -> Array:
    w_emb = consistency.guidance_embedding(cond["w"], guidance_embed_dim) if guidance_embed_dim else None

    def run(p: PyTree) -> Array:
      return pipeline_lib.unet_output(models.student, p, z, t, cond["text"], w_emb).astype(jnp.float32)

    if teacher_params is None or not is_lora_student(params):
      return run(params)
    if lora_apply == "merged":
      return run(student_unet_params(params, teacher_params, lora_alpha))
    with lora.factorised(params[STUDENT_LORA], lora_alpha):
      return run(student_base_params(params, teacher_params))

  return student_fn


def make_teacher_eps_fn(models: Models, teacher_params: PyTree, uncond_text: Array) -> Callable:
  """teacher_eps_fn(z, t, cond) -> eps with CFG in LCM form, eps_c + w (eps_c - eps_u) (notes section 2).

  uncond_text (B, L, D) or for SDXL a condition dict (`uncond_like`): the encoded empty prompt; cond = {"text":
  (B, L, D) or the SDXL dict, "w": (B,)}. One U-Net call on the
  batch [uncond; cond]; the output is converted to eps with the schedule (any prediction type).
  """
  eps_fn = pipeline_lib.make_eps_fn(models.teacher, teacher_params, models.schedule)

  def teacher_eps_fn(z: Array, t: Array, cond: PyTree) -> Array:
    return solvers.make_guided_eps_fn(eps_fn, cond["text"], uncond_text, cond["w"])(z, t)

  return teacher_eps_fn


def sampling_grid(config: ConfigDict) -> tuple[int, ...]:
  """The ascending grid the run's k-step student sampling picks from: `consistency.sampling_grid` of
  ``consistency.timestep_rule`` (DECISION), ``consistency.grid`` and ``solver.skip``."""
  c = config.consistency
  grid = consistency.sampling_grid(c.timestep_rule, c.grid, skip=config.solver.skip,
                                   num_ddim_timesteps=c.num_ddim_timesteps,
                                   num_train=config.schedule.num_train_timesteps)
  return tuple(int(t) for t in grid)


def student_timesteps(config: ConfigDict, num_steps: int) -> tuple[int, ...]:
  """The run's k-step student sampling timesteps (descending), on `sampling_grid`."""
  return tuple(int(t) for t in consistency.grid_timesteps(num_steps, np.asarray(sampling_grid(config))))


def student_pipeline(config: ConfigDict, models: Models) -> pipeline_lib.Pipeline:
  """The student's `scott_jax.pipeline.Pipeline` (no parameters): LCM settings of ``config.consistency``,
  k-step timesteps on `sampling_grid` (``consistency.timestep_rule``, DECISION) and the student's output kind
  (``consistency.student_output``)."""
  c = config.consistency
  return pipeline_lib.Pipeline(models.student, models.vae, models.text_encoder, models.tokenizer, models.schedule,
                               models.max_length, float(c.timestep_scaling), int(c.num_ddim_timesteps),
                               sampling_grid(config), c.student_output, models.text_encoder_2, models.tokenizer_2,
                               models.force_zeros_for_empty_prompt)


def frozen_sampling_params(frozen: PyTree) -> dict[str, PyTree]:
  """The frozen networks a sampler needs besides the U-Net: {"vae", "text_encoder"} (+ "text_encoder_2", SDXL)."""
  return {k: frozen[k] for k in ("vae", "text_encoder", "text_encoder_2") if k in frozen}


def make_sampler(config: ConfigDict, models: Models) -> Callable:
  """sample(student_state, frozen, input_ids (N, L) or SDXL (N, 2, L) (`Models.tokenize`), num_steps, key) ->
  uint8 images (N, H, W, 3) (host).

  `scott_jax.pipeline.make_sampler` (kind "student", one jitted sampler per step count) on `student_pipeline`
  at data.resolution with CFG scale train.sample_guidance_scale (w = g - 1) (a Gaussian student as
  ``sample.gaussian``); a LoRA state is merged first.
  """
  pipe = student_pipeline(config, models)
  samplers: dict[int, pipeline_lib.Sampler] = {}
  merge = jax.jit(lambda s, t: student_unet_params(s, t, config.model.student_lora_alpha))

  def sample(student: PyTree, frozen: PyTree, input_ids: Any, num_steps: int, key: Array) -> np.ndarray:
    if num_steps not in samplers:
      samplers[num_steps] = pipeline_lib.make_sampler(pipe, kind="student", steps=num_steps,
                                                      height=config.data.resolution, gaussian=config.sample.gaussian)
    unet = merge(student, frozen["unet"]) if is_lora_student(student) else student
    params = {"unet": unet, **frozen_sampling_params(frozen)}
    return np.asarray(samplers[num_steps](params, input_ids, key, config.train.sample_guidance_scale))

  return sample


