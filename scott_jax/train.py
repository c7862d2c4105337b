"""SCott training at Stable Diffusion scale (mode ``train``): train state, the jitted step, the loop.

One step (``make_train_step``), paper Eq. 1, 6, 7 and notes sections 2, 4, 5:

  z0 = VAE(images) (or precomputed latents), c = CLIP(tokens) (or precomputed text embeddings),
  w ~ U[w_min, w_max] per example, t_n on the 50-step DDIM grid, z_tn = alpha z0 + sigma eps,
  z_tm = Phi_SDE(teacher with CFG in LCM form, z_tn, t_n, t_m, h)        (no gradient),
  L_CD = d(f_theta(z_tn, t_n, c, w), sg(f_ema(z_tm, t_m, c, w))),
  L_student = L_CD + lambda_adv * L_G(D(f_theta(...))),   L_D = hinge(D(real), D(sg(fake))),

then one AdamW update of the student and one of the discriminator (each with global-norm clipping and warmup)
and the EMA update theta^- <- mu theta^- + (1 - mu) theta. The student is the teacher's U-Net with
``time_cond_proj_dim`` = guidance_embed_dim (the w embedding, zero-initialised projection, so it starts equal to
the teacher; guidance_embed_dim 0: no w embedding); the EMA target starts equal to the student. With
``model.student_lora_rank`` r >= 1 the student state is a LoRA overlay instead (LCM-LoRA style):
{"lora": rank-r overlay of the teacher's kernels (B = 0), "full": the parameters the teacher lacks, trained in
full (the guidance projection cond_proj; {} without it)}, merged onto the frozen teacher at every use
(`student_unet_params`); the EMA target has the same structure.

The train state (`TrainState`) holds only what changes: student, EMA, discriminator (LoRA + head), both optimizer
states, the step and the RNG key. The frozen networks (teacher U-Net, VAE, text encoder, the encoded empty
prompt) are a separate pytree argument ``frozen``: never donated, never checkpointed, reloaded from the
diffusers folder named by ``config.model.teacher_path``.

Batches are dicts with either ``images`` (B, H, W, 3) float32 in [-1, 1] and ``input_ids`` (B, L) int32, or
precomputed ``latents`` (B, h, w, C) (already multiplied by the VAE scaling factor), ``text_embeds`` (B, L, D)
and ``pooled_text_embeds`` (B, D).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.struct
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from scott_jax import checkpoint as ckpt_lib
from scott_jax import consistency, losses, parallel, solvers
from scott_jax import discriminator as disc_lib
from scott_jax import pipeline as pipeline_lib
from scott_jax.config import ConfigDict, ConfigError, ConfigPathError
from scott_jax.data import arrays
from scott_jax.schedules import NoiseSchedule

Array = jax.Array
PyTree = Any

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
LATENT_KEYS = ("latents", "text_embeds", "pooled_text_embeds")
STUDENT_LORA, STUDENT_FULL = "lora", "full"  # the two parts of a LoRA student state
IMAGE_KEYS = ("images", "input_ids")
METRICS_FILE = "metrics.jsonl"  # WORKDIR/metrics.jsonl: one JSON object of the logged scalars per log step


# ---------------------------------------------------------------------------------------------------------
# Models and state.

@dataclasses.dataclass(frozen=True)
class Models:
  """The networks as (stateless) Flax modules plus the schedule; parameters live elsewhere.

  teacher: the teacher U-Net (also the discriminator's base); student: the same architecture with the guidance
  embedding (``time_cond_proj_dim``); vae, text_encoder: frozen; tokenizer: a transformers CLIP tokenizer (host
  side); disc: the discriminator or None when the GAN is off.
  """

  teacher: Any
  student: Any
  vae: Any
  text_encoder: Any
  tokenizer: Any
  schedule: NoiseSchedule
  disc: disc_lib.Discriminator | None
  max_length: int


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and is checkpointed). ``disc``/``opt_disc`` are {} without GAN."""

  step: Array  # () int32, number of updates done
  student: PyTree
  ema: PyTree
  disc: PyTree
  opt_student: PyTree
  opt_disc: PyTree
  key: Array  # (2,) uint32 raw PRNG key


def _dtype(name: str) -> Any:
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype '{name}'; allowed: {', '.join(_DTYPES)}")
  return _DTYPES[name]


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
                 max_length: int) -> Models:
  """The Models around a teacher U-Net architecture (``UNetConfig``) and given VAE / text encoder modules.

  Teacher and student get ``config.model``'s dtype and `unet_options`; the student adds the guidance embedding
  (``time_cond_proj_dim``) and, a Gaussian student (``consistency.student_output``), twice the output channels
  (prediction, log-variance); the discriminator (GAN on) is built on the teacher module. Used by `load_models`
  (real weights) and `scott_jax.plan.abstract_models` (shapes only), so both build the same program.
  """
  from scott_jax.models.unet import UNet2DConditionModel

  dtype = _dtype(config.model.dtype)
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
                                  head_init=config.gan.head_init)
  schedule = NoiseSchedule.from_config(config.schedule)
  return Models(teacher, student, vae, text_encoder, tokenizer, schedule, disc, int(max_length))


def load_models(config: ConfigDict) -> tuple[Models, dict[str, PyTree]]:
  """Loads the teacher pipeline named by ``config.model`` -> (Models, frozen params pytree).

  frozen = {"unet", "vae", "text_encoder": params, "uncond_text": (1, L, D), "uncond_pooled": (1, D)} where the
  last two are the encoded empty prompt. A missing folder raises FileNotFoundError naming it.
  """
  from scott_jax.models import loading
  from scott_jax.models.clip_text import tokenize

  path = config.model.teacher_path
  if not path or not os.path.isdir(path):
    raise ConfigPathError(f"teacher folder config.model.teacher_path='{path}' does not exist; it must be a "
                            "diffusers-format Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/)")
  dtype = _dtype(config.model.dtype)
  parts = loading.load_pipeline(path, dtype=dtype, **unet_options(config))
  vae, vae_params = parts.vae, parts.vae_params
  if config.model.vae_path:
    if not os.path.isdir(config.model.vae_path):
      raise ConfigPathError(f"VAE folder config.model.vae_path='{config.model.vae_path}' does not exist")
    vae, vae_params = loading.load_vae(config.model.vae_path, dtype=dtype)
  check_schedule(config, dict(parts.scheduler_config))
  tokenizer = parts.tokenizer
  max_length = int(min(tokenizer.model_max_length, parts.text_encoder.config.max_position_embeddings))
  models = build_models(config, parts.unet.config, vae, parts.text_encoder, tokenizer, max_length)
  empty = jnp.asarray(tokenize(tokenizer, [""], max_length))
  out = parts.text_encoder.apply(parts.text_encoder_params, empty)
  frozen = {"unet": parts.unet_params, "vae": vae_params, "text_encoder": parts.text_encoder_params,
            "uncond_text": out.last_hidden_state, "uncond_pooled": out.pooler_output}
  return models, frozen


def make_optimizer(lr: float, optim: ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup to ``lr`` over optim.warmup_steps (then constant), after global-norm clipping."""
  if optim.warmup_steps > 0:
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, optim.warmup_steps),
                                     optax.constant_schedule(lr)], [optim.warmup_steps])
  else:
    schedule = optax.constant_schedule(lr)
  tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip),
                   optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay))
  return tx, schedule


CONV_OUT = "conv_out"  # the U-Net's output conv: twice the teacher's channels in a Gaussian student


def _student_layout(models: Models, teacher_params: PyTree) -> tuple[dict, dict, dict]:
  """Flat {path: (teacher leaf, spec)} of the parameters the student shares with the teacher, flat {path: spec}
  of the ones it adds (only the guidance projection ``cond_proj``) and flat {path: (teacher leaf, spec)} of the
  output conv of a Gaussian student (``conv_out`` kernel and bias with twice the teacher's output channels;
  empty for a point student); anything else raises."""
  from scott_jax.models import unet as unet_lib

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
  from scott_jax.models import lora

  m = config.model
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 3)
  base = _without_conv_out(teacher_params) if halves else teacher_params
  overlay = lora.init(key, base, tuple(m.student_lora_targets), m.student_lora_rank)
  return {STUDENT_LORA: overlay, STUDENT_FULL: traverse_util.unflatten_dict(zeros)}


def student_shapes(config: ConfigDict, models: Models, teacher_params: PyTree) -> PyTree:
  """`init_student_params`' shapes and dtypes (jax.ShapeDtypeStruct leaves); ``teacher_params`` may be abstract."""
  if config.model.student_lora_rank == 0:
    return jax.eval_shape(lambda p: init_student_params(models, p, config), teacher_params)
  from scott_jax.models import lora

  _, extra, halves = _student_layout(models, teacher_params)
  m = config.model
  base = _without_conv_out(teacher_params) if halves else teacher_params
  full = {**extra, **{p: jax.ShapeDtypeStruct(spec.shape, spec.dtype) for p, (_, spec) in halves.items()}}
  return {STUDENT_LORA: lora.init_shapes(base, tuple(m.student_lora_targets), m.student_lora_rank),
          STUDENT_FULL: traverse_util.unflatten_dict(full)}


def is_lora_student(student: PyTree) -> bool:
  """True for a LoRA student state (`init_student_params` with student_lora_rank >= 1)."""
  return isinstance(student, dict) and STUDENT_LORA in student


def student_unet_params(student: PyTree, teacher_params: PyTree, lora_alpha: float) -> PyTree:
  """The student's U-Net parameters {"params": ...} from its state: a full student as it is; a LoRA state as
  the teacher's parameters plus its "full" part with the overlay merged, W + (alpha / r) A B (`lora.merge`).
  Pure and jit-able (the train step calls it on every student and EMA use)."""
  if not is_lora_student(student):
    return student
  from scott_jax.models import lora

  flat = traverse_util.flatten_dict(teacher_params)
  flat.update(traverse_util.flatten_dict(student.get(STUDENT_FULL, {})))
  return lora.merge(traverse_util.unflatten_dict(flat), student[STUDENT_LORA], lora_alpha)


def _disc_example_shapes(models: Models, teacher_params: PyTree,
                         batch_shapes: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
  """ShapeDtypeStructs of the head's inputs (features, temb, pooled) for encoded batches of ``batch_shapes``."""
  latent, text, pooled = batch_shapes
  t = jax.ShapeDtypeStruct(latent.shape[:1], jnp.int32)
  feats, temb = models.disc.feature_shapes(teacher_params, latent, t, text)
  return feats, temb, jax.ShapeDtypeStruct(pooled.shape, jnp.float32)


def _assemble_state(config: ConfigDict, models: Models, student: PyTree, disc: PyTree) -> TrainState:
  """The initial state around given student and discriminator parameters ({} without GAN); traceable."""
  k_train = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  ema = jax.tree_util.tree_map(jnp.copy, student)
  tx_s, _ = make_optimizer(config.optim.student_lr, config.optim)
  opt_disc = {}
  if models.disc is not None:
    tx_d, _ = make_optimizer(config.optim.disc_lr, config.optim)
    opt_disc = tx_d.init(disc)
  return TrainState(step=jnp.zeros((), jnp.int32), student=student, ema=ema, disc=disc,
                    opt_student=tx_s.init(student), opt_disc=opt_disc, key=k_train)


def init_disc(config: ConfigDict, models: Models, frozen: PyTree, batch_spec: dict[str, Any]) -> PyTree:
  """A fresh discriminator ({} without GAN) for encoded batches of ``batch_spec``; host-side (not traceable)."""
  if models.disc is None:
    return {}
  shapes = _disc_example_shapes(models, frozen["unet"], encode_shapes(models, frozen, batch_spec))
  k_disc = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
  return models.disc.init(k_disc, frozen["unet"], *(jnp.zeros(s.shape, s.dtype) for s in shapes))


def init_state(config: ConfigDict, models: Models, frozen: PyTree, batch_spec: dict[str, Any],
               shardings: PyTree = None) -> TrainState:
  """The initial train state: student = EMA = teacher + zero guidance projection, fresh discriminator.

  ``batch_spec``: a batch (arrays or ShapeDtypeStructs) fixing the latent / text shapes the head is built for.
  ``shardings``: the state's shardings (`scott_jax.parallel.state_shardings`): the state is then assembled by a
  jit with those output shardings, so no device holds more than its shards (else on the default device).
  """
  disc = init_disc(config, models, frozen, batch_spec)
  if shardings is None:
    return _assemble_state(config, models, init_student_params(models, frozen["unet"], config), disc)
  if config.model.student_lora_rank:  # lora.init runs on the host (as the discriminator's): pass it in
    student = init_student_params(models, frozen["unet"], config)
    return jax.jit(lambda s, d: _assemble_state(config, models, s, d), out_shardings=shardings)(student, disc)
  return jax.jit(lambda f, d: _assemble_state(config, models, init_student_params(models, f["unet"], config), d),
                 out_shardings=shardings)(frozen, disc)


def abstract_state(config: ConfigDict, models: Models, frozen: PyTree, batch_spec: dict[str, Any]) -> TrainState:
  """`init_state`'s shapes and dtypes (jax.ShapeDtypeStruct leaves), computed without any weights."""
  disc = {}
  if models.disc is not None:
    shapes = _disc_example_shapes(models, frozen["unet"], encode_shapes(models, frozen, batch_spec))
    disc = models.disc.init_shapes(frozen["unet"], *shapes)
  student = student_shapes(config, models, frozen["unet"])
  return jax.eval_shape(lambda s, d: _assemble_state(config, models, s, d), student, disc)


# ---------------------------------------------------------------------------------------------------------
# The step.

def _check_batch(batch: dict[str, Any]) -> str:
  if all(k in batch for k in LATENT_KEYS):
    return "latents"
  if all(k in batch for k in IMAGE_KEYS):
    return "images"
  raise KeyError(f"a batch needs keys {IMAGE_KEYS} (images in [-1, 1] and token ids) or {LATENT_KEYS} "
                 f"(precomputed); got {sorted(batch)}")


def encode_batch(models: Models, frozen: PyTree, batch: dict[str, Array],
                 key: Array | None) -> tuple[Array, Array, Array]:
  """(latents z0 (B, h, w, C), text (B, L, D), pooled text (B, D)), all float32, from either batch kind.

  ``key`` samples the VAE posterior (None: its mean).
  """
  from scott_jax.models.vae import encode_to_latents

  if _check_batch(batch) == "latents":
    z0, text, pooled = (jnp.asarray(batch[k], jnp.float32) for k in LATENT_KEYS)
  else:
    z0 = encode_to_latents(models.vae, frozen["vae"], jnp.asarray(batch["images"]), key)
    out = models.text_encoder.apply(frozen["text_encoder"], jnp.asarray(batch["input_ids"], jnp.int32))
    text, pooled = out.last_hidden_state, out.pooler_output
  return (jax.lax.stop_gradient(z0.astype(jnp.float32)), jax.lax.stop_gradient(text.astype(jnp.float32)),
          jax.lax.stop_gradient(pooled.astype(jnp.float32)))


def encode_shapes(models: Models, frozen: PyTree, batch_spec: dict[str, Any]) -> tuple[Any, Any, Any]:
  """ShapeDtypeStructs of `encode_batch`'s outputs for a batch of ``batch_spec`` (arrays or structs)."""
  return jax.eval_shape(lambda f, b: encode_batch(models, f, b, None), frozen, batch_spec)


def make_student_fn(models: Models, guidance_embed_dim: int, teacher_params: PyTree | None = None,
                    lora_alpha: float = 1.0) -> Callable:
  """student_fn(params, z, t, cond) -> model output (float32); cond = {"text": (B, L, D), "w": (B,)}.

  ``params``: the student's U-Net parameters, or with ``teacher_params`` given any student state (a LoRA state
  is merged onto them, `student_unet_params`). guidance_embed_dim 0: the student does not see w."""

  def student_fn(params: PyTree, z: Array, t: Array, cond: PyTree) -> Array:
    if teacher_params is not None:
      params = student_unet_params(params, teacher_params, lora_alpha)
    w_emb = consistency.guidance_embedding(cond["w"], guidance_embed_dim) if guidance_embed_dim else None
    out = models.student.apply(params, z, t, cond["text"], timestep_cond=w_emb)
    return out.astype(jnp.float32)

  return student_fn


def make_teacher_eps_fn(models: Models, teacher_params: PyTree, uncond_text: Array) -> Callable:
  """teacher_eps_fn(z, t, cond) -> eps with CFG in LCM form, eps_c + w (eps_c - eps_u) (notes section 2).

  uncond_text (B, L, D): the encoded empty prompt; cond = {"text": (B, L, D), "w": (B,)}. One U-Net call on the
  batch [uncond; cond]; the output is converted to eps with the schedule (any prediction type).
  """
  schedule = models.schedule

  def eps_fn(z: Array, t: Array, text: Array) -> Array:
    out = models.teacher.apply(teacher_params, z, t, text).astype(jnp.float32)
    return schedule.to_eps(out, z, t)

  def teacher_eps_fn(z: Array, t: Array, cond: PyTree) -> Array:
    guided = solvers.make_guided_eps_fn(eps_fn, cond["text"], uncond_text, cond["w"])
    return guided(z, t)

  return teacher_eps_fn


def make_gradients(config: ConfigDict, models: Models) -> Callable:
  """gradients(state, batch, frozen) -> (student gradient, discriminator gradient ({} without GAN), metrics, next
  key): the part of `make_train_step` before the optimizers; pure.

  One pass of each network: the student's prediction x = f_theta(z_tn, t_n) by `jax.vjp`; L_CD and dL_CD/dx
  at x; with the GAN, one discriminator forward on the real and one on the fake sample (each by `jax.vjp`), whose
  pullbacks give both L_D's gradient for the discriminator and L_G's gradient dL_G/dx for the student; the
  student's gradient is the pullback of dL_CD/dx + lambda_eff dL_G/dx (Eq. 7, lambda_eff by `gan.weighting`
  and `gan.start_step`, `losses.adversarial_weight`).

  A Gaussian student (``consistency.student_output``, SCott v1): the vjp gives its (mean, logvar) at (z_tn, t_n),
  L_CD is `losses.gaussian_kl`(EMA target's Gaussian at (z_tm_hat, t_m) || student's) with
  ``consistency.var_floor``, and the discriminator sees a reparameterised draw x = mean + exp(logvar / 2) noise
  (noise from fold_in(k_cd, 3)), so dL_G/dx reaches both halves through the draw's pullback; lambda_eff's norms
  are taken over both halves' gradients.

  metrics: float32 scalars loss (student total), loss_cd, loss_g, loss_d, d_real, d_fake (mean logits),
  disc_accuracy (`losses.disc_accuracy`), grad_ratio = ||lambda_eff dL_G/dx|| / ||dL_CD/dx|| at the student's
  output, lambda_eff, grad_norm_disc (before clipping), lr_disc, w (mean guidance weight); a Gaussian student adds
  std_student and std_target (root mean variance of f over the batch, at t_n and of the target at t_m).
  """
  c = config
  schedule = models.schedule
  gan = models.disc is not None
  disc = models.disc
  _, lr_d = make_optimizer(c.optim.disc_lr, c.optim)
  solver_kwargs = solvers.solver_kwargs(c.solver.name, c.solver)
  cc = c.consistency
  gaussian = cc.student_output == "gaussian"

  def disc_logits(dparams: PyTree, frozen: PyTree, x: Array, t: Array, text: Array, pooled: Array) -> Array:
    t, text, pooled = disc.condition(t, text, pooled, frozen["uncond_text"], frozen["uncond_pooled"])
    return disc.apply(dparams, frozen["unet"], x, t, text, pooled)

  def gradients(state: TrainState, batch: dict[str, Array],
                frozen: PyTree) -> tuple[PyTree, PyTree, dict[str, Array], Array]:
    key, k_vae, k_w, k_cd = jax.random.split(state.key, 4)
    z0, text, pooled = encode_batch(models, frozen, batch, k_vae if c.model.vae_sample else None)
    b = z0.shape[0]
    w = jax.random.uniform(k_w, (b,), jnp.float32, cc.w_min, cc.w_max)
    cond = {"text": text, "w": w}
    uncond = jnp.broadcast_to(frozen["uncond_text"], text.shape).astype(text.dtype)
    student_fn = make_student_fn(models, cc.guidance_embed_dim, frozen["unet"], c.model.student_lora_alpha)
    make_f = losses.make_gaussian_consistency_fn if gaussian else losses.make_consistency_fn
    f = make_f(student_fn, schedule, timestep_scaling=cc.timestep_scaling)
    problem = losses.make_cd_target(
      f, make_teacher_eps_fn(models, frozen["unet"], uncond), schedule, solver=c.solver.name,
      solver_kwargs=solver_kwargs, skip=c.solver.skip, h=c.solver.h, grid=cc.grid,
      num_ddim_timesteps=cc.num_ddim_timesteps)(state.ema, z0, cond, k_cd)
    t_n = problem["t_n"]

    # Eq. 1: the student's prediction and the consistency loss's gradient at it.
    if gaussian:
      # SCott v1: the student's Gaussian (mean, logvar), the KL to the target's, and the GAN's sample: a
      # reparameterised draw x = mean + std * noise, whose pullback carries dL_G/dx to both halves.
      out, pull_student = jax.vjp(lambda p: f(p, problem["z_tn"], t_n, cond)[0], state.student)
      target_mean, target_logvar = problem["target"]
      loss_cd, g_cd = jax.value_and_grad(lambda o: jnp.mean(
        losses.gaussian_kl(target_mean, target_logvar, o[0], o[1], cc.var_floor)))(out)
      noise = jax.random.normal(jax.random.fold_in(k_cd, 3), out[0].shape, out[0].dtype)
      x_fake, pull_draw = jax.vjp(lambda o: consistency.gaussian_draw(o[0], o[1], noise), out)
      metrics = {"loss_cd": loss_cd, "w": jnp.mean(w), "std_student": jnp.sqrt(jnp.mean(jnp.exp(out[1]))),
                 "std_target": jnp.sqrt(jnp.mean(jnp.exp(target_logvar)))}
    else:
      x_fake, pull_student = jax.vjp(lambda p: f(p, problem["z_tn"], t_n, cond)[0], state.student)
      loss_cd, g_cd = jax.value_and_grad(
        lambda x: jnp.mean(losses.distance(x, problem["target"], cc.distance, cc.huber_c)))(x_fake)
      metrics = {"loss_cd": loss_cd, "w": jnp.mean(w)}

    g_x, g_disc = g_cd, {}
    if gan:
      # Eq. 6: one discriminator forward per side; the fake side's pullback serves L_D and L_G.
      def on_fake(dparams: PyTree, x: Array) -> Array:
        _, _, xf, tf = losses.disc_inputs(z0, x, t_n, problem["eps"], schedule, c.gan.disc_time)
        return disc_logits(dparams, frozen, xf, tf, text, pooled)

      def on_real(dparams: PyTree) -> Array:
        xr, tr, _, _ = losses.disc_inputs(z0, x_fake, t_n, problem["eps"], schedule, c.gan.disc_time)
        return disc_logits(dparams, frozen, jax.lax.stop_gradient(xr), tr, text, pooled)

      fake, pull_fake = jax.vjp(on_fake, state.disc, x_fake)
      real, pull_real = jax.vjp(on_real, state.disc)
      loss_d, (ct_real, ct_fake) = jax.value_and_grad(losses.hinge_d_loss, argnums=(0, 1))(real, fake)
      g_disc = jax.tree_util.tree_map(jnp.add, pull_real(ct_real)[0], pull_fake(ct_fake)[0])
      loss_g, ct_g = jax.value_and_grad(losses.hinge_g_loss)(fake)
      g_adv = pull_fake(ct_g)[1]  # dL_G/dx; its parameter half is dead code XLA removes
      if gaussian:  # at the student's output (mean, logvar), through the draw; the weighting on both halves
        g_adv = pull_draw(g_adv)[0]
        g_cd_flat, g_adv_flat = (jnp.concatenate([g[0].ravel(), g[1].ravel()]) for g in (g_cd, g_adv))
      else:
        g_cd_flat, g_adv_flat = g_cd, g_adv
      lam = losses.adversarial_weight(g_cd_flat, g_adv_flat, c.gan.lambda_adv, c.gan.weighting, c.gan.max_weight)
      lam = jnp.where(state.step >= c.gan.start_step, lam, 0.0)
      g_x = jax.tree_util.tree_map(lambda a, b: a + lam * b, g_cd, g_adv)
      metrics.update(loss_g=loss_g, loss=losses.total_student_loss(loss_cd, loss_g, lam), loss_d=loss_d,
                     d_real=jnp.mean(real), d_fake=jnp.mean(fake), disc_accuracy=losses.disc_accuracy(real, fake),
                     grad_ratio=jnp.linalg.norm(lam * g_adv_flat) / (jnp.linalg.norm(g_cd_flat) + 1e-12),
                     lambda_eff=lam, grad_norm_disc=optax.tree.norm(g_disc), lr_disc=lr_d(state.step))
    else:
      metrics.update(loss_g=jnp.zeros(()), loss=loss_cd)
    if gaussian:
      (g_student,) = pull_student(jax.tree_util.tree_map(lambda g, o: g.astype(o.dtype), g_x, out))
    else:
      (g_student,) = pull_student(g_x.astype(x_fake.dtype))
    return g_student, g_disc, metrics, key

  return gradients


def make_train_step(config: ConfigDict, models: Models) -> Callable:
  """train_step(state, batch, frozen) -> (new state, metrics): pure; jit it with ``donate_argnums=(0,)``.

  The gradients of `make_gradients`, then one AdamW update of the student and one of the discriminator and the
  EMA update theta^- <- mu theta^- + (1 - mu) theta. metrics: `make_gradients`' plus grad_norm_student (before
  clipping) and lr_student.
  """
  gradients = make_gradients(config, models)
  tx_s, lr_s = make_optimizer(config.optim.student_lr, config.optim)
  tx_d, _ = make_optimizer(config.optim.disc_lr, config.optim)
  mu = config.consistency.ema_decay

  def train_step(state: TrainState, batch: dict[str, Array], frozen: PyTree) -> tuple[TrainState, dict[str, Array]]:
    g_student, g_disc, metrics, key = gradients(state, batch, frozen)
    updates, opt_student = tx_s.update(g_student, state.opt_student, state.student)
    student = optax.apply_updates(state.student, updates)
    ema = jax.tree_util.tree_map(lambda e, p: (mu * e + (1.0 - mu) * p).astype(e.dtype), state.ema, student)
    new_disc, opt_disc = state.disc, state.opt_disc
    if models.disc is not None:
      d_updates, opt_disc = tx_d.update(g_disc, state.opt_disc, state.disc)
      new_disc = optax.apply_updates(state.disc, d_updates)
    metrics = dict(metrics, grad_norm_student=optax.tree.norm(g_student), lr_student=lr_s(state.step))
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    new_state = TrainState(step=state.step + 1, student=student, ema=ema, disc=new_disc, opt_student=opt_student,
                           opt_disc=opt_disc, key=key)
    return new_state, metrics

  return train_step


# ---------------------------------------------------------------------------------------------------------
# Sampling during training: the student pipeline of `scott_jax.pipeline` on the run's models.

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
                               sampling_grid(config), c.student_output)


def make_sampler(config: ConfigDict, models: Models) -> Callable:
  """sample(student_state, frozen, input_ids (N, L), num_steps, key) -> uint8 images (N, H, W, 3) (host).

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
    params = {"unet": unet, "vae": frozen["vae"], "text_encoder": frozen["text_encoder"]}
    return np.asarray(samplers[num_steps](params, input_ids, key, config.train.sample_guidance_scale))

  return sample


# ---------------------------------------------------------------------------------------------------------
# Data.

def make_source(config: ConfigDict) -> arrays.ArraySource:
  """The in-memory source of ``data.source = "synthetic"``: global batches of train.batch_size, batch k a pure
  function of (seed, k). The other sources are read by `scott_jax.data.make_pipeline` (see `make_data`)."""
  d = config.data
  if d.source != "synthetic":
    raise ValueError(f"make_source builds only the in-memory 'synthetic' source; data.source '{d.source}' is read "
                     "by scott_jax.data.make_pipeline (train.make_data)")
  images, captions = arrays.synthetic(d.num_examples, d.resolution, config.seed)
  return arrays.ArraySource(images, captions, config.train.batch_size, config.seed)


def prepare_batch(raw: dict[str, Any], models: Models) -> dict[str, np.ndarray]:
  """Host side: uint8 images -> float32 [-1, 1]; captions -> token ids (B, max_length) int32."""
  from scott_jax.models.clip_text import tokenize

  images = np.asarray(raw["images"], np.float32) / 127.5 - 1.0
  return {"images": images, "input_ids": tokenize(models.tokenizer, raw["captions"], models.max_length)}


class ArrayBatches(Iterator[dict[str, np.ndarray]]):
  """This process's rows of an `arrays.ArraySource`'s global batches, prepared (`prepare_batch`), behind the
  interface the loop uses of `scott_jax.data.pipeline.Pipeline`: next, ``batches``, get_state / set_state, close.

  Process i of n takes rows [i b, (i + 1) b) of every global batch (b = batch size / n), so every process's
  state is the same (step, seed, num_examples, batch_size) dict.
  """

  def __init__(self, source: arrays.ArraySource, models: Models, global_batch: int) -> None:
    if source.batch_size != global_batch:
      raise ValueError(f"the in-memory source's batch_size {source.batch_size} != train.batch_size {global_batch} "
                       "(it must yield global batches)")
    n = parallel.local_batch_size(global_batch)
    self._rows = slice(jax.process_index() * n, (jax.process_index() + 1) * n)
    self._iter = source.iterator()
    self.models = models

  @property
  def batches(self) -> int:
    """Batches produced so far (over resumptions)."""
    return self._iter.step

  def __next__(self) -> dict[str, np.ndarray]:
    raw = next(self._iter)
    return prepare_batch({"images": raw["images"][self._rows], "captions": raw["captions"][self._rows]},
                         self.models)

  def get_state(self) -> dict[str, int]:
    return self._iter.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._iter.set_state(state)

  def close(self) -> None:
    pass


def make_data(config: ConfigDict, models: Models, source: Any = None) -> Any:
  """This process's stream of prepared batches for the loop (next, ``batches``, get_state / set_state, close).

  ``source``: None -> ``config.data`` (synthetic: `make_source` in memory; folder / tar / tfds / latent_cache:
  `scott_jax.data.make_pipeline`, sharded by process); an `arrays.ArraySource` (or anything with
  ``iterator()``) of global batches -> `ArrayBatches`; a random-access source (``len`` and ``[i]`` -> {"image",
  "caption"}, e.g. `scott_jax.data.sources.InMemorySource`) -> make_pipeline over it. Batches hold "images"
  float32 (b, R, R, 3) in [-1, 1] and "input_ids" int32 (b, L), or the latent cache's arrays; b = train.batch_size
  / process count.
  """
  from scott_jax.data import pipeline as data_pipeline

  if source is None and config.data.source == "synthetic":
    source = make_source(config)
  if source is not None and hasattr(source, "iterator"):
    return ArrayBatches(source, models, config.train.batch_size)
  return data_pipeline.make_pipeline(config.data, batch_size=parallel.local_batch_size(config.train.batch_size),
                                     seed=config.seed, tokenizer=models.tokenizer, max_length=models.max_length,
                                     source=source)


def global_batch_spec(local_batch: dict[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of the global batch of which ``local_batch`` is this process's part (leading dimension
  times the process count)."""
  n = jax.process_count()
  return {k: jax.ShapeDtypeStruct((np.shape(v)[0] * n, *np.shape(v)[1:]), np.asarray(v).dtype)
          for k, v in local_batch.items()}


def _data_state_to_save(data: Any) -> Any:
  """The data state to checkpoint: this process's, or every process's ({"processes": [...]}, a collective)."""
  if jax.process_count() == 1:
    return data.get_state()
  return {"processes": parallel.allgather_json(data.get_state())}


def _restore_data_state(data: Any, saved: Any) -> None:
  n = jax.process_count()
  if n > 1:
    if not isinstance(saved, dict) or len(saved.get("processes", ())) != n:
      raise ValueError(f"the checkpoint's data state was not saved by {n} processes: {str(saved)[:200]}")
    saved = saved["processes"][jax.process_index()]
  data.set_state(saved)


# ---------------------------------------------------------------------------------------------------------
# The loop.

def _check_finite(step: int, metrics: dict[str, Any]) -> dict[str, float]:
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  bad = {k: v for k, v in values.items() if not math.isfinite(v)}
  if bad:
    raise FloatingPointError(f"non-finite training metrics at step {step}: {bad}")
  return values


def _truncate_metrics(path: str, step: int) -> None:
  """Drops the entries of a metrics.jsonl past ``step`` (a run resumed from checkpoint ``step`` logs them again)."""
  if not os.path.isfile(path):
    return
  with open(path) as fh:
    lines = [ln for ln in fh if ln.strip()]
  keep = []
  for ln in lines:
    try:
      if json.loads(ln)["step"] <= step:
        keep.append(ln)
    except (json.JSONDecodeError, KeyError):  # a line cut by a kill mid-write
      continue
  with open(path, "w") as fh:
    fh.writelines(keep)


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s"


def _mib(n: int) -> str:
  return f"{n / 2**20:.2f} MiB"


def train(config: ConfigDict, workdir: str, source: Any = None) -> TrainState:
  """Trains (or resumes) under ``workdir``: checkpoints in WORKDIR/checkpoints, metrics (clu), sample PNGs in
  WORKDIR/samples. Returns the final train state. SIGTERM saves a checkpoint and returns early.

  The step runs on the mesh of ``config.mesh`` over all devices of all processes (`scott_jax.parallel`; the
  distributed runtime is started first when the environment asks for it): the train state and the frozen models
  are sharded by the config's rules, each process feeds its part of every global batch of train.batch_size.
  Metrics, logs, config.json and sample grids come from process 0; every process saves its checkpoint shards.
  A run that reaches train.num_steps writes WORKDIR/train_done.json (the last step) after its last checkpoint;
  a run that starts removes it first (`scott_jax.checkpoint.write_train_done`; the eval job stops on it).
  ``source``: the data instead of ``config.data`` (see `make_data`), e.g. an in-memory `arrays.ArraySource`.
  A mesh that does not fit the devices raises `parallel.MeshError` (a ConfigError) before anything is loaded.
  """
  tc = config.train
  parallel.initialize_distributed(config.mesh)  # before any other JAX computation
  mesh = parallel.make_mesh(config.mesh)  # a config error: before anything is written, loaded or imported

  from clu import metric_writers, periodic_actions  # (clu imports TensorFlow, which logs to stderr)

  from scott_jax.models.clip_text import tokenize

  primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if primary:
    if ckpt_lib.remove_train_done(workdir):
      logging.info("Removed %s of an earlier finished run: training continues.", ckpt_lib.TRAIN_DONE)
    with open(os.path.join(workdir, "config.json"), "w") as fh:
      fh.write(config.to_json_best_effort(indent=2))
  t_start = time.time()
  models, frozen = load_models(config)
  logging.info("Loaded the teacher from %s in %.1f s.", config.model.teacher_path, time.time() - t_start)
  data = make_data(config, models, source)
  fresh_data_state = data.get_state()
  batch_spec = global_batch_spec(next(data))  # GLOBAL shapes; the batch is read again after set_state below
  if "images" in batch_spec and batch_spec["images"].shape[1] % models.vae.config.downsample_factor:
    raise ValueError(f"image resolution {batch_spec['images'].shape[1]} is not a multiple of the VAE's "
                     f"downsampling factor {models.vae.config.downsample_factor}")

  abstract = abstract_state(config, models, frozen, batch_spec)
  state_sh, frozen_sh, batch_sh = parallel.shardings_for(config.mesh, mesh, abstract, frozen, batch_spec)
  sample_frozen = None  # multi-process sampling runs on process 0 from host copies (the state is global)
  if tc.sample_every and jax.process_count() > 1:
    needed = ("vae", "text_encoder") + (("unet",) if config.model.student_lora_rank else ())  # LoRA: its base
    sample_frozen = jax.device_get({k: frozen[k] for k in needed})
  frozen = parallel.put_tree(frozen, frozen_sh)
  checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), max_to_keep=tc.keep_checkpoints,
                                       save_every=tc.checkpoint_every)
  restored = checkpointer.restore_latest(parallel.with_shardings(abstract, state_sh))
  if restored is None:
    state = init_state(config, models, frozen, batch_spec, state_sh)
    data.set_state(fresh_data_state)
    if tc.save_initial:  # the untrained student as step 0 (a valid resume point: no batch consumed yet)
      checkpointer.save(0, state, data_state=_data_state_to_save(data), force=True)
    logging.info("Starting from the teacher's weights (no checkpoint in %s).", checkpointer.directory)
  else:
    step, state, data_state = restored
    _restore_data_state(data, data_state)
    if int(state.step) != step or data.batches != step:
      raise ValueError(f"checkpoint step {step} holds state step {int(state.step)} and data batch count "
                       f"{data.batches}")
    logging.info("Resumed from checkpoint step %d.", step)
  start = int(state.step)
  if primary:
    _truncate_metrics(os.path.join(workdir, METRICS_FILE), start)
  shape = dict(zip(mesh.axis_names, (int(n) for n in mesh.devices.shape), strict=True))
  state_local = parallel.bytes_per_device(abstract, state_sh)
  state_total = parallel.bytes_per_device(abstract, jax.tree.map(lambda _: parallel.replicated(mesh), abstract))
  logging.info("Mesh %s on %d devices, %d process(es); train state bytes per device %d of %d (%s of %s), frozen "
               "models %s per device; batch %d, %d per process.", shape, mesh.devices.size, jax.process_count(),
               state_local, state_total, _mib(state_local), _mib(state_total),
               _mib(parallel.bytes_per_device(frozen, frozen_sh)), tc.batch_size,
               parallel.local_batch_size(tc.batch_size))

  step_fn = parallel.jit_train_step(make_train_step(config, models), mesh, state_sh, batch_sh, frozen_sh)
  t_compile = time.time()
  compiled = step_fn.lower(parallel.with_shardings(abstract, state_sh), parallel.with_shardings(batch_spec, batch_sh),
                           parallel.with_shardings(frozen, frozen_sh)).compile()
  logging.info("Compiled the train step in %.1f s (%.1f s since start).", time.time() - t_compile,
               time.time() - t_start)
  sampler = make_sampler(config, models) if tc.sample_every else None
  sample_ids = tokenize(models.tokenizer, list(tc.sample_prompts), models.max_length)

  writer = metric_writers.create_default_writer(workdir, just_logging=not primary)
  report = periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=writer)
  pending: tuple[int, Any] | None = None
  stopped = False
  t_last, step_last = time.time(), start
  with ckpt_lib.PreemptionGuard() as guard:
    for step in range(start + 1, tc.num_steps + 1):
      state, metrics = compiled(state, parallel.make_global_batch(next(data), batch_sh), frozen)
      if pending is not None:
        _check_finite(*pending)
      pending = (step, metrics)
      report(step)
      stop = guard.should_stop(step)
      if step % tc.log_every == 0 or step == tc.num_steps or stop:
        values = _check_finite(*pending)
        now = time.time()
        sps = (step - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        scalars = dict(values, steps_per_sec=sps, images_per_sec=sps * tc.batch_size)
        writer.write_scalars(step, scalars)
        if primary:
          with open(os.path.join(workdir, METRICS_FILE), "a") as fh:
            fh.write(json.dumps({"step": step, **scalars}) + "\n")
        gan_text = ""
        if "loss_d" in values:
          gan_text = (f" g {values['loss_g']:.4f} d {values['loss_d']:.4f} acc {values['disc_accuracy']:.3f} "
                      f"ratio {values['grad_ratio']:.3g}")
        logging.info("step %d/%d (%.1f%%) | %.3f steps/s, %.2f images/s | loss %.5f cd %.5f%s | ETA %s",
                     step, tc.num_steps, 100.0 * step / tc.num_steps, sps, sps * tc.batch_size, values["loss"],
                     values["loss_cd"], gan_text, _format_eta((tc.num_steps - step) / max(sps, 1e-9)))
      if sampler is not None and (step % tc.sample_every == 0 or step == tc.num_steps):
        if sample_frozen is None:
          params, vae_frozen = state.student, frozen
        else:  # every process takes part in the gather; process 0 samples on its own devices
          params, vae_frozen = parallel.gather_tree(state.student), sample_frozen
        if primary:
          for k in tc.sample_steps:
            images = sampler(params, vae_frozen, sample_ids, k, jax.random.PRNGKey(tc.sample_seed))
            pipeline_lib.write_grid(os.path.join(workdir, "samples", f"step{step:07d}_{k}step.png"), images)
      if checkpointer.should_save(step) or step == tc.num_steps or stop:
        _check_finite(*pending)
        checkpointer.save(step, state, data_state=_data_state_to_save(data), force=True)
      if stop:
        logging.warning("Stopped by signal after step %d; checkpoint saved.", step)
        stopped = True
        break
  if pending is not None:
    _check_finite(*pending)
  writer.flush()
  checkpointer.close()
  data.close()
  if not stopped:
    logging.info("Training done: %d steps.", int(state.step))
    if primary:  # the checkpointer is closed: the last checkpoint is final
      ckpt_lib.write_train_done(workdir, int(state.step), num_steps=tc.num_steps)
  return state


def run_train(config: ConfigDict, workdir: str) -> TrainState:
  """Mode ``train`` (scott_jax.main)."""
  return train(config, workdir)
