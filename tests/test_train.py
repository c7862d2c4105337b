"""SCott training on a tiny SD-shaped model (random tiny U-Net / VAE / CLIP saved in diffusers format and loaded
through the real loaders): the step learns, the GAN plays, the frozen models stay out of the state, resume is
exact through `python -m scott_jax.main` with a SIGTERM in the middle, and every variant config runs a step.

Compiles are the cost here, so one persistent compilation cache is shared by this process and the subprocesses
(identical programs compile once); the straight and the interrupted runs go side by side.
"""

import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cc

from scott_jax import checkpoint as ckpt_lib
from scott_jax import config as config_lib
from scott_jax import config_files, loop, parallel
from scott_jax import step as step_lib
from scott_jax import student as student_lib
from scott_jax import train as train_lib
from scott_jax.data import batches as batches_lib
from scott_jax.testing.tiny_sd import write_tiny_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_scott.py")


TINY = config_files.load(CONFIG)


def _config(folder, arg=None):
  c = TINY.get_config(arg)
  c.model.teacher_path = str(folder)
  return config_lib.validate(c)


def _main_cmd(folder, workdir, *extra):
  return [sys.executable, "-m", "scott_jax.main", "--config", CONFIG, "--mode", "train", "--workdir", str(workdir),
          f"--config.model.teacher_path={folder}", *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The tiny pipeline folder and a persistent compilation cache shared by this process and the subprocesses
  (the `tiny` fixture compiles the step once; the `python -m scott_jax.main` runs load it from the cache)."""
  root = tmp_path_factory.mktemp("train")
  folder = write_tiny_pipeline(str(root / "tiny_sd"))
  cache = str(root / "jax_cache")
  saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                                "jax_persistent_cache_min_compile_time_secs",
                                                "jax_persistent_cache_min_entry_size_bytes")}
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax_cc.reset_cache()
  sub_env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  yield {"folder": folder, "root": root, "sub_env": sub_env}
  for k, v in saved.items():
    jax.config.update(k, v)
  jax_cc.reset_cache()


@pytest.fixture(scope="module")
def tiny(env):
  """Models, frozen params, an initial state, a fixed batch and the compiled step of the default tiny config."""
  config = _config(env["folder"])
  models, frozen = student_lib.load_models(config)
  source = batches_lib.make_source(config)
  batch = batches_lib.prepare_batch(source.batch(0), models)
  state = step_lib.init_state(config, models, frozen, batch)
  return config, models, frozen, state, batch, _compile_like_train(config, models, state, batch, frozen)


def _compile_like_train(config, models, state, batch, frozen):
  """The step compiled by `train_lib.compiled_step` as `train_lib.train` compiles it (sharded jit on the config's
  1-device mesh): the in-process runs below reuse it and the `python -m scott_jax.main` runs find it in the
  persistent compilation cache."""
  mesh = parallel.make_mesh(config.mesh)
  spec = batches_lib.global_batch_spec(batch)
  abstract = step_lib.abstract_state(config, models, frozen, spec)
  shardings = parallel.shardings_for(config.mesh, mesh, abstract, frozen, spec)
  return train_lib.compiled_step(config, models, mesh, abstract, frozen, spec, shardings)


def test_the_step_reads_only_its_program_sections(tiny):
  """`train.train` keeps one compiled step per program, keyed by the config's `train.PROGRAM_SECTIONS` (and the
  mesh and batch shapes): the step built from a config holding only those sections traces (any other section
  read would raise) to the compiled step's output shapes, and two configs that differ elsewhere share a key."""
  config, models, frozen, state, batch, compiled = tiny
  part = config_lib.ConfigDict({k: config[k] for k in train_lib.PROGRAM_SECTIONS})
  out = jax.eval_shape(step_lib.make_train_step(part, models), state, batch, frozen)
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(compiled.out_info)
  mesh = parallel.make_mesh(config.mesh)
  spec = batches_lib.global_batch_spec(batch)
  other = _config(config.model.teacher_path)
  other.seed, other.train.num_steps, other.data.source = 7, 99, "synthetic"
  assert train_lib._program_key(other, mesh, spec) == train_lib._program_key(config, mesh, spec)
  other.optim.disc_lr *= 2
  assert train_lib._program_key(other, mesh, spec) != train_lib._program_key(config, mesh, spec)


def _copy(tree):
  return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def test_student_starts_as_the_teacher(tiny):
  """Zero-initialised guidance projection: the student (any w) and the EMA equal the teacher at step 0; the
  only extra parameter is time_embedding/cond_proj (256 -> 32 here), and the state holds no frozen model."""
  config, models, frozen, state, batch, _ = tiny
  teacher = frozen["unet"]["params"]
  student = state.student["params"]
  np.testing.assert_array_equal(np.asarray(student["time_embedding"]["cond_proj"]["kernel"]),
                                np.zeros((256, 32), np.float32))
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.float32)
  t = jnp.asarray([999, 259], jnp.int32)
  text = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
  student_fn = student_lib.make_student_fn(models, 256)
  out = jax.jit(lambda p, w: student_fn(p, z, t, {"text": text, "w": w}))(state.student, jnp.asarray([3.0, 12.0]))
  ref = jax.jit(lambda p: models.teacher.apply(p, z, t, text))(frozen["unet"])
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
  assert jax.tree_util.tree_structure(state.ema) == jax.tree_util.tree_structure(state.student)
  assert set(student) - set(teacher) == set()
  # The state: student, EMA, LoRA + head, two optimizer states, step, key; no teacher/VAE/CLIP weights.
  n = lambda tree: sum(np.size(x) for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
  assert n(state.student) == n(frozen["unet"]) + 256 * 32
  assert set(state.disc) == {"lora", "head"} and n(state.disc) < 0.2 * n(frozen["unet"])
  # student, EMA, Adam mu and nu (disc: no EMA); per optimizer an Adam count and a schedule count;
  # the step and the (2,) key.
  assert n(state) == 4 * n(state.student) + 3 * n(state.disc) + 2 * 2 + 1 + 2


def test_fixed_batch_lowers_cd_loss_and_the_gan_plays(tiny):
  """12 steps on one batch with the step's randomness held fixed (same t_n, eps, w, solver noise): the CD loss
  falls and the learning rates follow the warmup. Then one step split into its two updates (the step reports
  the losses at its input parameters): the discriminator's update alone lowers L_D and widens the real-fake
  logit gap; the student's update alone raises D(fake) and with it L_D: the discriminator loss moves both
  ways. The frozen
  arrays are neither donated nor changed."""
  config, models, frozen, state, batch, step = tiny
  frozen_before = jax.tree_util.tree_map(np.array, frozen)
  state = _copy(state)
  key = np.asarray(state.key)  # a host copy: the state (key included) is donated to the step
  hist = []
  for _ in range(12):
    state, metrics = step(state.replace(key=key), batch, frozen)
    hist.append({k: float(v) for k, v in metrics.items()})
  assert all(np.isfinite(v) for h in hist for v in h.values())
  cd = [h["loss_cd"] for h in hist]
  assert np.mean(cd[-3:]) < 0.5 * np.mean(cd[:2]), cd
  lr = [(h["lr_student"], h["lr_disc"]) for h in hist[:4]]
  s_lr, d_lr = config.optim.student_lr, config.optim.disc_lr
  np.testing.assert_allclose(lr, [(0, 0), (s_lr / 2, d_lr / 2), (s_lr, d_lr), (s_lr, d_lr)], rtol=1e-6)
  assert int(state.step) == 12

  before = jax.tree_util.tree_map(np.array, state)
  fresh = lambda **kw: jax.tree_util.tree_map(jnp.asarray, before.replace(key=key, **kw))  # noqa: E731
  after, m00 = step(fresh(), batch, frozen)
  after = jax.tree_util.tree_map(np.array, after)
  _, m_d = step(fresh(disc=after.disc, opt_disc=after.opt_disc), batch, frozen)  # D updated, student not
  _, m_g = step(fresh(student=after.student, ema=after.ema, opt_student=after.opt_student), batch, frozen)
  f = lambda m, k: float(m[k])  # noqa: E731
  assert f(m_d, "loss_d") < f(m00, "loss_d"), (m00, m_d)
  assert f(m_d, "d_real") - f(m_d, "d_fake") > f(m00, "d_real") - f(m00, "d_fake"), (m00, m_d)  # gap opens
  assert f(m_g, "loss_d") > f(m00, "loss_d") and f(m_g, "d_fake") > f(m00, "d_fake"), (m00, m_g)
  assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(frozen))
  assert all(np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree_util.tree_leaves(frozen_before), jax.tree_util.tree_leaves(frozen), strict=True))


def _latent_batch(models, frozen, batch):
  z0, text, pooled = jax.jit(lambda b: student_lib.encode_batch(models, frozen, b, None))(batch)
  return {"latents": np.asarray(z0), "text_embeds": np.asarray(text), "pooled_text_embeds": np.asarray(pooled)}


def test_latent_batches_are_accepted(tiny):
  """The step takes precomputed latents + text embeddings (by key names) as well as images + token ids: same
  state and metrics structure (traced, not compiled); a batch with neither set of keys is a clear error."""
  config, models, frozen, state, batch, _ = tiny
  fn = step_lib.make_train_step(config, models)
  out_images = jax.eval_shape(fn, state, batch, frozen)
  out_latents = jax.eval_shape(fn, state, _latent_batch(models, frozen, batch), frozen)
  assert jax.tree_util.tree_structure(out_images) == jax.tree_util.tree_structure(out_latents)
  assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in
             zip(jax.tree_util.tree_leaves(out_images), jax.tree_util.tree_leaves(out_latents), strict=True))
  with pytest.raises(KeyError, match="images.*input_ids.*latents"):
    student_lib.encode_batch(models, frozen, {"images": batch["images"]}, None)


@pytest.mark.slow
def test_latent_batches_match_image_batches(tiny):
  """With the VAE mean encoding, a step on precomputed latents equals the step on images + token ids."""
  config, models, frozen, state, batch, _ = tiny
  cfg = config_lib.ConfigDict(config.to_dict())
  cfg.model.vae_sample = False
  fn = step_lib.make_train_step(cfg, models)
  run = jax.jit(lambda s, b: fn(s, b, frozen)[1]["loss"])
  a, b = float(run(state, batch)), float(run(state, _latent_batch(models, frozen, batch)))
  assert np.isfinite(a) and abs(a - b) <= 1e-5 * max(1.0, abs(a)), (a, b)


def test_non_finite_metrics_raise():
  with pytest.raises(FloatingPointError, match="step 7.*loss_cd"):
    loop.check_finite(7, {"loss": np.float32(1.0), "loss_cd": np.float32(np.nan)})


def test_missing_teacher_folder_is_a_clear_error(tmp_path):
  c = TINY.get_config()
  c.model.teacher_path = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="teacher_path=.*nope.*does not exist"):
    student_lib.load_models(c)
  c.model.teacher_path = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="missing"):
    student_lib.load_models(c)


def test_unet_options_reach_the_modules(env, tiny):
  """config.model.attention / attention_chunk_size / remat reach teacher, student and discriminator base, in
  load_models and in the plan's abstract models (one build_models); cudnn in float32 and unknown names are clear
  errors (the numerics: the slow test below)."""
  from scott_jax import plan

  config, models, frozen, state, batch, _ = tiny
  c = _config(env["folder"])
  c.model.update(dict(attention="chunked", attention_chunk_size=64, remat=True))
  opt_models, _ = student_lib.load_models(c)
  c.mesh.plan_architecture = "teacher"
  abstract_models, _ = plan.abstract_models(c)
  for m in (opt_models, abstract_models):
    for unet in (m.teacher, m.student, m.disc.unet):
      assert (unet.attention, unet.attention_chunk_size, unet.remat) == ("chunked", 64, True)
  assert (models.student.attention, models.student.remat) == ("xla", False)
  assert abstract_models.student == opt_models.student and abstract_models.disc.unet == opt_models.teacher
  c.model.attention = "cudnn"
  with pytest.raises(ValueError, match="attention='cudnn' needs config.model.dtype bfloat16"):
    student_lib.build_models(c, models.teacher.config, models.vae, models.text_encoder, None, 16)
  with pytest.raises(config_lib.ConfigError, match="model.attention"):
    c.model.attention = "flash"
    config_lib.validate(c)


@pytest.mark.slow
def test_chunked_attention_and_remat_keep_loss_and_gradients(env, tiny):
  """The student with config.model.attention = chunked (a 16x16 latent: 256 query positions in 4 blocks of 64)
  and remat gives the plain student's loss and parameter gradients."""
  config, models, frozen, state, batch, _ = tiny
  c = _config(env["folder"])
  c.model.update(dict(attention="chunked", attention_chunk_size=64, remat=True))
  opt_models, _ = student_lib.load_models(c)
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.float32)
  cond = {"text": jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32), "w": jnp.asarray([3.0, 9.0])}
  t = jnp.asarray([999, 499], jnp.int32)

  def loss_and_grad(m):
    fn = student_lib.make_student_fn(m, config.consistency.guidance_embed_dim)
    return jax.jit(jax.value_and_grad(lambda p: jnp.mean(fn(p, z, t, cond) ** 2)))(state.student)

  (l0, g0), (l1, g1) = loss_and_grad(models), loss_and_grad(opt_models)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def _write_folder(path, images, captions):
  from PIL import Image

  os.makedirs(path)
  for i, (img, cap) in enumerate(zip(images, captions, strict=True)):
    Image.fromarray(img).save(os.path.join(path, f"{i:03d}.png"))
    with open(os.path.join(path, f"{i:03d}.txt"), "w") as fh:
      fh.write(cap)


def _folder_config(env, tmp_path, num_steps, source="folder"):
  c = _config(env["folder"])
  c.data.update(dict(source=source, path=str(tmp_path / "photos"), num_threads=2))
  c.train.update(dict(num_steps=num_steps, checkpoint_every=100))
  return c


def _pipeline_state(config, models, num_batches):
  """The state of a fresh data pipeline of ``config.data`` after ``num_batches`` batches (and its first batch)."""
  from scott_jax.data import loader as data_loader

  p = data_loader.make_loader(config.data, batch_size=config.train.batch_size, seed=config.seed,
                                  tokenizer=models.tokenizer, max_length=models.max_length)
  batches = [next(p) for _ in range(num_batches)]
  state = p.get_state()
  p.close()
  return state, batches[0]


def test_train_reads_the_grain_pipeline_and_in_memory_sources(env, tiny, tmp_path):
  """`train` on data.source = folder reads scott_jax.data.make_loader (grain): after 2 steps the checkpointed
  data state is a fresh pipeline's own state after 2 batches. ``train(..., source=ArraySource)`` trains on the
  given in-memory source instead of config.data (its state is checkpointed). Both run the fixture's program."""
  from scott_jax.data import arrays

  config, models, frozen, _, batch, _ = tiny
  images, captions = arrays.synthetic(6, 32, seed=3)
  _write_folder(tmp_path / "photos", images, captions)
  abstract = step_lib.abstract_state(config, models, frozen, batch)
  train_lib.train(_folder_config(env, tmp_path, 2), str(tmp_path / "folder"))
  state, data_state = _final_state(tmp_path / "folder", abstract, 2)
  expected, first = _pipeline_state(_folder_config(env, tmp_path, 2), models, 2)
  assert data_state == expected and data_state["source"] == "folder" and data_state["batches"] == 2
  assert first["images"].shape == (2, 32, 32, 3) and first["input_ids"].dtype == np.int32
  assert int(state.step) == 2
  assert ckpt_lib.read_train_done(str(tmp_path / "folder"))["step"] == 2  # the finished run says so

  source = arrays.ArraySource(images[:5], captions[:5], batch_size=2, seed=11)
  train_lib.train(_folder_config(env, tmp_path, 1, source="synthetic"), str(tmp_path / "array"), source=source)
  _, data_state = _final_state(tmp_path / "array", abstract, 1)
  assert data_state == {"step": 1, "seed": 11, "num_examples": 5, "batch_size": 2}


@pytest.mark.parametrize("layout", ["captions.jsonl", "captions.csv", "metadata.jsonl", "metadata.csv",
                                    "train/metadata.jsonl", "txt"])
def test_each_captions_layout_trains_a_step(env, tiny, tmp_path, layout):
  """A folder in each captions layout (ours, Hugging Face imagefolder's, .txt) with data.captions_file empty:
  the loop's data (`make_data`, the grain pipeline) gives a batch of the written captions' token ids, and the
  train step (the fixture's compiled program) takes it: finite metrics, step 1."""
  from test_data import write_caption_layout

  from scott_jax.data import arrays
  from scott_jax.models.clip_text import tokenize

  config, models, frozen, state, _, step = tiny
  images, captions = arrays.synthetic(4, 32, seed=5)
  rows = write_caption_layout(tmp_path / "photos", layout, images, captions)
  c = _folder_config(env, tmp_path, 1)
  c.data.shuffle = False
  data = batches_lib.make_data(c, models)
  batch = next(data)
  data.close()
  np.testing.assert_array_equal(batch["input_ids"], tokenize(models.tokenizer, [cap for _, cap in rows[:2]],
                                                             models.max_length))
  new_state, metrics = step(_copy(state), batch, frozen)
  assert int(new_state.step) == 1 and all(np.isfinite(float(v)) for v in metrics.values())


def test_a_continued_run_removes_train_done_first(env, tmp_path, monkeypatch):
  """A run that starts under the workdir of a finished one removes its train_done.json before it loads
  anything (an eval job watching the workdir must not stop on the old one)."""
  (tmp_path / ckpt_lib.TRAIN_DONE).write_text('{"step": 6}')
  seen = []

  def load_models(config):
    seen.append((tmp_path / ckpt_lib.TRAIN_DONE).exists())
    raise KeyboardInterrupt  # stop here: the removal has happened or not

  monkeypatch.setattr(student_lib, "load_models", load_models)
  with pytest.raises(KeyboardInterrupt):
    train_lib.train(_config(env["folder"]), str(tmp_path))
  assert seen == [False] and ckpt_lib.read_train_done(str(tmp_path)) is None


@pytest.mark.slow
def test_resume_through_the_grain_pipeline_is_exact(env, tiny, tmp_path):
  """data.source = folder: 2 steps, then a resume to 3 (a second `train` call) equals 3 straight steps bit for
  bit, and both end with the pipeline's own state after 3 batches."""
  from scott_jax.data import arrays

  config, models, frozen, _, batch, _ = tiny
  _write_folder(tmp_path / "photos", *arrays.synthetic(6, 32, seed=3))
  train_lib.train(_folder_config(env, tmp_path, 2), str(tmp_path / "resumed"))
  train_lib.train(_folder_config(env, tmp_path, 3), str(tmp_path / "resumed"))
  train_lib.train(_folder_config(env, tmp_path, 3), str(tmp_path / "straight"))
  abstract = step_lib.abstract_state(config, models, frozen, batch)
  a, data_a = _final_state(tmp_path / "straight", abstract, 3)
  b, data_b = _final_state(tmp_path / "resumed", abstract, 3)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert data_a == data_b == _pipeline_state(_folder_config(env, tmp_path, 3), models, 3)[0]


def _final_state(workdir, abstract, step):
  with ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), max_to_keep=None) as ckpt:
    return ckpt.restore(step, abstract)


def test_resume_is_exact_after_sigterm(env, tiny, caplog):
  """6 steps straight (`train.train` in this process) == 3 steps through `python -m scott_jax.main --mode train`,
  SIGTERM (checkpoint and clean exit), resumed to 6 by `train.train`: bit for bit on CPU. Also checks the loop's
  outputs: metrics, progress lines, TensorBoard events."""
  config, models, frozen, _, batch, _ = tiny  # the fixture compiled the step: the runs below load it
  straight = env["root"] / "straight"
  killed = env["root"] / "killed"
  log_path = env["root"] / "killed.log"
  with open(log_path, "w") as log:
    victim = subprocess.Popen(_main_cmd(env["folder"], killed), cwd=ROOT, env=env["sub_env"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    for line in victim.stdout:
      log.write(line)
      if "step 3/6" in line:
        victim.send_signal(signal.SIGTERM)
        break
      assert time.time() < deadline
    for line in victim.stdout:
      log.write(line)
    victim.wait(timeout=120)
  text = open(log_path).read()
  assert victim.returncode == 0, text[-3000:]
  stopped = [int(s) for s in re.findall(r"Stopped by signal after step (\d+)", text)]
  assert len(stopped) == 1 and 3 <= stopped[0] < 6, text[-3000:]
  with ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(killed), max_to_keep=None) as ckpt:
    assert ckpt.latest_step() == stopped[0]
  # The reference, 6 steps straight, and the resumed half: `train.train` in this process, as the CLI's mode train
  # calls it (main's dispatch is tested by the killed half), on the fixture's compiled step.
  train_lib.train(_config(env["folder"]), str(straight))
  with caplog.at_level(logging.INFO, logger="absl"):
    train_lib.train(_config(env["folder"]), str(killed))
  resumed_text = "\n".join(r.getMessage() for r in caplog.records)
  assert f"Resumed from checkpoint step {stopped[0]}" in resumed_text
  assert "step 6/6" in resumed_text and "ETA" in text and "images/s" in text
  abstract = step_lib.abstract_state(config, models, frozen, batch)
  a, data_a = _final_state(straight, abstract, 6)
  b, data_b = _final_state(killed, abstract, 6)
  assert data_a == data_b == {"step": 6, "seed": 0, "num_examples": 8, "batch_size": 2}
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(a.step) == 6
  # Moved away from the teacher (training happened), clu wrote TensorBoard events.
  assert glob.glob(str(straight / "events.out.tfevents.*"))
  # metrics.jsonl: one entry per logged step (log_every 1), the discriminator's diagnostics included; the resumed
  # run dropped the entries past its checkpoint and logged them again, so both runs list steps 1..6 once.
  for run in (straight, killed):
    entries = [json.loads(ln) for ln in open(run / loop.METRICS_FILE)]
    assert [e["step"] for e in entries] == [1, 2, 3, 4, 5, 6], run
    for e in entries:
      assert {"disc_accuracy", "grad_ratio", "lambda_eff", "loss_d", "loss_cd"} <= set(e)
      assert 0.0 <= e["disc_accuracy"] <= 1.0 and e["grad_ratio"] >= 0.0
  assert "acc " in text and "ratio " in text  # the progress line shows them too


def test_sample_grids_are_written(tiny, tmp_path):
  """The loop's sampler (scott_jax.pipeline's student sampler on the run's models): 1 and 2 steps on the skip-24
  training grid, written as one PNG grid per step count; deterministic given the key, and the steps differ."""
  from PIL import Image

  from scott_jax import pipeline as pipeline_lib
  from scott_jax.models.clip_text import tokenize

  config, models, frozen, state, _, _ = tiny
  assert student_lib.student_timesteps(config, 2) == (999, 495)  # consistency.timestep_rule "grid", skip 24
  assert pipeline_lib.make_sampler(student_lib.student_pipeline(config, models), steps=2,
                                   height=32).timesteps.tolist() == [999, 495]
  sampler = student_lib.make_sampler(config, models)
  ids = tokenize(models.tokenizer, list(config.train.sample_prompts), models.max_length)
  out = {}
  for k in (1, 2):
    out[k] = sampler(state.student, frozen, ids, k, jax.random.PRNGKey(0))
    pipeline_lib.write_grid(str(tmp_path / f"{k}step.png"), out[k])
    img = np.asarray(Image.open(tmp_path / f"{k}step.png"))
    assert img.shape == (32, 64, 3) and img.dtype == np.uint8 and img.std() > 0  # two 32x32 samples in a row
    np.testing.assert_array_equal(img[:, :32], out[k][0])
  np.testing.assert_array_equal(sampler(state.student, frozen, ids, 2, jax.random.PRNGKey(0)), out[2])
  assert not np.array_equal(out[1], out[2])


@pytest.mark.parametrize("embed", [0, 256])
def test_lora_student_state(env, embed):
  """model.student_lora_rank >= 1: the state holds a rank-4 overlay (+ the zero guidance projection when the
  student has one), far smaller than the U-Net; abstract_state matches init_state leaf for leaf (checkpoint
  restore); the merged student equals the teacher at step 0 (B = 0, cond_proj = 0) for any w."""
  import flax.traverse_util as traverse_util

  from scott_jax.models import lora

  config = _config(env["folder"], "student=lora,gan=off")
  config.consistency.guidance_embed_dim = embed
  models, frozen = student_lib.load_models(config)
  assert models.student.config.time_cond_proj_dim == (embed or None)
  source = batches_lib.make_source(config)
  batch = batches_lib.prepare_batch(source.batch(0), models)
  state = step_lib.init_state(config, models, frozen, batch)
  assert student_lib.is_lora_student(state.student) and set(state.student) == {"lora", "full"}
  n = lora.count_params
  assert n(state.student["full"]) == embed * 32 and n(state.student["lora"]) < 0.2 * n(frozen["unet"])
  assert lora.select_targets(frozen["unet"], tuple(config.model.student_lora_targets)) == sorted(
    "/".join(p[:-1]) for p in traverse_util.flatten_dict(state.student["lora"]) if p[-1] == "lora_A")
  abstract = step_lib.abstract_state(config, models, frozen, batch)
  assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(state)
  assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in
             zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(state), strict=True))
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.float32)
  t = jnp.asarray([999, 259], jnp.int32)
  text = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
  student_fn = student_lib.make_student_fn(models, embed, frozen["unet"], config.model.student_lora_alpha)
  out = jax.jit(lambda s, w: student_fn(s, z, t, {"text": text, "w": w}))(state.student, jnp.asarray([3.0, 12.0]))
  ref = jax.jit(lambda p: models.teacher.apply(p, z, t, text))(frozen["unet"])
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_lora_student_factorised_matches_merged(env):
  """model.student_lora_apply "factorised" (`lora.factorised`, per layer) and "merged" (`lora.merge`) are the same
  LoRA student in float32: output and gradients wrt the state (overlay and the full cond_proj) and the input z,
  with every state leaf perturbed (B != 0, as after training); the train step's default is factorised."""
  config = _config(env["folder"], "student=lora,gan=off")
  config.consistency.guidance_embed_dim = 256  # a "full" part (cond_proj) beside the overlay
  assert config.model.student_lora_apply == "factorised"
  models, frozen = student_lib.load_models(config)
  source = batches_lib.make_source(config)
  state = step_lib.init_state(config, models, frozen, batches_lib.prepare_batch(source.batch(0), models))
  leaves, tree = jax.tree_util.tree_flatten(state.student)
  keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
  student = jax.tree_util.tree_unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                                for x, k in zip(leaves, keys, strict=True)])
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.float32)
  cond = {"text": jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32), "w": jnp.asarray([3.0, 12.0])}
  t = jnp.asarray([999, 259], jnp.int32)

  def run(apply):
    fn = student_lib.make_student_fn(models, config.consistency.guidance_embed_dim, frozen["unet"],
                                     config.model.student_lora_alpha, apply)
    def loss(s, z):
      out = fn(s, z, t, cond)
      return jnp.sum(jnp.tanh(out)), out
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(student, z)

  (g_fact, gz_fact), out_fact = run("factorised")
  (g_merged, gz_merged), out_merged = run("merged")
  np.testing.assert_allclose(np.asarray(out_fact), np.asarray(out_merged), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gz_fact), np.asarray(gz_merged), rtol=1e-5, atol=1e-5)
  for path, gm, gf in zip(jax.tree_util.tree_leaves_with_path(g_merged), jax.tree_util.tree_leaves(g_merged),
                          jax.tree_util.tree_leaves(g_fact), strict=True):
    scale = float(jnp.abs(gm).max()) + 1e-12
    np.testing.assert_allclose(np.asarray(gf) / scale, np.asarray(gm) / scale, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path[0]))
  with pytest.raises(ValueError, match="unknown LoRA application 'fused'"):
    student_lib.make_student_fn(models, 0, frozen["unet"], 1.0, "fused")


VARIANTS = [("sd15_scott", a) for a in ("eta=0.2", "h=1", "gan=off", "teacher=lcm", "disc=full", "disc=no_cond",
                                        "disc_time=paper", "disc_time=renoise", "student=lora")] + [("sd15_lcm", "lcm")]


@pytest.mark.slow
@pytest.mark.parametrize("name,arg", VARIANTS)
def test_every_variant_runs_one_step(env, name, arg):
  config = _config(env["folder"], arg)
  models, frozen = student_lib.load_models(config)
  source = batches_lib.make_source(config)
  batch = batches_lib.prepare_batch(source.batch(0), models)
  state = step_lib.init_state(config, models, frozen, batch)
  state, metrics = jax.jit(step_lib.make_train_step(config, models), donate_argnums=(0,))(state, batch, frozen)
  assert int(state.step) == 1 and all(np.isfinite(float(v)) for v in metrics.values())
  assert ("loss_d" in metrics) == config.gan.enabled


def _perturbed_disc(state, seed=0, scale=0.05):
  """The state with every discriminator leaf moved by N(0, scale^2) noise (LoRA B and the zero head too), so the
  discriminator's input gradient is not zero as it is at its zero-initialised head."""
  leaves, tree = jax.tree_util.tree_flatten(state.disc)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  moved = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
  return state.replace(disc=jax.tree_util.tree_unflatten(tree, moved))


def _two_pass_gradients(config, models, state, batch, frozen, k=1):
  """The reference: the SCott gradients as two separate passes (the step before the fused discriminator pass):
  jax.value_and_grad of L_CD + lambda L_G(D(x_fake)) for the student, then of L_D on the concatenated [real;
  sg(fake)] batch for the discriminator, written with the public pieces of `losses` and `discriminator`; the GAN
  terms on the strided slice [::k] of the batch (gan.example_stride)."""
  from scott_jax import losses, solvers

  c = config
  key, k_vae, k_w, k_cd = jax.random.split(state.key, 4)
  z0, text, pooled = student_lib.encode_batch(models, frozen, batch, k_vae if c.model.vae_sample else None)
  w = jax.random.uniform(k_w, (z0.shape[0],), jnp.float32, c.consistency.w_min, c.consistency.w_max)
  cond = {"text": text, "w": w}
  uncond = jnp.broadcast_to(frozen["uncond_text"], text.shape)
  cd_loss = losses.make_cd_loss(
    student_lib.make_student_fn(models, c.consistency.guidance_embed_dim, frozen["unet"], c.model.student_lora_alpha),
    student_lib.make_teacher_eps_fn(models, frozen["unet"], uncond), models.schedule, solver=c.solver.name,
    solver_kwargs=solvers.solver_kwargs(c.solver.name, c.solver), skip=c.solver.skip, h=c.solver.h,
    grid=c.consistency.grid, num_ddim_timesteps=c.consistency.num_ddim_timesteps)

  def logits(d, x, t, tx, pl):
    t, tx, pl = models.disc.condition(t, tx, pl, frozen["uncond_text"], frozen["uncond_pooled"])
    return models.disc.apply(d, frozen["unet"], x, t, tx, pl)

  every = slice(None, None, k)
  text_k, pooled_k = text[every], pooled[every]

  def student_objective(params):
    loss_cd, aux = cd_loss(params, state.ema, z0, cond, k_cd)
    xr, tr, xf, tf = losses.disc_inputs(z0[every], aux["x_fake"][every], aux["t_n"][every], aux["eps"][every],
                                        models.schedule, c.gan.disc_time)
    loss_g = losses.hinge_g_loss(logits(state.disc, xf, tf, text_k, pooled_k))
    return losses.total_student_loss(loss_cd, loss_g, c.gan.lambda_adv), (loss_cd, loss_g, xr, tr, xf, tf)

  (_, (loss_cd, loss_g, xr, tr, xf, tf)), g_student = jax.value_and_grad(student_objective, has_aux=True)(
    state.student)
  x = jax.lax.stop_gradient(jnp.concatenate([xr, xf]))

  def disc_objective(d):
    real, fake = jnp.split(logits(d, x, jnp.concatenate([tr, tf]), jnp.concatenate([text_k, text_k]),
                                  jnp.concatenate([pooled_k, pooled_k])), 2)
    return losses.hinge_d_loss(real, fake)

  loss_d, g_disc = jax.value_and_grad(disc_objective)(state.disc)
  return g_student, g_disc, {"loss_cd": loss_cd, "loss_g": loss_g, "loss_d": loss_d}


def test_fused_discriminator_pass_weighting_and_start_step(tiny):
  """One discriminator forward per side, its pullback serving both L_D and L_G (`make_gradients`), gives the
  losses and both gradients of the two-pass reference (1e-5) at the paper's fixed lambda. gan.weighting=adaptive
  scales L_G's output gradient to lambda_adv times the consistency gradient (grad_ratio == lambda_adv, the rule's
  closed form); before gan.start_step lambda_eff is 0 and the student's gradient is the no-GAN gradient. With
  gan.example_stride 2 the GAN terms are those of the reference on the strided slice [::2] (1e-5)."""
  config, models, frozen, state, batch, _ = tiny
  state = _perturbed_disc(state)

  def with_gan(**gan):
    cfg = config_lib.ConfigDict(config.to_dict())
    cfg.gan.update(gan)
    return cfg

  nogan = with_gan(enabled=False)
  nogan_models = student_lib.build_models(nogan, models.teacher.config, models.vae, models.text_encoder,
                                          models.tokenizer, models.max_length)
  variants = {"fixed": (config, models), "adaptive": (with_gan(weighting="adaptive", max_weight=1e6), models),
              "off": (with_gan(start_step=1), models), "nogan": (nogan, nogan_models),  # the state is at step 0
              "stride2": (with_gan(example_stride=2), models)}

  def everything(s):  # one program: XLA shares the variants' common work (teacher target, student forward)
    out = {name: step_lib.make_gradients(c, m)(s, batch, frozen) for name, (c, m) in variants.items()}
    return out, [_two_pass_gradients(config, models, s, batch, frozen, k) for k in (1, 2)]

  out, refs = jax.jit(everything)(state)
  for name, (r_s, r_d, ref) in zip(("fixed", "stride2"), refs, strict=True):
    g_s, g_d, metrics, _ = out[name]
    for k in ("loss_cd", "loss_g", "loss_d"):
      np.testing.assert_allclose(float(metrics[k]), float(ref[k]), rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")
    assert float(metrics["grad_ratio"]) > 0.0  # the GAN gradient reaches the student
    for got, want in ((g_s, r_s), (g_d, r_d)):
      flat_want = jax.tree_util.tree_leaves(want)
      scale = max(float(jnp.max(jnp.abs(x))) for x in flat_want)
      for a, b in zip(jax.tree_util.tree_leaves(got), flat_want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * scale, err_msg=name)
  assert abs(float(out["stride2"][2]["loss_d"]) - float(refs[0][2]["loss_d"])) > 1e-6  # half the batch differs
  m_fixed = out["fixed"][2]

  m_adapt = out["adaptive"][2]
  lam = config.gan.lambda_adv
  np.testing.assert_allclose(float(m_adapt["grad_ratio"]), lam, rtol=1e-4)
  # lambda_eff ||g_adv|| = lambda ||g_cd||, and the fixed run's grad_ratio is lambda ||g_adv|| / ||g_cd||
  np.testing.assert_allclose(float(m_adapt["lambda_eff"]) * float(m_fixed["grad_ratio"]) / lam, lam, rtol=1e-4)

  g_off, _, m_off, _ = out["off"]
  assert float(m_off["lambda_eff"]) == 0.0 and float(m_off["grad_ratio"]) == 0.0
  assert float(m_off["loss"]) == float(m_off["loss_cd"])
  g_cd = out["nogan"][0]
  for a, b in zip(jax.tree_util.tree_leaves(g_off), jax.tree_util.tree_leaves(g_cd), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


@pytest.mark.slow  # its own compile of the accumulated step (~90 CPU-s); the default suite is at its 12 min limit
def test_gradient_accumulation_averages_the_microbatches(tiny):
  """optim.grad_accum_steps 2: the step's new state and metrics equal one update (`step.make_update`) with the mean
  of `make_gradients` on the two microbatches [0::2] and [1::2] (written with strided slices), each run with the
  state's key folded with its index (1e-5); a batch it does not divide is a one-line error."""
  config, models, frozen, state, batch, _ = tiny
  accum = config_lib.ConfigDict(config.to_dict())
  accum.optim.grad_accum_steps = 2

  def both(s):
    grads = step_lib.make_gradients(config, models)
    outs = [grads(s.replace(key=jax.random.fold_in(s.key, i)), jax.tree_util.tree_map(lambda a, i=i: a[i::2], batch),
                  frozen)[:3] for i in range(2)]
    mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, *outs)
    want = step_lib.make_update(config, models)(s, *mean, jax.random.split(s.key, 4)[0])
    return step_lib.make_train_step(accum, models)(s, batch, frozen), want

  got, want = jax.jit(both)(_perturbed_disc(state))
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  accum.optim.grad_accum_steps = 3
  with pytest.raises(ValueError, match="grad_accum_steps=3 must divide the batch of 2"):
    jax.eval_shape(step_lib.make_train_step(accum, models), state, batch, frozen)


@pytest.mark.parametrize("key,value,match", [
  ("gan.weighting", "vqgan", "allowed: 'fixed', 'adaptive'"),
  ("gan.max_weight", 0.0, "a number > 0"),
  ("gan.start_step", -1, "an integer >= 0"),
  ("gan.head_init", "xavier", "allowed: 'zero', 'normal'"),
  ("gan.example_stride", 0, "an integer >= 1"),
])
def test_gan_weighting_fields_are_validated(key, value, match):
  c = TINY.get_config()
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=f"'{key}' has value .*{match}"):
    config_lib.validate(c)


def _gaussian(config):
  cfg = config_lib.ConfigDict(config.to_dict())
  cfg.consistency.student_output = "gaussian"
  return config_lib.validate(cfg)


@pytest.mark.slow
def test_gaussian_student_starts_as_the_teacher_and_its_gradient_flows_through_the_draw(env, tiny):
  """consistency.student_output = gaussian: the student's conv_out has twice the teacher's channels (mean half =
  the teacher's, log-variance half: zero kernel, bias consistency.logvar_init), so its mean output equals the
  teacher's; the state's shapes match abstract_state and the mesh rules shard it. `make_gradients` (one vjp of the
  student giving (mean, logvar), the KL, the discriminator on a reparameterised draw) gives the losses and both
  gradients of a two-pass reference written with jax.value_and_grad of KL + lambda L_G(D(mean + std * noise)), and
  the GAN's gradient reaches the log-variance half (the draw's pullback)."""
  import flax.traverse_util as traverse_util

  from scott_jax import losses

  config0, _, frozen, _, batch, _ = tiny
  config = _gaussian(config0)
  models, _ = student_lib.load_models(config)
  assert models.student.config.out_channels == 2 * models.teacher.config.out_channels == 8
  state = step_lib.init_state(config, models, frozen, batch)
  teacher_out = {k: np.asarray(v) for k, v in frozen["unet"]["params"]["conv_out"].items()}
  conv = {k: np.asarray(v) for k, v in state.student["params"]["conv_out"].items()}
  np.testing.assert_array_equal(conv["kernel"][..., :4], teacher_out["kernel"])
  np.testing.assert_array_equal(conv["bias"][:4], teacher_out["bias"])
  assert np.all(conv["kernel"][..., 4:] == 0) and np.all(conv["bias"][4:] == config.consistency.logvar_init)
  abstract = step_lib.abstract_state(config, models, frozen, batch)
  assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in
             zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(state), strict=True))
  mesh = parallel.make_mesh(config.mesh)
  state_sh, _, _ = parallel.shardings_for(config.mesh, mesh, abstract, frozen, batches_lib.global_batch_spec(batch))
  assert traverse_util.flatten_dict(state_sh.student)[("params", "conv_out", "kernel")] is not None
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.float32)
  t = jnp.asarray([999, 259], jnp.int32)
  text = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
  student_fn = student_lib.make_student_fn(models, 256)
  out = jax.jit(lambda p: student_fn(p, z, t, {"text": text, "w": jnp.asarray([3., 9.])}))(state.student)
  ref = jax.jit(lambda p: models.teacher.apply(p, z, t, text))(frozen["unet"])
  np.testing.assert_allclose(np.asarray(out[..., :4]), np.asarray(ref), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out[..., 4:]), config.consistency.logvar_init, atol=1e-6)

  state = _perturbed_disc(state)
  leaves, tree = jax.tree_util.tree_flatten(state.student)  # a student whose variance half is not constant
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  state = state.replace(student=jax.tree_util.tree_unflatten(tree, [
    x + 0.01 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]))
  g_s, g_d, m, _ = jax.jit(lambda s: step_lib.make_gradients(config, models)(s, batch, frozen))(state)

  def reference(s):
    c = config
    _, k_vae, k_w, k_cd = jax.random.split(s.key, 4)
    z0, text, pooled = student_lib.encode_batch(models, frozen, batch, k_vae if c.model.vae_sample else None)
    w = jax.random.uniform(k_w, (z0.shape[0],), jnp.float32, c.consistency.w_min, c.consistency.w_max)
    cond = {"text": text, "w": w}
    uncond = jnp.broadcast_to(frozen["uncond_text"], text.shape)
    f = losses.make_gaussian_consistency_fn(
      student_lib.make_student_fn(models, c.consistency.guidance_embed_dim, frozen["unet"]), models.schedule)
    from scott_jax import solvers
    problem = losses.make_cd_target(f, student_lib.make_teacher_eps_fn(models, frozen["unet"], uncond),
                                    models.schedule, solver=c.solver.name,
                                    solver_kwargs=solvers.solver_kwargs(c.solver.name, c.solver), skip=c.solver.skip,
                                    h=c.solver.h, grid=c.consistency.grid)(s.ema, z0, cond, k_cd)
    noise = jax.random.normal(jax.random.fold_in(k_cd, 3), z0.shape, jnp.float32)

    def logits(d, x, t):
      tt, tx, pl = models.disc.condition(t, text, pooled, frozen["uncond_text"], frozen["uncond_pooled"])
      return models.disc.apply(d, frozen["unet"], x, tt, tx, pl)

    def student_objective(params):
      (mean, logvar), _ = f(params, problem["z_tn"], problem["t_n"], cond)
      kl = jnp.mean(losses.gaussian_kl(*problem["target"], mean, logvar, c.consistency.var_floor))
      x = mean + jnp.exp(0.5 * logvar) * noise
      return kl + c.gan.lambda_adv * losses.hinge_g_loss(logits(s.disc, x, problem["t_n"])), (kl, x)

    (_, (kl, x)), g_student = jax.value_and_grad(student_objective, has_aux=True)(s.student)
    x = jax.lax.stop_gradient(x)
    g_disc = jax.grad(lambda d: losses.hinge_d_loss(logits(d, z0, problem["t_n"]), logits(d, x, problem["t_n"])))(
      s.disc)
    return g_student, g_disc, kl

  r_s, r_d, kl = jax.jit(reference)(state)
  np.testing.assert_allclose(float(m["loss_cd"]), float(kl), rtol=1e-5)
  assert float(m["grad_ratio"]) > 0.0 and float(m["std_student"]) > 0.0
  for got, want in ((g_s, r_s), (g_d, r_d)):
    flat_want = jax.tree_util.tree_leaves(want)
    scale = max(float(jnp.max(jnp.abs(x))) for x in flat_want)
    for a, b in zip(jax.tree_util.tree_leaves(got), flat_want, strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)
  nogan = config_lib.ConfigDict(config.to_dict())
  nogan.gan.enabled = False
  nogan_models = student_lib.build_models(nogan, models.teacher.config, models.vae, models.text_encoder,
                                        models.tokenizer, models.max_length)
  g_cd, _, _, _ = jax.jit(lambda s: step_lib.make_gradients(nogan, nogan_models)(s, batch, frozen))(state)
  # The KL's gradient scales as 1 / var, so at the paper's fixed lambda the GAN's share is tiny here: the adaptive
  # weighting puts it at lambda_adv times the KL's (norms over both halves), and the log-variance half moves.
  adaptive = config_lib.ConfigDict(config.to_dict())
  adaptive.gan.update(dict(weighting="adaptive", max_weight=1e9))
  g_a, _, m_a, _ = jax.jit(lambda s: step_lib.make_gradients(adaptive, models)(s, batch, frozen))(state)
  np.testing.assert_allclose(float(m_a["grad_ratio"]), config.gan.lambda_adv, rtol=1e-3)
  logvar_half = lambda g: np.asarray(g["params"]["conv_out"]["kernel"][..., 4:])  # noqa: E731
  assert np.abs(logvar_half(g_a) - logvar_half(g_cd)).max() > 1e-3 * np.abs(logvar_half(g_cd)).max()


@pytest.mark.slow
def test_gaussian_lora_student(env):
  """A Gaussian LoRA student: the doubled conv_out is trained in full beside cond_proj (never in the overlay),
  abstract_state matches init_state, the merged student's mean half equals the teacher, and a step runs."""
  config = _gaussian(_config(env["folder"], "student=lora"))
  models, frozen = student_lib.load_models(config)
  batch = batches_lib.prepare_batch(batches_lib.make_source(config).batch(0), models)
  state = step_lib.init_state(config, models, frozen, batch)
  full = state.student["full"]["params"]  # :student=lora has no guidance embedding (guidance_embed_dim 0)
  assert set(full) == {"conv_out"} and full["conv_out"]["kernel"].shape == (3, 3, 32, 8)
  assert not any("conv_out" in k for k in str(jax.tree_util.tree_structure(state.student["lora"])).split("'"))
  abstract = step_lib.abstract_state(config, models, frozen, batch)
  assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in
             zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(state), strict=True))
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.float32)
  t = jnp.asarray([999, 259], jnp.int32)
  text = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
  student_fn = student_lib.make_student_fn(models, config.consistency.guidance_embed_dim, frozen["unet"],
                                         config.model.student_lora_alpha)
  out = jax.jit(lambda s: student_fn(s, z, t, {"text": text, "w": jnp.asarray([3.0, 12.0])}))(state.student)
  ref = jax.jit(lambda p: models.teacher.apply(p, z, t, text))(frozen["unet"])
  np.testing.assert_allclose(np.asarray(out[..., :4]), np.asarray(ref), atol=1e-5, rtol=1e-5)
  state, metrics = jax.jit(step_lib.make_train_step(config, models), donate_argnums=(0,))(state, batch, frozen)
  assert int(state.step) == 1 and all(np.isfinite(float(v)) for v in metrics.values())
