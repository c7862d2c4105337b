"""grain input pipelines: per-process sharding, seeded shuffling, skip-and-count robustness, resumable state.

The example stream of one process (shard ``s`` of ``n``) is built with grain's ``MapDataset``::

  range(N) -> [even_split(N, s, n)]        contiguous shard, as grain.sharding.ShardOptions (remainder to the first)
           -> shuffle(seed_s)              a new permutation per epoch (grain folds the epoch into the seed)
           -> repeat()                     infinite
           -> map_with_index(transform)    read + decode + resize/crop, or a `Skipped` record; in grain threads
           -> to_iter_dataset(ReadOptions) ordered, multithreaded prefetch (optionally mp_prefetch workers)

and `Loader` (the iterator the train loop uses) pulls examples in order, drops `Skipped` records (counting
them by reason) and stacks the next ``batch_size`` good ones. So batches are always full, and the batch
sequence is a pure function of (source, seed, shard, batch size): a corrupt image only shifts later
examples forward. The random crop and the caption choice of stream position p of example i use
``np.random.default_rng([seed, i, epoch])`` (epoch = p // shard size), so they are deterministic too.

Resumption: ``Loader.get_state()`` is a small JSON dict (grain's ``next_index`` of the example stream, the
batch count, the skip counts and what the stream depends on); ``set_state`` on a fresh pipeline of the same
config continues with exactly the batches the original would have produced next.

Batches: raw sources give {"images": float32 (B, R, R, 3) in [-1, 1], "input_ids": int32 (B, L)} (with a
tokenizer) or {"images", "captions": list of B str} (without); ``with_metadata`` adds "captions" and
"example_ids" (int64 (B,), the source index). The latent cache gives {"latents", "text_embeds",
"pooled_text_embeds"} float32, the keys `scott_jax.train` consumes instead of images and token ids.
`build_latent_cache` makes such a cache: one unshuffled pass (``num_epochs=1``) of a raw source through an
encoder, skips counted in the cache index.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import numpy as np
from absl import logging
from grain._src.core.sharding import even_split  # public ShardOptions' split rule (grain.sharding has no alias)

from scott_jax.choices import DATA_SOURCES as SOURCES
from scott_jax.config import ConfigError
from scott_jax.data import arrays, transforms
from scott_jax.data import cache as cache_lib
from scott_jax.data import sources as sources_lib

STATE_VERSION = 1
_LOG_FIRST_SKIPS = 20


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A stream element that could not be used: ``reason`` is its counter, ``key`` names the example."""

  reason: str
  key: str
  detail: str = ""


class ImageTextTransform:
  """(stream position, source index) -> {"image": float32 (R, R, 3) in [-1, 1], "caption": str, "index": int,
  "original_size": (height, width), "crop_top_left": (top, left) px (SDXL micro-conditioning)} or `Skipped` (the
  scaling runs here, in grain's read threads, so the batch step only stacks).

  Read errors are "unreadable", undecodable images "corrupt_image", empty captions "empty_caption". The
  crop offsets and the caption choice use ``np.random.default_rng([seed, index, position // epoch_size])``.
  """

  def __init__(self, source: Any, resolution: int, crop: str, seed: int, epoch_size: int) -> None:
    if crop not in transforms.CROP_MODES:
      raise ValueError(f"unknown crop mode '{crop}'; allowed: {', '.join(transforms.CROP_MODES)}")
    self.source, self.resolution, self.crop = source, int(resolution), crop
    self.seed, self.epoch_size = int(seed), int(epoch_size)

  def __call__(self, position: int, index: int) -> dict[str, Any] | Skipped:
    index = int(index)
    rng = np.random.default_rng([self.seed, index, position // self.epoch_size])
    try:
      record = self.source[index]
    except Exception as e:  # any read failure of one example must not stop the run
      return Skipped("unreadable", str(index), f"{type(e).__name__}: {e}")
    key = str(record.get("key", index))
    try:
      caption = transforms.pick_caption(record["caption"], rng)
      image, original, crop = transforms.preprocess_image_with_geometry(record["image"], self.resolution,
                                                                        self.crop, rng)
    except transforms.SkipExample as e:
      return Skipped(e.reason, key, e.detail)
    return {"image": transforms.to_unit_range(image), "caption": caption, "index": index,
            "original_size": original, "crop_top_left": crop}


class ArrayTransform:
  """(position, index) -> the source's dict of arrays plus "index" (latent cache); read errors -> `Skipped`."""

  def __init__(self, source: Any) -> None:
    self.source = source

  def __call__(self, position: int, index: int) -> dict[str, Any] | Skipped:
    del position
    try:
      record = dict(self.source[int(index)])
    except Exception as e:
      return Skipped("unreadable", str(index), f"{type(e).__name__}: {e}")
    bad = [k for k, v in record.items() if np.issubdtype(np.asarray(v).dtype, np.floating)
           and not np.isfinite(v).all()]
    if bad:
      return Skipped("non_finite", str(index), f"keys {bad}")
    record["index"] = int(index)
    return record


def _jsonable(value: Any) -> Any:
  """grain iterator state -> a value that survives a JSON round trip (dicts with int keys are tagged)."""
  if isinstance(value, dict):
    if all(isinstance(k, str) for k in value):
      return {k: _jsonable(v) for k, v in value.items()}
    return {"__int_keys__": [[int(k), _jsonable(v)] for k, v in value.items()]}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def _from_jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    if set(value) == {"__int_keys__"}:
      return {int(k): _from_jsonable(v) for k, v in value["__int_keys__"]}
    return {k: _from_jsonable(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_from_jsonable(v) for v in value]
  return value


def _shard_seed(seed: int, shard_index: int) -> int:
  """A 32-bit shuffle seed per (seed, shard); grain adds the epoch to it."""
  return int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])


def resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  """(index, count), defaulting to (jax.process_index(), jax.process_count()); validated."""
  if shard_index is None or shard_count is None:
    import jax

    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  opts = grain.sharding.ShardOptions(shard_index=int(shard_index), shard_count=int(shard_count))
  return opts.shard_index, opts.shard_count


def example_dataset(num_records: int, transform: Callable[[int, int], Any], *, seed: int, shuffle: bool,
                    shard_index: int, shard_count: int, num_threads: int = 16, prefetch_buffer: int = 128,
                    num_workers: int = 0, num_epochs: int | None = None) -> tuple[grain.IterDataset, int]:
  """The grain example stream of one shard (infinite when num_epochs is None), and the shard's size."""
  start, end = even_split(num_records, grain.sharding.ShardOptions(shard_index, shard_count))
  if end <= start:
    raise ValueError(f"shard {shard_index} of {shard_count} is empty: the source has only {num_records} examples")
  ds = grain.MapDataset.range(num_records)[start:end]
  if shuffle:
    ds = ds.shuffle(seed=_shard_seed(seed, shard_index))
  ds = ds.repeat(num_epochs).map_with_index(transform)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer))
  if num_workers > 0:
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use their defaults
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it_ds, end - start


class Loader(Iterator[dict[str, Any]]):
  """Full, deterministic batches from a grain example stream; checkpointable with get_state/set_state.

  Args:
    dataset: the grain ``IterDataset`` of examples (dicts or `Skipped`), e.g. from `example_dataset`.
    collate: list of B example dicts -> the batch dict.
    batch_size: examples per batch (this process's share of the global batch).
    identity: what the stream depends on (JSON-able dict); `set_state` refuses a state saved for another.
    max_consecutive_skips: raise RuntimeError after this many skips in a row (a source with nothing good);
      when all of them are empty captions, a `ConfigError` that ends with ``empty_caption_hint``.
    index_skipped: counts of what the source dropped while indexing (reported, not in the stream).
    summary_every: log a skip summary every this many batches when anything was skipped (0: never).
    empty_caption_hint: what to set when no example has a caption (names the config key and what was read).
  """

  def __init__(self, dataset: grain.IterDataset, collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
               batch_size: int, identity: Mapping[str, Any], max_consecutive_skips: int,
               index_skipped: Mapping[str, int] | None = None, summary_every: int = 1000,
               empty_caption_hint: str = "") -> None:
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.dataset = dataset
    self._iter = iter(dataset)
    self.collate = collate
    self.batch_size = int(batch_size)
    self.identity = dict(identity)
    self.max_consecutive_skips = int(max_consecutive_skips)
    self.index_skipped = dict(index_skipped or {})
    self.summary_every = int(summary_every)
    self.empty_caption_hint = empty_caption_hint or "the source gives no caption"
    self.batches = 0
    self.examples = 0
    self.skipped: collections.Counter[str] = collections.Counter()

  def __next__(self) -> dict[str, Any]:
    examples: list[dict[str, Any]] = []
    run = 0
    run_reasons: set[str] = set()
    while len(examples) < self.batch_size:
      try:
        element = next(self._iter)
      except StopIteration:  # a finite stream (num_epochs): a last partial batch, then the end
        if not examples:
          raise
        break
      if isinstance(element, Skipped):
        self.skipped[element.reason] += 1
        run += 1
        run_reasons.add(element.reason)
        total = sum(self.skipped.values())
        if total <= _LOG_FIRST_SKIPS:
          logging.warning("Data: skipping example %s (%s)%s", element.key, element.reason,
                          f": {element.detail}" if element.detail else "")
        if run >= self.max_consecutive_skips and run_reasons == {"empty_caption"}:
          raise ConfigError(f"data: {run} consecutive examples skipped, all for empty captions: "
                            f"{self.empty_caption_hint}. {self.summary()}")
        if run >= self.max_consecutive_skips:
          raise RuntimeError(f"data: {run} consecutive examples skipped (last: {element.reason}: "
                             f"{element.detail}); the source has no usable example. {self.summary()}")
        continue
      run = 0
      run_reasons.clear()
      examples.append(element)
    self.examples += len(examples)
    self.batches += 1
    if self.summary_every and self.batches % self.summary_every == 0 and self.skip_counts():
      self.log_summary()
    return self.collate(examples)

  def skip_counts(self) -> dict[str, int]:
    """Skips by reason: the source's index-time drops plus the stream's (cumulative over resumptions)."""
    out = collections.Counter(self.index_skipped)
    out.update(self.skipped)
    return {k: v for k, v in sorted(out.items()) if v}

  def summary(self) -> str:
    counts = self.skip_counts()
    detail = ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"
    return (f"data {self.identity.get('source')} shard {self.identity.get('shard_index')}/"
            f"{self.identity.get('shard_count')}: {self.batches} batches, {self.examples} examples used, "
            f"{sum(counts.values())} skipped ({detail})")

  def log_summary(self) -> None:
    """Logs `summary` (WARNING when something was skipped, else INFO)."""
    (logging.warning if self.skip_counts() else logging.info)("%s", self.summary())

  def get_state(self) -> dict[str, Any]:
    """A small JSON dict: position of the example stream, counters, and the stream's identity."""
    return {"version": STATE_VERSION, "stream": _jsonable(self._iter.get_state()), "batches": self.batches,
            "examples": self.examples, "skipped": dict(self.skipped), **self.identity}

  def set_state(self, state: Mapping[str, Any] | str | bytes) -> None:
    """Restores `get_state`'s value (also as JSON str/bytes); ValueError if saved for a different stream."""
    if isinstance(state, (str, bytes)):
      state = json.loads(state)
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"data state version {state.get('version')} != {STATE_VERSION}")
    for key, mine in self.identity.items():
      if state.get(key) != mine:
        raise ValueError(f"data state has {key}={state.get(key)!r} but this pipeline has {key}={mine!r}")
    self._iter.set_state(_from_jsonable(state["stream"]))
    self.batches = int(state["batches"])
    self.examples = int(state["examples"])
    self.skipped = collections.Counter({k: int(v) for k, v in state["skipped"].items()})

  def close(self) -> None:
    """Logs the skip summary and stops grain's prefetch threads/processes."""
    self.log_summary()
    close = getattr(self._iter, "close", None)
    if close is not None:
      close()


def image_collate(tokenizer: Any = None, max_length: int | None = None, with_metadata: bool = False,
                  tokenizer_2: Any = None) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
  """Examples -> {"images": float32 (B, R, R, 3) in [-1, 1], "input_ids": int32 (B, L) or "captions"}; with
  ``tokenizer_2`` (SDXL) also "input_ids_2" (B, L) and the micro-conditioning "original_size" and
  "crop_top_left" int32 (B, 2)."""

  def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    captions = [e["caption"] for e in examples]
    batch: dict[str, Any] = {"images": np.stack([e["image"] for e in examples])}
    if tokenizer is not None:
      batch["input_ids"] = transforms.tokenize_captions(tokenizer, captions, max_length)
    if tokenizer_2 is not None:
      batch["input_ids_2"] = transforms.tokenize_captions(tokenizer_2, captions, max_length)
      for k in ("original_size", "crop_top_left"):
        batch[k] = np.asarray([e[k] for e in examples], np.int32)
    if tokenizer is None or with_metadata:
      batch["captions"] = captions
    if with_metadata:
      batch["example_ids"] = np.asarray([e["index"] for e in examples], np.int64)
    return batch

  return collate


def array_collate(keys: tuple[str, ...], with_metadata: bool = False) -> Callable[[list[dict[str, Any]]], dict]:
  """Examples of arrays -> {key: stacked float32/int array (B, ...)} (+ "example_ids" with metadata)."""

  def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {k: np.stack([e[k] for e in examples]) for k in keys}
    if with_metadata:
      batch["example_ids"] = np.asarray([e["index"] for e in examples], np.int64)
    return batch

  return collate


def make_source(data: Any, seed: int = 0) -> Any:
  """The random-access source named by ``data.source`` (see `SOURCES`); ValueError lists the known names."""
  name = data.source
  if name == "folder":
    return sources_lib.ImageFolderSource(data.path, data.captions_file)
  if name == "tar":
    return sources_lib.TarShardSource(data.path, data.tar_index)
  if name == "tfds":
    return sources_lib.TfdsSource(data.tfds_name, data.tfds_split, data.tfds_data_dir, data.tfds_image_key,
                                  data.tfds_caption_key)
  if name == "latent_cache":
    return cache_lib.LatentCacheSource(data.path)
  if name == "synthetic":
    images, captions = arrays.synthetic(data.num_examples, data.resolution, seed)
    return sources_lib.InMemorySource(images, captions)
  raise ValueError(f"unknown data.source '{name}'; allowed: {', '.join(SOURCES)}")


def make_loader(data: Any, *, batch_size: int, seed: int, tokenizer: Any = None, max_length: int | None = None,
                  shard_index: int | None = None, shard_count: int | None = None, source: Any = None,
                  with_metadata: bool = False, num_epochs: int | None = None, tokenizer_2: Any = None) -> Loader:
  """The input pipeline of ``data`` (the config's ``data`` section) for this process.

  Args:
    data: config.data: source, path, resolution, captions_file, crop, shuffle, tfds_*, tar_index,
      num_threads, prefetch_buffer, num_workers (see scott_jax.config).
    batch_size: examples per batch from this process (global batch / process count).
    seed: shuffling / crop / caption-choice seed.
    tokenizer: transformers CLIP tokenizer (or callable captions -> int ids); None keeps "captions" instead
      of "input_ids". Ignored by the latent cache.
    max_length: token length (default: the tokenizer's model_max_length).
    tokenizer_2: SDXL's second tokenizer: batches also get "input_ids_2" and the micro-conditioning
      "original_size" / "crop_top_left" (B, 2) int32 px (`image_collate`).
    shard_index, shard_count: this process's shard; default jax.process_index() / jax.process_count().
    source: a prebuilt source for ``data.source`` (skips `make_source`, e.g. to share a tar index).
    with_metadata: add "captions" and "example_ids" (source indices, int64 (B,)) to each batch.
    num_epochs: None (training) repeats forever; k stops after k passes over the shard, the last batch
      possibly smaller (e.g. one unshuffled pass to precompute a latent cache).

  Returns:
    a `Loader` (iterator of batch dicts, get_state/set_state/close).
  """
  if data.source not in SOURCES:
    raise ValueError(f"unknown data.source '{data.source}'; allowed: {', '.join(SOURCES)}")
  shard_index, shard_count = resolve_shard(shard_index, shard_count)
  src = make_source(data, seed) if source is None else source
  num_records = len(src)
  start, end = even_split(num_records, grain.sharding.ShardOptions(shard_index, shard_count))
  if data.source == "latent_cache":
    transform: Callable = ArrayTransform(src)
    collate = array_collate(src.keys, with_metadata)
  else:
    transform = ImageTextTransform(src, data.resolution, data.crop, seed, max(end - start, 1))
    collate = image_collate(tokenizer, max_length, with_metadata, tokenizer_2)
  dataset, shard_size = example_dataset(
      num_records, transform, seed=seed, shuffle=data.shuffle, shard_index=shard_index, shard_count=shard_count,
      num_threads=data.num_threads, prefetch_buffer=data.prefetch_buffer, num_workers=data.num_workers,
      num_epochs=num_epochs)
  identity = {"source": data.source, "seed": int(seed), "shard_index": shard_index, "shard_count": shard_count,
              "num_records": num_records, "batch_size": int(batch_size), "shuffle": bool(data.shuffle),
              "num_workers": int(data.num_workers),  # thread and worker-process stream states differ
              "num_epochs": num_epochs}
  logging.info("Data pipeline %s: %d examples, shard %d/%d holds %d, batch %d, seed %d.", data.source,
               num_records, shard_index, shard_count, shard_size, batch_size, seed)
  return Loader(dataset, collate, batch_size, identity, max_consecutive_skips=shard_size,
                  index_skipped=getattr(src, "skipped", {}), empty_caption_hint=_empty_caption_hint(data, src))


def _empty_caption_hint(data: Any, src: Any) -> str:
  """What the all-empty-captions error tells the user to check, by source."""
  hint = getattr(src, "empty_caption_hint", "")
  if hint:
    return hint
  if data.source == "tar":
    return "the tar shards need a key.txt or key.json ('caption') member beside each image"
  if data.source == "tfds":
    return f"check config.data.tfds_caption_key='{data.tfds_caption_key}'"
  return "the source gives no caption"


def build_latent_cache(data: Any, encode_fn: Callable[[dict[str, Any]], Mapping[str, Any]], directory: str, *,
                       batch_size: int, tokenizer: Any = None, max_length: int | None = None, shard_size: int = 1024,
                       float_dtype: str = "float32", metadata: Mapping[str, Any] | None = None,
                       tokenizer_2: Any = None) -> dict[str, Any]:
  """One unshuffled pass over the raw source of ``data`` through ``encode_fn`` into a latent cache.

  ``encode_fn(batch) -> {"latents": (B, h, w, C) (scaled by the VAE factor), "text_embeds": (B, L, D),
  "pooled_text_embeds": (B, D)}`` (SDXL: also "time_ids" (B, 6); `scott_jax.student.cache_encoder` is this
  function for a teacher) gets the pipeline's batches ("images" in [-1, 1], "input_ids" with a tokenizer, with
  ``tokenizer_2`` "input_ids_2" and the micro-conditioning, "captions"); captions are stored with the cache.
  Examples the pipeline skips (corrupt images, empty captions, unreadable shards) are counted in the index's
  "skipped", next to the non-finite encodings.
  Single process (shard 0 of 1). Returns the cache index (`scott_jax.data.cache.write_cache`).
  """
  if data.source == "latent_cache":
    raise ValueError("build_latent_cache needs a raw image source, not data.source='latent_cache'")
  data = data.copy_and_resolve_references() if hasattr(data, "copy_and_resolve_references") else data
  data.shuffle = False
  p = make_loader(data, batch_size=batch_size, seed=0, tokenizer=tokenizer, max_length=max_length,
                    shard_index=0, shard_count=1, with_metadata=True, num_epochs=1, tokenizer_2=tokenizer_2)

  def encoded() -> Iterator[dict[str, Any]]:
    for batch in p:
      out = dict(encode_fn(batch))
      out.setdefault("captions", batch["captions"])
      yield out

  try:
    return cache_lib.write_cache(directory, encoded(), shard_size=shard_size, float_dtype=float_dtype,
                                 skipped=p.skip_counts, metadata=metadata)
  finally:
    p.close()
