"""Mode ``plan``: compile the sharded train step ahead of time from shapes alone and report per-device memory and
FLOPs for a config and mesh, before any weights are loaded or any accelerator is held.

  python -m scott_jax.main --config configs/sd15_scott.py --mode plan --workdir runs/plan \
      --config.mesh.plan_architecture=sd15 --config.mesh.plan_devices=8 --config.mesh.data=2 --config.mesh.fsdp=4

The networks' architectures come from the config.json files of ``model.teacher_path`` (``plan_architecture =
"teacher"``, no weight file is read) or from the built-in SD1.5 or SDXL base 1.0 architecture (``"sd15"``,
``"sdxl"``). Parameters, the train
state and the batch are ``jax.ShapeDtypeStruct``s (``jax.eval_shape`` of the model inits and of
`scott_jax.step.abstract_state`) carrying the shardings of `scott_jax.parallel`; the step is
``jit(...).lower(...).compile()``d exactly as training compiles it. ``plan_devices > 0`` makes that many fake
CPU devices (``jax_num_cpu_devices``; must be set before JAX starts its CPU backend); ``plan_topology`` (e.g.
"v5e:2x4", "h100:4") compiles for a TPU slice or GPUs with that accelerator's own XLA compiler, on this host, with no
accelerator (deviceless; libtpu or the CUDA plugin installed).

Reported (stdout and WORKDIR/plan.json), all per device of the SPMD-partitioned program: the train state's and
the frozen models' bytes by the sharding rules (exact, from shapes), XLA's ``memory_analysis()`` (arguments,
outputs, aliased = donated, temporaries; peak estimate = arguments + outputs - aliased + temporaries) and
``cost_analysis()`` FLOPs. On the CPU backend the temporaries come from XLA's CPU buffer assignment, which fuses
and schedules differently from the GPU/TPU compilers: treat them as indicative, the argument bytes as exact. With
``plan_topology`` they are that compiler's own buffer assignment for the chip: exact for the program as compiled
(a GPU compile without the device skips autotuning, which may pick other matmul kernels and workspaces).
A program that does not fit the chip is a plan too: the TPU compiler refuses it ("Ran out of memory in memory
space hbm. Used 21.95G of 15.75G hbm" or, from libtpu 0.0.42, "Ran out of memory on HBM, the total memory required
for HLO temporaries (23.84G) exceeds available HBM (15.75G)"), and the report then carries ``out_of_memory`` (bytes
needed, bytes the chip has, the compiler's message) instead of a memory analysis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scott_jax import parallel
from scott_jax import step as step_lib
from scott_jax import student as student_lib
from scott_jax.config import ConfigDict
from scott_jax.models import loading, lora
from scott_jax.models import unet as unet_lib
from scott_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from scott_jax.models.unet import UNetConfig, resolve_attention
from scott_jax.models.vae import AutoencoderKL, VAEConfig

PyTree = Any


def sd15_architectures() -> tuple[Any, Any, Any, int]:
  """(UNetConfig, VAEConfig, CLIPTextConfig, tokens per prompt) of Stable Diffusion 1.5 (the diffusers configs
  of runwayml/stable-diffusion-v1-5: U-Net 320-640-1280-1280, VAE 128-256-512-512, CLIP ViT-L/14 text)."""
  unet = UNetConfig(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                    attention_head_dim=(8, 8, 8, 8), layers_per_block=(2, 2, 2, 2))
  vae = VAEConfig(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                  norm_num_groups=32, scaling_factor=0.18215)
  text = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
  return unet, vae, text, 77


def sdxl_architectures() -> tuple[Any, Any, Any, int, Any]:
  """(UNetConfig, VAEConfig, CLIPTextConfig, tokens per prompt, text_encoder_2's CLIPTextConfig) of Stable Diffusion
  XL base 1.0 (its diffusers configs: U-Net 320-640-1280 with transformer depth 1/2/10, heads 5/10/20, cross
  attention 2048, text_time added embedding 256 x 6 + 1280; SD1.5's VAE layout at scaling 0.13025 with
  force_upcast; CLIP ViT-L and OpenCLIP bigG (1280 wide, 32 layers, 20 heads, gelu, projection 1280))."""
  unet = UNetConfig(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=(2, 2, 2),
                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816)
  _, vae, text, max_length = sd15_architectures()
  vae = dataclasses.replace(vae, scaling_factor=0.13025, force_upcast=True)
  text_2 = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                          num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
  return unet, vae, text, max_length, text_2


def teacher_architectures(path: str) -> tuple[Any, Any, Any, int]:
  """The same from a diffusers folder's unet/, vae/, text_encoder/ config.json and tokenizer (no weights)."""
  if not path or not os.path.isdir(path):
    raise FileNotFoundError(f"config.model.teacher_path='{path}' does not exist; mode plan reads the architectures "
                            "from its config.json files (or set config.mesh.plan_architecture=sd15)")
  unet = UNetConfig.from_diffusers(loading.read_config(os.path.join(path, "unet")))
  vae = VAEConfig.from_dict(loading.read_config(os.path.join(path, "vae")))
  text = CLIPTextConfig.from_dict(loading.read_config(os.path.join(path, "text_encoder")))
  tokenizer = loading.load_tokenizer(path)
  return unet, vae, text, int(min(tokenizer.model_max_length, text.max_position_embeddings))


def teacher_text_encoder_2(path: str) -> Any:
  """text_encoder_2's CLIPTextConfig of an SDXL teacher folder, or None (an SD folder)."""
  folder = os.path.join(path, "text_encoder_2")
  return CLIPTextConfig.from_dict(loading.read_config(folder)) if os.path.isdir(folder) else None


def abstract_models(config: ConfigDict) -> tuple[student_lib.Models, PyTree]:
  """(Models, frozen) as `scott_jax.student.load_models` builds them, with ShapeDtypeStruct parameters.

  The Models' tokenizer is None (the step never tokenizes).
  """
  arch = config.mesh.plan_architecture
  text_2 = None
  if arch == "sd15":
    unet_cfg, vae_cfg, text_cfg, max_length = sd15_architectures()
  elif arch == "sdxl":
    unet_cfg, vae_cfg, text_cfg, max_length, text_2 = sdxl_architectures()
  elif arch == "teacher":
    unet_cfg, vae_cfg, text_cfg, max_length = teacher_architectures(config.model.teacher_path)
    text_2 = teacher_text_encoder_2(config.model.teacher_path)
  else:
    raise ValueError(f"config.mesh.plan_architecture = {arch!r}; allowed: teacher, sd15, sdxl")
  return models_from_architectures(config, unet_cfg, vae_cfg, text_cfg, max_length, text_2)


def models_from_architectures(config: ConfigDict, unet_cfg: Any, vae_cfg: Any, text_cfg: Any,
                              max_length: int, text_2_cfg: Any = None) -> tuple[student_lib.Models, PyTree]:
  """(Models, frozen with ShapeDtypeStruct parameters) for given U-Net / VAE / text-encoder configs (SDXL:
  ``text_2_cfg`` of text_encoder_2; the empty prompt then has `SDXLTextEncoders.encode`'s shapes)."""
  dtype = jnp.dtype(config.model.dtype)
  vae = AutoencoderKL(vae_cfg, dtype=dtype)
  text = CLIPTextModel(text_cfg, dtype=dtype)
  text_2 = None if text_2_cfg is None else CLIPTextModelWithProjection(text_2_cfg, dtype=dtype)
  models = student_lib.build_models(config, unet_cfg, vae, text, None, max_length, text_2, None, True)
  key = jax.random.key(0)
  f = vae_cfg.downsample_factor
  ids = jax.ShapeDtypeStruct((1, max_length), jnp.int32)
  frozen = {"unet": unet_lib.abstract_params(unet_cfg),
            "vae": jax.eval_shape(vae.init, key, jnp.zeros((1, f, f, vae_cfg.in_channels), jnp.float32)),
            "text_encoder": jax.eval_shape(text.init, key, jnp.zeros((1, 1), jnp.int32))}
  if text_2 is None:
    out = jax.eval_shape(text.apply, frozen["text_encoder"], ids)
    frozen.update(uncond_text=out.last_hidden_state, uncond_pooled=out.pooler_output)
  else:
    frozen["text_encoder_2"] = jax.eval_shape(text_2.init, key, jnp.zeros((1, 1), jnp.int32))
    frozen["uncond_text"], frozen["uncond_pooled"] = jax.eval_shape(
      lambda p, a, b: models.text_encoders.encode(p, a, b), frozen, ids, ids)
  return models, frozen


def batch_spec(config: ConfigDict, models: student_lib.Models) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch's shapes: precomputed latents for ``data.source = latent_cache``, else images + token ids."""
  b, r = config.train.batch_size, config.data.resolution
  if config.data.source == "latent_cache":
    s = r // models.vae.config.downsample_factor
    d = p = models.text_encoder.config.hidden_size
    if models.is_sdxl:
      d, p = models.text_encoders.hidden_size, models.text_encoders.pooled_size
    out = {"latents": jax.ShapeDtypeStruct((b, s, s, models.vae.config.latent_channels), jnp.float32),
           "text_embeds": jax.ShapeDtypeStruct((b, models.max_length, d), jnp.float32),
           "pooled_text_embeds": jax.ShapeDtypeStruct((b, p), jnp.float32)}
    if models.is_sdxl:
      out["time_ids"] = jax.ShapeDtypeStruct((b, 6), jnp.float32)
    return out
  out = {"images": jax.ShapeDtypeStruct((b, r, r, 3), jnp.float32),
         "input_ids": jax.ShapeDtypeStruct((b, models.max_length), jnp.int32)}
  if models.is_sdxl:  # what the loader gives an SDXL teacher (`scott_jax.data.loader.image_collate`)
    out.update(input_ids_2=jax.ShapeDtypeStruct((b, models.max_length), jnp.int32),
               original_size=jax.ShapeDtypeStruct((b, 2), jnp.int32),
               crop_top_left=jax.ShapeDtypeStruct((b, 2), jnp.int32))
  return out


# stream_executor.GpuTargetConfigProto (text format) of the GPUs mode plan can compile for without one: what XLA's
# GPU compiler reads from a device (NVIDIA's published H100 SXM5 80GB figures, as in XLA's own spec files; jaxlib
# 0.10.2's proto has no collective_memory_granularity).
GPU_TARGET_CONFIGS = {"h100": """
gpu_device_info {
  name: "NVIDIA H100 80GB HBM3"  device_vendor: "NVIDIA Corporation"
  cuda_compute_capability { major: 9 feature_extension: ACCELERATED_FEATURES }
  core_count: 132  fpus_per_core: 128  clock_rate_ghz: 1.98
  device_memory_size: 84942979072  memory_bandwidth: 3352320000000  l2_cache_size: 52428800
  threads_per_block_limit: 1024  threads_per_warp: 32  threads_per_core_limit: 2048
  shared_memory_per_block: 49152  shared_memory_per_block_optin: 232448  shared_memory_per_core: 233472
  registers_per_core_limit: 65536  registers_per_block_limit: 65536
  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  thread_dim_limit_x: 1024  thread_dim_limit_y: 1024  thread_dim_limit_z: 64
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""}
CUDNN_VERSION = 90800  # the target configs' dnn_version_info, as cudnnGetVersion() reports it


def topology_devices(name: str) -> list[Any]:
  """The devices of a slice named ``name``, for a deviceless compile (the accelerator's own XLA compiler runs on this
  host; no accelerator needed): a TPU topology ("v5e:2x4": 8 v5e chips; libtpu) or a GPU from
  `GPU_TARGET_CONFIGS` ("h100:4": 4 GPUs on one host, "h100:2x8": 2 hosts of 8; the CUDA plugin). Raises a
  one-line error naming the package when the compiler is not installed."""
  from jax.experimental import topologies
  chip, _, shape = name.partition(":")
  if chip in GPU_TARGET_CONFIGS:
    sizes = [int(x) for x in shape.split("x")] if shape.replace("x", "").isdigit() else []
    if len(sizes) not in (1, 2) or min(sizes) < 1:
      raise ValueError(f"config.mesh.plan_topology={name!r}: expected '{chip}:GPUS' or '{chip}:HOSTSxGPUS'")
    hosts, gpus = ([1] + sizes)[-2:]
    try:
      topology = topologies.get_topology_desc(platform="cuda", target_config=GPU_TARGET_CONFIGS[chip],
                                              topology=f"1x{hosts}x{gpus}")
    except NotImplementedError as e:  # no CUDA plugin registered a topology factory
      raise RuntimeError(f"config.mesh.plan_topology={name!r} compiles with the GPU compiler and needs the CUDA "
                         "plugin (JAX_PLATFORMS=cpu on a host without a GPU): pip install -e '.[gpu-plan]'") from e
    return list(topology.devices)
  # A compile opens no chip, so libtpu's one-process lock (which guards the chips) need not hold here.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    topology = topologies.get_topology_desc(topology_name=name, platform="tpu")
  except RuntimeError as e:
    if "not installed" not in str(e):
      raise
    raise RuntimeError(f"config.mesh.plan_topology={name!r} compiles with the TPU compiler and needs libtpu: "
                       "pip install -e '.[tpu]'") from e
  return list(topology.devices)


@contextlib.contextmanager
def deviceless_cudnn(device: Any) -> Iterator[None]:
  """While active, JAX's cuDNN attention front end takes cuDNN's version from `CUDNN_VERSION` and the compute
  capability from ``device`` (a GPU of `topology_devices`) instead of asking the local cuDNN library and the local
  GPU, neither of which a deviceless compile has (XLA itself needs neither to compile cuDNN's fused attention).
  No-op for other devices; never for a GPU that is present."""
  if device.platform not in ("gpu", "cuda"):
    yield
    return
  from jax._src.cudnn import fused_attention_stablehlo as fa  # private: the checks have no public hook

  have = tuple(int(x) for x in device.compute_capability.split("."))
  cap = lambda c: tuple(int(x) for x in c.split("."))
  saved = fa.check_cudnn_version, fa.check_compute_capability, fa.is_cuda_compute_capability_equal
  fa.check_cudnn_version = lambda: CUDNN_VERSION
  fa.check_compute_capability = lambda c: have >= cap(c)
  fa.is_cuda_compute_capability_equal = lambda c: have == cap(c)
  try:
    yield
  finally:
    fa.check_cudnn_version, fa.check_compute_capability, fa.is_cuda_compute_capability_equal = saved


def plan_devices(mesh_cfg: ConfigDict) -> list[Any]:
  """The devices to plan for: those of ``plan_topology`` (TPU chips or GPUs, deviceless), ``plan_devices`` fake CPU
  devices, or all devices present when both are unset."""
  if mesh_cfg.plan_topology:
    return topology_devices(mesh_cfg.plan_topology)
  n = int(mesh_cfg.plan_devices)
  if n == 0:
    return list(jax.devices())
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError as e:  # the CPU backend already started with another count
    raise RuntimeError(f"config.mesh.plan_devices={n} needs a fresh process: JAX's CPU backend already runs") from e
  devices = jax.devices("cpu")
  if len(devices) != n:
    raise RuntimeError(f"asked for {n} CPU devices (config.mesh.plan_devices) but JAX has {len(devices)}; "
                       "XLA_FLAGS=--xla_force_host_platform_device_count may disagree")
  return devices


def compiler_options(mesh_cfg: ConfigDict, platform: str) -> dict[str, Any] | None:
  """XLA options of the plan's compile: on CPU with ``plan_keep_barriers``, the optimization barriers stay until
  code generation (the pass ``cse_barrier_expander`` is disabled). JAX's remat puts a barrier on each
  recomputation's inputs; the CPU pipeline removes barriers before its late CSE, which then merges the
  recomputation with the forward pass it repeats, so the CPU program keeps every activation remat meant to drop.
  The GPU compiler removes them only after scheduling; this makes the CPU plan compile the program that remat
  describes. The values computed are the same (a barrier is an identity).

  A deviceless GPU compile (``plan_topology`` "h100:..."): matmuls go to cuBLAS. Without a GPU XLA cannot autotune
  its Triton matmul tilings, and its untuned default fails on some shapes ("Couldn't find output tile sizes" for
  the text encoder's bf16[1848, 768] at batch 24); on a GPU the autotuner chooses between the two."""
  if platform == "cpu" and mesh_cfg.plan_keep_barriers:
    return {"xla_disable_hlo_passes": "cse_barrier_expander"}
  if platform in ("gpu", "cuda") and mesh_cfg.plan_topology:
    return {"xla_gpu_enable_triton_gemm": False}
  return None


# The TPU compiler's two forms (libtpu 0.0.42: the first; earlier releases and after buffer assignment: the second).
_OUT_OF_MEMORY = (
  re.compile(r"Ran out of memory on (?P<space>\w+), the total memory required for [\w ]+ \((?P<used>[\d.]+)"
             r"(?P<used_unit>[BKMGT])\) exceeds available \w+ \((?P<have>[\d.]+)(?P<have_unit>[BKMGT])\)"),
  re.compile(r"Ran out of memory in memory space (?P<space>\w+)\. Used (?P<used>[\d.]+)(?P<used_unit>[BKMGT]) of "
             r"(?P<have>[\d.]+)(?P<have_unit>[BKMGT])"),
)
_UNIT = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}  # XLA prints binary units (15.75G = 15.75 GiB)


def out_of_memory(message: str) -> dict[str, Any] | None:
  """What an XLA compile error says about a program too large for the device (the TPU compiler's "Ran out of
  memory on HBM, the total memory required for HLO temporaries (23.84G) exceeds available HBM (15.75G)" or "Ran out
  of memory in memory space hbm. Used 21.95G of 15.75G hbm. ..."): memory space, bytes needed and available, and
  the message from there on (with XLA's largest allocations where it lists them; at most 60 lines); None for any
  other error."""
  for pattern in _OUT_OF_MEMORY:
    m = pattern.search(message)
    if m is not None:
      return {"memory_space": m["space"].lower(), "needed_bytes": int(float(m["used"]) * _UNIT[m["used_unit"]]),
              "device_bytes": int(float(m["have"]) * _UNIT[m["have_unit"]]),
              "report": "\n".join(message[m.start():].splitlines()[:60])}
  return None


def compile_or_out_of_memory(lowered: jax.stages.Lowered, options: dict[str, Any] | None,
                             ) -> tuple[jax.stages.Compiled | None, dict[str, Any] | None]:
  """``lowered.compile(options)``, or (None, `out_of_memory`) when the compiler refuses the program because it
  does not fit the device's memory (any other compile error is raised)."""
  try:
    return lowered.compile(options), None
  except jax.errors.JaxRuntimeError as e:
    oom = out_of_memory(str(e))
    if oom is None:
      raise
    return None, oom


def make_plan(config: ConfigDict, devices: list[Any] | None = None) -> dict[str, Any]:
  """Lowers and compiles the sharded train step for ``config`` on ``devices`` (default `plan_devices`) from
  shapes; returns the report (see the module docstring; bytes, FLOPs per device)."""
  devices = plan_devices(config.mesh) if devices is None else devices
  if config.model.attention == "auto":  # resolved for the devices planned for, not the host's default backend

    config = config.copy_and_resolve_references()
    config.model.attention = resolve_attention("auto", config.model.dtype, devices[0].platform)
  mesh = parallel.make_mesh(config.mesh, devices)
  deviceless = deviceless_cudnn(devices[0]) if config.mesh.plan_topology else contextlib.nullcontext()
  with deviceless:  # the models' shapes are traced too
    models, frozen = abstract_models(config)
    batch = batch_spec(config, models)
    state = step_lib.abstract_state(config, models, frozen, batch)
    state_sh, frozen_sh, batch_sh = parallel.shardings_for(config.mesh, mesh, state, frozen, batch)
    step = parallel.jit_train_step(step_lib.make_train_step(config, models), mesh, state_sh, batch_sh, frozen_sh,
                                   parallel.logical_rules(config.mesh))
    t0 = time.time()
    lowered = step.lower(parallel.with_shardings(state, state_sh), parallel.with_shardings(batch, batch_sh),
                         parallel.with_shardings(frozen, frozen_sh))
  t1 = time.time()
  compiled, oom = compile_or_out_of_memory(lowered, compiler_options(config.mesh, devices[0].platform))
  t2 = time.time()
  mem, cost = (compiled.memory_analysis(), compiled.cost_analysis()) if compiled is not None else (None, None)
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
  memory = {}
  if mem is not None:
    memory = {"argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
              "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
              "generated_code_bytes": int(mem.generated_code_size_in_bytes)}
    memory["peak_estimate_bytes"] = (memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"]
                                     + memory["temp_bytes"])
  shape = dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape), strict=True))
  batch_axes = parallel.logical_rules(config.mesh)["batch"]
  return {
    "mesh": shape, "devices": len(devices), "platform": devices[0].platform,
    "device_kind": devices[0].device_kind,
    "batch_size": config.train.batch_size,
    "batch_per_device": config.train.batch_size // math.prod(shape[a] for a in batch_axes),
    "batch_kind": "latents" if "latents" in batch else "images", "resolution": config.data.resolution,
    "dtype": config.model.dtype, "attention": config.model.attention, "remat": bool(config.model.remat),
    "remat_policy": config.model.remat_policy if config.model.remat else "",
    "attention_chunk_size": int(config.model.attention_chunk_size),
    "gan": bool(config.gan.enabled), "frozen_sharding": config.mesh.frozen,
    "compiler_options": compiler_options(config.mesh, devices[0].platform) or {},
    "params": {"student": lora.count_params(state.student), "disc_trainable": lora.count_params(state.disc),
               "teacher_unet": lora.count_params(frozen["unet"]), "vae": lora.count_params(frozen["vae"]),
               "text_encoder": lora.count_params(frozen["text_encoder"])
               + lora.count_params(frozen.get("text_encoder_2", {}))},
    "state_bytes_total": parallel.bytes_per_device(state, jax.tree.map(lambda _: parallel.replicated(mesh), state)),
    "state_bytes_per_device": parallel.bytes_per_device(state, state_sh),
    "frozen_bytes_per_device": parallel.bytes_per_device(frozen, frozen_sh),
    "batch_bytes_per_device": parallel.bytes_per_device(batch, batch_sh),
    "memory": memory, "out_of_memory": oom,
    "flops_per_device": float(cost.get("flops", 0.0)),
    "bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
    "lower_seconds": round(t1 - t0, 1), "compile_seconds": round(t2 - t1, 1),
  }


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def format_plan(plan: dict[str, Any]) -> str:
  m = plan["memory"]
  p = plan["params"]
  lines = [
    f"mesh {plan['mesh']} on {plan['devices']} {plan['platform']} devices ({plan['device_kind']}); "
    f"batch {plan['batch_size']} ({plan['batch_per_device']} per device, {plan['batch_kind']} at "
    f"{plan['resolution']}px, {plan['dtype']}, "
    f"attention {plan['attention']}{' ' + str(plan['attention_chunk_size']) if plan['attention'] == 'chunked' else ''}"
    f"{', remat ' + plan['remat_policy'] if plan['remat'] else ''})",
    f"parameters: student {p['student'] / 1e6:.1f}M, discriminator trainable {p['disc_trainable'] / 1e6:.1f}M, "
    f"teacher U-Net {p['teacher_unet'] / 1e6:.1f}M, VAE {p['vae'] / 1e6:.1f}M, text encoder "
    f"{p['text_encoder'] / 1e6:.1f}M",
    f"train state: {_gib(plan['state_bytes_total'])} in all, {_gib(plan['state_bytes_per_device'])} per device",
    f"frozen models ({plan['frozen_sharding']}): {_gib(plan['frozen_bytes_per_device'])} per device",
  ]
  if m:
    lines.append(f"XLA memory per device: arguments {_gib(m['argument_bytes'])}, outputs {_gib(m['output_bytes'])}, "
                 f"aliased (donated) {_gib(m['alias_bytes'])}, temporaries {_gib(m['temp_bytes'])}; peak estimate "
                 f"{_gib(m['peak_estimate_bytes'])}")
  if plan.get("out_of_memory"):
    oom = plan["out_of_memory"]
    lines.append(f"DOES NOT FIT: the compiler needs {_gib(oom['needed_bytes'])} of {oom['memory_space']} per device, "
                 f"the device has {_gib(oom['device_bytes'])} (the compiler's message: out_of_memory.report in "
                 "plan.json)")
  elif plan["flops_per_device"]:
    lines.append(f"FLOPs per device per step: {plan['flops_per_device']:.4g} (XLA cost analysis); bytes accessed "
                 f"{plan['bytes_accessed_per_device']:.4g}")
  else:
    lines.append("FLOPs per device per step: not reported by this compiler (a deviceless GPU compile has no cost "
                 "analysis; benchmarks/train_step.py counts them)")
  lines.append(f"lowering {plan['lower_seconds']} s, compile {plan['compile_seconds']} s")
  return "\n".join(lines)


def run_plan(config: ConfigDict, workdir: str) -> dict[str, Any]:
  """Mode ``plan`` (scott_jax.main): prints the plan and writes WORKDIR/plan.json."""
  plan = make_plan(config)
  print(format_plan(plan), flush=True)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "plan.json"), "w") as fh:
    json.dump(plan, fh, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
  return plan
