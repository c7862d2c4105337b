"""Digits data, the tiny CLIP tokenizer and the frozen random CLIP text encoder, written as diffusers folders.

Data: sklearn's ``load_digits`` (1797 grey 8x8 images with values 0..16, 10 classes), scaled to uint8 and
upsampled to ``resolution`` x ``resolution`` with PIL bilinear resampling, the grey value replicated into three
channels, so images are uint8 (N, R, R, 3) like every other image source here (`scott_jax.data.arrays`). The
model works in pixel space on ONE grey channel, ``images[..., :1] / 127.5 - 1`` in [-1, 1] (`to_model`; no VAE:
the "latents" are the pixels; `to_uint8` goes back to grey RGB). DECISION: one channel rather than three
replicated ones: with three, each channel's low-frequency content at t = T (SD1.5's schedule keeps
alpha_T = 0.068) is read from independent noise, and samples come out tinted. The split is a fixed stratified
one (sklearn ``train_test_split`` with ``random_state=split_seed``).

Prompts: "a handwritten digit <word>" for the label's English word; the empty prompt is the CFG negative.

Tokenizer: byte-level BPE in CLIP's format (vocab.json, merges.txt with the ``</w>`` end-of-word suffix, the
256 byte symbols with and without ``</w>``, ``<|startoftext|>`` and ``<|endoftext|>`` last), whose merges are
learned from the prompt words (standard BPE training, most frequent pair first) so that each prompt word is one
token. transformers' `CLIPTokenizer` reads the folder (`scott_jax.models.loading.load_tokenizer`).

Text encoder: our Flax `CLIPTextModel` with a small config and random weights fixed by a seed (Flax's default
initialisers, unit-variance token embeddings; see `init_text_encoder`), frozen everywhere (as SD's text
encoder), saved as a transformers folder (config.json + model.safetensors in torch layout) that
`loading.load_text_encoder` and transformers' ``CLIPTextModel.from_pretrained`` read.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scott_jax.models import loading
from scott_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, tokenize
from scott_jax.models.vae import PixelSpaceConfig, pixel_space_config_json

WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_PREFIX = "a handwritten digit"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
NUM_CLASSES = 10


def prompt(label: int) -> str:
  """The prompt of digit ``label`` (0..9): "a handwritten digit seven"."""
  return f"{PROMPT_PREFIX} {WORDS[int(label)]}"


def prompts() -> list[str]:
  """The 10 prompts, index = digit."""
  return [prompt(i) for i in range(NUM_CLASSES)]


# ---------------------------------------------------------------------------------------------------------
# Images.

@dataclasses.dataclass(frozen=True)
class DigitsData:
  """The fixed split: images uint8 (N, R, R, 3) (grey replicated to RGB), labels int32 (N,)."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray

  @property
  def resolution(self) -> int:
    return int(self.train_images.shape[1])


def upsample(images: np.ndarray, resolution: int) -> np.ndarray:
  """sklearn digits (N, 8, 8) with values 0..16 -> uint8 (N, R, R, 3): value * 255/16 rounded, PIL bilinear
  resize to R x R (identity for R = 8), grey copied into 3 channels."""
  from PIL import Image

  grey = np.clip(np.round(np.asarray(images, np.float64) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
  if resolution != grey.shape[1]:
    grey = np.stack([np.asarray(Image.fromarray(g).resize((resolution, resolution), Image.BILINEAR))
                     for g in grey])
  return np.repeat(grey[..., None], 3, axis=-1)


def load_data(resolution: int = 16, test_fraction: float = 0.2, seed: int = 0) -> DigitsData:
  """load_digits, upsampled to ``resolution``, split stratified into train / test (fraction ``test_fraction``)."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = upsample(digits.images, resolution)
  labels = digits.target.astype(np.int32)
  idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed,
                                         stratify=labels)
  idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
  return DigitsData(images[idx_train], labels[idx_train], images[idx_test], labels[idx_test])


def to_model(images: np.ndarray) -> np.ndarray:
  """Grey uint8 RGB images (N, R, R, 3) -> the model space (N, R, R, 1) float32 in [-1, 1] (the first channel,
  ``/ 127.5 - 1`` as batches.prepare_batch)."""
  return np.asarray(images, np.float32)[..., :1] / 127.5 - 1.0


def to_uint8(x: np.ndarray | jax.Array) -> np.ndarray:
  """Model-space images (N, R, R, C) in [-1, 1] (clipped) -> uint8 (N, R, R, 3), a single channel repeated."""
  x = np.asarray(np.round((np.clip(np.asarray(x, np.float32), -1.0, 1.0) + 1.0) * 127.5), np.uint8)
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


# ---------------------------------------------------------------------------------------------------------
# Tokenizer.

def bytes_to_unicode() -> dict[int, str]:
  """GPT-2 / CLIP byte -> printable unicode character map (the byte-level alphabet, 256 symbols)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs), strict=True))


def learn_bpe(words: Sequence[str]) -> list[tuple[str, str]]:
  """BPE merges (in rank order) that turn each word into one symbol.

  Each word starts as its characters, the last one with ``</w>``; repeatedly the most frequent adjacent pair
  over all words (ties: the lexicographically smallest pair) is merged everywhere, until every word is a single
  symbol. Words are lower-case ASCII here, so the byte-level alphabet maps them to themselves.
  """
  symbols = {w: [*w[:-1], w[-1] + END_OF_WORD] for w in sorted(set(words))}
  merges: list[tuple[str, str]] = []
  while any(len(s) > 1 for s in symbols.values()):
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for s in symbols.values():
      counts.update(zip(s[:-1], s[1:], strict=True))
    best = min(counts, key=lambda p: (-counts[p], p))
    merges.append(best)
    for w, s in symbols.items():
      out, i = [], 0
      while i < len(s):
        if i + 1 < len(s) and (s[i], s[i + 1]) == best:
          out.append(s[i] + s[i + 1])
          i += 2
        else:
          out.append(s[i])
          i += 1
      symbols[w] = out
  return merges


def prompt_words() -> list[str]:
  """The distinct words of all prompts."""
  return sorted({w for p in prompts() for w in p.split()})


def write_tokenizer(folder: str, max_length: int = 8) -> None:
  """Writes a CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json).

  Vocabulary in CLIP's order: the 256 byte symbols, the same with ``</w>``, one token per merge, then
  ``<|startoftext|>`` and ``<|endoftext|>`` (eos, pad and unk as in SD1.5's tokenizer). ``max_length`` is the
  tokenizer's ``model_max_length``.
  """
  merges = learn_bpe(prompt_words())
  chars = list(bytes_to_unicode().values())
  vocab = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
  if len(set(vocab)) != len(vocab):
    raise ValueError("duplicate tokens in the digits vocabulary")
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as fh:
    json.dump({t: i for i, t in enumerate(vocab)}, fh, ensure_ascii=False, indent=0)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as fh:
    fh.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
    json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": int(max_length), "do_lower_case": True,
               "clean_up_tokenization_spaces": False, **special}, fh, indent=2)
  with open(os.path.join(folder, "special_tokens_map.json"), "w") as fh:
    json.dump(special, fh, indent=2)


def check_tokenizer(tokenizer: Any) -> None:
  """Raises ValueError unless every prompt word is a single token and every prompt fits model_max_length."""
  for w in prompt_words():
    ids = tokenizer(w, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
      raise ValueError(f"prompt word {w!r} tokenizes into {len(ids)} tokens {ids}; expected one")
  longest = max(len(tokenizer(p)["input_ids"]) for p in prompts())
  if longest > tokenizer.model_max_length:
    raise ValueError(f"prompts need {longest} tokens > model_max_length {tokenizer.model_max_length}")


# ---------------------------------------------------------------------------------------------------------
# Text encoder.

def text_config(tokenizer: Any, hidden: int = 32, layers: int = 2, heads: int = 4,
                intermediate: int = 64) -> CLIPTextConfig:
  """A small `CLIPTextConfig` matching ``tokenizer`` (vocabulary, special ids, max length)."""
  return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=heads,
                        max_position_embeddings=int(tokenizer.model_max_length), hidden_act="quick_gelu",
                        bos_token_id=int(tokenizer.bos_token_id), eos_token_id=int(tokenizer.eos_token_id),
                        pad_token_id=int(tokenizer.pad_token_id))


def init_text_encoder(config: CLIPTextConfig, seed: int = 0, token_std: float = 1.0,
                      position_std: float = 0.02) -> Any:
  """Random fixed parameters {"params": ...} from ``jax.random.key(seed)``: Flax default initialisers, token
  embeddings N(0, token_std^2) and position embeddings N(0, position_std^2).

  DECISION (config digits.text_token_std / text_position_std): unit-variance token embeddings (torch
  ``nn.Embedding``'s default) rather than CLIP's 0.02: with 0.02 the random 2-layer encoder maps the ten
  prompts to nearly parallel states (mean cosine 0.91 at the digit's position), with 1.0 they are well apart
  (0.38), as a trained text encoder's would be."""
  key, k_tok, k_pos = jax.random.split(jax.random.key(seed), 3)
  model = CLIPTextModel(config)
  params = jax.jit(model.init)(key, jnp.zeros((1, config.max_position_embeddings), jnp.int32))
  emb = dict(params["params"]["embeddings"])
  emb["token_embedding"] = {
    "embedding": token_std * jax.random.normal(k_tok, (config.vocab_size, config.hidden_size))}
  emb["position_embedding"] = {
    "embedding": position_std * jax.random.normal(k_pos, (config.max_position_embeddings, config.hidden_size))}
  inner = dict(params["params"], embeddings=emb)
  return {"params": inner}


def text_config_json(config: CLIPTextConfig) -> dict[str, Any]:
  """transformers' config.json dict of a ``CLIPTextModel`` with this config."""
  out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
  out.update(model_type="clip_text_model", architectures=["CLIPTextModel"], projection_dim=config.hidden_size,
             initializer_factor=1.0, initializer_range=0.02, attention_dropout=0.0, dropout=0.0)
  return out


def write_text_encoder(folder: str, config: CLIPTextConfig, params: Any) -> None:
  """Saves the text encoder as a transformers folder: config.json + model.safetensors (torch layout)."""
  state = {k: v.astype(np.float32) for k, v in loading.to_state_dict(params).items()}
  loading.save_safetensors_folder(folder, state, text_config_json(config), weights_name="model.safetensors")


def encode_prompts(text_encoder: CLIPTextModel, params: Any, tokenizer: Any) -> np.ndarray:
  """The text-embedding table (11, L, D) float32: rows 0..9 the digit prompts, row 10 the empty prompt
  (``last_hidden_state``, the U-Net's context as diffusers' ``encode_prompt`` without clip skip)."""
  length = int(min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings))
  ids = jnp.asarray(tokenize(tokenizer, prompts() + [""], length))
  return np.asarray(jax.jit(text_encoder.apply)(params, ids).last_hidden_state, np.float32)


UNCOND = NUM_CLASSES  # row of the empty prompt in the encode_prompts table


def write_pixel_space(folder: str) -> None:
  """vae/config.json marking the pipeline folder as pixel space (`scott_jax.models.vae.PixelSpace`): images
  (B, R, R, 3) grey RGB <-> one grey model channel, so `scott_jax.train` and the samplers read the teacher
  folder like an SD1.5 one."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as fh:
    json.dump(pixel_space_config_json(PixelSpaceConfig(in_channels=3, out_channels=3, latent_channels=1)), fh,
              indent=2)


def write_scheduler(folder: str, schedule: Any) -> None:
  """scheduler/scheduler_config.json: SD1.5's DDIMScheduler settings with ``schedule``'s fields (a ConfigDict
  or dict with beta_schedule, beta_start, beta_end, num_train_timesteps, prediction_type)."""
  os.makedirs(folder, exist_ok=True)
  cfg = {"_class_name": "DDIMScheduler", "beta_schedule": schedule["beta_schedule"],
         "beta_start": float(schedule["beta_start"]), "beta_end": float(schedule["beta_end"]),
         "num_train_timesteps": int(schedule["num_train_timesteps"]),
         "prediction_type": schedule["prediction_type"], "clip_sample": False, "set_alpha_to_one": False,
         "steps_offset": 1, "timestep_spacing": "leading"}
  with open(os.path.join(folder, "scheduler_config.json"), "w") as fh:
    json.dump(cfg, fh, indent=2)
