"""CLIP score: the mean raw cosine similarity between CLIP image and text embeddings of matched pairs (not
multiplied by 100; the paper's CLIP ViT-g/14 scores are about 0.30).

`image_embeddings` / `text_embeddings` run the Flax CLIP (scott_jax.metrics.clip_model) in fixed-size batches
(the last one padded so one compiled shape serves all); `clip_score` reduces matched rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scott_jax.metrics.clip_model import CLIPModel, preprocess_images

Array = jax.Array


def cosine_similarities(image_emb: Array, text_emb: Array, eps: float = 1e-12) -> Array:
  """Row-wise cosine similarity of matched pairs: (N, P), (N, P) -> (N,) float32."""
  image_emb, text_emb = jnp.asarray(image_emb, jnp.float32), jnp.asarray(text_emb, jnp.float32)
  if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
    raise ValueError(f"expected matched (N, P) embeddings, got {image_emb.shape} and {text_emb.shape}")
  norm = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
  return jnp.sum(norm(image_emb) * norm(text_emb), axis=-1)


def clip_score(image_emb: Array, text_emb: Array) -> float:
  """Mean over N matched pairs of cos(image_emb[i], text_emb[i]); embeddings (N, P), unnormalised."""
  return float(jnp.mean(cosine_similarities(image_emb, text_emb)))


def _batched(fn: Callable[[Array], Array], inputs: np.ndarray, batch_size: int) -> np.ndarray:
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  n = inputs.shape[0]
  if n == 0:
    raise ValueError("no inputs")
  out = []
  for start in range(0, n, batch_size):
    chunk = inputs[start : start + batch_size]
    valid = chunk.shape[0]
    if n > batch_size and valid < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid, axis=0)])
    out.append(np.asarray(fn(chunk))[:valid])
  return np.concatenate(out)


def image_embeddings(
  model: CLIPModel, params: Any, images_uint8: Sequence[np.ndarray] | np.ndarray, batch_size: int = 64
) -> np.ndarray:
  """uint8 RGB images (H_i, W_i, 3) -> projected image embeddings (N, P) float32 (CLIPImageProcessor
  preprocessing on the host, then the vision tower)."""
  apply = jax.jit(partial(model.apply, method=CLIPModel.get_image_features))
  fn = lambda x: apply(params, x)  # params stay an argument (not baked into the compiled program)
  size = model.config.vision.image_size
  pixels = np.concatenate(
    [
      preprocess_images(images_uint8[i : i + batch_size], size)
      for i in range(0, len(images_uint8), batch_size)
    ]
  )
  return _batched(fn, pixels, batch_size)


def text_embeddings(
  model: CLIPModel, params: Any, input_ids: np.ndarray, batch_size: int = 256
) -> np.ndarray:
  """Token ids (N, L) int32 (`scott_jax.models.clip_text.tokenize`) -> projected text embeddings (N, P)."""
  apply = jax.jit(partial(model.apply, method=CLIPModel.get_text_features))
  fn = lambda ids: apply(params, ids)
  return _batched(fn, np.asarray(input_ids, np.int32), batch_size)
