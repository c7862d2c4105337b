"""Where the evidence experiment (`scott_jax.digits.evidence`) keeps what: the run order, the CFG scales and
their file tags, the run and eval folders; its writer and its report (`scott_jax.digits.evidence_report`) read
the layout from here."""

from __future__ import annotations

import os

from scott_jax.config import ConfigDict
from scott_jax.digits import distill

EVIDENCE = "evidence"  # WORKDIR/evidence: the teacher rows, the eval inputs, the report
RUNS = "evidence_runs"  # WORKDIR/evidence_runs/<method>_seed<k>: the student runs (`distill.run_dir`)
TEACHER_ROWS = "teacher_rows"
EVAL_CPU = "eval_cpu.json"  # in a run dir: the CPU seconds its evaluation took, {"cpu_seconds": x}


def scale_tag(scale: float) -> str:
  """The file-name tag of a CFG scale: 2.0 -> "g2", 1.5 -> "g1.5"."""
  return f"g{float(scale):g}"


def scales(config: ConfigDict) -> tuple[float, ...]:
  """The CFG scales evaluated: the experiment's ``digits.guidance_scale`` first, then the other
  ``digits.eval_guidance_scales``."""
  d = config.digits
  return (float(d.guidance_scale),) + tuple(float(g) for g in d.eval_guidance_scales if g != d.guidance_scale)


def run_order(config: ConfigDict) -> list[tuple[str, int]]:
  """(method, seed) in training order: the first ``digits.first_methods`` methods seed by seed, then the rest."""
  d = config.digits
  first, rest = list(d.distill_methods[:d.first_methods]), list(d.distill_methods[d.first_methods:])
  return [(m, s) for group in (first, rest) for s in d.distill_seeds for m in group]


def eval_dir(workdir: str, method: str, seed: int, scale: float) -> str:
  """The eval job's WORKDIR for one run and scale: WORKDIR/evidence_runs/<method>_seed<k>/evidence_<tag>."""
  return os.path.join(distill.run_dir(workdir, method, seed, RUNS), f"evidence_{scale_tag(scale)}")
