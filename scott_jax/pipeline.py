"""Text-to-image with the distilled student (multistep consistency sampling) or the teacher (any solver, CFG).

A `Pipeline` holds the Flax modules (U-Net, VAE, CLIP text encoder), the host tokenizer and the noise schedule;
parameters live apart in a dict ``{"unet", "vae", "text_encoder"}`` (each a ``{"params": ...}`` tree).
`make_sampler` returns ONE jitted function per (sampler kind, timesteps, resolution, output) that runs the
whole generation on device, text encoder -> sampling loop (a lax.scan) -> VAE decode:

  sample(params, input_ids (B, L) int32, key, guidance_scale, latents=None, noises=None) -> images (B, H, W, 3)

uint8 (``output="uint8"``) or float32 in [0, 1] (``output="float"``, diffusers' ``output_type="np"``); jax
caches one executable per batch shape. ``guidance_scale`` is the CFG scale g (a traced scalar, so changing it
does not recompile): the student gets w = g - 1 through its guidance embedding (notes section 2), the teacher
uses eps_u + g (eps_c - eps_u) with the encoded empty prompt as the unconditional input.

Student sampling (notes section 6, diffusers `LCMScheduler`): timesteps `lcm_timesteps(k)` ([999], [999, 499],
[999, 759, 499, 259] for 1, 2, 4 steps), k points of the pipeline's ``sampling_grid`` when it has one
(`consistency.grid_timesteps`; a training run's grid, ``consistency.timestep_rule``) or any descending list;
x0 = f_theta(z_t, t, c, w) (LCM boundary scalings; a U-Net without ``time_cond_proj_dim``, an LCM-LoRA style
student, does not see w); between steps z_t' = alpha_t' x0 + sigma_t' xi. The initial latents (B, h, w, C) and
the noises xi
(K - 1, B, h, w, C) are drawn from ``key`` unless given explicitly (tests feed the same draws to diffusers).
A Gaussian student (SCott v1, ``Pipeline.student_output = "gaussian"``: the U-Net's output channels are the
prediction and a log-variance) takes x0 at every step as a draw from its Gaussian (``make_sampler(gaussian=
"sample")``, noise from fold_in(the renoising key, 1)) or as its mean (``"mean"``).

Teacher sampling: `scott_jax.solvers.sample` with any registered solver (ddim eta, er_sde, dpmpp_2m, addim) on
``solvers.ddim_timesteps`` (diffusers' spacings) ending with the jump to clean data.

SDXL (`Pipeline.is_sdxl`: ``text_encoder_2`` and ``tokenizer_2`` set): `Pipeline.tokenize` gives (B, 2, L) ids
(tokenizer, tokenizer_2), params hold "text_encoder_2" too, and the U-Net's condition is `sdxl_condition` of both
encoders (`SDXLTextEncoders`) with time ids original = target = the sampled size and crop (0, 0); the
teacher's unconditional input is diffusers' (zeros with ``force_zeros_for_empty_prompt``).

Loading: `load_diffusers(folder)` (a diffusers Stable Diffusion folder: the teacher, or a student exported by
`scott_jax.export`), `load_exported(folder)` (the Flax export of `scott_jax.export`, no training code needed).
``--mode sample`` (`run_sample`) writes PNGs and grids into WORKDIR/samples and prints seconds per image.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scott_jax import consistency, solvers
from scott_jax.choices import SAMPLER_KINDS
from scott_jax.models import loading
from scott_jax.models.clip_text import SDXLTextMixin, tokenize
from scott_jax.models.unet import add_time_ids
from scott_jax.models.vae import decode_latents
from scott_jax.schedules import NoiseSchedule

Array = jax.Array
PyTree = Any

OUTPUTS = ("uint8", "float")


@dataclasses.dataclass(frozen=True)
class Pipeline(SDXLTextMixin):
  """Flax modules of a Stable Diffusion pipeline, the tokenizer and the schedule (no parameters).

  unet: the student (with ``time_cond_proj_dim``, the guidance embedding) or a plain teacher U-Net;
  timestep_scaling, original_steps: the LCM boundary scaling and the 50-step grid of `lcm_timesteps`;
  sampling_grid: ascending training timesteps that k-step student sampling picks from (`consistency.grid_timesteps`);
  () = LCM's grid of ``original_steps`` (diffusers' LCMScheduler); student_output: "point" or "gaussian" (SCott
  v1: the U-Net's output channels are (prediction, log-variance), `consistency.gaussian_consistency_output`).
  SDXL: text_encoder_2 (`CLIPTextModelWithProjection`), tokenizer_2 and the folder's force_zeros_for_empty_prompt.
  """

  unet: Any
  vae: Any
  text_encoder: Any
  tokenizer: Any
  schedule: NoiseSchedule
  max_length: int
  timestep_scaling: float = 10.0
  original_steps: int = 50
  sampling_grid: tuple[int, ...] = ()
  student_output: str = "point"
  text_encoder_2: Any = None
  tokenizer_2: Any = None
  force_zeros_for_empty_prompt: bool = False


  @property
  def guidance_embed_dim(self) -> int | None:
    return self.unet.config.time_cond_proj_dim

  @property
  def vae_factor(self) -> int:
    return self.vae.config.downsample_factor

  def tokenize(self, prompts: str | Sequence[str]) -> np.ndarray:
    """Prompts -> token ids (B, max_length) int32 (padded, truncated), as diffusers' pipelines; SDXL: (B, 2,
    max_length), tokenizer's then tokenizer_2's."""
    ids = tokenize(self.tokenizer, prompts, self.max_length)
    if not self.is_sdxl:
      return ids
    return np.stack([ids, tokenize(self.tokenizer_2, prompts, self.max_length)], axis=1)


def text_max_length(tokenizer: Any, text_encoder: Any) -> int:
  return int(min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings))


def from_components(parts: Any, *, timestep_scaling: float = 10.0, original_steps: int = 50,
                    schedule: NoiseSchedule | None = None) -> tuple[Pipeline, dict[str, PyTree]]:
  """(Pipeline, params) from `scott_jax.models.loading.StableDiffusionComponents`; the schedule defaults to the
  folder's scheduler config (beta schedule, prediction type)."""
  schedule = schedule or NoiseSchedule.from_config(parts.scheduler_config)
  max_length = text_max_length(parts.tokenizer, parts.text_encoder)
  sdxl = {}
  if parts.is_sdxl:
    max_length = min(max_length, text_max_length(parts.tokenizer_2, parts.text_encoder_2))
    sdxl = dict(text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2,
                force_zeros_for_empty_prompt=bool(parts.force_zeros_for_empty_prompt))
  pipe = Pipeline(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, schedule, max_length,
                  float(timestep_scaling), int(original_steps), **sdxl)
  params = {"unet": parts.unet_params, "vae": parts.vae_params, "text_encoder": parts.text_encoder_params}
  if parts.is_sdxl:
    params["text_encoder_2"] = parts.text_encoder_2_params
  return pipe, params


def load_diffusers(path: str, dtype: str = "float32", **unet_kwargs: Any) -> tuple[Pipeline, dict[str, PyTree]]:
  """A diffusers-format folder (the teacher, or a student saved by `scott_jax.export`) -> (Pipeline, params).

  An LCMScheduler config supplies ``timestep_scaling`` and ``original_inference_steps``."""
  parts = loading.load_pipeline(path, dtype=loading.compute_dtype(dtype), **unet_kwargs)
  sc = parts.scheduler_config
  return from_components(parts, timestep_scaling=float(sc.get("timestep_scaling", 10.0)),
                         original_steps=int(sc.get("original_inference_steps", 50)))


# ---------------------------------------------------------------------------------------------------------
# Timesteps.

def student_timesteps(steps: int | Sequence[int], original_steps: int = 50, num_train: int = 1000,
                      grid: Sequence[int] = ()) -> np.ndarray:
  """Student sampling timesteps (K,) int64, descending: an int k -> `consistency.grid_timesteps(k, grid)`, or
  `consistency.lcm_timesteps(k)` without a grid; a list is taken as given after checking it is strictly
  descending within [0, num_train)."""
  if isinstance(steps, (int, np.integer)):
    if len(grid):
      return consistency.grid_timesteps(int(steps), np.asarray(grid, np.int64))
    return consistency.lcm_timesteps(int(steps), original_steps, num_train)
  ts = np.asarray(list(steps), np.int64)
  if ts.ndim != 1 or ts.size == 0 or np.any(np.diff(ts) >= 0) or ts.min() < 0 or ts.max() >= num_train:
    raise ValueError(f"timesteps must be a non-empty strictly descending list in [0, {num_train}), got "
                     f"{list(steps)}")
  return ts


def teacher_timesteps(steps: int | Sequence[int], num_train: int = 1000, spacing: str = "leading",
                      offset: int = 1) -> np.ndarray:
  """Teacher timesteps (K,) int64: an int k -> `solvers.ddim_timesteps(k, spacing, offset)` (SD1.5: leading,
  steps_offset 1); a list as given (strictly descending)."""
  if isinstance(steps, (int, np.integer)):
    return solvers.ddim_timesteps(int(steps), num_train, spacing=spacing, offset=offset)
  return student_timesteps(steps, num_train, num_train)


# ---------------------------------------------------------------------------------------------------------
# Pure pieces (jit-able).

def encode_prompts(pipe: Pipeline, text_params: PyTree, input_ids: Array) -> Array:
  """Token ids (B, L) -> the U-Net's context (B, L, D) float32 (CLIP last hidden state, diffusers' default)."""
  return pipe.text_encoder.apply(text_params, jnp.asarray(input_ids, jnp.int32)).last_hidden_state


def encode_condition(pipe: Pipeline, params: Mapping[str, PyTree], input_ids: Array, height: int, width: int,
                     negative: bool = False) -> Array | dict[str, Array]:
  """The U-Net's text condition for token ids from `Pipeline.tokenize`: `encode_prompts` of (B, L) ids, or for
  SDXL ((B, 2, L) ids; params with "text_encoder" and "text_encoder_2") `sdxl_condition` of both encoders at
  time ids original = target = (height, width), crop (0, 0). ``negative``: the ids are the empty prompt and the
  result the unconditional input of CFG (SDXL: `SDXLTextEncoders.encode_negative`, zeros with
  force_zeros_for_empty_prompt)."""
  if not pipe.is_sdxl:
    return encode_prompts(pipe, params["text_encoder"], input_ids)
  ids = jnp.asarray(input_ids, jnp.int32)
  if ids.ndim != 3 or ids.shape[1] != 2:
    raise ValueError(f"an SDXL pipeline takes token ids (B, 2, L) (Pipeline.tokenize), got {ids.shape}")
  enc = pipe.text_encoders
  if negative:
    states, pooled = enc.encode_negative(params, ids[:, 0], ids[:, 1], negative_given=False)
  else:
    states, pooled = enc.encode(params, ids[:, 0], ids[:, 1])
  return sdxl_condition(states, pooled, add_time_ids((height, width), (0, 0), (height, width)))


def decode(pipe: Pipeline, vae_params: PyTree, latents: Array) -> Array:
  """Diffusion latents (B, h, w, C) -> images (B, H, W, 3) float32 in [0, 1] (diffusers' postprocess)."""
  img = decode_latents(pipe.vae, vae_params, latents)
  return jnp.clip(img / 2.0 + 0.5, 0.0, 1.0)


def to_uint8(images01: Array) -> Array:
  """Float images in [0, 1] -> uint8, round half to even of x * 255 (diffusers' numpy_to_pil rounds x*255)."""
  return jnp.round(images01 * 255.0).astype(jnp.uint8)


def apply_unet(pipe: Pipeline, unet_params: PyTree, z: Array, t: Array, text: Array | Mapping[str, Array],
               timestep_cond: Array | None = None) -> Array:
  """``pipe.unet``'s output for latents z (B, h, w, C) at t (B,) under the text condition ``text`` (`unet_output`)."""
  return unet_output(pipe.unet, unet_params, z, t, text, timestep_cond)


def unet_output(unet: Any, unet_params: PyTree, z: Array, t: Array, text: Array | Mapping[str, Array],
                timestep_cond: Array | None = None) -> Array:
  """A U-Net module's output for latents z (B, h, w, C) at t (B,) under the text condition ``text``: the prompt
  states (B, L, D), or for an SDXL U-Net a dict ``{"states": (B, L, D), "text_embeds": (B, P), "time_ids": (B,
  n)}`` (`sdxl_condition`)."""
  if isinstance(text, Mapping):
    return unet.apply(unet_params, z, t, text["states"], timestep_cond, text["text_embeds"], text["time_ids"])
  return unet.apply(unet_params, z, t, text, timestep_cond=timestep_cond)


def make_eps_fn(unet: Any, unet_params: PyTree, schedule: NoiseSchedule) -> Callable[[Array, Array, Any], Array]:
  """eps_fn(z, t, text) -> the U-Net's eps (float32) whatever its prediction type (`NoiseSchedule.to_eps`); with
  `solvers.make_guided_eps_fn` it is the guided teacher of sampling and of the distillation target."""

  def eps_fn(z: Array, t: Array, text: Array | Mapping[str, Array]) -> Array:
    out = unet_output(unet, unet_params, z, t, text).astype(jnp.float32)
    return schedule.to_eps(out, z, t)

  return eps_fn


def sdxl_condition(states: Array, pooled: Array, time_ids: Array | Sequence[int]) -> dict[str, Array]:
  """The SDXL text condition of `apply_unet`: states (B, L, D1 + D2) and pooled (B, P) from
  `SDXLTextEncoders.encode`, time_ids (6,) or (B, 6) (`unet.add_time_ids`) broadcast to (B, 6) float32."""
  b = states.shape[0]
  time_ids = jnp.asarray(time_ids, jnp.float32)
  return {"states": states, "text_embeds": pooled,
          "time_ids": jnp.broadcast_to(time_ids, (b, time_ids.shape[-1]))}


def student_latents(pipe: Pipeline, unet_params: PyTree, text: Array | Mapping[str, Array], z_T: Array,
                    timesteps: np.ndarray, w: Array, noises: Array, draws: Array | None = None) -> Array:
  """Multistep consistency sampling in latent space -> the last x0 (B, h, w, C).

  text (B, L, D), or the SDXL condition dict of `apply_unet`; z_T (B, h, w, C); timesteps (K,) descending ints;
  w (B,) the LCM guidance weight (CFG scale minus 1); noises (K - 1, B, h, w, C) standard normal, used in order
  between steps (as LCMScheduler draws them): `consistency.multistep_sample` on the U-Net. A U-Net without the
  guidance embedding ignores w (LCM-LoRA style). A Gaussian student (``pipe.student_output``): x0 at each step
  is its mean, or with ``draws`` (K, B, h, w, C) standard normal the draw mean + std * draws[k]
  (`consistency.gaussian_draw`).
  """
  w_emb = None
  if pipe.guidance_embed_dim is not None:
    w_emb = consistency.guidance_embedding(w.astype(jnp.float32), pipe.guidance_embed_dim)
  gaussian = pipe.student_output == "gaussian"
  if draws is not None and not gaussian:
    raise ValueError(f"draws need a Gaussian student, got {pipe.student_output}")

  def f_fn(z: Array, t: Array) -> Array | tuple[Array, Array]:
    tb = jnp.full((z.shape[0],), t, jnp.int32)
    out = apply_unet(pipe, unet_params, z, tb, text, w_emb).astype(jnp.float32)
    if gaussian:
      x0, logvar, _ = consistency.gaussian_consistency_output(out, z, tb, pipe.schedule,
                                                              timestep_scaling=pipe.timestep_scaling)
      return x0, logvar
    return consistency.consistency_output(out, z, tb, pipe.schedule, timestep_scaling=pipe.timestep_scaling)[0]

  mode = ("mean" if draws is None else "sample") if gaussian else None
  return consistency.multistep_sample(f_fn, z_T.astype(jnp.float32), timesteps, pipe.schedule, gaussian=mode,
                                      noises=noises, draws=draws)


def teacher_latents(pipe: Pipeline, unet_params: PyTree, text: Array | Mapping[str, Array],
                    uncond_text: Array | Mapping[str, Array], z_T: Array, timesteps: np.ndarray,
                    guidance_scale: Array, key: Array, *, solver: str, solver_kwargs: dict[str, Any]) -> Array:
  """Teacher sampling with CFG (scale g; eps_u + g (eps_c - eps_u)) and ``solver`` -> clean latents (B, h, w, C).

  uncond_text (1 or B, L, D): the encoded empty prompt; for SDXL both are condition dicts (`apply_unet`), the
  unconditional one from `SDXLTextEncoders.encode_negative`. The U-Net runs once per step on [uncond; cond].
  """
  eps_fn = make_eps_fn(pipe.unet, unet_params, pipe.schedule)
  guided = solvers.make_guided_eps_fn(eps_fn, text, uncond_text, guidance_scale - 1.0)
  return solvers.sample(guided, z_T.astype(jnp.float32), timesteps, solver=solver, schedule=pipe.schedule,
                        key=key, **solver_kwargs)


def latent_shape(pipe: Pipeline, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
  """(B, h, w, C) of the latents for images (height, width); both must be multiples of the VAE factor."""
  f = pipe.vae_factor
  if height % f or width % f:
    raise ValueError(f"image size {height}x{width} must be a multiple of the VAE factor {f}")
  return (batch, height // f, width // f, pipe.unet.config.in_channels)


def make_sampler(pipe: Pipeline, *, kind: str = "student", steps: int | Sequence[int] = 4, height: int = 512,
                 width: int | None = None, output: str = "uint8", solver: str = "ddim",
                 solver_kwargs: dict[str, Any] | None = None, spacing: str = "leading",
                 offset: int = 1, gaussian: str = "sample") -> Sampler:
  """One jitted end-to-end sampler (see the module docstring) for fixed (kind, timesteps, size, output).

  kind "student": multistep consistency sampling at `student_timesteps(steps)` (a Gaussian student,
  ``pipe.student_output``: x0 drawn from its Gaussian at every step, ``gaussian`` "sample", the draws' noise from
  fold_in(the renoising key, 1), or its mean, "mean"; ignored for a point student); kind "teacher": ``solver``
  (with ``solver_kwargs``, e.g. eta for ddim) at `teacher_timesteps(steps, spacing, offset)`. Returns a
  `Sampler` (callable; ``.timesteps`` is the int array used). The timesteps are a traced argument of the jitted
  function, so samplers with the same number of steps share one compiled program; jitted functions are cached
  by the pipeline's value (modules, schedule, LCM settings), so reloading an equal pipeline recompiles nothing.
  """
  if kind not in SAMPLER_KINDS:
    raise ValueError(f"unknown sampler kind {kind!r}; allowed: {', '.join(SAMPLER_KINDS)}")
  if output not in OUTPUTS:
    raise ValueError(f"unknown output {output!r}; allowed: {', '.join(OUTPUTS)}")
  if gaussian not in consistency.GAUSSIAN_SAMPLING:
    raise ValueError(f"unknown Gaussian sampling {gaussian!r}; allowed: {', '.join(consistency.GAUSSIAN_SAMPLING)}")
  draw = kind == "student" and pipe.student_output == "gaussian" and gaussian == "sample"
  width = height if width is None else width
  latent_shape(pipe, 1, height, width)  # size check
  n_train = pipe.schedule.num_train_timesteps
  if kind == "student":
    timesteps = student_timesteps(steps, pipe.original_steps, n_train, pipe.sampling_grid)
  else:
    timesteps = teacher_timesteps(steps, n_train, spacing, offset)
    solvers.get_solver(solver)  # unknown names raise here, not at trace time
  solver_kwargs = dict(solver_kwargs or {})
  key = (_pipeline_signature(pipe), kind, height, width, output, solver, tuple(sorted(solver_kwargs.items())), draw)
  if key not in _JITTED:
    _JITTED[key] = _jitted_sampler(pipe, kind=kind, height=height, width=width, output=output, solver=solver,
                                   solver_kwargs=solver_kwargs, draw=draw)
  return Sampler(_JITTED[key], np.asarray(timesteps, np.int64), kind)


# Jitted samplers by value signature: an equal pipeline (same modules, schedule, LCM settings, empty-prompt
# tokens) loaded again reuses the compiled sampler (the eval job reloads the run for every checkpoint).
_JITTED: dict[tuple, Callable[..., Array]] = {}


def _pipeline_signature(pipe: Pipeline) -> tuple:
  abar = np.asarray(pipe.schedule.abar)
  return (pipe.unet, pipe.vae, pipe.text_encoder, abar.dtype.str, abar.tobytes(), pipe.schedule.prediction_type,
          pipe.max_length, pipe.timestep_scaling, pipe.original_steps, pipe.sampling_grid, pipe.student_output,
          str(pipe.tokenize([""])[0].tolist()), pipe.text_encoder_2, pipe.force_zeros_for_empty_prompt)


def _jitted_sampler(pipe: Pipeline, *, kind: str, height: int, width: int, output: str, solver: str,
                    solver_kwargs: dict[str, Any], draw: bool = False) -> Callable[..., Array]:
  uncond_ids = jnp.asarray(pipe.tokenize([""])) if kind == "teacher" else None

  def sample(params: dict[str, PyTree], timesteps: Array, input_ids: Array, key: Array,
             guidance_scale: Array | float, latents: Array | None = None, noises: Array | None = None) -> Array:
    b, k = input_ids.shape[0], timesteps.shape[0]
    shape = latent_shape(pipe, b, height, width)
    k_lat, k_noise = jax.random.split(key)
    z_T = jax.random.normal(k_lat, shape, jnp.float32) if latents is None else jnp.asarray(latents, jnp.float32)
    if z_T.shape != shape:
      raise ValueError(f"latents must have shape {shape}, got {z_T.shape}")
    text = encode_condition(pipe, params, input_ids, height, width)
    g = jnp.asarray(guidance_scale, jnp.float32)
    if kind == "student":
      if noises is None:
        noises = jax.random.normal(k_noise, (k - 1,) + shape, jnp.float32)
      w = jnp.broadcast_to(g - 1.0, (b,))
      draws = jax.random.normal(jax.random.fold_in(k_noise, 1), (k,) + shape, jnp.float32) if draw else None
      x0 = student_latents(pipe, params["unet"], text, z_T, timesteps, w, jnp.asarray(noises, jnp.float32), draws)
    else:
      uncond = encode_condition(pipe, params, uncond_ids, height, width, negative=True)
      x0 = teacher_latents(pipe, params["unet"], text, uncond, z_T, timesteps, g, k_noise, solver=solver,
                           solver_kwargs=solver_kwargs)
    images = decode(pipe, params["vae"], x0)
    return to_uint8(images) if output == "uint8" else images

  return jax.jit(sample)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A jitted end-to-end sampler (`make_sampler`): call it as ``sampler(params, input_ids, key, guidance_scale,
  latents=None, noises=None)`` -> images (B, H, W, 3); ``timesteps`` (K,) are the timesteps it uses, ``kind``
  "student" or "teacher"."""

  fn: Callable[..., Array]
  timesteps: np.ndarray
  kind: str

  def __call__(self, params: dict[str, PyTree], input_ids: Array, key: Array, guidance_scale: Array | float,
               latents: Array | None = None, noises: Array | None = None) -> Array:
    return self.fn(params, jnp.asarray(self.timesteps, jnp.int32), input_ids, key, guidance_scale, latents, noises)


def generate(sampler: Callable[..., Array], params: dict[str, PyTree], input_ids: np.ndarray, key: Array,
             guidance_scale: float, batch_size: int) -> np.ndarray:
  """Runs ``sampler`` over N prompts in fixed batches of ``batch_size`` (the last one padded with repeats, so
  one compiled shape serves all); batch i uses ``fold_in(key, i)``. Returns (N, H, W, 3) host images."""
  n = input_ids.shape[0]
  if n == 0:
    raise ValueError("no prompts")
  out = []
  for i, start in enumerate(range(0, n, batch_size)):
    ids = input_ids[start:start + batch_size]
    valid = ids.shape[0]
    if valid < batch_size:
      ids = np.concatenate([ids, np.repeat(ids[-1:], batch_size - valid, axis=0)])
    out.append(np.asarray(sampler(params, ids, jax.random.fold_in(key, i), guidance_scale))[:valid])
  return np.concatenate(out)


# ---------------------------------------------------------------------------------------------------------
# Prompts and images on disk.

PROMPT_KEYS = ("caption", "prompt", "text")


def read_prompts(path: str) -> list[str]:
  """Prompts from a .jsonl file (one object per line with "caption", "prompt" or "text"; COCO / MJHQ caption
  files) or a text file (one prompt per line). Blank lines are skipped; a missing file, a line without a
  caption or an empty file raises with the path."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"prompt file not found: '{path}'")
  prompts = []
  with open(path, encoding="utf-8") as fh:
    for i, line in enumerate(fh, 1):
      line = line.strip()
      if not line:
        continue
      if path.endswith(".jsonl"):
        obj = json.loads(line)
        key = next((k for k in PROMPT_KEYS if k in obj), None)
        if key is None:
          raise ValueError(f"{path}:{i}: no caption (expected one of {PROMPT_KEYS}), got keys {sorted(obj)}")
        prompts.append(str(obj[key]))
      else:
        prompts.append(line)
  if not prompts:
    raise ValueError(f"prompt file {path} holds no prompts")
  return prompts


def write_images(folder: str, images: np.ndarray, prefix: str = "") -> list[str]:
  """Writes uint8 images (N, H, W, 3) as ``{prefix}{i:05d}.png``; returns the paths."""
  from PIL import Image

  os.makedirs(folder, exist_ok=True)
  paths = []
  for i, img in enumerate(images):
    p = os.path.join(folder, f"{prefix}{i:05d}.png")
    Image.fromarray(np.asarray(img, np.uint8)).save(p)
    paths.append(p)
  return paths


def make_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
  """uint8 images (N, H, W, 3) -> one (rows * H, cols * W, 3) grid (default: near-square)."""
  n, h, w, c = images.shape
  cols = cols or int(np.ceil(np.sqrt(n)))
  rows = -(-n // cols)
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, cols)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
  return grid


def write_grid(path: str, images: np.ndarray, cols: int | None = None) -> None:
  """Writes uint8 images (N, H, W, 3) as one PNG grid (`make_grid`), creating the folder."""
  from PIL import Image

  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  Image.fromarray(make_grid(images, cols)).save(path)
