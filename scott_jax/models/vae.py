"""Flax AutoencoderKL (the Stable Diffusion VAE), numerically matching diffusers' `AutoencoderKL`.

Layout is NHWC throughout: images are (B, H, W, 3) in [-1, 1], latents are (B, H/f, W/f, latent_channels) with
f = 2 ** (len(block_out_channels) - 1) (8 for SD1.5). Submodules are named exactly like the diffusers torch
modules, list items as `<name>_<index>` (torch `encoder.down_blocks.0.resnets.1.conv1.weight` is Flax
`encoder/down_blocks_0/resnets_1/conv1/kernel`), so a diffusers state dict converts mechanically
(`scott_jax.models.loading.convert_state_dict`) after `prepare_vae_state_dict` renames legacy attention keys.

Parameters are float32; `dtype` is the compute dtype. Group norms and the attention softmax reduce in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Config keys that diffusers writes but that do not change the network (bookkeeping or pipeline hints).
_IGNORED_CONFIG_KEYS = frozenset({"sample_size"})


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of a diffusers `AutoencoderKL` (the fields of its config.json that matter here).

  `scaling_factor` and `shift_factor` map VAE latents to the diffusion model's latents:
  z_diffusion = (z_vae - shift_factor) * scaling_factor (SD1.5 0.18215, SDXL 0.13025). `force_upcast` (diffusers'
  flag, True for SDXL's VAE, whose float16 activations overflow) makes a float16 compute dtype run in float32
  (`compute_dtype`); bfloat16 and float32 are unchanged.
  """

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  force_upcast: bool = True

  def __post_init__(self) -> None:
    n = len(self.block_out_channels)
    if n == 0:
      raise ValueError("block_out_channels must not be empty")
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(
        f"down_block_types ({len(self.down_block_types)}), up_block_types ({len(self.up_block_types)}) and "
        f"block_out_channels ({n}) must have the same length"
      )
    bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
    bad += [t for t in self.up_block_types if t != "UpDecoderBlock2D"]
    if bad:
      raise ValueError(f"unsupported VAE block types {bad}; only DownEncoderBlock2D/UpDecoderBlock2D")
    if self.act_fn not in ("silu", "swish"):
      raise ValueError(f"unsupported act_fn {self.act_fn!r}; only 'silu'/'swish'")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(
          f"block_out_channels {self.block_out_channels} not divisible by {self.norm_num_groups}"
        )

  def compute_dtype(self, dtype: Any) -> Any:
    """The compute dtype for a requested ``dtype``: float32 instead of float16 when force_upcast (diffusers
    upcasts such a VAE to float32 in its pipelines)."""
    return jnp.float32 if self.force_upcast and jnp.dtype(dtype) == jnp.float16 else dtype

  @property
  def downsample_factor(self) -> int:
    """Spatial ratio between image and latent (8 for SD1.5)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> VAEConfig:
    """Builds the config from a diffusers `AutoencoderKL` config.json dict.

    Keys starting with `_` and the pipeline hint `sample_size` are ignored; `latents_mean`
    and `latents_std` must be null (per-channel latent statistics are not supported); other unknown keys
    raise.
    """
    class_name = config.get("_class_name")
    if class_name is not None and class_name != "AutoencoderKL":
      raise ValueError(f"expected an AutoencoderKL config, got _class_name={class_name!r}")
    for key in ("latents_mean", "latents_std"):
      if config.get(key) is not None:
        raise ValueError(f"VAE config sets {key}; per-channel latent statistics are not supported")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    unknown = []
    for key, value in config.items():
      if key in fields:
        kwargs[key] = tuple(value) if isinstance(value, list) else value
      elif not (key.startswith("_") or key in _IGNORED_CONFIG_KEYS or key in ("latents_mean", "latents_std")):
        unknown.append(key)
    if unknown:
      raise ValueError(f"unknown VAE config keys {sorted(unknown)}")
    return cls(**kwargs)


def _conv(
  features: int, kernel: int, name: str, dtype: Any, stride: int = 1, padding: Any = "SAME"
) -> nn.Conv:
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=padding,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


def _group_norm(groups: int, eps: float, name: str, dtype: Any) -> nn.GroupNorm:
  # use_fast_variance=False: E[(x - mean)^2], as torch, instead of E[x^2] - mean^2.
  return nn.GroupNorm(
    num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name
  )


class ResnetBlock2D(nn.Module):
  """diffusers `ResnetBlock2D` without time embedding: x + conv2(silu(gn2(conv1(silu(gn1(x)))))).

  Input (B, H, W, C_in) -> output (B, H, W, out_channels); a 1x1 `conv_shortcut` when C_in != out_channels.
  """

  out_channels: int
  groups: int
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.silu(_group_norm(self.groups, self.eps, "norm1", self.dtype)(x))
    h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
    h = nn.silu(_group_norm(self.groups, self.eps, "norm2", self.dtype)(h))
    h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
    return x + h


class SpatialSelfAttention(nn.Module):
  """The VAE mid-block attention (diffusers `Attention` with group norm, one head, residual).

  Input (B, H, W, C) -> (B, H, W, C): x + to_out_0(softmax(q k^T / sqrt(C)) v), q, k, v from gn(x) over the
  H*W positions. Logits and softmax in float32 (diffusers `upcast_softmax=True`).
  """

  groups: int
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, hgt, wid, c = x.shape
    dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    h = _group_norm(self.groups, self.eps, "group_norm", self.dtype)(x).reshape(b, hgt * wid, c)
    q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bqk,bkc->bqc", weights, v)
    out = dense("to_out_0")(out).reshape(b, hgt, wid, c)
    return x + out


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv after zero padding (0, 1) on H and W (diffusers `Downsample2D(padding=0)`)."""

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(self.channels, 3, "conv", self.dtype, stride=2, padding="VALID")(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour x2 upsampling then a 3x3 conv (diffusers `Upsample2D(use_conv=True)`)."""

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(self.channels, 3, "conv", self.dtype)(x)


class DownEncoderBlock2D(nn.Module):
  """`num_layers` resnets then an optional `Downsample2D` (named `downsamplers_0`)."""

  out_channels: int
  num_layers: int
  groups: int
  add_downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, dtype=self.dtype, name=f"resnets_{i}")(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, dtype=self.dtype, name="downsamplers_0")(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """`num_layers` resnets then an optional `Upsample2D` (named `upsamplers_0`)."""

  out_channels: int
  num_layers: int
  groups: int
  add_upsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, dtype=self.dtype, name=f"resnets_{i}")(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
    return x


class UNetMidBlock2D(nn.Module):
  """resnets_0, then (attentions_0, resnets_1); the attention is skipped when `add_attention` is False."""

  channels: int
  groups: int
  add_attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = ResnetBlock2D(self.channels, self.groups, dtype=self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = SpatialSelfAttention(self.groups, dtype=self.dtype, name="attentions_0")(x)
    return ResnetBlock2D(self.channels, self.groups, dtype=self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
  """Image (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels) (before `quant_conv`)."""

  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    chans = cfg.block_out_channels
    x = _conv(chans[0], 3, "conv_in", self.dtype)(x)
    for i, c in enumerate(chans):
      x = DownEncoderBlock2D(
        c,
        cfg.layers_per_block,
        cfg.norm_num_groups,
        add_downsample=i < len(chans) - 1,
        dtype=self.dtype,
        name=f"down_blocks_{i}",
      )(x)
    x = UNetMidBlock2D(
      chans[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype, name="mid_block"
    )(x)
    x = nn.silu(_group_norm(cfg.norm_num_groups, 1e-6, "conv_norm_out", self.dtype)(x))
    return _conv(2 * cfg.latent_channels, 3, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
  """Latent (B, h, w, latent_channels) (after `post_quant_conv`) -> image (B, h*f, w*f, out_channels)."""

  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    cfg = self.config
    chans = tuple(reversed(cfg.block_out_channels))
    x = _conv(chans[0], 3, "conv_in", self.dtype)(z)
    x = UNetMidBlock2D(
      chans[0], cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype, name="mid_block"
    )(x)
    for i, c in enumerate(chans):
      x = UpDecoderBlock2D(
        c,
        cfg.layers_per_block + 1,
        cfg.norm_num_groups,
        add_upsample=i < len(chans) - 1,
        dtype=self.dtype,
        name=f"up_blocks_{i}",
      )(x)
    x = nn.silu(_group_norm(cfg.norm_num_groups, 1e-6, "conv_norm_out", self.dtype)(x))
    return _conv(cfg.out_channels, 3, "conv_out", self.dtype)(x)


class AutoencoderKL(nn.Module):
  """diffusers `AutoencoderKL` in Flax (NHWC). Use `encode` / `decode` via `apply(..., method=...)`.

  `__call__` (used for `init`) runs encode then decode of the posterior mean.
  """

  config: VAEConfig
  dtype: Any = jnp.float32

  def setup(self) -> None:
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype)
    self.decoder = Decoder(cfg, self.dtype)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, 1, None, self.dtype)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, 1, None, self.dtype)

  def encode(self, images: Array) -> tuple[Array, Array]:
    """Images (B, H, W, in_channels) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_channels).

    float32 outputs; logvar clipped to [-30, 20] as diffusers' `DiagonalGaussianDistribution`.
    """
    moments = self.encoder(images.astype(self.dtype))
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    moments = moments.astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents: Array) -> Array:
    """Unscaled VAE latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels), float32."""
    z = latents.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images: Array) -> Array:
    mean, _ = self.encode(images)
    return self.decode(mean)


@dataclasses.dataclass(frozen=True)
class PixelSpaceConfig:
  """The config of `PixelSpace`: the fields of `VAEConfig` that the training and sampling code reads.

  ``latent_channels`` is 1 (grey: the image's channel mean) or ``in_channels`` (the image itself).
  """

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 1
  scaling_factor: float = 1.0
  shift_factor: float | None = None
  downsample_factor: int = 1

  def __post_init__(self) -> None:
    if self.latent_channels not in (1, self.in_channels):
      raise ValueError(f"PixelSpace latent_channels={self.latent_channels}: expected 1 (grey) or in_channels "
                       f"({self.in_channels})")
    if self.out_channels not in (self.latent_channels, 3):
      raise ValueError(f"PixelSpace out_channels={self.out_channels}: expected latent_channels or 3")
    if self.scaling_factor != 1.0 or self.shift_factor is not None or self.downsample_factor != 1:
      raise ValueError("PixelSpace has scaling_factor 1, no shift_factor and downsample_factor 1")

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> PixelSpaceConfig:
    """From a ``vae/config.json`` dict with ``_class_name`` "PixelSpace"; unknown keys raise."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in fields)
    if unknown:
      raise ValueError(f"unknown PixelSpace config keys {unknown}; allowed: {sorted(fields)}")
    return cls(**{k: v for k, v in config.items() if k in fields})


class PixelSpace(nn.Module):
  """The identity "autoencoder" of a pixel-space diffusion model (no parameters), with `AutoencoderKL`'s
  interface (``config``, ``encode``, ``decode``) so that training, sampling and export treat it as a VAE.

  A diffusers-style folder marks it with ``vae/config.json`` = {"_class_name": "PixelSpace", ...} (our
  convention; diffusers itself has no such class). encode: images (B, H, W, in_channels) in [-1, 1] -> (mean,
  logvar) with mean the image (or its channel mean when latent_channels = 1) and logvar -inf (a point mass, so
  a posterior "sample" is the mean); decode: (B, H, W, latent_channels) -> (B, H, W, out_channels) (a grey
  channel repeated).
  """

  config: PixelSpaceConfig
  dtype: Any = jnp.float32

  def encode(self, images: Array) -> tuple[Array, Array]:
    x = images.astype(jnp.float32)
    if self.config.latent_channels != x.shape[-1]:
      x = jnp.mean(x, axis=-1, keepdims=True)
    return x, jnp.full_like(x, -jnp.inf)

  def decode(self, latents: Array) -> Array:
    x = latents.astype(jnp.float32)
    if self.config.out_channels != x.shape[-1]:
      x = jnp.repeat(x, self.config.out_channels, axis=-1)
    return x

  def __call__(self, images: Array) -> Array:
    return self.decode(self.encode(images)[0])


def pixel_space_config_json(config: PixelSpaceConfig) -> dict[str, Any]:
  """The ``vae/config.json`` dict that marks a pipeline folder as pixel space (read by `loading.load_vae`)."""
  return {"_class_name": "PixelSpace", **dataclasses.asdict(config)}


def encode_to_latents(vae: AutoencoderKL | PixelSpace, params: Any, images: Array,
                      key: Array | None = None) -> Array:
  """Images (B, H, W, C) in [-1, 1] -> diffusion latents (B, H/f, W/f, latent_channels), float32.

  With `key`, samples the posterior z = mean + exp(logvar / 2) * N(0, I) (diffusers `latent_dist.sample()`);
  without, uses its mean (`latent_dist.mode()`). Then z <- (z - shift_factor) * scaling_factor.
  """
  mean, logvar = vae.apply(params, images, method="encode")
  z = mean
  if key is not None:
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
  cfg = vae.config
  if cfg.shift_factor is not None:
    z = z - cfg.shift_factor
  return z * cfg.scaling_factor


def decode_latents(vae: AutoencoderKL | PixelSpace, params: Any, latents: Array) -> Array:
  """Diffusion latents (B, h, w, latent_channels) -> images (B, h*f, w*f, C), float32, ~[-1, 1] (not clipped).

  Inverse scaling of `encode_to_latents`: z = latents / scaling_factor + shift_factor, then the decoder.
  """
  cfg = vae.config
  z = latents / cfg.scaling_factor
  if cfg.shift_factor is not None:
    z = z + cfg.shift_factor
  return vae.apply(params, z, method="decode")


# Legacy attention names (diffusers < 0.14 and some hub checkpoints) -> current names.
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def prepare_vae_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Normalises a diffusers AutoencoderKL state dict before the generic torch -> Flax conversion.

  Renames the legacy mid-block attention keys (`query/key/value/proj_attn`, as diffusers'
  `_convert_deprecated_attention_blocks`) and squeezes 1x1-conv attention projections (C, C, 1, 1) to Linear
  (C, C). Returns a new dict; the input is not modified.
  """
  out: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    parts = key.split(".")
    if "attentions" in parts and len(parts) >= 3:
      name = parts[-2]
      if name in _LEGACY_ATTENTION_NAMES:
        parts = parts[:-2] + _LEGACY_ATTENTION_NAMES[name].split(".") + parts[-1:]
        key = ".".join(parts)
      proj = parts[-2] in ("to_q", "to_k", "to_v") or parts[-3:-1] == ["to_out", "0"]
      if proj and parts[-1] == "weight" and value.ndim == 4:
        value = value[:, :, 0, 0]
    if key in out:
      raise ValueError(f"VAE state dict has both legacy and current names for {key}")
    out[key] = value
  return out
