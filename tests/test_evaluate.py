"""The separate eval job on checkpoints with the train-state layout (written as training writes them): a row per
(checkpoint, step count, params) whose FID / Coverage / CLIP score equal independent recomputations (our FID
and Coverage functions on the saved PNGs; transformers' torch CLIPModel for the CLIP score), resume without
redoing rows, an incomplete (orbax tmp) checkpoint skipped until it is renamed, clear errors; fid_stats."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from test_export import tiny_config, write_checkpoints

from scott_jax import checkpoint, evaluate, export
from scott_jax import checkpoint as ckpt_lib
from scott_jax import config as config_lib
from scott_jax.metrics import coverage as coverage_lib
from scott_jax.metrics import fid
from scott_jax.testing.tiny_sd import write_tiny_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROMPTS = 8


def write_tiny_clip(folder: str, tokenizer_folder: str) -> str:
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
    text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=16, eos_token_id=49407),
    vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8),
    projection_dim=16)
  transformers.CLIPModel(config).eval().save_pretrained(folder)
  for f in os.listdir(tokenizer_folder):
    shutil.copy(os.path.join(tokenizer_folder, f), folder)
  return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  teacher = write_tiny_pipeline(str(root / "teacher"))
  cfg = tiny_config(teacher)
  workdir = str(root / "run")
  write_checkpoints(cfg, workdir, steps=(2, 4))
  prompts = root / "captions.jsonl"
  prompts.write_text("".join(json.dumps({"image_id": i, "caption": f"a photo of thing number {i}"}) + "\n"
                             for i in range(NUM_PROMPTS)))
  ref_dir = root / "reference"
  ref_dir.mkdir()
  rng = np.random.default_rng(0)
  for i in range(12):
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(ref_dir / f"{i:03d}.png")
  clip = write_tiny_clip(str(root / "clip"), os.path.join(teacher, "tokenizer"))
  cfg.eval.update(dict(prompt_file=str(prompts), reference_stats=str(root / "ref.npz"), features="random_projection",
                       image_folder=str(ref_dir), sample_steps=(1, 2), params=("ema", "student"), batch_size=4,
                       save_images=NUM_PROMPTS, clip_model=clip, max_reference_features=10,
                       prompt_metric="test_evaluate:red_times_number"))
  config_lib.validate(cfg)
  evaluate.run_fid_stats(cfg, workdir)
  return cfg, workdir, root


def test_fid_stats_writes_reference(setup):
  cfg, workdir, root = setup
  extractor = evaluate.make_feature_extractor(cfg.eval)
  images = [np.asarray(Image.open(root / "reference" / f"{i:03d}.png")) for i in range(12)]
  feats = extractor(images)
  with np.load(cfg.eval.reference_stats) as data:
    mu, sigma = fid.stats(feats)
    np.testing.assert_array_equal(data["mu"], mu)
    np.testing.assert_array_equal(data["sigma"], sigma)
    rows = data["features"]
  assert rows.shape == (10, evaluate.RANDOM_PROJECTION_DIM)
  assert all(any(np.array_equal(r, f) for f in feats) for r in rows)  # a subset of the real rows


def _clip_oracle(clip_folder: str, images: np.ndarray, prompts: list[str]) -> float:
  model = transformers.CLIPModel.from_pretrained(clip_folder).eval()
  tok = transformers.CLIPTokenizer.from_pretrained(clip_folder)
  proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  with torch.no_grad():
    img = model.get_image_features(pixel_values=proc(list(images), return_tensors="pt")["pixel_values"])
    txt = model.get_text_features(input_ids=tok(prompts, padding="max_length", max_length=16, truncation=True,
                                                return_tensors="pt")["input_ids"])
  img = img if isinstance(img, torch.Tensor) else img.pooler_output
  txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
  return float(torch.nn.functional.cosine_similarity(img, txt, dim=-1).mean())


def test_eval_rows_metrics_resume_and_incomplete_checkpoint(setup):
  cfg, workdir, root = setup
  run = export.TrainedRun(cfg, workdir)  # one model load for every invocation below
  rows = evaluate.run_eval(cfg, workdir, run)
  keys = sorted(evaluate.row_key(r) for r in rows)
  assert keys == sorted((s, k, p) for s in (2, 4) for k in (1, 2) for p in ("ema", "student"))
  ref_mu, ref_sigma = fid.read_stats(cfg.eval.reference_stats)
  with np.load(cfg.eval.reference_stats) as data:
    ref_feats = data["features"]
  extractor = evaluate.make_feature_extractor(cfg.eval)
  prompts = [json.loads(line)["caption"] for line in open(cfg.eval.prompt_file)]
  for r in rows:
    folder = os.path.join(workdir, "eval", "images", f"step{r['step']}_{r['params']}_{r['steps']}step")
    images = np.stack([np.asarray(Image.open(os.path.join(folder, f))) for f in sorted(os.listdir(folder))])
    assert images.shape == (NUM_PROMPTS, 32, 32, 3) and r["num_images"] == NUM_PROMPTS
    feats = extractor(images)
    assert r["fid"] == pytest.approx(fid.frechet_distance(*fid.stats(feats), ref_mu, ref_sigma), rel=1e-9)
    assert r["coverage"] == coverage_lib.coverage(ref_feats, feats, 5)
    prdc = coverage_lib.prdc(ref_feats, feats, 5)
    assert {m: r[m] for m in prdc} == prdc
    # The plugged prompt metric, by hand: mean over images of (mean red / 255) * (the prompt's number + 1).
    hand = np.mean([images[i, ..., 0].mean() / 255.0 * (i + 1) for i in range(NUM_PROMPTS)])
    assert r["prompt_metric"] == pytest.approx(hand, rel=1e-5)
    assert r["prompt_metric_name"] == "test_evaluate:red_times_number" and r["sample_seconds"] > 0
    assert r["timesteps"] == ([999] if r["steps"] == 1 else [999, 495])  # the run's skip-24 grid
    if r["steps"] == 2 and r["step"] == 4 and r["params"] == "ema":
      assert r["clip_score"] == pytest.approx(_clip_oracle(cfg.eval.clip_model, images, prompts), abs=1e-4)
  # Different checkpoints / params give different images (the rows are not copies).
  fids = {evaluate.row_key(r): r["fid"] for r in rows}
  assert fids[(2, 1, "ema")] != fids[(4, 1, "ema")] and fids[(4, 1, "ema")] != fids[(4, 1, "student")]
  table = open(os.path.join(workdir, "eval", "results.md")).read()
  assert table.count("\n") == 2 + len(rows) and "| 4 | student | 2 |" in table

  # Resume: nothing is redone; a row lost from the file (crash before the write) is redone alone.
  results = os.path.join(workdir, "eval", "results.jsonl")
  assert evaluate.run_eval(cfg, workdir, run) == []
  lines = open(results).read().splitlines()
  with open(results, "w") as fh:
    fh.write("\n".join(lines[:-1]) + "\n" + lines[-1][:10])  # the last row truncated mid-write
  redone = evaluate.run_eval(cfg, workdir, run)
  assert [evaluate.row_key(r) for r in redone] == [evaluate.row_key(json.loads(lines[-1]))]
  assert redone[0]["fid"] == json.loads(lines[-1])["fid"]  # same seed, same images

  # A checkpoint being written (orbax tmp dir) is skipped; once renamed (finalised) it is evaluated.
  ckpts = os.path.join(workdir, "checkpoints")
  tmp = os.path.join(ckpts, "6.orbax-checkpoint-tmp-1700000000")
  shutil.copytree(os.path.join(ckpts, "4"), tmp)
  assert evaluate.run_eval(cfg, workdir, run) == []
  os.rename(tmp, os.path.join(ckpts, "6"))
  ema_only = cfg.copy_and_resolve_references()
  ema_only.eval.params = ("ema",)
  new = evaluate.run_eval(ema_only, workdir, run)
  assert sorted(evaluate.row_key(r) for r in new) == [(6, 1, "ema"), (6, 2, "ema")]
  assert {r["fid"] for r in new} == {fids[(4, 1, "ema")], fids[(4, 2, "ema")]}  # step 6 is a copy of step 4

  # eval.timesteps: explicit lists, one row each keyed by its length; a row of that key sampled at other
  # timesteps is a clear error, not a silent skip.
  explicit = ema_only.copy_and_resolve_references()
  explicit.eval.timesteps = ((899, 299),)
  config_lib.validate(explicit)
  with pytest.raises(ValueError, match=r"sampled at \[999, 495\], this job samples at \[899, 299\]"):
    evaluate.run_eval(explicit, workdir, run)
  other = str(root / "explicit_run")
  shutil.copytree(ckpts, os.path.join(other, "checkpoints"))
  explicit.eval.checkpoint_steps = (4,)
  rows = evaluate.run_eval(explicit, other)
  assert [(evaluate.row_key(r), r["timesteps"]) for r in rows] == [((4, 2, "ema"), [899, 299])]
  assert rows[0]["fid"] != fids[(4, 2, "ema")]


def test_clear_errors(setup, tmp_path):
  cfg, workdir, root = setup
  c = cfg.copy_and_resolve_references()
  c.eval.reference_stats = str(tmp_path / "missing_ref.npz")
  with pytest.raises(FileNotFoundError, match="missing_ref.npz"):
    evaluate.Evaluator(c, str(tmp_path))
  c = cfg.copy_and_resolve_references()
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n\n")
  c.eval.prompt_file = str(empty)
  with pytest.raises(ValueError, match="empty.jsonl holds no prompts"):
    evaluate.Evaluator(c, str(tmp_path))
  c = cfg.copy_and_resolve_references()
  no_feats = tmp_path / "nofeat.npz"
  fid.write_stats(str(no_feats), np.zeros(4), np.eye(4))
  c.eval.reference_stats = str(no_feats)
  with pytest.raises(ValueError, match="features"):
    evaluate.Evaluator(c, str(tmp_path))
  c = cfg.copy_and_resolve_references()
  c.eval.features = "no_such_extractor"
  with pytest.raises(ValueError, match="unknown feature extractor"):
    evaluate.Evaluator(c, str(tmp_path))
  # An unreadable finalised checkpoint stops the job with its step named.
  bad = tmp_path / "badrun"
  shutil.copytree(os.path.join(workdir, "checkpoints", "2"), bad / "checkpoints" / "2")
  os.remove(bad / "checkpoints" / "2" / "manifest" / "metadata")
  c = cfg.copy_and_resolve_references()
  c.eval.sample_steps = (1,)
  with pytest.raises(checkpoint.CheckpointReadError, match="step 2"):
    evaluate.run_eval(c, str(bad))
  c.eval.checkpoint_steps = (8,)
  with pytest.raises(FileNotFoundError, match=r"\[8\] not found"):
    evaluate.run_eval(c, str(bad))


def test_plugged_feature_extractor(setup):
  cfg, workdir, root = setup
  c = cfg.copy_and_resolve_references()
  c.eval.features = "test_evaluate:mean_colour_features"
  fn = evaluate.make_feature_extractor(c.eval)
  img = np.full((2, 8, 8, 3), 51, np.uint8)
  np.testing.assert_allclose(fn(img), np.full((2, 3), 0.2, np.float32))


def mean_colour_features(ec):
  """A plugged extractor ('module:factory'): mean colour per channel in [0, 1]."""
  del ec
  return lambda images: np.stack([np.asarray(i, np.float32).mean(axis=(0, 1)) / 255.0 for i in images])


def red_times_number(ec):
  """A plugged prompt metric ('module:factory'): mean red / 255 times (the number ending the prompt + 1)."""
  del ec
  return lambda images, prompts: np.asarray([np.asarray(im, np.float64)[..., 0].mean() / 255.0
                                             * (int(p.rsplit(" ", 1)[1]) + 1) for im, p in zip(images, prompts,
                                                                                                 strict=True)])


def test_prompt_metric_config_and_shape_errors(setup, tmp_path):
  cfg, workdir, _ = setup
  c = cfg.copy_and_resolve_references()
  c.eval.prompt_metric = "no_colon"
  with pytest.raises(config_lib.ConfigError, match="eval.prompt_metric"):
    config_lib.validate(c)
  c = cfg.copy_and_resolve_references()
  c.eval.update(dict(prompt_metric="test_evaluate:one_score", clip_model=""))
  evaluator = evaluate.Evaluator(c, str(tmp_path))
  with pytest.raises(ValueError, match=r"returned shape \(1,\), expected \(8,\)"):
    evaluator.metrics(np.zeros((NUM_PROMPTS, 16, 16, 3), np.uint8))


def one_score(ec):
  """A broken prompt metric: one score for the whole batch."""
  del ec
  return lambda images, prompts: np.zeros(1)


def test_watch_stops_within_two_polls_of_train_done_after_the_last_checkpoint(tmp_path, monkeypatch):
  """run_eval's watch loop (a stand-in Evaluator over a list of finalised steps): training saves its last
  step 6 and writes train_done.json while the job's third pass runs, after that pass listed the steps. The job
  still evaluates step 6 (in the next pass) and stops after one more poll, not at max_idle_seconds."""
  workdir = str(tmp_path)
  saved, evaluated, sleeps = [2, 4], [], []

  class StandIn:
    def __init__(self, config, workdir, run):
      self.rows, self.results_path, self.passes = [], "results.jsonl", 0

    def run_once(self):
      self.passes += 1
      steps = list(saved)
      if self.passes == 3:  # training finishes during this pass
        saved.append(6)
        ckpt_lib.write_train_done(workdir, 6)
      new = [{"step": s} for s in steps if s not in evaluated]
      evaluated.extend(r["step"] for r in new)
      self.rows += new
      return new, True

  monkeypatch.setattr(evaluate, "Evaluator", StandIn)
  done_file = tmp_path / ckpt_lib.TRAIN_DONE
  monkeypatch.setattr(evaluate.time, "sleep", lambda seconds: sleeps.append(done_file.is_file()))
  cfg = config_lib.defaults()
  cfg.eval.update(dict(watch=True, poll_seconds=30.0, max_idle_seconds=3600.0))
  added = evaluate.run_eval(cfg, workdir)
  assert [r["step"] for r in added] == evaluated == [2, 4, 6]
  assert sleeps == [False, False, True]  # one poll after the file appeared
  assert ckpt_lib.read_train_done(workdir)["step"] == 6


@pytest.mark.slow
def test_eval_watches_a_training_run(setup, tmp_path):
  """The eval job in watch mode beside a real tiny training run (two processes): a row for every checkpoint
  the run writes, the last one included, and the job ends within a minute of the trainer (train_done.json),
  not at its idle limit (10 minutes here)."""
  cfg, workdir, root = setup
  run = tmp_path / "run"
  args = ["--config", "configs/tiny_scott.py", "--workdir", str(run), f"--config.model.teacher_path={root / 'teacher'}",
          "--config.gan.enabled=False"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  trainer = subprocess.Popen([sys.executable, "-m", "scott_jax.main", *args, "--mode", "train"], cwd=ROOT, env=env)
  time.sleep(5)
  ev = [f"--config.eval.{k}={v}" for k, v in (("prompt_file", cfg.eval.prompt_file),
                                               ("reference_stats", cfg.eval.reference_stats),
                                               ("features", "random_projection"), ("watch", True),
                                               ("poll_seconds", 2.0), ("max_idle_seconds", 600.0))]
  log = tmp_path / "eval.log"
  job = subprocess.Popen([sys.executable, "-m", "scott_jax.main", *args, "--mode", "eval", *ev], cwd=ROOT, env=env,
                         stdout=open(log, "w"), stderr=subprocess.STDOUT)
  assert trainer.wait(timeout=900) == 0
  trainer_end = time.time()
  job.wait(timeout=900)
  out = log.read_text()
  assert job.returncode == 0, out[-3000:]
  assert time.time() - trainer_end < 60, out[-3000:]
  assert ckpt_lib.read_train_done(str(run))["step"] == 6
  rows = evaluate.read_results(str(run / "eval" / "results.jsonl"))
  assert sorted({row["step"] for row in rows}) == [3, 6]
  assert "training finished at step 6" in out


def test_cli_modes_registered(tmp_path):
  """--mode eval through the CLI: the empty prompt file stops it with a message naming the file."""
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  r = subprocess.run([sys.executable, "-m", "scott_jax.main", "--config", "configs/tiny_scott.py", "--workdir",
                      str(tmp_path), "--mode", "eval", f"--config.eval.prompt_file={empty}"], cwd=ROOT,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and f"prompt file {empty} holds no prompts" in r.stderr
  from scott_jax import modes

  assert {"sample", "export", "eval", "fid_stats"} <= set(modes.MODES)
