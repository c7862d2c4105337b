"""Torch-free loading and saving of diffusers / transformers weights for the Flax models.

Generic core (no model-specific knowledge):

* `read_safetensors_folder(folder, variant=None) -> {torch key: np.ndarray}` reads
  ``diffusion_pytorch_model[.<variant>].safetensors`` or ``model[.<variant>].safetensors``, or the shards
  listed in ``<weights>.safetensors.index[.<variant>].json``, with ``safetensors.numpy`` (no torch).
* `read_config(folder) -> dict` reads ``config.json``.
* Key naming. Flax submodules carry diffusers' torch module names with list indices joined by ``_``: torch
  ``down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight`` is the Flax path
  ``('down_blocks_0', 'attentions_1', 'transformer_blocks_0', 'attn1', 'to_out_0', 'kernel')``.
  `torch_module_to_flax` / `flax_to_torch_module` map module names (no leaf) both ways;
  `torch_key_to_flax_path(key, leaf)` / `flax_path_to_torch_key(path)` map full parameter keys. Going back,
  ``name_<digits>`` is split only when ``name`` is in `LIST_CONTAINERS` (``linear_1`` of a time embedding is a
  module name, not an index).
* Leaves: torch ``weight`` is the Flax ``kernel`` (Dense: (out, in) -> (in, out); Conv: OIHW -> HWIO),
  ``scale`` (GroupNorm / LayerNorm) or ``embedding`` (Embed), whichever leaf the abstract Flax tree has; every
  other leaf name (``bias``, ...) is kept.
* `convert_state_dict(state_dict, abstract_params) -> params` fills an abstract parameter tree (from
  `jax.eval_shape` of ``module.init``) and raises `WeightLoadError` listing every missing, unexpected and
  mis-shaped tensor (never a silent random init). `to_state_dict(params)` is the inverse (torch layout).
* `save_safetensors_folder(folder, state_dict, config, weights_name)` writes a diffusers-format folder.

Model loaders (`load_unet`, `save_unet`, and the VAE / text encoder / pipeline loaders) build on this core.
Parameters are float32 unless a loader is asked for another parameter dtype; fp16 files are upcast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from scott_jax.choices import DTYPES
from scott_jax.models.clip_text import (
  CLIPTextConfig,
  CLIPTextModel,
  CLIPTextModelWithProjection,
  SDXLTextMixin,
  prepare_clip_text_state_dict,
)
from scott_jax.models.unet import UNet2DConditionModel, UNetConfig
from scott_jax.models.unet import abstract_params as unet_abstract_params
from scott_jax.models.vae import AutoencoderKL, PixelSpace, PixelSpaceConfig, VAEConfig, prepare_vae_state_dict

PyTree = Any

# Torch module names that are lists (nn.ModuleList / nn.Sequential): `<name>.<i>` <-> Flax `<name>_<i>`.
LIST_CONTAINERS: frozenset[str] = frozenset({
  "down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers", "upsamplers",
  "to_out", "net", "layers", "blocks", "conv_in_list", "norms",
})

WEIGHTS_NAMES: tuple[str, ...] = ("diffusion_pytorch_model", "model")  # diffusers, transformers

_KERNEL_LEAVES = ("kernel", "scale", "embedding")  # Flax leaves a torch `weight` may become


class WeightLoadError(ValueError):
  """A state dict does not match the Flax parameter tree; the message lists every offending key."""


# ---------------------------------------------------------------------------------------------------
# Files.

def compute_dtype(name: str) -> Any:
  """The jnp dtype (jnp.float32 / bfloat16 / float16) of a compute dtype name (config ``model.dtype``, one of
  `scott_jax.choices.DTYPES`); ValueError lists them otherwise."""
  if name not in DTYPES:
    raise ValueError(f"unknown dtype '{name}'; allowed: {', '.join(DTYPES)}")
  return getattr(jnp, name)


def _variant_name(name: str, variant: str | None) -> str:
  """diffusers `_add_variant`: ``variant`` goes before the last extension (``a.safetensors`` ->
  ``a.fp16.safetensors``, ``a.safetensors.index.json`` -> ``a.safetensors.index.fp16.json``)."""
  if variant is None:
    return name
  head, ext = name.rsplit(".", 1)
  return f"{head}.{variant}.{ext}"


def read_safetensors_folder(folder: str | os.PathLike, *,
                            variant: str | None = None) -> dict[str, np.ndarray]:
  """All tensors of a diffusers / transformers weights folder as numpy arrays (their stored dtype).

  Looks for, in order, ``diffusion_pytorch_model.safetensors``, its sharded index
  ``diffusion_pytorch_model.safetensors.index.json``, ``model.safetensors`` and
  ``model.safetensors.index.json``; with ``variant`` (e.g. "fp16") the variant names
  (``diffusion_pytorch_model.fp16.safetensors``, ``diffusion_pytorch_model.safetensors.index.fp16.json``,
  ...).
  Raises FileNotFoundError naming the folder and the file names looked for.
  """
  from safetensors.numpy import load_file

  folder = os.fspath(folder)
  tried = []
  for base in WEIGHTS_NAMES:
    single = _variant_name(f"{base}.safetensors", variant)
    index = _variant_name(f"{base}.safetensors.index.json", variant)
    tried += [single, index]
    if os.path.isfile(os.path.join(folder, single)):
      return dict(load_file(os.path.join(folder, single)))
    if os.path.isfile(os.path.join(folder, index)):
      with open(os.path.join(folder, index)) as fh:
        weight_map: dict[str, str] = json.load(fh)["weight_map"]
      out: dict[str, np.ndarray] = {}
      for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
          raise FileNotFoundError(f"shard '{shard}' listed in {index} is missing from {folder}")
        out.update(load_file(shard_path))
      missing = sorted(set(weight_map) - set(out))
      if missing:
        raise WeightLoadError(f"{index} in {folder} lists tensors absent from its shards: {missing}")
      return out
  raise FileNotFoundError(f"no safetensors weights in {folder}: looked for {', '.join(tried)}")


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
  """``config.json`` of a diffusers / transformers folder as a dict."""
  path = os.path.join(os.fspath(folder), "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config.json in {os.fspath(folder)}")
  with open(path) as fh:
    return json.load(fh)


def save_safetensors_folder(folder: str | os.PathLike, state_dict: Mapping[str, np.ndarray],
                            config: Mapping[str, Any],
                            weights_name: str = "diffusion_pytorch_model.safetensors") -> None:
  """Write ``config.json`` and one safetensors file (torch-layout arrays, contiguous) into ``folder``."""
  from safetensors.numpy import save_file

  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as fh:
    json.dump(dict(config), fh, indent=2, sort_keys=True)
  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state_dict.items()}
  save_file(arrays, os.path.join(folder, weights_name), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------
# Key naming.

def torch_module_to_flax(module: str) -> tuple[str, ...]:
  """Torch module name -> Flax module path: ``a.b.0.c`` -> ``('a', 'b_0', 'c')`` (every integer component is a
  list index and joins the name before it)."""
  out: list[str] = []
  for part in module.split(".") if module else []:
    if part.isdigit():
      if not out:
        raise ValueError(f"torch module name '{module}' starts with a list index")
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


_INDEXED = re.compile(r"^(.*)_(\d+)$")


def flax_to_torch_module(path: tuple[str, ...] | str) -> str:
  """Flax module path (tuple or '/'-joined) -> torch module name; ``name_<i>`` splits only for names in
  `LIST_CONTAINERS` (``to_out_0`` -> ``to_out.0``, ``linear_1`` stays)."""
  if isinstance(path, str):
    path = tuple(path.split("/")) if path else ()
  parts: list[str] = []
  for name in path:
    m = _INDEXED.match(name)
    if m and m.group(1) in LIST_CONTAINERS:
      parts += [m.group(1), m.group(2)]
    else:
      parts.append(name)
  return ".".join(parts)


def torch_key_to_flax_path(key: str, leaf: str | None = None) -> tuple[str, ...]:
  """Torch parameter key -> Flax parameter path. ``leaf`` overrides the last component (e.g. ``weight`` ->
  ``kernel``); without it the torch leaf name is kept."""
  module, _, name = key.rpartition(".")
  return torch_module_to_flax(module) + (leaf or name,)


def flax_path_to_torch_key(path: tuple[str, ...] | str) -> str:
  """Flax parameter path -> torch key; leaves ``kernel``/``scale``/``embedding`` become ``weight``."""
  if isinstance(path, str):
    path = tuple(path.split("/"))
  leaf = "weight" if path[-1] in _KERNEL_LEAVES else path[-1]
  module = flax_to_torch_module(path[:-1])
  return f"{module}.{leaf}" if module else leaf


def _torch_to_flax_array(value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel":
    if value.ndim == 2:  # Linear (out, in) -> Dense (in, out)
      return value.T
    if value.ndim == 4:  # Conv2d OIHW -> HWIO
      return value.transpose(2, 3, 1, 0)
    if value.ndim == 3:  # Conv1d OIW -> WIO
      return value.transpose(2, 1, 0)
  return value


def _flax_to_torch_array(value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel":
    if value.ndim == 2:
      return value.T
    if value.ndim == 4:
      return value.transpose(3, 2, 0, 1)
    if value.ndim == 3:
      return value.transpose(2, 1, 0)
  return value


def _torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  return tuple(_flax_to_torch_array(np.empty(shape, np.uint8), leaf).shape)


# ---------------------------------------------------------------------------------------------------
# State dict <-> Flax tree.

def _split_params(tree: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
  if set(tree) == {"params"}:
    return tree["params"], True
  return tree, False


def convert_state_dict(state_dict: Mapping[str, np.ndarray], abstract_params: PyTree) -> PyTree:
  """Fill ``abstract_params`` (a Flax param tree of arrays or `jax.ShapeDtypeStruct`, with or without the
  ``{'params': ...}`` wrapper) from a torch-layout ``state_dict``.

  Each leaf takes its dtype from the abstract leaf (fp16 files upcast to float32 parameters). Returns the same
  structure with device arrays. Raises `WeightLoadError` listing every Flax parameter with no tensor, every
  tensor with no parameter, and every shape mismatch (torch key, torch shape, Flax path, expected shape).
  """
  inner, wrapped = _split_params(abstract_params)
  flat = traverse_util.flatten_dict(dict(inner))
  # Module path -> {flax leaf name}; a torch key `<module>.weight` picks the leaf the tree has.
  leaves: dict[tuple[str, ...], set[str]] = {}
  for path in flat:
    leaves.setdefault(path[:-1], set()).add(path[-1])

  out: dict[tuple[str, ...], np.ndarray] = {}
  unexpected, mismatched, seen = [], [], set()
  for key, value in state_dict.items():
    module, _, name = key.rpartition(".")
    mod_path = torch_module_to_flax(module) if module else ()
    have = leaves.get(mod_path, set())
    leaf = name
    if name == "weight":
      cands = [c for c in _KERNEL_LEAVES if c in have]
      leaf = cands[0] if len(cands) == 1 else "weight"
    path = mod_path + (leaf,)
    if path not in flat:
      unexpected.append(f"  {key} {tuple(value.shape)} (no Flax parameter {'/'.join(path)})")
      continue
    seen.add(path)
    arr = _torch_to_flax_array(np.asarray(value), leaf)
    want = tuple(flat[path].shape)
    if tuple(arr.shape) != want:
      mismatched.append(f"  {key} torch shape {tuple(value.shape)} -> Flax {'/'.join(path)} has shape {want} "
                        f"(torch shape {_torch_shape(want, leaf)} expected)")
      continue
    out[path] = arr.astype(flat[path].dtype)
  missing = [f"  {'/'.join(p)} {tuple(flat[p].shape)} (torch key {flax_path_to_torch_key(p)}, torch shape "
             f"{_torch_shape(tuple(flat[p].shape), p[-1])})" for p in flat if p not in seen]
  if missing or unexpected or mismatched:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing (Flax parameters with no tensor):\n" + "\n".join(missing))
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected (tensors with no Flax parameter):\n"
                   + "\n".join(unexpected))
    if mismatched:
      parts.append(f"{len(mismatched)} with the wrong shape:\n" + "\n".join(mismatched))
    raise WeightLoadError("state dict does not match the Flax parameters:\n" + "\n".join(parts))
  params = jax.device_put(traverse_util.unflatten_dict(out))
  return {"params": params} if wrapped else params


def to_state_dict(params: PyTree) -> dict[str, np.ndarray]:
  """Flax param tree (with or without ``{'params': ...}``) -> torch-layout state dict of numpy arrays (their
  dtype kept)."""
  inner, _ = _split_params(params)
  out = {}
  for path, value in traverse_util.flatten_dict(dict(inner)).items():
    arr = np.asarray(jax.device_get(value))
    out[flax_path_to_torch_key(path)] = np.ascontiguousarray(_flax_to_torch_array(arr, path[-1]))
  return out


# ---------------------------------------------------------------------------------------------------
# VAE, text encoder and tokenizer loaders.


def _component_folder(path: str | os.PathLike, subfolder: str | None) -> str:
  folder = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"model folder {folder} does not exist")
  return folder


def load_vae(path: str | os.PathLike, subfolder: str | None = "vae", variant: str | None = None,
             dtype: Any = jnp.float32) -> tuple[AutoencoderKL | PixelSpace, PyTree]:
  """A diffusers AutoencoderKL folder (``<path>/<subfolder>``: config.json + safetensors) as (Flax module,
  float32 params). ``dtype`` is the module's compute dtype (float32 instead of float16 when the config sets
  ``force_upcast``, see `VAEConfig.compute_dtype`); the latent scaling factor comes from the config. A
  config.json with ``_class_name`` "PixelSpace" (a pixel-space model, no weights) gives `PixelSpace` and empty
  params.

  Raises FileNotFoundError naming the folder when it or its files are missing, ValueError for an unsupported
  config, `WeightLoadError` when the weights do not fit the config.
  """
  folder = _component_folder(path, subfolder)
  config = read_config(folder)
  if config.get("_class_name") == "PixelSpace":
    return PixelSpace(PixelSpaceConfig.from_dict(config), dtype=dtype), {}
  vae_config = VAEConfig.from_dict(config)
  module = AutoencoderKL(vae_config, dtype=vae_config.compute_dtype(dtype))
  state = prepare_vae_state_dict(read_safetensors_folder(folder, variant=variant))
  f, c = module.config.downsample_factor, module.config.in_channels
  abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, f, f, c), jnp.float32))
  return module, convert_state_dict(state, abstract)


def load_text_encoder(path: str | os.PathLike, subfolder: str | None = "text_encoder",
                      variant: str | None = None, dtype: Any = jnp.float32) -> tuple[CLIPTextModel, PyTree]:
  """A transformers CLIPTextModel or CLIPTextModelWithProjection folder (config.json + safetensors; with or
  without the ``text_model.`` prefix) as (Flax module, float32 params); the class is `CLIPTextModelWithProjection`
  when the weights have ``text_projection.weight`` (SDXL's text_encoder_2/). ``dtype`` is the compute dtype.
  Errors as `load_vae`."""
  folder = _component_folder(path, subfolder)
  state = prepare_clip_text_state_dict(read_safetensors_folder(folder, variant=variant))
  cls = CLIPTextModelWithProjection if "text_projection.weight" in state else CLIPTextModel
  module = cls(CLIPTextConfig.from_dict(read_config(folder)), dtype=dtype)
  abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  return module, convert_state_dict(state, abstract)


def load_tokenizer(path: str | os.PathLike, subfolder: str | None = "tokenizer") -> Any:
  """transformers' `CLIPTokenizer` from a local folder (tokenizer.json, or vocab.json + merges.txt, and
  tokenizer_config.json for ``model_max_length``); never the hub. FileNotFoundError names a missing folder."""
  from transformers import CLIPTokenizer  # needs neither torch nor the network

  folder = _component_folder(path, subfolder)
  has_vocab = os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(
    os.path.join(folder, "merges.txt"))
  if not (has_vocab or os.path.isfile(os.path.join(folder, "tokenizer.json"))):
    raise FileNotFoundError(f"no tokenizer.json or vocab.json + merges.txt in {folder}")
  return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


# ---------------------------------------------------------------------------------------------------
# U-Net.

def load_unet(path: str | os.PathLike, subfolder: str | None = None, variant: str | None = None,
              dtype: Any = jnp.float32, **module_kwargs: Any) -> tuple[UNet2DConditionModel, PyTree]:
  """A diffusers `UNet2DConditionModel` folder (config.json + safetensors) -> (Flax module, {"params": ...}).

  ``subfolder`` e.g. "unet" for a pipeline folder; ``variant`` e.g. "fp16" (parameters are upcast to
  float32); ``dtype`` the compute dtype; ``module_kwargs`` go to the module (attention, attention_chunk_size,
  remat). Raises FileNotFoundError, ValueError (an unsupported config option, named) or `WeightLoadError`.
  """
  folder = _component_folder(path, subfolder)
  config = UNetConfig.from_diffusers(read_config(folder))
  module = UNet2DConditionModel(config, dtype=dtype, **module_kwargs)
  state = read_safetensors_folder(folder, variant=variant)
  return module, convert_state_dict(state, unet_abstract_params(config))


def save_unet(folder: str | os.PathLike, config: Any, params: PyTree) -> None:
  """Write a diffusers-format U-Net folder (config.json + diffusion_pytorch_model.safetensors, float32 torch
  layout) that `diffusers.UNet2DConditionModel.from_pretrained(folder)` and `load_unet` read. ``config`` is a
  `UNetConfig`; ``params`` the {"params": ...} tree (or its inner dict)."""
  save_safetensors_folder(folder, {k: v.astype(np.float32) for k, v in to_state_dict(params).items()},
                          config.to_diffusers())


# ---------------------------------------------------------------------------------------------------
# Whole Stable Diffusion folder.


@dataclasses.dataclass(frozen=True)
class StableDiffusionComponents(SDXLTextMixin):
  """A diffusers Stable Diffusion (1.x / 2.x) or Stable Diffusion XL folder loaded for JAX: Flax modules with
  their float32 params, the transformers tokenizers and the scheduler's config dict
  (``scheduler/scheduler_config.json``).

  SDXL folders (a ``text_encoder_2/``) also fill ``text_encoder_2`` (`CLIPTextModelWithProjection`), its params,
  ``tokenizer_2`` and ``force_zeros_for_empty_prompt`` (model_index.json; diffusers' default True); for SD
  folders these are None / False.
  """

  unet: UNet2DConditionModel
  unet_params: PyTree
  vae: AutoencoderKL
  vae_params: PyTree
  text_encoder: CLIPTextModel
  text_encoder_params: PyTree
  tokenizer: Any
  scheduler_config: dict[str, Any]
  text_encoder_2: CLIPTextModelWithProjection | None = None
  text_encoder_2_params: PyTree = None
  tokenizer_2: Any = None
  force_zeros_for_empty_prompt: bool = False



PIPELINE_SUBFOLDERS: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_SUBFOLDERS: tuple[str, ...] = ("text_encoder_2", "tokenizer_2")


def read_model_index(folder: str | os.PathLike) -> dict[str, Any]:
  """``model_index.json`` of a diffusers pipeline folder as a dict ({} when the folder has none)."""
  path = os.path.join(os.fspath(folder), "model_index.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as fh:
    return json.load(fh)


def _is_sdxl_folder(root: str, index: Mapping[str, Any]) -> bool:
  listed = index.get("text_encoder_2")
  return os.path.isdir(os.path.join(root, "text_encoder_2")) or (
    isinstance(listed, list | tuple) and any(v is not None for v in listed))


def load_pipeline(path: str | os.PathLike, variant: str | None = None, dtype: Any = jnp.float32,
                  **unet_kwargs: Any) -> StableDiffusionComponents:
  """Load a diffusers-format Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a
  Stable Diffusion XL one (the same plus text_encoder_2/ and tokenizer_2/, and model_index.json's
  ``force_zeros_for_empty_prompt``).

  ``dtype`` is the compute dtype of the networks (params stay float32; a ``force_upcast`` VAE computes in
  float32 for float16); ``unet_kwargs`` go to the U-Net module (attention implementation, remat). Raises
  FileNotFoundError naming the folder and the missing parts, ValueError when an SDXL folder's parts do not fit
  together (the U-Net's text_time inputs, its cross-attention width) or an SD folder's U-Net needs SDXL inputs.
  """
  root = os.fspath(path)
  index = read_model_index(root)
  sdxl = _is_sdxl_folder(root, index)
  wanted = PIPELINE_SUBFOLDERS + (SDXL_SUBFOLDERS if sdxl else ())
  missing = [s for s in wanted if not os.path.isdir(os.path.join(root, s))]
  if missing:
    kind = "Stable Diffusion XL" if sdxl else "Stable Diffusion"
    raise FileNotFoundError(f"{root} is not a diffusers {kind} folder: missing {missing}")
  scheduler_file = os.path.join(root, "scheduler", "scheduler_config.json")
  if not os.path.isfile(scheduler_file):
    raise FileNotFoundError(f"no scheduler_config.json in {os.path.join(root, 'scheduler')}")
  with open(scheduler_file) as fh:
    scheduler_config = json.load(fh)
  unet, unet_params = load_unet(root, "unet", variant=variant, dtype=dtype, **unet_kwargs)
  vae, vae_params = load_vae(root, variant=variant, dtype=dtype)
  text_encoder, text_encoder_params = load_text_encoder(root, variant=variant, dtype=dtype)
  extra: dict[str, Any] = {}
  if sdxl:
    text_encoder_2, params_2 = load_text_encoder(root, "text_encoder_2", variant=variant, dtype=dtype)
    if not isinstance(text_encoder_2, CLIPTextModelWithProjection):
      raise ValueError(f"{os.path.join(root, 'text_encoder_2')} has no text_projection: SDXL needs a "
                       "CLIPTextModelWithProjection")
    extra = dict(text_encoder_2=text_encoder_2, text_encoder_2_params=params_2,
                 tokenizer_2=load_tokenizer(root, "tokenizer_2"),
                 force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
    _check_sdxl_parts(root, unet.config, text_encoder.config.hidden_size, text_encoder_2.config)
  elif unet.config.addition_embed_type is not None:
    raise ValueError(f"{root}: the U-Net has addition_embed_type={unet.config.addition_embed_type!r} (SDXL) but "
                     "the folder has no text_encoder_2/")
  return StableDiffusionComponents(
    unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params, text_encoder=text_encoder,
    text_encoder_params=text_encoder_params, tokenizer=load_tokenizer(root),
    scheduler_config=scheduler_config, **extra)


def _check_sdxl_parts(root: str, unet: UNetConfig, hidden_1: int, config_2: CLIPTextConfig) -> None:
  """The SDXL U-Net takes both encoders' states (cross_attention_dim = D1 + D2) and text_time added features
  of width projection_dim + 6 * addition_time_embed_dim (diffusers' ``_get_add_time_ids`` check)."""
  if unet.addition_embed_type != "text_time":
    raise ValueError(f"{root}: an SDXL folder needs a U-Net with addition_embed_type='text_time', got "
                     f"{unet.addition_embed_type!r}")
  if unet.cross_attention_dim != hidden_1 + config_2.hidden_size:
    raise ValueError(f"{root}: U-Net cross_attention_dim {unet.cross_attention_dim} != text_encoder hidden_size "
                     f"{hidden_1} + text_encoder_2 hidden_size {config_2.hidden_size}")
  added = config_2.projection_dim + 6 * unet.addition_time_embed_dim
  if unet.projection_class_embeddings_input_dim != added:
    raise ValueError(f"{root}: U-Net projection_class_embeddings_input_dim "
                     f"{unet.projection_class_embeddings_input_dim} != text_encoder_2 projection_dim "
                     f"{config_2.projection_dim} + 6 time ids * addition_time_embed_dim "
                     f"{unet.addition_time_embed_dim}")
