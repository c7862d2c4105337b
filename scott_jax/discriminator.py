"""The SCott LoRA discriminator built on the teacher's own U-Net (paper "LoRA Discriminator"; notes section 5).

D_phi(x, t, c) for latents x (B, h, w, C) at integer timesteps t (B,) with text condition c:

  1. encoder: the teacher U-Net's time embedding, conv_in, down blocks and mid block, with the TEACHER'S
     parameters passed in as a frozen argument (never copied, never updated): (h, skips, temb);
  2. decoder: the U-Net's up blocks with a LoRA overlay on the teacher's kernels, W + (alpha / r) A B, returning
     the features of the last up block (B, h, w, C0) (C0 = block_out_channels[0], 320 for SD1.5). ``lora_apply``
     (config ``gan.lora_apply``) says how, the same function either way: "factorised" (`lora.factorised`: each
     overlaid layer computes x W + (alpha / r) (x A) B, so the parameter gradients are rank-r matmuls) or
     "merged" (`lora.merge` builds W' first; its backward computes the full-size dL/dW');
  3. head (trainable): GroupNorm, SiLU, conv3x3 to one logit per position, plus a projection term
     <mean_pos(SiLU(GN(features))), W [pooled text embedding; time embedding]> / sqrt(C0) (projection
     discriminator, Miyato and Koyama 2018) added to every position. ``head_init`` (config ``gan.head_init``,
     DECISION): "zero" starts the logit conv and W at zero, so every logit starts at 0, on the steep part of
     both hinges; "normal" is lecun-normal conv and N(0, 1/D) W, whose logits start near +1.3 (the conv of
     positive SiLU features plus the projection), where the real hinge has no gradient.

The output is a logit map (B, h, w); the hinge losses (`losses.hinge_d_loss`, `hinge_g_loss`) average over all
positions. Variants (config ``gan.variant``):

- ``lora``: as above; trainable = the LoRA overlay on the up blocks + the head (3.64% of SD1.5's U-Net with the
  default targets attention + conv at rank 64).
- ``full``: a trainable copy of all U-Net parameters (encoder and decoder) + the head (Table 7 "Full").
- ``no_cond``: as ``lora`` but every input is conditioned on t = 0 and the empty prompt (Table 7 "Without
  Condition"); see `condition`.

Parameters are a dict ``{"lora": overlay, "head": head params}`` (``{"unet": copy, "head": ...}`` for ``full``).

On an SDXL U-Net the text condition is `scott_jax.pipeline.sdxl_condition`'s dict (states, text_embeds, time_ids):
the encoder gets the added text_time condition as the U-Net does, the decoder's cross-attention the states, and
the head's pooled input is the pooled text embedding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp

from scott_jax.choices import HEAD_INITS, LORA_APPLY, VARIANTS
from scott_jax.models import lora as lora_lib

Array = jax.Array
PyTree = Any

DECODER_SCOPE = r"(^|/)up_blocks_\d+/"  # the LoRA overlay lives on the decoder only


def _unet_text(text: Any) -> tuple[Array, dict[str, Array]]:
  """(cross-attention states, the encoder's added-condition keywords) of a text condition: states (B, L, D), or
  the SDXL dict {"states", "text_embeds", "time_ids"} (`scott_jax.pipeline.sdxl_condition`)."""
  if isinstance(text, Mapping):
    return text["states"], {"text_embeds": text["text_embeds"], "time_ids": text["time_ids"]}
  return text, {}


class DiscHead(nn.Module):
  """GroupNorm, SiLU, conv3x3 -> 1 logit per position, plus the text/time projection term.

  features (B, h, w, C), temb (B, Dt), pooled (B, Dc) -> logits (B, h, w) float32.
  """

  num_groups: int
  dtype: Any = jnp.float32
  init_kind: str = "zero"  # one of HEAD_INITS

  @nn.compact
  def __call__(self, features: Array, temb: Array, pooled: Array) -> Array:
    if self.init_kind not in HEAD_INITS:
      raise ValueError(f"unknown discriminator head init '{self.init_kind}'; allowed: {', '.join(HEAD_INITS)}")
    zero = self.init_kind == "zero"
    c = features.shape[-1]
    h = nn.GroupNorm(num_groups=self.num_groups, epsilon=1e-5, dtype=jnp.float32, name="norm")(
      features.astype(jnp.float32))
    h = nn.silu(h)
    conv_init = nn.initializers.zeros_init() if zero else nn.initializers.lecun_normal()
    logit_map = nn.Conv(1, (3, 3), padding=1, dtype=self.dtype, kernel_init=conv_init, name="conv")(
      h.astype(self.dtype))[..., 0]
    cond = jnp.concatenate([pooled.astype(jnp.float32), temb.astype(jnp.float32)], axis=-1)
    proj_init = nn.initializers.zeros_init() if zero else nn.initializers.normal(1.0 / math.sqrt(cond.shape[-1]))
    e = nn.Dense(c, use_bias=False, dtype=jnp.float32, name="cond_proj", kernel_init=proj_init)(cond)
    proj = jnp.sum(jnp.mean(h, axis=(1, 2)) * e, axis=-1) / math.sqrt(c)
    return logit_map.astype(jnp.float32) + proj[:, None, None]


@dataclasses.dataclass(frozen=True)
class Discriminator:
  """The discriminator as pure functions around a (teacher-shaped) Flax U-Net module.

  unet: the teacher's ``UNet2DConditionModel`` module (its ``encode`` / ``decode`` methods); variant one of
  `VARIANTS`; lora_targets / lora_rank / lora_alpha the overlay on the up blocks (``lora.PRESETS`` names or
  regexes); norm_groups of the head's GroupNorm (the U-Net's own ``norm_num_groups``); head_init one of
  `HEAD_INITS`; lora_apply one of `LORA_APPLY` (see the module docstring).
  """

  unet: nn.Module
  variant: str = "lora"
  lora_targets: Sequence[str] = ("attention", "conv")
  lora_rank: int = 64
  lora_alpha: float = 64.0
  norm_groups: int = 32
  dtype: Any = jnp.float32
  head_init: str = "zero"
  lora_apply: str = "factorised"

  def __post_init__(self) -> None:
    if self.variant not in VARIANTS:
      raise ValueError(f"unknown discriminator variant '{self.variant}'; allowed: {', '.join(VARIANTS)}")
    if self.head_init not in HEAD_INITS:
      raise ValueError(f"unknown discriminator head init '{self.head_init}'; allowed: {', '.join(HEAD_INITS)}")
    if self.lora_apply not in LORA_APPLY:
      raise ValueError(f"unknown LoRA application '{self.lora_apply}'; allowed: {', '.join(LORA_APPLY)}")

  @property
  def head(self) -> DiscHead:
    return DiscHead(self.norm_groups, self.dtype, self.head_init)

  def init(self, key: Array, unet_params: PyTree, features: Array, temb: Array, pooled: Array) -> PyTree:
    """Fresh trainable parameters.

    unet_params: the teacher's parameters (read for shapes; copied only for the ``full`` variant). features,
    temb, pooled: example arrays (or ShapeDtypeStructs under ``jax.eval_shape``) for the head's input shapes:
    (B, h, w, C0), (B, Dt), (B, Dc).
    """
    k_lora, k_head = jax.random.split(key)
    head = self.head.init(k_head, features, temb, pooled)
    if self.variant == "full":
      return {"unet": jax.tree_util.tree_map(jnp.copy, unet_params), "head": head}
    overlay = lora_lib.init(k_lora, unet_params, tuple(self.lora_targets), self.lora_rank, scope=DECODER_SCOPE)
    return {"lora": overlay, "head": head}

  def init_shapes(self, unet_params: PyTree, features: Any, temb: Any, pooled: Any) -> PyTree:
    """ShapeDtypeStructs of `init`'s output, computed from shapes only (no weights, no random draws).

    Arguments as `init` (arrays or ShapeDtypeStructs). Used for abstract train states and parameter counts.
    """
    head = jax.eval_shape(self.head.init, jax.random.PRNGKey(0), features, temb, pooled)
    if self.variant == "full":
      return {"unet": jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), unet_params),
              "head": head}
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(unet_params).items()}
    out = {}
    for name in lora_lib.select_targets(unet_params, tuple(self.lora_targets), DECODER_SCOPE):
      *window, d_in, d_out = flat[name].shape
      path = tuple(name.split("/"))
      out[path + (lora_lib.LORA_A,)] = jax.ShapeDtypeStruct((*window, d_in, self.lora_rank), jnp.float32)
      out[path + (lora_lib.LORA_B,)] = jax.ShapeDtypeStruct((1,) * len(window) + (self.lora_rank, d_out),
                                                            jnp.float32)
    return {"lora": traverse_util.unflatten_dict(out), "head": head}

  def feature_shapes(self, unet_params: PyTree, x: Any, t: Any, text: Any) -> tuple[Any, Any]:
    """ShapeDtypeStructs of (features (B, h, w, C0), temb (B, Dt)) for inputs shaped like x, t, text (arrays or
    ShapeDtypeStructs); computes nothing. Use them to build `init`'s example inputs."""
    def run(p: PyTree, x: Array, t: Array, c: Any) -> tuple[Array, Array]:
      c, added = _unet_text(c)
      h, skips, temb = self.unet.apply(p, x, t, c, method=self.unet.encode, **added)
      return self.unet.apply(p, h, skips, temb, c, return_features=True, method=self.unet.decode), temb

    return jax.eval_shape(run, unet_params, x, t, text)

  def encoder_params(self, params: PyTree, unet_params: PyTree) -> PyTree:
    """The parameters the encoder runs with: the frozen teacher's, or the trainable copy (``full``)."""
    return params["unet"] if self.variant == "full" else unet_params

  def decoder_params(self, params: PyTree, unet_params: PyTree) -> PyTree:
    """The decoder's parameters: teacher + LoRA overlay merged, or the trainable copy (``full``). `features` runs
    the decoder on them with ``lora_apply`` "merged"; "factorised" runs it on the teacher's parameters with the
    overlay applied per layer (the same function)."""
    if self.variant == "full":
      return params["unet"]
    return lora_lib.merge(unet_params, params["lora"], self.lora_alpha)

  def features(self, params: PyTree, unet_params: PyTree, x: Array, t: Array, text: Any) -> tuple[Array, Array]:
    """(last up-block features (B, h, w, C0), time embedding (B, Dt)) for latents x (B, h, w, C), t (B,), text
    (B, L, D) or the SDXL condition dict."""
    text, added = _unet_text(text)
    h, skips, temb = self.unet.apply(self.encoder_params(params, unet_params), x, t, text,
                                     method=self.unet.encode, **added)

    def decode(p: PyTree) -> Array:
      return self.unet.apply(p, h, skips, temb, text, return_features=True, method=self.unet.decode)

    if self.variant == "full" or self.lora_apply == "merged":
      return decode(self.decoder_params(params, unet_params)), temb
    with lora_lib.factorised(params["lora"], self.lora_alpha):
      return decode(unet_params), temb

  def apply(self, params: PyTree, unet_params: PyTree, x: Array, t: Array, text: Any, pooled: Array) -> Array:
    """Logits (B, h, w) float32 for latents x (B, h, w, C), t (B,) int, text (B, L, D) or the SDXL condition
    dict, pooled (B, Dc).

    The caller applies `condition` first (it implements the ``no_cond`` variant).
    """
    feats, temb = self.features(params, unet_params, x, t, text)
    return self.head.apply(params["head"], feats, temb, pooled)

  def condition(self, t: Array, text: Any, pooled: Array, uncond_text: Array,
                uncond_pooled: Array) -> tuple[Array, Any, Array]:
    """The (t, text, pooled) the discriminator sees: unchanged, or t = 0 and the empty prompt (``no_cond``; for
    an SDXL condition dict its states and text_embeds, the time ids kept).

    uncond_text (1 or B, L, D) and uncond_pooled (1 or B, Dc) are the encoded empty prompt.
    """
    if self.variant != "no_cond":
      return t, text, pooled
    pooled_u = jnp.broadcast_to(uncond_pooled, pooled.shape).astype(pooled.dtype)
    if isinstance(text, Mapping):
      states = text["states"]
      text = {**text, "states": jnp.broadcast_to(uncond_text, states.shape).astype(states.dtype),
              "text_embeds": jnp.broadcast_to(uncond_pooled, text["text_embeds"].shape).astype(states.dtype)}
      return jnp.zeros_like(t), text, pooled_u
    return jnp.zeros_like(t), jnp.broadcast_to(uncond_text, text.shape).astype(text.dtype), pooled_u


def trainable_share(disc_params: PyTree, unet_params: PyTree) -> float:
  """Number of trainable discriminator parameters over the number of U-Net parameters (works on shapes)."""
  return lora_lib.count_params(disc_params) / lora_lib.count_params(unet_params)
