"""The LCM baseline on Stable Diffusion XL (LCM-SDXL's ODE teacher), trained by the same code as SCott.

  python -m scott_jax.main --config configs/sdxl_lcm.py --workdir runs/sdxl_lcm
  python -m scott_jax.main --config configs/sdxl_lcm.py:student=lora --workdir runs/sdxl_lcm_lora

``configs/sd15_lcm.py`` on the SDXL teacher of ``configs/sdxl_scott.py`` at 1024 px: DDIM eta 0 in one step
(h = 1) from t_n to t_m = t_n - 20, w ~ U[5, 15], no adversarial loss (``gan=on``: lambda_adv 0.4 and the LoRA
discriminator). ``student=lora``: LCM-LoRA (rank 64, no w embedding, lr 1e-4).
"""

from __future__ import annotations

from scott_jax import config as config_lib
from scott_jax import config_files


def get_config(arg: str | None = None) -> config_lib.ConfigDict:
  args = config_files.parse_arg(arg, gan=("off", ("on", "off")), student=(None, ("full", "lora")))
  extra = f",student={args['student']}" if args["student"] else ""
  c = config_files.load("sdxl_scott").get_config(f"teacher=lcm,gan={args['gan']}{extra}")
  if args["gan"] == "off":
    c.gan.lambda_adv = 0.0
  return c
