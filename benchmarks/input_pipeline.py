"""Input-pipeline throughput (images/s) of each data source, against the train step's consumption.

Builds a data set of real photos (skimage.data, JPEG q90, native sizes 300-1411 px, cycled to --num_images
files) as an image folder and as webdataset tar shards, a latent cache of the same size (SD1.5 shapes:
latents 64x64x4, text 77x768, pooled 768, float16), optionally tfds mock data, then times
`scott_jax.data.loader.make_loader` batches (resize short side + crop to --resolution, [-1, 1] float32)
after a warm-up. Also times the single-threaded per-image decode + resize + crop, the cost a core pays.

The train step of the paper consumes 40 images per step (batch 40 on 4 A100s, 40K steps); the pipeline
sustains at most images_per_s / 40 steps/s.

  python benchmarks/input_pipeline.py --num_images 256 --resolution 512 --batch_size 40 --num_batches 10
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time

import numpy as np
from absl import logging
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field", "retina", "horse")
PAPER_BATCH = 40  # SD1.5 SCott: batch 40 per step on 4 A100s (paper, Implementation Details)


def photo_jpegs() -> list[bytes]:
  """JPEG q90 bytes of the skimage photos at their native sizes."""
  import skimage.data

  out = []
  for name in PHOTOS:
    arr = np.asarray(getattr(skimage.data, name)())
    if arr.dtype == bool:
      arr = arr.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").save(buf, format="JPEG", quality=90)
    out.append(buf.getvalue())
  return out


def build_folder(root: str, jpegs: list[bytes], n: int) -> str:
  path = os.path.join(root, "folder")
  os.makedirs(path)
  with open(os.path.join(path, "captions.jsonl"), "w") as fh:
    for i in range(n):
      with open(os.path.join(path, f"{i:06d}.jpg"), "wb") as img:
        img.write(jpegs[i % len(jpegs)])
      fh.write(json.dumps({"file": f"{i:06d}.jpg", "caption": f"a photo number {i}"}) + "\n")
  return path


def build_tars(root: str, jpegs: list[bytes], n: int, per_shard: int = 64) -> str:
  path = os.path.join(root, "tars")
  os.makedirs(path)
  for s in range(-(-n // per_shard)):
    with tarfile.open(os.path.join(path, f"{s:05d}.tar"), "w") as tar:
      for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
        for name, data in ((f"{i:09d}.jpg", jpegs[i % len(jpegs)]), (f"{i:09d}.txt", f"photo {i}".encode())):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  return path


def build_cache(root: str, n: int, resolution: int) -> str:
  from scott_jax.data import cache

  path = os.path.join(root, "cache")
  rng = np.random.default_rng(0)
  h = resolution // 8

  def batches():
    for start in range(0, n, 64):
      b = min(64, n - start)
      yield {"latents": rng.normal(size=(b, h, h, 4)).astype(np.float32),
             "text_embeds": rng.normal(size=(b, 77, 768)).astype(np.float32),
             "pooled_text_embeds": rng.normal(size=(b, 768)).astype(np.float32)}

  cache.write_cache(path, batches(), shard_size=256, float_dtype="float16")
  return path


def time_pipeline(data, batch_size: int, num_batches: int, warmup: int = 2) -> float:
  """images/s of `make_loader` batches after ``warmup`` batches."""
  from scott_jax.data import loader

  p = loader.make_loader(data, batch_size=batch_size, seed=0, shard_index=0, shard_count=1)
  for _ in range(warmup):
    next(p)
  t = time.perf_counter()
  for _ in range(num_batches):
    next(p)
  dt = time.perf_counter() - t
  p.close()
  return batch_size * num_batches / dt


def time_single_image(jpegs: list[bytes], resolution: int, reps: int = 3) -> float:
  """Seconds per image for decode + bicubic resize + crop on one thread (mean over the photos)."""
  from scott_jax.data import transforms

  t = time.perf_counter()
  for _ in range(reps):
    for data in jpegs:
      transforms.preprocess_image(data, resolution, "random", np.random.default_rng(0))
  return (time.perf_counter() - t) / (reps * len(jpegs))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--num_images", type=int, default=256)
  ap.add_argument("--resolution", type=int, default=512)
  ap.add_argument("--batch_size", type=int, default=40)
  ap.add_argument("--num_batches", type=int, default=10)
  ap.add_argument("--num_threads", type=str, default="16", help="comma-separated grain read thread counts")
  ap.add_argument("--num_workers", type=str, default="0", help="comma-separated grain mp_prefetch worker counts")
  ap.add_argument("--sources", type=str, default="folder,tar,latent_cache")
  ap.add_argument("--tfds_mock", action="store_true", help="also time tfds coco_captions mock data (tiny images)")
  ap.add_argument("--json", type=str, default="", help="write the results here")
  args = ap.parse_args()
  from absl import flags

  flags.FLAGS(["input_pipeline"])  # grain's mp_prefetch reads absl flags
  logging.set_verbosity(logging.WARNING)
  from scott_jax import config as config_lib

  jpegs = photo_jpegs()
  results = {"cpu_count": os.cpu_count(), "resolution": args.resolution, "batch_size": args.batch_size,
             "num_images": args.num_images, "rows": []}
  sec = time_single_image(jpegs, args.resolution)
  results["single_thread_s_per_image"] = sec
  print(f"cpus {os.cpu_count()}; one thread: {1e3 * sec:.1f} ms/image (JPEG decode + bicubic resize + crop "
        f"to {args.resolution}), {1 / sec:.1f} images/s")
  with tempfile.TemporaryDirectory() as root:
    paths = {}
    sources = args.sources.split(",")
    if "folder" in sources:
      paths["folder"] = build_folder(root, jpegs, args.num_images)
    if "tar" in sources:
      paths["tar"] = build_tars(root, jpegs, args.num_images)
    if "latent_cache" in sources:
      paths["latent_cache"] = build_cache(root, args.num_images, args.resolution)
    runs = [(s, int(t), int(w)) for s in paths for t in args.num_threads.split(",")
            for w in args.num_workers.split(",")]
    if args.tfds_mock:
      runs += [("tfds", int(t), 0) for t in args.num_threads.split(",")]
    for source, threads, workers in runs:
      data = config_lib.defaults().data
      data.source, data.path, data.resolution = source, paths.get(source, ""), args.resolution
      data.captions_file = "captions.jsonl" if source == "folder" else ""
      data.num_threads, data.num_workers, data.crop = threads, workers, "random"
      if source == "tfds":
        import tensorflow_datasets as tfds

        with tfds.testing.mock_data(num_examples=args.num_images):
          ips = time_pipeline(data, args.batch_size, args.num_batches)
      else:
        ips = time_pipeline(data, args.batch_size, args.num_batches)
      row = {"source": source, "num_threads": threads, "num_workers": workers, "images_per_s": ips,
             "max_steps_per_s_at_batch_40": ips / PAPER_BATCH}
      results["rows"].append(row)
      print(f"{source:13s} threads {threads:3d} workers {workers:2d}: {ips:8.1f} images/s = "
            f"{ips / PAPER_BATCH:6.2f} steps/s at the paper's batch {PAPER_BATCH}")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(results, fh, indent=1)


if __name__ == "__main__":
  main()
