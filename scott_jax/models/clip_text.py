"""Flax CLIP text encoders, numerically matching transformers' `CLIPTextModel` and
`CLIPTextModelWithProjection`, SDXL's two-encoder prompt encoding (`SDXLTextEncoders`) and a tokenizer helper.

Submodules are named like the transformers torch modules (transformers 5 layout, no `text_model.` prefix),
list items as `<name>_<index>`: torch `encoder.layers.3.self_attn.q_proj.weight` is Flax
`encoder/layers_3/self_attn/q_proj/kernel`. `prepare_clip_text_state_dict` strips the `text_model.` prefix of
older checkpoints (SD1.5's text_encoder) and drops the `position_ids` buffer before the generic conversion;
`CLIPTextModelWithProjection` adds `text_projection` (a Linear without bias) at the top level, as transformers.

Parameters are float32; `dtype` is the compute dtype (layer norms and softmax reduce in float32).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# transformers' eos_token_id before PR #24773; with it, the pooled token is the argmax of the ids.
_LEGACY_EOS_TOKEN_ID = 2
# Longer "model_max_length" values are transformers' placeholder for "unset" (about 1e30).
_MAX_TOKENIZER_LENGTH = 4096


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Architecture of a transformers `CLIPTextModel` (the fields of its config.json that matter here)."""

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  pad_token_id: int = 1
  projection_dim: int = 512  # `CLIPTextModelWithProjection` only

  def __post_init__(self) -> None:
    check_tower(self)

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> CLIPTextConfig:
    """Builds the config from a transformers config.json dict (`clip_text_model`, or a `clip` config's
    `text_config`). Generic transformers keys (dropout, initialisers, projection_dim, ...) are ignored."""
    model_type = config.get("model_type", "clip_text_model")
    if model_type == "clip" and "text_config" in config:
      config, model_type = config["text_config"], "clip_text_model"
    if model_type != "clip_text_model":
      raise ValueError(f"expected a clip_text_model config, got model_type={model_type!r}")
    if config.get("use_attention_mask"):
      raise ValueError("use_attention_mask=True (padding mask) is not supported; only the causal mask")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names and v is not None})


def check_tower(config: Any) -> None:
  """ValueError unless a tower config (text or vision) has a known hidden_act and heads dividing hidden_size."""
  if config.hidden_act not in ACTIVATIONS:
    raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; one of {sorted(ACTIVATIONS)}")
  if config.hidden_size % config.num_attention_heads:
    raise ValueError(f"hidden_size {config.hidden_size} not divisible by {config.num_attention_heads} heads")


@flax.struct.dataclass
class CLIPTextOutput:
  """Outputs of `CLIPTextModel`, B = batch, L = sequence length, D = hidden_size.

  last_hidden_state: (B, L, D) after the final layer norm.
  pooler_output: (B, D) the last_hidden_state row at the end-of-text token.
  hidden_states: num_hidden_layers + 1 arrays (B, L, D): the embeddings then each layer's output, without the
    final layer norm (transformers `output_hidden_states=True`); `hidden_states[-2]` is the penultimate layer.
  text_embeds: (B, projection_dim) text_projection(pooler_output) for `CLIPTextModelWithProjection`, else None.
  """

  last_hidden_state: Array
  pooler_output: Array
  hidden_states: tuple[Array, ...]
  text_embeds: Array | None = None


def dense(features: int, name: str, dtype: Any) -> nn.Dense:
  """A Linear of the CLIP towers: float32 parameters, ``dtype`` compute."""
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def layer_norm(eps: float, name: str | None, dtype: Any) -> nn.LayerNorm:
  """A LayerNorm of the CLIP towers (torch's two-pass variance, float32 parameters)."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name)


# The text tower's config, or the vision tower's (`scott_jax.metrics.clip_model.CLIPVisionConfig`): the blocks
# below read hidden_size, intermediate_size, num_attention_heads, hidden_act and layer_norm_eps, which both have.
TowerConfig = Any


class CLIPAttention(nn.Module):
  """Multi-head self-attention, (B, L, D) -> (B, L, D); softmax in float32. Causal (the text tower) unless
  ``causal`` is False (the vision tower)."""

  config: TowerConfig
  dtype: Any = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    b, length, d = x.shape
    heads = cfg.num_attention_heads
    split = lambda t: t.reshape(b, length, heads, d // heads)
    q = split(dense(d, "q_proj", self.dtype)(x))
    k = split(dense(d, "k_proj", self.dtype)(x))
    v = split(dense(d, "v_proj", self.dtype)(x))
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(d // heads)
    if self.causal:
      mask = jnp.tril(jnp.ones((length, length), dtype=bool))
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, length, d)
    return dense(d, "out_proj", self.dtype)(out)


class CLIPMLP(nn.Module):
  """fc2(act(fc1(x))), (B, L, D) -> (B, L, D)."""

  config: TowerConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = dense(self.config.intermediate_size, "fc1", self.dtype)(x)
    h = ACTIVATIONS[self.config.hidden_act](h)
    return dense(self.config.hidden_size, "fc2", self.dtype)(h)


class CLIPEncoderLayer(nn.Module):
  """Pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(.)); causal attention unless ``causal`` is
  False (the vision tower)."""

  config: TowerConfig
  dtype: Any = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    eps = self.config.layer_norm_eps
    x = x + CLIPAttention(self.config, self.dtype, self.causal, name="self_attn")(
      layer_norm(eps, "layer_norm1", self.dtype)(x)
    )
    return x + CLIPMLP(self.config, self.dtype, name="mlp")(layer_norm(eps, "layer_norm2", self.dtype)(x))


class CLIPTextEmbeddings(nn.Module):
  """Token ids (B, L) -> token_embedding(ids) + position_embedding(0..L-1), (B, L, D)."""

  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array) -> Array:
    cfg = self.config
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    tokens = embed(cfg.vocab_size, "token_embedding")(input_ids)
    positions = embed(cfg.max_position_embeddings, "position_embedding")(jnp.arange(input_ids.shape[-1]))
    return tokens + positions[None]


class CLIPEncoder(nn.Module):
  """Stack of `num_hidden_layers` layers (named `layers_<i>`); returns all num_hidden_layers + 1 states."""

  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, ...]:
    states = [x]
    for i in range(self.config.num_hidden_layers):
      x = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x)
      states.append(x)
    return tuple(states)


class CLIPTextModel(nn.Module):
  """transformers `CLIPTextModel` (causal mask, no padding mask, as Stable Diffusion pipelines call it)."""

  config: CLIPTextConfig
  dtype: Any = jnp.float32

  def setup(self) -> None:
    self.embeddings = CLIPTextEmbeddings(self.config, self.dtype)
    self.encoder = CLIPEncoder(self.config, self.dtype)
    self.final_layer_norm = layer_norm(self.config.layer_norm_eps, None, self.dtype)

  def __call__(self, input_ids: Array) -> CLIPTextOutput:
    """Token ids (B, L) int, L <= max_position_embeddings -> `CLIPTextOutput` (float32 arrays)."""
    cfg = self.config
    if input_ids.shape[-1] > cfg.max_position_embeddings:
      raise ValueError(
        f"sequence length {input_ids.shape[-1]} > max_position_embeddings {cfg.max_position_embeddings}"
      )
    states = self.encoder(self.embeddings(input_ids))
    last = self.final_layer_norm(states[-1]).astype(jnp.float32)
    if cfg.eos_token_id == _LEGACY_EOS_TOKEN_ID:
      eos_index = jnp.argmax(input_ids, axis=-1)  # the end-of-text token has the largest id
    else:
      eos_index = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)  # first end-of-text token
    pooled = jnp.take_along_axis(last, eos_index[:, None, None], axis=1)[:, 0]
    return CLIPTextOutput(last, pooled, tuple(s.astype(jnp.float32) for s in states))

  def prompt_embeds(self, input_ids: Array, clip_skip: int = 0) -> Array:
    """The U-Net's cross-attention context (B, L, D), float32, as diffusers' `encode_prompt`.

    clip_skip = 0: last_hidden_state. clip_skip = k > 0: the final layer norm applied to the output k layers
    before the last (`final_layer_norm(hidden_states[-(k + 1)])`, diffusers' rule).
    """
    if not 0 <= clip_skip < self.config.num_hidden_layers:
      raise ValueError(f"clip_skip must be in [0, {self.config.num_hidden_layers}), got {clip_skip}")
    out = self(input_ids)
    if clip_skip == 0:
      return out.last_hidden_state
    return self.final_layer_norm(out.hidden_states[-(clip_skip + 1)].astype(self.dtype)).astype(jnp.float32)


class CLIPTextModelWithProjection(CLIPTextModel):
  """transformers `CLIPTextModelWithProjection` (SDXL's text_encoder_2): `CLIPTextModel` plus ``text_projection``
  (Linear hidden_size -> projection_dim, no bias) of the pooled output, returned as ``text_embeds``."""

  def setup(self) -> None:
    super().setup()
    self.text_projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                                    param_dtype=jnp.float32)

  def __call__(self, input_ids: Array) -> CLIPTextOutput:
    """Token ids (B, L) int -> `CLIPTextOutput` with ``text_embeds`` (B, projection_dim) float32."""
    out = super().__call__(input_ids)
    text_embeds = self.text_projection(out.pooler_output.astype(self.dtype)).astype(jnp.float32)
    return out.replace(text_embeds=text_embeds)


@dataclasses.dataclass(frozen=True)
class SDXLTextEncoders:
  """SDXL's prompt encoding, as diffusers' `StableDiffusionXLPipeline.encode_prompt`.

  ``text_encoder`` is CLIP ViT-L (`CLIPTextModel`, folder ``text_encoder/``), ``text_encoder_2`` OpenCLIP bigG
  (`CLIPTextModelWithProjection`, ``text_encoder_2/``); each reads the ids of its own tokenizer. ``params`` is
  ``{"text_encoder": ..., "text_encoder_2": ...}``. ``force_zeros_for_empty_prompt`` is the pipeline's
  model_index.json flag (True for SDXL base): without a negative prompt, the unconditional embeddings are zeros.
  """

  text_encoder: CLIPTextModel
  text_encoder_2: CLIPTextModelWithProjection
  force_zeros_for_empty_prompt: bool = True

  def __post_init__(self) -> None:
    if not isinstance(self.text_encoder_2, CLIPTextModelWithProjection):
      raise ValueError(f"text_encoder_2 must be a CLIPTextModelWithProjection, got "
                       f"{type(self.text_encoder_2).__name__}")

  @property
  def hidden_size(self) -> int:
    """Width D1 + D2 of the prompt states (2048 for SDXL)."""
    return self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size

  @property
  def pooled_size(self) -> int:
    """Width of the pooled embedding (text_encoder_2's projection_dim, 1280 for SDXL)."""
    return self.text_encoder_2.config.projection_dim

  def encode(self, params: Mapping[str, Any], input_ids: Array, input_ids_2: Array,
             clip_skip: int = 0) -> tuple[Array, Array]:
    """(prompt states (B, L, D1 + D2), pooled (B, projection_dim)), float32.

    The states are both encoders' ``hidden_states[-(clip_skip + 2)]`` (the penultimate layer by default, without
    the final layer norm) concatenated on the feature axis; pooled is text_encoder_2's ``text_embeds``.
    """
    layers = min(self.text_encoder.config.num_hidden_layers, self.text_encoder_2.config.num_hidden_layers)
    if not 0 <= clip_skip < layers:
      raise ValueError(f"clip_skip must be in [0, {layers}), got {clip_skip}")
    out = self.text_encoder.apply(params["text_encoder"], input_ids)
    out_2 = self.text_encoder_2.apply(params["text_encoder_2"], input_ids_2)
    states = jnp.concatenate([out.hidden_states[-(clip_skip + 2)], out_2.hidden_states[-(clip_skip + 2)]], -1)
    return states, out_2.text_embeds

  def encode_negative(self, params: Mapping[str, Any], input_ids: Array, input_ids_2: Array, *,
                      negative_given: bool) -> tuple[Array, Array]:
    """The unconditional (states, pooled) for classifier-free guidance, as diffusers' ``encode_prompt``.

    ``input_ids`` / ``input_ids_2`` are the tokenized negative prompt, or the empty prompt "" when none was given
    (``negative_given`` False). Zeros of `encode`'s shapes when no negative prompt was given and
    force_zeros_for_empty_prompt; otherwise `encode` of the ids with clip_skip 0 (diffusers ignores clip_skip
    for the negative prompt).
    """
    if not negative_given and self.force_zeros_for_empty_prompt:
      shapes = jax.eval_shape(self.encode, params, input_ids, input_ids_2)
      return tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)
    return self.encode(params, input_ids, input_ids_2)


def prepare_clip_text_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Normalises a transformers CLIPTextModel state dict before the generic torch -> Flax conversion.

  Strips a leading `text_model.` (checkpoints saved before transformers 5, e.g. SD1.5's text_encoder) and
  drops the non-parameter `embeddings.position_ids` buffer. Returns a new dict.
  """
  out: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    key = key.removeprefix("text_model.")
    if key == "embeddings.position_ids":
      continue
    if key in out:
      raise ValueError(f"CLIP state dict has {key} both with and without the text_model. prefix")
    out[key] = value
  return out


def tokenize(tokenizer: Any, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
  """Prompts -> token ids (B, max_length) int32, padded to max_length and truncated (bos ... eos pad ...).

  `tokenizer` is a transformers CLIP tokenizer; max_length defaults to its `model_max_length` (77 for SD).
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  length = tokenizer.model_max_length if max_length is None else max_length
  if not 1 < length <= _MAX_TOKENIZER_LENGTH:
    raise ValueError(
      f"max_length {length} out of range (2..{_MAX_TOKENIZER_LENGTH}); a tokenizer folder without "
      "tokenizer_config.json has no model_max_length: pass max_length"
    )
  ids = tokenizer(
    list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="np"
  )
  return np.asarray(ids["input_ids"], dtype=np.int32)


class SDXLTextMixin:
  """``is_sdxl`` and ``text_encoders`` for a bundle with ``text_encoder``, ``text_encoder_2`` (None: not SDXL) and
  ``force_zeros_for_empty_prompt`` fields (the loaded folder, the sampling `Pipeline`, the trainer's `Models`)."""

  @property
  def is_sdxl(self) -> bool:
    return self.text_encoder_2 is not None

  @property
  def text_encoders(self) -> SDXLTextEncoders:
    """SDXL's prompt encoding (params ``{"text_encoder", "text_encoder_2"}``)."""
    if not self.is_sdxl:
      raise ValueError(f"text_encoders: this {type(self).__name__} is not SDXL (no text_encoder_2)")
    return SDXLTextEncoders(self.text_encoder, self.text_encoder_2, self.force_zeros_for_empty_prompt)
