"""Flax Stable Diffusion U-Net (diffusers `UNet2DConditionModel`), numerically matching diffusers.

Layout is NHWC: samples are (B, H, W, in_channels) latents, text states (B, L, cross_attention_dim),
timesteps a scalar or (B,) (integers 0..999 or floats), the optional guidance condition ``timestep_cond``
(B, time_cond_proj_dim) and, for SDXL (``addition_embed_type="text_time"``), the pooled text embedding
``text_embeds`` (B, P) and the micro-conditioning ``time_ids`` (B, n) (n = 6 for SDXL: original height and
width, crop top and left, target height and width, in pixels; see `add_time_ids`).
Submodules are named like the diffusers torch modules with list indices joined
(``down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_out_0``), so `scott_jax.models.loading` converts a
diffusers state dict mechanically.

Supported: CrossAttnDownBlock2D / DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D / UpBlock2D,
positional (sinusoidal) timestep embedding, `time_cond_proj_dim` (LCM guidance embedding: ``cond_proj``, a
Linear without bias applied to the condition and added to the sinusoidal timestep features before
``linear_1``), per-block `attention_head_dim` (diffusers' name for the number of heads), per-block
`cross_attention_dim` and `transformer_layers_per_block`, `use_linear_projection`, `upcast_attention`, a first
down block without attention (SDXL), and SDXL's ``addition_embed_type="text_time"``: ``add_time_proj`` (the
sinusoidal embedding of each time id at `addition_time_embed_dim`, the timestep's flip/shift) concatenated after
``text_embeds``, then ``add_embedding`` (a `TimestepEmbedding` MLP from `projection_class_embeddings_input_dim`
= P + n * addition_time_embed_dim) added to the timestep embedding. Options outside this set raise in
`UNetConfig.from_diffusers` with the option name.

The model is split in two halves (the discriminator reuses them): `encode` (conv_in, time embedding, down
blocks, mid block) -> (h, skips, temb) and `decode` (up blocks, norm, SiLU, conv_out); ``__call__`` is
``decode(*encode(...))``. Parameters are float32; `dtype` is the compute dtype (group norms and softmax
reduce in float32, the returned noise prediction is float32).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The attention implementations, and the rematerialisation policies (`jax.checkpoint_policies` names) for the U-Net
# blocks with ``remat=True``: what each block keeps from its forward pass for the backward pass (the rest is
# recomputed).
from scott_jax.choices import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES

Array = jax.Array
PyTree = Any

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
ADDITION_EMBED_TYPES = (None, "text_time")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers options we accept only at their default value (option -> default). `None` for "absent or null".
_FIXED_OPTIONS: dict[str, Any] = {
  "center_input_sample": False,
  "only_cross_attention": False,
  "mid_block_only_cross_attention": None,
  "dual_cross_attention": False,
  "class_embed_type": None,
  "num_class_embeds": None,
  "class_embeddings_concat": False,
  "encoder_hid_dim": None,
  "encoder_hid_dim_type": None,
  "resnet_time_scale_shift": "default",
  "resnet_skip_time_act": False,
  "resnet_out_scale_factor": 1.0,
  "time_embedding_type": "positional",
  "time_embedding_act_fn": None,
  "timestep_post_act": None,
  "attention_type": "default",
  "cross_attention_norm": None,
  "num_attention_heads": None,
  "reverse_transformer_layers_per_block": None,
  "dropout": 0.0,
}
# Present in configs but without effect on the supported architecture.
_IGNORED_OPTIONS = ("addition_embed_type_num_heads",)


def _per_block(value: Any, n: int, name: str) -> tuple:
  if isinstance(value, list | tuple):
    if len(value) != n:
      raise ValueError(f"UNet config {name} has {len(value)} entries for {n} blocks")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Architecture of a Stable Diffusion U-Net (the supported subset of diffusers' config.json).

  Per-block fields are tuples with one entry per down block (up blocks use them reversed).
  `attention_head_dim` is, as in diffusers, the NUMBER of heads per block (head size = channels / heads).
  """

  sample_size: int | None = 64
  in_channels: int = 4
  out_channels: int = 4
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
  transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
  attention_head_dim: tuple[int, ...] = (8, 8, 8, 8)
  cross_attention_dim: int = 768
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  use_linear_projection: bool = False
  upcast_attention: bool = False
  time_cond_proj_dim: int | None = None
  time_embedding_dim: int | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None

  def __post_init__(self) -> None:
    n = len(self.block_out_channels)
    for name in ("down_block_types", "up_block_types", "layers_per_block", "transformer_layers_per_block",
                 "attention_head_dim"):
      if len(getattr(self, name)) != n:
        raise ValueError(f"UNet config {name} has {len(getattr(self, name))} entries, block_out_channels {n}")
    bad = [t for t in self.down_block_types if t not in _DOWN_TYPES]
    bad += [t for t in self.up_block_types if t not in _UP_TYPES]
    if self.mid_block_type != "UNetMidBlock2DCrossAttn":
      bad.append(self.mid_block_type)
    if bad:
      raise ValueError(f"unsupported U-Net block types {bad} (supported: {_DOWN_TYPES + _UP_TYPES} and "
                       "UNetMidBlock2DCrossAttn)")
    if self.act_fn not in ("silu", "swish"):
      raise ValueError(f"unsupported act_fn {self.act_fn!r} (only silu/swish)")
    for c, heads in zip(self.block_out_channels, self.attention_head_dim, strict=True):
      if c % self.norm_num_groups or c % heads:
        raise ValueError(f"block channels {c} must divide by norm_num_groups {self.norm_num_groups} and "
                         f"attention_head_dim (heads) {heads}")
    if self.addition_embed_type not in ADDITION_EMBED_TYPES:
      raise ValueError(f"unsupported UNet option addition_embed_type={self.addition_embed_type!r} (supported: "
                       f"{ADDITION_EMBED_TYPES})")
    dims = (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim)
    if self.addition_embed_type is None and dims != (None, None):
      raise ValueError("addition_time_embed_dim and projection_class_embeddings_input_dim need "
                       "addition_embed_type='text_time'")
    if self.addition_embed_type == "text_time" and not (
        all(isinstance(d, int) and d > 0 for d in dims) and dims[1] > dims[0]):
      raise ValueError(f"addition_embed_type='text_time' needs addition_time_embed_dim > 0 and "
                       f"projection_class_embeddings_input_dim > it, got {dims}")

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> UNetConfig:
    """From a diffusers `UNet2DConditionModel` config.json dict. Keys starting with ``_`` are ignored; an
    option outside the supported set (or at a non-default value) raises ValueError naming it."""
    class_name = config.get("_class_name")
    if class_name is not None and class_name != "UNet2DConditionModel":
      raise ValueError(f"expected a UNet2DConditionModel config, got _class_name={class_name!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    n = len(config.get("block_out_channels", cls.block_out_channels))
    per_block = ("layers_per_block", "transformer_layers_per_block", "attention_head_dim")
    kwargs: dict[str, Any] = {}
    for key, value in config.items():
      if key.startswith("_") or key in _IGNORED_OPTIONS:
        continue
      if key in _FIXED_OPTIONS:
        default = _FIXED_OPTIONS[key]
        if not (value == default or (key == "mid_block_only_cross_attention" and value is False)):
          raise ValueError(f"unsupported UNet option {key}={value!r} (only {default!r} is supported)")
        continue
      if key not in fields:
        raise ValueError(f"unknown UNet config option {key!r}")
      if key == "cross_attention_dim" and isinstance(value, list | tuple):
        if len(set(value)) != 1:  # one encoder_hidden_states feeds every block
          raise ValueError(f"unsupported UNet option cross_attention_dim={value!r} (must be one value)")
        value = value[0]
      elif key in per_block:
        if any(isinstance(v, list | tuple) for v in (value if isinstance(value, list | tuple) else ())):
          raise ValueError(f"unsupported UNet option {key}={value!r} (nested per-layer lists)")
        value = _per_block(value, n, key)
      elif key == "sample_size" and isinstance(value, list | tuple):
        if len(set(value)) != 1:
          raise ValueError(f"unsupported UNet option sample_size={value!r} (square only)")
        value = value[0]
      elif key == "upcast_attention" and value is None:  # SDXL's config.json: null, diffusers reads it as False
        value = False
      elif isinstance(value, list):
        value = tuple(value)
      kwargs[key] = value
    for key in per_block:  # diffusers defaults when absent
      if key not in kwargs:
        kwargs[key] = _per_block({"layers_per_block": 2, "transformer_layers_per_block": 1,
                                  "attention_head_dim": 8}[key], n, key)
    kwargs.setdefault("cross_attention_dim", 1280)  # diffusers' default
    return cls(**kwargs)

  def to_diffusers(self) -> dict[str, Any]:
    """The config.json dict for diffusers `UNet2DConditionModel` (round-trips through `from_diffusers`)."""
    out: dict[str, Any] = {"_class_name": "UNet2DConditionModel"}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      out[f.name] = list(value) if isinstance(value, tuple) else value
    for key in ("layers_per_block", "transformer_layers_per_block"):
      if len(set(out[key])) == 1:  # diffusers accepts ints and lists; ints keep the file familiar
        out[key] = out[key][0]
    out.update({k: v for k, v in _FIXED_OPTIONS.items() if k != "mid_block_only_cross_attention"})
    return out


# ---------------------------------------------------------------------------------------------------
# Layers.

def _dense(features: int, name: str, dtype: Any, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def _conv(features: int, kernel: int, name: str, dtype: Any, stride: int = 1, padding: Any = None) -> nn.Conv:
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)) if padding is None else padding,
                 dtype=dtype, param_dtype=jnp.float32, name=name)


def _group_norm(groups: int, eps: float, name: str, dtype: Any) -> nn.GroupNorm:
  # use_fast_variance=False: E[(x - mean)^2] as torch (statistics in float32).
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                      use_fast_variance=False, name=name)


def timestep_embedding(timesteps: Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> Array:
  """diffusers `get_timestep_embedding`: (B,) timesteps -> (B, dim) float32 [sin, cos] (or [cos, sin])."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def add_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                 target_size: tuple[int, int]) -> tuple[int, int, int, int, int, int]:
  """SDXL micro-conditioning as diffusers' ``_get_add_time_ids``: (original height, original width, crop top,
  crop left, target height, target width), all in pixels."""
  out = (*original_size, *crop_top_left, *target_size)
  if len(out) != 6:
    raise ValueError(f"original_size, crop_top_left and target_size must be pairs, got {original_size}, "
                     f"{crop_top_left}, {target_size}")
  return tuple(int(v) for v in out)


def text_time_features(text_embeds: Array, time_ids: Array, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0) -> Array:
  """Input of SDXL's ``add_embedding``: text_embeds (B, P) and time_ids (B, n) -> (B, P + n * dim) float32,
  [text_embeds, timestep_embedding(time_ids[:, 0]), ..., timestep_embedding(time_ids[:, n - 1])]."""
  b, n = time_ids.shape
  t = timestep_embedding(time_ids.reshape(-1), dim, flip_sin_to_cos, freq_shift).reshape(b, n * dim)
  return jnp.concatenate([jnp.asarray(text_embeds, jnp.float32), t], axis=-1)


def batch_sharded(a: Array) -> Array:
  """``a`` (B, ...) constrained to the ``batch`` logical axis, its other dimensions whole (a no-op without logical
  axis rules; `scott_jax.parallel.jit_train_step` traces with the mesh's). The constraint's transpose constrains the
  cotangent alike, so around a call it pins the backward's operands too."""
  return nn.with_logical_constraint(a, ("batch",) + (None,) * (a.ndim - 1))


def padded_to_even(q: Array, k: Array, v: Array, implementation: str) -> Array:
  """`jax.nn.dot_product_attention` with odd query / key lengths padded by one: the padded key is masked out (a
  padding mask by ``key_value_seq_lengths``), the padded query row dropped, so the result is the unpadded one.
  cuDNN's fused attention in JAX 0.10.2 refuses to train odd lengths ("Unsupported sequence length Q 4096, KV 77":
  CLIP's 77 text tokens in every cross-attention). q (B, T, N, H), k, v (B, S, N, H) -> (B, T, N, H)."""
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  pad = lambda a, n: jnp.pad(a, ((0, 0), (0, n % 2), (0, 0), (0, 0)))
  lengths = jnp.full((b,), s, jnp.int32)
  out = jax.nn.dot_product_attention(pad(q, t), pad(k, s), pad(v, s), key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return batch_sharded(out)[:, :t]


def dot_product_attention(q: Array, k: Array, v: Array, *, implementation: str = "xla",
                          chunk_size: int = 1024) -> Array:
  """Softmax attention, (B, T, N, H) queries and (B, S, N, H) keys/values -> (B, T, N, H); scale H^-1/2.

  ``implementation``: "xla" / "cudnn" (`jax.nn.dot_product_attention` with that implementation; cudnn needs a
  GPU and fp16/bf16) or "chunked" (XLA attention mapped with `lax.map` over query blocks of ``chunk_size``,
  each block checkpointed, so only a (B, N, chunk, S) logits block is live at a time, in the forward and in the
  backward pass). Logits and softmax are float32.
  """
  if implementation == "cudnn":
    # cuDNN's partitioners (custom_partitioning rules) take their operands sharded along the batch alone: q, k, v
    # alike ("Query, key and value should have same sharding"), and in the backward the output's cotangent in a
    # layout the mesh can name. Under FSDP the SPMD partitioner would give k and v their projection kernels'
    # sharding, and the cotangent (from the sharded output projection's backward) heads x head-dim tiles
    # ("dim_size=2 is not divisible by axis_size=8" for 2 heads on fsdp 8): both compiles failed.
    q, k, v = map(batch_sharded, (q, k, v))
    if q.shape[1] % 2 or k.shape[1] % 2:
      return padded_to_even(q, k, v, implementation)
    return batch_sharded(jax.nn.dot_product_attention(q, k, v, implementation=implementation))
  if implementation == "xla":
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")
  if implementation != "chunked":
    raise ValueError(f"unknown attention implementation {implementation!r}; "
                     f"one of {ATTENTION_IMPLEMENTATIONS}")
  b, t, n, h = q.shape
  if t <= chunk_size:
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")
  blocks = -(-t // chunk_size)
  q = jnp.pad(q, ((0, 0), (0, blocks * chunk_size - t), (0, 0), (0, 0)))
  q = jnp.moveaxis(q.reshape(b, blocks, chunk_size, n, h), 1, 0)
  # The block is checkpointed: under differentiation each block's logits are recomputed in the backward pass
  # instead of being saved, so the residuals are (q block, k, v) and not the whole (B, N, T, S) logits stacked
  # over the blocks (what a plain lax.map saves for its backward).
  block = jax.checkpoint(lambda qc, k, v: jax.nn.dot_product_attention(qc, k, v, implementation="xla"))
  out = jax.lax.map(lambda qc: block(qc, k, v), q)
  return jnp.moveaxis(out, 0, 1).reshape(b, blocks * chunk_size, n, h)[:, :t]


def resolve_attention(implementation: str, dtype: Any, platform: str | None = None) -> str:
  """The attention implementation to run: "auto" is "cudnn" (fused flash attention) on a GPU with bfloat16 or
  float16 compute and "chunked" otherwise (CPU, TPU, float32); any other name is returned unchanged.

  ``platform``: "cpu" / "gpu" / "tpu" (default: ``jax.default_backend()`` at trace time; "cuda" counts as gpu).
  """
  if implementation != "auto":
    return implementation
  platform = jax.default_backend() if platform is None else platform
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if platform in ("gpu", "cuda") and half else "chunked"


class Attention(nn.Module):
  """diffusers `Attention` (no bias on q/k/v, ``to_out_0`` with bias). x (B, T, C), context (B, S, C_ctx)."""

  heads: int
  dim: int
  dtype: Any = jnp.float32
  upcast: bool = False
  implementation: str = "xla"
  chunk_size: int = 1024

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None) -> Array:
    context = x if context is None else context
    b, t, _ = x.shape
    head = self.dim // self.heads
    q = _dense(self.dim, "to_q", self.dtype, use_bias=False)(x).reshape(b, t, self.heads, head)
    k = _dense(self.dim, "to_k", self.dtype, use_bias=False)(context).reshape(b, -1, self.heads, head)
    v = _dense(self.dim, "to_v", self.dtype, use_bias=False)(context).reshape(b, -1, self.heads, head)
    if self.upcast and self.implementation != "cudnn":  # cuDNN takes fp16/bf16 and reduces in float32 itself
      q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    out = dot_product_attention(q, k, v, implementation=self.implementation, chunk_size=self.chunk_size)
    out = out.reshape(b, t, self.dim).astype(self.dtype)
    return _dense(self.dim, "to_out_0", self.dtype)(out)


class GEGLU(nn.Module):
  """diffusers `GEGLU`: proj (C -> 2 inner), a * gelu(g) with the exact (erf) GELU."""

  inner: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    a, g = jnp.split(_dense(2 * self.inner, "proj", self.dtype)(x), 2, axis=-1)
    return a * nn.gelu(g, approximate=False)


class BasicTransformerBlock(nn.Module):
  """Self-attention, cross-attention and GEGLU feed-forward, each pre-LayerNorm (eps 1e-5) and residual."""

  dim: int
  heads: int
  dtype: Any = jnp.float32
  upcast: bool = False
  implementation: str = "xla"
  chunk_size: int = 1024

  @nn.compact
  def __call__(self, x: Array, context: Array) -> Array:
    def norm(name: str) -> nn.LayerNorm:
      return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32, use_fast_variance=False,
                          name=name)

    attn = dict(heads=self.heads, dim=self.dim, dtype=self.dtype, upcast=self.upcast,
                implementation=self.implementation, chunk_size=self.chunk_size)
    x = x + Attention(**attn, name="attn1")(norm("norm1")(x))
    x = x + Attention(**attn, name="attn2")(norm("norm2")(x), context)
    return x + FeedForward(self.dim, self.dtype, name="ff")(norm("norm3")(x))


class FeedForward(nn.Module):
  """diffusers `FeedForward` (GEGLU): net_2(net_0(x)), inner size 4 * dim (net_1 is dropout)."""

  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = GEGLU(4 * self.dim, self.dtype, name="net_0")(x)
    return _dense(self.dim, "net_2", self.dtype)(h)


class Transformer2DModel(nn.Module):
  """diffusers `Transformer2DModel` (continuous input): GroupNorm (eps 1e-6), proj_in (1x1 conv or linear),
  transformer blocks, proj_out, residual. x (B, H, W, C), context (B, S, C_ctx)."""

  channels: int
  heads: int
  layers: int
  groups: int
  linear_projection: bool
  dtype: Any = jnp.float32
  upcast: bool = False
  implementation: str = "xla"
  chunk_size: int = 1024

  @nn.compact
  def __call__(self, x: Array, context: Array) -> Array:
    b, hh, ww, c = x.shape
    h = _group_norm(self.groups, 1e-6, "norm", self.dtype)(x)
    if self.linear_projection:
      h = _dense(c, "proj_in", self.dtype)(h.reshape(b, hh * ww, c))
    else:
      h = _conv(c, 1, "proj_in", self.dtype)(h).reshape(b, hh * ww, c)
    for i in range(self.layers):
      h = BasicTransformerBlock(c, self.heads, self.dtype, self.upcast, self.implementation, self.chunk_size,
                                name=f"transformer_blocks_{i}")(h, context)
    if self.linear_projection:
      h = _dense(c, "proj_out", self.dtype)(h).reshape(b, hh, ww, c)
    else:
      h = _conv(c, 1, "proj_out", self.dtype)(h.reshape(b, hh, ww, c))
    return h + x


class ResnetBlock2D(nn.Module):
  """diffusers `ResnetBlock2D` (time_embedding_norm "default"): x (B, H, W, C_in), temb (B, T) ->
  (shortcut(x) + conv2(silu(gn2(conv1(silu(gn1(x))) + proj(silu(temb)))))) / output_scale_factor."""

  out_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array) -> Array:
    h = nn.silu(_group_norm(self.groups, self.eps, "norm1", self.dtype)(x))
    h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
    h = h + _dense(self.out_channels, "time_emb_proj", self.dtype)(nn.silu(temb))[:, None, None, :]
    h = nn.silu(_group_norm(self.groups, self.eps, "norm2", self.dtype)(h))
    h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
    out = x + h
    return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


class Downsample2D(nn.Module):
  """3x3 stride-2 conv (``conv``), padding 1 (or, for padding 0, right/bottom zero padding by one)."""

  channels: int
  padding: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    p = self.padding
    return _conv(self.channels, 3, "conv", self.dtype, stride=2, padding=((p, p), (p, p)))(x)


def _nearest_resize(x: Array, size: tuple[int, int]) -> Array:
  """torch `F.interpolate(mode="nearest")` to ``size`` (source index floor(dst * in / out)), NHWC."""
  _, h, w, _ = x.shape
  if size == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = jnp.floor(jnp.arange(size[0]) * (h / size[0])).astype(jnp.int32)
  cols = jnp.floor(jnp.arange(size[1]) * (w / size[1])).astype(jnp.int32)
  return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
  """Nearest-neighbour upsampling to ``size`` (default 2x) then a 3x3 conv (``conv``)."""

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, size: tuple[int, int] | None = None) -> Array:
    size = (2 * x.shape[1], 2 * x.shape[2]) if size is None else size
    return _conv(self.channels, 3, "conv", self.dtype)(_nearest_resize(x, size))


class TimestepEmbedding(nn.Module):
  """diffusers `TimestepEmbedding`: linear_2(silu(linear_1(x + cond_proj(cond)))); ``cond_proj`` has no bias
  and exists when ``cond_dim`` is set."""

  in_channels: int
  dim: int
  cond_dim: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cond: Array | None = None) -> Array:
    if self.cond_dim is not None:
      if cond is None and self.is_initializing():
        cond = jnp.zeros((x.shape[0], self.cond_dim), x.dtype)
      if cond is not None:
        x = x + _dense(self.in_channels, "cond_proj", self.dtype, use_bias=False)(cond)
    elif cond is not None:
      raise ValueError("timestep_cond given but the U-Net has no time_cond_proj_dim")
    x = nn.silu(_dense(self.dim, "linear_1", self.dtype)(x))
    return _dense(self.dim, "linear_2", self.dtype)(x)


# ---------------------------------------------------------------------------------------------------
# Blocks. Arguments are arrays only, so each block can be wrapped in `nn.remat`.

class _BlockOpts(nn.Module):
  """Shared attributes of the U-Net blocks."""

  out_channels: int
  num_layers: int
  groups: int
  eps: float
  heads: int = 1
  transformer_layers: int = 1
  cross_attention: bool = True
  linear_projection: bool = False
  upcast: bool = False
  dtype: Any = jnp.float32
  implementation: str = "xla"
  chunk_size: int = 1024

  def _resnet(self, name: str, output_scale_factor: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(self.out_channels, self.groups, self.eps, output_scale_factor, self.dtype, name=name)

  def _transformer(self, name: str) -> Transformer2DModel:
    return Transformer2DModel(self.out_channels, self.heads, self.transformer_layers, self.groups,
                              self.linear_projection, self.dtype, self.upcast, self.implementation,
                              self.chunk_size, name=name)


class DownBlock(_BlockOpts):
  """CrossAttnDownBlock2D (``cross_attention``) or DownBlock2D: (h, temb, context) -> (h, skips)."""

  add_downsample: bool = True
  downsample_padding: int = 1

  @nn.compact
  def __call__(self, h: Array, temb: Array, context: Array) -> tuple[Array, tuple[Array, ...]]:
    skips = []
    for i in range(self.num_layers):
      h = self._resnet(f"resnets_{i}")(h, temb)
      if self.cross_attention:
        h = self._transformer(f"attentions_{i}")(h, context)
      skips.append(h)
    if self.add_downsample:
      h = Downsample2D(self.out_channels, self.downsample_padding, self.dtype, name="downsamplers_0")(h)
      skips.append(h)
    return h, tuple(skips)


class MidBlock(_BlockOpts):
  """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) x num_layers."""

  output_scale_factor: float = 1.0

  @nn.compact
  def __call__(self, h: Array, temb: Array, context: Array) -> Array:
    h = self._resnet("resnets_0", self.output_scale_factor)(h, temb)
    for i in range(self.num_layers):
      h = self._transformer(f"attentions_{i}")(h, context)
      h = self._resnet(f"resnets_{i + 1}", self.output_scale_factor)(h, temb)
    return h


class UpBlock(_BlockOpts):
  """CrossAttnUpBlock2D or UpBlock2D: each layer concatenates the last skip (channels after h); then an
  optional upsampler to the spatial size ``upsample_like.shape[1:3]``."""

  add_upsample: bool = True

  @nn.compact
  def __call__(self, h: Array, skips: tuple[Array, ...], temb: Array, context: Array,
               upsample_like: Array | None = None) -> Array:
    skips = list(skips)
    for i in range(self.num_layers):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = self._resnet(f"resnets_{i}")(h, temb)
      if self.cross_attention:
        h = self._transformer(f"attentions_{i}")(h, context)
    if self.add_upsample:
      size = None if upsample_like is None else tuple(upsample_like.shape[1:3])
      h = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(h, size)
    return h


# ---------------------------------------------------------------------------------------------------
# The U-Net.

class UNet2DConditionModel(nn.Module):
  """Flax diffusers `UNet2DConditionModel` (see the module docstring).

  Attributes: config; dtype (compute dtype; parameters are float32); attention ("xla", "cudnn", "chunked" or
  "auto", see `resolve_attention`); attention_chunk_size (query block for "chunked"); remat (rematerialise each
  block in the backward pass) with remat_policy (one of `REMAT_POLICIES`: what a block saves for its backward).
  """

  config: UNetConfig
  dtype: Any = jnp.float32
  attention: str = "xla"
  attention_chunk_size: int = 1024
  remat: bool = False
  remat_policy: str = "nothing_saveable"

  def setup(self) -> None:
    cfg = self.config
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"unknown attention {self.attention!r}; one of {ATTENTION_IMPLEMENTATIONS}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; one of {REMAT_POLICIES}")
    policy = getattr(jax.checkpoint_policies, self.remat_policy)
    wrap = (lambda cls: nn.remat(cls, policy=policy)) if self.remat else (lambda cls: cls)
    common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, linear_projection=cfg.use_linear_projection,
                  upcast=cfg.upcast_attention, dtype=self.dtype,
                  implementation=resolve_attention(self.attention, self.dtype),
                  chunk_size=self.attention_chunk_size)
    channels = cfg.block_out_channels
    n = len(channels)
    self.conv_in = _conv(channels[0], cfg.conv_in_kernel, "conv_in", self.dtype)
    self.time_embedding = TimestepEmbedding(channels[0], cfg.time_embed_dim, cfg.time_cond_proj_dim,
                                            self.dtype)
    if cfg.addition_embed_type == "text_time":
      self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim,
                                             dtype=self.dtype)
    self.down_blocks = [
      wrap(DownBlock)(out_channels=channels[i], num_layers=cfg.layers_per_block[i],
                      heads=cfg.attention_head_dim[i], transformer_layers=cfg.transformer_layers_per_block[i],
                      cross_attention=cfg.down_block_types[i] == "CrossAttnDownBlock2D",
                      add_downsample=i < n - 1, downsample_padding=cfg.downsample_padding, **common)
      for i in range(n)]
    self.mid_block = wrap(MidBlock)(out_channels=channels[-1], num_layers=1, heads=cfg.attention_head_dim[-1],
                                    transformer_layers=cfg.transformer_layers_per_block[-1],
                                    output_scale_factor=cfg.mid_block_scale_factor, **common)
    rev = lambda t: tuple(reversed(t))  # noqa: E731
    self.up_blocks = [
      wrap(UpBlock)(out_channels=rev(channels)[i], num_layers=rev(cfg.layers_per_block)[i] + 1,
                    heads=rev(cfg.attention_head_dim)[i],
                    transformer_layers=rev(cfg.transformer_layers_per_block)[i],
                    cross_attention=cfg.up_block_types[i] == "CrossAttnUpBlock2D", add_upsample=i < n - 1,
                    **common)
      for i in range(n)]
    self.conv_norm_out = _group_norm(cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out", self.dtype)
    self.conv_out = _conv(cfg.out_channels, cfg.conv_out_kernel, "conv_out", self.dtype)

  def _added_embedding(self, batch: int, text_embeds: Array | None, time_ids: Array | None) -> Array | None:
    """SDXL's ``add_embedding(text_time_features(...))`` (B, time_embed_dim), or None without text_time."""
    cfg = self.config
    if cfg.addition_embed_type is None:
      if text_embeds is not None or time_ids is not None:
        raise ValueError("text_embeds / time_ids given but the U-Net has no addition_embed_type='text_time'")
      return None
    if text_embeds is None or time_ids is None:
      raise ValueError("a U-Net with addition_embed_type='text_time' (SDXL) needs text_embeds (B, P) and "
                       "time_ids (B, n)")
    text_embeds, time_ids = jnp.asarray(text_embeds), jnp.asarray(time_ids, jnp.float32)
    if text_embeds.ndim != 2 or time_ids.ndim not in (1, 2):
      raise ValueError(f"text_embeds must be (B, P) and time_ids (B, n) or (n,), got {text_embeds.shape} and "
                       f"{time_ids.shape}")
    text_embeds = jnp.broadcast_to(text_embeds, (batch, text_embeds.shape[-1]))
    time_ids = jnp.broadcast_to(time_ids, (batch, time_ids.shape[-1]))
    width = text_embeds.shape[-1] + time_ids.shape[-1] * cfg.addition_time_embed_dim
    if width != cfg.projection_class_embeddings_input_dim:
      raise ValueError(f"text_embeds {text_embeds.shape} and time_ids {time_ids.shape} give {width} added "
                       f"features; projection_class_embeddings_input_dim is "
                       f"{cfg.projection_class_embeddings_input_dim}")
    feats = text_time_features(text_embeds, time_ids, cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                               cfg.freq_shift)
    return self.add_embedding(feats.astype(self.dtype))

  def encode(self, sample: Array, timesteps: Array | float, encoder_hidden_states: Array,
             timestep_cond: Array | None = None, text_embeds: Array | None = None,
             time_ids: Array | None = None) -> tuple[Array, tuple[Array, ...], Array]:
    """First half: sample (B, H, W, C_in), timesteps scalar or (B,), encoder_hidden_states (B, L, D),
    timestep_cond (B, time_cond_proj_dim) or None, and for SDXL text_embeds (B or 1, P) and time_ids (B or 1,
    n) or (n,) (required with addition_embed_type "text_time", refused without) -> (h (B, H/f, W/f, C_last)
    after the mid block, skips (the down path's residuals, outermost first), temb (B, time_embed_dim))."""
    cfg = self.config
    batch = sample.shape[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
    t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    cond = None if timestep_cond is None else jnp.asarray(timestep_cond).astype(self.dtype)
    temb = self.time_embedding(t_emb.astype(self.dtype), cond)
    added = self._added_embedding(batch, text_embeds, time_ids)
    if added is not None:
      temb = temb + added
    context = jnp.asarray(encoder_hidden_states).astype(self.dtype)
    h = self.conv_in(jnp.asarray(sample).astype(self.dtype))
    skips = [h]
    for block in self.down_blocks:
      h, block_skips = block(h, temb, context)
      skips.extend(block_skips)
    h = self.mid_block(h, temb, context)
    return h, tuple(skips), temb

  def decode(self, h: Array, skips: Sequence[Array], temb: Array, encoder_hidden_states: Array, *,
             return_features: bool = False) -> Array:
    """Second half: (h, skips, temb) from `encode` -> noise prediction (B, H, W, out_channels) float32, or
    with ``return_features`` the last up block's output (B, H, W, block_out_channels[0]) in the compute dtype
    (before conv_norm_out)."""
    context = jnp.asarray(encoder_hidden_states).astype(self.dtype)
    skips = list(skips)
    for block in self.up_blocks:
      mine, skips = skips[-block.num_layers:], skips[:-block.num_layers]
      h = block(h, tuple(mine), temb, context, skips[-1] if skips else None)
    if return_features:
      return h
    h = nn.silu(self.conv_norm_out(h))
    return self.conv_out(h).astype(jnp.float32)

  def __call__(self, sample: Array, timesteps: Array | float, encoder_hidden_states: Array,
               timestep_cond: Array | None = None, text_embeds: Array | None = None,
               time_ids: Array | None = None) -> Array:
    """Noise (or v) prediction (B, H, W, out_channels) float32; see `encode` for the inputs."""
    h, skips, temb = self.encode(sample, timesteps, encoder_hidden_states, timestep_cond, text_embeds, time_ids)
    return self.decode(h, skips, temb, encoder_hidden_states)


def init_params(key: Array, config: UNetConfig, sample_size: int | None = None, *,
                context_length: int = 77) -> PyTree:
  """Random float32 parameters {"params": ...} for ``config`` (flax default initialisers), traced at a
  (1, s, s, in_channels) sample with s = sample_size or config.sample_size or 8 * downsample factor. With
  addition_embed_type "text_time" it traces one time id and text_embeds of the remaining width (only the
  total width, projection_class_embeddings_input_dim, shapes the parameters)."""
  s = sample_size or config.sample_size or 8 * config.downsample_factor
  model = UNet2DConditionModel(config)
  sample = jnp.zeros((1, s, s, config.in_channels), jnp.float32)
  context = jnp.zeros((1, context_length, config.cross_attention_dim), jnp.float32)
  cond = None if config.time_cond_proj_dim is None else jnp.zeros((1, config.time_cond_proj_dim), jnp.float32)
  text_embeds = time_ids = None
  if config.addition_embed_type == "text_time":
    width = config.projection_class_embeddings_input_dim - config.addition_time_embed_dim
    text_embeds, time_ids = jnp.zeros((1, width), jnp.float32), jnp.zeros((1, 1), jnp.float32)
  return jax.jit(model.init)(key, sample, jnp.zeros((1,), jnp.float32), context, cond, text_embeds, time_ids)


def abstract_params(config: UNetConfig, sample_size: int | None = None) -> PyTree:
  """Shapes and dtypes of `init_params` (`jax.ShapeDtypeStruct` leaves), without computing anything."""
  return jax.eval_shape(lambda k: init_params(k, config, sample_size, context_length=1), jax.random.key(0))
