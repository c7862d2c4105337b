"""U-Net forward time: jitted Flax `UNet2DConditionModel` vs diffusers' PyTorch one (same config, weights,
inputs and thread count). Prints a markdown table with the ratio ours / theirs (below 1: we are faster).

  python benchmarks/unet_forward.py                    # tiny and full SD1.5 configurations on the CPU
  python benchmarks/unet_forward.py --only tiny        # tiny only
  taskset -c 0,1 python benchmarks/unet_forward.py     # pinned to two cores (both libraries follow)
  python benchmarks/unet_forward.py --gpu --dtype bfloat16 --attention xla cudnn   # CUDA, both on the GPU

Timing: one warm-up call each (compilation for JAX), then the median of --repeats calls, JAX and torch
interleaved so that background load hits both alike. torch runs under `no_grad` in eval mode with
`torch.set_num_threads(n)`, n = the CPUs this process may run on (XLA's CPU client sizes its pool the same
way). With --dtype bfloat16 both compute in bf16 (our parameters stay float32, torch's model is cast).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

try:  # a CUDA torchvision wheel next to CPU torch fails to import; hide it
  import torchvision  # noqa: F401
except (ImportError, RuntimeError, OSError):
  sys.modules["torchvision"] = None

import diffusers  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from scott_jax.models import loading, unet  # noqa: E402

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8)
SD15 = dict(sample_size=64, cross_attention_dim=768)  # diffusers defaults are the SD1.5 U-Net otherwise
CASES = {"tiny": (TINY, [(32, 2), (64, 2)]), "sd15": (SD15, [(32, 1), (64, 1), (64, 2)])}


def _time(fn, repeats: int) -> list[float]:
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def bench(name: str, kwargs: dict, shapes: list[tuple[int, int]], attentions: list[str], repeats: int,
          gpu: bool, dtype: str) -> None:
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**kwargs).eval()
  config = unet.UNetConfig.from_diffusers(dict(model.config))
  params = loading.convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()},
                                      unet.abstract_params(config))
  dev = torch.device("cuda" if gpu else "cpu")
  model = model.to(dev, getattr(torch, dtype))
  sync = torch.cuda.synchronize if gpu else (lambda: None)
  ctx_dim = config.cross_attention_dim
  for size, batch in shapes:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, 4), np.float32)
    t = np.full((batch,), 500, np.int64)
    ctx = rng.standard_normal((batch, 77, ctx_dim), np.float32)
    tdt = getattr(torch, dtype)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev, tdt)
    tt, ct = torch.from_numpy(t).to(dev), torch.from_numpy(ctx).to(dev, tdt)

    def run_torch(xt=xt, tt=tt, ct=ct):
      with torch.no_grad():
        out = model(xt, tt, ct).sample
      sync()
      return out

    ref = run_torch().float().cpu().numpy().transpose(0, 2, 3, 1)
    for attention in attentions:
      module = unet.UNet2DConditionModel(config, dtype=getattr(jax.numpy, dtype), attention=attention)
      fn = jax.jit(module.apply)
      xj, tj, cj = jax.device_put((x, t, ctx))
      t0 = time.perf_counter()
      out = fn(params, xj, tj, cj).block_until_ready()
      compile_s = time.perf_counter() - t0
      err = float(np.abs(np.asarray(out) - ref).max() / max(1.0, np.abs(ref).max()))
      ours, theirs = [], []
      for _ in range(repeats):
        ours += _time(lambda fn=fn, xj=xj, tj=tj, cj=cj: fn(params, xj, tj, cj).block_until_ready(), 1)
        theirs += _time(run_torch, 1)
      mo, mt = statistics.median(ours), statistics.median(theirs)
      print(f"| {name} | {size}x{size} | {batch} | {dtype} | {attention} | {mo * 1e3:.1f} | {mt * 1e3:.1f} "
            f"| {mo / mt:.2f} | {compile_s:.1f} | {err:.1e} |", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", choices=sorted(CASES), default=None)
  parser.add_argument("--repeats", type=int, default=None, help="timed calls (default: 10 tiny, 3 sd15)")
  parser.add_argument("--attention", nargs="+", default=["xla", "chunked"])
  parser.add_argument("--gpu", action="store_true", help="both on CUDA (JAX's default backend must be GPU)")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--shapes", nargs="+", default=None, metavar="SIZExBATCH",
                      help="latent size and batch pairs, e.g. 32x1 64x2 (default: per configuration)")
  args = parser.parse_args()
  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  if not args.gpu:
    jax.config.update("jax_platforms", "cpu")
  print(f"machine: {platform.machine()}, {threads} of {os.cpu_count()} CPUs usable; jax {jax.__version__} "
        f"({jax.devices()[0].device_kind}), torch {torch.__version__} with {torch.get_num_threads()} threads"
        f"{' on ' + torch.cuda.get_device_name() if args.gpu else ''}, diffusers {diffusers.__version__}; "
        f"load average {os.getloadavg()[0]:.1f}")
  print("| config | latent | batch | dtype | attention | ours ms | torch ms | ours/torch | compile s "
        "| max rel err |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for name, (kwargs, shapes) in CASES.items():
    if args.only in (None, name):
      repeats = args.repeats or (10 if name == "tiny" else 3)
      if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
      bench(name, kwargs, shapes, args.attention, repeats, args.gpu, args.dtype)


if __name__ == "__main__":
  main()
