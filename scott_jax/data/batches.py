"""The trainer's batches: this process's stream of prepared batches (`make_data`) from an in-memory source or
`scott_jax.data.loader`, the global batch's shapes, and the data state a checkpoint keeps."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from scott_jax import parallel
from scott_jax.config import ConfigDict
from scott_jax.data import arrays
from scott_jax.data import loader as data_loader
from scott_jax.models.clip_text import tokenize
from scott_jax.student import Models


def make_source(config: ConfigDict) -> arrays.ArraySource:
  """The in-memory source of ``data.source = "synthetic"``: global batches of train.batch_size, batch k a pure
  function of (seed, k). The other sources are read by `scott_jax.data.make_loader` (see `make_data`)."""
  d = config.data
  if d.source != "synthetic":
    raise ValueError(f"make_source builds only the in-memory 'synthetic' source; data.source '{d.source}' is read "
                     "by scott_jax.data.make_loader (batches.make_data)")
  images, captions = arrays.synthetic(d.num_examples, d.resolution, config.seed)
  return arrays.ArraySource(images, captions, config.train.batch_size, config.seed)


def prepare_batch(raw: dict[str, Any], models: Models) -> dict[str, np.ndarray]:
  """Host side: uint8 images -> float32 [-1, 1]; captions -> token ids (B, max_length) int32 (SDXL: also
  tokenizer_2's "input_ids_2"; in-memory images are taken at their own size, so no micro-conditioning keys:
  original = target, crop (0, 0))."""
  images = np.asarray(raw["images"], np.float32) / 127.5 - 1.0
  batch = {"images": images, "input_ids": tokenize(models.tokenizer, raw["captions"], models.max_length)}
  if models.is_sdxl:
    batch["input_ids_2"] = tokenize(models.tokenizer_2, raw["captions"], models.max_length)
  return batch


class ArrayBatches(Iterator[dict[str, np.ndarray]]):
  """This process's rows of an `arrays.ArraySource`'s global batches, prepared (`prepare_batch`), behind the
  interface the loop uses of `scott_jax.data.loader.Loader`: next, ``batches``, get_state / set_state, close.

  Process i of n takes rows [i b, (i + 1) b) of every global batch (b = batch size / n), so every process's
  state is the same (step, seed, num_examples, batch_size) dict.
  """

  def __init__(self, source: arrays.ArraySource, models: Models, global_batch: int) -> None:
    if source.batch_size != global_batch:
      raise ValueError(f"the in-memory source's batch_size {source.batch_size} != train.batch_size {global_batch} "
                       "(it must yield global batches)")
    n = parallel.local_batch_size(global_batch)
    self._rows = slice(jax.process_index() * n, (jax.process_index() + 1) * n)
    self._iter = source.iterator()
    self.models = models

  @property
  def batches(self) -> int:
    """Batches produced so far (over resumptions)."""
    return self._iter.step

  def __next__(self) -> dict[str, np.ndarray]:
    raw = next(self._iter)
    return prepare_batch({"images": raw["images"][self._rows], "captions": raw["captions"][self._rows]},
                         self.models)

  def get_state(self) -> dict[str, int]:
    return self._iter.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._iter.set_state(state)

  def close(self) -> None:
    pass


def make_data(config: ConfigDict, models: Models, source: Any = None) -> Any:
  """This process's stream of prepared batches for the loop (next, ``batches``, get_state / set_state, close).

  ``source``: None -> ``config.data`` (synthetic: `make_source` in memory; folder / tar / tfds / latent_cache:
  `scott_jax.data.make_loader`, sharded by process); an `arrays.ArraySource` (or anything with
  ``iterator()``) of global batches -> `ArrayBatches`; a random-access source (``len`` and ``[i]`` -> {"image",
  "caption"}, e.g. `scott_jax.data.sources.InMemorySource`) -> make_loader over it. Batches hold "images"
  float32 (b, R, R, 3) in [-1, 1] and "input_ids" int32 (b, L), or the latent cache's arrays; b = train.batch_size
  / process count.
  """
  if source is None and config.data.source == "synthetic":
    source = make_source(config)
  if source is not None and hasattr(source, "iterator"):
    return ArrayBatches(source, models, config.train.batch_size)
  return data_loader.make_loader(config.data, batch_size=parallel.local_batch_size(config.train.batch_size),
                                     seed=config.seed, tokenizer=models.tokenizer, max_length=models.max_length,
                                     source=source, tokenizer_2=models.tokenizer_2)


def global_batch_spec(local_batch: dict[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of the global batch of which ``local_batch`` is this process's part (leading dimension
  times the process count)."""
  n = jax.process_count()
  return {k: jax.ShapeDtypeStruct((np.shape(v)[0] * n, *np.shape(v)[1:]), np.asarray(v).dtype)
          for k, v in local_batch.items()}


def data_state_to_save(data: Any) -> Any:
  """The data state to checkpoint: this process's, or every process's ({"processes": [...]}, a collective)."""
  if jax.process_count() == 1:
    return data.get_state()
  return {"processes": parallel.allgather_json(data.get_state())}


def restore_data_state(data: Any, saved: Any) -> None:
  n = jax.process_count()
  if n > 1:
    if not isinstance(saved, dict) or len(saved.get("processes", ())) != n:
      raise ValueError(f"the checkpoint's data state was not saved by {n} processes: {str(saved)[:200]}")
    saved = saved["processes"][jax.process_index()]
  data.set_state(saved)

