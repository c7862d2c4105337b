"""Input pipelines: folder / tar-shard / tfds sources, transforms, resumption, sharding, the latent cache.

Images are real photos (skimage.data, lfw faces). Oracles: PIL's own bicubic resize + array slicing for the
crops, the files' captions for the caption alignment, open_clip's tokenizer for the token ids, set algebra
for the shards, a straight run for resumption, the written arrays for the cache.
"""

import gzip
import importlib.util
import io
import json
import os
import tarfile

import numpy as np
import pytest
import skimage.data
from PIL import Image

from scott_jax import config as config_lib
from scott_jax.data import cache, loader, sources, transforms

RES = 48
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field", "retina", "horse")
NUM_FACES = 6


def _photos() -> dict[str, np.ndarray]:
  """name -> uint8 image (thumbnail, long side <= 128; grayscale kept 2-D); real photos + lfw faces."""
  out = {}
  for name in PHOTOS:
    arr = np.asarray(getattr(skimage.data, name)())
    if arr.dtype == bool:
      arr = arr.astype(np.uint8) * 255
    img = Image.fromarray(arr)
    img.thumbnail((128, 128), Image.BICUBIC)
    out[name] = np.asarray(img)
  lfw = os.path.join(os.path.dirname(skimage.data.__file__), "lfw_subset.npy")
  if os.path.isfile(lfw):
    faces = np.load(lfw)[:NUM_FACES]
    for k, f in enumerate(faces):
      out[f"face{k}"] = np.round(f * 255).astype(np.uint8)
  return out


@pytest.fixture(scope="module")
def photos():
  return _photos()


def _data_config(**kw):
  c = config_lib.defaults().data
  c.resolution = RES
  c.num_threads = 2
  c.prefetch_buffer = 8
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos):
  """Photos as png/jpg with captions.jsonl and captions.csv (captions with commas and quotes)."""
  root = tmp_path_factory.mktemp("folder")
  rows = []
  for k, (name, arr) in enumerate(sorted(photos.items())):
    fname = f"{name}.png" if k % 2 else f"{name}.jpg"
    Image.fromarray(arr).save(root / fname, quality=95)
    rows.append((fname, f'a photo of {name}, "number" {k}'))
  with open(root / "captions.jsonl", "w") as fh:
    fh.writelines(json.dumps({"file": f, "caption": c}) + "\n" for f, c in rows)
  import csv

  with open(root / "captions.csv", "w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["file", "caption"])
    w.writerows(rows)
  return root, rows


def _take(p, n):
  return [next(p) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert sorted(x) == sorted(y)
    for k in x:
      if isinstance(x[k], np.ndarray):
        np.testing.assert_array_equal(x[k], y[k])
      else:
        assert x[k] == y[k]


# ---------------------------------------------------------------------------------------------------------
# Transforms.

def test_center_crop_is_the_middle_of_the_bicubic_resize(photos):
  arr = photos["chelsea"]  # 128 x 85 thumbnail (w x h)
  h, w = arr.shape[:2]
  nw = round(w * RES / h)  # short side (height) -> RES
  ref = np.asarray(Image.fromarray(arr).resize((nw, RES), Image.BICUBIC))
  left = (nw - RES) // 2
  np.testing.assert_array_equal(transforms.preprocess_image(arr, RES, "center"), ref[:, left:left + RES])
  # A square image is just resized; a gray one becomes RGB with equal channels.
  cam = photos["camera"]
  out = transforms.preprocess_image(cam, RES, "center")
  np.testing.assert_array_equal(out[..., 0], np.asarray(Image.fromarray(cam).resize((RES, RES), Image.BICUBIC)))
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_random_crop_is_a_window_of_the_resize_and_seeded(photos):
  arr = photos["coffee"]  # 128 x 85
  h, w = arr.shape[:2]
  nw = round(w * RES / h)
  ref = np.asarray(Image.fromarray(arr).resize((nw, RES), Image.BICUBIC))
  offsets = []
  for seed in range(6):
    out = transforms.preprocess_image(arr, RES, "random", np.random.default_rng(seed))
    again = transforms.preprocess_image(arr, RES, "random", np.random.default_rng(seed))
    np.testing.assert_array_equal(out, again)
    hits = [x for x in range(nw - RES + 1) if np.array_equal(ref[:, x:x + RES], out)]
    assert hits, "a random crop must be a window of the resized image"
    offsets.append(hits[0])
  assert len(set(offsets)) > 1


def test_unit_range_and_captions():
  out = transforms.to_unit_range(np.array([0, 255, 127], np.uint8))
  assert out.dtype == np.float32 and out[0] == -1.0 and out[1] == 1.0
  np.testing.assert_allclose(out[2], 127 / 127.5 - 1, rtol=0, atol=1e-8)
  assert transforms.pick_caption(b"  a cat \n", None) == "a cat"
  with pytest.raises(transforms.SkipExample, match="empty_caption"):
    transforms.pick_caption(np.array(["", "  "]), np.random.default_rng(0))
  with pytest.raises(transforms.SkipExample, match="corrupt_image"):
    transforms.to_pil(b"\xff\xd8\xff\xe0 not a jpeg")


# ---------------------------------------------------------------------------------------------------------
# Folder source.

@pytest.mark.parametrize("captions_file", ["captions.jsonl", "captions.csv"])
def test_folder_batches_match_files(folder, captions_file):
  root, rows = folder
  c = _data_config(source="folder", path=str(root), captions_file=captions_file, shuffle=False)
  p = loader.make_loader(c, batch_size=4, seed=0, shard_index=0, shard_count=1, with_metadata=True)
  batches = _take(p, 3)
  p.close()
  ids = np.concatenate([b["example_ids"] for b in batches])
  np.testing.assert_array_equal(ids, np.arange(12) % len(rows))  # unshuffled: file order, then wraps
  for b in batches:
    x = b["images"]
    assert x.shape == (4, RES, RES, 3) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < -0.5 and x.max() > 0.5
    for img, i, cap in zip(x, b["example_ids"], b["captions"], strict=True):
      fname, ref_cap = rows[i]
      assert cap == ref_cap
      with Image.open(root / fname) as f:
        ref = transforms.preprocess_image(f, RES, "center")
      np.testing.assert_allclose(img, ref / 127.5 - 1.0, atol=1e-6)


CAPTION_LAYOUTS = ("captions.jsonl", "captions.csv", "metadata.jsonl", "metadata.csv", "train/metadata.jsonl", "txt")


def write_caption_layout(root, layout: str, images, captions) -> list[tuple[str, str]]:
  """Saves uint8 images as PNGs under ``root`` with their captions in one of `CAPTION_LAYOUTS`; returns the
  (path relative to root, caption) pairs in the order the source lists them.

  captions.jsonl / captions.csv: ours ({"file", "caption"}; a file,caption header). metadata.jsonl: Hugging Face
  imagefolder's {"file_name", "text"} with the images in images/. metadata.csv: a file_name,label,caption header
  (label ignored). train/metadata.jsonl: imagefolder's split folders, file names relative to train/, and a
  test/ split that must be left out. txt: same-name .txt files.
  """
  os.makedirs(root)
  sub = {"metadata.jsonl": "images", "train/metadata.jsonl": "train"}.get(layout, "")
  names = [f"{k:03d}.png" for k in range(len(images))]
  os.makedirs(os.path.join(root, sub), exist_ok=True)
  for name, img, cap in zip(names, images, captions, strict=True):
    Image.fromarray(img).save(os.path.join(root, sub, name))
    if layout == "txt":
      with open(os.path.join(root, name[:-4] + ".txt"), "w") as fh:
        fh.write(cap)
  if layout == "captions.jsonl":
    lines = [json.dumps({"file": n, "caption": c}) for n, c in zip(names, captions, strict=True)]
  elif layout == "metadata.jsonl":
    lines = [json.dumps({"file_name": f"images/{n}", "text": c}) for n, c in zip(names, captions, strict=True)]
  elif layout == "train/metadata.jsonl":
    lines = [json.dumps({"file_name": n, "text": c}) for n, c in zip(names, captions, strict=True)]
    os.makedirs(os.path.join(root, "test"))
    Image.fromarray(images[0]).save(os.path.join(root, "test", "t.png"))
    with open(os.path.join(root, "test", "metadata.jsonl"), "w") as fh:
      fh.write(json.dumps({"file_name": "t.png", "text": "a test-split image"}) + "\n")
  elif layout in ("captions.csv", "metadata.csv"):
    import csv

    with open(os.path.join(root, layout), "w", newline="") as fh:
      w = csv.writer(fh)
      if layout == "captions.csv":
        w.writerows([("file", "caption"), *zip(names, captions, strict=True)])
      else:
        w.writerows([("file_name", "label", "caption"), *((n, 7, c) for n, c in zip(names, captions, strict=True))])
    lines = None
  else:
    lines = None
  if lines is not None:
    with open(os.path.join(root, layout), "w") as fh:
      fh.write("\n".join(lines) + "\n")
  return [(os.path.join(sub, n) if sub else n, c) for n, c in zip(names, captions, strict=True)]


@pytest.mark.parametrize("layout", CAPTION_LAYOUTS)
def test_folder_without_captions_file_finds_each_layout(tmp_path, photos, layout, caplog):
  """data.captions_file = "": the folder's own captions file (ours or imagefolder's, also in split
  subfolders) or its .txt files give the written captions with their images, and the choice is logged."""
  import logging

  names = sorted(photos)[:5]
  rows = write_caption_layout(tmp_path / "d", layout, [photos[n] for n in names], [f"a photo, {n}" for n in names])
  c = _data_config(source="folder", path=str(tmp_path / "d"), shuffle=False)
  with caplog.at_level(logging.INFO):
    p = loader.make_loader(c, batch_size=len(rows), seed=0, shard_index=0, shard_count=1, with_metadata=True)
  batch = next(p)
  p.close()
  origin = "same-name .txt files" if layout == "txt" else layout
  assert f"captions from {origin}" in caplog.text
  assert batch["captions"] == [cap for _, cap in rows]  # the test/ split is not read
  for img, (fname, _) in zip(batch["images"], rows, strict=True):
    with Image.open(tmp_path / "d" / fname) as f:
      np.testing.assert_allclose(img, transforms.preprocess_image(f, RES, "center") / 127.5 - 1.0, atol=1e-6)


def test_all_empty_captions_name_the_captions_file_key(tmp_path, photos):
  """Images without any caption: the error names config.data.captions_file and every file that was looked
  for (no endless skipping); an explicit captions file whose captions are all empty is named too."""
  for k, name in enumerate(sorted(photos)[:3]):
    Image.fromarray(photos[name]).save(tmp_path / f"{k}.png")
  c = _data_config(source="folder", path=str(tmp_path))
  p = loader.make_loader(c, batch_size=2, seed=0, shard_index=0, shard_count=1)
  with pytest.raises(config_lib.ConfigError) as e:
    next(p)
  p.close()
  msg = str(e.value)
  assert "\n" not in msg and "3 consecutive examples skipped, all for empty captions" in msg
  for word in ("config.data.captions_file", "captions.jsonl, captions.csv, metadata.jsonl, metadata.csv",
               "same-name .txt files", str(tmp_path)):
    assert word in msg, (word, msg)
  (tmp_path / "caps.jsonl").write_text("".join(json.dumps({"file": f"{k}.png", "caption": ""}) + "\n"
                                               for k in range(3)))
  c.captions_file = "caps.jsonl"
  p = loader.make_loader(c, batch_size=2, seed=0, shard_index=0, shard_count=1)
  with pytest.raises(config_lib.ConfigError, match="config.data.captions_file='caps.jsonl' gives no caption"):
    next(p)
  p.close()
  c.captions_file = "nope.jsonl"
  with pytest.raises(config_lib.ConfigPathError, match="config.data.captions_file='nope.jsonl' not found"):
    loader.make_loader(c, batch_size=2, seed=0, shard_index=0, shard_count=1)


def test_folder_shuffle_is_seeded_per_epoch_permutation(folder):
  root, rows = folder
  n = len(rows)
  c = _data_config(source="folder", path=str(root), captions_file="captions.jsonl", crop="random")

  def run(seed):
    p = loader.make_loader(c, batch_size=1, seed=seed, shard_index=0, shard_count=1, with_metadata=True)
    out = _take(p, 2 * n)
    p.close()
    return out

  a, b, other = run(1), run(1), run(2)
  _assert_batches_equal(a, b)
  ids = np.array([x["example_ids"][0] for x in a])
  assert sorted(ids[:n]) == list(range(n)) and sorted(ids[n:]) == list(range(n))
  assert list(ids[:n]) != list(ids[n:]) and list(ids[:n]) != list(range(n))
  assert list(ids) != [x["example_ids"][0] for x in other]
  # Random crops differ between epochs of the same example (same seed).
  i0 = ids[0]
  second = [x for x in a[n:] if x["example_ids"][0] == i0][0]
  w = rows[i0][0]
  with Image.open(root / w) as f:
    if f.width != f.height:
      assert not np.array_equal(a[0]["images"], second["images"])


def test_tokenized_batches_match_open_clip(folder, tmp_path):
  root, rows = folder
  spec = importlib.util.find_spec("open_clip")
  mod_spec = importlib.util.spec_from_file_location(
      "_oc_tok", os.path.join(os.path.dirname(spec.origin), "tokenizer.py"))
  oc = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(oc)
  merges = gzip.open(oc.default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
  chars = list(oc.bytes_to_unicode().values())
  vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  tok_dir = tmp_path / "tokenizer"
  tok_dir.mkdir()
  (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  import transformers

  tokenizer = transformers.CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
  c = _data_config(source="folder", path=str(root), captions_file="captions.jsonl")
  p = loader.make_loader(c, batch_size=3, seed=0, tokenizer=tokenizer, max_length=16, shard_index=0,
                             shard_count=1, with_metadata=True)
  b = next(p)
  p.close()
  assert b["input_ids"].shape == (3, 16) and b["input_ids"].dtype == np.int32
  ref = oc.SimpleTokenizer()(b["captions"], context_length=16).numpy()
  eot = oc.SimpleTokenizer().eot_token_id
  valid = np.cumsum(ref == eot, axis=1) - (ref == eot) == 0  # up to and including the first eot
  np.testing.assert_array_equal(b["input_ids"][valid], ref[valid])
  # Without a tokenizer the batch keeps captions instead of ids.
  p = loader.make_loader(c, batch_size=3, seed=0, shard_index=0, shard_count=1)
  b2 = next(p)
  p.close()
  assert "input_ids" not in b2 and b2["captions"] == b["captions"]


def test_resume_continues_exactly(folder):
  root, _ = folder
  c = _data_config(source="folder", path=str(root), captions_file="captions.jsonl", crop="random")
  kw = dict(batch_size=3, seed=5, shard_index=0, shard_count=1, with_metadata=True)
  straight = loader.make_loader(c, **kw)
  first = _take(straight, 4)
  state = json.loads(json.dumps(straight.get_state()))
  rest = _take(straight, 5)
  straight.close()
  resumed = loader.make_loader(c, **kw)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 5), rest)
  resumed.close()
  assert state["batches"] == 4 and len(first) == 4
  other = loader.make_loader(c, **dict(kw, seed=6))
  with pytest.raises(ValueError, match="seed"):
    other.set_state(state)
  other.close()


def test_two_processes_see_disjoint_shards_covering_the_data(folder):
  root, rows = folder
  n = len(rows)
  c = _data_config(source="folder", path=str(root), captions_file="captions.jsonl")
  seen = []
  for s in range(2):
    p = loader.make_loader(c, batch_size=1, seed=0, shard_index=s, shard_count=2, with_metadata=True)
    ids = [int(next(p)["example_ids"][0]) for _ in range(n)]  # more than one epoch of the shard
    p.close()
    size = len(set(ids))
    assert ids[size:] != ids[:n - size] or size == n  # the next epoch is reshuffled
    assert len(set(ids[:size])) == size  # one epoch of the shard: no repeats
    seen.append(set(ids))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(n))
  # The default shard is jax's process (0 of 1 here): the whole data set.
  p = loader.make_loader(c, batch_size=1, seed=0, with_metadata=True)
  assert {int(next(p)["example_ids"][0]) for _ in range(n)} == set(range(n))
  p.close()


def test_all_bad_source_raises_instead_of_looping(tmp_path, photos):
  Image.fromarray(photos["astronaut"]).save(tmp_path / "a.jpg")
  (tmp_path / "a.txt").write_text("   ")
  (tmp_path / "b.jpg").write_bytes(b"garbage")
  (tmp_path / "b.txt").write_text("a caption")
  c = _data_config(source="folder", path=str(tmp_path))
  p = loader.make_loader(c, batch_size=1, seed=0, shard_index=0, shard_count=1)
  with pytest.raises(RuntimeError, match="consecutive"):
    next(p)
  p.close()


def test_unknown_source_and_bad_config():
  c = _data_config(source="laion")
  with pytest.raises(ValueError, match="folder, tar, tfds, latent_cache"):
    loader.make_loader(c, batch_size=1, seed=0, shard_index=0, shard_count=1)
  cfg = config_lib.defaults()
  cfg.data.crop = "left"
  with pytest.raises(config_lib.ConfigError, match="data.crop"):
    config_lib.validate(cfg)


# ---------------------------------------------------------------------------------------------------------
# Tar shards.

def _add(tar, name, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _png(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photos):
  """Two good tar shards (txt and json captions), one corrupt image, one empty caption, a caption without an
  image, and an unreadable shard. Returns (pattern, {key: (image, caption)} of the good examples)."""
  root = tmp_path_factory.mktemp("shards")
  names = sorted(photos)
  good = {}
  with tarfile.open(root / "00000.tar", "w") as tar:
    for k, name in enumerate(names[:7]):
      key = f"{k:06d}"
      _add(tar, f"{key}.png", _png(photos[name]))
      _add(tar, f"{key}.txt", f"txt caption {name}".encode())
      good[key] = (photos[name], f"txt caption {name}")
    _add(tar, "000007.txt", b"caption without an image")
  with tarfile.open(root / "00001.tar", "w") as tar:
    for k, name in enumerate(names[7:], start=100):
      key = f"sub/{k:06d}"
      _add(tar, f"{key}.png", _png(photos[name]))
      _add(tar, f"{key}.json", json.dumps({"caption": f"json caption {name}", "width": 1}).encode())
      good[key] = (photos[name], f"json caption {name}")
    _add(tar, "sub/000200.jpg", b"\xff\xd8\xff\xe0" + bytes(range(200)))  # corrupt image
    _add(tar, "sub/000200.txt", b"a corrupt image")
    _add(tar, "sub/000201.png", _png(photos[names[0]]))
    _add(tar, "sub/000201.json", json.dumps({"caption": ""}).encode())  # empty caption
  (root / "00002.tar").write_bytes(b"this is not a tar file" * 40)
  return str(root / "{00000..00002}.tar"), good


def test_tar_index_and_skips(shards, tmp_path):
  pattern, good = shards
  src = sources.TarShardSource(pattern, str(tmp_path / "index.npz"))
  assert len(src) == len(good) + 2
  assert src.skipped == {"unreadable_shard": 1, "missing_image": 1}
  cached = sources.TarShardSource(pattern, str(tmp_path / "index.npz"))  # read back from the npz
  np.testing.assert_array_equal(cached.offsets, src.offsets)
  assert list(cached.keys) == list(src.keys) and cached.skipped == src.skipped
  c = _data_config(source="tar", path=pattern)
  p = loader.make_loader(c, batch_size=5, seed=3, shard_index=0, shard_count=1, with_metadata=True,
                             source=src)
  batches = _take(p, 4)  # 20 examples: every good one at least once, the bad ones skipped
  counts = p.skip_counts()
  p.close()
  seen = set()
  for b in batches:
    assert b["images"].shape == (5, RES, RES, 3) and b["images"].dtype == np.float32
    assert -1.0 <= b["images"].min() and b["images"].max() <= 1.0
    for img, i, cap in zip(b["images"], b["example_ids"], b["captions"], strict=True):
      key = str(src.keys[i])
      ref_img, ref_cap = good[key]
      assert cap == ref_cap
      np.testing.assert_allclose(img, transforms.preprocess_image(ref_img, RES) / 127.5 - 1.0, atol=1e-6)
      seen.add(key)
  assert seen == set(good)
  epochs = (20 + counts["corrupt_image"] + counts["empty_caption"]) / len(src)
  assert counts["corrupt_image"] == counts["empty_caption"] and counts["corrupt_image"] in (
      int(np.floor(epochs)), int(np.ceil(epochs)))
  assert counts["unreadable_shard"] == 1 and counts["missing_image"] == 1


def test_tar_resume_across_skips_through_a_checkpoint(shards, tmp_path):
  from scott_jax import checkpoint

  pattern, _ = shards
  src = sources.TarShardSource(pattern)
  c = _data_config(source="tar", path=pattern, crop="random")
  kw = dict(batch_size=4, seed=0, shard_index=1, shard_count=2, with_metadata=True, source=src)
  straight = loader.make_loader(c, **kw)
  _take(straight, 3)
  train_state = {"w": np.arange(3, dtype=np.float32)}
  with checkpoint.Checkpointer(str(tmp_path / "ckpt")) as ckpt:  # the data state is saved with the train state
    ckpt.save(3, train_state, data_state=straight.get_state(), force=True)
  rest = _take(straight, 4)
  straight.close()
  with checkpoint.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    step, _, state = ckpt.restore_latest(train_state)
  assert step == 3 and state["batches"] == 3
  resumed = loader.make_loader(c, **kw)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 4), rest)
  assert resumed.skip_counts() == straight.skip_counts()
  resumed.close()


# ---------------------------------------------------------------------------------------------------------
# TFDS (mock data).

def test_tfds_coco_captions_mock():
  tfds = pytest.importorskip("tensorflow_datasets")
  c = _data_config(source="tfds", tfds_name="coco_captions", tfds_split="train")
  with tfds.testing.mock_data(num_examples=6):
    src = loader.make_source(c)  # one tfds.data_source (slow to open under mock_data) for both runs
    refs = [src.data[i] for i in range(len(src))]
    runs = []
    for _ in range(2):
      p = loader.make_loader(c, batch_size=4, seed=0, shard_index=0, shard_count=1, with_metadata=True,
                                 source=src)
      runs.append(_take(p, 3))
      p.close()
  _assert_batches_equal(*runs)
  for b in runs[0]:
    assert b["images"].shape == (4, RES, RES, 3) and b["images"].dtype == np.float32
    assert -1.0 <= b["images"].min() and b["images"].max() <= 1.0
    for img, i, cap in zip(b["images"], b["example_ids"], b["captions"], strict=True):
      ex = refs[i]
      texts = [t.decode() if isinstance(t, bytes) else str(t) for t in ex["captions"]["text"]]
      assert cap in [t.strip() for t in texts]
      np.testing.assert_allclose(img, transforms.preprocess_image(ex["image"], RES) / 127.5 - 1.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Latent cache.

def test_latent_cache_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  batches, kept = [], []
  for b in range(4):
    batch = {"latents": rng.normal(size=(3, 4, 4, 4)).astype(np.float32),
             "text_embeds": rng.normal(size=(3, 5, 8)).astype(np.float32),
             "pooled_text_embeds": rng.normal(size=(3, 8)).astype(np.float32),
             "captions": [f"caption {b} {i}" for i in range(3)]}
    if b == 1:
      batch["latents"][2, 0, 0, 0] = np.nan
    for i in range(3):
      if not (b == 1 and i == 2):
        kept.append({k: (v[i] if k != "captions" else v[i]) for k, v in batch.items()})
    batches.append(batch)
  index = cache.write_cache(str(tmp_path / "c"), iter(batches), shard_size=4, skipped={"corrupt_image": 2},
                            metadata={"resolution": 32})
  assert index["num_examples"] == 11 and [s["num_examples"] for s in index["shards"]] == [4, 4, 3]
  assert index["skipped"] == {"corrupt_image": 2, "non_finite": 1}
  src = cache.LatentCacheSource(str(tmp_path / "c"))
  assert len(src) == 11
  for i, ref in enumerate(kept):
    got = src[i]
    for k in cache.LATENT_KEYS:
      assert got[k].dtype == np.float32
      np.testing.assert_array_equal(got[k], ref[k])
    assert src.caption(i) == ref["captions"]
  with pytest.raises(FileExistsError):
    cache.write_cache(str(tmp_path / "c"), iter(batches))
  # float16 storage reads back as float32 of the rounded values.
  cache.write_cache(str(tmp_path / "h"), iter(batches[:1]), float_dtype="float16")
  np.testing.assert_array_equal(cache.LatentCacheSource(str(tmp_path / "h"))[1]["latents"],
                                batches[0]["latents"][1].astype(np.float16).astype(np.float32))
  # The pipeline over the cache: train-step keys, each epoch a permutation of the written examples.
  c = _data_config(source="latent_cache", path=str(tmp_path / "c"))
  p = loader.make_loader(c, batch_size=11, seed=0, shard_index=0, shard_count=1, with_metadata=True)
  b = next(p)
  p.close()
  assert set(b) == {*cache.LATENT_KEYS, "example_ids"} and b["latents"].shape == (11, 4, 4, 4)
  assert sorted(b["example_ids"]) == list(range(11))
  for row, i in enumerate(b["example_ids"]):
    np.testing.assert_array_equal(b["text_embeds"][row], kept[i]["text_embeds"])


def test_build_latent_cache_one_pass_counts_skips(shards, tmp_path):
  """A raw tar pass through a stand-in encoder (8x8 average pooling): every good example once, skips counted."""
  pattern, good = shards
  r = RES // 8

  def encode(batch):
    x = batch["images"]
    latents = x.reshape(x.shape[0], r, 8, r, 8, 3).mean(axis=(2, 4))
    bad = np.array(["horse" in c for c in batch["captions"]])
    latents[bad] = np.nan
    ids = batch["example_ids"].astype(np.float32)
    return {"latents": latents, "text_embeds": np.tile(ids[:, None, None], (1, 4, 2)), "pooled_text_embeds":
            np.stack([ids, -ids], 1)}

  c = _data_config(source="tar", path=pattern)  # centre crops, so the oracle below is exact
  index = loader.build_latent_cache(c, encode, str(tmp_path / "c"), batch_size=4, shard_size=3)
  horse = sum("horse" in cap for _, cap in good.values())
  assert horse == 1 and index["num_examples"] == len(good) - horse
  assert index["skipped"] == {"corrupt_image": 1, "empty_caption": 1, "missing_image": 1, "non_finite": 1,
                              "unreadable_shard": 1}
  src = cache.LatentCacheSource(str(tmp_path / "c"))
  by_caption = {cap: img for img, cap in good.values()}
  seen = set()
  for i in range(len(src)):
    cap = src.caption(i)
    seen.add(cap)
    assert src[i]["latents"].shape == (r, r, 3)
    assert np.isfinite(src[i]["latents"]).all()
    ref = transforms.to_unit_range(transforms.preprocess_image(by_caption[cap], RES))
    np.testing.assert_allclose(src[i]["latents"], ref.reshape(r, 8, r, 8, 3).mean(axis=(1, 3)), atol=1e-5)
  assert seen == {cap for _, cap in good.values() if "horse" not in cap}


def test_unfinished_cache_is_not_read(tmp_path):
  (tmp_path / "shard_00000.latents.npy").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="index.json"):
    cache.LatentCacheSource(str(tmp_path))


@pytest.mark.slow
def test_worker_processes_give_the_thread_batches_and_resume(folder):
  """grain mp_prefetch workers (spawned processes): same stream as threads; the state round-trips JSON."""
  root, _ = folder
  kw = dict(batch_size=3, seed=2, shard_index=0, shard_count=1, with_metadata=True)
  threads = loader.make_loader(_data_config(source="folder", path=str(root), captions_file="captions.jsonl",
                                                crop="random"), **kw)
  ref = _take(threads, 6)
  threads.close()
  c = _data_config(source="folder", path=str(root), captions_file="captions.jsonl", crop="random", num_workers=2)
  p = loader.make_loader(c, **kw)
  _assert_batches_equal(_take(p, 3), ref[:3])
  state = json.loads(json.dumps(p.get_state()))
  p.close()
  resumed = loader.make_loader(c, **kw)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 3), ref[3:])
  resumed.close()
