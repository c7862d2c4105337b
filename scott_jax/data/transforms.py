"""Per-example image and caption transforms of the input pipelines (host side, numpy + PIL).

Images: decode (any PIL format, converted to RGB), resize so that the short side equals the resolution (PIL
bicubic), then a centre or random square crop -> uint8 (R, R, 3). Batches are scaled to float32 [-1, 1] NHWC
by :func:`to_unit_range`. Randomness (the crop window, the choice among several captions) comes from a numpy
Generator the caller seeds per example, so the result is a pure function of (seed, example index).

Captions: bytes are decoded as UTF-8, whitespace is stripped; an empty caption is a skip (see `SkipExample`).
Tokenization goes through `scott_jax.models.clip_text.tokenize` (int32 ids, padded to max_length).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from scott_jax.choices import CROP_MODES


class SkipExample(Exception):  # noqa: N818 (a control-flow signal, not an error)
  """Raised by a transform for an example that must be skipped; ``reason`` is the counter it goes into."""

  def __init__(self, reason: str, detail: str = "") -> None:
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


def to_pil(image: Any) -> Any:
  """Encoded bytes, a PIL image or a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> RGB PIL image.

  Raises SkipExample("corrupt_image") if the bytes do not decode or the array has an unusable shape/dtype.
  """
  from PIL import Image

  try:
    if isinstance(image, (bytes, bytearray, memoryview)):
      img = Image.open(io.BytesIO(bytes(image)))
      img.load()  # decode now: a truncated file fails here, not later
    elif isinstance(image, Image.Image):
      img = image
    else:
      arr = np.asarray(image)
      if arr.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {arr.dtype}")
      if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
      if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ValueError(f"image array must be (H, W), (H, W, 1|3|4), got {arr.shape}")
      img = Image.fromarray(arr)
    if img.width < 1 or img.height < 1:
      raise ValueError(f"empty image {img.size}")
    return img.convert("RGB")
  except SkipExample:
    raise
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
    raise SkipExample("corrupt_image", f"{type(e).__name__}: {e}") from e


def resize_short_side(img: Any, size: int) -> Any:
  """PIL image -> PIL image whose short side is ``size`` px (aspect kept, long side rounded; PIL bicubic)."""
  from PIL import Image

  w, h = img.size
  scale = size / min(w, h)
  nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
  if (nw, nh) == (w, h):
    return img
  return img.resize((nw, nh), Image.BICUBIC)


def crop_box(width: int, height: int, size: int, mode: str, rng: np.random.Generator | None) -> tuple[int, ...]:
  """(left, top, right, bottom) of a size x size window inside a width x height image.

  "center": the middle window (offsets rounded down); "random": offsets uniform over all valid positions,
  drawn from ``rng`` (required).
  """
  if mode not in CROP_MODES:
    raise ValueError(f"unknown crop mode '{mode}'; allowed: {', '.join(CROP_MODES)}")
  if width < size or height < size:
    raise ValueError(f"cannot crop {size}x{size} from a {width}x{height} image")
  if mode == "center":
    left, top = (width - size) // 2, (height - size) // 2
  else:
    if rng is None:
      raise ValueError("random crop needs a numpy Generator")
    left, top = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
  return left, top, left + size, top + size


def preprocess_image(image: Any, resolution: int, crop: str = "center",
                     rng: np.random.Generator | None = None) -> np.ndarray:
  """Any image (see `to_pil`) -> uint8 (resolution, resolution, 3): bicubic short-side resize, then crop."""
  return preprocess_image_with_geometry(image, resolution, crop, rng)[0]


def preprocess_image_with_geometry(image: Any, resolution: int, crop: str = "center",
                                   rng: np.random.Generator | None = None) -> tuple[np.ndarray, tuple[int, int],
                                                                                     tuple[int, int]]:
  """`preprocess_image` plus SDXL's micro-conditioning, as diffusers' SDXL training script records it: (image,
  original size (height, width) px before the resize, crop top-left (top, left) px in the resized image)."""
  img = to_pil(image)
  original = (img.height, img.width)
  img = resize_short_side(img, resolution)
  box = crop_box(img.width, img.height, resolution, crop, rng)
  return np.asarray(img.crop(box), dtype=np.uint8), original, (box[1], box[0])


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 images (..., H, W, 3) in [0, 255] -> float32 in [-1, 1] (x / 127.5 - 1)."""
  return np.asarray(images, np.float32) / np.float32(127.5) - np.float32(1.0)


def clean_caption(caption: Any) -> str:
  """str or UTF-8 bytes (numpy scalars too) -> stripped str; None -> ""."""
  if caption is None:
    return ""
  if isinstance(caption, np.ndarray) and caption.ndim == 0:
    caption = caption.item()
  if isinstance(caption, (bytes, bytearray, np.bytes_)):
    caption = bytes(caption).decode("utf-8", errors="replace")
  return str(caption).strip()


def pick_caption(caption: Any, rng: np.random.Generator | None) -> str:
  """One non-empty caption from a caption or a list/array of captions (uniform choice via ``rng``).

  Raises SkipExample("empty_caption") if there is none. A single caption needs no ``rng``.
  """
  if isinstance(caption, (list, tuple)) or (isinstance(caption, np.ndarray) and caption.ndim > 0):
    options = [c for c in (clean_caption(x) for x in np.asarray(caption, dtype=object).reshape(-1)) if c]
    if not options:
      raise SkipExample("empty_caption")
    if len(options) == 1:
      return options[0]
    if rng is None:
      raise ValueError("choosing among several captions needs a numpy Generator")
    return options[int(rng.integers(len(options)))]
  text = clean_caption(caption)
  if not text:
    raise SkipExample("empty_caption")
  return text


def tokenize_captions(tokenizer: Any, captions: Sequence[str], max_length: int | None = None) -> np.ndarray:
  """Captions -> token ids (B, max_length) int32 via `scott_jax.models.clip_text.tokenize`.

  ``tokenizer`` is a transformers-style tokenizer (called with padding/truncation keywords) or any callable
  ``tokenizer(captions) -> int array (B, L)``; the latter is used as is and checked for shape.
  """
  from scott_jax.models.clip_text import tokenize

  if hasattr(tokenizer, "model_max_length") or hasattr(tokenizer, "pad_token_id"):
    return tokenize(tokenizer, list(captions), max_length)
  ids = np.asarray(tokenizer(list(captions)))
  if ids.ndim != 2 or ids.shape[0] != len(captions) or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"tokenizer must return integer ids (B, L) with B = {len(captions)}, got {ids.dtype} "
                     f"{ids.shape}")
  return ids.astype(np.int32)
