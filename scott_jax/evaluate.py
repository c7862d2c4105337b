"""The separate evaluation job (mode ``eval``) and reference statistics (mode ``fid_stats``); notes section 7.

``--mode eval`` runs beside (never inside) training: it reads WORKDIR/checkpoints, and for every finalised step
(or the steps listed in ``eval.checkpoint_steps``), every parameter set of ``eval.params`` (ema / student) and
every step count of ``eval.sample_steps`` (timesteps on the run's sampling grid, ``consistency.timestep_rule``;
or the explicit timestep lists of ``eval.timesteps``) it generates one image per prompt of ``eval.prompt_file``
with the jitted student sampler (`scott_jax.pipeline`, CFG scale ``eval.guidance_scale``, a Gaussian student's
draws or means by ``sample.gaussian``, the same seed for every checkpoint) and computes

  FID       against the reference statistics ``eval.reference_stats`` (mu, sigma of the feature extractor),
  Coverage  (Naeem et al. 2020, k = ``eval.coverage_k``) against the reference features stored in that file,
  CLIP score (mean raw cosine, `scott_jax.metrics.clip_score`) with ``eval.clip_model`` ("" skips it),
  prompt metric (optional, ``eval.prompt_metric`` = "package.module:factory"; "" skips it): the mean of a
            plugged per-image prompt-agreement score, ``factory(eval_config)`` returning a function
            (uint8 images (N, H, W, 3), prompts list[str] of length N) -> scores (N,) (e.g. a digit
            classifier's accuracy against the prompted digit, the digits experiment's CLIP-score analogue),

and, from the same k-nearest-neighbour balls as Coverage, precision, recall and density (`prdc`).

Each result is one JSON row appended to WORKDIR/eval/results.jsonl, keyed by (step, steps, params); a restart
skips the keys already there (resume without redoing work; a row of the same key with other timesteps is a
clear error), and WORKDIR/eval/results.md is rewritten as a
table after every row. A step still being written (orbax tmp directory) is skipped until it is complete. With
``eval.watch`` the job polls every ``eval.poll_seconds``; once a finished training run has written
``WORKDIR/train_done.json`` (after its last checkpoint, `scott_jax.checkpoint.write_train_done`) the next pass
evaluates what is left, the last checkpoint included, and the job stops: within two polls (plus the evaluation)
of the file. Without it the job stops after ``eval.max_idle_seconds`` without a new step. Training never waits
for it.

Errors that stop the job at once, with the offending path: a missing reference file (or one without features
when coverage needs them), a missing or empty prompt file, an unreadable finalised checkpoint.

The feature extractor is pluggable (``eval.features``): "inception" (the FID Inception-v3 pool3, weights
``eval.feature_weights``), "random_projection" (a fixed random projection of 16x16 thumbnails: a cheap stand-in
for tests and smoke runs, not a metric), or "package.module:factory" where ``factory(eval_config)`` returns a
function uint8 images (N, H, W, 3) -> features (N, D) (e.g. a small digit classifier). ``--mode fid_stats``
writes the reference .npz (mu, sigma in float64, plus up to ``eval.max_reference_features`` feature rows) from
``eval.image_folder`` with the same extractor.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from scott_jax import checkpoint as ckpt_lib
from scott_jax import export, pipeline, student
from scott_jax.metrics import clip_model, clip_score, fid, inception
from scott_jax.metrics import coverage as coverage_lib
from scott_jax.models.clip_text import tokenize
from scott_jax.models.loading import load_tokenizer

FeatureFn = Callable[[np.ndarray], np.ndarray]
PromptMetricFn = Callable[[np.ndarray, list[str]], np.ndarray]

EVAL_SUBDIR = "eval"
RESULTS_FILE = "results.jsonl"
TABLE_FILE = "results.md"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RANDOM_PROJECTION_DIM = 16
TRAIN_DONE = ckpt_lib.TRAIN_DONE


# ---------------------------------------------------------------------------------------------------------
# Feature extractors (pluggable).

def inception_extractor(ec: Any) -> FeatureFn:
  """FID Inception-v3 pool3 features (2048-d) with weights from ``ec.feature_weights``."""
  if not ec.feature_weights:
    raise FileNotFoundError("eval.features='inception' needs eval.feature_weights: the .npz written by "
                            "`python -m scott_jax.metrics.inception --out PATH`")
  params = inception.load_inception_params(ec.feature_weights)
  apply_fn = inception.make_apply_fn()
  return lambda images: fid.inception_features(params, images, ec.feature_batch_size, apply_fn)


def random_projection_extractor(ec: Any) -> FeatureFn:
  """A fixed random projection (seed 0) of 16x16 bilinear thumbnails in [0, 1] to 16 dims: a cheap,
  deterministic stand-in for tests and smoke runs (not a perceptual metric)."""
  from PIL import Image

  del ec
  proj = np.random.default_rng(0).standard_normal((16 * 16 * 3, RANDOM_PROJECTION_DIM)) / np.sqrt(16 * 16 * 3)

  def features(images: np.ndarray) -> np.ndarray:
    thumbs = [np.asarray(Image.fromarray(np.asarray(im, np.uint8)).resize((16, 16), Image.BILINEAR), np.float64)
              for im in images]
    return (np.stack(thumbs).reshape(len(thumbs), -1) / 255.0 @ proj).astype(np.float32)

  return features


EXTRACTORS: dict[str, Callable[[Any], FeatureFn]] = {
  "inception": inception_extractor,
  "random_projection": random_projection_extractor,
}


def make_feature_extractor(ec: Any) -> FeatureFn:
  """The extractor named by ``ec.features``: a registry name or "package.module:factory"."""
  name = ec.features
  if name in EXTRACTORS:
    return EXTRACTORS[name](ec)
  if ":" in name:
    return _plugged(name, ec)
  raise ValueError(f"unknown feature extractor '{name}'; allowed: {', '.join(EXTRACTORS)} or 'module:factory'")


def _plugged(name: str, ec: Any) -> Any:
  """``factory(ec)`` of a "package.module:factory" name."""
  module, fn = name.split(":", 1)
  return getattr(importlib.import_module(module), fn)(ec)


def make_prompt_metric(ec: Any) -> PromptMetricFn | None:
  """The per-image prompt-agreement score of ``ec.prompt_metric`` ("package.module:factory"), or None for ""."""
  name = ec.prompt_metric
  if not name:
    return None
  if ":" not in name:
    raise ValueError(f"eval.prompt_metric '{name}': expected '' or 'package.module:factory'")
  return _plugged(name, ec)


# ---------------------------------------------------------------------------------------------------------
# Reference statistics.

def read_reference(path: str, need_features: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """(mu, sigma, features or None) of a reference .npz; FileNotFoundError naming a missing file, ValueError
  when coverage needs feature rows the file lacks."""
  if not path:
    raise FileNotFoundError("eval.reference_stats is not set: pass the .npz written by --mode fid_stats")
  mu, sigma = fid.read_stats(path)
  features = None
  with np.load(path, allow_pickle=False) as data:
    if "features" in data.files:
      features = data["features"].astype(np.float32)
  if need_features and features is None:
    raise ValueError(f"{path} holds no 'features' rows, which Coverage needs; rewrite it with --mode fid_stats "
                     "and eval.max_reference_features > 0")
  return mu, sigma, features


def list_images(folder: str) -> list[str]:
  """Image files under ``folder`` (recursive, sorted)."""
  if not folder or not os.path.isdir(folder):
    raise FileNotFoundError(f"image folder not found: '{folder}'")
  out = []
  for root, _, files in os.walk(folder):
    out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
  if not out:
    raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
  return sorted(out)


def folder_features(folder: str, extractor: FeatureFn, chunk: int = 500) -> np.ndarray:
  """Features (N, D) of every image under ``folder`` (RGB uint8), read ``chunk`` images at a time."""
  from PIL import Image

  paths = list_images(folder)
  feats = []
  for start in range(0, len(paths), chunk):
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths[start:start + chunk]]
    feats.append(np.asarray(extractor(images), np.float32))
  return np.concatenate(feats)


def write_reference(path: str, features: np.ndarray, max_features: int, seed: int = 0) -> None:
  """Writes mu, sigma (float64, all rows) and up to ``max_features`` rows (a seeded random subset) to ``path``."""
  mu, sigma = fid.stats(features)
  fid.write_stats(path, mu, sigma)
  if max_features:
    rows = features
    if len(rows) > max_features:
      rows = rows[np.sort(np.random.default_rng(seed).permutation(len(rows))[:max_features])]
    with open(path, "wb") as fh:
      np.savez(fh, mu=mu, sigma=sigma, features=rows.astype(np.float32))


def run_fid_stats(config: Any, workdir: str) -> str:
  """Mode ``fid_stats``: reference statistics of ``eval.image_folder`` -> ``eval.reference_stats``
  (default WORKDIR/eval/reference_stats.npz). Returns the path."""
  ec = config.eval
  path = ec.reference_stats or os.path.join(workdir, EVAL_SUBDIR, "reference_stats.npz")
  features = folder_features(ec.image_folder, make_feature_extractor(ec))
  write_reference(path, features, ec.max_reference_features, config.seed)
  print(f"fid_stats: {len(features)} images from {ec.image_folder}, {features.shape[1]}-d features -> {path}")
  return path


# ---------------------------------------------------------------------------------------------------------
# Results.

def row_key(row: dict[str, Any]) -> tuple[int, int, str]:
  return int(row["step"]), int(row["steps"]), str(row["params"])


def run_timesteps(config: Any) -> dict[int, tuple[int, ...]]:
  """{steps: descending timesteps} the job evaluates: ``eval.timesteps`` as given (their lengths must differ,
  the rows are keyed by step count), else each ``eval.sample_steps`` entry on the run's sampling grid
  (`scott_jax.student.student_timesteps`, ``consistency.timestep_rule``)."""
  ec = config.eval
  if ec.timesteps:
    out = {len(ts): tuple(int(t) for t in ts) for ts in ec.timesteps}
    if len(out) != len(ec.timesteps):
      raise ValueError(f"eval.timesteps {ec.timesteps}: the lists must have different lengths (rows are keyed by "
                       "the number of steps)")
    return out
  return {int(k): student.student_timesteps(config, int(k)) for k in ec.sample_steps}


def check_rows(rows: list[dict[str, Any]], timesteps: dict[int, tuple[int, ...]], path: str) -> None:
  """Raises ValueError when a row of ``path`` has a step count this job evaluates at other timesteps."""
  for r in rows:
    k = int(r["steps"])
    if k in timesteps and tuple(r["timesteps"]) != timesteps[k]:
      raise ValueError(f"{path}: step {r['step']} {r['params']} {k}-step row was sampled at {r['timesteps']}, "
                       f"this job samples at {list(timesteps[k])}; use another WORKDIR or remove those rows")


def read_results(path: str, repair: bool = False) -> list[dict[str, Any]]:
  """Rows of a results.jsonl. A truncated last line (a crash mid-write) is dropped with a warning and, with
  ``repair``, removed from the file so that later rows append cleanly; any other bad line raises."""
  if not os.path.isfile(path):
    return []
  rows = []
  with open(path) as fh:
    lines = fh.read().splitlines()
  truncated = False
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i == len(lines) - 1:
        logging.warning("eval: dropping a truncated last line of %s", path)
        truncated = True
        continue
      raise ValueError(f"{path}:{i + 1} is not JSON") from None
  if truncated and repair:
    with open(path, "w") as fh:
      fh.write("".join(json.dumps(r) + "\n" for r in rows))
  return rows


def images_dir(workdir: str, step: int, params: str, steps: int) -> str:
  """WORKDIR/eval/images/step<step>_<params>_<steps>step: the PNGs of one row (``eval.save_images``)."""
  return os.path.join(workdir, EVAL_SUBDIR, "images", f"step{step}_{params}_{steps}step")


def features_path(workdir: str, step: int, params: str, steps: int) -> str:
  """WORKDIR/eval/features/step<step>_<params>_<steps>step.npz: one row's per-image arrays (``eval.save_features``):
  "features" (N, F) of the feature extractor and "prompt_metric" (N,) when one is configured, in prompt order."""
  return os.path.join(workdir, EVAL_SUBDIR, "features", f"step{step}_{params}_{steps}step.npz")


def read_saved_images(workdir: str, step: int, params: str, steps: int) -> np.ndarray:
  """The images saved for one row (uint8 (N, H, W, 3), in prompt order); FileNotFoundError when none were."""
  from PIL import Image

  folder = images_dir(workdir, step, params, steps)
  names = sorted(f for f in os.listdir(folder) if f.endswith(".png")) if os.path.isdir(folder) else []
  if not names:
    raise FileNotFoundError(f"no saved images in {folder} (eval.save_images = 0 when that row was evaluated?)")
  return np.stack([np.asarray(Image.open(os.path.join(folder, f)).convert("RGB")) for f in names])


def write_table(path: str, rows: list[dict[str, Any]]) -> None:
  """A markdown table of the rows sorted by (step, params, steps)."""
  fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
  lines = ["| step | params | steps | FID | CLIP score | prompt metric | Coverage | images | timesteps |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
  for r in sorted(rows, key=lambda r: (r["step"], r["params"], r["steps"])):
    lines.append(f"| {r['step']} | {r['params']} | {r['steps']} | {fmt(r.get('fid'), '.3f')} | "
                 f"{fmt(r.get('clip_score'), '.4f')} | {fmt(r.get('prompt_metric'), '.4f')} | "
                 f"{fmt(r.get('coverage'), '.4f')} | {r['num_images']} | {r['timesteps']} |")
  with open(path, "w") as fh:
    fh.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------
# The job.

# (jitted sampler, batch size, number of steps) already called once in this process (compiled):
# `Evaluator.images`.
_WARM: set[tuple[Callable[..., Any], int, int]] = set()


@functools.cache
def _clip_image_fn(model: Any) -> Callable[..., Any]:
  """The jitted CLIP image tower (params, pixels) -> embeddings, one per CLIP architecture (cached)."""
  return jax.jit(functools.partial(model.apply, method=clip_model.CLIPModel.get_image_features))


class Evaluator:
  """State of one eval job: prompts, reference, extractor, CLIP and the pipeline (built once, reused for every
  checkpoint so each sampler compiles once). Inputs are checked in the constructor, before any model loads."""

  def __init__(self, config: Any, workdir: str, run: export.TrainedRun | None = None):
    ec = config.eval
    self.config, self.ec, self.workdir = config, ec, workdir
    prompts = pipeline.read_prompts(ec.prompt_file)
    self.prompts = prompts[:ec.num_prompts] if ec.num_prompts else prompts
    self.ref_mu, self.ref_sigma, self.ref_features = read_reference(ec.reference_stats, need_features=True)
    if len(self.prompts) <= ec.coverage_k:
      raise ValueError(f"{len(self.prompts)} prompts: Coverage with k = {ec.coverage_k} needs more than k images")
    self.out_dir = os.path.join(workdir, EVAL_SUBDIR)
    os.makedirs(self.out_dir, exist_ok=True)
    self.results_path = os.path.join(self.out_dir, RESULTS_FILE)
    self.rows = read_results(self.results_path, repair=True)
    self.extractor = make_feature_extractor(ec)
    self.prompt_metric = make_prompt_metric(ec)
    self.run = run or export.TrainedRun(config, workdir)
    self.resolution = ec.resolution or config.data.resolution
    self.timesteps = run_timesteps(config)
    check_rows(self.rows, self.timesteps, self.results_path)
    self._samplers: dict[int, pipeline.Sampler] = {}
    self._clip: tuple[Any, Any, np.ndarray, Any] | None = None
    self._ids: np.ndarray | None = None

  # -- pieces
  def done(self) -> set[tuple[int, int, str]]:
    return {row_key(r) for r in self.rows}

  def _clip_text(self) -> tuple[Any, Any, np.ndarray, Any] | None:
    if not self.ec.clip_model:
      return None
    if self._clip is None:
      model, params = clip_model.load_clip_model(self.ec.clip_model)
      tok = load_tokenizer(self.ec.clip_model, None)
      ids = tokenize(tok, self.prompts, min(tok.model_max_length, model.config.text.max_position_embeddings))
      self._clip = (model, params, clip_score.text_embeddings(model, params, ids), _clip_image_fn(model))
    return self._clip

  def _clip_image_embeddings(self, images: np.ndarray) -> np.ndarray:
    """Projected CLIP image embeddings (N, P) in fixed batches (one compiled shape, jitted once per job)."""
    model, params, _, image_fn = self._clip_text()
    b = self.ec.batch_size
    out = []
    for start in range(0, len(images), b):
      x = clip_model.preprocess_images(images[start:start + b], model.config.vision.image_size)
      valid = x.shape[0]
      if valid < b:
        x = np.concatenate([x, np.repeat(x[-1:], b - valid, axis=0)])
      out.append(np.asarray(image_fn(params, x))[:valid])
    return np.concatenate(out)

  def images(self, pipe: pipeline.Pipeline, params: dict[str, Any],
             steps: int) -> tuple[np.ndarray, list[int], float]:
    """One image per prompt with the student at ``steps`` steps (uint8 (N, H, W, 3)), the timesteps used and
    the sampling seconds (wall time of the N images; a compilation happens in a warm-up call before it)."""
    if steps not in self._samplers:
      self._samplers[steps] = pipeline.make_sampler(pipe, kind="student", steps=list(self.timesteps[steps]),
                                                    height=self.resolution, gaussian=self.config.sample.gaussian)
    sampler = self._samplers[steps]
    if self._ids is None:
      self._ids = pipe.tokenize(self.prompts)
    batch = min(self.ec.batch_size, len(self.prompts))
    key = jax.random.PRNGKey(self.ec.seed)
    program = (sampler.fn, batch, len(sampler.timesteps))  # the jitted function compiles once per shape
    if program not in _WARM:  # compile outside the timed run (once per process and program)
      jax.block_until_ready(sampler(params, self._ids[:batch], key, self.ec.guidance_scale))
      _WARM.add(program)
    t0 = time.time()
    images = pipeline.generate(sampler, params, self._ids, key, self.ec.guidance_scale, batch)
    return images, sampler.timesteps.tolist(), time.time() - t0

  def metrics(self, images: np.ndarray, per_image: dict[str, np.ndarray] | None = None) -> dict[str, float | None]:
    """FID, precision / recall / density / coverage, CLIP score and prompt metric (None when not configured) of
    one image per prompt (uint8 (N, H, W, 3), in prompt order). ``per_image``: a dict that receives the
    per-image arrays behind them ("features" (N, F), "prompt_metric" (N,) when configured)."""
    feats = np.asarray(self.extractor(images), np.float32)
    per_image = {} if per_image is None else per_image
    per_image["features"] = feats
    mu, sigma = fid.stats(feats)
    out: dict[str, float | None] = {"fid": fid.frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma)}
    out.update(coverage_lib.prdc(self.ref_features, feats, self.ec.coverage_k))
    out["prompt_metric"] = None
    if self.prompt_metric is not None:
      scores = np.asarray(self.prompt_metric(images, self.prompts), np.float64)
      if scores.shape != (len(images),):
        raise ValueError(f"eval.prompt_metric {self.ec.prompt_metric} returned shape {scores.shape}, expected "
                         f"({len(images)},): one score per image")
      out["prompt_metric"] = float(scores.mean())
      per_image["prompt_metric"] = scores
    clip = self._clip_text()
    out["clip_score"] = None
    if clip is not None:
      out["clip_score"] = clip_score.clip_score(self._clip_image_embeddings(images), clip[2])
    return out

  def evaluate_step(self, step: int) -> list[dict[str, Any]]:
    """Every missing (steps, params) row of checkpoint ``step``; appends each to results.jsonl at once."""
    new = []
    for which in self.ec.params:
      todo = [k for k in self.timesteps if (step, k, which) not in self.done()]
      if not todo:
        continue
      pipe, params = self.run.pipeline(step, which)
      for k in todo:
        t0 = time.time()
        images, timesteps, sample_seconds = self.images(pipe, params, k)
        per_image: dict[str, np.ndarray] = {}
        row = {"step": step, "steps": k, "params": which, "timesteps": timesteps, "num_images": len(images),
               "guidance_scale": self.ec.guidance_scale, "seed": self.ec.seed, "resolution": self.resolution,
               "features": self.ec.features, "prompt_file": self.ec.prompt_file,
               "prompt_metric_name": self.ec.prompt_metric, **self.metrics(images, per_image),
               "sample_seconds": round(sample_seconds, 3), "seconds": round(time.time() - t0, 3)}
        if self.ec.save_images:
          pipeline.write_images(images_dir(self.workdir, step, which, k), images[:self.ec.save_images])
        if self.ec.save_features:
          path = features_path(self.workdir, step, which, k)
          os.makedirs(os.path.dirname(path), exist_ok=True)
          np.savez(path, **per_image)
        with open(self.results_path, "a") as fh:
          fh.write(json.dumps(row) + "\n")
        self.rows.append(row)
        new.append(row)
        write_table(os.path.join(self.out_dir, TABLE_FILE), self.rows)
        logging.info("eval step %d %s %d-step: FID %.3f coverage %.4f clip %s prompt metric %s", step, which, k,
                     row["fid"], row["coverage"], row["clip_score"], row["prompt_metric"])
    return new

  def complete(self, step: int) -> bool:
    done = self.done()
    return all((step, k, w) in done for k in self.timesteps for w in self.ec.params)

  def run_once(self) -> tuple[list[dict[str, Any]], bool]:
    """Evaluates every available step not yet complete -> (new rows, whether every wanted step is done)."""
    steps, pending = self.run.steps()
    if pending:
      logging.info("eval: skipping checkpoints still being written: %s", pending)
    wanted = list(self.ec.checkpoint_steps) or steps
    missing = [s for s in wanted if s not in steps]
    if missing and not self.ec.watch:
      raise FileNotFoundError(f"checkpoint steps {missing} not found in {self.run.directory} (finalised: {steps})")
    new = []
    for step in wanted:
      if step not in steps or self.complete(step):
        continue
      try:
        new += self.evaluate_step(step)
      except ckpt_lib.CheckpointReadError:
        if not os.path.isdir(os.path.join(self.run.directory, str(step))):
          logging.warning("eval: checkpoint step %d was deleted before it was evaluated; skipped", step)
          continue
        raise
    all_done = not missing and all(self.complete(s) for s in wanted if s in steps)
    return new, all_done


def run_eval(config: Any, workdir: str, run: export.TrainedRun | None = None) -> list[dict[str, Any]]:
  """Mode ``eval`` (module docstring). Returns the rows added by this invocation. ``run``: an already loaded
  `export.TrainedRun` of ``workdir`` to reuse (default: load the run's models afresh)."""
  ec = config.eval
  evaluator = Evaluator(config, workdir, run)
  added: list[dict[str, Any]] = []
  idle_since = time.time()
  while True:
    # Read before the pass: training writes the file after its last checkpoint, so this pass evaluates that one.
    finished = ckpt_lib.read_train_done(workdir) if ec.watch else None
    new, all_done = evaluator.run_once()
    added += new
    if new:
      idle_since = time.time()
    if not ec.watch:
      break
    if finished is not None:
      logging.info("eval: training finished at step %d (%s); %s", finished["step"], TRAIN_DONE,
                   "every checkpoint is evaluated" if all_done else
                   f"some of eval.checkpoint_steps {list(ec.checkpoint_steps)} were never saved")
      break
    if time.time() - idle_since > ec.max_idle_seconds:
      logging.info("eval: no new checkpoint for %.0f s; stopping", ec.max_idle_seconds)
      break
    time.sleep(ec.poll_seconds)
  print(f"eval: {len(added)} new rows, {len(evaluator.rows)} in {evaluator.results_path}")
  return added
