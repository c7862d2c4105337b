"""Flax CLIP (image and text towers with their projections), numerically matching transformers' `CLIPModel`,
for the CLIP score (paper: CLIP ViT-g/14, laion/CLIP-ViT-g-14-laion2B-s12B-b42K).

The text tower is `scott_jax.models.clip_text.CLIPTextModel`; the vision tower (`CLIPVisionTransformer`, the
torch `CLIPVisionModel`'s `vision_model`) is defined here. Submodules are named like the torch modules, list
items as `<name>_<index>`: torch `vision_model.encoder.layers.3.self_attn.q_proj.weight` is Flax
`vision_model/encoder/layers_3/self_attn/q_proj/kernel`, so a transformers CLIPModel folder (config.json +
model.safetensors, or sharded with model.safetensors.index.json) converts with scott_jax.models.loading's
generic `read_safetensors_folder` + `convert_state_dict` (`load_clip_model`).

Images are NHWC float32, preprocessed on the host as transformers' `CLIPImageProcessor` (`preprocess_images`:
PIL bicubic resize of the shortest side to 224 on uint8, centre crop 224, /255, CLIP mean/std).

Parameters are float32; `dtype` is the compute dtype (layer norms and softmax reduce in float32).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from scott_jax.models import clip_text, loading
from scott_jax.models.clip_text import CLIPTextConfig, CLIPTextModel

Array = jax.Array

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Architecture of a transformers `CLIPVisionModel` (the fields of its config.json that matter here)."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self) -> None:
    clip_text.check_tower(self)
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> CLIPVisionConfig:
    """From a transformers `clip_vision_model` config dict (or a `clip` config's `vision_config`)."""
    model_type = config.get("model_type", "clip_vision_model")
    if model_type == "clip" and "vision_config" in config:
      config, model_type = config["vision_config"], "clip_vision_model"
    if model_type != "clip_vision_model":
      raise ValueError(f"expected a clip_vision_model config, got model_type={model_type!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names and v is not None})


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A transformers `CLIPModel`: both towers and the shared embedding (projection) width."""

  text: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
  vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
  projection_dim: int = 512

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> CLIPConfig:
    """From a transformers CLIPModel config.json dict (model_type "clip")."""
    if config.get("model_type") != "clip":
      raise ValueError(f"expected a CLIPModel config (model_type 'clip'), got {config.get('model_type')!r}")
    return cls(
      text=CLIPTextConfig.from_dict(config.get("text_config", {})),
      vision=CLIPVisionConfig.from_dict(config.get("vision_config", {})),
      projection_dim=int(config.get("projection_dim", 512)),
    )


def vit_g14_config() -> CLIPConfig:
  """CLIP ViT-g/14 (laion/CLIP-ViT-g-14-laion2B-s12B-b42K), the paper's CLIP-score model.

  Numbers as open_clip's ViT-g-14.json (vision width 1408, 40 layers, head width 88 -> 16 heads, mlp ratio
  4.3637 -> 6144, patch 14, image 224; text width 1024, 24 layers, 16 heads, mlp 4096; embed_dim 1024), with
  GELU (erf) activations as the hub's transformers config.
  """
  return CLIPConfig(
    text=CLIPTextConfig(
      hidden_size=1024,
      intermediate_size=4096,
      num_hidden_layers=24,
      num_attention_heads=16,
      hidden_act="gelu",
    ),
    vision=CLIPVisionConfig(
      hidden_size=1408,
      intermediate_size=6144,
      num_hidden_layers=40,
      num_attention_heads=16,
      image_size=224,
      patch_size=14,
      hidden_act="gelu",
    ),
    projection_dim=1024,
  )


class CLIPVisionEmbeddings(nn.Module):
  """Images (B, S, S, C) -> [class token; patch embeddings] + position embeddings, (B, 1 + (S/p)^2, D)."""

  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    cfg = self.config
    b = pixel_values.shape[0]
    class_embedding = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.hidden_size,))
    p = cfg.patch_size
    patches = nn.Conv(
      cfg.hidden_size,
      (p, p),
      strides=(p, p),
      padding="VALID",
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="patch_embedding",
    )(pixel_values.astype(self.dtype))
    patches = patches.reshape(b, -1, cfg.hidden_size)  # row-major over the patch grid, as torch flatten(2)
    cls = jnp.broadcast_to(class_embedding.astype(patches.dtype), (b, 1, cfg.hidden_size))
    positions = nn.Embed(
      cfg.num_positions, cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32, name="position_embedding"
    )(jnp.arange(cfg.num_positions))
    return jnp.concatenate([cls, patches], axis=1) + positions[None]


class CLIPVisionEncoder(nn.Module):
  """Stack of `num_hidden_layers` layers named `layers_<i>`."""

  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.config.num_hidden_layers):
      x = clip_text.CLIPEncoderLayer(self.config, self.dtype, causal=False, name=f"layers_{i}")(x)
    return x


class CLIPVisionTransformer(nn.Module):
  """transformers `CLIPVisionModel`: images (B, S, S, C) float32 (normalised, NHWC, S = image_size) ->
  pooled output (B, D): post_layernorm of the class token of the last layer."""

  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    cfg = self.config
    if pixel_values.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
      raise ValueError(
        f"expected images (B, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}), got {pixel_values.shape}"
      )
    x = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values)
    x = clip_text.layer_norm(cfg.layer_norm_eps, "pre_layrnorm", self.dtype)(x)  # sic, the torch name
    x = CLIPVisionEncoder(cfg, self.dtype, name="encoder")(x)
    pooled = clip_text.layer_norm(cfg.layer_norm_eps, "post_layernorm", self.dtype)(x[:, 0])
    return pooled.astype(jnp.float32)


@flax.struct.dataclass
class CLIPOutput:
  """image_embeds (B_i, P) and text_embeds (B_t, P): projected, not normalised (transformers'
  `get_image_features` / `get_text_features`)."""

  image_embeds: Array
  text_embeds: Array


class CLIPModel(nn.Module):
  """transformers `CLIPModel`: both towers, `visual_projection`, `text_projection` (no bias), `logit_scale`."""

  config: CLIPConfig
  dtype: Any = jnp.float32

  def setup(self) -> None:
    cfg = self.config
    self.text_model = CLIPTextModel(cfg.text, self.dtype)
    self.vision_model = CLIPVisionTransformer(cfg.vision, self.dtype)
    proj = lambda: nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)
    self.visual_projection = proj()
    self.text_projection = proj()
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)), ())

  def get_image_features(self, pixel_values: Array) -> Array:
    """Normalised images (B, S, S, 3) float32 -> image embeddings (B, P) float32 (not normalised)."""
    return self.visual_projection(self.vision_model(pixel_values)).astype(jnp.float32)

  def get_text_features(self, input_ids: Array) -> Array:
    """Token ids (B, L) int -> text embeddings (B, P) float32 (not normalised), pooled at the end token."""
    return self.text_projection(self.text_model(input_ids).pooler_output).astype(jnp.float32)

  def __call__(self, pixel_values: Array, input_ids: Array) -> CLIPOutput:
    return CLIPOutput(self.get_image_features(pixel_values), self.get_text_features(input_ids))


# ---------------------------------------------------------------------------------------------------------------
# Host preprocessing, as transformers' CLIPImageProcessor.


def preprocess_images(
  images: Sequence[np.ndarray] | np.ndarray,
  size: int = 224,
  mean: Sequence[float] = OPENAI_CLIP_MEAN,
  std: Sequence[float] = OPENAI_CLIP_STD,
) -> np.ndarray:
  """uint8 RGB images (H_i, W_i, 3) -> (N, size, size, 3) float32, as transformers' CLIPImageProcessor:
  PIL bicubic resize of the uint8 image so its shorter side is `size` (longer side int(size * long / short)),
  centre crop (offsets (H - size) // 2, (W - size) // 2), x / 255, then (x - mean) / std per channel."""
  mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  out = []
  for image in images:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"expected uint8 RGB images (H, W, 3), got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top : top + size, left : left + size].astype(np.float64) / 255.0
    out.append((crop.astype(np.float32) - mean32) / std32)
  if not out:
    raise ValueError("no images")
  return np.stack(out).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Loading a transformers CLIPModel folder.


def abstract_params(config: CLIPConfig) -> Any:
  """{"params": ...} of `jax.ShapeDtypeStruct` for `config` (no memory; builds ViT-g/14 in milliseconds)."""
  s = config.vision.image_size
  images = jnp.zeros((1, s, s, config.vision.num_channels), jnp.float32)
  return jax.eval_shape(CLIPModel(config).init, jax.random.PRNGKey(0), images, jnp.zeros((1, 2), jnp.int32))


def prepare_clip_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops the non-parameter `position_ids` buffers that checkpoints saved by older transformers contain."""
  return {k: v for k, v in state_dict.items() if not k.endswith(".position_ids")}


def load_clip_model(folder: str, dtype: Any = jnp.float32) -> tuple[CLIPModel, Any]:
  """A transformers CLIPModel folder (config.json + model.safetensors, or sharded) -> (CLIPModel, float32
  params {"params": ...}), through scott_jax.models.loading's generic reader and converter (every tensor
  checked against the Flax shapes; `loading.WeightLoadError` lists mismatches). FileNotFoundError names a
  missing config or weights file."""
  config = CLIPConfig.from_dict(loading.read_config(folder))
  state = prepare_clip_state_dict(loading.read_safetensors_folder(folder))
  return CLIPModel(config, dtype), loading.convert_state_dict(state, abstract_params(config))
