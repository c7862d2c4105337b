"""SCott / SCott-without-GAN / LCM train steps in units of one teacher U-Net forward: wall time and exact FLOPs.

  python benchmarks/train_step.py                                # tiny and mid U-Nets on this CPU, float32
  python benchmarks/train_step.py --size mid --check             # + the hand count of every step's FLOPs
  python benchmarks/train_step.py --size sd15 --batch 10 --resolution 512 --no-time --flops lowered   # FLOPs only
  python benchmarks/train_step.py --size sd15 --batch 10 --resolution 512 --dtype bfloat16 --attention auto \
      --remat --json out.json                                     # on a GPU (benchmarks/gpu_suite.sh)

Every step gets a batch of images (B, R, R, 3) and token ids (VAE and text encoder inside the step, as a run
without the latent cache and as diffusers' LCM script) and random weights of the named architecture (tiny: the
test pipeline's shapes; mid: a 3-level U-Net, channels 64-128-256; sd15: Stable Diffusion 1.5). The unit is one
jitted forward of the teacher U-Net on the step's latents and text states (batch B, no CFG doubling). Step
kinds: ``scott`` (configs/sd15_scott.py: ER-SDE order 2, h = 3 teacher sub-steps with CFG, LoRA discriminator),
``scott_k2`` (the same with the discriminator's losses on every 2nd example, ``gan.example_stride=2``), ``nogan``
(the same with gan=off) and ``lcm`` (configs/sd15_lcm.py: DDIM, h = 1, no GAN).

FLOPs are XLA's cost analysis (``cost_analysis()["flops"]``) of the step compiled (``--flops compiled``) or only
lowered (``--flops lowered``: the unoptimised HLO, no compile; for SD1.5 on a CPU). XLA counts the body of a
while loop once whatever its trip count, and the teacher's sub-steps are one ``lax.scan`` (solvers.integrate), so
the FLOPs are taken from a copy of the step traced with every ``jax.lax.scan`` fully unrolled (`unrolled_scans`);
the report says how many while loops were left in the counted program (0 = exact). FLOPs are counted with the
plain XLA attention ("xla"): cuDNN's fused attention is a custom call that cost analysis counts as 0 FLOPs, and
the chunked attention's ``lax.map`` is a loop; both compute the same matmuls. With ``--remat`` the count
includes the recomputation ("executed FLOPs"); MFU is quoted on the FLOPs without remat ("model FLOPs").

``--check`` compiles the step's parts on their own (VAE + text encode, teacher U-Net on the CFG-doubled batch,
student forward, student forward + backward, discriminator passes) and prints the hand count (parts x how often
the step runs them) next to the measured FLOPs, for the discriminator both the step as it was (L_G pass on the
fake batch with its input gradient + L_D pass on real and fake with the parameter gradient) and the fused form
(one pass on real and fake, gradients for both).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scott_jax import config as config_lib
from scott_jax import step as step_lib
from scott_jax import student as student_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# kind -> (config file, its arg, overrides)
KINDS = {"scott": ("sd15_scott.py", None, {}), "scott_k2": ("sd15_scott.py", None, {"gan.example_stride": 2}),
         "nogan": ("sd15_scott.py", "gan=off", {}), "lcm": ("sd15_lcm.py", None, {})}
KIND_NAMES = {"scott": "SCott (ER-SDE h 3, GAN)", "scott_k2": "SCott, GAN on every 2nd example",
              "nogan": "SCott without GAN", "lcm": "LCM (DDIM, h 1, no GAN)"}
# Dense bf16 peak of one chip (vendor figures, TFLOP/s), for MFU; matched against jax's device_kind.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v4": 275.0}


# ---------------------------------------------------------------------------------------------------------
# Counting FLOPs.

@contextlib.contextmanager
def unrolled_scans() -> Iterator[None]:
  """While active, every ``jax.lax.scan`` call is traced fully unrolled (``unroll=True``), so a program lowered
  inside has no while loop left from it and XLA's cost analysis counts each iteration. For measurement only."""
  original = jax.lax.scan

  @functools.wraps(original)
  def scan(*args: Any, **kwargs: Any) -> Any:
    kwargs["unroll"] = True
    return original(*args, **kwargs)

  jax.lax.scan = scan
  try:
    yield
  finally:
    jax.lax.scan = original


def _flops(cost: Any) -> float:
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
  return float(cost.get("flops", 0.0))


def matmul_loops(hlo_text: str) -> int:
  """How many while loops of an (optimised, text) HLO module reach a dot or convolution from their body.

  Loops without one (e.g. the CPU backend's rolled threefry RNG rounds, integer work) do not change the FLOPs
  that matter here; a loop with one would be counted once by cost analysis. Loops of one known trip (what a
  fully unrolled scan leaves) are counted right and not reported.
  """
  bodies: dict[str, list[str]] = {}
  name = None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
    if head and line.rstrip().endswith("{"):
      name = head.group(1)
      bodies[name] = []
    elif name is not None:
      bodies[name].append(line)
  calls = {k: set(re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", "\n".join(v)))
           for k, v in bodies.items()}
  has_mm = {k: any(re.search(r"\b(dot|convolution)\(", ln) for ln in v) for k, v in bodies.items()}

  def reaches(k: str, seen: set[str]) -> bool:
    if k in seen or k not in bodies:
      return False
    seen.add(k)
    return has_mm[k] or any(reaches(c, seen) for c in calls[k])

  count = 0
  for line in hlo_text.splitlines():
    loop = re.search(r"\bwhile\(.*?body=%?([\w.\-]+)", line)
    if loop is None:
      continue
    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if trips is not None and int(trips.group(1)) == 1:  # a fully unrolled scan: one trip, counted right
      continue
    count += reaches(loop.group(1), set())
  return count


def count_flops(fn: Callable, *args: Any, compiled: bool = True, unroll: bool = True) -> tuple[float, int]:
  """(FLOPs, loops left) of ``jax.jit(fn)(*args)`` by XLA's cost analysis; args may be ShapeDtypeStructs.

  ``unroll``: trace with `unrolled_scans` (loop bodies then count once per iteration). ``compiled``: the cost
  of the optimised program (``lower().compile()``) and loops left = its while loops with a matmul or
  convolution inside (`matmul_loops`); else the lowered, unoptimised program (no compile) and loops left = all
  its while loops (including RNG loops without FLOPs that matter).
  """
  with unrolled_scans() if unroll else contextlib.nullcontext():  # a fresh function: no cached trace is reused
    lowered = jax.jit(lambda *a: fn(*a)).lower(*args)
  if compiled:
    exe = lowered.compile()
    return _flops(exe.cost_analysis()), matmul_loops(exe.as_text() or "")
  return _flops(lowered.cost_analysis()), len(re.findall(r"stablehlo\.while", lowered.as_text()))


# ---------------------------------------------------------------------------------------------------------
# Models with random weights.

def architectures(size: str) -> tuple[Any, Any, Any, int]:
  """(UNetConfig, VAEConfig, CLIPTextConfig, tokens per prompt) of ``size``: tiny (configs/tiny_scott.py's test
  pipeline), mid (a 3-level U-Net 64-128-256 with the tiny VAE and text encoder) or sd15 (Stable Diffusion 1.5)."""
  from scott_jax import plan
  from scott_jax.models.clip_text import CLIPTextConfig
  from scott_jax.models.unet import UNetConfig
  from scott_jax.models.vae import VAEConfig

  if size == "sd15":
    return plan.sd15_architectures()
  vae = VAEConfig(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                  scaling_factor=0.18215)
  text = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu")
  if size == "tiny":
    unet = UNetConfig(sample_size=16, block_out_channels=(32, 64), layers_per_block=(1, 1),
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=16,
                      cross_attention_dim=32, attention_head_dim=(8, 8), transformer_layers_per_block=(1, 1))
  elif size == "mid":
    unet = UNetConfig(sample_size=16, block_out_channels=(64, 128, 256), layers_per_block=(2, 2, 2),
                      down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2, norm_num_groups=32,
                      cross_attention_dim=32, attention_head_dim=(8, 8, 8), transformer_layers_per_block=(1, 1, 1))
  else:
    raise ValueError(f"unknown size '{size}'; allowed: tiny, mid, sd15")
  return unet, vae, text, 16


def make_config(kind: str, size: str, batch: int, resolution: int, dtype: str, attention: str,
                remat: bool) -> config_lib.ConfigDict:
  """The step kind's SD1.5 config with the benchmark's batch, resolution and U-Net options; tiny/mid sizes get
  the tiny config's discriminator LoRA rank (4)."""
  from scott_jax import config_files

  name, arg, overrides = KINDS[kind]
  c = config_files.get_config(name, arg)
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  c.train.batch_size = batch
  c.data.update(dict(source="synthetic", path="", resolution=resolution))
  c.model.update(dict(dtype=dtype, attention=attention, remat=remat))
  if size != "sd15":
    c.gan.update(dict(lora_rank=4, lora_alpha=4.0))
  return config_lib.validate(c)


def abstract_setup(config: config_lib.ConfigDict, size: str) -> tuple[student_lib.Models, Any, Any, Any]:
  """(Models, frozen, batch, state) as ShapeDtypeStructs for ``config`` on the architectures of ``size``."""
  from scott_jax import plan

  unet_cfg, vae_cfg, text_cfg, max_length = architectures(size)
  models, frozen = plan.models_from_architectures(config, unet_cfg, vae_cfg, text_cfg, max_length)
  batch = plan.batch_spec(config, models)
  state = step_lib.abstract_state(config, models, frozen, batch)
  return models, frozen, batch, state


def random_like(tree: Any, seed: int = 0) -> Any:
  """Arrays for ShapeDtypeStruct leaves: norm scales 1, biases 0, other floats N(0, 0.02^2), ints in [0, 1000)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for i, (path, s) in enumerate(leaves):
    name = jax.tree_util.keystr(path)
    if jnp.issubdtype(s.dtype, jnp.integer):
      out.append(jax.random.randint(jax.random.key(seed + i), s.shape, 0, 1000, s.dtype))
    elif name.endswith("['scale']"):
      out.append(jnp.ones(s.shape, s.dtype))
    elif name.endswith("['bias']"):
      out.append(jnp.zeros(s.shape, s.dtype))
    else:
      out.append((0.02 * jax.random.normal(jax.random.key(seed + i), s.shape, jnp.float32)).astype(s.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def random_batch(batch_spec: dict[str, Any], seed: int = 0) -> dict[str, Any]:
  """Images uniform in [-1, 1], token ids uniform in [0, 49407)."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  out = {}
  for k, s in batch_spec.items():
    if jnp.issubdtype(s.dtype, jnp.integer):
      out[k] = jax.random.randint(k2, s.shape, 0, 49407, s.dtype)
    else:
      out[k] = jax.random.uniform(k1, s.shape, s.dtype, -1.0, 1.0)
  return out


# ---------------------------------------------------------------------------------------------------------
# The unit and the step's parts.

def unit_fn(models: student_lib.Models) -> Callable:
  """(teacher params, latents, t, text) -> teacher U-Net output: the unit of both ratios."""
  return lambda p, z, t, ctx: models.teacher.apply(p, z, t, ctx)


def unit_args(models: student_lib.Models, frozen: Any, batch: Any, b: int | None = None) -> tuple[Any, ...]:
  enc = student_lib.encode_shapes(models, frozen, batch)
  z, text = enc[0], enc[1]
  b = z.shape[0] if b is None else b
  return (frozen["unet"], jax.ShapeDtypeStruct((b, *z.shape[1:]), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.int32),
          jax.ShapeDtypeStruct((b, *text.shape[1:]), jnp.float32))


def part_flops(config: config_lib.ConfigDict, models: student_lib.Models, frozen: Any, batch: Any, state: Any,
               compiled: bool) -> dict[str, float]:
  """FLOPs of the step's parts compiled on their own (see the module docstring); B = the batch size."""
  c = config
  z, text, pooled = student_lib.encode_shapes(models, frozen, batch)
  b = z.shape[0]
  sds = jax.ShapeDtypeStruct
  t = sds((b,), jnp.int32)
  cond = {"text": text, "w": sds((b,), jnp.float32)}
  student_fn = student_lib.make_student_fn(models, c.consistency.guidance_embed_dim, None, c.model.student_lora_alpha)
  parts = {
    "encode": lambda f, bt: student_lib.encode_batch(models, f, bt, None),
    "teacher_2B": unit_fn(models),
    "student_fwd": lambda p, z, t, cond: student_fn(p, z, t, cond),
    "student_fwd_bwd": jax.value_and_grad(lambda p, z, t, cond: jnp.mean(student_fn(p, z, t, cond) ** 2)),
  }
  args = {"encode": (frozen, batch), "teacher_2B": unit_args(models, frozen, batch, 2 * b),
          "student_fwd": (state.student, z, t, cond), "student_fwd_bwd": (state.student, z, t, cond)}
  if models.disc is not None:
    disc = models.disc

    def logits(dp: Any, f: Any, x: Any, t: Any, text: Any, pooled: Any) -> Any:
      t, text, pooled = disc.condition(t, text, pooled, f["uncond_text"], f["uncond_pooled"])
      return disc.apply(dp, f["unet"], x, t, text, pooled)

    def dbl(s: Any) -> Any:
      return sds((2 * s.shape[0], *s.shape[1:]), s.dtype)

    parts["disc_B_grad_x"] = jax.value_and_grad(lambda x, dp, f, t, tx, pl: jnp.mean(logits(dp, f, x, t, tx, pl)))
    args["disc_B_grad_x"] = (z, state.disc, frozen, t, text, pooled)
    parts["disc_2B_grad_params"] = jax.value_and_grad(lambda dp, f, x, t, tx, pl: jnp.mean(logits(dp, f, x, t, tx, pl)))
    args["disc_2B_grad_params"] = (state.disc, frozen, dbl(z), dbl(t), dbl(text), dbl(pooled))
    parts["disc_2B_grad_params_x"] = jax.value_and_grad(
      lambda dp, x, f, t, tx, pl: jnp.mean(logits(dp, f, x, t, tx, pl)), argnums=(0, 1))
    args["disc_2B_grad_params_x"] = (state.disc, dbl(z), frozen, dbl(t), dbl(text), dbl(pooled))
  return {k: count_flops(fn, *args[k], compiled=compiled)[0] for k, fn in parts.items()}


def hand_counts(config: config_lib.ConfigDict, parts: dict[str, float]) -> dict[str, float]:
  """The step's FLOPs as parts x multiplicity: h teacher calls on the CFG-doubled batch, one EMA-target forward,
  one student forward + backward, and (GAN on) the discriminator as two passes ("separate": L_G on the fake batch
  with its input gradient, L_D on real + fake with the parameter gradient) or one ("fused": real + fake, both
  gradients). With gan.example_stride k the discriminator's parts (counted at the whole batch) count 1 / k."""
  base = parts["encode"] + config.solver.h * parts["teacher_2B"] + parts["student_fwd"] + parts["student_fwd_bwd"]
  if "disc_B_grad_x" not in parts:
    return {"no disc": base}
  k = config.gan.example_stride
  return {"separate": base + (parts["disc_B_grad_x"] + parts["disc_2B_grad_params"]) / k,
          "fused": base + parts["disc_2B_grad_params_x"] / k}


# ---------------------------------------------------------------------------------------------------------
# Timing.

def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def memory_of(compiled: Any) -> dict[str, int]:
  """XLA's memory analysis of a compiled program: argument, output, alias (donated), temp bytes, peak estimate."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
         "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes)}
  out["peak_estimate_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  return out


def time_step(config: config_lib.ConfigDict, size: str, repeats: int) -> dict[str, Any]:
  """Step and unit wall time (median of ``repeats`` after a compiling call), XLA memory analysis of the step,
  the device's peak bytes in use (GPU/TPU) — with random weights."""
  models, frozen_s, batch_s, _ = abstract_setup(config, size)
  frozen = random_like(frozen_s, 1)
  batch = random_batch(batch_s, 2)
  state = step_lib.init_state(config, models, frozen, batch)
  step = jax.jit(step_lib.make_train_step(config, models), donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, frozen).compile()
  compile_s = time.perf_counter() - t0
  state, metrics = compiled(state, batch, frozen)
  jax.block_until_ready(metrics)
  holder = {"state": state}

  def run() -> Any:
    holder["state"], m = compiled(holder["state"], batch, frozen)
    return m

  t_step = _median_seconds(run, repeats)
  fwd = jax.jit(unit_fn(models))
  z, text, _ = jax.jit(lambda f, b: student_lib.encode_batch(models, f, b, None))(frozen, batch)
  t = jnp.full((z.shape[0],), 500, jnp.int32)
  jax.block_until_ready(fwd(frozen["unet"], z, t, text))
  t_fwd = _median_seconds(lambda: fwd(frozen["unet"], z, t, text), repeats)
  stats = {}
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001 (CPU: not available)
    pass
  finite = bool(all(np.isfinite(float(v)) for v in jax.device_get(metrics).values()))
  return {"step_s": t_step, "unit_s": t_fwd, "compile_s": compile_s, "memory": memory_of(compiled),
          "device_peak_bytes": int(stats.get("peak_bytes_in_use", 0)), "metrics_finite": finite}


def peak_flops(override_tflops: float | None) -> float | None:
  """The chip's dense bf16 peak in FLOP/s (``--peak_tflops`` or `PEAK_TFLOPS` by device kind), else None."""
  if override_tflops:
    return override_tflops * 1e12
  kind = jax.devices()[0].device_kind
  for name, tf in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return tf * 1e12
  return None


def measure(kind: str, args: argparse.Namespace) -> dict[str, Any]:
  """One row: FLOPs (step, unit, ratios; parts and hand counts with --check) and with timing the wall ratio."""
  compiled = args.flops == "compiled"
  row: dict[str, Any] = {"kind": kind, "name": KIND_NAMES[kind], "step_fingerprint": step_fingerprint(),
                         "size": args.size, "batch": args.batch,
                         "resolution": args.resolution, "dtype": args.dtype, "attention": args.attention,
                         "remat": args.remat, "flops_mode": args.flops}
  # FLOPs: the plain XLA attention (see the module docstring), scans unrolled.
  fcfg = make_config(kind, args.size, args.batch, args.resolution, args.dtype, "xla", args.remat)
  models, frozen, batch, state = abstract_setup(fcfg, args.size)
  t0 = time.perf_counter()
  known = _known_flops(args, kind)
  if known is not None:  # counted before (e.g. on a CPU, --flops lowered) for the same shapes and options
    row.update({k: known[k] for k in ("step_flops", "unit_flops", "model_flops", "loops_left", "flop_ratio")})
    row["flops_mode"] = f"{known['flops_mode']} (from {args.flops_json})"
    return _timed(row, kind, args)
  row["step_flops"], row["loops_left"] = count_flops(step_lib.make_train_step(fcfg, models), state, batch, frozen,
                                                     compiled=compiled)
  row["unit_flops"], _ = count_flops(unit_fn(models), *unit_args(models, frozen, batch), compiled=compiled)
  row["flop_ratio"] = row["step_flops"] / row["unit_flops"]
  if args.remat:
    mcfg = make_config(kind, args.size, args.batch, args.resolution, args.dtype, "xla", False)
    m_models, m_frozen, m_batch, m_state = abstract_setup(mcfg, args.size)
    row["model_flops"], _ = count_flops(step_lib.make_train_step(mcfg, m_models), m_state, m_batch, m_frozen,
                                        compiled=compiled)
  else:
    row["model_flops"] = row["step_flops"]
  if args.scan_count:  # what cost analysis says without unrolling (the loop body once)
    row["step_flops_scan"], row["loops_scan"] = count_flops(step_lib.make_train_step(fcfg, models), state, batch,
                                                            frozen, compiled=compiled, unroll=False)
  if args.check:
    parts = part_flops(fcfg, models, frozen, batch, state, compiled)
    row["parts_over_unit"] = {k: v / row["unit_flops"] for k, v in parts.items()}
    row["hand_over_unit"] = {k: v / row["unit_flops"] for k, v in hand_counts(fcfg, parts).items()}
  row["flops_s"] = round(time.perf_counter() - t0, 1)
  return _timed(row, kind, args)


STEP_SOURCES = ("scott_jax/train.py", "scott_jax/step.py", "scott_jax/student.py", "scott_jax/config.py",
                "scott_jax/losses.py", "scott_jax/discriminator.py", "scott_jax/solvers.py",
                "scott_jax/consistency.py", "scott_jax/models/unet.py", "scott_jax/models/vae.py",
                "scott_jax/models/clip_text.py", "scott_jax/models/lora.py", "configs/sd15_scott.py",
                "configs/sd15_lcm.py")


def step_fingerprint() -> str:
  """sha256 (16 hex digits) of the sources that define the step's program: FLOPs counted for another version of
  them are not reused."""
  import hashlib

  h = hashlib.sha256()
  for rel in STEP_SOURCES:
    with open(os.path.join(ROOT, rel), "rb") as fh:
      h.update(fh.read())
  return h.hexdigest()[:16]


def _known_flops(args: argparse.Namespace, kind: str) -> dict[str, Any] | None:
  """The row of ``--flops_json`` with this kind, size, batch, resolution, dtype and remat, counted from the same
  step sources (`step_fingerprint`), else None (the FLOPs are then counted here)."""
  if not args.flops_json or not os.path.exists(args.flops_json):
    return None
  with open(args.flops_json) as fh:
    rows = json.load(fh)
  for r in rows:
    if all(r.get(k) == v for k, v in dict(kind=kind, size=args.size, batch=args.batch, resolution=args.resolution,
                                          dtype=args.dtype, remat=args.remat).items()):
      if r.get("step_fingerprint") != step_fingerprint():
        print(f"WARNING: {args.flops_json} was counted for other step sources ({r.get('step_fingerprint')} != "
              f"{step_fingerprint()}); counting the FLOPs again", flush=True)
        return None
      return r
  return None


def _timed(row: dict[str, Any], kind: str, args: argparse.Namespace) -> dict[str, Any]:
  """Adds the wall-time figures (unless --no-time): times, ratios, images/s, MFU on the model FLOPs."""
  if not args.no_time:
    tcfg = make_config(kind, args.size, args.batch, args.resolution, args.dtype, args.attention, args.remat)
    row.update(time_step(tcfg, args.size, args.repeats))
    row["wall_ratio"] = row["step_s"] / row["unit_s"]
    row["images_per_s"] = args.batch / row["step_s"]
    peak = peak_flops(args.peak_tflops)
    if peak:
      row["peak_flops"] = peak
      row["mfu"] = row["model_flops"] / row["step_s"] / peak
  return row


def max_batch(kind: str, args: argparse.Namespace, limit_bytes: float, candidates: list[int]) -> list[dict]:
  """XLA's compiled memory analysis (peak estimate) of the step at each candidate batch (compile only, no run)."""
  out = []
  for b in candidates:
    cfg = make_config(kind, args.size, b, args.resolution, args.dtype, args.attention, args.remat)
    models, frozen, batch, state = abstract_setup(cfg, args.size)
    t0 = time.perf_counter()
    compiled = jax.jit(step_lib.make_train_step(cfg, models), donate_argnums=(0,)).lower(state, batch,
                                                                                          frozen).compile()
    mem = memory_of(compiled)
    out.append({"kind": kind, "batch": b, "memory": mem, "fits": mem.get("peak_estimate_bytes", 0) <= limit_bytes,
                "compile_s": round(time.perf_counter() - t0, 1)})
    print(f"  batch {b}: peak estimate {mem.get('peak_estimate_bytes', 0) / 2**30:.2f} GiB (limit "
          f"{limit_bytes / 2**30:.1f} GiB) -> {'fits' if out[-1]['fits'] else 'does not fit'}", flush=True)
  return out


def _fmt(row: dict[str, Any]) -> str:
  wall = (f"{1e3 * row['step_s']:.1f} | {1e3 * row['unit_s']:.2f} | {row['wall_ratio']:.1f}" if "step_s" in row
          else "- | - | -")
  extra = ""
  if "mfu" in row:
    extra = f" | {row['images_per_s']:.1f} img/s, MFU {100 * row['mfu']:.1f}%"
  elif "images_per_s" in row:
    extra = f" | {row['images_per_s']:.2f} img/s"
  return (f"| {row['size']} | {row['name']} | {wall} | {row['step_flops']:.4g} | {row['unit_flops']:.4g} | "
          f"{row['flop_ratio']:.2f} | {row['loops_left']}{extra} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=("tiny", "mid", "sd15"), nargs="+", default=["tiny", "mid"])
  parser.add_argument("--kinds", default="scott,nogan,lcm", help="comma-separated: " + ", ".join(KINDS))
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--resolution", type=int, default=32, help="image size in pixels (latents: / VAE factor)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  parser.add_argument("--attention", default="xla", choices=("xla", "cudnn", "chunked", "auto"))
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-time", dest="no_time", action="store_true", help="FLOPs only")
  parser.add_argument("--no-flops", dest="no_flops", action="store_true", help="no rows (with --max_batch)")
  parser.add_argument("--flops", choices=("compiled", "lowered"), default="compiled")
  parser.add_argument("--check", action="store_true", help="hand count from the step's parts")
  parser.add_argument("--scan_count", action="store_true", help="also the FLOPs without unrolling")
  parser.add_argument("--peak_tflops", type=float, default=None)
  parser.add_argument("--flops_json", default=None, help="take the FLOPs from this --json output (same shapes)")
  parser.add_argument("--max_batch", type=int, nargs="*", default=None,
                      help="compile the first kind at these batches and report which fit the device memory")
  parser.add_argument("--memory_limit_gib", type=float, default=None,
                      help="device memory for --max_batch (default: the device's bytes_limit)")
  parser.add_argument("--json", default=None, help="write the rows here")
  args = parser.parse_args()
  dev = jax.devices()[0]
  print(f"# train step / teacher U-Net forward: {platform.machine()}, {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.1f}; jax {jax.__version__}, {dev.platform} ({dev.device_kind}); batch {args.batch}, "
        f"{args.resolution} px, {args.dtype}, attention {args.attention}{', remat' if args.remat else ''}; "
        f"FLOPs {args.flops}, scans unrolled, attention xla", flush=True)
  print("| U-Net | step | step (ms) | U-Net forward (ms) | wall ratio | step FLOPs | U-Net forward FLOPs "
        "| FLOP ratio | loops left | |")
  print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
  rows = []
  for size in [] if args.no_flops else args.size:
    a = argparse.Namespace(**{**vars(args), "size": size})
    for kind in args.kinds.split(","):
      row = measure(kind, a)
      rows.append(row)
      print(_fmt(row), flush=True)
      if "hand_over_unit" in row:
        print(f"  parts / unit: {json.dumps({k: round(v, 3) for k, v in row['parts_over_unit'].items()})}")
        print(f"  hand count / unit: {json.dumps({k: round(v, 3) for k, v in row['hand_over_unit'].items()})} "
              f"vs measured {row['flop_ratio']:.3f}", flush=True)
      if "step_flops_scan" in row:
        print(f"  without unrolling: {row['step_flops_scan'] / row['unit_flops']:.2f} forwards "
              f"({row['loops_scan']} while loops)", flush=True)
      if "memory" in row and row["memory"]:
        m = row["memory"]
        print(f"  XLA memory: arguments {m['argument_bytes'] / 2**30:.2f} GiB, temporaries "
              f"{m['temp_bytes'] / 2**30:.2f} GiB, peak estimate {m['peak_estimate_bytes'] / 2**30:.2f} GiB; "
              f"device peak in use {row['device_peak_bytes'] / 2**30:.2f} GiB; compile {row['compile_s']:.1f} s; "
              f"metrics finite: {row['metrics_finite']}", flush=True)
  if args.max_batch:
    limit = args.memory_limit_gib * 2**30 if args.memory_limit_gib else float(
      (dev.memory_stats() or {}).get("bytes_limit", 0) or 0)
    print(f"# largest batch: {args.kinds.split(',')[0]}, limit {limit / 2**30:.1f} GiB", flush=True)
    rows.append({"max_batch": max_batch(args.kinds.split(",")[0], argparse.Namespace(
      **{**vars(args), "size": args.size[0]}), limit, args.max_batch)})
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(rows, fh, indent=1, default=str)


if __name__ == "__main__":
  sys.exit(main())
