"""WORKDIR/report.md of the digits experiment: stage times, the classifier, every row, the students over seeds
(mean and spread), an honest SCott-vs-LCM verdict per step count, a plot of the metrics against steps, and the
sample grids."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from scott_jax.config import ConfigDict

STAGES = ("setup", "teacher", "classifier", "distill", "eval")
# (key, title, True when larger is better)
METRICS = (("accuracy", "accuracy", True), ("fid", "FID", False), ("coverage", "coverage", True))
PLOT_FILE = "metrics_vs_steps.png"


def aggregate(results: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
  """Student rows (those with a training seed) grouped by (method, steps) -> {"seeds": n, "<metric>": values
  (n,), "<metric>_mean", "<metric>_std" (sample std, ddof 1; 0 for one seed)} for every metric of a row."""
  groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
  for r in results:
    if r.get("seed") is not None:
      groups.setdefault((r["method"], int(r["steps"])), []).append(r)
  out = {}
  for key, rows in groups.items():
    agg: dict[str, Any] = {"seeds": len(rows), "name": rows[0]["name"].rsplit(" seed ", 1)[0]}
    for m in ("accuracy", "min_digit_accuracy", "fid", "coverage", "precision", "recall", "density"):
      v = np.asarray([r[m] for r in rows], np.float64)
      agg[m] = v
      agg[f"{m}_mean"] = float(v.mean())
      agg[f"{m}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    out[key] = agg
  return out


def verdict(agg: dict[tuple[str, int], dict[str, Any]], a: str = "scott", b: str = "lcm") -> list[str]:
  """One line per step count both methods have: for each metric whether ``a`` beats ``b`` on the seed mean,
  and whether the gap exceeds the seeds' spread (|mean difference| > std_a + std_b), so a win within the
  noise is reported as such."""
  lines = []
  for k in sorted({s for m, s in agg if m == a} & {s for m, s in agg if m == b}):
    ra, rb = agg[(a, k)], agg[(b, k)]
    parts = []
    for key, title, larger in METRICS:
      diff = ra[f"{key}_mean"] - rb[f"{key}_mean"]
      wins = diff > 0 if larger else diff < 0
      clear = abs(diff) > ra[f"{key}_std"] + rb[f"{key}_std"]
      parts.append(f"{title} {'better' if wins else 'worse' if diff != 0 else 'equal'} "
                   f"({ra[f'{key}_mean']:.3g} vs {rb[f'{key}_mean']:.3g}, "
                   f"{'beyond' if clear else 'within'} the seed spread)")
    lines.append(f"- {k} step{'s' if k > 1 else ''}: SCott is " + "; ".join(parts) + ".")
  return lines


def plot(path: str, results: list[dict[str, Any]], agg: dict[tuple[str, int], dict[str, Any]],
         titles: dict[str, str]) -> None:
  """Accuracy, FID and coverage against sampling steps: students as mean +- std over seeds, teacher rows as
  horizontal reference lines."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4))
  teachers = [r for r in results if r["method"] == "teacher"]
  methods = sorted({m for m, _ in agg})
  for ax, (key, title, _) in zip(axes, METRICS, strict=True):
    for method in methods:
      ks = sorted(s for m, s in agg if m == method)
      mean = [agg[(method, k)][f"{key}_mean"] for k in ks]
      std = [agg[(method, k)][f"{key}_std"] for k in ks]
      ax.errorbar(ks, mean, yerr=std, marker="o", capsize=3, label=titles.get(method, method))
    for i, r in enumerate(teachers):
      ax.axhline(r[key], color=f"C{len(methods) + i}", linestyle="--", linewidth=1, label=r["name"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({s for _, s in agg}) or [1])
    ax.set_xticklabels([str(s) for s in sorted({s for _, s in agg})] or ["1"])
    ax.set_xlabel("sampling steps")
    ax.set_title(title)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def write_report(config: ConfigDict, workdir: str, results: list[dict[str, Any]], stages: dict[str, Any],
                 titles: dict[str, str], variant: str = "") -> str:
  """Writes WORKDIR/report.md (and the plot next to it); ``stages`` maps stage name -> done info or None."""
  d = config.digits
  lines = [f"# SCott on handwritten digits{f' ({variant})' if variant else ''}", "",
           "sklearn `load_digits` (8x8, 10 classes) upsampled to "
           f"{d.resolution}x{d.resolution}, pixel space (no VAE), prompts \"a handwritten digit <word>\", "
           f"fixed stratified split (test fraction {d.test_fraction}, seed {d.split_seed}). Teacher: "
           f"Flax UNet2DConditionModel, channels {tuple(d.unet_channels)}, {d.teacher_steps} steps of batch "
           f"{d.teacher_batch}, SD1.5 schedule, prompt dropout {d.prompt_dropout}. Students (`scott_jax.train`, "
           f"the SD1.5 train step): {config.train.num_steps} steps of batch {config.train.batch_size}, "
           f"lr {config.optim.student_lr:g} (discriminator {config.optim.disc_lr:g}), w in "
           f"[{config.consistency.w_min:g}, {config.consistency.w_max:g}], EMA {config.consistency.ema_decay:g}; "
           f"SCott: {config.solver.name} (order {config.solver.order}, noise fn {config.solver.noise_fn}), "
           f"skip {config.solver.skip}, h = {config.solver.h}, GAN lambda {config.gan.lambda_adv:g} "
           f"({config.gan.weighting}, max {config.gan.max_weight:g}, from step {config.gan.start_step}; head init "
           f"{config.gan.head_init}); LCM: DDIM "
           f"eta 0, h = 1, skip {d.lcm_skip}, no GAN; seeds {tuple(d.distill_seeds)}, sampled with the "
           f"{d.student_params} parameters. CFG scale {d.guidance_scale} for every row.", "",
           "## Stages", "", "| stage | seconds | details |", "| --- | ---: | --- |"]
  for name in STAGES:
    info = stages.get(name)
    if info is None:
      lines.append(f"| {name} | - | not run |")
      continue
    details = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()
                        if k != "seconds")
    lines.append(f"| {name} | {info['seconds']:.1f} | {details} |")
  total = sum(info["seconds"] for info in stages.values() if info is not None)
  lines.append(f"| total | {total:.1f} | |")
  cls = stages.get("classifier")
  if cls is not None:
    lines += ["", f"Digit classifier: test accuracy **{cls['test_accuracy']:.4f}** on {cls['num_test']} test images "
              f"(train {cls['train_accuracy']:.4f}). Its {d.classifier_features}-d penultimate features give FID "
              f"and precision / recall / density / coverage (k = {d.coverage_k}) against the test split; its "
              "accuracy on generated digits against the prompted digit plays the role of CLIP score."]
  agg = aggregate(results)
  if agg:
    lines += ["", "## Students over seeds", "",
              "Mean +- sample standard deviation over the training seeds (same evaluation noise for every row).", "",
              "| method | steps | seeds | accuracy | min digit acc. | FID | coverage | precision | recall |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (method, k), a in sorted(agg.items(), key=lambda kv: (kv[0][0] != "lcm", kv[0][0], kv[0][1])):
      cells = [f"{a[f'{m}_mean']:.3f} +- {a[f'{m}_std']:.3f}" if m != "fid" else
               f"{a['fid_mean']:.1f} +- {a['fid_std']:.1f}"
               for m in ("accuracy", "min_digit_accuracy", "fid", "coverage", "precision", "recall")]
      lines.append(f"| {titles.get(method, method)} | {k} | {a['seeds']} | " + " | ".join(cells) + " |")
    said = verdict(agg)
    if said:
      lines += ["", "Does SCott beat LCM here? (higher accuracy and coverage, lower FID are better)", "", *said]
    plot(os.path.join(workdir, PLOT_FILE), results, agg, titles)
    lines += ["", f"![metrics against steps]({PLOT_FILE})"]
  lines += ["", "## All rows", "",
            f"{d.samples_per_digit} samples per digit per row, seed {d.eval_seed} (same initial noise for every "
            "row). Evals/image: U-Net evaluations per image (CFG counts two).", "",
            "| row | steps | evals/image | accuracy | min digit acc. | FID | coverage | precision | recall | density "
            "| sampling s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in results:
    lines.append(f"| {r['name']} | {r['steps']} | {r['evals_per_image']} | {r['accuracy']:.3f} | "
                 f"{r['min_digit_accuracy']:.3f} | {r['fid']:.2f} | {r['coverage']:.3f} | {r['precision']:.3f} | "
                 f"{r['recall']:.3f} | {r['density']:.3f} | {r['seconds']:.1f} |")
  lines += ["", "## Samples", "", "Columns: digits 0-9 (the prompted digit); rows: samples.", ""]
  for r in results:
    lines += [f"**{r['name']}**", "", f"![{r['name']}]({r['grid']})", ""]
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as fh:
    fh.write("\n".join(lines))
  return path
