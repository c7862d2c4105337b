"""Text-to-image seconds per image: our jitted student sampler vs diffusers' LatentConsistencyModelPipeline.

Both run the whole generation (CLIP text encoder, 1/2/4 LCM steps of the w-conditioned U-Net, VAE decode) on
the same random-weight pipeline: diffusers modules built from a config with `torch.manual_seed(0)`, converted
in memory to our Flax parameters (`scott_jax.models.loading.convert_state_dict`), the same prompts and
initial latents. Ours: `scott_jax.pipeline.make_sampler` (one jitted function per step count; token ids
precomputed), the first call (compilation) excluded, then the median of ``--repeats`` calls. Theirs:
``pipe(prompt, latents=..., num_inference_steps=k, output_type="np")`` under ``torch.no_grad`` (tokenization
and numpy post-processing included, a few ms), one warm-up call, median of ``--repeats`` calls, interleaved
with ours. The ratio ours/theirs below 1 means we are faster. Configurations:

  tiny  the test pipeline (configs/tiny_scott.py shapes: U-Net channels (32, 64), 2-level VAE, 2-layer CLIP)
  sd15  Stable Diffusion 1.5 shapes (860M U-Net with time_cond_proj_dim 256, SD VAE, CLIP ViT-L/14 text
        encoder, 77 tokens), random weights

  python benchmarks/sampling.py --only tiny --resolution 32 --batch 2
  python benchmarks/sampling.py --only sd15 --resolution 256 --batch 1 --repeats 2      # CPU
  python benchmarks/sampling.py --only sd15 --resolution 512 --batch 4 --gpu           # one GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

try:  # a CUDA torchvision wheel next to CPU torch fails to import; hide it
  import torchvision  # noqa: F401
except (ImportError, RuntimeError, OSError):
  sys.modules["torchvision"] = None

import diffusers  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a bowl of ramen with a soft-boiled egg",
           "a cozy cabin in a snowy forest at dusk", "a close-up portrait of a fluffy orange cat"]


def _configs(name: str) -> tuple[dict, dict, dict, int]:
  """(unet kwargs, vae kwargs, CLIP text kwargs, max tokens) of a configuration."""
  if name == "tiny":
    unet = dict(sample_size=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
                layers_per_block=1, norm_num_groups=16, cross_attention_dim=32, attention_head_dim=8)
    vae = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
               block_out_channels=(32, 64), norm_num_groups=16, latent_channels=4, sample_size=32)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16)
    return unet, vae, text, 16
  unet = dict(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are the SD1.5 U-Net
  vae = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512)
  text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77)
  return unet, vae, text, 77


def _write_byte_tokenizer(tok_dir: str) -> None:
  """A CLIP tokenizer folder with the byte-level vocabulary only (no merges): the fallback where open_clip (which
  `configs/tiny_scott.py` reads the BPE merges from) is missing, e.g. the GPU machine. Prompts then tokenize to
  one id per character; both pipelines get the same ids, so the timing comparison is unchanged."""
  import json

  from transformers.models.clip.tokenization_clip import bytes_to_unicode

  chars = list(bytes_to_unicode().values())
  vocab = chars + [ch + "</w>" for ch in chars] + ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(tok_dir, exist_ok=True)
  with open(os.path.join(tok_dir, "vocab.json"), "w") as fh:
    json.dump({t: i for i, t in enumerate(vocab)}, fh)
  with open(os.path.join(tok_dir, "merges.txt"), "w") as fh:
    fh.write("#version: 0.2\n")


def build(name: str, folder: str, half: bool = False):
  """(diffusers LCM pipeline, our Pipeline, our params) with the same random weights. ``half``: our networks
  compute in bfloat16 with attention "auto" (cuDNN flash attention on a GPU); the caller casts diffusers' to
  float16."""
  import json

  from scott_jax import pipeline as pipeline_lib
  from scott_jax.models import loading
  from scott_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, prepare_clip_text_state_dict
  from scott_jax.models.unet import UNet2DConditionModel, UNetConfig
  from scott_jax.models.unet import abstract_params as unet_abstract
  from scott_jax.models.vae import AutoencoderKL, VAEConfig, prepare_vae_state_dict
  from scott_jax.schedules import NoiseSchedule

  unet_kw, vae_kw, text_kw, max_len = _configs(name)
  tok_dir = os.path.join(folder, "tokenizer")
  try:
    from scott_jax.testing.tiny_sd import write_clip_tokenizer

    write_clip_tokenizer(tok_dir)
  except ImportError:  # no open_clip
    _write_byte_tokenizer(tok_dir)
  with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as fh:
    json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_len}, fh)
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(time_cond_proj_dim=256, **unet_kw).eval()
  vae = diffusers.AutoencoderKL(**vae_kw).eval()
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=49408, hidden_act="quick_gelu",
                                                                eos_token_id=49407, **text_kw)).eval()
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
  sched = diffusers.LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
  pipe = diffusers.LatentConsistencyModelPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                                  scheduler=sched, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
  np_sd = lambda m: {k: v.detach().cpu().numpy() for k, v in m.state_dict().items()}  # noqa: E731
  ucfg = UNetConfig.from_diffusers(dict(unet.config))
  vcfg = VAEConfig.from_dict(dict(vae.config))
  tcfg = CLIPTextConfig.from_dict(text.config.to_dict())
  dtype = jax.numpy.bfloat16 if half else jax.numpy.float32
  jvae, jtext = AutoencoderKL(vcfg, dtype=dtype), CLIPTextModel(tcfg, dtype=dtype)
  f = vcfg.downsample_factor
  params = {
    "unet": loading.convert_state_dict(np_sd(unet), unet_abstract(ucfg)),
    "vae": loading.convert_state_dict(prepare_vae_state_dict(np_sd(vae)), jax.eval_shape(
      jvae.init, jax.random.key(0), np.zeros((1, f, f, 3), np.float32))),
    "text_encoder": loading.convert_state_dict(prepare_clip_text_state_dict(np_sd(text)), jax.eval_shape(
      jtext.init, jax.random.key(0), np.zeros((1, 1), np.int32))),
  }
  junet = UNet2DConditionModel(ucfg, dtype=dtype, attention="auto" if half else "xla")
  ours = pipeline_lib.Pipeline(junet, jvae, jtext, tokenizer,
                               NoiseSchedule.from_config(dict(sched.config)), max_len)
  return pipe, ours, params


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench(name: str, resolution: int, batch: int, steps_list: list[int], repeats: int, gpu: bool,
          half: bool = False) -> None:
  from scott_jax import pipeline as pipeline_lib

  with tempfile.TemporaryDirectory() as folder:
    t0 = time.perf_counter()
    pipe, ours, params = build(name, folder, half)
    build_s = time.perf_counter() - t0
  dev = "cuda" if gpu else "cpu"
  tdtype = (torch.float16 if gpu else torch.bfloat16) if half else torch.float32
  pipe = pipe.to(dev, tdtype)
  pipe.set_progress_bar_config(disable=True)
  sync = torch.cuda.synchronize if gpu else (lambda: None)
  prompts = (PROMPTS * batch)[:batch]
  ids = ours.tokenize(prompts)
  shape = pipeline_lib.latent_shape(ours, batch, resolution, resolution)
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(0), shape), np.float32)
  zt = torch.from_numpy(z.transpose(0, 3, 1, 2).copy()).to(dev, tdtype)
  print(f"[{name}: built in {build_s:.0f} s]", flush=True)
  for k in steps_list:
    sampler = pipeline_lib.make_sampler(ours, kind="student", steps=k, height=resolution, output="float")
    key = jax.random.PRNGKey(1)

    def run_ours(sampler=sampler, key=key):
      return sampler(params, ids, key, 8.0, latents=z).block_until_ready()

    def run_torch(k=k):
      with torch.no_grad():
        out = pipe(prompts, height=resolution, width=resolution, num_inference_steps=k, guidance_scale=8.0,
                   latents=zt, output_type="np", generator=torch.Generator(dev).manual_seed(0)).images
      sync()
      return out

    t0 = time.perf_counter()
    a = np.asarray(run_ours())
    compile_s = time.perf_counter() - t0
    b = run_torch()
    run_torch()  # a second warm-up: the first calls of a shape pay lazy initialisation in torch
    err = float(np.abs(a - b.astype(np.float32)).max()) if k == 1 else float("nan")  # k > 1: other noise
    ours_t, torch_t = [], []
    for _ in range(repeats):
      ours_t.append(_median_time(run_ours, 1))
      torch_t.append(_median_time(run_torch, 1))
    mo, mt = statistics.median(ours_t) / batch, statistics.median(torch_t) / batch
    print(f"| {name} | {resolution} | {batch} | {k} | {mo:.4f} | {mt:.4f} | {mo / mt:.2f} | {compile_s:.1f} "
          f"| {err:.1e} |", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", choices=["tiny", "sd15"], default=None)
  parser.add_argument("--resolution", type=int, default=None, help="image size (default: 32 tiny, 256 sd15)")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--gpu", action="store_true", help="both on CUDA (JAX's default backend must be GPU)")
  parser.add_argument("--half", action="store_true", help="ours bfloat16 + attention auto; diffusers float16 on "
                      "the GPU (bfloat16 on a CPU)")
  args = parser.parse_args()
  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  if not args.gpu:
    jax.config.update("jax_platforms", "cpu")
  print(f"machine: {platform.machine()}, {threads} of {os.cpu_count()} CPUs usable; jax {jax.__version__} "
        f"({jax.devices()[0].device_kind}), torch {torch.__version__} ({torch.get_num_threads()} threads"
        f"{', ' + torch.cuda.get_device_name() if args.gpu else ''}), diffusers {diffusers.__version__}; "
        f"load average {os.getloadavg()[0]:.1f}; "
        f"{'ours bfloat16, diffusers float16 (GPU) / bfloat16 (CPU)' if args.half else 'float32'}")
  print("| config | resolution | batch | steps | ours s/image | diffusers s/image | ours/diffusers | compile s "
        "| max abs diff (1 step) |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for name in ("tiny", "sd15"):
    if args.only in (None, name):
      res = args.resolution or (32 if name == "tiny" else 256)
      bench(name, res, args.batch, args.steps, args.repeats, args.gpu, args.half)


if __name__ == "__main__":
  main()
