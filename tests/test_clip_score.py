"""Flax CLIP (image and text towers + projections) against transformers' CLIPModel on tiny random models saved with
save_pretrained, the image preprocessing against CLIPImageProcessor, the CLIP score against torch's cosine
similarity, and the ViT-g/14 configuration's size against transformers' own CLIPModel built on the meta device."""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data

try:  # A CUDA torchvision wheel next to CPU torch fails to import; hide it so transformers treats it as absent.
  import torchvision  # noqa: F401
except (ImportError, RuntimeError, OSError):
  sys.modules["torchvision"] = None

import torch  # noqa: E402
import transformers  # noqa: E402

from scott_jax.metrics import clip_model, clip_score  # noqa: E402
from scott_jax.metrics.clip_model import CLIPModel  # noqa: E402
from scott_jax.models import loading  # noqa: E402
from scott_jax.models.lora import count_params  # noqa: E402

TOL = 1e-4  # max |ours - torch| <= TOL * max(1, max |torch|)


def _close(ours, ref, tol: float = TOL) -> None:
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  err, scale = np.abs(ours - ref).max(), max(1.0, np.abs(ref).max())
  assert err <= tol * scale, f"max abs err {err:.3g} > {tol} * {scale:.3g}"


def _tiny_clip(hidden_act: str = "gelu", seed: int = 0) -> transformers.CLIPModel:
  torch.manual_seed(seed)
  text = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act=hidden_act,
  )
  vision = dict(
    hidden_size=40,
    intermediate_size=56,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=224,
    patch_size=32,
    hidden_act=hidden_act,
  )
  config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # non-trivial layer norms and class token (the default init is ones / zeros)
    for name, p in model.named_parameters():
      if "layer_norm" in name or "layrnorm" in name or "layernorm" in name or "class_embedding" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _photos() -> list[np.ndarray]:
  rocket = skimage.data.rocket()  # (427, 640, 3)
  return [
    skimage.data.astronaut(),
    skimage.data.chelsea(),
    skimage.data.coffee(),
    np.ascontiguousarray(rocket.transpose(1, 0, 2)),  # portrait
    skimage.data.immunohistochemistry()[:223, :301],  # shorter side below 224: upsampled
  ]


def _token_ids(n: int = 5, length: int = 77, seed: int = 0) -> np.ndarray:
  """bos, random tokens, eos, then eos padding (the SD / CLIP tokenizer layout)."""
  rng = np.random.default_rng(seed)
  ids = np.full((n, length), 49407, np.int32)
  for i in range(n):
    m = int(rng.integers(1, length - 2))
    ids[i, 0], ids[i, 1 : m + 1] = 49406, rng.integers(0, 49406, m)
  return ids


def _jit_apply(model: CLIPModel, method):
  return jax.jit(functools.partial(model.apply, method=method))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  folder = tmp_path_factory.mktemp("clip")
  model = _tiny_clip()
  model.save_pretrained(folder)
  return str(folder), model


def _torch_image_features(model, pixels_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model.get_image_features(pixel_values=torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2)))
  return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()


def _torch_text_features(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model.get_text_features(input_ids=torch.from_numpy(ids).long())
  return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()


def test_preprocess_matches_clip_image_processor():
  processor = transformers.CLIPImageProcessor()
  photos = _photos()
  ref = processor(images=photos, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  ours = clip_model.preprocess_images(photos)
  assert ours.shape == (len(photos), 224, 224, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_embeddings_match_transformers(saved):
  folder, model = saved
  flax_model, params = clip_model.load_clip_model(folder)
  assert flax_model.config.projection_dim == 24 and flax_model.config.vision.patch_size == 32
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  torch_params = sum(p.numel() for p in model.parameters())
  assert count_params(params) == torch_params
  pixels = clip_model.preprocess_images(_photos())
  ids = _token_ids()
  ours_img = _jit_apply(flax_model, CLIPModel.get_image_features)(params, pixels)
  ours_txt = _jit_apply(flax_model, CLIPModel.get_text_features)(params, ids)
  _close(ours_img, _torch_image_features(model, pixels))
  _close(ours_txt, _torch_text_features(model, ids))
  # The batched helpers (fixed batch with a padded last batch) give the same embeddings.
  _close(clip_score.image_embeddings(flax_model, params, _photos(), batch_size=2), ours_img)
  _close(clip_score.text_embeddings(flax_model, params, ids, batch_size=3), ours_txt)


def test_quick_gelu_variant(tmp_path):
  model = _tiny_clip("quick_gelu", seed=1)
  model.save_pretrained(tmp_path)
  flax_model, params = clip_model.load_clip_model(str(tmp_path))
  pixels = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
  _close(
    _jit_apply(flax_model, CLIPModel.get_image_features)(params, pixels),
    _torch_image_features(model, pixels),
  )
  ids = _token_ids(2, 77, seed=1)
  _close(_jit_apply(flax_model, CLIPModel.get_text_features)(params, ids), _torch_text_features(model, ids))


def test_clip_score_is_mean_raw_cosine(saved):
  folder, model = saved
  flax_model, params = clip_model.load_clip_model(folder)
  img = clip_score.image_embeddings(flax_model, params, _photos())
  txt = clip_score.text_embeddings(flax_model, params, _token_ids())
  ref = torch.nn.functional.cosine_similarity(torch.from_numpy(img), torch.from_numpy(txt), dim=-1).mean()
  np.testing.assert_allclose(clip_score.clip_score(img, txt), float(ref), rtol=1e-5, atol=1e-6)
  # transformers' CLIPModel forward: logits_per_image = exp(logit_scale) * cos; its diagonal / exp(scale).
  with torch.no_grad():
    out = model(
      input_ids=torch.from_numpy(_token_ids()).long(),
      pixel_values=torch.from_numpy(clip_model.preprocess_images(_photos()).transpose(0, 3, 1, 2)),
    )
  cos = torch.diagonal(out.logits_per_image) / model.logit_scale.exp()
  np.testing.assert_allclose(clip_score.clip_score(img, txt), float(cos.mean()), rtol=1e-4, atol=1e-5)
  # Raw cosine, not x100: |score| <= 1; identical embeddings score exactly 1.
  assert abs(clip_score.clip_score(img, txt)) <= 1.0
  np.testing.assert_allclose(clip_score.clip_score(img, 3.0 * img), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="matched"):
    clip_score.clip_score(img, txt[:2])


def test_vit_g14_builds_and_matches_transformers_size():
  cfg = clip_model.vit_g14_config()
  model = CLIPModel(cfg)
  abstract = clip_model.abstract_params(cfg)
  ours = count_params(abstract)
  out = jax.eval_shape(
    lambda p: model.apply(p, jnp.zeros((2, 224, 224, 3)), jnp.zeros((2, 77), jnp.int32)), abstract
  )
  assert out.image_embeds.shape == out.text_embeds.shape == (2, 1024)
  hf = transformers.CLIPConfig(
    text_config=dict(
      hidden_size=1024,
      intermediate_size=4096,
      num_hidden_layers=24,
      num_attention_heads=16,
      hidden_act="gelu",
    ),
    vision_config=dict(
      hidden_size=1408,
      intermediate_size=6144,
      num_hidden_layers=40,
      num_attention_heads=16,
      patch_size=14,
      image_size=224,
      hidden_act="gelu",
    ),
    projection_dim=1024,
  )
  with torch.device("meta"):
    reference = transformers.CLIPModel(hf)
  assert ours == sum(p.numel() for p in reference.parameters())
  assert 1.36e9 < ours < 1.38e9, ours  # "1.37B" (vision 1.01B + text 0.35B + projections)


def test_config_and_folder_errors(tmp_path, saved):
  with pytest.raises(FileNotFoundError, match="config.json"):
    clip_model.load_clip_model(str(tmp_path))
  # Older checkpoints carry position_ids buffers; they are dropped. A missing tensor is an error, not a random init.
  folder, _ = saved
  state = loading.read_safetensors_folder(folder)
  legacy = {**state, "vision_model.embeddings.position_ids": np.arange(50)[None]}
  assert clip_model.prepare_clip_state_dict(legacy).keys() == state.keys()
  del state["visual_projection.weight"]
  with pytest.raises(loading.WeightLoadError, match="visual_projection"):
    loading.convert_state_dict(
      state, clip_model.abstract_params(clip_model.load_clip_model(folder)[0].config)
    )
  with pytest.raises(ValueError, match="clip"):
    clip_model.CLIPConfig.from_dict({"model_type": "clip_text_model"})
  with pytest.raises(ValueError, match="patch_size"):
    clip_model.CLIPVisionConfig(image_size=224, patch_size=15)
