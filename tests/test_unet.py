"""Parity of the Flax U-Net with diffusers' UNet2DConditionModel (float32, tiny random models), and its
encode/decode split, attention implementations, remat, bf16 compute and the diffusers round trip."""

import dataclasses
import functools
import math

import diffusers
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from scott_jax.models import loading, unet

BATCH, CONTEXT_LEN = 2, 7

# Tiny stand-ins for the SD1.5, SD2.x and LCM U-Nets (diffusers constructor kwargs) and their latent size.
TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8)
CASES = {
  "sd15": (TINY, 16),
  # SD2.x: linear projections, per-block head counts, 1024-d text states, upcast attention; three levels with
  # per-block layer counts, and an 18x18 latent so the up path resizes to the skips' odd sizes (9 -> 5 -> 9).
  "sd2": (dict(block_out_channels=(32, 64, 64), layers_per_block=(1, 2, 1),
               transformer_layers_per_block=(1, 2, 1), norm_num_groups=8, sample_size=18,
               cross_attention_dim=1024, attention_head_dim=(2, 4, 4),
               use_linear_projection=True, upcast_attention=True,
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")), 18),
  # LCM: the guidance embedding `time_cond_proj_dim`.
  "lcm": (dict(TINY, time_cond_proj_dim=256), 16),
  # SDXL: a first down block without attention, per-block heads and transformer depth (the mid block takes the
  # last, 3), linear projections, two encoders' states concatenated (16 + 32), and the text_time added
  # embedding: pooled text (32) + six time ids at 8 features each.
  "sdxl": (dict(block_out_channels=(32, 64, 64), layers_per_block=1, transformer_layers_per_block=(1, 2, 3),
                attention_head_dim=(2, 4, 8), norm_num_groups=8, sample_size=16, cross_attention_dim=48,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=32 + 6 * 8,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")), 16),
}
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (written by diffusers 0.19).
SDXL_UNET_CONFIG = {
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
  "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
  "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
  "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
  "cross_attention_dim": 2048, "cross_attention_norm": None,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
  "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
  "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
  "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
  "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
  "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
  "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
  "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
  "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
  "use_linear_projection": True,
}
# SDXL micro-conditioning rows (original h, w, crop top, left, target h, w) in pixels, one per batch item.
TIME_IDS = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1360, 64, 12, 896, 1152]], np.float32)


def _close(ours, ref, tol: float = 1e-4) -> None:
  """Max abs error <= tol * max(1, max |ref|)."""
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  err, scale = np.abs(ours - ref).max(), max(1.0, np.abs(ref).max())
  assert err <= tol * scale, f"max abs err {err:.3g} > {tol} * {scale:.3g}"


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().permute(0, 2, 3, 1).numpy()


def _torch_unet(kwargs: dict, seed: int = 0) -> diffusers.UNet2DConditionModel:
  """diffusers U-Net with every parameter perturbed (so no layer is zero or identity at init)."""
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(**kwargs).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _torch_forward(model, sample, t, context, cond=None, text_embeds=None, time_ids=None) -> np.ndarray:
  added = None if text_embeds is None else dict(text_embeds=torch.from_numpy(text_embeds),
                                                time_ids=torch.from_numpy(time_ids))
  with torch.no_grad():
    out = model(_nchw(sample), torch.as_tensor(t), torch.from_numpy(context),
                timestep_cond=None if cond is None else torch.from_numpy(cond), added_cond_kwargs=added).sample
  return _nhwc(out)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  """(name, torch model, folder, Flax module, params, inputs, torch output, jitted apply)."""
  kwargs, size = CASES[request.param]
  model = _torch_unet(kwargs)
  folder = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(folder)
  module, params = loading.load_unet(folder)
  rng = np.random.default_rng(1)
  inputs = dict(sample=rng.standard_normal((BATCH, size, size, 4), np.float32),
                t=np.array([10, 900], np.int64),
                context=rng.standard_normal((BATCH, CONTEXT_LEN, kwargs["cross_attention_dim"]), np.float32),
                cond=None, text_embeds=None, time_ids=None)
  if "time_cond_proj_dim" in kwargs:
    inputs["cond"] = rng.standard_normal((BATCH, kwargs["time_cond_proj_dim"]), np.float32)
  if kwargs.get("addition_embed_type") == "text_time":
    pooled = kwargs["projection_class_embeddings_input_dim"] - 6 * kwargs["addition_time_embed_dim"]
    inputs["text_embeds"] = rng.standard_normal((BATCH, pooled), np.float32)
    inputs["time_ids"] = TIME_IDS
  ref = _torch_forward(model, **inputs)
  return dict(name=request.param, model=model, folder=folder, module=module, params=params, inputs=inputs,
              ref=ref, apply=jax.jit(module.apply))


def _run(c, module=None, params=None, apply=None):
  x = c["inputs"]
  apply = apply or (c["apply"] if module is None else jax.jit(module.apply))
  return apply(params or c["params"], x["sample"], x["t"], x["context"], x["cond"], x["text_embeds"],
               x["time_ids"])


def test_parity_with_diffusers(case):
  _close(_run(case), case["ref"], 1e-4)


def test_scalar_timestep(case):
  if case["name"] != "sd15":
    pytest.skip("one configuration is enough")
  x = case["inputs"]
  ours = case["apply"](case["params"], x["sample"], 437.0, x["context"], x["cond"])
  _close(ours, _torch_forward(case["model"], x["sample"], torch.tensor(437.0), x["context"], x["cond"]), 1e-4)


def test_encode_decode_equals_call(case):
  if case["name"] != "sd15":
    pytest.skip("one configuration is enough")
  module, params, x = case["module"], case["params"], case["inputs"]

  @jax.jit
  def split(params):
    h, skips, temb = module.apply(params, x["sample"], x["t"], x["context"], method=module.encode)
    out = module.apply(params, h, skips, temb, x["context"], method=module.decode)
    feats = module.apply(params, h, skips, temb, x["context"], return_features=True, method=module.decode)
    return out, feats, len(skips)

  out, feats, n_skips = split(params)
  np.testing.assert_allclose(np.asarray(out), np.asarray(_run(case)), rtol=0, atol=1e-6)
  assert feats.shape == x["sample"].shape[:3] + (module.config.block_out_channels[0],)
  # diffusers' skip count: conv_in + layers per down block + one per downsampler.
  cfg = module.config
  assert n_skips == 1 + sum(cfg.layers_per_block) + len(cfg.block_out_channels) - 1


def test_attention_implementations_agree(case):
  """Query-chunked attention (ragged last block) equals plain XLA attention."""
  if case["name"] != "sd15":
    pytest.skip("one configuration is enough")
  chunked = dataclasses.replace(case["module"], attention="chunked", attention_chunk_size=48)
  _close(_run(case, module=chunked), _run(case), 1e-5)


def test_bf16_compute_close_to_f32(case):
  if case["name"] != "sd15":
    pytest.skip("one configuration is enough")
  bf16 = dataclasses.replace(case["module"], dtype=jnp.bfloat16)
  ours, ref = np.asarray(_run(case, module=bf16)), np.asarray(_run(case))
  assert ours.dtype == np.float32
  assert np.abs(ours - ref).max() <= 2e-2 * np.abs(ref).max()


def test_remat_same_output(case):
  if case["name"] != "sd15":
    pytest.skip("one configuration is enough")
  _close(_run(case, module=dataclasses.replace(case["module"], remat=True)), _run(case), 1e-6)


@pytest.mark.slow
def test_remat_same_values_and_gradients():
  """nn.remat per block changes neither the parameter tree, the loss nor its gradients (a one-level U-Net with
  every block kind: cross-attention down block, mid block, cross-attention up block)."""
  config = unet.UNetConfig(sample_size=8, block_out_channels=(16,), layers_per_block=(1,),
                           transformer_layers_per_block=(1,), attention_head_dim=(2,), cross_attention_dim=8,
                           norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D",),
                           up_block_types=("CrossAttnUpBlock2D",), time_cond_proj_dim=4)
  params = unet.init_params(jax.random.key(0), config)
  rng = np.random.default_rng(0)
  sample, context = rng.standard_normal((2, 8, 8, 4), np.float32), rng.standard_normal((2, 3, 8), np.float32)
  cond = rng.standard_normal((2, 4), np.float32)

  def loss(module, params):
    return jnp.mean(module.apply(params, sample, jnp.array([3, 700]), context, cond) ** 2)

  plain, remat = unet.UNet2DConditionModel(config), unet.UNet2DConditionModel(config, remat=True)
  assert jax.tree.structure(jax.eval_shape(remat.init, jax.random.key(0), sample, 1.0, context, cond)) == \
      jax.tree.structure(params)
  (l0, g0), (l1, g1) = [jax.jit(jax.value_and_grad(functools.partial(loss, m)))(params)
                        for m in (plain, remat)]
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  assert jax.tree.structure(g1) == jax.tree.structure(g0)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    _close(a, b, 1e-5)


def test_save_unet_loads_in_diffusers(case, tmp_path):
  """save_unet -> diffusers.from_pretrained gives the original torch model's output and config."""
  if case["name"] == "sd15":
    pytest.skip("sd2, lcm and sdxl cover the options")
  loading.save_unet(tmp_path, case["module"].config, case["params"])
  back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
  orig = dict(case["model"].config)
  for key, value in back.config.items():
    if not key.startswith("_"):
      assert _norm(value) == _norm(orig[key]), key
  np.testing.assert_array_equal(_torch_forward(back, **case["inputs"]), case["ref"])


def _norm(v):
  """Config values as diffusers may store them: int or per-block list, tuple or list."""
  if isinstance(v, list | tuple):
    return tuple(v) if len(set(v)) > 1 else _norm(v[0])
  return v


def test_timestep_embedding_matches_diffusers():
  from diffusers.models.embeddings import get_timestep_embedding

  t = np.array([0.0, 3.0, 999.0, 17.5], np.float32)
  for dim, flip, shift in [(32, True, 0), (33, False, 1), (320, True, 0)]:
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    # float32 arguments up to ~1000 rad: one ulp of the frequency moves sin/cos by ~1e-4.
    _close(unet.timestep_embedding(jnp.asarray(t), dim, flip, shift), ref.numpy(), 2e-4)


def test_config_round_trip_and_rejections():
  cfg = unet.UNetConfig.from_diffusers(dict(diffusers.UNet2DConditionModel(**CASES["sd2"][0]).config))
  assert cfg.attention_head_dim == (2, 4, 4) and cfg.cross_attention_dim == 1024 and cfg.use_linear_projection
  assert unet.UNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
  base = cfg.to_diffusers()
  for key, value in [("class_embed_type", "timestep"), ("addition_embed_type", "text"),
                     ("addition_embed_type", "text_time"),  # without its two dimensions
                     ("addition_time_embed_dim", 256),  # without addition_embed_type
                     ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("only_cross_attention", True),
                     ("resnet_time_scale_shift", "scale_shift"), ("not_an_option", 1)]:
    with pytest.raises(ValueError, match=key if key != "mid_block_type" else "UNetMidBlock2DSimpleCrossAttn"):
      unet.UNetConfig.from_diffusers({**base, key: value})


def test_sdxl_config_matches_diffusers():
  """SDXL base's unet/config.json: our reading round-trips, and diffusers builds the same architecture from our
  to_diffusers() dict as from the original (compared on the meta device: no memory)."""
  cfg = unet.UNetConfig.from_diffusers(SDXL_UNET_CONFIG)
  assert cfg.addition_embed_type == "text_time" and cfg.transformer_layers_per_block == (1, 2, 10)
  assert cfg.upcast_attention is False and cfg.attention_head_dim == (5, 10, 20)
  assert unet.UNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
  with torch.device("meta"):
    shapes = [{k: tuple(v.shape) for k, v in diffusers.UNet2DConditionModel.from_config(c).state_dict().items()}
              for c in (SDXL_UNET_CONFIG, cfg.to_diffusers())]
  assert shapes[0] == shapes[1]


def test_text_time_inputs_are_checked():
  """An SDXL U-Net refuses to run without text_embeds/time_ids or with the wrong added width; one without
  text_time refuses them; time_ids (n,) and text_embeds (1, P) broadcast over the batch."""
  base = dict(sample_size=8, block_out_channels=(16,), layers_per_block=(1,), transformer_layers_per_block=(1,),
              attention_head_dim=(2,), cross_attention_dim=8, norm_num_groups=4,
              down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))
  xl = unet.UNetConfig(**base, addition_embed_type="text_time", addition_time_embed_dim=4,
                       projection_class_embeddings_input_dim=5 + 6 * 4)
  sample, context = jnp.zeros((3, 8, 8, 4)), jnp.zeros((3, 2, 8))

  def run(config, **added):
    module = unet.UNet2DConditionModel(config)
    return jax.eval_shape(module.apply, unet.abstract_params(config), sample, 1.0, context, **added)

  assert run(xl, text_embeds=jnp.zeros((1, 5)), time_ids=jnp.zeros(6)).shape == sample.shape
  with pytest.raises(ValueError, match="needs text_embeds"):
    run(xl)
  with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
    run(xl, text_embeds=jnp.zeros((3, 5)), time_ids=jnp.zeros((3, 5)))
  with pytest.raises(ValueError, match="text_time"):
    run(unet.UNetConfig(**base), text_embeds=jnp.zeros((3, 5)), time_ids=jnp.zeros((3, 6)))


@pytest.mark.slow
def test_full_size_sd15_parity():
  """The SD1.5 U-Net architecture (860M parameters, random weights) at 64x64 latents."""
  model = _torch_unet(dict(sample_size=64, cross_attention_dim=768))
  config = unet.UNetConfig.from_diffusers(dict(model.config))
  params = loading.convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()},
                                      unet.abstract_params(config))
  rng = np.random.default_rng(0)
  x = dict(sample=rng.standard_normal((1, 64, 64, 4), np.float32), t=np.array([500]),
           context=rng.standard_normal((1, 77, 768), np.float32))
  ref = _torch_forward(model, **x)
  del model
  module = unet.UNet2DConditionModel(config)
  _close(jax.jit(module.apply)(params, x["sample"], x["t"], x["context"]), ref, 1e-4)


@pytest.mark.slow
def test_full_size_sdxl_builds_with_diffusers_parameter_count():
  """The SDXL base U-Net (config above) builds by eval_shape with exactly diffusers' parameter shapes (counted
  on torch's meta device, no memory): 2,567,463,684 parameters."""
  config = unet.UNetConfig.from_diffusers(SDXL_UNET_CONFIG)
  ours = {loading.flax_path_to_torch_key(p): tuple(v.shape)
          for p, v in flax.traverse_util.flatten_dict(unet.abstract_params(config)["params"]).items()}
  with torch.device("meta"):
    model = diffusers.UNet2DConditionModel.from_config(SDXL_UNET_CONFIG)
  ref = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  assert ours.keys() == ref.keys()
  # Dense kernels are transposed and convolutions HWIO: compare element counts per tensor.
  assert {k: math.prod(v) for k, v in ours.items()} == {k: math.prod(v) for k, v in ref.items()}
  assert sum(math.prod(v) for v in ours.values()) == sum(p.numel() for p in model.parameters()) == 2_567_463_684


def test_chunked_attention_gradients_equal_plain():
  """The chunked attention (checkpointed query blocks, ragged last block) has the plain attention's gradients
  with respect to q, k and v (1e-5)."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((1, 40, 2, 4), (1, 24, 2, 4), (1, 24, 2, 4)))
  r = jnp.asarray(rng.standard_normal((1, 40, 2, 4)), jnp.float32)

  def loss(impl, q, k, v):
    return jnp.sum(unet.dot_product_attention(q, k, v, implementation=impl, chunk_size=16) * r)

  ours = jax.jit(jax.grad(functools.partial(loss, "chunked"), argnums=(0, 1, 2)))(q, k, v)
  ref = jax.jit(jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(ours, ref, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_odd_lengths_padded_for_cudnn_keep_values_and_gradients():
  """`unet.padded_to_even` (what the cudnn path runs for odd lengths: CLIP's 77 tokens) equals the unpadded
  attention, values and gradients wrt q, k, v (1e-5, run with the XLA implementation on this CPU). With the CUDA
  plugin installed (the gpu-plan extra), the cudnn path's gradient at those lengths compiles for an H100 without
  one (deviceless): JAX's own cuDNN front end refuses odd lengths in training, which the padding avoids."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 33, 2, 8), (2, 77, 2, 8), (2, 77, 2, 8)))
  r = jnp.asarray(rng.standard_normal((2, 33, 2, 8)), jnp.float32)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * r)

  padded = functools.partial(unet.padded_to_even, implementation="xla")
  plain = functools.partial(jax.nn.dot_product_attention, implementation="xla")
  _close(padded(q, k, v), plain(q, k, v), 1e-5)
  ours = jax.jit(jax.grad(functools.partial(loss, padded), argnums=(0, 1, 2)))(q, k, v)
  ref = jax.jit(jax.grad(functools.partial(loss, plain), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(ours, ref, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)

  pytest.importorskip("jax_plugins.xla_cuda12")
  from scott_jax import plan

  device = plan.topology_devices("h100:1")[0]
  shardings = jax.sharding.SingleDeviceSharding(device)
  args = [jax.ShapeDtypeStruct((2, 4096, 8, 40), jnp.bfloat16, sharding=shardings)]
  args += [jax.ShapeDtypeStruct((2, 77, 8, 40), jnp.bfloat16, sharding=shardings)] * 2

  def cudnn_loss(q, k, v):
    return jnp.sum(unet.dot_product_attention(q, k, v, implementation="cudnn").astype(jnp.float32))

  with plan.deviceless_cudnn(device):
    compiled = jax.jit(jax.grad(cudnn_loss, argnums=(0, 1, 2))).trace(*args).lower().compile()
  assert "__cudnn$fmha" in compiled.as_text()


def test_resolve_attention_and_remat_policy():
  """"auto" is cuDNN only on a GPU with half-precision compute, the chunked path elsewhere; other names pass
  through; an unknown remat policy is refused when the module is set up."""
  assert unet.resolve_attention("auto", jnp.bfloat16, "gpu") == "cudnn"
  assert unet.resolve_attention("auto", jnp.float16, "cuda") == "cudnn"
  assert unet.resolve_attention("auto", jnp.float32, "gpu") == "chunked"
  assert unet.resolve_attention("auto", jnp.bfloat16, "tpu") == "chunked"
  assert unet.resolve_attention("auto", jnp.bfloat16, "cpu") == "chunked"
  assert unet.resolve_attention("xla", jnp.bfloat16, "gpu") == "xla"
  module = unet.UNet2DConditionModel(unet.UNetConfig(sample_size=8, block_out_channels=(32, 64),
                                                     layers_per_block=(1, 1), norm_num_groups=8,
                                                     transformer_layers_per_block=(1, 1),
                                                     cross_attention_dim=16, attention_head_dim=(2, 2),
                                                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
                                     remat=True, remat_policy="everything")
  with pytest.raises(ValueError, match="remat_policy"):
    jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 3, 16)))
