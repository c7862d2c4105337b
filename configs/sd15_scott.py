"""SCott on Stable Diffusion 1.5: the paper's settings (AAAI 2025, Implementation Details and Appendix 4).

  python -m scott_jax.main --config configs/sd15_scott.py --workdir runs/sd15_scott
  python -m scott_jax.main --config configs/sd15_scott.py:eta=0.2 --workdir runs/sd15_ddim_eta0.2

ER-SDE noise function 7 (the paper's "ER-SDE 5") at order 2, t_m = t_n - 24 in h = 3 sub-steps, w ~ U[5, 15],
lambda_adv = 0.4, AdamW lr 8e-6 (student) / 2e-5 (LoRA discriminator), batch 40, 40K steps, EMA 0.95.

Memory (issue 13; docs/scaling.md): bfloat16 compute with float32 parameters and optimizer state, attention
"auto" (cuDNN flash attention on a GPU, query-chunked elsewhere, chosen by the backend at trace time), each U-Net
block rematerialised in the backward pass (policy nothing_saveable), so that batch 10 per device (the paper's 4
GPUs) fits an 80 GB device (the CPU plan: 45.5 GiB peak estimate per device). Override with e.g.
``--config.model.remat=False`` or ``--config.model.dtype=float32 --config.model.attention=xla`` for the plain
float32 program.

The arg selects the ablations of Tables 5-7 as comma-separated key=value pairs (strictly parsed):
  eta=0|0.1|0.2|0.3|0.6   DDIM-eta teacher instead of ER-SDE (Table 5)
  h=1|2|3                 teacher sub-steps (Table 6)
  gan=on|off              without GAN (Table 7, "SCott (Without GAN)")
  teacher=er_sde|lcm      lcm: the LCM teacher (DDIM eta 0, h 1, skip 20); with gan=on that is "LCM + GAN"
  disc=lora|full|no_cond  full discriminator / without condition (Table 7)
  disc_time=shared|paper|renoise   what time the discriminator sees (notes section 5, DECISION)
  student=full|lora       lora: an LCM-LoRA style student (rank 64, alpha 64, LCM-LoRA's targets, no guidance
                          embedding: w only in the teacher's CFG; student lr 1e-4 as the LCM-LoRA script's example)
e.g. ``configs/sd15_scott.py:eta=0.2``, ``:h=1``, ``:gan=off``, ``:teacher=lcm``, ``:disc=full,gan=on``.
"""

from __future__ import annotations

from scott_jax import choices
from scott_jax import config as config_lib
from scott_jax.config_files import parse_arg

# The ablation args (scott_jax.config_files.parse_arg): (default, allowed); None = not given.
ETAS = (0.0, 0.1, 0.2, 0.3, 0.6)
ARGS = dict(
    eta=(None, ETAS),
    h=(None, (1, 2, 3)),
    gan=(None, ("on", "off")),
    teacher=(None, ("er_sde", "lcm")),
    disc=(None, choices.VARIANTS),
    disc_time=(None, choices.DISC_TIMES),
    student=(None, ("full", "lora")),
)


def apply_args(c: config_lib.ConfigDict, args: dict[str, object]) -> config_lib.ConfigDict:
  """Applies the parsed ablation args (``parse_arg(arg, **ARGS)``) to the config ``c`` (in place); returns it."""
  if args["eta"] is not None and args["teacher"] == "lcm":
    raise config_lib.ConfigError("config args 'eta' and 'teacher=lcm' conflict (the LCM teacher is DDIM eta 0)")
  if args["eta"] is not None:
    c.solver.name = "ddim"
    c.solver.eta = args["eta"]
    c.solver.order = 1
  if args["h"] is not None:
    c.solver.h = args["h"]
  if args["teacher"] == "lcm":
    c.solver.update(dict(name="ddim", eta=0.0, order=1, h=1, skip=20))
  if args["gan"] is not None:
    c.gan.enabled = args["gan"] == "on"
  if args["disc"] is not None:
    c.gan.variant = args["disc"]
  if args["disc_time"] is not None:
    c.gan.disc_time = args["disc_time"]
  if args["student"] == "lora":
    c.model.update(dict(student_lora_rank=64, student_lora_alpha=64.0))
    c.consistency.guidance_embed_dim = 0
    c.optim.student_lr = 1e-4
  return c


def get_config(arg: str | None = None) -> config_lib.ConfigDict:
  c = config_lib.defaults()  # the defaults are the SD1.5 paper settings
  c.default_mode = "train"
  c.model.teacher_path = "models/stable-diffusion-v1-5"
  c.solver.update(dict(name="er_sde", order=2, noise_fn=7, skip=24, h=3, eta=0.0))
  c.consistency.update(dict(w_min=5.0, w_max=15.0, ema_decay=0.95, distance="l2"))
  c.gan.update(dict(enabled=True, lambda_adv=0.4, variant="lora"))
  c.optim.update(dict(student_lr=8e-6, disc_lr=2e-5, grad_clip=1.0))
  c.train.update(dict(batch_size=40, num_steps=40_000))
  c.data.update(dict(source="folder", path="data/laion_aesthetics_6plus", resolution=512))
  c.model.update(dict(dtype="bfloat16", attention="auto", remat=True, remat_policy="nothing_saveable"))
  return apply_args(c, parse_arg(arg, **ARGS))
