"""Solver demo: sample Gaussian toy data with any teacher solver and the exact analytic eps.

  python -m scott_jax.main --config configs/solver_demo.py --workdir runs/solver_demo
  python -m scott_jax.main --config configs/solver_demo.py:er_sde --config.sample_teacher.num_steps=25

The arg picks a solver preset: ddim (eta 0), ddpm (ddim, eta 1), er_sde (noise fn 7, order 2, the paper's
"ER-SDE 5"), dpmpp_2m, addim.
"""

from scott_jax import config as config_lib
from scott_jax.config_files import parse_arg

PRESETS = {
    "ddim": dict(solver="ddim", eta=0.0),
    "ddpm": dict(solver="ddim", eta=1.0),
    "er_sde": dict(solver="er_sde", order=2, noise_fn=7),
    "dpmpp_2m": dict(solver="dpmpp_2m"),
    "addim": dict(solver="addim"),
}


def get_config(arg: str | None = None) -> config_lib.ConfigDict:
  preset = parse_arg(arg, positional="preset", preset=("er_sde", tuple(PRESETS)))["preset"]
  c = config_lib.defaults()
  c.default_mode = "sample_teacher"
  c.sample_teacher.update(PRESETS[preset])
  return c
