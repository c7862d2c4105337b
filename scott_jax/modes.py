"""The mode registry: mode name -> the function that runs it, imported by name on first use.

Every mode function takes ``(config, workdir)`` (and may take keyword arguments of its own, e.g. mode train's
in-memory ``source``). Modes are imported lazily so that ``--help`` and config validation do not pay for the
jax/flax imports, and so that no module imports another mode's module: the CLI (`scott_jax.main`) and the digits
stage that runs the trainer both reach a mode through `resolve`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from scott_jax.config import ConfigError

MODES: dict[str, str] = {
    "sample_teacher": "scott_jax.analytic:run_sample_teacher",
    "train": "scott_jax.train:run_train",
    "toy2d": "scott_jax.toy2d:run_toy2d",
    "digits": "scott_jax.digits.run:run_digits",
    "evidence": "scott_jax.digits.evidence:run_evidence",
    "sample": "scott_jax.sample:run_sample",
    "export": "scott_jax.export:run_export",
    "eval": "scott_jax.evaluate:run_eval",
    "fid_stats": "scott_jax.evaluate:run_fid_stats",
    "plan": "scott_jax.plan:run_plan",
}


def resolve(name: str) -> Callable:
  """Returns the function registered for mode ``name``; raises ConfigError listing the modes otherwise."""
  if name not in MODES:
    raise ConfigError(f"unknown mode '{name}'; available modes: {', '.join(sorted(MODES))}")
  module, fn = MODES[name].split(":")
  return getattr(importlib.import_module(module), fn)
