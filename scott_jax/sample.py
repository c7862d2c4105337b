"""Mode ``sample``: images from a trained student (a run's checkpoint, a Flax export or a diffusers folder) or
from a teacher, with `scott_jax.pipeline`'s samplers; PNGs, a grid and the seconds per image."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax

from scott_jax import export, pipeline, solvers

PyTree = Any


def sampler_options(sc: Any) -> dict[str, Any]:
  """make_sampler keyword arguments for the teacher from a ``config.sample`` section."""
  kwargs = solvers.solver_kwargs(sc.solver, dict(eta=sc.eta, order=sc.order, noise_fn=sc.noise_fn))
  return dict(solver=sc.solver, solver_kwargs=kwargs, spacing=sc.spacing, offset=sc.steps_offset)


def load_for_config(config: Any, workdir: str, path: str = "", which: str = "ema",
                    step: int = -1) -> tuple[pipeline.Pipeline, dict[str, PyTree], str]:
  """The pipeline the sample/eval modes run: ``path`` a Flax export (scott_export.json) or a diffusers folder
  (model_index.json); "" = the training run in ``workdir`` at checkpoint ``step`` (-1: latest) with ``which``
  params ("ema" or "student") on the teacher named by ``config.model``. Returns (pipe, params, description)."""
  if path:
    if os.path.isfile(os.path.join(path, export.EXPORT_CONFIG)):
      return (*export.load_exported(path, config.model.dtype), f"export {path}")
    if os.path.isfile(os.path.join(path, "model_index.json")):
      return (*pipeline.load_diffusers(path, config.model.dtype), f"diffusers {path}")
    raise FileNotFoundError(f"{path} is neither a scott_jax Flax export ({export.EXPORT_CONFIG}) nor a diffusers "
                            "folder (model_index.json)")
  run = export.TrainedRun(config, workdir)
  step = run.latest_step() if step < 0 else step
  pipe, params = run.pipeline(step, which)
  return pipe, params, f"{workdir} step {step} ({which})"


def run_sample(config: Any, workdir: str) -> dict[str, float]:
  """Mode ``sample``: for each entry of ``config.sample.steps`` (or the explicit ``sample.timesteps``) generates
  the prompts with the student (``sample.model = "student"``) or the teacher (``sample.path``, default
  ``config.model.teacher_path``; solver, eta, order, noise_fn, spacing from ``config.sample``; a Gaussian student
  draws from or takes the mean of its Gaussian, ``sample.gaussian``), writes PNGs
  and a grid to WORKDIR/samples/<label>/ and prints seconds per image after compilation.
  Returns {label: seconds/image}."""
  sc = config.sample
  if sc.model == "teacher" and not sc.path:  # the teacher of the run: config.model.teacher_path
    pipe, params = pipeline.load_diffusers(config.model.teacher_path, config.model.dtype)
    what = f"teacher {config.model.teacher_path}"
  else:
    pipe, params, what = load_for_config(config, workdir, sc.path, sc.params, sc.step)
  prompts = pipeline.read_prompts(sc.prompt_file) if sc.prompt_file else list(sc.prompts)
  prompts = [p for p in prompts for _ in range(sc.num_per_prompt)]
  ids = pipe.tokenize(prompts)
  res = sc.resolution or config.data.resolution
  kind = sc.model
  runs: list[int | tuple[int, ...]] = [tuple(sc.timesteps)] if sc.timesteps else list(sc.steps)
  teacher_opts = sampler_options(sc) if kind == "teacher" else {}
  timings = {}
  batch = min(sc.batch_size, len(prompts))
  for steps in runs:
    sampler = pipeline.make_sampler(pipe, kind=kind, steps=steps, height=res, gaussian=sc.gaussian, **teacher_opts)
    label = f"{kind}_{len(sampler.timesteps)}step" if not sc.timesteps else f"{kind}_t{'-'.join(map(str, steps))}"
    key = jax.random.PRNGKey(sc.seed)
    t0 = time.perf_counter()
    jax.block_until_ready(sampler(params, ids[:batch], key, sc.guidance_scale))  # compile + warm up
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = pipeline.generate(sampler, params, ids, key, sc.guidance_scale, batch)
    per_image = (time.perf_counter() - t0) / len(prompts)
    out = os.path.join(workdir, "samples", label)
    pipeline.write_images(out, images)
    pipeline.write_grid(os.path.join(workdir, "samples", f"{label}_grid.png"), images)
    with open(os.path.join(out, "prompts.json"), "w") as fh:
      json.dump({"model": what, "timesteps": sampler.timesteps.tolist(), "guidance_scale": sc.guidance_scale,
                 "seed": sc.seed, "prompts": prompts}, fh, indent=1)
    timings[label] = per_image
    print(f"{label}: timesteps {sampler.timesteps.tolist()} | {per_image:.4f} s/image after compilation "
          f"({compile_s:.1f} s compile + first batch) | {len(prompts)} images at {res}x{res} -> {out}")
  return timings
