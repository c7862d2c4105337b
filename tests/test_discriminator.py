"""The LoRA discriminator: frozen teacher encoder, LoRA decoder, head; trainable share at SD1.5 size."""

import dataclasses
import re
import sys

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scott_jax import discriminator as disc_lib
from scott_jax import losses
from scott_jax.models import lora as lora_lib
from scott_jax.models import unet as unet_lib

TINY = unet_lib.UNetConfig(
  sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64), layers_per_block=(1, 1),
  transformer_layers_per_block=(1, 1), attention_head_dim=(4, 4), cross_attention_dim=16, norm_num_groups=16)
B, S, L, D = 2, 8, 5, 16


def _tree_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def _random_params(abstract, rng):
  """Random parameters on the host (compiling the module's init costs more than the tests): kernels
  N(0, 1/fan_in), norm scales 1 + N(0, 0.05^2), everything else N(0, 0.05^2)."""
  def draw(path, spec):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']") or name.endswith("['embedding']"):
      std = 1.0 / np.sqrt(np.prod(spec.shape[:-1]))
      return jnp.asarray(rng.standard_normal(spec.shape) * std, jnp.float32)
    base = 1.0 if name.endswith("['scale']") else 0.0
    return jnp.asarray(base + 0.05 * rng.standard_normal(spec.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def tiny():
  """A random tiny teacher U-Net (perturbed so no layer is an exact zero), inputs and a LoRA discriminator."""
  unet = unet_lib.UNet2DConditionModel(TINY)
  params = _random_params(unet_lib.abstract_params(TINY), np.random.default_rng(1))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, S, S, 4)), jnp.float32)
  t = jnp.asarray([10, 700], jnp.int32)
  text = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  pooled = jnp.asarray(rng.standard_normal((B, D)), jnp.float32)
  return unet, params, x, t, text, pooled


def _init(unet, params, variant, x, t, text, pooled, rank=4, head_init="normal"):
  """A discriminator and fresh parameters. The architecture tests use the "normal" head (nonzero logit conv and
  projection, as after some training); the default "zero" head has its own test."""
  disc = disc_lib.Discriminator(unet, variant=variant, lora_rank=rank, lora_alpha=float(rank), norm_groups=16,
                                head_init=head_init)
  feats, temb = disc.feature_shapes(params, x, t, text)
  dparams = disc.init(jax.random.PRNGKey(2), params, jnp.zeros(feats.shape), jnp.zeros(temb.shape), pooled)
  shapes = disc.init_shapes(params, feats, temb, pooled)
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(dparams)
  assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in
             zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(dparams), strict=True))
  return disc, dparams


def _lora_param_count_torch(rank: int, targets: dict[str, str]) -> tuple[int, int]:
  """(U-Net parameter count, LoRA parameter count on the up blocks) from diffusers' torch SD1.5 U-Net shapes
  (meta device, no weights): an independent count of r * (fan_in + fan_out) per targeted Linear / Conv."""
  try:
    import torchvision  # noqa: F401
  except (ImportError, RuntimeError, OSError):
    sys.modules["torchvision"] = None
  import diffusers
  import torch

  with torch.device("meta"):
    model = diffusers.UNet2DConditionModel(
      sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2)
  total = sum(p.numel() for p in model.parameters())
  lora = 0
  for name, p in model.named_parameters():
    if not name.startswith("up_blocks.") or not any(re.search(r, name) for r in targets.values()):
      continue
    if p.ndim == 2:
      lora += rank * (p.shape[0] + p.shape[1])
    else:  # Conv OIHW: A is (r, I, kh, kw), B (O, r, 1, 1)
      lora += rank * (p.shape[1] * p.shape[2] * p.shape[3] + p.shape[0])
  return total, lora


def test_sd15_trainable_share_matches_paper():
  """Default targets (attention + conv of the up blocks, rank 64) + head: 3-4.5% of SD1.5's U-Net (paper 3.6%),
  counted on shapes only; the LoRA part equals an independent count from diffusers' torch module shapes."""
  cfg = unet_lib.UNetConfig()  # SD1.5
  abstract = unet_lib.abstract_params(cfg)
  unet = unet_lib.UNet2DConditionModel(cfg)
  disc = disc_lib.Discriminator(unet)  # defaults: lora, ("attention", "conv"), rank 64
  x = jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  text = jax.ShapeDtypeStruct((1, 77, 768), jnp.float32)
  feats, temb = disc.feature_shapes(abstract, x, t, text)
  assert feats.shape == (1, 64, 64, 320) and temb.shape == (1, 1280)
  shapes = disc.init_shapes(abstract, feats, temb, jax.ShapeDtypeStruct((1, 768), jnp.float32))
  n_unet = lora_lib.count_params(abstract)
  share = disc_lib.trainable_share(shapes, abstract)
  assert 0.03 <= share <= 0.045, share
  torch_total, torch_lora = _lora_param_count_torch(64, {
    "attention": r"attn\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$",
    "conv": r"(resnets\.\d+\.(conv1|conv2|conv_shortcut)|upsamplers\.0\.conv)\.weight$"})
  assert n_unet == torch_total
  assert lora_lib.count_params(shapes["lora"]) == torch_lora
  assert lora_lib.overlay_size(abstract, ("attention", "conv"), 64, scope=disc_lib.DECODER_SCOPE) == torch_lora
  head = lora_lib.count_params(shapes["head"])
  assert head == 2 * 320 + 9 * 320 + 1 + (768 + 1280) * 320  # GroupNorm, conv3x3 (+bias), projection
  assert abs(share - 0.036) < 0.002


def test_lora_lives_on_the_decoder_and_starts_as_the_teacher(tiny):
  unet, params, x, t, text, pooled = tiny
  disc, dparams = _init(unet, params, "lora", x, t, text, pooled)
  paths = ["/".join(p) for p in traverse_util.flatten_dict(dparams["lora"])]
  assert paths and all(re.search(r"(^|/)up_blocks_\d+/", p) for p in paths)
  assert any("attn1" in p for p in paths) and any("conv1" in p for p in paths)
  # B = 0 at init: the decoder is exactly the teacher's, so the features are the teacher's last up block.

  @jax.jit
  def run(dparams, params):
    feats, temb = disc.features(dparams, params, x, t, text)
    h, skips, temb_ref = unet.apply(params, x, t, text, method=unet.encode)
    ref = unet.apply(params, h, skips, temb_ref, text, return_features=True, method=unet.decode)
    return feats, temb, ref, temb_ref, disc.apply(dparams, params, x, t, text, pooled)

  feats, temb, ref, temb_ref, logits = run(dparams, params)
  np.testing.assert_array_equal(np.asarray(feats), np.asarray(ref))
  np.testing.assert_array_equal(np.asarray(temb), np.asarray(temb_ref))
  assert logits.shape == (B, S, S) and logits.dtype == jnp.float32


def test_frozen_encoder_gets_no_update_and_no_optimizer_state(tiny):
  """A few AdamW steps on the hinge loss: the optimizer state mirrors only LoRA + head; the teacher tree is
  untouched; the encoder's outputs are bit-identical before and after; only up-block kernels differ in the
  merged decoder, and the logits did move."""
  unet, params, x, t, text, pooled = tiny
  disc, dparams = _init(unet, params, "lora", x, t, text, pooled)
  teacher_before = jax.tree_util.tree_map(np.array, params)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
  opt = tx.init(dparams)
  opt_shapes = sorted(tuple(a.shape) for a in jax.tree_util.tree_leaves(opt) if np.ndim(a) > 0)
  param_shapes = sorted(tuple(a.shape) for a in jax.tree_util.tree_leaves(dparams))
  assert opt_shapes == sorted(param_shapes * 2)  # Adam mu and nu for the trainable leaves only
  fake = x + 0.5

  def loss_fn(p):
    logits = disc.apply(p, params, jnp.concatenate([x, fake]), jnp.concatenate([t, t]),
                        jnp.concatenate([text, text]), jnp.concatenate([pooled, pooled]))
    real, fk = jnp.split(logits, 2)
    return losses.hinge_d_loss(real, fk)

  @jax.jit
  def step(p, opt):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, loss, grads

  p, opt, loss0, grads = step(dparams, opt)
  assert all(jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads["lora"]))
  for _ in range(3):
    p, opt, loss, _ = step(p, opt)
  assert _tree_equal(params, teacher_before)
  encode = jax.jit(lambda dp: unet.apply(disc.encoder_params(dp, params), x, t, text, method=unet.encode))
  assert _tree_equal(encode(dparams), encode(p))
  merged = traverse_util.flatten_dict(disc.decoder_params(p, params))
  teacher = traverse_util.flatten_dict(params)
  changed = ["/".join(k) for k in teacher if not np.array_equal(np.asarray(merged[k]), np.asarray(teacher[k]))]
  assert changed and all(re.search(r"(^|/)up_blocks_\d+/.*/kernel$", k) for k in changed)
  assert float(loss) < float(loss0)


def test_zero_head_starts_every_logit_at_zero_and_learns_from_step_zero(tiny):
  """gan.head_init="zero" (the default): D = 0 at every position for any input, so both hinges have gradient
  (-1/N real, +1/N fake); that gradient reaches the head's conv and projection at once (and the LoRA factors
  one step later, through the conv); the "normal" head's logits start away from 0."""
  unet, params, x, t, text, pooled = tiny
  disc, dparams = _init(unet, params, "lora", x, t, text, pooled, head_init="zero")
  fake = x + 0.5
  logits = jax.jit(disc.apply)(dparams, params, jnp.concatenate([x, fake]), jnp.concatenate([t, t]),
                           jnp.concatenate([text, text]), jnp.concatenate([pooled, pooled]))
  np.testing.assert_array_equal(np.asarray(logits), 0.0)

  def loss_fn(p):
    real, fk = jnp.split(disc.apply(p, params, jnp.concatenate([x, fake]), jnp.concatenate([t, t]),
                                    jnp.concatenate([text, text]), jnp.concatenate([pooled, pooled])), 2)
    return losses.hinge_d_loss(real, fk)

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(dparams)
  assert float(loss) == 2.0
  head = grads["head"]["params"]
  assert float(jnp.abs(head["conv"]["kernel"]).max()) > 0 and float(jnp.abs(head["cond_proj"]["kernel"]).max()) > 0
  _, normal = _init(unet, params, "lora", x, t, text, pooled, head_init="normal")
  assert float(jnp.abs(jax.jit(disc.apply)(normal, params, x, t, text, pooled)).mean()) > 0.1


@pytest.mark.parametrize("remat", [False, True])
def test_factorised_lora_matches_merged(tiny, remat):
  """gan.lora_apply "factorised" (x W + s (x A) B per layer, `lora.factorised`) and "merged" (`lora.merge`) are the
  same discriminator in float32: logits and the gradients wrt the LoRA factors, the head and the input x, with
  a nonzero B (the overlay after some training) and with the U-Net's blocks under nn.remat."""
  unet, params, x, t, text, pooled = tiny
  unet = unet_lib.UNet2DConditionModel(TINY, remat=remat)
  disc, dparams = _init(unet, params, "lora", x, t, text, pooled)
  rng = np.random.default_rng(3)
  dparams = {**dparams, "lora": jax.tree_util.tree_map(
    lambda a: a + 0.1 * jnp.asarray(rng.standard_normal(a.shape), jnp.float32), dparams["lora"])}
  merged = dataclasses.replace(disc, lora_apply="merged")
  assert disc.lora_apply == "factorised"  # the default

  def run(d):
    def loss(p, z):
      logits = d.apply(p, params, z, t, text, pooled)
      return jnp.sum(jnp.tanh(logits)), logits
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(dparams, x)

  (g_fact, gx_fact), logits_fact = run(disc)
  (g_merged, gx_merged), logits_merged = run(merged)
  np.testing.assert_allclose(np.asarray(logits_fact), np.asarray(logits_merged), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gx_fact), np.asarray(gx_merged), rtol=1e-5, atol=1e-5)
  flat_f, flat_m = traverse_util.flatten_dict(g_fact), traverse_util.flatten_dict(g_merged)
  assert flat_f.keys() == flat_m.keys() and any(k[0] == "lora" for k in flat_f)
  for k in flat_m:
    scale = float(jnp.abs(flat_m[k]).max()) + 1e-12
    np.testing.assert_allclose(np.asarray(flat_f[k]) / scale, np.asarray(flat_m[k]) / scale, atol=1e-5,
                               err_msg="/".join(k))
  assert float(jnp.abs(logits_fact - jax.jit(disc.apply)({**dparams, "lora": jax.tree_util.tree_map(
    jnp.zeros_like, dparams["lora"])}, params, x, t, text, pooled)).max()) > 1e-3  # the overlay matters


def test_generator_gradient_reaches_the_input(tiny):
  """L_G flows into the fake sample through the frozen encoder and the LoRA decoder (nonzero, finite)."""
  unet, params, x, t, text, pooled = tiny
  disc, dparams = _init(unet, params, "lora", x, t, text, pooled)
  g = jax.jit(jax.grad(lambda z: losses.hinge_g_loss(disc.apply(dparams, params, z, t, text, pooled))))(x)
  assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_conditioning_and_no_cond_variant(tiny):
  unet, params, x, t, text, pooled = tiny
  disc, dparams = _init(unet, params, "lora", x, t, text, pooled)
  apply = jax.jit(disc.apply)  # the same code for no_cond (its difference is `condition`, applied first)
  base = apply(dparams, params, x, t, text, pooled)
  # The projection term makes the logits depend on the pooled text embedding and the time (per example).
  other_pooled = apply(dparams, params, x, t, text, -pooled)
  assert float(jnp.abs(base - other_pooled).max()) > 1e-4
  delta = other_pooled - base  # a per-example constant over positions
  np.testing.assert_allclose(np.asarray(delta), np.asarray(delta[:, :1, :1]) * np.ones_like(delta), atol=1e-5)
  assert float(jnp.abs(apply(dparams, params, x, t[::-1], text, pooled) - base).max()) > 1e-4
  # no_cond: t = 0 and the empty prompt whatever the caller passes.
  nc, nc_params = _init(unet, params, "no_cond", x, t, text, pooled)
  uncond_text, uncond_pooled = jnp.zeros((1, L, D)), jnp.ones((1, D))
  outs = []
  for tt, cc, pp in [(t, text, pooled), (t[::-1] + 5, -text, 2 * pooled)]:
    cond = nc.condition(tt, cc, pp, uncond_text, uncond_pooled)
    np.testing.assert_array_equal(np.asarray(cond[0]), 0)
    outs.append(apply(nc_params, params, x, *cond))
  np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))
  assert disc.condition(t, text, pooled, uncond_text, uncond_pooled)[1] is text


def test_full_variant_trains_a_copy(tiny):
  unet, params, x, t, text, pooled = tiny
  disc, dparams = _init(unet, params, "full", x, t, text, pooled)
  assert set(dparams) == {"unet", "head"}
  assert lora_lib.count_params(dparams["unet"]) == lora_lib.count_params(params)
  assert _tree_equal(dparams["unet"], params)
  a = jax.tree_util.tree_leaves(dparams["unet"])[0]
  b = jax.tree_util.tree_leaves(params)[0]
  assert a is not b and a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()  # a copy, not an alias
  grads = jax.jit(jax.grad(lambda p: jnp.mean(disc.apply(p, params, x, t, text, pooled))))(dparams)
  enc_grads = [g for path, g in traverse_util.flatten_dict(grads["unet"]).items() if path[1].startswith("down_")]
  assert enc_grads and any(float(jnp.abs(g).max()) > 0 for g in enc_grads)  # the encoder trains too


def test_unknown_variant_raises(tiny):
  with pytest.raises(ValueError, match="variant 'nope'.*lora, full, no_cond"):
    disc_lib.Discriminator(tiny[0], variant="nope")
