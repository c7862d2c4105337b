"""Mode ``digits``: the whole method on real data in minutes on 2 CPU cores (``configs/digits.py``).

  python -m scott_jax.main --config configs/digits.py --workdir runs/digits
  python -m scott_jax.main --config configs/digits.py:quick --workdir runs/digits_quick

Stages (each writes ``WORKDIR/<stage>/done.json`` with its wall time and results; a rerun skips finished
stages and resumes unfinished ones from their checkpoints):

  setup       tokenizer and frozen random text encoder -> WORKDIR/teacher_pipeline/{tokenizer,text_encoder}
  teacher     stage 1, the eps-prediction teacher U-Net -> WORKDIR/teacher_pipeline/{unet,scheduler}: a
              diffusers-format folder (no vae/: the model works in pixel space) that later stages load through
              scott_jax.models.loading like the SD1.5 folder
  classifier  the digit classifier (features for FID / coverage, accuracy against the prompted digit)
  distill     stage 2 hook (`stage_distill`): returns the student rows (LCM and SCott at 1, 2, 4 steps)
  eval        every row's metrics and sample grid -> WORKDIR/eval/<row>.json, .png
  report      WORKDIR/report.md
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

from scott_jax.config import ConfigDict
from scott_jax.digits import data as data_lib
from scott_jax.digits import evaluation, loop

PIPELINE = "teacher_pipeline"
DONE = "done.json"


def _done_path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, DONE)


def read_done(workdir: str, stage: str) -> dict[str, Any] | None:
  """The done marker of ``stage`` (a dict with at least "seconds"), or None if the stage has not finished."""
  path = _done_path(workdir, stage)
  if not os.path.isfile(path):
    return None
  with open(path) as fh:
    return json.load(fh)


def _mark_done(workdir: str, stage: str, seconds: float, **info: Any) -> dict[str, Any]:
  os.makedirs(os.path.join(workdir, stage), exist_ok=True)
  out = {"seconds": round(seconds, 2), **info}
  with open(_done_path(workdir, stage), "w") as fh:
    json.dump(out, fh, indent=2)
  logging.info("digits: stage %s done in %.1fs %s", stage, seconds, info)
  return out


def _data(config: ConfigDict) -> data_lib.DigitsData:
  d = config.digits
  return data_lib.load_data(d.resolution, d.test_fraction, d.split_seed)


# ---------------------------------------------------------------------------------------------------------
# Stages.

def stage_setup(config: ConfigDict, workdir: str) -> dict[str, Any]:
  """Writes the tokenizer and the frozen random text encoder into WORKDIR/teacher_pipeline."""
  done = read_done(workdir, "setup")
  if done is not None:
    return done
  from scott_jax.models import loading

  t0 = time.time()
  d = config.digits
  folder = os.path.join(workdir, PIPELINE)
  data_lib.write_tokenizer(os.path.join(folder, "tokenizer"), d.max_length)
  tokenizer = loading.load_tokenizer(folder)
  data_lib.check_tokenizer(tokenizer)
  tcfg = data_lib.text_config(tokenizer, d.text_hidden, d.text_layers, d.text_heads, d.text_intermediate)
  data_lib.write_text_encoder(os.path.join(folder, "text_encoder"), tcfg,
                              data_lib.init_text_encoder(tcfg, d.text_seed, d.text_token_std,
                                                         d.text_position_std))
  data_lib.write_scheduler(os.path.join(folder, "scheduler"), config.schedule)
  data_lib.write_pixel_space(os.path.join(folder, "vae"))
  return _mark_done(workdir, "setup", time.time() - t0, vocab_size=len(tokenizer))


def load_text(workdir: str) -> tuple[Any, Any, Any, np.ndarray]:
  """(tokenizer, text encoder, its params, prompt table (11, L, D)) from WORKDIR/teacher_pipeline, through the
  SD loaders."""
  from scott_jax.models import loading

  folder = os.path.join(workdir, PIPELINE)
  tokenizer = loading.load_tokenizer(folder)
  text_encoder, params = loading.load_text_encoder(folder)
  return tokenizer, text_encoder, params, data_lib.encode_prompts(text_encoder, params, tokenizer)


def stage_teacher(config: ConfigDict, workdir: str, data: data_lib.DigitsData,
                  stop_at: int | None = None) -> dict[str, Any] | None:
  """Stage 1 (resumable): trains the teacher and writes unet/ into WORKDIR/teacher_pipeline. Returns the done
  info, or None when stopped early (``stop_at`` or a signal)."""
  done = read_done(workdir, "teacher")
  if done is not None:
    return done
  from scott_jax.digits import teacher
  from scott_jax.models import loading

  t0 = time.time()
  _, _, _, table = load_text(workdir)
  directory = os.path.join(workdir, "teacher")
  ucfg, ema, steps = teacher.train(config, directory, data_lib.to_model(data.train_images), data.train_labels,
                                   data_lib.to_model(data.test_images), data.test_labels, table, stop_at=stop_at)
  if steps < config.digits.teacher_steps:
    return None
  loading.save_unet(os.path.join(workdir, PIPELINE, "unet"), ucfg, ema)
  log = loop.read_log(directory)
  return _mark_done(workdir, "teacher", time.time() - t0, steps=steps, first_eval_loss=log[0]["eval_loss_ema"],
                    final_eval_loss=log[-1]["eval_loss_ema"])


def load_classifier(config: ConfigDict, workdir: str, data: data_lib.DigitsData) -> tuple[Any, Any]:
  """The trained classifier (module, params); trains it first if needed (resumable)."""
  from scott_jax.digits import classifier

  return classifier.train(config, os.path.join(workdir, "classifier"), data_lib.to_model(data.train_images),
                          data.train_labels, data_lib.to_model(data.test_images), data.test_labels)


def stage_classifier(config: ConfigDict, workdir: str, data: data_lib.DigitsData) -> dict[str, Any]:
  """Trains the digit classifier; records its train and test accuracy and exports it to
  WORKDIR/classifier/export (`classifier.eval_features` reads it: the eval job's digit feature extractor)."""
  done = read_done(workdir, "classifier")
  if done is not None:
    return done
  from scott_jax.digits import classifier

  t0 = time.time()
  model, params = load_classifier(config, workdir, data)
  apply = classifier.make_apply(model)
  classifier.export(os.path.join(workdir, "classifier", "export"), model, params)
  test_acc = classifier.accuracy(apply(params, data_lib.to_model(data.test_images))[0], data.test_labels)
  train_acc = classifier.accuracy(apply(params, data_lib.to_model(data.train_images))[0], data.train_labels)
  return _mark_done(workdir, "classifier", time.time() - t0, test_accuracy=test_acc, train_accuracy=train_acc,
                    num_train=len(data.train_labels), num_test=len(data.test_labels))


def teacher_rows(config: ConfigDict, workdir: str) -> list[evaluation.Row]:
  """The teacher rows of ``config.digits.teacher_rows``, the teacher loaded from WORKDIR/teacher_pipeline."""
  from scott_jax.models import loading
  from scott_jax.schedules import NoiseSchedule

  d = config.digits
  unet, params = loading.load_unet(os.path.join(workdir, PIPELINE), "unet")
  _, _, _, table = load_text(workdir)
  schedule = NoiseSchedule.from_config(config.schedule)
  rows = []
  for spec in d.teacher_rows:
    solver, steps = spec.split(":")
    fn = evaluation.make_teacher_sample_fn(unet, params, table, schedule, solver=solver, num_steps=int(steps),
                                           guidance_scale=d.guidance_scale, solver_options=dict(config.solver))
    rows.append(evaluation.Row(f"teacher {evaluation.SOLVER_TITLES[solver]} {steps}", "teacher", int(steps),
                               2 * int(steps), fn))
  return rows


def stage_distill(config: ConfigDict, workdir: str, data: data_lib.DigitsData) -> list[evaluation.Row] | None:
  """Stage 2: distils a student per (method, seed) of ``config.digits.distill_methods`` x ``distill_seeds`` with
  `scott_jax.train` (`scott_jax.digits.distill`) and returns their rows (each method and seed at every
  ``student_steps``), or None when a run was stopped early (rerun to resume)."""
  from scott_jax.digits import distill
  from scott_jax.schedules import NoiseSchedule

  d = config.digits
  t0 = time.time()
  runs = []
  for method in d.distill_methods:
    for seed in d.distill_seeds:
      info = distill.train_student(config, workdir, data, method, seed)
      if info is None:
        return None
      runs.append(info)
  if runs and read_done(workdir, "distill") is None:
    _mark_done(workdir, "distill", time.time() - t0, runs=len(runs),
               train_seconds=round(sum(r["seconds"] for r in runs), 1))
  _, _, _, table = load_text(workdir)
  schedule = NoiseSchedule.from_config(config.schedule)
  c = config.consistency
  rows, bind = [], None
  for method in d.distill_methods:
    for seed in d.distill_seeds:
      student, params = distill.load_student(config, workdir, method, seed)
      if bind is None:  # every student has the teacher's architecture: one sampler for all
        bind = evaluation.make_student_sampler(student, table, schedule, guidance_scale=d.guidance_scale,
                                               guidance_embed_dim=c.guidance_embed_dim,
                                               timestep_scaling=c.timestep_scaling)
      for k in d.student_steps:
        fn = bind(params, distill.sampling_timesteps(config, method, k))
        rows.append(evaluation.Row(f"{distill.TITLES[method]} {k}-step seed {seed}", method, k, k, fn, seed))
  return rows


def stage_eval(config: ConfigDict, workdir: str, data: data_lib.DigitsData,
               rows: list[evaluation.Row]) -> list[dict[str, Any]]:
  """Evaluates each row (cached per row in WORKDIR/eval/<slug>.json with its grid <slug>.png), plus the
  reference row "real (train split)". Returns the row results in order (reference first)."""
  from scott_jax.digits import classifier

  d = config.digits
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  model, params = load_classifier(config, workdir, data)
  apply = classifier.make_apply(model)
  _, real_feats = apply(params, data_lib.to_model(data.test_images))
  labels = evaluation.eval_labels(d.samples_per_digit)

  def cached(slug: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    path = os.path.join(out_dir, f"{slug}.json")
    if os.path.isfile(path):
      with open(path) as fh:
        return json.load(fh)
    result = compute()
    with open(path, "w") as fh:
      json.dump(result, fh, indent=2)
    return result

  def reference() -> dict[str, Any]:
    rng = np.random.default_rng(d.eval_seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(data.train_labels == c), min(d.samples_per_digit,
                                                                                  int(np.sum(data.train_labels == c))),
                                     replace=False) for c in range(data_lib.NUM_CLASSES)])
    x = data_lib.to_model(data.train_images[idx])
    logits, feats = apply(params, x)
    evaluation.write_grid(os.path.join(out_dir, "real_train.png"), data.train_images[idx], data.train_labels[idx])
    m = evaluation.metrics(logits, feats, data.train_labels[idx], real_feats, d.coverage_k)
    return {"name": "real (train split)", "method": "data", "steps": 0, "evals_per_image": 0, "seconds": 0.0,
            "num_samples": len(idx), "grid": "eval/real_train.png", **m}

  results = [cached("real_train", reference)]
  for row in rows:
    def compute(row: evaluation.Row = row) -> dict[str, Any]:
      logging.info("digits: evaluating %s (%d samples)", row.name, len(labels))
      images, seconds = evaluation.generate(row.sample_fn, labels, d.eval_seed, d.eval_batch)
      logits, feats = apply(params, images)
      evaluation.write_grid(os.path.join(out_dir, f"{row.slug}.png"), images, labels)
      m = evaluation.metrics(logits, feats, labels, real_feats, d.coverage_k)
      logging.info("digits: %s: accuracy %.3f FID %.2f coverage %.3f (%.1fs)", row.name, m["accuracy"], m["fid"],
                   m["coverage"], seconds)
      return {"name": row.name, "method": row.method, "steps": row.steps, "evals_per_image": row.evals_per_image,
              "seed": row.seed, "seconds": round(seconds, 2), "num_samples": len(labels),
              "grid": f"eval/{row.slug}.png", **m}

    results.append(cached(row.slug, compute))
  return results


# ---------------------------------------------------------------------------------------------------------
# Report.

def write_report(config: ConfigDict, workdir: str, results: list[dict[str, Any]], variant: str = "") -> str:
  """Writes WORKDIR/report.md (`scott_jax.digits.report`)."""
  from scott_jax.digits import distill, report

  stages = {s: read_done(workdir, s) for s in report.STAGES}
  return report.write_report(config, workdir, results, stages, distill.TITLES, variant)


# ---------------------------------------------------------------------------------------------------------
# The mode.

def run_digits(config: ConfigDict, workdir: str) -> str:
  """Mode ``digits``: every stage in order (each resumable), then report.md; returns the report's path."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as fh:
    fh.write(config.to_json_best_effort(indent=2))
  data = _data(config)
  stage_setup(config, workdir)
  if stage_teacher(config, workdir, data) is None:
    logging.warning("digits: teacher training stopped early; rerun to resume.")
    return ""
  stage_classifier(config, workdir, data)
  student_rows = stage_distill(config, workdir, data)
  if student_rows is None:
    logging.warning("digits: distillation stopped early; rerun to resume.")
    return ""
  t0 = time.time()
  rows = teacher_rows(config, workdir) + student_rows
  previous = read_done(workdir, "eval")
  results = stage_eval(config, workdir, data, rows)
  if previous is None or previous.get("rows") != len(results):
    _mark_done(workdir, "eval", time.time() - t0 + (previous or {}).get("seconds", 0.0), rows=len(results))
  return write_report(config, workdir, results)
