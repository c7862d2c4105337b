"""Solver demo: sample Gaussian toy data with any teacher solver and the exact analytic eps.

  python -m scott_jax.main --config configs/solver_demo.py --workdir runs/solver_demo
  python -m scott_jax.main --config configs/solver_demo.py:er_sde --config.sample_teacher.num_steps=25

The arg picks a solver preset: ddim (eta 0), ddpm (ddim, eta 1), er_sde (noise fn 7, order 2, the paper's
"ER-SDE 5"), dpmpp_2m, addim.
"""

from scott_jax import config as config_lib

PRESETS = {
    "ddim": dict(solver="ddim", eta=0.0),
    "ddpm": dict(solver="ddim", eta=1.0),
    "er_sde": dict(solver="er_sde", order=2, noise_fn=7),
    "dpmpp_2m": dict(solver="dpmpp_2m"),
    "addim": dict(solver="addim"),
}


def get_config(arg: str | None = None) -> config_lib.ConfigDict:
  preset = arg or "er_sde"
  if preset not in PRESETS:
    raise config_lib.ConfigError(f"unknown solver_demo preset '{preset}'; allowed: {', '.join(PRESETS)}")
  c = config_lib.defaults()
  c.default_mode = "sample_teacher"
  c.sample_teacher.update(PRESETS[preset])
  return c
