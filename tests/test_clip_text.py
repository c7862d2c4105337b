"""Parity of the Flax CLIP text encoder with transformers' CLIPTextModel, the tokenizer with open_clip's, and
loading of a whole diffusers Stable Diffusion folder."""

import gzip
import importlib.util
import json
import os
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

import torch  # noqa: E402
import transformers  # noqa: E402

from scott_jax.models import loading  # noqa: E402
from scott_jax.models.clip_text import (  # noqa: E402
  CLIPTextConfig,
  CLIPTextModel,
  prepare_clip_text_state_dict,
  tokenize,
)

PROMPTS = [
  "a photo of an astronaut riding a horse on Mars",
  "A   DSLR photo, 4k!! of a cat's whiskers -- hyper-detailed (masterpiece)",
  "tok " * 100,  # longer than 77 tokens: truncated
  "",
]


def _close(ours, ref, tol: float = 1e-4) -> None:
  """Max abs error <= tol * max(1, max |ref|)."""
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  err, scale = np.abs(ours - ref).max(), max(1.0, np.abs(ref).max())
  assert err <= tol * scale, f"max abs err {err:.3g} > {tol} * {scale:.3g}"


def _open_clip_tokenizer_module():
  """open_clip/tokenizer.py loaded on its own (the package __init__ imports torchvision)."""
  spec = importlib.util.find_spec("open_clip")
  path = os.path.join(os.path.dirname(spec.origin), "tokenizer.py")
  mod_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module


def _write_clip_tokenizer(folder, oc, pad_token: str | None = None) -> None:
  """vocab.json + merges.txt from open_clip's CLIP BPE file, in the layout of SD1.5's tokenizer/ folder
  (``pad_token`` "!" gives SDXL's tokenizer_2/, which pads with id 0)."""
  merges = gzip.open(oc.default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
  chars = list(oc.bytes_to_unicode().values())
  vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  folder.mkdir(parents=True)
  (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  (folder / "tokenizer_config.json").write_text(
    json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}
               | ({} if pad_token is None else {"pad_token": pad_token}))
  )


def _tiny_text_model(eos_token_id: int = 49407, hidden_act: str = "quick_gelu", seed: int = 0):
  torch.manual_seed(seed)
  config = transformers.CLIPTextConfig(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act=hidden_act,
    eos_token_id=eos_token_id,
  )
  model = transformers.CLIPTextModel(config).eval()
  with torch.no_grad():  # default init zeroes biases and makes norms identity: perturb everything
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """A folder with tokenizer/ (real CLIP BPE) and text_encoder/ (tiny random CLIPTextModel)."""
  root = tmp_path_factory.mktemp("sd")
  oc = _open_clip_tokenizer_module()
  _write_clip_tokenizer(root / "tokenizer", oc)
  model = _tiny_text_model()
  model.save_pretrained(root / "text_encoder")
  return root, model, oc


@pytest.fixture(scope="module")
def ids(folders):
  root, _, _ = folders
  return tokenize(loading.load_tokenizer(root), PROMPTS)


def _torch_outputs(model, ids):
  with torch.no_grad():
    out = model(torch.from_numpy(ids).long(), output_hidden_states=True)
    skip1 = model.final_layer_norm(out.hidden_states[-2])  # diffusers encode_prompt(clip_skip=1)
  return out, skip1.numpy()


def test_tokenize_matches_open_clip(folders, ids):
  root, _, oc = folders
  tokenizer = loading.load_tokenizer(root)
  assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
  ref = oc.SimpleTokenizer()(PROMPTS, context_length=77).numpy()
  # open_clip pads with 0; the SD tokenizer pads with its pad token (<|endoftext|>).
  eot = np.argmax(ref == oc.SimpleTokenizer().eot_token_id, axis=1)
  after = np.arange(77)[None] > eot[:, None]
  ref = np.where(after, tokenizer.pad_token_id, ref)
  np.testing.assert_array_equal(ids, ref)
  assert ids[2, -1] == tokenizer.eos_token_id and ids[0, 0] == tokenizer.bos_token_id
  short = tokenize(tokenizer, [PROMPTS[0], PROMPTS[2]], max_length=16)
  np.testing.assert_array_equal(short[0], ids[0, :16])
  np.testing.assert_array_equal(short[1], np.r_[ids[2, :15], tokenizer.eos_token_id])


def test_text_encoder_matches_transformers(folders, ids):
  root, model, _ = folders
  encoder, params = loading.load_text_encoder(root)
  assert encoder.config == CLIPTextConfig.from_dict(
    json.loads((root / "text_encoder" / "config.json").read_text())
  )
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  out = jax.jit(encoder.apply)(params, ids)
  ref, _ = _torch_outputs(model, ids)
  _close(out.last_hidden_state, ref.last_hidden_state.numpy())
  _close(out.pooler_output, ref.pooler_output.numpy())
  assert len(out.hidden_states) == len(ref.hidden_states) == 4
  for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
    _close(ours, theirs.numpy())


def test_prompt_embeds_clip_skip(folders, ids):
  """clip_skip=1 is diffusers' rule: final_layer_norm(hidden_states[-2]); clip_skip=0 is last_hidden_state."""
  root, model, _ = folders
  encoder, params = loading.load_text_encoder(root)
  ref, skip1 = _torch_outputs(model, ids)
  _close(encoder.apply(params, ids, 1, method=CLIPTextModel.prompt_embeds), skip1)
  _close(encoder.apply(params, ids, 0, method=CLIPTextModel.prompt_embeds), ref.last_hidden_state.numpy())
  with pytest.raises(ValueError, match="clip_skip"):
    encoder.apply(params, ids, 3, method=CLIPTextModel.prompt_embeds)


@pytest.mark.parametrize("eos_token_id,hidden_act", [(2, "gelu"), (49407, "gelu_new")])
def test_pooling_rule_and_activation(tmp_path, eos_token_id, hidden_act):
  """eos_token_id == 2 (legacy configs, SD1.5): pool at argmax(ids); otherwise at the first eos_token_id. The
  ids contain both a 2 and several 49407 before the largest id, so the two rules pick different rows."""
  model = _tiny_text_model(eos_token_id, hidden_act, seed=1)
  model.save_pretrained(tmp_path / "text_encoder")
  encoder, params = loading.load_text_encoder(tmp_path)
  rng = np.random.RandomState(0)
  ids = rng.randint(3, 49000, size=(2, 20)).astype(np.int32)
  ids[:, 3] = 2
  ids[0, 7], ids[0, 12], ids[1, 15] = 49407, 49407, 49407
  ids[0, 5] = 49406  # argmax of row 0 differs from its first 49407
  out = encoder.apply(params, ids)
  with torch.no_grad():
    ref = model(torch.from_numpy(ids).long())
  _close(out.last_hidden_state, ref.last_hidden_state.numpy())
  _close(out.pooler_output, ref.pooler_output.numpy())


def test_legacy_prefix_and_position_ids_are_dropped(folders):
  _, model, _ = folders
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  legacy = {f"text_model.{k}": v for k, v in sd.items()}
  legacy["text_model.embeddings.position_ids"] = np.arange(77)[None]
  converted = prepare_clip_text_state_dict(legacy)
  assert converted.keys() == sd.keys()
  assert all(np.array_equal(converted[k], sd[k]) for k in sd)


def test_config_validation():
  with pytest.raises(ValueError, match="hidden_act"):
    CLIPTextConfig.from_dict({"hidden_act": "relu"})
  with pytest.raises(ValueError, match="clip_text_model"):
    CLIPTextConfig.from_dict({"model_type": "clip_vision_model"})
  with pytest.raises(ValueError, match="use_attention_mask"):
    CLIPTextConfig.from_dict({"use_attention_mask": True})
  nested = CLIPTextConfig.from_dict({"model_type": "clip", "text_config": {"hidden_size": 64}})
  assert nested.hidden_size == 64


def test_missing_folder_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "text_encoder")):
    loading.load_text_encoder(tmp_path)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer")):
    loading.load_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def sd_folder(folders, tmp_path_factory):
  """A tiny StableDiffusionPipeline (random U-Net and VAE, the tiny text encoder, the real tokenizer) saved in
  diffusers format; returns (folder, torch pipeline)."""
  import diffusers

  root, text_model, _ = folders
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=16,
    cross_attention_dim=32,
    attention_head_dim=8,
  ).eval()
  vae = diffusers.AutoencoderKL(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    norm_num_groups=16,
  ).eval()
  with torch.no_grad():
    for p in [*unet.parameters(), *vae.parameters()]:
      p.add_(0.05 * torch.randn_like(p))
  pipe = diffusers.StableDiffusionPipeline(
    vae=vae,
    text_encoder=text_model,
    tokenizer=transformers.CLIPTokenizer.from_pretrained(str(root / "tokenizer")),
    unet=unet,
    scheduler=diffusers.DDIMScheduler(
      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
    ),
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  folder = tmp_path_factory.mktemp("pipeline")
  pipe.save_pretrained(folder)
  return folder, pipe


def test_load_pipeline(sd_folder):
  folder, pipe = sd_folder
  parts = loading.load_pipeline(folder)
  assert parts.scheduler_config["beta_schedule"] == "scaled_linear"
  assert parts.scheduler_config["_class_name"] == "DDIMScheduler"
  # Text path end to end (tokenizer + encoder) against diffusers' own encode_prompt.
  ids = tokenize(parts.tokenizer, PROMPTS[:2])
  ours = parts.text_encoder.apply(parts.text_encoder_params, ids).last_hidden_state
  with torch.no_grad():
    ref, _ = pipe.encode_prompt(PROMPTS[:2], "cpu", 1, False)
  _close(ours, ref.numpy())
  # U-Net and VAE: the loaded parameters are exactly the torch pipeline's (their forward parity is tested in
  # test_unet.py and test_vae.py).
  for params, module in ((parts.unet_params, pipe.unet), (parts.vae_params, pipe.vae)):
    ours_sd = loading.to_state_dict(params)
    ref_sd = {k: v.numpy() for k, v in module.state_dict().items()}
    assert ours_sd.keys() == ref_sd.keys()
    assert all(np.array_equal(ours_sd[k], ref_sd[k]) for k in ref_sd)
  assert parts.vae.config.scaling_factor == pipe.vae.config.scaling_factor


def test_load_pipeline_missing_component(tmp_path):
  (tmp_path / "vae").mkdir()
  with pytest.raises(FileNotFoundError, match="missing"):
    loading.load_pipeline(tmp_path)
