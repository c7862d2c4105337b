"""SCott on Realistic Vision 5.1 (an SD1.5 fine-tune; paper Tables 4-6, MJHQ-5K).

  python -m scott_jax.main --config configs/rv51_scott.py --workdir runs/rv51_scott
  python -m scott_jax.main --config configs/rv51_scott.py:eta=0.1 --workdir runs/rv51_ddim_eta0.1

Same settings and ablation args as ``configs/sd15_scott.py`` (Table 5: ``eta=...``, Table 6: ``h=...``); only
the teacher differs. The "noVAE" release of RV5.1 ships no VAE: ``model.vae_path`` names a folder whose vae/
holds the SD VAE fine-tuned with MSE (stabilityai/sd-vae-ft-mse), as the RV5.1 model card recommends.
"""

from __future__ import annotations

from scott_jax import config as config_lib
from scott_jax import config_files


def get_config(arg: str | None = None) -> config_lib.ConfigDict:
  c = config_files.load("sd15_scott").get_config(arg)  # the same ablation args, parsed there
  c.model.teacher_path = "models/Realistic_Vision_V5.1_noVAE"
  c.model.vae_path = "models/sd-vae-ft-mse"
  return c
