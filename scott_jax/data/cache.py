"""A cache of precomputed VAE latents and text embeddings (so the train step skips the VAE and text encoder).

Layout of a cache directory::

  index.json                     {"version", "keys": {name: {"shape", "dtype"}}, "shards": [{"name", "num_examples"}],
                                  "num_examples", "skipped": {reason: count}, "metadata": {...}}
  shard_00000.<key>.npy          one array (n, *shape) per key and shard
  shard_00000.captions.jsonl     the captions of the shard's examples, when the input had "captions"

``index.json`` is written last (write + rename), so a directory without it is an unfinished cache and is not
read. The keys the train step consumes are `LATENT_KEYS`: ``latents`` (h, w, C), already multiplied by the
VAE scaling factor, ``text_embeds`` (L, D) and ``pooled_text_embeds`` (D,); any other array keys are kept too.
An SDXL teacher's cache (`scott_jax.student.cache_encoder`) holds both encoders' states as ``text_embeds``
(L, D1 + D2), encoder 2's projection as ``pooled_text_embeds`` and the micro-conditioning ``time_ids`` (6,).
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from absl import logging

INDEX_FILE = "index.json"
VERSION = 1
LATENT_KEYS = ("latents", "text_embeds", "pooled_text_embeds")
_FLOAT_DTYPES = ("float32", "float16")


def _shard_name(k: int) -> str:
  return f"shard_{k:05d}"


def write_cache(directory: str, batches: Iterable[Mapping[str, Any]], *, shard_size: int = 1024,
                float_dtype: str = "float32",
                skipped: Mapping[str, int] | Callable[[], Mapping[str, int]] | None = None,
                metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Writes batches of precomputed arrays as a cache; returns the index dict (also written as index.json).

  Args:
    directory: output folder (created; must not already hold a cache).
    batches: dicts of arrays with a leading batch dimension (B, ...) and the same trailing shapes throughout,
      e.g. {"latents": (B, h, w, C), "text_embeds": (B, L, D), "pooled_text_embeds": (B, D)}; an optional
      "captions" list of B str is stored alongside. Per-example dicts work too (B = 1 if no batch dim is
      consistent: give them as batches of one).
    shard_size: examples per shard file.
    float_dtype: storage dtype of floating arrays ("float32" or "float16"); read back as float32.
    skipped: skip counts of the producer (e.g. the raw pipeline's), added to the index's counts; a callable
      is called after the last batch (e.g. ``pipeline.skip_counts``).
    metadata: JSON-able description stored in the index (model, resolution, ...).

  An example with a non-finite value in any floating array is skipped and counted as "non_finite".
  """
  if float_dtype not in _FLOAT_DTYPES:
    raise ValueError(f"float_dtype must be one of {_FLOAT_DTYPES}, got '{float_dtype}'")
  if shard_size < 1:
    raise ValueError(f"shard_size must be >= 1, got {shard_size}")
  if os.path.exists(os.path.join(directory, INDEX_FILE)):
    raise FileExistsError(f"'{directory}' already holds a cache ({INDEX_FILE})")
  os.makedirs(directory, exist_ok=True)
  counts: collections.Counter[str] = collections.Counter()
  specs: dict[str, dict[str, Any]] | None = None
  shards: list[dict[str, Any]] = []
  buffer: dict[str, list[np.ndarray]] = {}
  captions: list[str] = []
  has_captions = False
  total = 0

  def flush() -> None:
    nonlocal buffer, captions
    n = len(next(iter(buffer.values()))) if buffer else 0
    if n == 0:
      return
    name = _shard_name(len(shards))
    for key, rows in buffer.items():
      np.save(os.path.join(directory, f"{name}.{key}.npy"), np.stack(rows))
    if has_captions:
      with open(os.path.join(directory, f"{name}.captions.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(c) + "\n" for c in captions)
    shards.append({"name": name, "num_examples": n})
    buffer = {k: [] for k in buffer}
    captions = []

  for batch in batches:
    arrays = {k: np.asarray(v) for k, v in batch.items() if k != "captions"}
    if not arrays:
      raise ValueError("a cache batch needs at least one array")
    sizes = {k: v.shape[0] if v.ndim else -1 for k, v in arrays.items()}
    if len(set(sizes.values())) != 1 or -1 in sizes.values():
      raise ValueError(f"cache batch arrays need one leading batch dimension, got {sizes}")
    b = next(iter(sizes.values()))
    if specs is None:
      specs = {k: {"shape": list(v.shape[1:]),
                   "dtype": float_dtype if np.issubdtype(v.dtype, np.floating) else str(v.dtype)}
               for k, v in arrays.items()}
      buffer = {k: [] for k in specs}
      has_captions = "captions" in batch
    if set(arrays) != set(specs) or ("captions" in batch) != has_captions:
      raise ValueError(f"cache batch keys {sorted(batch)} differ from the first batch's {sorted(specs)}")
    for k, v in arrays.items():
      if list(v.shape[1:]) != specs[k]["shape"]:
        raise ValueError(f"cache key '{k}': shape {v.shape[1:]} differs from the first batch's {specs[k]['shape']}")
    caps = list(batch["captions"]) if has_captions else [""] * b
    if len(caps) != b:
      raise ValueError(f"{len(caps)} captions for a batch of {b}")
    finite = np.ones(b, bool)
    for v in arrays.values():
      if np.issubdtype(v.dtype, np.floating):
        finite &= np.isfinite(v.reshape(b, -1)).all(axis=1)
    for i in np.flatnonzero(~finite):
      counts["non_finite"] += 1
      logging.warning("Cache: skipping example with non-finite values (caption %r).", caps[i])
    for i in np.flatnonzero(finite):
      for k, v in arrays.items():
        buffer[k].append(v[i].astype(specs[k]["dtype"]))
      captions.append(str(caps[i]))
      total += 1
      if len(captions) == shard_size:
        flush()
  flush()
  counts.update({k: int(v) for k, v in ((skipped() if callable(skipped) else skipped) or {}).items()})
  if specs is None or total == 0:
    raise ValueError(f"no example written to the cache '{directory}' (skipped: {dict(counts)})")
  index = {"version": VERSION, "keys": specs, "shards": shards, "num_examples": total,
           "skipped": dict(sorted(counts.items())), "has_captions": has_captions, "metadata": dict(metadata or {})}
  tmp = os.path.join(directory, INDEX_FILE + ".tmp")
  with open(tmp, "w") as fh:
    json.dump(index, fh, indent=1)
  os.replace(tmp, os.path.join(directory, INDEX_FILE))
  logging.info("Cache %s: %d examples in %d shards, skipped %s.", directory, total, len(shards), dict(counts))
  return index


def read_index(directory: str) -> dict[str, Any]:
  """The cache's index.json; FileNotFoundError if the cache is missing or unfinished."""
  path = os.path.join(directory, INDEX_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no latent cache in '{directory}' (missing {INDEX_FILE}; unfinished or wrong path)")
  with open(path) as fh:
    index = json.load(fh)
  if index.get("version") != VERSION:
    raise ValueError(f"latent cache '{directory}' has version {index.get('version')}, expected {VERSION}")
  return index


class LatentCacheSource:
  """Random-access examples of a cache: ``source[i] -> {key: float32 array (*shape)}`` (memory-mapped reads).

  ``keys``: the keys to return (default all array keys of the cache). ``captions(i)`` gives example i's
  caption when the cache stored them.
  """

  def __init__(self, directory: str, keys: tuple[str, ...] | None = None) -> None:
    self.directory = directory
    self.index = read_index(directory)
    self.keys = tuple(self.index["keys"]) if keys is None else tuple(keys)
    missing = [k for k in self.keys if k not in self.index["keys"]]
    if missing:
      raise KeyError(f"latent cache '{directory}' has no keys {missing}; it has {sorted(self.index['keys'])}")
    sizes = [s["num_examples"] for s in self.index["shards"]]
    self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    for s in self.index["shards"]:
      for k in self.keys:
        if not os.path.isfile(self._path(s["name"], k)):
          raise FileNotFoundError(f"latent cache '{directory}' misses {s['name']}.{k}.npy")
    self._arrays: dict[tuple[int, str], np.ndarray] = {}
    self._captions: dict[int, list[str]] = {}
    self.skipped: dict[str, int] = {}  # skips at write time are in index["skipped"], not repeated per read

  def _path(self, shard: str, key: str) -> str:
    return os.path.join(self.directory, f"{shard}.{key}.npy")

  def __len__(self) -> int:
    return int(self.starts[-1])

  def __getstate__(self) -> dict[str, Any]:
    return dict(self.__dict__, _arrays={}, _captions={})  # memory maps are reopened in each process

  def _locate(self, i: int) -> tuple[int, int]:
    if not 0 <= i < len(self):
      raise IndexError(f"example {i} out of range [0, {len(self)})")
    s = int(np.searchsorted(self.starts, i, side="right") - 1)
    return s, i - int(self.starts[s])

  def _array(self, s: int, key: str) -> np.ndarray:
    arr = self._arrays.get((s, key))
    if arr is None:
      arr = np.load(self._path(self.index["shards"][s]["name"], key), mmap_mode="r")
      self._arrays[(s, key)] = arr
    return arr

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    s, j = self._locate(int(i))
    return {k: np.asarray(self._array(s, k)[j], dtype=np.float32 if self.index["keys"][k]["dtype"]
                          in _FLOAT_DTYPES else None) for k in self.keys}

  def caption(self, i: int) -> str:
    """Example i's caption ("" when the cache stored none)."""
    if not self.index.get("has_captions"):
      return ""
    s, j = self._locate(int(i))
    if s not in self._captions:
      with open(os.path.join(self.directory, f"{self.index['shards'][s]['name']}.captions.jsonl")) as fh:
        self._captions[s] = [json.loads(line) for line in fh]
    return self._captions[s][j]
