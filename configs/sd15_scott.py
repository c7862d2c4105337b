"""SCott on Stable Diffusion 1.5: the paper's settings (AAAI 2025, Implementation Details and Appendix 4).

  python -m scott_jax.main --config configs/sd15_scott.py --workdir runs/sd15_scott
  python -m scott_jax.main --config configs/sd15_scott.py:eta=0.2 --workdir runs/sd15_ddim_eta0.2

ER-SDE noise function 7 (the paper's "ER-SDE 5") at order 2, t_m = t_n - 24 in h = 3 sub-steps, w ~ U[5, 15],
lambda_adv = 0.4, AdamW lr 8e-6 (student) / 2e-5 (LoRA discriminator), batch 40, 40K steps, EMA 0.95.

Memory (issue 13; docs/scaling.md): bfloat16 compute with float32 parameters and optimizer state, attention
"auto" (cuDNN flash attention on a GPU, query-chunked elsewhere, chosen by the backend at trace time), each U-Net
block rematerialised in the backward pass (policy nothing_saveable), so that batch 10 per device (the paper's 4
GPUs) fits an 80 GB device. Override with e.g. ``--config.model.remat=False`` or ``--config.model.dtype=float32
--config.model.attention=xla`` for the plain float32 program.

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

from scott_jax import config as config_lib

ETAS = (0.0, 0.1, 0.2, 0.3, 0.6)
ARGS = {
    "eta": tuple(str(e) for e in ETAS) + ("0",),
    "h": ("1", "2", "3"),
    "gan": ("on", "off"),
    "teacher": ("er_sde", "lcm"),
    "disc": ("lora", "full", "no_cond"),
    "disc_time": ("shared", "paper", "renoise"),
    "student": ("full", "lora"),
}


def parse_arg(arg: str | None) -> dict[str, str]:
  """'k=v,k=v' -> {k: v}; unknown keys, malformed pairs, repeated keys and values outside ARGS raise."""
  out: dict[str, str] = {}
  if not arg:
    return out
  for item in arg.split(","):
    if "=" not in item:
      raise config_lib.ConfigError(f"config arg '{item}' is not key=value; allowed keys: {', '.join(ARGS)}")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in ARGS:
      raise config_lib.ConfigError(f"unknown config arg key '{key}'; allowed keys: {', '.join(ARGS)}")
    if value not in ARGS[key]:
      raise config_lib.ConfigError(f"config arg '{key}' has value '{value}'; allowed: {', '.join(ARGS[key])}")
    if key in out:
      raise config_lib.ConfigError(f"config arg '{key}' given twice")
    out[key] = value
  if "eta" in out and out.get("teacher") == "lcm":
    raise config_lib.ConfigError("config args 'eta' and 'teacher=lcm' conflict (the LCM teacher is DDIM eta 0)")
  return out


def apply_args(c: config_lib.ConfigDict, args: dict[str, str]) -> config_lib.ConfigDict:
  """Applies the parsed ablation args to the config ``c`` (in place) and returns it."""
  if "eta" in args:
    c.solver.name = "ddim"
    c.solver.eta = float(args["eta"])
    c.solver.order = 1
  if "h" in args:
    c.solver.h = int(args["h"])
  if args.get("teacher") == "lcm":
    c.solver.update(dict(name="ddim", eta=0.0, order=1, h=1, skip=20))
  if "gan" in args:
    c.gan.enabled = args["gan"] == "on"
  if "disc" in args:
    c.gan.variant = args["disc"]
  if "disc_time" in args:
    c.gan.disc_time = args["disc_time"]
  if args.get("student") == "lora":
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
  return apply_args(c, parse_arg(arg))
