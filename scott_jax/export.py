"""Export a trained student (mode ``export``) and read the student out of a training run's checkpoints.

`TrainedRun(config, workdir)` reads WORKDIR/checkpoints without the optimizer state: `restore_subtree` builds
the target of one train-state field (``ema`` or ``student``) from the checkpoint's own manifest and restores
only that subtree with orbax (partial restore), so an SD1.5 evaluation reads 3.4 GB, not the whole state.
`finalised_steps` lists complete steps; a step still being written (an orbax ``*.orbax-checkpoint-tmp-*``
directory) is reported as pending and never read.

Formats written by `export` (config ``export.formats``):

(a) ``flax``: `export_flax` -> ``scott_export.json`` (U-Net / VAE / text-encoder architectures, schedule, LCM
    settings, provenance) + ``unet/vae/text_encoder.safetensors`` (float32, '/'-joined Flax parameter paths)
    + ``tokenizer/``; `scott_jax.export.load_exported` reads it bit for bit, without the training code.
(b) ``diffusers``: `export_diffusers` -> a `LatentConsistencyModelPipeline` folder: ``unet/`` (the student with
    ``time_cond_proj_dim``, `loading.save_unet`), ``scheduler/`` (an LCMScheduler config with the run's
    schedule, timestep_scaling and original_inference_steps), and the teacher's ``vae/``, ``text_encoder/``,
    ``tokenizer/`` copied file by file (the frozen networks are the teacher's, unchanged).
    ``diffusers.DiffusionPipeline.from_pretrained`` loads it. LCMScheduler picks LCM's timesteps; a run on the
    skip grid (``consistency.timestep_rule = "grid"``) samples its own k-step times when they are passed as
    ``timesteps=`` (`scott_jax.student.student_timesteps`, also stored in the Flax export as ``sampling_grid``).
    An SDXL student (`Pipeline.is_sdxl`): a `StableDiffusionXLPipeline` folder with the LCMScheduler, the
    teacher's ``text_encoder_2/`` and ``tokenizer_2/`` copied too and its force_zeros_for_empty_prompt; the Flax
    export adds ``text_encoder_2.safetensors``, ``tokenizer_2/`` and the flag.
(c) ``lora``: `export_lora` -> ``pytorch_lora_weights.safetensors`` in PEFT layout (`lora.export_peft`, alpha
    ``model.student_lora_alpha``), only when the student state is a LoRA overlay (``model.student_lora_rank``
    >= 1); diffusers' ``load_lora_weights`` on the teacher's pipeline (SD or SDXL) then gives the student U-Net. A
    student
    with the guidance embedding also gets ``guidance_projection.safetensors`` (``time_embedding.cond_proj.weight``
    in torch layout; a PEFT LoRA file cannot carry it and the teacher's U-Net has no such layer: load it with
    ``load_state_dict(strict=False)`` into a U-Net built with ``time_cond_proj_dim``, or use format (b), which
    holds the merged student). A Gaussian LoRA student's fully trained conv_out goes into the same file, cut to
    its mean half (``conv_out.weight`` / ``conv_out.bias``). A full student is skipped with a log line.

A Gaussian student (``consistency.student_output = "gaussian"``, SCott v1: the U-Net has twice the output
channels, prediction then log-variance): (a) holds both halves and ``student_output`` in ``scott_export.json``;
(b) holds the standard U-Net of the mean half (`mean_half`) and says so in ``SCOTT_GAUSSIAN_STUDENT.md``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from typing import Any

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from safetensors.numpy import load_file, save_file

from scott_jax import checkpoint as ckpt_lib
from scott_jax import pipeline as pipeline_lib
from scott_jax import student
from scott_jax.checkpoint import CheckpointReadError, finalised_steps, restore_subtree
from scott_jax.models import loading, lora
from scott_jax.models import unet as unet_lib
from scott_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from scott_jax.models.unet import UNet2DConditionModel, UNetConfig
from scott_jax.models.vae import AutoencoderKL, VAEConfig
from scott_jax.schedules import NoiseSchedule

PyTree = Any

PARAM_FIELDS = ("ema", "student")
EXPORT_FORMAT = "scott_jax.export/1"
EXPORT_CONFIG = "scott_export.json"
EXPORT_ABAR = "abar.npy"
EXPORT_PARAMS = {"unet": "unet.safetensors", "vae": "vae.safetensors", "text_encoder": "text_encoder.safetensors"}
SDXL_EXPORT_PARAMS = {"text_encoder_2": "text_encoder_2.safetensors"}
LORA_FILE = "pytorch_lora_weights.safetensors"
GUIDANCE_FILE = "guidance_projection.safetensors"


class TrainedRun:
  """A training run on disk (the config it was trained with and WORKDIR) for sampling, export and eval.

  ``models()`` loads the teacher folder of ``config.model`` once (`scott_jax.student.load_models`): the student
  architecture, VAE, text encoder and tokenizer; checkpoints hold only the trainable state.
  """

  def __init__(self, config: Any, workdir: str):
    self.config = config
    self.workdir = workdir
    self.directory = os.fspath(ckpt_lib.checkpoint_dir(workdir))
    self._loaded: tuple[Any, PyTree] | None = None

  def models(self) -> tuple[Any, PyTree]:
    if self._loaded is None:
      self._loaded = student.load_models(self.config)
    return self._loaded

  def steps(self) -> tuple[list[int], list[str]]:
    return finalised_steps(self.directory)

  def latest_step(self) -> int:
    steps, pending = self.steps()
    if not steps:
      raise FileNotFoundError(f"no finalised checkpoint in {self.directory}"
                              + (f" (still being written: {pending})" if pending else ""))
    return steps[-1]

  def student_state(self, step: int, which: str = "ema") -> PyTree:
    """The student state (``which``: "ema" or "student") at ``step`` as trained: full U-Net parameters, or a
    LoRA state {"lora", "full"} (`scott_jax.student.init_student_params`); checked against ``config.model``."""
    if which not in PARAM_FIELDS:
      raise ValueError(f"unknown params '{which}'; allowed: {', '.join(PARAM_FIELDS)}")
    tree = restore_subtree(self.directory, step, which)
    rank = self.config.model.student_lora_rank
    lora_state = student.is_lora_student(tree)
    if lora_state != (rank > 0):
      raise CheckpointReadError(
        f"checkpoint step {step} field '{which}' holds a {'LoRA' if lora_state else 'full'} student but "
        f"config.model.student_lora_rank = {rank}; use the config the run was trained with")
    return tree

  def student_params(self, step: int, which: str = "ema") -> PyTree:
    """The student's U-Net parameters {"params": ...} (``which``: "ema" or "student") at ``step``; a LoRA
    state is merged onto the teacher weights (`scott_jax.student.student_unet_params`, alpha
    ``model.student_lora_alpha``). Shapes are checked against the student architecture."""

    tree = self.student_state(step, which)  # read errors first, before the models load
    models, frozen = self.models()
    if student.is_lora_student(tree):
      alpha = float(self.config.model.student_lora_alpha)
      tree = jax.jit(lambda s, t: student.student_unet_params(s, t, alpha))(tree, frozen["unet"])
    expected = traverse_util.flatten_dict(unet_lib.abstract_params(models.student.config))
    got = traverse_util.flatten_dict(tree)
    bad = sorted("/".join(p) for p in set(expected) ^ set(got))
    bad += sorted("/".join(p) for p in set(expected) & set(got) if tuple(expected[p].shape) != got[p].shape)
    if bad:
      raise CheckpointReadError(f"checkpoint step {step} field '{which}' does not match the student U-Net of "
                                f"config.model ({len(bad)} parameters differ, e.g. {bad[:3]})")
    return tree

  def pipeline(self, step: int, which: str = "ema") -> tuple[pipeline_lib.Pipeline, dict[str, PyTree]]:
    """(Pipeline with the student U-Net, params) for checkpoint ``step``."""

    unet_params = self.student_params(step, which)
    models, frozen = self.models()
    pipe = student.student_pipeline(self.config, models)
    params = {"unet": unet_params, **student.frozen_sampling_params(frozen)}
    return pipe, params


# ---------------------------------------------------------------------------------------------------------
# Writers.

def _save_flat(path: str, tree: PyTree) -> None:

  flat = {"/".join(k): np.ascontiguousarray(np.asarray(jax.device_get(v)))
          for k, v in traverse_util.flatten_dict(dict(tree)).items()}
  save_file(flat, path, metadata={"format": EXPORT_FORMAT})


def _config_dict(cfg: Any) -> dict[str, Any]:
  import dataclasses

  return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def export_flax(folder: str, pipe: pipeline_lib.Pipeline, params: dict[str, PyTree],
                provenance: dict[str, Any] | None = None) -> str:
  """Format (a): see the module docstring; `export.load_exported(folder)` reads it back bit for bit."""
  os.makedirs(folder, exist_ok=True)
  meta = {
    "format": EXPORT_FORMAT,
    "unet": pipe.unet.config.to_diffusers(),
    "vae": _config_dict(pipe.vae.config),
    "text_encoder": _config_dict(pipe.text_encoder.config),
    "prediction_type": pipe.schedule.prediction_type,
    "timestep_scaling": pipe.timestep_scaling,
    "original_steps": pipe.original_steps,
    "sampling_grid": list(pipe.sampling_grid),
    "student_output": pipe.student_output,
    "provenance": provenance or {},
  }
  files = dict(EXPORT_PARAMS)
  if pipe.is_sdxl:
    meta.update(text_encoder_2=_config_dict(pipe.text_encoder_2.config),
                force_zeros_for_empty_prompt=bool(pipe.force_zeros_for_empty_prompt))
    files.update(SDXL_EXPORT_PARAMS)
    pipe.tokenizer_2.save_pretrained(os.path.join(folder, "tokenizer_2"))
  # The schedule is stored as its abar values (any beta schedule round-trips exactly).
  np.save(os.path.join(folder, EXPORT_ABAR), np.asarray(pipe.schedule.abar))
  for name, file in files.items():
    _save_flat(os.path.join(folder, file), params[name])
  pipe.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
  with open(os.path.join(folder, EXPORT_CONFIG), "w") as fh:
    json.dump(meta, fh, indent=2, sort_keys=True)
  return folder


def lcm_scheduler_config(schedule_config: Any, timestep_scaling: float, original_steps: int) -> dict[str, Any]:
  """diffusers `LCMScheduler` config dict for the run's schedule (``config.schedule`` fields)."""
  return {
    "_class_name": "LCMScheduler",
    "_diffusers_version": _diffusers_version(),
    "num_train_timesteps": int(schedule_config["num_train_timesteps"]),
    "beta_start": float(schedule_config["beta_start"]),
    "beta_end": float(schedule_config["beta_end"]),
    "beta_schedule": schedule_config["beta_schedule"],
    "trained_betas": None,
    "original_inference_steps": int(original_steps),
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": schedule_config["prediction_type"],
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "timestep_scaling": float(timestep_scaling),
    "rescale_betas_zero_snr": False,
  }


def _diffusers_version() -> str:
  try:
    return importlib.metadata.version("diffusers")
  except importlib.metadata.PackageNotFoundError:
    return "0.42.1"


GAUSSIAN_NOTE = "SCOTT_GAUSSIAN_STUDENT.md"  # what a diffusers export of a Gaussian student carries


def mean_half(unet_config: Any, unet_params: PyTree) -> tuple[Any, PyTree]:
  """A Gaussian student's U-Net (config with 2C output channels, params) -> the standard U-Net of its mean half:
  out_channels C and conv_out's kernel and bias cut to their first C channels (the prediction; the log-variance
  half is dropped). Every other parameter is shared."""
  import dataclasses

  c = unet_config.out_channels // 2
  flat = traverse_util.flatten_dict(dict(unet_params))
  flat = {p: (v[..., :c] if "conv_out" in p[-2:-1] else v) for p, v in flat.items()}
  return dataclasses.replace(unet_config, out_channels=c), traverse_util.unflatten_dict(flat)


def export_diffusers(folder: str, pipe: pipeline_lib.Pipeline, unet_params: PyTree, teacher_path: str,
                     schedule_config: Any, vae_path: str = "") -> str:
  """Format (b): a diffusers LatentConsistencyModelPipeline folder, or for an SDXL pipeline a
  StableDiffusionXLPipeline folder with the LCMScheduler (module docstring). The VAE comes from ``vae_path`` (a
  folder with vae/) when given, else from the teacher; text encoders and tokenizers from the teacher. A Gaussian
  student (``pipe.student_output``) is written as the standard U-Net of its mean half (`mean_half`; diffusers has
  no Gaussian consistency model), with ``SCOTT_GAUSSIAN_STUDENT.md`` in the folder and a log line saying so; the
  Flax export keeps both halves."""

  os.makedirs(folder, exist_ok=True)
  unet_config = pipe.unet.config
  if pipe.student_output == "gaussian":
    unet_config, unet_params = mean_half(unet_config, unet_params)
    with open(os.path.join(folder, GAUSSIAN_NOTE), "w") as fh:
      fh.write("# A Gaussian SCott student (SCott v1), mean half only\n\n"
               "The student was trained with `consistency.student_output = \"gaussian\"`: its U-Net predicts a\n"
               f"Gaussian per element ({2 * unet_config.out_channels} output channels: the prediction, then a\n"
               "log-variance). diffusers has no such model, so `unet/` here is the standard U-Net of the mean half\n"
               "(conv_out cut to the prediction channels): multistep sampling with it uses the Gaussian's mean at\n"
               "every step (scott_jax's `sample.gaussian = \"mean\"`). The Flax export (`export.formats` flax) keeps\n"
               "both halves and can also draw from the Gaussian (`sample.gaussian = \"sample\"`).\n")
    logging.info("export diffusers: the Gaussian student's mean half as a standard U-Net (%d output channels); "
                 "the log-variance half is only in the Flax export", unet_config.out_channels)
  loading.save_unet(os.path.join(folder, "unet"), unet_config, unet_params)
  parts = [("vae", vae_path or teacher_path), ("text_encoder", teacher_path), ("tokenizer", teacher_path)]
  if pipe.is_sdxl:
    parts += [("text_encoder_2", teacher_path), ("tokenizer_2", teacher_path)]
  for part, src in parts:
    dst = os.path.join(folder, part)
    if os.path.exists(dst):
      shutil.rmtree(dst)
    shutil.copytree(os.path.join(src, part), dst)
  os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as fh:
    json.dump(lcm_scheduler_config(schedule_config, pipe.timestep_scaling, pipe.original_steps), fh, indent=2)
  with open(os.path.join(teacher_path, "model_index.json")) as fh:
    teacher_index = json.load(fh)
  index = {
    "_class_name": "LatentConsistencyModelPipeline",
    "_diffusers_version": _diffusers_version(),
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "LCMScheduler"],
    "text_encoder": teacher_index.get("text_encoder", ["transformers", "CLIPTextModel"]),
    "tokenizer": teacher_index.get("tokenizer", ["transformers", "CLIPTokenizer"]),
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
  }
  if pipe.is_sdxl:
    index = {
      "_class_name": "StableDiffusionXLPipeline",
      "_diffusers_version": _diffusers_version(),
      "feature_extractor": [None, None],
      "image_encoder": [None, None],
      "force_zeros_for_empty_prompt": bool(pipe.force_zeros_for_empty_prompt),
      "scheduler": ["diffusers", "LCMScheduler"],
      "text_encoder": teacher_index.get("text_encoder", ["transformers", "CLIPTextModel"]),
      "text_encoder_2": teacher_index.get("text_encoder_2", ["transformers", "CLIPTextModelWithProjection"]),
      "tokenizer": teacher_index.get("tokenizer", ["transformers", "CLIPTokenizer"]),
      "tokenizer_2": teacher_index.get("tokenizer_2", ["transformers", "CLIPTokenizer"]),
      "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"],
    }
  with open(os.path.join(folder, "model_index.json"), "w") as fh:
    json.dump(index, fh, indent=2, sort_keys=True)
  return folder


def export_lora(path: str, overlay: PyTree, alpha: float) -> str:
  """Format (c): a PEFT-layout LoRA file (`scott_jax.models.lora.export_peft`, prefix "unet")."""

  inner = overlay["params"] if set(overlay) == {"params"} else overlay
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  lora.export_peft(path, inner, alpha)
  return path


def export_full_part(path: str, full: PyTree) -> str:
  """The fully trained part of a LoRA student (the guidance projection) as a torch-layout safetensors file
  (`scott_jax.models.loading.to_state_dict` keys, e.g. ``time_embedding.cond_proj.weight``, float32)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file({k: v.astype(np.float32) for k, v in loading.to_state_dict(full).items()}, path,
            metadata={"format": "pt"})
  return path


# ---------------------------------------------------------------------------------------------------------
# --mode export.

def run_export(config: Any, workdir: str) -> dict[str, str]:
  """Mode ``export``: checkpoint ``sample.step`` (-1: latest) with ``sample.params`` of the run in WORKDIR ->
  the formats of ``export.formats`` under ``export.out_dir`` (default WORKDIR/export/step_<N>_<params>).
  Returns {format: path}."""
  run = TrainedRun(config, workdir)
  step = run.latest_step() if config.sample.step < 0 else int(config.sample.step)
  which = config.sample.params
  out = config.export.out_dir or os.path.join(workdir, "export", f"step_{step}_{which}")
  written: dict[str, str] = {}
  tree = run.student_state(step, which)
  provenance = {"workdir": os.path.abspath(workdir), "step": step, "params": which,
                "teacher_path": config.model.teacher_path}
  if student.is_lora_student(tree):
    if "lora" in config.export.formats:
      written["lora"] = export_lora(os.path.join(out, "lora", LORA_FILE), tree[student.STUDENT_LORA],
                                    float(config.model.student_lora_alpha))
      full = tree.get(student.STUDENT_FULL, {})
      if config.consistency.student_output == "gaussian":  # a diffusers U-Net has the mean half's channels
        full = traverse_util.unflatten_dict({p: v[..., :v.shape[-1] // 2] if "conv_out" in p[-2:-1] else v
                                             for p, v in traverse_util.flatten_dict(dict(full)).items()})
      if jax.tree_util.tree_leaves(full):
        written["lora_guidance"] = export_full_part(os.path.join(out, "lora", GUIDANCE_FILE), full)
  elif "lora" in config.export.formats:
    logging.info("export: lora skipped (the student in step %d is a full U-Net, not a LoRA overlay)", step)
  if {"flax", "diffusers"} & set(config.export.formats):
    pipe, params = run.pipeline(step, which)
    if "flax" in config.export.formats:
      written["flax"] = export_flax(os.path.join(out, "flax"), pipe, params, provenance)
    if "diffusers" in config.export.formats:
      written["diffusers"] = export_diffusers(os.path.join(out, "diffusers"), pipe, params["unet"],
                                              config.model.teacher_path, config.schedule, config.model.vae_path)
  for fmt, path in written.items():
    print(f"export {fmt}: {path}")
  return written


# ---------------------------------------------------------------------------------------------------------
# Reading the Flax export (format (a)): no training code needed.

def load_exported(folder: str, dtype: str = "float32") -> tuple[pipeline_lib.Pipeline, dict[str, PyTree]]:
  """A folder written by `scott_jax.export.export_flax` -> (Pipeline, params), bit-identical parameters.

  Layout: ``scott_export.json`` (architectures, prediction type, LCM settings, the student's output kind
  ``student_output``, point or gaussian (both halves of a Gaussian student's U-Net), provenance), ``abar.npy`` (the
  schedule), ``unet.safetensors``, ``vae.safetensors``, ``text_encoder.safetensors`` ('/'-joined Flax paths,
  float32) and ``tokenizer/``; SDXL: also ``text_encoder_2.safetensors`` and ``tokenizer_2/``.
  """
  path = os.path.join(folder, EXPORT_CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{folder} is not a scott_jax Flax export: no {EXPORT_CONFIG}")
  with open(path) as fh:
    meta = json.load(fh)
  if meta.get("format") != EXPORT_FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
  cdtype = loading.compute_dtype(dtype)
  unet = UNet2DConditionModel(UNetConfig.from_diffusers(meta["unet"]), dtype=cdtype)
  vae_config = VAEConfig.from_dict(meta["vae"])
  vae = AutoencoderKL(vae_config, dtype=vae_config.compute_dtype(cdtype))
  text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(meta["text_encoder"]), dtype=cdtype)
  files, sdxl = dict(EXPORT_PARAMS), {}
  if "text_encoder_2" in meta:
    files.update(SDXL_EXPORT_PARAMS)
    sdxl = dict(text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig.from_dict(meta["text_encoder_2"]),
                                                           dtype=cdtype),
                tokenizer_2=loading.load_tokenizer(folder, "tokenizer_2"),
                force_zeros_for_empty_prompt=bool(meta["force_zeros_for_empty_prompt"]))
  params = {}
  for name, file in files.items():
    flat = load_file(os.path.join(folder, file))
    params[name] = jax.device_put(traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()}))
  tokenizer = loading.load_tokenizer(folder, "tokenizer")
  schedule = NoiseSchedule(abar=jnp.asarray(np.load(os.path.join(folder, EXPORT_ABAR))),
                           prediction_type=meta["prediction_type"])
  max_length = pipeline_lib.text_max_length(tokenizer, text_encoder)
  if sdxl:
    max_length = min(max_length, pipeline_lib.text_max_length(sdxl["tokenizer_2"], sdxl["text_encoder_2"]))
  pipe = pipeline_lib.Pipeline(unet, vae, text_encoder, tokenizer, schedule, max_length,
                               float(meta["timestep_scaling"]), int(meta["original_steps"]),
                               tuple(int(t) for t in meta.get("sampling_grid", ())),
                               meta.get("student_output", "point"), **sdxl)
  return pipe, params
