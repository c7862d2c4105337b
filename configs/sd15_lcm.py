"""The LCM baseline on Stable Diffusion 1.5 (paper Tables 2 and 7), trained by the same code as SCott.

  python -m scott_jax.main --config configs/sd15_lcm.py --workdir runs/sd15_lcm
  python -m scott_jax.main --config configs/sd15_lcm.py:gan=on --workdir runs/sd15_lcm_gan

The ODE teacher of LCM: DDIM with eta 0 in one step (h = 1) from t_n to t_m = t_n - 20 (the LCM script's
50-step skipping grid), w ~ U[5, 15], no adversarial loss (lambda_adv = 0). The arg ``gan=on`` gives Table 7's
"LCM + GAN" (lambda_adv 0.4 and the LoRA discriminator), as ``configs/sd15_scott.py:teacher=lcm``.
"""

from __future__ import annotations

from scott_jax import config as config_lib
from scott_jax import config_files


def get_config(arg: str | None = None) -> config_lib.ConfigDict:
  args = config_files.parse_arg(arg, gan=("off", ("on", "off")))
  c = config_files.load("sd15_scott").get_config(f"teacher=lcm,gan={args['gan']}")
  if args["gan"] == "off":
    c.gan.lambda_adv = 0.0
  return c
