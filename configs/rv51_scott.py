"""SCott on Realistic Vision 5.1 (an SD1.5 fine-tune; paper Tables 4-6, MJHQ-5K).

  python -m scott_jax.main --config configs/rv51_scott.py --workdir runs/rv51_scott
  python -m scott_jax.main --config configs/rv51_scott.py:eta=0.1 --workdir runs/rv51_ddim_eta0.1

Same settings and ablation args as ``configs/sd15_scott.py`` (Table 5: ``eta=...``, Table 6: ``h=...``); only
the teacher differs. The "noVAE" release of RV5.1 ships no VAE: ``model.vae_path`` names a folder whose vae/
holds the SD VAE fine-tuned with MSE (stabilityai/sd-vae-ft-mse), as the RV5.1 model card recommends.
"""

from __future__ import annotations

import importlib.util
import os

from scott_jax import config as config_lib


def _sd15():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd15_scott.py")
  spec = importlib.util.spec_from_file_location("_sd15_scott", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None) -> config_lib.ConfigDict:
  c = _sd15().get_config(arg)
  c.model.teacher_path = "models/Realistic_Vision_V5.1_noVAE"
  c.model.vae_path = "models/sd-vae-ft-mse"
  return c
