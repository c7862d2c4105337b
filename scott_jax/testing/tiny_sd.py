"""Fixtures of tests and benchmarks: a random tiny Stable Diffusion pipeline in diffusers format.

`write_tiny_pipeline(folder)` saves a random tiny Stable Diffusion pipeline (torch and diffusers are needed for
that only; runs load it through scott_jax's own loaders, the real path): U-Net with block_out_channels (32, 64)
and one cross-attention block each way, a 2-level VAE (32x32 images -> 16x16 latents), a 2-layer CLIP text
encoder (hidden 32) and the real CLIP BPE tokenizer (`write_clip_tokenizer`, from open_clip's vocabulary) with
`MAX_LENGTH` tokens per prompt. ``configs/tiny_scott.py`` is the config that trains on it:

  python -c "from scott_jax.testing.tiny_sd import write_tiny_pipeline; write_tiny_pipeline('/tmp/tiny_sd')"
  python -m scott_jax.main --config configs/tiny_scott.py --config.model.teacher_path=/tmp/tiny_sd \
      --workdir /tmp/tiny_run
"""

from __future__ import annotations

import importlib.util
import os

MAX_LENGTH = 16


def write_clip_tokenizer(folder: str, pad_token: str | None = None) -> None:
  """vocab.json + merges.txt built from open_clip's CLIP BPE file (the SD1.5 tokenizer's vocabulary);
  ``pad_token`` "!" gives SDXL's tokenizer_2 (padding with id 0)."""
  import gzip
  import json

  spec = importlib.util.find_spec("open_clip")
  if spec is None:
    raise ImportError("write_tiny_pipeline needs open_clip (the test extra) for the CLIP BPE vocabulary")
  path = os.path.join(os.path.dirname(spec.origin), "tokenizer.py")
  mod_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
  oc = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(oc)  # the package __init__ imports torchvision; the tokenizer module alone does not
  merges = gzip.open(oc.default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
  chars = list(oc.bytes_to_unicode().values())
  vocab = chars + [ch + "</w>" for ch in chars] + ["".join(m.split()) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as fh:
    json.dump({t: i for i, t in enumerate(vocab)}, fh)
  with open(os.path.join(folder, "merges.txt"), "w") as fh:
    fh.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
    json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH}
              | ({} if pad_token is None else {"pad_token": pad_token}), fh)


def _hide_broken_torchvision() -> None:
  import sys

  try:  # a CUDA torchvision wheel next to CPU torch fails to import; hide it (transformers treats it as absent)
    import torchvision  # noqa: F401
  except (ImportError, RuntimeError, OSError):
    sys.modules["torchvision"] = None


SDXL_TEXT_1 = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                   hidden_act="quick_gelu")  # CLIP ViT-L stand-in
SDXL_TEXT_2 = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                   hidden_act="gelu", projection_dim=24)  # OpenCLIP bigG stand-in (CLIPTextModelWithProjection)
SDXL_ADD_DIM = 8  # addition_time_embed_dim (SDXL: 256)


def write_tiny_sdxl_pipeline(folder: str, seed: int = 0) -> str:
  """Saves a random tiny StableDiffusionXLPipeline (diffusers format) into ``folder``; returns ``folder``.

  SDXL-shaped: a first down block without attention, per-block transformer depth (1, 2), linear projections,
  the text_time added condition (pooled 24 + 6 x 8 time features), two text encoders (hidden 16 and 32, the
  second with a projection, SDXL's eos id 2) with the CLIP BPE tokenizers (tokenizer_2 pads with "!"),
  `MAX_LENGTH` tokens; a 2-level VAE with SDXL's scaling factor and force_upcast (32x32 images -> 16x16
  latents); EulerDiscreteScheduler; force_zeros_for_empty_prompt. Weights: torch default init plus N(0, 0.05^2)
  from ``torch.manual_seed(seed)``.
  """
  _hide_broken_torchvision()
  import diffusers
  import torch
  import transformers

  write_clip_tokenizer(os.path.join(folder, "tokenizer"))
  write_clip_tokenizer(os.path.join(folder, "tokenizer_2"), pad_token="!")
  torch.manual_seed(seed)

  def text_model(cls: type, kwargs: dict) -> object:
    return cls(transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=MAX_LENGTH, bos_token_id=0,
                                           eos_token_id=2, pad_token_id=1, **kwargs)).eval()

  text_1 = text_model(transformers.CLIPTextModel, SDXL_TEXT_1)
  text_2 = text_model(transformers.CLIPTextModelWithProjection, SDXL_TEXT_2)
  unet = diffusers.UNet2DConditionModel(
    sample_size=16, block_out_channels=(32, 64), layers_per_block=1, transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
    cross_attention_dim=SDXL_TEXT_1["hidden_size"] + SDXL_TEXT_2["hidden_size"], addition_embed_type="text_time",
    addition_time_embed_dim=SDXL_ADD_DIM,
    projection_class_embeddings_input_dim=SDXL_TEXT_2["projection_dim"] + 6 * SDXL_ADD_DIM,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).eval()
  vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                block_out_channels=(16, 32), norm_num_groups=8, scaling_factor=0.13025,
                                force_upcast=True, sample_size=32).eval()
  with torch.no_grad():
    for m in (text_1, text_2, unet, vae):
      for p in m.parameters():
        p.add_(0.05 * torch.randn_like(p))
  pipe = diffusers.StableDiffusionXLPipeline(
    vae=vae, text_encoder=text_1, text_encoder_2=text_2,
    tokenizer=transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer")),
    tokenizer_2=transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer_2")), unet=unet,
    scheduler=diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                               steps_offset=1, timestep_spacing="leading"),
    force_zeros_for_empty_prompt=True, add_watermarker=False)
  pipe.save_pretrained(folder)
  return folder


def write_tiny_pipeline(folder: str, seed: int = 0) -> str:
  """Saves a random tiny StableDiffusionPipeline (diffusers format) into ``folder``; returns ``folder``.

  Weights are the torch default init plus N(0, 0.05^2) noise on every parameter (so no layer is an exact
  identity or zero), from ``torch.manual_seed(seed)``.
  """
  _hide_broken_torchvision()
  import diffusers
  import torch
  import transformers

  write_clip_tokenizer(os.path.join(folder, "tokenizer"))
  torch.manual_seed(seed)
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
    vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", eos_token_id=49407)).eval()
  unet = diffusers.UNet2DConditionModel(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, cross_attention_dim=32,
    attention_head_dim=8).eval()
  vae = diffusers.AutoencoderKL(
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64), norm_num_groups=16, latent_channels=4, sample_size=32).eval()
  with torch.no_grad():
    for p in [*unet.parameters(), *vae.parameters(), *text_encoder.parameters()]:
      p.add_(0.05 * torch.randn_like(p))
  pipe = diffusers.StableDiffusionPipeline(
    vae=vae, text_encoder=text_encoder,
    tokenizer=transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer")), unet=unet,
    scheduler=diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                      clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(folder)
  return folder
