"""Mode ``digits``: the whole method on real data in minutes on 2 CPU cores (``configs/digits.py``).

  python -m scott_jax.main --config configs/digits.py --workdir runs/digits
  python -m scott_jax.main --config configs/digits.py:quick --workdir runs/digits_quick

Stages (each writes ``WORKDIR/<stage>/done.json`` with its wall time and results; a rerun skips finished
stages and resumes unfinished ones from their checkpoints):

  setup       tokenizer, frozen random text encoder, scheduler config and the `PixelSpace` marker vae/ (the model
              works in pixel space) -> WORKDIR/teacher_pipeline/{tokenizer,text_encoder,scheduler,vae}
  teacher     stage 1, the eps-prediction teacher U-Net -> WORKDIR/teacher_pipeline/unet: the folder is then a
              diffusers-style pipeline that later stages load through scott_jax.models.loading like SD1.5's
  classifier  the digit classifier (features for FID / coverage, accuracy against the prompted digit)
  distill     stage 2 (`stage_distill`): a `scott_jax.train` run per method and seed -> WORKDIR/distill/<run>/
  eval        the teacher rows and the real training images with `scott_jax.digits.evaluation`; the students
              with the eval job (`scott_jax.evaluate`, mode eval) on each distill run's last checkpoint ->
              WORKDIR/distill/<run>/eval/results.jsonl; every row's metrics and sample grid ->
              WORKDIR/eval/<row>.json, .png (the eval job's prompts and reference: WORKDIR/eval/prompts.jsonl,
              reference.npz)
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

from scott_jax import config as config_lib
from scott_jax import evaluate
from scott_jax.config import ConfigDict
from scott_jax.digits import classifier, distill, evaluation, loop, report, teacher
from scott_jax.digits import data as data_lib
from scott_jax.models import loading
from scott_jax.schedules import NoiseSchedule

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
  return classifier.train(config, os.path.join(workdir, "classifier"), data_lib.to_model(data.train_images),
                          data.train_labels, data_lib.to_model(data.test_images), data.test_labels)


def stage_classifier(config: ConfigDict, workdir: str, data: data_lib.DigitsData) -> dict[str, Any]:
  """Trains the digit classifier; records its train and test accuracy and exports it to
  WORKDIR/classifier/export (`classifier.eval_features` reads it: the eval job's digit feature extractor)."""
  done = read_done(workdir, "classifier")
  if done is not None:
    return done

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


def stage_distill(config: ConfigDict, workdir: str, data: data_lib.DigitsData) -> list[dict[str, Any]] | None:
  """Stage 2: distils a student per (method, seed) of ``config.digits.distill_methods`` x ``distill_seeds`` with
  `scott_jax.train` (`scott_jax.digits.distill`). Returns each run's done info (method, seed, steps, seconds),
  or None when a run was stopped early (rerun to resume)."""
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
  return runs


EVAL_PROMPTS, EVAL_REFERENCE = "prompts.jsonl", "reference.npz"
CLASSIFIER_EXPORT = os.path.join("classifier", "export")


def write_eval_inputs(config: ConfigDict, workdir: str, data: data_lib.DigitsData) -> tuple[str, str]:
  """The eval job's inputs for the student runs: WORKDIR/eval/prompts.jsonl (the prompt of every label of
  `evaluation.eval_labels`, in order) and WORKDIR/eval/reference.npz (mu, sigma and all feature rows of the
  classifier on the TEST split, `scott_jax.evaluate.write_reference`). Returns their paths."""
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  prompts = os.path.join(out_dir, EVAL_PROMPTS)
  with open(prompts, "w") as fh:
    fh.write("".join(json.dumps({"caption": data_lib.prompt(label)}) + "\n"
                     for label in evaluation.eval_labels(config.digits.samples_per_digit)))
  reference = os.path.join(out_dir, EVAL_REFERENCE)
  if not os.path.isfile(reference):
    _, feats = classifier.uint8_apply(os.path.join(workdir, CLASSIFIER_EXPORT))(data.test_images)
    evaluate.write_reference(reference, feats, len(feats))
  return prompts, reference


def student_eval_config(config: ConfigDict, workdir: str, method: str, seed: int, step: int) -> ConfigDict:
  """The eval-job config of one student run (its training config, `distill.method_config`): checkpoint ``step``
  at every ``digits.student_steps`` with the ``digits.student_params`` parameters, the digit classifier as
  feature extractor (FID, prdc against the test split) and as prompt metric (accuracy against the prompted
  digit), no CLIP; CFG scale, batch and seed of the digits rows (so the initial noise is the teacher rows'),
  every image saved (the grids)."""
  d = config.digits
  c = distill.method_config(config, method, seed, os.path.join(workdir, PIPELINE))
  n = data_lib.NUM_CLASSES * d.samples_per_digit
  c.eval.update(dict(prompt_file=os.path.join(workdir, "eval", EVAL_PROMPTS), num_prompts=0,
                     reference_stats=os.path.join(workdir, "eval", EVAL_REFERENCE),
                     sample_steps=tuple(d.student_steps), timesteps=(), params=(d.student_params,),
                     checkpoint_steps=(int(step),), guidance_scale=float(d.guidance_scale), resolution=d.resolution,
                     batch_size=d.eval_batch, seed=d.eval_seed, features="scott_jax.digits.classifier:eval_features",
                     feature_weights=os.path.join(workdir, CLASSIFIER_EXPORT), clip_model="",
                     prompt_metric="scott_jax.digits.classifier:prompt_accuracy", coverage_k=d.coverage_k,
                     watch=False, save_images=n))
  return config_lib.validate(c)


def student_name(method: str, seed: int, steps: int) -> str:
  """The row name of a student: "<method title> <steps>-step seed <seed>"."""
  return f"{distill.TITLES[method]} {steps}-step seed {seed}"


def student_row(config: ConfigDict, workdir: str, method: str, seed: int, eval_row: dict[str, Any]) -> dict[str, Any]:
  """The digits row of one eval-job row of a student run: its metrics (accuracy = the prompt metric), the
  per-digit minimum accuracy and the sample grid WORKDIR/eval/<slug>.png from the images the job saved."""
  d = config.digits
  k, step, which = int(eval_row["steps"]), int(eval_row["step"]), str(eval_row["params"])
  name = student_name(method, seed, k)
  slug = evaluation.slug(name)
  images = evaluate.read_saved_images(distill.run_dir(workdir, method, seed), step, which, k)
  labels = evaluation.eval_labels(d.samples_per_digit)
  if len(images) != len(labels):
    raise ValueError(f"{method} seed {seed} step {step}: {len(images)} saved images, expected {len(labels)}")
  hits = classifier.prompt_accuracy(student_eval_config(config, workdir, method, seed, step).eval)(
    images, [data_lib.prompt(label) for label in labels])
  evaluation.write_grid(os.path.join(workdir, "eval", f"{slug}.png"), images, labels)
  return {"name": name, "method": method, "steps": k, "evals_per_image": k, "seed": int(seed),
          "seconds": float(eval_row["sample_seconds"]), "num_samples": int(eval_row["num_images"]),
          "grid": f"eval/{slug}.png", "accuracy": float(eval_row["prompt_metric"]),
          "min_digit_accuracy": min(float(np.mean(hits[labels == c])) for c in range(data_lib.NUM_CLASSES)),
          **{m: float(eval_row[m]) for m in ("fid", "coverage", "precision", "recall", "density")},
          "checkpoint_step": step, "timesteps": list(eval_row["timesteps"]),
          "source": os.path.relpath(os.path.join(distill.run_dir(workdir, method, seed), "eval",
                                                 evaluate.RESULTS_FILE), workdir)}


def student_results(config: ConfigDict, workdir: str, data: data_lib.DigitsData,
                    runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The student rows, from the eval job (`scott_jax.evaluate.Evaluator`) on each finished distill run's last
  checkpoint (the run's WORKDIR/distill/<method>_seed<k>/eval/results.jsonl). Each converted row is cached as
  WORKDIR/eval/<slug>.json; a rerun skips cached rows and the eval job skips the rows it already has. Samplers
  compile once per method and step count (`scott_jax.pipeline` caches jitted functions by pipeline value)."""
  d = config.digits
  write_eval_inputs(config, workdir, data)
  out = []
  for info in runs:
    method, seed, step = info["method"], int(info["seed"]), int(info["steps"])
    paths = {k: os.path.join(workdir, "eval", evaluation.slug(student_name(method, seed, k)) + ".json")
             for k in d.student_steps}
    if not all(os.path.isfile(p) for p in paths.values()):
      c = student_eval_config(config, workdir, method, seed, step)
      logging.info("digits: eval job on %s seed %d (step %d)", method, seed, step)
      evaluator = evaluate.Evaluator(c, distill.run_dir(workdir, method, seed))
      evaluator.run_once()
      by_key = {evaluate.row_key(r): r for r in evaluator.rows}
      for k, path in paths.items():
        if not os.path.isfile(path):
          row = student_row(config, workdir, method, seed, by_key[(step, k, d.student_params)])
          logging.info("digits: %s: accuracy %.3f FID %.2f coverage %.3f (%.1fs)", row["name"], row["accuracy"],
                       row["fid"], row["coverage"], row["seconds"])
          with open(path, "w") as fh:
            json.dump(row, fh, indent=2)
    for path in paths.values():
      with open(path) as fh:
        out.append(json.load(fh))
  return out


def stage_eval(config: ConfigDict, workdir: str, data: data_lib.DigitsData, rows: list[evaluation.Row],
               runs: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
  """Evaluates the reference row "real (train split)" and each row of ``rows`` (teacher rows, sampled here;
  cached per row in WORKDIR/eval/<slug>.json with its grid <slug>.png), then the student ``runs`` (the done infos
  of `stage_distill`) through the eval job (`student_results`). Returns the row results in order (reference,
  ``rows``, students by method, seed and steps)."""
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
  return results + student_results(config, workdir, data, list(runs))


# ---------------------------------------------------------------------------------------------------------
# Report.

def write_report(config: ConfigDict, workdir: str, results: list[dict[str, Any]], variant: str = "") -> str:
  """Writes WORKDIR/report.md (`scott_jax.digits.report`)."""
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
  runs = stage_distill(config, workdir, data)
  if runs is None:
    logging.warning("digits: distillation stopped early; rerun to resume.")
    return ""
  t0 = time.time()
  previous = read_done(workdir, "eval")
  results = stage_eval(config, workdir, data, teacher_rows(config, workdir), runs)
  if previous is None or previous.get("rows") != len(results):
    _mark_done(workdir, "eval", time.time() - t0 + (previous or {}).get("seconds", 0.0), rows=len(results))
  path = write_report(config, workdir, results)
  print(_summary(path))
  return path


def _summary(report_path: str) -> str:
  """What the mode prints at the end: the report's total time, the students-over-seeds table and the verdict."""
  with open(report_path) as fh:
    text = fh.read()
  section = text.split("## Students over seeds", 1)[1].split("\n## ", 1)[0] if "## Students over seeds" in text else ""
  total = [ln for ln in text.splitlines() if ln.startswith("| total")]
  body = [ln for ln in section.splitlines() if ln.startswith(("|", "- "))]
  return "\n".join([f"digits: report {report_path}", *total, *body])
