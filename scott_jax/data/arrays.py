"""A minimal deterministic in-memory image-caption source (the tiny tests and the digits runs).

The examples are held in memory as uint8 images (N, H, W, 3) and N captions. The batch at step k depends only
on (seed, k): the example stream is the concatenation of per-epoch permutations (epoch e uses
``np.random.default_rng([seed, e]).permutation(N)``) and step k takes stream positions k*B .. k*B + B - 1.
So the iterator state is a small JSON dict ``{"step", "seed", "num_examples", "batch_size"}`` and a resumed
run sees exactly the batches a straight run would have seen. Folders, tar shards and tfds are read by
`scott_jax.data.loader`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

SYNTHETIC_WORDS = ("red", "green", "blue", "striped", "round", "square", "small", "large", "bright", "dark")
SYNTHETIC_NOUNS = ("circle", "stripe", "gradient", "checkerboard", "blob")


class ArraySource:
  """Images uint8 (N, H, W, 3) with N captions; `batch(step)` is a pure function of (seed, step)."""

  def __init__(self, images: np.ndarray, captions: Sequence[str], batch_size: int, seed: int) -> None:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(captions) != images.shape[0]:
      raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    if images.shape[0] == 0:
      raise ValueError("the data source is empty")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.images = images
    self.captions = list(captions)
    self.batch_size = int(batch_size)
    self.seed = int(seed)

  @property
  def num_examples(self) -> int:
    return int(self.images.shape[0])

  def indices(self, step: int) -> np.ndarray:
    """Example indices (B,) of step ``step``."""
    n = self.num_examples
    positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
    out = np.empty_like(positions)
    for epoch in np.unique(positions // n):
      perm = np.random.default_rng([self.seed, int(epoch)]).permutation(n)
      sel = positions // n == epoch
      out[sel] = perm[positions[sel] % n]
    return out

  def batch(self, step: int) -> dict[str, Any]:
    """{"images": uint8 (B, H, W, 3), "captions": list of B str} for step ``step``."""
    idx = self.indices(step)
    return {"images": self.images[idx], "captions": [self.captions[i] for i in idx]}

  def iterator(self, step: int = 0) -> ArrayIterator:
    return ArrayIterator(self, step)


class ArrayIterator(Iterator[dict[str, Any]]):
  """Iterates `ArraySource.batch(step)` for step = start, start + 1, ...; checkpointable via get/set_state."""

  def __init__(self, source: ArraySource, step: int = 0) -> None:
    self.source = source
    self.step = int(step)

  def __next__(self) -> dict[str, Any]:
    out = self.source.batch(self.step)
    self.step += 1
    return out

  def get_state(self) -> dict[str, int]:
    """A JSON-serialisable dict: the next step and what the stream depends on."""
    s = self.source
    return {"step": self.step, "seed": s.seed, "num_examples": s.num_examples, "batch_size": s.batch_size}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores `get_state`'s dict; raises ValueError if it was saved for a different stream."""
    mine = self.get_state()
    for key in ("seed", "num_examples", "batch_size"):
      if int(state[key]) != mine[key]:
        raise ValueError(f"data iterator state has {key}={state[key]} but this source has {key}={mine[key]}")
    self.step = int(state["step"])


def synthetic(num_examples: int, resolution: int, seed: int) -> tuple[np.ndarray, list[str]]:
  """Deterministic smooth random images uint8 (N, res, res, 3) with short captions; for tests and smoke runs.

  Each image is a colour gradient plus a disc; the caption names two of its attributes. Pure function of
  (num_examples, resolution, seed).
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(-1, 1, resolution), np.linspace(-1, 1, resolution), indexing="ij")
  images, captions = [], []
  for _ in range(num_examples):
    base = rng.uniform(0, 1, 3)
    slope = rng.uniform(-0.5, 0.5, (2, 3))
    img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    cx, cy, r = rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), rng.uniform(0.2, 0.5)
    disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2)[..., None]
    img = np.where(disc, rng.uniform(0, 1, 3), img)
    images.append(np.clip(img * 255.0, 0, 255).round().astype(np.uint8))
    words = rng.choice(len(SYNTHETIC_WORDS), 2, replace=False)
    noun = SYNTHETIC_NOUNS[rng.integers(len(SYNTHETIC_NOUNS))]
    captions.append(f"a {SYNTHETIC_WORDS[words[0]]} {SYNTHETIC_WORDS[words[1]]} {noun}")
  return np.stack(images), captions
