"""SCott on Stable Diffusion XL: the SD1.5 SCott settings of ``configs/sd15_scott.py`` at 1024 px on an SDXL teacher.

  python -m scott_jax.main --config configs/sdxl_scott.py --workdir runs/sdxl_scott
  python -m scott_jax.main --config configs/sdxl_scott.py:student=lora --workdir runs/sdxl_scott_lora

The teacher is a diffusers Stable Diffusion XL folder (``model.teacher_path``: unet/, vae/, text_encoder/,
text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/; see README "SDXL"); ``model.vae_path`` may name a folder
with a vae/ to use instead of the teacher's (e.g. the fp16-fix VAE; SDXL's own VAE has force_upcast and runs in
float32). The schedule is SD1.5's (scaled_linear 0.00085-0.012, 1000 steps, epsilon), which SDXL base shares.
Micro-conditioning: each example's original size and crop top-left come from the data loader; sampling uses
original = target = 1024, crop (0, 0).

The arg takes ``configs/sd15_scott.py``'s ablation keys (strictly parsed): the default is a full student with the
guidance (w) embedding; ``student=lora`` the LCM-LoRA-style student (rank 64, alpha 64, LCM-LoRA's targets, no w
embedding, student lr 1e-4), whose export is a PEFT LoRA file that diffusers' ``load_lora_weights`` puts on the
SDXL pipeline.
"""

from __future__ import annotations

from scott_jax import config as config_lib
from scott_jax import config_files

TEACHER = "models/stable-diffusion-xl-base-1.0"
RESOLUTION = 1024


def get_config(arg: str | None = None) -> config_lib.ConfigDict:
  sd15 = config_files.load("sd15_scott")
  c = sd15.get_config(arg)  # the SD1.5 SCott settings and the same ablation args
  c.model.teacher_path = TEACHER
  c.data.update(dict(path="data/laion_aesthetics_6plus_1024", resolution=RESOLUTION))
  return c
