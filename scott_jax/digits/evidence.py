"""Mode ``evidence``: the decisive digits experiment (``configs/digits.py:evidence``, issue "evidence").

  python -m scott_jax.main --config configs/digits.py:evidence --workdir runs/evidence

The same data, teacher, classifier and eval job as the default digits run (`scott_jax.digits.run` stages setup,
teacher, classifier), then per arm and seed one `scott_jax.train` run (`scott_jax.digits.distill`) whose
checkpoints, the initial one included (``train.save_initial``: step 0 is the untrained student, arm (a)), are
evaluated by the eval job (`scott_jax.evaluate.Evaluator`) on ``digits.samples_per_digit`` x 10 prompts with
the same evaluation noise and the same sampling timesteps (``digits.eval_timesteps``) for every arm:

  - at the experiment's CFG scale ``digits.guidance_scale``: every checkpoint (the learning curves), 1 / 2 / 4
    steps;
  - at every other scale of ``digits.eval_guidance_scales`` (CFG 1): step 0 and the last checkpoint.

Each row keeps its per-image classifier features and hits (``eval.save_features``), so `scott_jax.digits.
evidence_report` can bootstrap paired differences over seeds and samples. The teacher's reference rows (DDIM at
``digits.evidence_teacher_steps`` steps) are sampled at every scale on the same prompts. Runs go in the order
of ``digits.distill_methods``: the first ``digits.first_methods`` methods for every seed, then the rest; every
(method, seed) is trained, evaluated and recorded before the next starts, and everything resumes: rerunning
the command finishes an interrupted experiment, and on a finished one only rewrites the report.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
from absl import logging

from scott_jax import config as config_lib
from scott_jax import evaluate, export
from scott_jax.config import ConfigDict
from scott_jax.digits import classifier, distill, evaluation, evidence_report, probe
from scott_jax.digits import data as data_lib
from scott_jax.digits import run as run_lib
from scott_jax.digits.evidence_layout import (
  EVAL_CPU,
  EVIDENCE,
  RUNS,
  TEACHER_ROWS,
  eval_dir,
  run_order,
  scale_tag,
  scales,
)
from scott_jax.models import loading
from scott_jax.schedules import NoiseSchedule


def write_inputs(config: ConfigDict, workdir: str, data: data_lib.DigitsData) -> tuple[str, str]:
  """The eval job's prompts (``samples_per_digit`` per digit, `evaluation.eval_labels` order) and reference
  (classifier features of the test split) under WORKDIR/evidence; returns their paths."""
  out = os.path.join(workdir, EVIDENCE)
  os.makedirs(out, exist_ok=True)
  prompts = os.path.join(out, run_lib.EVAL_PROMPTS)
  labels = evaluation.eval_labels(config.digits.samples_per_digit)
  with open(prompts, "w") as fh:
    fh.write("".join(json.dumps({"caption": data_lib.prompt(label)}) + "\n" for label in labels))
  reference = os.path.join(out, run_lib.EVAL_REFERENCE)
  if not os.path.isfile(reference):
    _, feats = classifier.uint8_apply(os.path.join(workdir, run_lib.CLASSIFIER_EXPORT))(data.test_images)
    evaluate.write_reference(reference, feats, len(feats))
  return prompts, reference


def eval_config(config: ConfigDict, workdir: str, method: str, seed: int, scale: float,
                checkpoint_steps: tuple[int, ...]) -> ConfigDict:
  """The eval-job config of one run at one CFG scale: the digits student eval config (`run.student_eval_config`)
  on the evidence prompts, at ``digits.eval_timesteps`` (the same for every arm), with per-image features kept
  and the first 80 images saved (8 per digit: the grids)."""
  d = config.digits
  c = run_lib.student_eval_config(config, workdir, method, seed, 0)
  c.eval.update(dict(prompt_file=os.path.join(workdir, EVIDENCE, run_lib.EVAL_PROMPTS),
                     reference_stats=os.path.join(workdir, EVIDENCE, run_lib.EVAL_REFERENCE),
                     timesteps=tuple(tuple(ts) for ts in d.eval_timesteps), checkpoint_steps=checkpoint_steps,
                     guidance_scale=float(scale), save_images=8 * data_lib.NUM_CLASSES, save_features=True))
  return config_lib.validate(c)


def evaluate_run(config: ConfigDict, workdir: str, method: str, seed: int) -> bool:
  """The eval job on one finished run: every checkpoint at the experiment's scale, step 0 and the last step at
  the other scales (rows already in a results.jsonl are skipped). Returns whether any row was computed."""
  run_wd = distill.run_dir(workdir, method, seed, RUNS)
  base = distill.method_config(config, method, seed, os.path.join(workdir, run_lib.PIPELINE))
  run = export.TrainedRun(base, run_wd)
  steps, _ = run.steps()
  computed, cpu0 = False, time.process_time()
  for i, scale in enumerate(scales(config)):
    wanted = tuple(steps) if i == 0 else (steps[0], steps[-1])
    c = eval_config(config, workdir, method, seed, scale, wanted)
    evaluator = evaluate.Evaluator(c, eval_dir(workdir, method, seed, scale), run=run)
    if all(evaluator.complete(s) for s in wanted):
      continue
    computed = True
    logging.info("evidence: eval job on %s seed %d at CFG %g (steps %s)", method, seed, scale, list(wanted))
    evaluator.run_once()
  if computed:  # this process's CPU time on the run's evaluation, added up over invocations
    path = os.path.join(run_wd, EVAL_CPU)
    spent = 0.0
    if os.path.isfile(path):
      with open(path) as fh:
        spent = json.load(fh)["cpu_seconds"]
    with open(path, "w") as fh:
      json.dump({"cpu_seconds": round(spent + time.process_time() - cpu0, 2)}, fh)
  return computed


def teacher_rows(config: ConfigDict, workdir: str, data: data_lib.DigitsData) -> list[dict[str, Any]]:
  """The teacher's DDIM rows at every scale on the evidence prompts and noise seed: metrics, per-image features
  and hits in WORKDIR/evidence/teacher_rows/<tag>.json / .npz, grids <tag>.png (cached)."""
  d = config.digits
  out_dir = os.path.join(workdir, EVIDENCE, TEACHER_ROWS)
  os.makedirs(out_dir, exist_ok=True)
  labels = evaluation.eval_labels(d.samples_per_digit)
  rows, fns = [], None
  for scale in scales(config):
    path = os.path.join(out_dir, f"ddim{d.evidence_teacher_steps}_{scale_tag(scale)}")
    if not os.path.isfile(path + ".json"):
      if fns is None:
        unet, params = loading.load_unet(os.path.join(workdir, run_lib.PIPELINE), "unet")
        _, _, _, table = run_lib.load_text(workdir)
        model, cparams = run_lib.load_classifier(config, workdir, data)
        apply = classifier.make_apply(model)
        _, real_feats = apply(cparams, data_lib.to_model(data.test_images))
        fns = (unet, params, table, apply, cparams, real_feats)
      unet, params, table, apply, cparams, real_feats = fns
      fn = evaluation.make_teacher_sample_fn(unet, params, table, NoiseSchedule.from_config(config.schedule),
                                             solver="ddim", num_steps=d.evidence_teacher_steps, guidance_scale=scale,
                                             solver_options=dict(config.solver))
      logging.info("evidence: teacher DDIM %d at CFG %g (%d samples)", d.evidence_teacher_steps, scale, len(labels))
      images, seconds = evaluation.generate(fn, labels, d.eval_seed, d.eval_batch)
      logits, feats = apply(cparams, images)
      hits = (np.argmax(np.asarray(logits), -1) == labels).astype(np.float64)
      evaluation.write_grid(path + ".png", images, labels)
      np.savez(path + ".npz", features=np.asarray(feats, np.float32), prompt_metric=hits)
      m = evaluation.metrics(logits, feats, labels, real_feats, d.coverage_k)
      with open(path + ".json", "w") as fh:
        json.dump({"name": f"teacher DDIM {d.evidence_teacher_steps}", "guidance_scale": scale,
                   "steps": d.evidence_teacher_steps, "seconds": round(seconds, 2), "num_samples": len(labels),
                   **m}, fh, indent=2)
    with open(path + ".json") as fh:
      rows.append(json.load(fh))
  return rows


def probe_rows(config: ConfigDict, workdir: str, data: data_lib.DigitsData) -> list[dict[str, Any]]:
  """The discriminator probe (`scott_jax.digits.probe`) for every (head init, disc lr) of ``digits.probe_grid``:
  the evidence config's discriminator on the LCM + GAN run config (the fakes are the untrained student's either
  way), batch ``digits.probe_batch``, ``digits.probe_steps`` steps; cached in WORKDIR/evidence/probe.json."""
  d = config.digits
  path = os.path.join(workdir, EVIDENCE, "probe.json")
  rows = []
  if os.path.isfile(path):
    with open(path) as fh:
      rows = json.load(fh)
  have = {(r["head_init"], r["disc_lr"]) for r in rows}
  arms = [(head, float(lr)) for head, lr in d.probe_grid if (head, float(lr)) not in have]
  if arms:
    c = distill.method_config(config, "lcm_gan", d.distill_seeds[0], os.path.join(workdir, run_lib.PIPELINE))
    c.train.batch_size = d.probe_batch
    logging.info("evidence: discriminator probe, arms (head init, disc lr) %s, %d steps", arms, d.probe_steps)
    curves = probe.run_probes(c, distill.source(c, data), arms, d.probe_steps,
                              log_every=max(d.probe_steps // 6, 1))
    rows += [{"head_init": head, "disc_lr": lr, "batch": d.probe_batch, "curve": curve}
             for (head, lr), curve in zip(arms, curves, strict=True)]
    with open(path, "w") as fh:
      json.dump(rows, fh, indent=2)
  return rows


def run_evidence(config: ConfigDict, workdir: str) -> str:
  """Mode ``evidence``: stages setup, teacher, classifier (shared with mode digits), the teacher rows, then every
  run of `run_order` trained and evaluated in turn, then the report (`evidence_report.write`). Returns the
  report's path ("" when a run stopped early: rerun to resume)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as fh:
    fh.write(config.to_json_best_effort(indent=2))
  data = run_lib._data(config)
  run_lib.stage_setup(config, workdir)
  if run_lib.stage_teacher(config, workdir, data) is None:
    logging.warning("evidence: teacher training stopped early; rerun to resume.")
    return ""
  run_lib.stage_classifier(config, workdir, data)
  write_inputs(config, workdir, data)
  teacher_rows(config, workdir, data)
  probe_rows(config, workdir, data)
  t0 = time.time()
  order, changed = run_order(config), False
  for i, (method, seed) in enumerate(order):
    was_done = distill.read_done(distill.run_dir(workdir, method, seed, RUNS)) is not None
    if distill.train_student(config, workdir, data, method, seed, RUNS) is None:
      logging.warning("evidence: %s seed %d stopped early; rerun to resume.", method, seed)
      return ""
    changed |= evaluate_run(config, workdir, method, seed) or not was_done
    if changed and i + 1 < len(order) and order[i + 1][1] != seed:
      # the report so far once a seed's round of runs has new results (its bootstrap and figures cost minutes:
      # not after every run, nor after the finished runs a rerun passes)
      evidence_report.write(config, workdir)
      changed = False
    logging.info("evidence: %s seed %d done (%.0f s since this invocation started)", method, seed,
                 time.time() - t0)
  path = evidence_report.write(config, workdir)
  print(f"evidence: report {path}")
  return path
