"""Parity of the Flax AutoencoderKL with diffusers' AutoencoderKL (float32, tiny random model, real photo)."""

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# A CUDA torchvision wheel next to CPU torch fails to import; hide it so transformers treats it as absent.
try:
  import torchvision  # noqa: F401
except (ImportError, RuntimeError, OSError):
  sys.modules["torchvision"] = None

import diffusers  # noqa: E402
import skimage.data  # noqa: E402
import skimage.transform  # noqa: E402
import torch  # noqa: E402

from scott_jax.models import loading  # noqa: E402
from scott_jax.models.vae import (  # noqa: E402
  AutoencoderKL,
  VAEConfig,
  decode_latents,
  encode_to_latents,
  prepare_vae_state_dict,
)


def _close(ours, ref, tol: float = 1e-4) -> None:
  """Max abs error <= tol * max(1, max |ref|)."""
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  err, scale = np.abs(ours - ref).max(), max(1.0, np.abs(ref).max())
  assert err <= tol * scale, f"max abs err {err:.3g} > {tol} * {scale:.3g}"


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def torch_vae(tmp_path_factory):
  """Tiny diffusers AutoencoderKL with perturbed weights, saved as a diffusers folder."""
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=16,
    latent_channels=4,
    sample_size=32,
    scaling_factor=0.3,
  ).eval()
  with torch.no_grad():  # default init zeroes biases and makes norms identity: perturb everything
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  root = tmp_path_factory.mktemp("sd")
  model.save_pretrained(root / "vae")
  return model, root


@pytest.fixture(scope="module")
def flax_vae(torch_vae):
  _, root = torch_vae
  return loading.load_vae(root)


@pytest.fixture(scope="module")
def photo():
  """skimage's astronaut photo resized to 32x32, (2, 32, 32, 3) in [-1, 1] (second image mirrored)."""
  img = skimage.transform.resize(skimage.data.astronaut(), (32, 32), anti_aliasing=True).astype(np.float32)
  img = img * 2.0 - 1.0
  return np.stack([img, img[:, ::-1]])


def test_config_from_saved_json(torch_vae, flax_vae):
  model, root = torch_vae
  vae, _ = flax_vae
  assert vae.config == VAEConfig.from_dict(json.loads((root / "vae" / "config.json").read_text()))
  assert vae.config.block_out_channels == tuple(model.config.block_out_channels)
  assert vae.config.scaling_factor == model.config.scaling_factor
  assert vae.config.downsample_factor == 2


def test_params_are_float32_and_cover_the_torch_state(torch_vae, flax_vae):
  model, _ = torch_vae
  _, params = flax_vae
  leaves = jax.tree_util.tree_leaves(params)
  assert all(x.dtype == jnp.float32 for x in leaves)
  assert sum(x.size for x in leaves) == sum(p.numel() for p in model.parameters())


def test_encode_matches_diffusers(torch_vae, flax_vae, photo):
  model, _ = torch_vae
  vae, params = flax_vae
  mean, logvar = jax.jit(lambda p, x: vae.apply(p, x, method=AutoencoderKL.encode))(params, photo)
  with torch.no_grad():
    dist = model.encode(_nchw(photo)).latent_dist
  assert np.abs(_nhwc(dist.mean)).max() > 0.1 and np.abs(_nhwc(dist.logvar)).max() > 0.1
  _close(mean, _nhwc(dist.mean))
  _close(logvar, _nhwc(dist.logvar))


def test_decode_matches_diffusers(torch_vae, flax_vae, photo):
  model, _ = torch_vae
  vae, params = flax_vae
  with torch.no_grad():
    z = model.encode(_nchw(photo)).latent_dist.mean
    ref = _nhwc(model.decode(z).sample)
  out = jax.jit(lambda p, z: vae.apply(p, z, method=AutoencoderKL.decode))(params, _nhwc(z))
  assert out.dtype == jnp.float32
  _close(out, ref)


def test_scaled_latent_helpers_match_pipeline_convention(torch_vae, flax_vae, photo):
  """mode: latents = mean * scaling_factor (diffusers training scripts); decode divides it back."""
  model, _ = torch_vae
  vae, params = flax_vae
  sf = model.config.scaling_factor
  with torch.no_grad():
    ref_latents = model.encode(_nchw(photo)).latent_dist.mode() * sf
    ref_images = model.decode(ref_latents / sf).sample
  latents = encode_to_latents(vae, params, photo)
  _close(latents, _nhwc(ref_latents))
  _close(decode_latents(vae, params, latents), _nhwc(ref_images))


def test_sampled_latents_follow_the_posterior(torch_vae, flax_vae, photo):
  """With a key, (latents / sf - mean) / std over all 2048 entries is standard normal (torch mean and std)."""
  model, _ = torch_vae
  vae, params = flax_vae
  with torch.no_grad():
    dist = model.encode(_nchw(photo)).latent_dist
  sf = model.config.scaling_factor
  a = encode_to_latents(vae, params, photo, jax.random.key(1))
  b = encode_to_latents(vae, params, photo, jax.random.key(2))
  r = (np.asarray(a) / sf - _nhwc(dist.mean)) / _nhwc(dist.std)
  assert r.size == 2048
  assert abs(r.mean()) < 4 / np.sqrt(r.size) and abs(r.std() - 1) < 0.1
  assert not np.allclose(a, b)


def test_shift_factor_round_trip(torch_vae, flax_vae, photo):
  """latents = (z - shift) * scale; decode_latents inverts it exactly before the decoder."""
  model, _ = torch_vae
  vae, params = flax_vae
  shifted = AutoencoderKL(dataclasses.replace(vae.config, shift_factor=0.7))
  with torch.no_grad():
    mean = model.encode(_nchw(photo)).latent_dist.mean
    ref = _nhwc(model.decode(mean).sample)
  latents = encode_to_latents(shifted, params, photo)
  _close(latents, (_nhwc(mean) - 0.7) * model.config.scaling_factor)
  _close(decode_latents(shifted, params, latents), ref)


def test_bfloat16_compute_is_close(torch_vae, flax_vae, photo):
  model, root = torch_vae
  vae16, params16 = loading.load_vae(root, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params16))
  mean, _ = vae16.apply(params16, photo, method=AutoencoderKL.encode)
  with torch.no_grad():
    ref = _nhwc(model.encode(_nchw(photo)).latent_dist.mean)
  assert mean.dtype == jnp.float32
  assert np.abs(np.asarray(mean) - ref).max() <= 0.05 * np.abs(ref).max()


def test_legacy_attention_names_are_renamed(torch_vae):
  """query/key/value/proj_attn (and 1x1-conv shapes) map to to_q/to_k/to_v/to_out.0, as diffusers does."""
  model, _ = torch_vae
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  legacy = {}
  for k, v in sd.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      if f".attentions.0.{new}." in k:
        k = k.replace(f".{new}.", f".{old}.")
        v = v[:, :, None, None] if v.ndim == 2 else v
    legacy[k] = v
  assert legacy.keys() != sd.keys()
  converted = prepare_vae_state_dict(legacy)
  assert converted.keys() == sd.keys()
  assert all(np.array_equal(converted[k], sd[k]) for k in sd)


def test_config_validation():
  with pytest.raises(ValueError, match="unknown VAE config keys"):
    VAEConfig.from_dict({"block_out_channels": [32], "norm_num_groups": 8, "conv_kernel": 3})
  with pytest.raises(ValueError, match="unsupported VAE block types"):
    VAEConfig.from_dict({"down_block_types": ["AttnDownEncoderBlock2D"], "block_out_channels": [32]})
  with pytest.raises(ValueError, match="latents_mean"):
    VAEConfig.from_dict({"latents_mean": [0.0] * 4})


def test_missing_folder_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "vae")):
    loading.load_vae(tmp_path)
  (tmp_path / "vae").mkdir()
  (tmp_path / "vae" / "config.json").write_text(
    json.dumps({"block_out_channels": [32], "norm_num_groups": 8})
  )
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "vae")):
    loading.load_vae(tmp_path)


def test_variant_options_match_diffusers(tmp_path, photo):
  """No quant convs, no mid-block attention, three blocks of two resnets, 8 groups, 3 latent channels."""
  torch.manual_seed(1)
  model = diffusers.AutoencoderKL(
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    norm_num_groups=8,
    latent_channels=3,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
  ).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path / "vae")
  vae, params = loading.load_vae(tmp_path)
  assert vae.config.downsample_factor == 4
  x = photo[:1, ::2, ::2]  # (1, 16, 16, 3)
  mean, logvar = jax.jit(lambda p, x: vae.apply(p, x, method=AutoencoderKL.encode))(params, x)
  with torch.no_grad():
    dist = model.encode(_nchw(x)).latent_dist
    ref = _nhwc(model.decode(dist.mean).sample)
  _close(mean, _nhwc(dist.mean))
  _close(logvar, _nhwc(dist.logvar))
  decode = jax.jit(lambda p, z: vae.apply(p, z, method=AutoencoderKL.decode))
  _close(decode(params, _nhwc(dist.mean)), ref)


def test_pixel_space_is_the_identity_on_grey_images_and_loads_from_its_marker(tmp_path, photo):
  """PixelSpace (pixel-space pipelines, no VAE weights): a grey RGB photo encodes to its one grey channel exactly
  (posterior samples equal the mean: a point mass) and decodes back to the same RGB image; the vae/config.json
  marker loads it through `loading.load_vae`, and a bad config names the offending value."""
  from scott_jax.models.vae import PixelSpace, PixelSpaceConfig, pixel_space_config_json

  grey = np.repeat(np.asarray(photo)[..., :1], 3, axis=-1)  # (B, H, W, 3) in [-1, 1], three equal channels
  (tmp_path / "vae").mkdir()
  (tmp_path / "vae" / "config.json").write_text(json.dumps(pixel_space_config_json(PixelSpaceConfig())))
  vae, params = loading.load_vae(tmp_path)
  assert isinstance(vae, PixelSpace) and params == {}
  assert vae.config.downsample_factor == 1 and vae.config.latent_channels == 1
  z = encode_to_latents(vae, params, jnp.asarray(grey))
  np.testing.assert_allclose(np.asarray(z), grey[..., :1], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(encode_to_latents(vae, params, jnp.asarray(grey), jax.random.key(0))),
                                np.asarray(z))
  np.testing.assert_allclose(np.asarray(decode_latents(vae, params, z)), grey, rtol=0, atol=1e-6)
  rgb = PixelSpace(PixelSpaceConfig(latent_channels=3))  # three model channels: the image itself
  np.testing.assert_array_equal(np.asarray(encode_to_latents(rgb, {}, jnp.asarray(photo))), np.asarray(photo))
  with pytest.raises(ValueError, match="latent_channels=2"):
    PixelSpaceConfig(latent_channels=2)
  (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "PixelSpace", "colour": 1}))
  with pytest.raises(ValueError, match="colour"):
    loading.load_vae(tmp_path)
