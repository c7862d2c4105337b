"""Data pipelines.

- `loader`: grain loaders (`make_loader`, `Loader`, `build_latent_cache`): per-process sharding, seeded
  shuffling, skip-and-count robustness, JSON iterator state.
- `sources`: image folder + captions file, webdataset tar shards, tfds data sources, in-memory arrays.
- `transforms`: decode, bicubic short-side resize, centre/random crop, [-1, 1] scaling, captions, tokenization.
- `cache`: precomputed VAE latents + text embeddings (`write_cache`, `LatentCacheSource`).
- `arrays`: the minimal in-memory source of the first train loop.
"""
