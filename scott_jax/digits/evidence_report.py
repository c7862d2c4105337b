"""The evidence experiment's report (`scott_jax.digits.evidence`): the table, paired bootstrap intervals, a
verdict per paper ordering, the learning curves, the discriminator curves and the sample grids.

Everything is read back from the run's files, so ``python -m scott_jax.main --config configs/digits.py:evidence
--workdir W`` on a finished (or partial) workdir rewrites the report from what was measured. The report goes to
WORKDIR/evidence/report.md, and also to ``digits.evidence_doc`` when set (e.g. docs/evidence.md; its figures
beside it in <doc stem>/).

Statistics: a row is one (arm, seed, CFG scale, checkpoint, sampling steps) evaluation of N images. A
difference between arms A and B is the mean over seeds of A's metric minus the mean over seeds of B's; its 95%
interval is the percentile interval of ``digits.bootstrap`` paired bootstrap replicates, each resampling the
seeds (the same seed indices for A and B: seed k of every arm shares the training data order and noise) and the
N images (the same image indices for every seed and both arms: image i of every row has the same prompt and
initial noise). FID is recomputed per replicate against the fixed reference statistics of the test split.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from typing import Any

import numpy as np

from scott_jax import evaluate, loop
from scott_jax.config import ConfigDict
from scott_jax.digits import distill, evaluation
from scott_jax.digits import evidence_layout as layout

UNTRAINED = "untrained"
# (arm letter, method) in the issue's lettering; the untrained student is step 0 of any run.
LETTERS = {UNTRAINED: "a", "lcm": "b", "ode": "c", "scott_no_gan": "d", "scott_fixed_gan": "e", "scott": "f",
           "lcm_gan": "g", "scott_h1": "h", "scott_gaussian_no_gan": "i", "scott_gaussian": "j", "scott_k2": "k"}
# (A, B, what the paper claims: A better than B)
ORDERINGS = (
  ("scott_no_gan", "ode", "Table 5: the SDE teacher beats the ODE teacher (SCott w/o GAN vs the ODE control)"),
  ("scott", "scott_h1", "Table 6: h = 3 beats h = 1"),
  ("scott_no_gan", "lcm", "Table 7: SCott without GAN beats LCM"),
  ("scott", "scott_no_gan", "Table 7: the GAN helps SCott (SCott vs SCott w/o GAN)"),
  ("lcm_gan", "lcm", "Table 7: the GAN helps LCM (LCM + GAN vs LCM)"),
  ("scott", "lcm", "Table 2: SCott beats LCM"),
  ("scott_fixed_gan", "lcm", "Table 2 with the paper's fixed lambda: SCott (fixed GAN) beats LCM"),
  ("scott", "scott_fixed_gan", "(ours) the balanced GAN beats the paper's fixed lambda"),
  ("scott_gaussian_no_gan", "scott_no_gan", "v1: the Gaussian student beats the point student (no GAN)"),
  ("scott_gaussian", "scott", "v1: the Gaussian student beats the point student (with the GAN)"),
  ("scott", "scott_k2", "(ours, cost) the GAN on every example beats it on every 2nd (gan.example_stride 2)"),
  ("lcm", UNTRAINED, "(control) LCM distillation beats the untrained student"),
  ("scott", UNTRAINED, "(control) SCott distillation beats the untrained student"),
)


def _titles() -> dict[str, str]:

  return {UNTRAINED: "untrained student", **distill.TITLES}


# ---------------------------------------------------------------------------------------------------------
# Reading the run.

def _read_jsonl(path: str) -> list[dict[str, Any]]:
  if not os.path.isfile(path):
    return []
  with open(path) as fh:
    return [json.loads(ln) for ln in fh if ln.strip()]


def load_rows(config: ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Every evaluated student row of the finished runs: the eval job's row plus method, seed, scale, its
  features path and whether its checkpoint is the run's last. Step-0 rows are also returned as the untrained
  arm (method "untrained"). Only the scheduled checkpoints (step 0, multiples of ``train.checkpoint_every``, the
  last) are read: a run stopped by a signal and resumed also kept its stop step's checkpoint, which the other
  seeds do not have."""
  out = []
  every = int(config.train.checkpoint_every)
  for method, seed in layout.run_order(config):
    run_wd = distill.run_dir(workdir, method, seed, layout.RUNS)
    done = distill.read_done(run_wd)
    if done is None:
      continue
    for scale in layout.scales(config):
      eval_wd = layout.eval_dir(workdir, method, seed, scale)
      for r in _read_jsonl(os.path.join(eval_wd, evaluate.EVAL_SUBDIR, evaluate.RESULTS_FILE)):
        if int(r["step"]) % every and int(r["step"]) != int(done["steps"]):
          continue
        feats = evaluate.features_path(eval_wd, int(r["step"]), r["params"], int(r["steps"]))
        row = dict(r, method=method, seed=seed, scale=float(scale), features_file=feats,
                   final=int(r["step"]) == int(done["steps"]), images_dir=evaluate.images_dir(
                     eval_wd, int(r["step"]), r["params"], int(r["steps"])))
        out.append(row)
        if int(r["step"]) == 0:
          out.append(dict(row, method=UNTRAINED, final=True))
  return out


def final_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, float, int], dict[int, dict[str, Any]]]:
  """{(method, scale, sampling steps): {seed: row at the run's last checkpoint}}; the untrained arm keeps one
  row per seed it was read from (all identical: the same initial student and evaluation noise)."""
  out: dict[tuple[str, float, int], dict[int, dict[str, Any]]] = {}
  for r in rows:
    if r["final"]:
      out.setdefault((r["method"], r["scale"], int(r["steps"])), {})[int(r["seed"])] = r
  return out


def read_metrics(workdir: str, method: str, seed: int) -> list[dict[str, Any]]:
  """The training metrics (`scott_jax.loop.METRICS_FILE`) of one run."""
  return _read_jsonl(os.path.join(distill.run_dir(workdir, method, seed, layout.RUNS), loop.METRICS_FILE))


# ---------------------------------------------------------------------------------------------------------
# Statistics.

def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh(a)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _fid_from_moments(mu: np.ndarray, cov: np.ndarray, mu_r: np.ndarray, sigma_r: np.ndarray) -> np.ndarray:
  """FID of each (mu (R, F), cov (R, F, F)) against (mu_r, sigma_r) -> (R,) float64, with the trace of
  sqrt(sigma_r^1/2 S sigma_r^1/2) from batched symmetric eigenvalues (equal to the sqrtm form)."""
  root = _sqrtm_psd(sigma_r)
  inner = root @ cov @ root
  tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0.0, None)).sum(axis=1)
  return (np.sum((mu - mu_r) ** 2, axis=1) + np.trace(cov, axis1=1, axis2=2) + np.trace(sigma_r)
          - 2.0 * tr_sqrt)


def fid_many(features: np.ndarray, mu_r: np.ndarray, sigma_r: np.ndarray) -> np.ndarray:
  """FID of each feature set against (mu_r, sigma_r): features (R, N, F) -> (R,) float64."""
  x = features.astype(np.float64)
  mu = x.mean(axis=1)
  xc = x - mu[:, None, :]
  cov = np.matmul(xc.transpose(0, 2, 1), xc) / (x.shape[1] - 1)  # BLAS; einsum here would not use it
  return _fid_from_moments(mu, cov, mu_r, sigma_r)


@functools.lru_cache(maxsize=4)
def resample_counts(replicates: int, n: int, seed: int) -> np.ndarray:
  """The bootstrap's image resampling: (replicates, n) float64, row i = how often each of the n images is drawn
  in replicate i (n draws with replacement; generator ``seed``). The same for every arm, seed and comparison
  with these arguments (read-only)."""
  samples = np.random.default_rng(seed).integers(0, n, (replicates, n))
  counts = np.zeros((replicates, n))
  np.add.at(counts, (np.arange(replicates)[:, None], samples), 1.0)
  counts.setflags(write=False)
  return counts


def fid_resampled(features: np.ndarray, counts: np.ndarray, mu_r: np.ndarray, sigma_r: np.ndarray) -> np.ndarray:
  """FID of each resampled set of ``features`` (N, F): set i holds image j counts[i, j] times -> (R,) float64.
  The sets' means and second moments are two GEMMs against the images and their outer products (no gather)."""
  x = features.astype(np.float64)
  n, f = x.shape
  mu = counts @ x / n
  second = (counts @ (x[:, :, None] * x[:, None, :]).reshape(n, f * f)).reshape(-1, f, f) / n
  cov = (second - mu[:, :, None] * mu[:, None, :]) * (n / (n - 1))
  return _fid_from_moments(mu, cov, mu_r, sigma_r)


def paired_bootstrap(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]], mu_r: np.ndarray,
                     sigma_r: np.ndarray, replicates: int, seed: int = 0,
                     cache: dict[Any, np.ndarray] | None = None) -> dict[str, Any]:
  """Paired bootstrap of mean-over-seeds differences A - B of FID and accuracy (module docstring).

  a, b: per seed (paired by position, equal length S) {"features": (N, F), "prompt_metric": (N,)} and optionally
  "key" (e.g. the features file): with a ``cache`` dict, each keyed seed's replicate FIDs are computed once for
  every comparison of a report (the image resampling, `resample_counts`, is the same for all). Returns
  {"fid": (point, lo, hi), "accuracy": (point, lo, hi), "seeds": S, "samples": N}."""
  if len(a) != len(b) or not a:
    raise ValueError(f"paired bootstrap needs the same number of seeds on both sides, got {len(a)} and {len(b)}")
  s, n = len(a), a[0]["features"].shape[0]
  counts = resample_counts(replicates, n, seed)
  picks = np.random.default_rng([seed, 1]).integers(0, s, (replicates, s))  # the replicates' seed draws
  rows = np.arange(replicates)[:, None]
  cache = {} if cache is None else cache

  def replicate_fids(x: dict[str, np.ndarray]) -> np.ndarray:  # (R,) for one seed's row
    if "key" not in x:
      return fid_resampled(x["features"], counts, mu_r, sigma_r)
    key = (x["key"], replicates, n, seed)
    if key not in cache:
      cache[key] = fid_resampled(x["features"], counts, mu_r, sigma_r)
    return cache[key]

  def arm(xs: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:  # per replicate: mean FID, accuracy
    fids = np.stack([replicate_fids(x) for x in xs], axis=1)  # (R, S)
    acc = counts @ np.stack([x["prompt_metric"] for x in xs]).astype(np.float64).T / n  # (R, S)
    return fids[rows, picks].mean(axis=1), acc[rows, picks].mean(axis=1)

  (fid_a, acc_a), (fid_b, acc_b) = arm(a), arm(b)
  d_fid, d_acc = fid_a - fid_b, acc_a - acc_b
  point_fid = (fid_many(np.stack([x["features"] for x in a]), mu_r, sigma_r).mean()
               - fid_many(np.stack([x["features"] for x in b]), mu_r, sigma_r).mean())
  point_acc = (np.mean([x["prompt_metric"] for x in a]) - np.mean([x["prompt_metric"] for x in b]))
  return {"fid": (float(point_fid), *map(float, np.percentile(d_fid, [2.5, 97.5]))),
          "accuracy": (float(point_acc), *map(float, np.percentile(d_acc, [2.5, 97.5]))), "seeds": s, "samples": n}


def verdict_summary(comps: list[dict[str, Any]]) -> list[str]:
  """Markdown lines: per claim, how many of its (CFG, steps) rows are reproduced / reversed / not resolved, for
  FID and for accuracy (the rows follow in the full table)."""
  if not comps:
    return []
  lines = ["Per claim, the count of its (CFG scale, sampling steps) rows by verdict:", "",
           "| claim (A vs B) | rows | FID: reproduced / reversed / not resolved | accuracy: reproduced / reversed / "
           "not resolved |", "|---|---:|---|---|"]
  for claim in dict.fromkeys(c["claim"] for c in comps):
    mine = [c for c in comps if c["claim"] == claim]
    counts = {key: " / ".join(str(sum(c[key] == v for c in mine)) for v in ("reproduced", "reversed", "not resolved"))
              for key in ("verdict_fid", "verdict_accuracy")}
    lines.append(f"| {claim} | {len(mine)} | {counts['verdict_fid']} | {counts['verdict_accuracy']} |")
  return lines + [""]


def judge(interval: tuple[float, float, float], lower_is_better: bool) -> str:
  """'reproduced' (A better than B: the 95% interval excludes 0 on A's side), 'reversed' (B better, beyond the
  interval) or 'not resolved' (the interval contains 0)."""
  _, lo, hi = interval
  if lo <= 0.0 <= hi:
    return "not resolved"
  better = hi < 0.0 if lower_is_better else lo > 0.0
  return "reproduced" if better else "reversed"


def _load_npz(path: str) -> dict[str, np.ndarray]:
  """A row's per-image features and hits, keyed by its path (the bootstrap's cache key)."""
  with np.load(path) as z:
    return {"key": path, **{k: z[k] for k in z.files}}


def comparisons(config: ConfigDict, workdir: str, finals: dict[tuple[str, float, int], dict[int, dict[str, Any]]],
                ) -> list[dict[str, Any]]:
  """Every paper ordering (`ORDERINGS`) at every scale and step count where both arms have finished seeds
  (paired by seed; the untrained arm is paired with every seed of the other) -> bootstrap results."""
  mu_r, sigma_r, _ = evaluate.read_reference(os.path.join(workdir, layout.EVIDENCE, "reference.npz"), False)
  d = config.digits
  out = []
  cache: dict[Any, np.ndarray] = {}  # per features file: its replicate FIDs, shared by the comparisons
  for a, b, claim in ORDERINGS:
    for scale in layout.scales(config):
      for k in d.student_steps:
        ra, rb = finals.get((a, scale, k), {}), finals.get((b, scale, k), {})
        if not ra or not rb:
          continue
        if UNTRAINED in (a, b):
          seeds = sorted(rb if a == UNTRAINED else ra)
          one = next(iter((ra if a == UNTRAINED else rb).values()))
          pa = [ra[s] if a != UNTRAINED else one for s in seeds]
          pb = [rb[s] if b != UNTRAINED else one for s in seeds]
        else:
          seeds = sorted(set(ra) & set(rb))
          if not seeds:
            continue
          pa, pb = [ra[s] for s in seeds], [rb[s] for s in seeds]
        res = paired_bootstrap([_load_npz(r["features_file"]) for r in pa], [_load_npz(r["features_file"]) for r in pb],
                               mu_r, sigma_r, d.bootstrap, seed=d.eval_seed, cache=cache)
        out.append({"a": a, "b": b, "claim": claim, "scale": scale, "steps": k, **res,
                    "verdict_fid": judge(res["fid"], True), "verdict_accuracy": judge(res["accuracy"], False)})
  return out


# ---------------------------------------------------------------------------------------------------------
# Figures.

def _plot_curves(path: str, config: ConfigDict, rows: list[dict[str, Any]]) -> None:
  """FID and accuracy against training step per arm (mean +- std over seeds), one column per sampling step
  count, at the experiment's CFG scale."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  titles = _titles()
  scale = float(config.digits.guidance_scale)
  ks = list(config.digits.student_steps)
  fig, axes = plt.subplots(2, len(ks), figsize=(4.5 * len(ks), 7), squeeze=False)
  for method in config.digits.distill_methods:
    for j, k in enumerate(ks):
      by_step: dict[int, list[dict[str, Any]]] = {}
      for r in rows:
        if r["method"] == method and r["scale"] == scale and int(r["steps"]) == k:
          by_step.setdefault(int(r["step"]), []).append(r)
      if not by_step:
        continue
      steps = sorted(by_step)
      for i, (key, label) in enumerate((("fid", "FID"), ("prompt_metric", "accuracy"))):
        v = [np.asarray([r[key] for r in by_step[s]], np.float64) for s in steps]
        mean, std = np.array([x.mean() for x in v]), np.array([x.std() for x in v])
        ax = axes[i, j]
        ax.plot(steps, mean, marker="o", label=f"({LETTERS.get(method, '?')}) {titles[method]}")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.15)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.set_title(f"{k}-step sampling, CFG {scale:g}")
  axes[0, -1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_disc(path: str, config: ConfigDict, workdir: str) -> dict[str, dict[str, float]]:
  """disc_accuracy and grad_ratio against training step for the GAN arms (mean over seeds; the train log's
  log_every windows). Returns per arm, over the windows after step 100, disc_accuracy's mean, minimum, the
  mean-over-seeds curve's minimum and the share of windows below 0.6, and the median grad_ratio."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt


  titles = _titles()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  summary = {}
  for method in config.digits.distill_methods:
    logs = [read_metrics(workdir, m, s) for m, s in layout.run_order(config) if m == method]
    logs = [lg for lg in logs if lg and "disc_accuracy" in lg[0]]
    if not logs:
      continue
    steps = sorted(set.intersection(*[{e["step"] for e in lg} for lg in logs]))
    for ax, key in zip(axes, ("disc_accuracy", "grad_ratio"), strict=True):
      v = np.asarray([[{e["step"]: e[key] for e in lg}[s] for s in steps] for lg in logs], np.float64)
      ax.plot(steps, v.mean(axis=0), label=f"({LETTERS.get(method, '?')}) {titles[method]} ({len(logs)} seeds)")
      ax.fill_between(steps, v.min(axis=0), v.max(axis=0), alpha=0.15)
      ax.set_xlabel("training step")
      ax.set_title(key)
    acc = np.asarray([[{e["step"]: e["disc_accuracy"] for e in lg}[s] for s in steps if s > 100] for lg in logs],
                     np.float64).reshape(len(logs), -1)  # (seeds, logged windows after step 100)
    nan = float("nan")
    summary[method] = {"disc_accuracy_after_100": float(acc.mean()) if acc.size else nan,
                       "disc_accuracy_after_100_min": float(acc.min()) if acc.size else nan,
                       "disc_accuracy_after_100_seed_mean_min": float(acc.mean(axis=0).min()) if acc.size else nan,
                       "disc_accuracy_after_100_below_06": float((acc < 0.6).mean()) if acc.size else nan,
                       "grad_ratio_median": float(np.median([e["grad_ratio"] for lg in logs for e in lg]))}
  axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
  axes[1].set_yscale("log")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return summary


def _grid(path: str, images_dir: str) -> bool:
  """The 8-per-digit grid of a row's saved images (the first 80 prompts hold 8 of each digit)."""
  from PIL import Image


  if not os.path.isdir(images_dir):
    return False
  names = sorted(f for f in os.listdir(images_dir) if f.endswith(".png"))
  if not names:
    return False
  images = np.stack([np.asarray(Image.open(os.path.join(images_dir, f)).convert("RGB")) for f in names])
  evaluation.write_grid(path, images, evaluation.eval_labels(len(names) // 10 or 1)[:len(images)])
  return True


# ---------------------------------------------------------------------------------------------------------
# The report.

def _cpu_text(workdir: str, done: list[tuple[str, int, dict[str, Any]]]) -> str:
  """The CPU time of the finished runs that recorded it (training: done.json's cpu_seconds; evaluation:
  `layout.EVAL_CPU`), which, unlike wall time, does not grow with the load beside the run."""
  train, evals = [], []
  for m, s, info in done:
    eval_path = os.path.join(distill.run_dir(workdir, m, s, layout.RUNS), layout.EVAL_CPU)
    if "cpu_seconds" in info and os.path.isfile(eval_path):
      with open(eval_path) as fh:
        evals.append(json.load(fh)["cpu_seconds"])
      train.append(info["cpu_seconds"])
  if not train:
    return "CPU time: not recorded by these runs (runs since 2026-12-07 record it)."
  return (f"CPU time of the {len(train)} of {len(done)} runs that recorded it: training {sum(train) / 60:.1f} min, "
          f"evaluation {sum(evals) / 60:.1f} min (all threads of the process).")


def _fmt_interval(x: tuple[float, float, float], spec: str) -> str:
  return f"{x[0]:{spec}} [{x[1]:{spec}}, {x[2]:{spec}}]"


def write(config: ConfigDict, workdir: str) -> str:
  """Writes WORKDIR/evidence/report.md (and ``digits.evidence_doc``) from what the run has measured so far;
  returns the report's path."""
  d = config.digits
  titles = _titles()
  out_dir = os.path.join(workdir, layout.EVIDENCE)
  fig_dir = os.path.join(out_dir, "figures")
  os.makedirs(fig_dir, exist_ok=True)
  rows = load_rows(config, workdir)
  finals = final_rows(rows)
  teacher_dir = os.path.join(out_dir, layout.TEACHER_ROWS)
  teacher = []
  for f in sorted(os.listdir(teacher_dir)) if os.path.isdir(teacher_dir) else []:
    if f.endswith(".json"):
      with open(os.path.join(teacher_dir, f)) as fh:
        teacher.append(json.load(fh))
  runs = [(m, s, distill.read_done(distill.run_dir(workdir, m, s, layout.RUNS)))
          for m, s in layout.run_order(config)]
  done = [(m, s, info) for m, s, info in runs if info is not None]
  lines = ["# Evidence: what SCott's parts do on the digits experiment", "",
           "Generated by `python -m scott_jax.main --config configs/digits.py:evidence --workdir "
           f"{os.path.relpath(workdir)}` (`scott_jax/digits/evidence.py`, "
           "`evidence_report.py`) from the run's files; every number below was measured by that run.", "",
           f"Runs finished: {len(done)} of {len(runs)} (arms x seeds "
           f"{len(d.distill_methods)} x {len(d.distill_seeds)}); training time "
           f"{sum(i['seconds'] for _, _, i in done) / 60:.1f} min, evaluation time "
           f"{sum(r.get('seconds', 0.0) for r in rows if r['method'] != UNTRAINED) / 60:.1f} min (the rows' "
           "sampling and metrics; both measured on a shared 2-core host, beside other work). "
           + _cpu_text(workdir, done), "",
           "## Protocol", "",
           f"- Data, teacher ({d.teacher_steps} steps), classifier and eval job as the default digits run; students "
           f"trained {config.train.num_steps} steps of batch {config.train.batch_size}, student lr "
           f"{config.optim.student_lr:g}, disc lr {config.optim.disc_lr:g}, w ~ U[{config.consistency.w_min:g}, "
           f"{config.consistency.w_max:g}] (CFG g = 1 + w), EMA {config.consistency.ema_decay:g}.",
           f"- Working GAN (arms f, g, h): head init `{config.gan.head_init}`, weighting `{config.gan.weighting}` "
           f"(lambda_adv {config.gan.lambda_adv:g}, max {config.gan.max_weight:g}), L_G on from step "
           f"{config.gan.start_step}, LoRA rank {config.gan.lora_rank}; arm e: the paper's fixed lambda "
           f"{config.gan.lambda_adv:g} from step 0 with the same discriminator.",
           f"- Every row: {10 * d.samples_per_digit} samples ({d.samples_per_digit} per digit), evaluation noise seed "
           f"{d.eval_seed}, the same for every arm and seed; sampling timesteps "
           + ", ".join(f"{len(ts)}-step {list(ts)}" for ts in d.eval_timesteps)
           + " for every arm (on both the skip-20 and the skip-24 training grids).",
           f"- CFG scales {', '.join(f'{g:g}' for g in layout.scales(config))}: the first is the experiment's "
           "(learning curves at every checkpoint), the others at step 0 and the last checkpoint.",
           f"- Seeds {list(d.distill_seeds)}; differences: mean over seeds, 95% paired bootstrap interval over seeds "
           f"and samples ({d.bootstrap} replicates). FID from the digit classifier's features against the test "
           "split (lower is better); accuracy = the classifier agrees with the prompted digit.", "",
           "Arms: " + "; ".join(f"({LETTERS[m]}) {titles[m]}" for m in (UNTRAINED, *d.distill_methods)
                                if m in LETTERS) + ".", ""]
  # Table.
  lines += ["## Final checkpoints", "",
            "| arm | CFG | steps | seeds | FID | accuracy | coverage |", "|---|---:|---:|---:|---:|---:|---:|"]
  for method in (UNTRAINED, *d.distill_methods):
    for scale in layout.scales(config):
      for k in d.student_steps:
        per_seed = finals.get((method, scale, k))
        if not per_seed:
          continue
        rs = [per_seed[s] for s in sorted(per_seed)][:1 if method == UNTRAINED else None]
        stat = {key: np.asarray([r[key] for r in rs], np.float64) for key in ("fid", "prompt_metric", "coverage")}
        pm = lambda v, spec: f"{v.mean():{spec}} +- {v.std(ddof=1) if len(v) > 1 else 0.0:{spec}}"  # noqa: E731
        lines.append(f"| ({LETTERS.get(method, '?')}) {titles[method]} | {scale:g} | {k} | {len(rs)} | "
                     f"{pm(stat['fid'], '.2f')} | {pm(stat['prompt_metric'], '.4f')} | {pm(stat['coverage'], '.3f')} |")
  for t in teacher:
    lines.append(f"| teacher DDIM {t['steps']} | {t['guidance_scale']:g} | {t['steps']} | - | {t['fid']:.2f} | "
                 f"{t['accuracy']:.4f} | {t['coverage']:.3f} |")
  lines += ["", "The untrained student (step 0) is the teacher with a zero guidance projection: it ignores w, so its "
            "rows are the same at every CFG scale (unguided sampling).", ""]
  # Verdicts.
  comps = comparisons(config, workdir, finals)
  lines += ["## The paper's orderings", "",
            "Difference A - B (point [95% interval]); FID: negative = A better; accuracy: positive = A better. "
            "`reproduced`: the interval excludes 0 on the paper's side; `reversed`: on the other side; "
            "`not resolved`: it contains 0.", ""]
  lines += verdict_summary(comps) + [
            "| claim (A vs B) | CFG | steps | seeds | FID A - B | verdict (FID) | accuracy A - B | verdict (acc.) |",
            "|---|---:|---:|---:|---:|---|---:|---|"]
  for c in comps:
    lines.append(f"| {c['claim']} | {c['scale']:g} | {c['steps']} | {c['seeds']} | {_fmt_interval(c['fid'], '.2f')} | "
                 f"{c['verdict_fid']} | {_fmt_interval(c['accuracy'], '.4f')} | {c['verdict_accuracy']} |")
  if not comps:
    lines.append("| (no pair of arms finished yet) | | | | | | | |")
  arms = (UNTRAINED, *d.distill_methods)
  for a, b, claim in ORDERINGS:
    missing = [m for m in (a, b) if m not in arms]
    if missing:
      lines.append(f"| {claim} | - | - | 0 | - | not run: arm "
                   + " and ".join(f"({LETTERS[m]}) {titles[m]}" for m in missing)
                   + " is outside this experiment's budget (`configs/digits.py:evidence_all` runs it) | - | - |")
  lines.append("")
  # Curves.
  _plot_curves(os.path.join(fig_dir, "learning_curves.png"), config, rows)
  disc = _plot_disc(os.path.join(fig_dir, "disc_curves.png"), config, workdir)
  lines += ["## Learning curves", "", "![learning curves](figures/learning_curves.png)", ""]
  flat = []
  for method in d.distill_methods:
    for k in d.student_steps:
      per_step: dict[int, list[float]] = {}
      for r in rows:
        if r["method"] == method and r["scale"] == float(d.guidance_scale) and int(r["steps"]) == k:
          per_step.setdefault(int(r["step"]), []).append(float(r["fid"]))
      if len(per_step) < 3:
        continue
      s = sorted(per_step)
      last, prev = np.asarray(per_step[s[-1]]), np.asarray(per_step[s[-2]])
      best = min(s, key=lambda step: np.mean(per_step[step]))
      if len(last) < 2:
        state, spread_text = "one seed so far, no spread to judge the change by", "1 seed"
      else:
        spread = float(np.std(last, ddof=1))
        spread_text = f"seed std {spread:.2f}"
        state = "flat (change within the seed std)" if abs(last.mean() - prev.mean()) <= spread else (
          "still improving" if last.mean() < prev.mean() else "getting worse")
      flat.append(f"- ({LETTERS.get(method, '?')}) {titles[method]}, {k} step{'s' * (k > 1)}: FID "
                  f"{prev.mean():.2f} at step {s[-2]}, {last.mean():.2f} at step {s[-1]} ({spread_text}): {state}; "
                  f"best mean {np.mean(per_step[best]):.2f} at step {best}.")
  lines += flat + [""]
  lines += ["## Discriminator", "",
            "The probe (`scott_jax/digits/probe.py`): the train step's discriminator update alone against the frozen "
            f"untrained student, batch {d.probe_batch}; hinge loss L_D / disc_accuracy (mean over the window ending "
            "at the step; chance: 2.0 / 0.5).", ""]
  probe_path = os.path.join(out_dir, "probe.json")
  if os.path.isfile(probe_path):
    with open(probe_path) as fh:
      probes = json.load(fh)
    steps = [e["step"] for e in probes[0]["curve"]] if probes else []
    lines += ["| head init | disc lr | " + " | ".join(f"step {s}" for s in steps) + " |",
              "|---|---:|" + "---:|" * len(steps)]
    for p in probes:
      lines.append(f"| {p['head_init']} | {p['disc_lr']:g} | " + " | ".join(
        f"{e['loss_d']:.2f} / {e['disc_accuracy']:.2f}" for e in p["curve"]) + " |")
    lines.append("")
  lines += ["During training (the arms with a GAN; mean over seeds, band = min-max):", "",
            "![discriminator curves](figures/disc_curves.png)", ""]
  for method, v in disc.items():
    lines.append(f"- ({LETTERS.get(method, '?')}) {titles[method]}: disc_accuracy after step 100 mean "
                 f"{v['disc_accuracy_after_100']:.3f}; the mean-over-seeds curve's minimum "
                 f"{v['disc_accuracy_after_100_seed_mean_min']:.3f}; single seeds' logged windows: minimum "
                 f"{v['disc_accuracy_after_100_min']:.3f}, {100 * v['disc_accuracy_after_100_below_06']:.1f}% "
                 f"below 0.6; median grad_ratio {v['grad_ratio_median']:.3g}.")
  lines.append("")
  # Grids.
  lines += ["## Samples (2 steps, experiment's CFG, seed of the first finished run, 8 per digit)", ""]
  for method in (UNTRAINED, *d.distill_methods):
    per_seed = finals.get((method, float(d.guidance_scale), 2))
    if not per_seed:
      continue
    r = per_seed[sorted(per_seed)[0]]
    name = f"grid_{method}.png"
    if _grid(os.path.join(fig_dir, name), r["images_dir"]):
      lines += [f"({LETTERS.get(method, '?')}) {titles[method]}:", "", f"![{method}](figures/{name})", ""]
  for t in teacher:
    src = os.path.join(teacher_dir, f"ddim{t['steps']}_{layout.scale_tag(t['guidance_scale'])}.png")
    if os.path.isfile(src):
      name = f"grid_teacher_{layout.scale_tag(t['guidance_scale'])}.png"
      shutil.copyfile(src, os.path.join(fig_dir, name))
      lines += [f"teacher DDIM {t['steps']} at CFG {t['guidance_scale']:g}:", "", f"![teacher](figures/{name})", ""]
  text = "\n".join(lines) + "\n"
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as fh:
    fh.write(text)
  with open(os.path.join(out_dir, "comparisons.json"), "w") as fh:
    json.dump(comps, fh, indent=2)
  if d.evidence_doc:
    doc_figs = os.path.join(os.path.dirname(os.path.abspath(d.evidence_doc)), "evidence")
    os.makedirs(doc_figs, exist_ok=True)
    for f in os.listdir(fig_dir):
      shutil.copyfile(os.path.join(fig_dir, f), os.path.join(doc_figs, f))
    with open(d.evidence_doc, "w") as fh:
      fh.write(text.replace("](figures/", "](evidence/"))
  return path
