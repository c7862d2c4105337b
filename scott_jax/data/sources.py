"""Random-access image-caption sources for the grain pipelines (`scott_jax.data.loader`).

Every source has ``len(source)`` and ``source[i] -> {"key": str, "image": ..., "caption": ...}`` where image is
encoded bytes or a uint8 array and caption is a str, bytes or a list/array of them (one is picked per example).
Reading may raise (a missing file, an I/O error); decoding and empty captions are handled by the pipeline's
transform, so sources stay cheap and index-only. ``skipped`` holds what was dropped while indexing
(e.g. unreadable tar shards), which the pipeline adds to its skip report.

- `ImageFolderSource`: a folder of images with a captions file (jsonl lines {"file": ..., "caption": ...} or
  csv rows file,caption; also Hugging Face imagefolder's metadata.jsonl / metadata.csv with "file_name" and
  "text"), found by name when ``data.captions_file`` is empty, or same-name ``.txt`` files.
- `TarShardSource`: webdataset-style tar shards as LAION-Aesthetics is distributed: members ``key.jpg``
  (jpeg/png/webp) with ``key.txt`` or ``key.json`` (a "caption" field). An index of member offsets per shard
  makes it random-access (one seek + read per image); it can be cached in an ``.npz`` file.
- `TfdsSource`: any `tfds.data_source` (ArrayRecord) dataset, e.g. coco_captions; feature paths pick image
  and caption(s) out of the feature dict.
- `InMemorySource`: uint8 arrays and captions held in memory (synthetic data, tests).
"""

from __future__ import annotations

import collections
import csv
import glob
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from scott_jax.config import ConfigPathError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_NONE, CAPTION_TXT, CAPTION_JSON = 0, 1, 2


class InMemorySource:
  """Images (a uint8 array (N, H, W, 3) or N uint8 arrays) with N captions, held in memory."""

  def __init__(self, images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[Any]) -> None:
    if len(images) != len(captions):
      raise ValueError(f"{len(images)} images but {len(captions)} captions")
    self.images = images
    self.captions = list(captions)
    self.skipped: dict[str, int] = {}

  def __len__(self) -> int:
    return len(self.captions)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {"key": str(i), "image": self.images[i], "caption": self.captions[i]}


# ---------------------------------------------------------------------------------------------------------
# A folder of images with captions.

# Searched in this order in the folder when config.data.captions_file is empty (metadata.*: Hugging Face
# imagefolder's names, also searched in subfolders); then same-name .txt files.
CAPTION_FILES = ("captions.jsonl", "captions.csv", "metadata.jsonl", "metadata.csv")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FILE_KEYS = ("file", "file_name")  # ours, imagefolder's
CAPTION_KEYS = ("caption", "text")  # the first one present is read


def _first_key(row: dict[str, Any], keys: Sequence[str]) -> str | None:
  return next((k for k in keys if k in row), None)


def read_captions_file(path: str) -> list[tuple[str, str]]:
  """(file, caption) pairs from a jsonl or csv captions file; file names as written (relative paths).

  jsonl: one JSON object per line with the file under "file" or "file_name" (Hugging Face imagefolder's
  metadata.jsonl) and the caption under "caption" or "text" (missing or null: an empty caption, which the
  pipeline skips); other fields are ignored. csv: rows ``file,caption`` (csv quoting for commas), or a
  header row naming the columns ("file" or "file_name", "caption" or "text"; others ignored), as in
  imagefolder's metadata.csv. A malformed line raises ValueError naming the line.
  """
  pairs = []
  if path.endswith((".jsonl", ".json")):
    with open(path, encoding="utf-8") as fh:
      for n, line in enumerate(fh, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
          file_key = _first_key(row, FILE_KEYS)
          if file_key is None:
            raise KeyError("no 'file' or 'file_name'")
          cap_key = _first_key(row, CAPTION_KEYS)
          caption = None if cap_key is None else row[cap_key]
          pairs.append((str(row[file_key]), "" if caption is None else str(caption)))
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(f"{path}:{n}: expected a JSON object with 'file' (or 'file_name') and 'caption' (or "
                           f"'text'): {e}") from e
  elif path.endswith((".csv", ".tsv")):
    with open(path, encoding="utf-8", newline="") as fh:
      reader = csv.reader(fh, delimiter="\t" if path.endswith(".tsv") else ",")
      columns: tuple[int, int | None] | None = None  # (file, caption) column indices of a header row
      for n, row in enumerate(reader, 1):
        if not row:
          continue
        if n == 1:
          names = [c.strip().lower() for c in row]
          file_key = _first_key(dict.fromkeys(names), FILE_KEYS)
          if file_key is not None:
            cap_key = _first_key(dict.fromkeys(names), CAPTION_KEYS)
            columns = (names.index(file_key), None if cap_key is None else names.index(cap_key))
            continue
        if columns is not None:
          fi, ci = columns
          if fi >= len(row):
            raise ValueError(f"{path}:{n}: no file column in {row!r}")
          pairs.append((row[fi].strip(), row[ci] if ci is not None and ci < len(row) else ""))
          continue
        if len(row) < 2:
          raise ValueError(f"{path}:{n}: expected 'file,caption', got {row!r}")
        pairs.append((row[0].strip(), ",".join(row[1:]) if len(row) > 2 else row[1]))
  else:
    raise ValueError(f"captions file '{path}' must be .jsonl or .csv (or .tsv)")
  return pairs


def find_captions_files(path: str) -> list[str]:
  """The captions files (relative to ``path``) that a folder source without ``data.captions_file`` reads.

  The first of `CAPTION_FILES` directly in ``path``; else, as imagefolder allows, a metadata.jsonl (or else
  metadata.csv) in each subfolder, whose file names are relative to that subfolder; when a top-level ``train``
  folder holds any, only those (imagefolder's train split; other splits are left out). [] when there is none
  (then same-name .txt files give the captions).
  """
  for name in CAPTION_FILES:
    if os.path.isfile(os.path.join(path, name)):
      return [name]
  found = []
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames.sort()
    rel = os.path.relpath(dirpath, path)
    name = next((m for m in METADATA_FILES if m in filenames), None)
    if rel != "." and name is not None:
      found.append(os.path.join(rel, name))
  train = [f for f in found if f.split(os.sep)[0] == "train"]
  return train or found


class ImageFolderSource:
  """Images under ``path`` with captions from a captions file or same-name ``.txt`` files.

  ``captions_file`` (``config.data.captions_file``, relative to ``path`` unless absolute): its file names are
  resolved against ``path``. "" searches ``path`` (`find_captions_files`): captions.jsonl, captions.csv,
  metadata.jsonl, metadata.csv, then imagefolder metadata files in subfolders (file names relative to their
  own folder); without any, every image ``x.jpg`` (png/jpeg/webp/bmp) directly in ``path`` is paired with
  ``x.txt`` (a missing .txt gives an empty caption, which the pipeline skips). The choice is logged and kept
  in ``captions_origin``; ``empty_caption_hint`` is what the pipeline says when every caption is empty. A
  listed file that is missing is a read error (skipped by the pipeline). A missing folder or captions file,
  or a folder without images, raises `ConfigPathError`.
  """

  def __init__(self, path: str, captions_file: str = "") -> None:
    if not os.path.isdir(path):
      raise ConfigPathError(f"data folder config.data.path='{path}' does not exist")
    self.path = path
    looked_for = f"{', '.join(CAPTION_FILES)} (metadata.* also in subfolders) and same-name .txt files"
    if captions_file:
      cap_path = captions_file if os.path.isabs(captions_file) else os.path.join(path, captions_file)
      if not os.path.isfile(cap_path):
        raise ConfigPathError(f"captions file config.data.captions_file='{captions_file}' not found at {cap_path}")
      self.entries = read_captions_file(cap_path)
      self.captions_origin = f"config.data.captions_file {cap_path}"
      self.empty_caption_hint = (f"config.data.captions_file='{captions_file}' gives no caption: each line needs a "
                                 f"non-empty {' or '.join(CAPTION_KEYS)} for its {' or '.join(FILE_KEYS)}")
    else:
      files = find_captions_files(path)
      self.entries = []
      if files:
        for f in files:
          base = os.path.dirname(f)
          self.entries += [(os.path.normpath(os.path.join(base, name)) if base else name, caption)
                           for name, caption in read_captions_file(os.path.join(path, f))]
        self.captions_origin = ", ".join(files)
      else:
        names = sorted(f for f in os.listdir(path) if f.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS)
        for name in names:
          txt = os.path.join(path, os.path.splitext(name)[0] + ".txt")
          caption = ""
          if os.path.isfile(txt):
            with open(txt, encoding="utf-8", errors="replace") as fh:
              caption = fh.read()
          self.entries.append((name, caption))
        self.captions_origin = "same-name .txt files"
      self.empty_caption_hint = (f"config.data.captions_file is empty and the captions found in {path} (from "
                                 f"{self.captions_origin}) are all empty; looked for {looked_for}: set "
                                 "config.data.captions_file or add one of these")
    if not self.entries:
      raise ConfigPathError(f"no images listed for data folder config.data.path='{path}' (captions from "
                            f"{self.captions_origin})")
    logging.info("Data folder %s: %d images, captions from %s.", path, len(self.entries), self.captions_origin)
    self.skipped: dict[str, int] = {}

  def __len__(self) -> int:
    return len(self.entries)

  def __getitem__(self, i: int) -> dict[str, Any]:
    name, caption = self.entries[i]
    with open(os.path.join(self.path, name), "rb") as fh:
      data = fh.read()
    return {"key": name, "image": data, "caption": caption}


# ---------------------------------------------------------------------------------------------------------
# Webdataset-style tar shards.

def expand_shards(pattern: str) -> list[str]:
  """Shard paths from a directory (its ``*.tar``), a brace range ``a/{00000..00099}.tar``, a glob, or a
  comma-separated list of these; sorted within each part, in order of the parts."""
  out: list[str] = []
  for part in (p.strip() for p in pattern.split(",")):
    if not part:
      continue
    if os.path.isdir(part):
      out.extend(sorted(glob.glob(os.path.join(part, "*.tar"))))
      continue
    m = re.search(r"\{(\d+)\.\.(\d+)\}", part)
    if m:
      lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
      out.extend(part[:m.start()] + f"{k:0{width}d}" + part[m.end():] for k in range(lo, hi + 1))
    elif any(c in part for c in "*?["):
      out.extend(sorted(glob.glob(part)))
    else:
      out.append(part)
  return out


def _split_key(name: str) -> tuple[str, str]:
  """webdataset convention: the key is the member path up to the first dot of its base name."""
  directory, base = os.path.split(name)
  stem, _, ext = base.partition(".")
  return os.path.join(directory, stem), ext.lower()


def index_tar_shard(path: str) -> tuple[list[tuple[str, int, int, int, int, int]], int]:
  """([(key, image_offset, image_size, caption_offset, caption_size, caption_kind)], number of keys without an
  image) of one uncompressed tar.

  Offsets are byte positions of member data in the file. caption_kind is CAPTION_TXT, CAPTION_JSON or
  CAPTION_NONE (then offset and size are -1). Keys without an image member are left out (and counted). Raises
  on an unreadable or compressed file.
  """
  images: dict[str, tuple[int, int]] = {}
  captions: dict[str, tuple[int, int, int]] = {}
  order: list[str] = []
  with tarfile.open(path, mode="r:") as tar:
    for member in tar:
      if not member.isfile():
        continue
      key, ext = _split_key(member.name)
      if ext in IMAGE_EXTENSIONS and key not in images:
        images[key] = (member.offset_data, member.size)
        order.append(key)
      elif ext == "txt":
        captions[key] = (member.offset_data, member.size, CAPTION_TXT)
      elif ext == "json" and captions.get(key, (0, 0, CAPTION_NONE))[2] != CAPTION_TXT:
        captions[key] = (member.offset_data, member.size, CAPTION_JSON)
  entries = [(k, *images[k], *captions.get(k, (-1, -1, CAPTION_NONE))) for k in order]
  return entries, len(set(captions) - set(images))


def _shard_signature(shards: Sequence[str]) -> str:
  h = hashlib.sha256()
  for s in shards:
    try:
      st = os.stat(s)
      h.update(f"{s}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    except OSError:
      h.update(f"{s}|missing\n".encode())
  return h.hexdigest()


class TarShardSource:
  """Examples of webdataset-style tar shards, random-access through an index of member offsets.

  ``shards``: paths or a pattern for `expand_shards`. ``index_file``: an ``.npz`` cache of the index (read
  when it matches the shards' paths, sizes and mtimes; written otherwise). An unreadable shard is skipped
  (counted in ``skipped["unreadable_shard"]`` and logged); a key with a caption but no image is counted in
  ``skipped["missing_image"]``. Raises if no shard yields an example.
  """

  def __init__(self, shards: Sequence[str] | str, index_file: str = "") -> None:
    self.shards = expand_shards(shards) if isinstance(shards, str) else list(shards)
    if not self.shards:
      raise FileNotFoundError(f"no tar shards match '{shards}'")
    self.skipped: dict[str, int] = collections.Counter()
    signature = _shard_signature(self.shards)
    if index_file and os.path.isfile(index_file) and self._load_index(index_file, signature):
      logging.info("Tar index of %d shards read from %s.", len(self.shards), index_file)
    else:
      self._build_index()
      if index_file:
        self._save_index(index_file, signature)
    if len(self.keys) == 0:
      raise FileNotFoundError(f"no readable examples in {len(self.shards)} tar shard(s) ('{self.shards[0]}', ...)")
    self.skipped = dict(self.skipped)

  def _build_index(self) -> None:
    shard_ids, rows, keys = [], [], []
    for s, path in enumerate(self.shards):
      try:
        entries, no_image = index_tar_shard(path)
      except (OSError, tarfile.TarError, EOFError) as e:
        self.skipped["unreadable_shard"] += 1
        logging.warning("Skipping unreadable tar shard %s: %s: %s", path, type(e).__name__, e)
        continue
      if no_image:
        self.skipped["missing_image"] += no_image
        logging.warning("Tar shard %s: %d captions without an image skipped.", path, no_image)
      for key, *vals in entries:
        shard_ids.append(s)
        rows.append(vals)
        keys.append(key)
    self.shard_ids = np.asarray(shard_ids, np.int32)
    self.offsets = np.asarray(rows, np.int64).reshape(-1, 5)
    self.keys = np.asarray(keys, dtype=str)
    logging.info("Indexed %d examples in %d tar shards (%d unreadable).", len(self.keys), len(self.shards),
                 self.skipped["unreadable_shard"])

  def _load_index(self, index_file: str, signature: str) -> bool:
    with np.load(index_file, allow_pickle=False) as z:
      if str(z["signature"]) != signature:
        return False
      self.shard_ids, self.offsets, self.keys = z["shard_ids"], z["offsets"], z["keys"]
      self.skipped.update({"unreadable_shard": int(z["unreadable_shards"]), "missing_image": int(z["missing_images"])})
    return True

  def _save_index(self, index_file: str, signature: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(index_file)), exist_ok=True)
    tmp = f"{index_file}.tmp{os.getpid()}.npz"
    np.savez(tmp, signature=np.asarray(signature), shard_ids=self.shard_ids, offsets=self.offsets,
             keys=self.keys, unreadable_shards=np.asarray(self.skipped["unreadable_shard"]),
             missing_images=np.asarray(self.skipped["missing_image"]))
    os.replace(tmp, index_file)

  def __len__(self) -> int:
    return len(self.keys)

  def __getitem__(self, i: int) -> dict[str, Any]:
    img_off, img_size, cap_off, cap_size, cap_kind = (int(v) for v in self.offsets[i])
    caption: Any = ""
    with open(self.shards[int(self.shard_ids[i])], "rb") as fh:
      fh.seek(img_off)
      image = fh.read(img_size)
      if len(image) != img_size:
        raise OSError(f"short read: {len(image)} of {img_size} bytes")
      if cap_kind != CAPTION_NONE:
        fh.seek(cap_off)
        raw = fh.read(cap_size).decode("utf-8", errors="replace")
        caption = raw if cap_kind == CAPTION_TXT else _json_caption(raw)
    return {"key": str(self.keys[i]), "image": image, "caption": caption}


def _json_caption(raw: str) -> str:
  try:
    value = json.loads(raw)
  except ValueError:
    return ""
  return str(value.get("caption") or "") if isinstance(value, dict) else ""


# ---------------------------------------------------------------------------------------------------------
# TensorFlow Datasets.

def get_feature(example: dict[str, Any], path: str) -> Any:
  """``example[path]`` for flat keys such as "image/filename", else nested lookup along "/" ("captions/text")."""
  if path in example:
    return example[path]
  value: Any = example
  for part in path.split("/"):
    if not isinstance(value, dict) or part not in value:
      raise KeyError(f"feature '{path}' not in the example (keys: {sorted(example)})")
    value = value[part]
  return value


class TfdsSource:
  """A `tfds.data_source` split (ArrayRecord, random access); image and caption(s) by feature path.

  coco_captions: image_key "image" (uint8 (H, W, 3)), caption_key "captions/text" (5 captions per image, one
  picked per example by the pipeline).
  """

  def __init__(self, name: str, split: str = "train", data_dir: str = "", image_key: str = "image",
               caption_key: str = "captions/text") -> None:
    import tensorflow_datasets as tfds

    self.name, self.split = name, split
    self.image_key, self.caption_key = image_key, caption_key
    self.data = tfds.data_source(name, split=split, data_dir=data_dir or None)
    self.skipped: dict[str, int] = {}

  def __len__(self) -> int:
    return len(self.data)

  def __getitem__(self, i: int) -> dict[str, Any]:
    ex = self.data[i]
    return {"key": f"{self.name}/{self.split}/{i}", "image": get_feature(ex, self.image_key),
            "caption": get_feature(ex, self.caption_key)}
