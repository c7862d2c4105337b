"""The LCM baseline on Stable Diffusion 1.5 (paper Tables 2 and 7), trained by the same code as SCott.

  python -m scott_jax.main --config configs/sd15_lcm.py --workdir runs/sd15_lcm
  python -m scott_jax.main --config configs/sd15_lcm.py:gan=on --workdir runs/sd15_lcm_gan

The ODE teacher of LCM: DDIM with eta 0 in one step (h = 1) from t_n to t_m = t_n - 20 (the LCM script's
50-step skipping grid), w ~ U[5, 15], no adversarial loss (lambda_adv = 0). The arg ``gan=on`` gives Table 7's
"LCM + GAN" (lambda_adv 0.4 and the LoRA discriminator), as ``configs/sd15_scott.py:teacher=lcm``.
"""

from __future__ import annotations

import importlib.util
import os

from scott_jax import config as config_lib

ARGS = {"gan": ("on", "off")}


def _sd15():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd15_scott.py")
  spec = importlib.util.spec_from_file_location("_sd15_scott", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None) -> config_lib.ConfigDict:
  sd15 = _sd15()
  args = {"gan": "off"}
  for key, value in _parse(arg).items():
    args[key] = value
  c = sd15.get_config(f"teacher=lcm,gan={args['gan']}")
  if args["gan"] == "off":
    c.gan.lambda_adv = 0.0
  return c


def _parse(arg: str | None) -> dict[str, str]:
  out: dict[str, str] = {}
  for item in (arg or "").split(",") if arg else []:
    if "=" not in item:
      raise config_lib.ConfigError(f"config arg '{item}' is not key=value; allowed keys: {', '.join(ARGS)}")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in ARGS:
      raise config_lib.ConfigError(f"unknown config arg key '{key}'; allowed keys: {', '.join(ARGS)}")
    if value not in ARGS[key]:
      raise config_lib.ConfigError(f"config arg '{key}' has value '{value}'; allowed: {', '.join(ARGS[key])}")
    out[key] = value
  return out
