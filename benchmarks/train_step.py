"""SCott and LCM train-step time in units of one teacher U-Net forward at the same shape.

  python benchmarks/train_step.py                 # tiny (the test pipeline) and mid-size U-Nets, CPU
  python benchmarks/train_step.py --only tiny --repeats 5

Both steps get the same batch of images (VAE encode and text encode inside the step, as in a run without the
latent cache). The unit is one jitted forward of the teacher U-Net on the step's latents and text states
(batch B, no CFG doubling). Expected work per step, in forwards: SCott = teacher h sub-steps x 2 (CFG) + EMA
target + student forward and backward (~3) + discriminator (frozen encoder + LoRA decoder on real and fake,
forward and backward); LCM = 2 + 1 + 3 with no discriminator. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from scott_jax import config as config_lib
from scott_jax import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny_scott  # noqa: E402

MID_UNET = dict(block_out_channels=(64, 128, 256), layers_per_block=2, norm_num_groups=32, cross_attention_dim=32,
                attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2)


def write_pipeline(folder: str, size: str) -> str:
  """The tiny test pipeline; for "mid" its U-Net is replaced by a 3-level one (64, 128, 256 channels)."""
  tiny_scott.write_tiny_pipeline(folder)
  if size == "mid":
    import diffusers
    import torch

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, **MID_UNET)
    shutil.rmtree(os.path.join(folder, "unet"))
    unet.save_pretrained(os.path.join(folder, "unet"))
  return folder


def _time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench(folder: str, arg: str | None, batch_size: int, repeats: int) -> tuple[float, float]:
  """(step seconds, U-Net forward seconds) for tiny_scott's config ``arg`` on ``folder``."""
  c = tiny_scott.get_config(arg)
  c.model.teacher_path = folder
  c.train.batch_size = batch_size
  config_lib.validate(c)
  models, frozen = train_lib.load_models(c)
  source = train_lib.make_source(c)
  batch = train_lib.prepare_batch(source.batch(0), models)
  state = train_lib.init_state(c, models, frozen, batch)
  step = jax.jit(train_lib.make_train_step(c, models), donate_argnums=(0,))
  state, _ = step(state, batch, frozen)  # compile + warm-up

  holder = {"state": state}

  def run_step():
    holder["state"], metrics = step(holder["state"], batch, frozen)
    return metrics

  t_step = _time(run_step, repeats)
  latents, text, _ = train_lib.encode_batch(models, frozen, batch, None)
  t = np.full((latents.shape[0],), 500, np.int32)
  fwd = jax.jit(lambda p, z, t, ctx: models.teacher.apply(p, z, t, ctx))
  jax.block_until_ready(fwd(frozen["unet"], latents, t, text))
  t_fwd = _time(lambda: fwd(frozen["unet"], latents, t, text), repeats)
  return t_step, t_fwd


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", choices=("tiny", "mid"), default=None)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  sizes = [args.only] if args.only else ["tiny", "mid"]
  print(f"# train step / U-Net forward ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}, backend {jax.default_backend()}, batch {args.batch}, 16x16 latents)")
  print("| U-Net | step | step (ms) | U-Net forward (ms) | step / forward |")
  print("|---|---|---|---|---|")
  for size in sizes:
    with tempfile.TemporaryDirectory() as tmp:
      folder = write_pipeline(os.path.join(tmp, "sd"), size)
      for name, arg in (("SCott (ER-SDE h 3, GAN)", None), ("LCM (DDIM, h 1, no GAN)", "lcm")):
        t_step, t_fwd = bench(folder, arg, args.batch, args.repeats)
        print(f"| {size} | {name} | {1e3 * t_step:.1f} | {1e3 * t_fwd:.1f} | {t_step / t_fwd:.1f} |", flush=True)


if __name__ == "__main__":
  main()
