"""The PyTorch peer: one LCM distillation train step as diffusers' consistency-distillation example does it.

Written for this benchmark from the published algorithm of diffusers'
``examples/consistency_distillation/train_lcm_distill_sd_wds.py`` (full-model LCD for SD1.5); no code is taken
from it. Per step, on a batch of B images (B, 3, R, R) in [-1, 1] and B token-id rows:

  1. text states from the frozen CLIP text encoder (no grad; weight dtype);
  2. latents = VAE posterior sample x scaling factor (frozen VAE, cast to the weight dtype as the script does);
  3. per example an index on the 50-step DDIM grid (t_start = (i + 1) * 20 - 1), t = max(t_start - 20, 0), the
     LCM boundary scalings (c_skip, c_out, sigma_data 0.5, timestep scaling 10) at both, noise, z = add_noise;
  4. w ~ U[5, 15] and its 256-d sinusoidal embedding (w * 1000, the U-Net's timestep_cond);
  5. the student U-Net (float32 weights, bf16 autocast, with gradient) on (z, t_start, text, w-embedding) ->
     x0 prediction -> c_skip z + c_out x0;
  6. no grad, autocast: the teacher U-Net (weight dtype) twice, on the prompt and on the empty prompt, CFG in the
     LCM form on both x0 and eps (cond + w (cond - uncond)), one DDIM step to the previous grid point;
  7. no grad, autocast: the EMA target U-Net at (x_prev, t) -> target c_skip x_prev + c_out x0;
  8. MSE loss, backward, gradient clipping to norm 1, AdamW step, zero grads, EMA update of the target (0.95).

Random weights of the named shapes (sd15: diffusers' default U-Net = SD1.5 with time_cond_proj_dim 256, the SD
VAE, CLIP ViT-L/14 text encoder; tiny: the test pipeline's shapes). ``--compile on`` wraps the student, teacher
and target U-Nets in ``torch.compile`` (the script's accelerate dynamo option compiles the student). Reports the
median step time of ``--repeats`` steps after ``--warmup`` steps, images/s and the peak CUDA memory.

  python benchmarks/peer_lcm_torch.py --size tiny --resolution 32 --batch 2             # CPU, seconds
  python benchmarks/peer_lcm_torch.py --size sd15 --resolution 512 --batch 10 --compile off on   # one GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

try:  # a CUDA torchvision wheel next to CPU torch fails to import; hide it
  import torchvision  # noqa: F401
except (ImportError, RuntimeError, OSError):
  sys.modules["torchvision"] = None

import diffusers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampling import _configs  # noqa: E402  (the tiny / sd15 module configs)

NUM_DDIM, NUM_TRAIN, W_MIN, W_MAX, EMA, COND_DIM = 50, 1000, 5.0, 15.0, 0.95, 256


def guidance_embedding(w: torch.Tensor, dim: int = COND_DIM) -> torch.Tensor:
  """Sinusoidal embedding of w * 1000: [sin, cos] of w * 1000 * 10000^(-k / (dim/2 - 1)), (B, dim) float32."""
  half = dim // 2
  freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=w.device) / (half - 1))
  arg = (w.float() * 1000.0)[:, None] * freqs[None]
  return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


def boundary(t: torch.Tensor, sigma_data: float = 0.5, scale: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
  """LCM boundary conditions (c_skip, c_out) at timesteps t, shaped (B, 1, 1, 1)."""
  s = scale * t.float()
  c_skip = sigma_data**2 / (s**2 + sigma_data**2)
  c_out = s / torch.sqrt(s**2 + sigma_data**2)
  return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


class Peer:
  """The frozen and trained modules, optimizer and schedule of one LCD run (random weights)."""

  def __init__(self, size: str, device: str, weight_dtype: torch.dtype, compiled: bool) -> None:
    unet_kw, vae_kw, text_kw, self.max_len = _configs(size)
    torch.manual_seed(0)
    self.device, self.wdtype = device, weight_dtype
    teacher = diffusers.UNet2DConditionModel(**unet_kw)
    self.student = diffusers.UNet2DConditionModel(time_cond_proj_dim=COND_DIM, **unet_kw)
    self.student.load_state_dict(teacher.state_dict(), strict=False)
    self.target = copy.deepcopy(self.student).requires_grad_(False)
    self.teacher = teacher.requires_grad_(False).to(device, weight_dtype)
    self.vae = diffusers.AutoencoderKL(**vae_kw).requires_grad_(False).to(device, weight_dtype)
    self.text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=49408, hidden_act="quick_gelu", eos_token_id=49407, **text_kw)).requires_grad_(False)
    self.text = self.text.to(device, weight_dtype)
    self.student.to(device).train()
    self.target.to(device)
    self.opt = torch.optim.AdamW(self.student.parameters(), lr=1e-6, weight_decay=0.0)
    self.fwd_student, self.fwd_teacher, self.fwd_target = self.student, self.teacher, self.target
    if compiled:
      self.fwd_student, self.fwd_teacher, self.fwd_target = (torch.compile(m) for m in
                                                             (self.student, self.teacher, self.target))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, NUM_TRAIN, dtype=torch.float64) ** 2  # scaled_linear
    abar = torch.cumprod(1.0 - betas, 0)
    self.alpha, self.sigma = abar.sqrt().float().to(device), (1 - abar).sqrt().float().to(device)
    k = NUM_TRAIN // NUM_DDIM
    self.grid = (torch.arange(1, NUM_DDIM + 1) * k - 1).to(device)  # the DDIM solver's timesteps
    prev = torch.cat([abar[:1], abar[self.grid.cpu()[:-1]]])
    self.abar_prev = prev.float().to(device)
    self.skip = k
    with torch.no_grad():
      empty = torch.zeros((1, self.max_len), dtype=torch.long, device=device)
      self.uncond = self.text(empty)[0]

  def _x0(self, eps: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a, s = self.alpha[t].view(-1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1)
    return (z - s * eps) / a

  def step(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    dev, b = self.device, images.shape[0]
    autocast = torch.autocast(dev.split(":")[0], dtype=self.wdtype, enabled=self.wdtype != torch.float32)
    with torch.no_grad():
      text = self.text(ids)[0]
      latents = self.vae.encode(images.to(self.wdtype)).latent_dist.sample() * self.vae.config.scaling_factor
    latents = latents.float()
    index = torch.randint(0, NUM_DDIM, (b,), device=dev)
    t_start = self.grid[index]
    t = torch.clamp(t_start - self.skip, min=0)
    cs_start, co_start = boundary(t_start)
    cs, co = boundary(t)
    noise = torch.randn_like(latents)
    a, s = self.alpha[t_start].view(-1, 1, 1, 1), self.sigma[t_start].view(-1, 1, 1, 1)
    z = a * latents + s * noise
    w = W_MIN + (W_MAX - W_MIN) * torch.rand((b,), device=dev)
    w_emb = guidance_embedding(w)
    w4 = w.view(-1, 1, 1, 1)
    with autocast:
      eps_student = self.fwd_student(z, t_start, encoder_hidden_states=text.float(), timestep_cond=w_emb).sample
    pred = cs_start * z + co_start * self._x0(eps_student.float(), z, t_start)
    with torch.no_grad(), autocast:
      eps_c = self.fwd_teacher(z.to(self.wdtype), t_start, encoder_hidden_states=text.to(self.wdtype)).sample.float()
      eps_u = self.fwd_teacher(z.to(self.wdtype), t_start,
                               encoder_hidden_states=self.uncond.expand(b, -1, -1).to(self.wdtype)).sample.float()
      x0_c, x0_u = self._x0(eps_c, z, t_start), self._x0(eps_u, z, t_start)
      x0 = x0_c + w4 * (x0_c - x0_u)
      eps = eps_c + w4 * (eps_c - eps_u)
      ap = self.abar_prev[index].view(-1, 1, 1, 1)
      x_prev = ap.sqrt() * x0 + (1 - ap).sqrt() * eps
      eps_target = self.fwd_target(x_prev.float(), t, encoder_hidden_states=text.float(), timestep_cond=w_emb).sample
      target = cs * x_prev + co * self._x0(eps_target.float(), x_prev, t)
    loss = torch.nn.functional.mse_loss(pred.float(), target.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    with torch.no_grad():
      tp, sp = list(self.target.parameters()), list(self.student.parameters())
      torch._foreach_mul_(tp, EMA)
      torch._foreach_add_(tp, sp, alpha=1 - EMA)
    return loss.detach()


def run(size: str, batch: int, resolution: int, compiled: bool, repeats: int, warmup: int, device: str,
        dtype: str) -> dict:
  wdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
  peer = Peer(size, device, wdtype, compiled)
  gen = torch.Generator(device="cpu").manual_seed(0)
  images = (torch.rand((batch, 3, resolution, resolution), generator=gen) * 2 - 1).to(device)
  ids = torch.randint(0, 49407, (batch, peer.max_len), generator=gen).to(device)
  sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
  if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  for _ in range(warmup):
    loss = peer.step(images, ids)
  sync()
  warm_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    loss = peer.step(images, ids)
    sync()
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
  return {"size": size, "batch": batch, "resolution": resolution, "compile": compiled, "dtype": dtype,
          "step_s": step_s, "images_per_s": batch / step_s, "warmup_s": warm_s, "peak_bytes": int(peak),
          "loss_finite": bool(torch.isfinite(loss).item())}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=("tiny", "sd15"), default="tiny")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--resolution", type=int, default=32)
  parser.add_argument("--compile", nargs="+", choices=("off", "on"), default=["off"])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                      help="weight dtype of the frozen models and the autocast dtype (the script's mixed_precision)")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
  print(f"# PyTorch LCD peer step: torch {torch.__version__}, diffusers {diffusers.__version__}, {name}; "
        f"{args.size}, batch {args.batch}, {args.resolution} px, {args.dtype} autocast", flush=True)
  print("| torch.compile | step (ms) | images/s | peak memory (GiB) | warm-up (s) | loss finite |")
  print("|---|---|---|---|---|---|", flush=True)
  rows = []
  for mode in args.compile:
    r = run(args.size, args.batch, args.resolution, mode == "on", args.repeats, args.warmup, device, args.dtype)
    rows.append(r)
    print(f"| {mode} | {1e3 * r['step_s']:.1f} | {r['images_per_s']:.2f} | {r['peak_bytes'] / 2**30:.2f} | "
          f"{r['warmup_s']:.1f} | {r['loss_finite']} |", flush=True)
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(rows, fh, indent=1)


if __name__ == "__main__":
  main()
