"""Mode ``train``: SCott training at Stable Diffusion scale on a device mesh.

`train` loads the models (`scott_jax.student`), the data (`scott_jax.data.batches`), restores or initialises
the train state of `scott_jax.step`, compiles its step sharded on ``config.mesh`` (`scott_jax.parallel`) and
runs it in `scott_jax.loop.run` with checkpoints (`scott_jax.checkpoint`), metrics and sample grids.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
from absl import logging

from scott_jax import checkpoint as ckpt_lib
from scott_jax import loop, metric_writer, parallel
from scott_jax import pipeline as pipeline_lib
from scott_jax import student as student_lib
from scott_jax.config import ConfigDict
from scott_jax.data import batches as batches_lib
from scott_jax.step import TrainState, abstract_state, init_state, make_train_step

# The compiled steps of this process's runs: runs that differ only outside the step (their seed, data source,
# length, logging; e.g. the digits seeds of a method) trace, lower and compile the step once.
_COMPILED: dict[str, Any] = {}
# The config sections `step.make_train_step` reads (tests/test_train.py traces it on a config holding only these).
# The seed is not among them: the step takes its randomness from the state.
PROGRAM_SECTIONS = ("consistency", "gan", "mesh", "model", "optim", "schedule", "solver")


def _program_key(config: ConfigDict, mesh: Any, batch_spec: dict[str, Any]) -> str:
  """What fixes the compiled step: the config's PROGRAM_SECTIONS, the mesh's devices and axes, and the global
  batch's shapes."""
  c = {k: v for k, v in json.loads(config.to_json_best_effort()).items() if k in PROGRAM_SECTIONS}
  devices = [int(d.id) for d in mesh.devices.flat]
  shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in sorted(batch_spec.items())}
  return json.dumps([c, devices, list(mesh.axis_names), list(mesh.devices.shape), repr(shapes)], sort_keys=True)


def compiled_step(config: ConfigDict, models: student_lib.Models, mesh: Any, abstract: TrainState, frozen: Any,
                  batch_spec: dict[str, Any], shardings: tuple[Any, Any, Any]) -> Any:
  """The train step jitted on ``mesh`` (`parallel.jit_train_step`, the state donated) and compiled for the
  abstract state, the frozen models and the global batch spec under ``shardings`` = (state, frozen, batch)
  shardings (`parallel.shardings_for`); memoised per program (`_program_key`) for this process."""
  state_sh, frozen_sh, batch_sh = shardings
  key = _program_key(config, mesh, batch_spec)
  if key not in _COMPILED:
    step_fn = parallel.jit_train_step(make_train_step(config, models), mesh, state_sh, batch_sh, frozen_sh,
                                      parallel.logical_rules(config.mesh))
    _COMPILED[key] = step_fn.lower(parallel.with_shardings(abstract, state_sh),
                                   parallel.with_shardings(batch_spec, batch_sh),
                                   parallel.with_shardings(frozen, frozen_sh)).compile()
  return _COMPILED[key]


def _mib(n: int) -> str:
  return f"{n / 2**20:.2f} MiB"


def _describe(values: dict[str, float]) -> str:
  """The progress line's losses: loss, L_CD and, with the GAN, L_G, L_D, disc_accuracy and grad_ratio."""
  text = f"loss {values['loss']:.5f} cd {values['loss_cd']:.5f}"
  if "loss_d" in values:
    text += (f" g {values['loss_g']:.4f} d {values['loss_d']:.4f} acc {values['disc_accuracy']:.3f} "
             f"ratio {values['grad_ratio']:.3g}")
  return text


def train(config: ConfigDict, workdir: str, source: Any = None) -> TrainState:
  """Trains (or resumes) under ``workdir``: checkpoints in WORKDIR/checkpoints, metrics (WORKDIR/metrics.jsonl and
  TensorBoard events, `scott_jax.metric_writer`), sample PNGs in WORKDIR/samples. Returns the final train state.
  SIGTERM saves a checkpoint and returns early.

  The step runs on the mesh of ``config.mesh`` over all devices of all processes (`scott_jax.parallel`; the
  distributed runtime is started first when the environment asks for it): the train state and the frozen models
  are sharded by the config's rules, each process feeds its part of every global batch of train.batch_size.
  Metrics, logs, config.json and sample grids come from process 0; every process saves its checkpoint shards.
  A run that reaches train.num_steps writes WORKDIR/train_done.json (the last step) after its last checkpoint;
  a run that starts removes it first (`scott_jax.checkpoint.write_train_done`; the eval job stops on it).
  ``source``: the data instead of ``config.data`` (see `scott_jax.data.batches.make_data`), e.g. an in-memory
  `scott_jax.data.arrays.ArraySource`.
  A mesh that does not fit the devices raises `parallel.MeshError` (a ConfigError) before anything is loaded.
  """
  tc = config.train
  parallel.initialize_distributed(config.mesh)  # before any other JAX computation
  mesh = parallel.make_mesh(config.mesh)  # a config error: before anything is written, loaded or imported

  primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if primary:
    if ckpt_lib.remove_train_done(workdir):
      logging.info("Removed %s of an earlier finished run: training continues.", ckpt_lib.TRAIN_DONE)
    with open(os.path.join(workdir, "config.json"), "w") as fh:
      fh.write(config.to_json_best_effort(indent=2))
  t_start = time.time()
  models, frozen = student_lib.load_models(config)
  logging.info("Loaded the teacher from %s in %.1f s.", config.model.teacher_path, time.time() - t_start)
  data = batches_lib.make_data(config, models, source)
  fresh_data_state = data.get_state()
  batch_spec = batches_lib.global_batch_spec(next(data))  # GLOBAL shapes; read again after set_state below
  if "images" in batch_spec and batch_spec["images"].shape[1] % models.vae.config.downsample_factor:
    raise ValueError(f"image resolution {batch_spec['images'].shape[1]} is not a multiple of the VAE's "
                     f"downsampling factor {models.vae.config.downsample_factor}")

  abstract = abstract_state(config, models, frozen, batch_spec)
  state_sh, frozen_sh, batch_sh = parallel.shardings_for(config.mesh, mesh, abstract, frozen, batch_spec)
  sample_frozen = None  # multi-process sampling runs on process 0 from host copies (the state is global)
  if tc.sample_every and jax.process_count() > 1:
    needed = ("vae", "text_encoder", "text_encoder_2") + (("unet",) if config.model.student_lora_rank else ())
    sample_frozen = jax.device_get({k: frozen[k] for k in needed if k in frozen})  # LoRA: its base too
  frozen = parallel.put_tree(frozen, frozen_sh)
  checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), max_to_keep=tc.keep_checkpoints,
                                       save_every=tc.checkpoint_every)
  restored = checkpointer.restore_latest(parallel.with_shardings(abstract, state_sh))
  if restored is None:
    state = init_state(config, models, frozen, batch_spec, state_sh)
    data.set_state(fresh_data_state)
    if tc.save_initial:  # the untrained student as step 0 (a valid resume point: no batch consumed yet)
      checkpointer.save(0, state, data_state=batches_lib.data_state_to_save(data), force=True)
    logging.info("Starting from the teacher's weights (no checkpoint in %s).", checkpointer.directory)
  else:
    step, state, data_state = restored
    batches_lib.restore_data_state(data, data_state)
    if int(state.step) != step or data.batches != step:
      raise ValueError(f"checkpoint step {step} holds state step {int(state.step)} and data batch count "
                       f"{data.batches}")
    logging.info("Resumed from checkpoint step %d.", step)
  start = int(state.step)
  shape = dict(zip(mesh.axis_names, (int(n) for n in mesh.devices.shape), strict=True))
  state_local = parallel.bytes_per_device(abstract, state_sh)
  state_total = parallel.bytes_per_device(abstract, jax.tree.map(lambda _: parallel.replicated(mesh), abstract))
  logging.info("Mesh %s on %d devices, %d process(es); train state bytes per device %d of %d (%s of %s), frozen "
               "models %s per device; batch %d, %d per process.", shape, mesh.devices.size, jax.process_count(),
               state_local, state_total, _mib(state_local), _mib(state_total),
               _mib(parallel.bytes_per_device(frozen, frozen_sh)), tc.batch_size,
               parallel.local_batch_size(tc.batch_size))

  t_compile = time.time()
  compiled = compiled_step(config, models, mesh, abstract, frozen, batch_spec, (state_sh, frozen_sh, batch_sh))
  logging.info("Compiled the train step in %.1f s (%.1f s since start).", time.time() - t_compile,
               time.time() - t_start)
  sampler = student_lib.make_sampler(config, models) if tc.sample_every else None
  sample_ids = models.tokenize(list(tc.sample_prompts))
  writer = metric_writer.MetricWriter(workdir if primary else None)

  def after_step(step: int, state: TrainState) -> None:
    if sampler is None or not (step % tc.sample_every == 0 or step == tc.num_steps):
      return
    if sample_frozen is None:
      params, vae_frozen = state.student, frozen
    else:  # every process takes part in the gather; process 0 samples on its own devices
      params, vae_frozen = parallel.gather_tree(state.student), sample_frozen
    if primary:
      for k in tc.sample_steps:
        images = sampler(params, vae_frozen, sample_ids, k, jax.random.PRNGKey(tc.sample_seed))
        pipeline_lib.write_grid(os.path.join(workdir, "samples", f"step{step:07d}_{k}step.png"), images)

  state, stopped = loop.run(
    name="train", state=state, start=start, end=tc.num_steps, num_steps=tc.num_steps,
    step_fn=lambda s, _: compiled(s, parallel.make_global_batch(next(data), batch_sh), frozen),
    checkpointer=checkpointer, log_every=tc.log_every,
    metrics_path=os.path.join(workdir, loop.METRICS_FILE) if primary else None, batch_size=tc.batch_size,
    on_log=writer.write_scalars, after_step=after_step,
    data_state=lambda: batches_lib.data_state_to_save(data), describe=_describe)
  writer.close()
  checkpointer.close()
  data.close()
  if not stopped:
    logging.info("Training done: %d steps.", int(state.step))
    if primary:  # the checkpointer is closed: the last checkpoint is final
      ckpt_lib.write_train_done(workdir, int(state.step), num_steps=tc.num_steps)
  return state


def run_train(config: ConfigDict, workdir: str, source: Any = None) -> TrainState:
  """Mode ``train`` (`scott_jax.modes`): `train`; ``source`` as there (the digits stage passes its arrays)."""
  return train(config, workdir, source)
