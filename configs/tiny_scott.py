"""A tiny SD-shaped SCott run for tests and smoke runs on CPU (random tiny U-Net / VAE / CLIP).

  python -c "from scott_jax.testing.tiny_sd import write_tiny_pipeline; write_tiny_pipeline('/tmp/tiny_sd')"
  python -m scott_jax.main --config configs/tiny_scott.py --config.model.teacher_path=/tmp/tiny_sd \
      --workdir /tmp/tiny_run

The pipeline is `scott_jax.testing.tiny_sd.write_tiny_pipeline`'s (U-Net channels (32, 64), a 2-level VAE, a
2-layer CLIP text encoder, 16 tokens per prompt). Batch 2, synthetic data.

The arg takes the same ablation keys as ``configs/sd15_scott.py`` (e.g. ``:eta=0.2``, ``:disc=full``) or
``lcm`` alone (the ``configs/sd15_lcm.py`` settings), so every variant can be run at tiny size
(``:student=lora`` at rank 4, alpha 4).
"""

from __future__ import annotations

from scott_jax import config as config_lib
from scott_jax import config_files


def get_config(arg: str | None = None) -> config_lib.ConfigDict:
  sd15 = config_files.load("sd15_scott")
  args = config_files.parse_arg(arg, lcm=False, **sd15.ARGS)
  if args.pop("lcm"):
    if any(v is not None for v in args.values()):
      raise config_lib.ConfigError("config arg 'lcm' takes no other args (it is configs/sd15_lcm.py's run)")
    c = config_files.load("sd15_lcm").get_config()
  else:
    c = sd15.apply_args(sd15.get_config(), args)
  c.model.teacher_path = ""  # set by the caller: --config.model.teacher_path=<folder of write_tiny_pipeline>
  # The tests compare against float32 references: plain float32 U-Nets, not sd15_scott.py's memory settings.
  c.model.update(dict(dtype="float32", attention="xla", remat=False))
  c.gan.lora_rank = 4
  c.gan.lora_alpha = 4.0
  if c.model.student_lora_rank:  # :student=lora
    c.model.update(dict(student_lora_rank=4, student_lora_alpha=4.0))
  c.optim.update(dict(student_lr=1e-4, disc_lr=2.5e-4, warmup_steps=2))  # the paper's 2.5 ratio
  c.train.update(dict(batch_size=2, num_steps=6, log_every=1, checkpoint_every=3, keep_checkpoints=3,
                      sample_every=0, sample_steps=(1, 2), sample_prompts=("a red circle", "a dark blob")))
  c.data.update(dict(source="synthetic", path="", resolution=32, num_examples=8))
  return c
