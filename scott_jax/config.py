"""The one place where configs are defined and validated.

Every experiment config (``configs/*.py``) starts from :func:`defaults` and overrides fields; it never adds
new top-level keys. :func:`defaults` assembles one builder per section (``_schedule``, ``_solver``, ...); each
builder is declared with the spec of its constrained keys (`Spec`: an allowed set or a check with its text),
so a key's default and its constraint stand together and are written once. Named choices (solver names, loss
distances, mesh axes, ...) come from `scott_jax.choices`, which their owner modules import too.

:func:`validate` checks the whole tree: unknown keys, values outside their allowed set and wrongly typed
values raise :class:`ConfigError` with a one-line message naming the key, the value and what is allowed.
``scott_jax.main`` turns that into exit status 2. This module imports no jax: ``--help`` and a config error
cost only Python's start-up and ml_collections.

Decisions the paper leaves open (``shared/notes/algorithms.md``, marked DECISION there) are fields here,
never constants in library code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

from scott_jax import choices

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
  """A config key or value is invalid. The message is one line and names key, value and what is allowed.

  Raised by `validate` and, for what only the run can check (the mesh against the devices, the data a path
  points to), by the modes before their work starts; ``scott_jax.main`` turns either into exit status 2."""


class ConfigPathError(ConfigError, FileNotFoundError):
  """A path named by the config does not exist or holds nothing usable (a `ConfigError` and a
  FileNotFoundError)."""


# ---------------------------------------------------------------------------------------------------
# Specs: what a constrained key allows. Keys without a spec are checked for type only (that of the default).

class OneOf:
  """The value must be one of ``values``; the error lists them: "allowed: 'a', 'b'"."""

  __slots__ = ("values",)

  def __init__(self, values: tuple[Any, ...]):
    self.values = tuple(values)

  def problem(self, value: Any) -> str | None:
    """None if ``value`` is allowed, else the error's tail."""
    return None if value in self.values else "allowed: " + ", ".join(repr(a) for a in self.values)


class Check:
  """``ok(value)`` must hold; the error says "expected <text>"."""

  __slots__ = ("ok", "text")

  def __init__(self, ok: Callable[[Any], bool], text: str):
    self.ok, self.text = ok, text

  def problem(self, value: Any) -> str | None:
    """None if ``value`` passes, else the error's tail."""
    return None if self.ok(value) else f"expected {self.text}"


Spec = OneOf | Check


def one_of(values: tuple[Any, ...]) -> OneOf:
  return OneOf(values)


def _num(x: float) -> str:
  return f"{x:g}"


def _note(note: str) -> str:
  return f" ({note})" if note else ""


def at_least(lo: float, *, number: bool = False, note: str = "") -> Check:
  """value >= lo: "an integer >= lo" (``number``: "a number >= lo"), then " (note)"."""
  return Check(lambda v: v >= lo, f"{'a number' if number else 'an integer'} >= {_num(lo)}{_note(note)}")


def above(lo: float, *, note: str = "") -> Check:
  """value > lo: "a number > lo (note)"."""
  return Check(lambda v: v > lo, f"a number > {_num(lo)}{_note(note)}")


def between(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False, integer: bool = False,
            note: str = "") -> Check:
  """lo <= value <= hi ("a number in [lo, hi]"); ``open_lo`` / ``open_hi`` make that end strict."""
  def ok(v: Any) -> bool:
    return (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)
  interval = f"{'(' if open_lo else '['}{_num(lo)}, {_num(hi)}{')' if open_hi else ']'}"
  return Check(ok, f"{'an integer' if integer else 'a number'} in {interval}{_note(note)}")


def _descending(ts: Any) -> bool:
  """A strictly descending tuple of integers >= 0 (or empty)."""
  return all(isinstance(k, int) and k >= 0 for k in ts) and list(ts) == sorted(set(ts))[::-1]


def _descending_rows(v: Any) -> bool:
  """A tuple of non-empty strictly descending tuples of integers >= 0 (or empty)."""
  return all(isinstance(ts, (tuple, list)) and len(ts) >= 1 and _descending(ts) for ts in v)


def _mesh_rules_ok(rules: Any) -> bool:
  """mesh.rules: ((logical, "axis,axis"), ...), logical names from LOGICAL_AXES once each, mesh axes from
  MESH_AXES; a mesh axis appears in at most one rule's parameter side and at most once in the batch rule."""
  try:
    pairs = [(str(k), str(v)) for k, v in rules]
  except (TypeError, ValueError):
    return False
  names = [k for k, _ in pairs]
  if len(set(names)) != len(names) or not set(names) <= set(choices.LOGICAL_AXES):
    return False
  param_axes: list[str] = []
  for k, v in pairs:
    axes = [a.strip() for a in v.split(",") if a.strip()]
    if not set(axes) <= set(choices.MESH_AXES) or len(set(axes)) != len(axes):
      return False
    if k != "batch":
      param_axes += axes
  return len(set(param_axes)) == len(param_axes)


# Specs shared by several keys.
STEPS = Check(lambda v: len(v) >= 1 and all(isinstance(k, int) and k >= 1 for k in v),
              "a non-empty tuple of integers >= 1")
GUIDANCE = at_least(1.0, number=True, note="CFG scale g; w = g - 1")
MULTIPLE_OF_8 = Check(lambda v: v >= 0 and v % 8 == 0, "0 or a multiple of 8")
# The options of a teacher solver, in each section that names one (solver, sample_teacher, sample).
SOLVER_OPTIONS = {"eta": between(0.0, 1.0), "order": one_of(choices.ER_SDE_ORDERS),
                  "noise_fn": one_of(choices.ER_SDE_NOISE_FNS)}
AXIS_SIZE = Check(lambda v: v == -1 or v >= 1, "-1 (fill) or an integer >= 1")

# Section name -> its builder (in the order of the tree), and dotted key -> spec.
_SECTIONS: dict[str, Callable[[], ConfigDict]] = {}
SPECS: dict[str, Spec] = {}


def _section(name: str, specs: dict[str, Spec]) -> Callable[[Callable[[], ConfigDict]], Callable[[], ConfigDict]]:
  """Declares the builder of section ``name`` of :func:`defaults` with the specs of its keys."""
  def register(build: Callable[[], ConfigDict]) -> Callable[[], ConfigDict]:
    _SECTIONS[name] = build
    SPECS.update({f"{name}.{key}": spec for key, spec in specs.items()})
    return build
  return register


def defaults() -> ConfigDict:
  """The full config tree with SD1.5 SCott paper settings as defaults."""
  c = ConfigDict()
  c.seed = 0
  # Mode run when --mode is not given (the README's main job runs the default of its config).
  c.default_mode = "train"
  # JAX's persistent compilation cache ("" = off; a relative path is under --workdir): runs that compile the same
  # programs (seeds of one method, a resumed run) load them instead of compiling again.
  c.compilation_cache = ""
  for name, build in _SECTIONS.items():
    c[name] = build()
  return c


# ---------------------------------------------------------------------------------------------------
# Sections, in the order of the tree.

@_section("schedule", {
    "beta_schedule": one_of(choices.BETA_SCHEDULES),
    "prediction_type": one_of(choices.PREDICTION_TYPES),
    "num_train_timesteps": at_least(2),
})
def _schedule() -> ConfigDict:
  """Noise schedule (notes section 1); fields follow diffusers' scheduler config."""
  return ConfigDict(
      dict(
          beta_schedule="scaled_linear",
          beta_start=0.00085,
          beta_end=0.012,
          num_train_timesteps=1000,
          prediction_type="epsilon",
      )
  )


@_section("solver", {
    "name": one_of(choices.SOLVER_NAMES),
    **SOLVER_OPTIONS,
    "skip": at_least(1),
    "h": at_least(1),
})
def _solver() -> ConfigDict:
  """The teacher's SDE solve Phi_SDE(z_tn, t_n, t_m, h) (paper Eq. 2, 5; notes section 3)."""
  return ConfigDict(
      dict(
          name="er_sde",  # registry name in scott_jax.solvers
          eta=0.0,  # DDIM noise scale (Eq. 5); used by "ddim"
          order=2,  # ER-SDE order 1-3
          noise_fn=7,  # ER-SDE noise scale function 1-7 (notes numbering); 7 is the paper's "ER-SDE 5"
          skip=24,  # DECISION: t_m = max(t_n - skip, 0)
          h=3,  # sub-steps of the multi-step teacher
      )
  )


@_section("consistency", {
    "grid": one_of(choices.GRIDS),
    "num_ddim_timesteps": at_least(1),
    "distance": one_of(choices.DISTANCES),
    "ema_decay": between(0.0, 1.0, open_hi=True),
    "guidance_embed_dim": Check(lambda v: v == 0 or v >= 2, "0 (no guidance embedding) or an integer >= 2"),
    "timestep_rule": one_of(choices.TIMESTEP_RULES),
    "student_output": one_of(choices.STUDENT_OUTPUTS),
    "logvar_init": between(-30.0, 10.0, note="the initial log-variance of a Gaussian student"),
    "var_floor": above(0, note="added to both variances of the KL consistency loss"),
})
def _consistency() -> ConfigDict:
  """Consistency distillation (paper Eq. 1; notes sections 2, 4, 5)."""
  return ConfigDict(
      dict(
          grid="skip",  # DECISION: t_n grid spaced by solver.skip ("skip") or LCM's ddim grid ("ddim")
          num_ddim_timesteps=50,  # size of the "ddim" grid [19, 39, ..., 999]
          timestep_scaling=10.0,  # boundary conditions use s = timestep_scaling * t
          distance="l2",  # l2 (paper Eq. 1) or pseudo_huber (LCM script)
          huber_c=0.001,
          ema_decay=0.95,  # theta^- <- mu theta^- + (1 - mu) theta
          w_min=5.0,  # DECISION: guidance scale w ~ U[w_min, w_max] (LCM form, notes section 2)
          w_max=15.0,
          guidance_embed_dim=256,  # the student's w embedding width; 0 = none (LCM-LoRA style: w in the teacher only)
          # DECISION: k-step student sampling times: "grid" = k points of the training grid above
          # (consistency.grid_timesteps), "lcm" = LCM's num_ddim_timesteps grid whatever the training grid
          timestep_rule="grid",
          # DECISION (docs/decisions.md, SCott v1): the student's output. "point" = f_theta(z, t) (L_CD = distance);
          # "gaussian" = a per-element Gaussian N(mean, var): the U-Net has twice the output channels, the second
          # half a log-variance, var_f = c_out(t)^2 exp(logvar) (zero at t = 0); L_CD = KL(target || student)
          student_output="point",
          logvar_init=-10.0,  # gaussian: the log-variance half's bias at init (its kernel is zero): near-deterministic
          var_floor=1e-6,  # gaussian: added to both variances in the KL (the target at t_m = 0 has variance 0)
      )
  )


@_section("model", {
    "dtype": one_of(choices.DTYPES),
    "student_lora_rank": at_least(0, note="0: full student"),
    "student_lora_alpha": above(0),
    "student_lora_apply": one_of(choices.LORA_APPLY),
    "student_lora_targets": Check(lambda v: len(v) >= 1 and all(isinstance(t, str) and t for t in v),
                                  "a non-empty tuple of lora.PRESETS names or regexes"),
    "attention": one_of(choices.ATTENTION_IMPLEMENTATIONS),
    "attention_chunk_size": at_least(1, note="query positions per attention block"),
    "remat_policy": one_of(choices.REMAT_POLICIES),
})
def _model() -> ConfigDict:
  """The teacher (and the student's / discriminator's initialisation): a diffusers-format folder (mode train)."""
  return ConfigDict(
      dict(
          teacher_path="models/stable-diffusion-v1-5",  # unet/ vae/ text_encoder/ tokenizer/ scheduler/
          vae_path="",  # a folder with vae/ to use instead of the teacher's (e.g. RV5.1 "noVAE"); "" = teacher's
          dtype="float32",  # compute dtype of every network (parameters stay float32)
          vae_sample=True,  # encode images with a posterior sample (LCM script) rather than its mean
          # The student: 0 = the full U-Net is trained; r >= 1 = a LoRA overlay of rank r on the frozen teacher
          # (LCM-LoRA style; plus the guidance projection cond_proj in full when guidance_embed_dim > 0).
          student_lora_rank=0,
          student_lora_alpha=64.0,
          # LCM-LoRA's targets: attention, feed-forward, transformer in/out, resnet convs and time projections.
          student_lora_targets=("attention", "feed_forward", "proj", "conv", r"(^|/)resnets_\d+/time_emb_proj/kernel$"),
          # DECISION: how the online student's forward + backward runs with the overlay (the same function, speed
          # only; the EMA target always merges): "factorised" (lora.factorised, rank-r parameter gradients) |
          # "merged" (lora.merge, full-size kernel gradients); see gan.lora_apply
          student_lora_apply="factorised",
          # U-Nets (teacher, student, discriminator base): attention xla (plain, (B, N, T, S) logits) | cudnn
          # (fused flash attention, GPU with bfloat16/float16 only) | chunked (query blocks of
          # attention_chunk_size: one block's logits live at a time); remat recomputes each block's activations
          # in the backward pass (less memory, ~1 more forward of compute); auto = cudnn on a GPU with bfloat16 /
          # float16 compute, else chunked (resolved at trace time by the backend).
          attention="xla",
          attention_chunk_size=1024,
          remat=False,
          # DECISION: what a rematerialised block keeps for its backward (jax.checkpoint_policies name):
          # nothing_saveable (only the block's inputs: least memory, one more forward of the block) | dots_saveable
          # | dots_with_no_batch_dims_saveable (keep matmul outputs: less recompute, more memory).
          remat_policy="nothing_saveable",
      )
  )


@_section("gan", {
    "lambda_adv": at_least(0, number=True),
    "disc_time": one_of(choices.DISC_TIMES),
    "variant": one_of(choices.VARIANTS),
    "lora_rank": at_least(1),
    "lora_alpha": above(0),
    "head_init": one_of(choices.HEAD_INITS),
    "lora_apply": one_of(choices.LORA_APPLY),
    "weighting": one_of(choices.WEIGHTINGS),
    "max_weight": above(0, note="the adaptive weighting's upper clip of lambda_eff"),
    "start_step": at_least(0, note="steps of discriminator training before L_G is on"),
    "example_stride": at_least(1, note="the GAN terms on every k-th example of the batch; 1 = all"),
})
def _gan() -> ConfigDict:
  """Adversarial part of Eq. 7 and the LoRA discriminator (notes section 5)."""
  return ConfigDict(
      dict(
          enabled=True,
          lambda_adv=0.4,
          disc_time="shared",  # DECISION: shared | paper | renoise (losses.disc_inputs)
          variant="lora",  # lora (frozen encoder, LoRA decoder) | full (trainable U-Net copy) | no_cond
          lora_targets=("attention", "conv"),  # lora.PRESETS names or regexes, inside the up blocks
          lora_rank=64,  # attention + conv of the SD1.5 up blocks at rank 64 + head: 3.64% of the U-Net
          lora_alpha=64.0,
          # DECISION: how the decoder runs with the overlay (the same function, speed only): "factorised" = x W +
          # (alpha / r) (x A) B per layer, rank-r parameter gradients (PEFT's form) | "merged" = W + (alpha / r) A B
          # built first, whose backward computes the full-size kernel gradients (lora.factorised / lora.merge)
          lora_apply="factorised",
          # DECISION: the head's logit conv and text/time projection start at zero ("zero": every logit starts at
          # 0, both hinges have gradient) or as before ("normal": logits start near +1.3, no real-side gradient)
          head_init="zero",
          # DECISION: weight of L_G in Eq. 7: "fixed" = lambda_adv (the paper); "adaptive" = lambda_adv *
          # ||dL_CD/dx|| / ||dL_G/dx|| at the student's output x, clipped to max_weight (the VQGAN rule)
          weighting="fixed",
          max_weight=10.0,
          start_step=0,  # DECISION: L_G is off until the discriminator has trained this many steps
          # DECISION (issue 13, cost): L_D and L_G on every k-th example of the batch (1 = all, the paper; 2 halves
          # the discriminator's FLOPs, an unbiased estimate of the same losses from half the examples)
          example_stride=1,
      )
  )


@_section("optim", {
    "student_lr": above(0),
    "disc_lr": above(0),
    "warmup_steps": at_least(0),
    "weight_decay": at_least(0, number=True),
    "grad_clip": above(0),
    "grad_accum_steps": at_least(1, note="microbatches per update; 1 = the whole batch at once"),
})
def _optim() -> ConfigDict:
  """One AdamW per network: linear warmup to the learning rate, then constant; global-norm clipping first."""
  return ConfigDict(
      dict(
          student_lr=8e-6,
          disc_lr=2e-5,
          warmup_steps=500,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          weight_decay=1e-2,
          grad_clip=1.0,
          # Gradient accumulation inside the step: the batch is split into this many microbatches (each device
          # keeps its own examples), their gradients averaged before the one update, so activations are those of
          # one microbatch (docs/scaling.md). Each microbatch draws its own t_n, w and noise; with gan.weighting
          # "adaptive" lambda_eff is each microbatch's (DECISION).
          grad_accum_steps=1,
      )
  )


@_section("train", {
    "batch_size": at_least(1),
    "num_steps": at_least(1),
    "log_every": at_least(1),
    "checkpoint_every": at_least(1),
    "keep_checkpoints": at_least(1),
    "sample_every": at_least(0, note="0 disables sampling"),
    "sample_steps": STEPS,
    "sample_guidance_scale": GUIDANCE,
})
def _train() -> ConfigDict:
  """The train loop (mode train)."""
  return ConfigDict(
      dict(
          batch_size=40,
          num_steps=40000,
          log_every=50,  # metrics and the progress/ETA line
          checkpoint_every=1000,
          keep_checkpoints=3,
          sample_every=1000,  # PNG grids of the student's multistep samples; 0 disables
          sample_steps=(1, 2, 4),
          sample_guidance_scale=8.0,  # CFG scale g; the student gets w = g - 1
          sample_prompts=(
              "a photo of an astronaut riding a horse on the moon",
              "a cozy cabin in a snowy forest at dusk, warm light in the windows",
              "a close-up portrait of a fluffy orange cat, studio lighting",
              "a bowl of ramen with a soft-boiled egg, top view",
          ),
          sample_seed=0,
          save_initial=False,  # also checkpoint the initial state as step 0 (the untrained student)
      )
  )


@_section("data", {
    "source": one_of(choices.DATA_SOURCES),
    "resolution": Check(lambda v: v >= 8 and v % 8 == 0, "an integer >= 8, a multiple of 8"),
    "num_examples": at_least(1),
    "crop": one_of(choices.CROP_MODES),
    "num_threads": at_least(0),
    "prefetch_buffer": at_least(1),
    "num_workers": at_least(0),
})
def _data() -> ConfigDict:
  """Training data (mode train): images with captions; a batch at step k depends only on (seed, k).
  scott_jax.data.pipeline.make_pipeline reads every source below; sources: folder (images + a captions file:
  captions_file, else the first of captions.jsonl / captions.csv / metadata.jsonl / metadata.csv found in the
  folder (metadata.*: Hugging Face imagefolder, also in subfolders), else same-name .txt captions) | synthetic
  (random, for tests) | tar (webdataset shards: key.jpg + key.txt or key.json "caption") | tfds
  (tfds.data_source) | latent_cache (scott_jax.data.cache.write_cache output).
  """
  return ConfigDict(
      dict(
          source="folder",
          path="",  # folder: image dir | tar: dir, glob or a/{00000..00099}.tar | latent_cache: cache dir
          resolution=512,  # images: bicubic resize of the short side, then a square crop of this size
          num_examples=64,  # synthetic only
          captions_file="",  # folder: .jsonl {"file"|"file_name", "caption"|"text"} or .csv, under path; ""=search
          crop="center",  # center | random (seeded per example and epoch)
          shuffle=True,  # seeded per-epoch shuffling of this process's shard
          tar_index="",  # tar: .npz cache of the member index ("" = index in memory at start)
          tfds_name="coco_captions",
          tfds_split="train",
          tfds_data_dir="",  # "" = TFDS's default data_dir
          tfds_image_key="image",  # feature paths ("/" for nested features)
          tfds_caption_key="captions/text",  # one of several captions is picked per example (seeded)
          num_threads=16,  # grain read threads per process (decode + resize run there)
          prefetch_buffer=128,  # grain prefetch buffer (examples)
          num_workers=0,  # grain mp_prefetch worker processes (0: threads only)
      )
  )


@_section("toy2d", {
    "rare_mode_weight": above(0),
    "methods": Check(lambda v: len(v) >= 1 and len(set(v)) == len(v) and all(m in choices.TOY2D_METHODS for m in v),
                     f"a non-empty tuple of distinct methods from {', '.join(choices.TOY2D_METHODS)}"),
})
def _toy2d() -> ConfigDict:
  """The 2-D toy experiment (paper Figure 4 made measurable; mode toy2d)."""
  return ConfigDict(
      dict(
          num_modes=8,
          radius=1.0,
          mode_std=0.05,
          rare_mode_weight=1.0,  # weight of every other mode relative to the rest (1.0: equal weights)
          hidden=128,
          depth=3,
          batch_size=512,
          pretrain_steps=3000,  # regress the MLP onto the exact eps: the "pretrained teacher" init
          distill_steps=3000,
          learning_rate=1e-3,
          seeds=(0, 1, 2),
          eval_samples=4000,
          sample_steps=(1, 2, 4),
          lcm_skip=20,  # the ODE baseline: ddim, eta 0, h 1, skip lcm_skip
          # scott | lcm | scott_gaussian (SCott's teacher, the Gaussian student: rows drawing from its Gaussian and
          # taking its mean), each distilled from the same pretrained MLP with the same budget
          methods=("scott", "lcm", "scott_gaussian"),
      )
  )


@_section("digits", {
    "resolution": Check(lambda v: v in (8, 16, 32), "8, 16 or 32"),
    "test_fraction": between(0.05, 0.5),
    "max_length": between(6, 77, integer=True),
    "teacher_steps": at_least(1),
    "teacher_ema": between(0.0, 1.0, open_hi=True),
    "prompt_dropout": between(0.0, 1.0, open_lo=True, open_hi=True),
    "classifier_steps": at_least(1),
    "teacher_rows": Check(lambda v: len(v) >= 1 and all(
        isinstance(r, str) and r.count(":") == 1 and r.split(":")[0] in choices.SOLVER_NAMES
        and r.split(":")[1].isdigit() and int(r.split(":")[1]) >= 1 for r in v),
        f"a non-empty tuple of 'solver:steps' strings, solver in {', '.join(choices.SOLVER_NAMES)}"),
    "guidance_scale": at_least(1.0, number=True, note="CFG scale g"),
    "samples_per_digit": at_least(2),
    "coverage_k": at_least(1),
    "distill_methods": Check(
        lambda v: len(v) == len(set(v)) and all(m in choices.DIGITS_METHODS for m in v),
        f"a tuple of distinct methods from {', '.join(choices.DIGITS_METHODS)} (empty: no students)"),
    "distill_seeds": Check(lambda v: len(v) >= 1 and len(v) == len(set(v)) and all(
        isinstance(k, int) and k >= 0 for k in v), "a non-empty tuple of distinct integers >= 0"),
    "student_steps": STEPS,
    "student_params": Check(lambda v: v in choices.PARAMS, " or ".join(repr(p) for p in choices.PARAMS)),
    "lcm_skip": at_least(1),
    "ablation_eta": between(0.0, 1.0),
    "eval_guidance_scales": Check(lambda v: all(isinstance(g, (int, float)) and g >= 1.0 for g in v),
                                  "a tuple of CFG scales >= 1"),
    "eval_timesteps": Check(lambda v: _descending_rows(v) and len({len(ts) for ts in v}) == len(v),
                            "a tuple of strictly descending integer tuples of different lengths (or empty)"),
    "first_methods": at_least(0),
    "evidence_teacher_steps": at_least(1),
    "bootstrap": at_least(10, note="bootstrap replicates"),
    "probe_grid": Check(lambda v: all(len(p) == 2 and p[0] in choices.HEAD_INITS and isinstance(p[1], (int, float))
                                      and p[1] > 0 for p in v),
                        f"a tuple of (head_init {' | '.join(repr(h) for h in choices.HEAD_INITS)}, disc lr > 0) pairs"),
    "probe_steps": at_least(1),
    "probe_batch": at_least(1),
})
def _digits() -> ConfigDict:
  """The embedded digits experiment (mode digits; scott_jax.digits): sklearn's 8x8 digits upsampled, pixel space
  (no VAE), a tiny BPE tokenizer and frozen random CLIP text encoder, a small teacher U-Net, a digit classifier
  whose features give FID / coverage and whose accuracy on the prompted digit plays the role of CLIP score.
  """
  return ConfigDict(
      dict(
          resolution=16,  # 8x8 digits -> resolution x resolution (PIL bilinear), grey replicated to RGB
          test_fraction=0.2,  # stratified split, seeded by split_seed
          split_seed=0,
          # Text: BPE tokenizer built from the prompts; CLIPTextModel with random fixed (seeded) weights.
          max_length=8,  # tokens per prompt (bos + 4 words + eos + padding)
          text_hidden=32,
          text_layers=2,
          text_heads=4,
          text_intermediate=64,
          text_seed=0,
          text_token_std=1.0,  # DECISION: token embeddings N(0, std^2) (see digits.data.init_text_encoder)
          text_position_std=0.02,
          # Teacher U-Net (diffusers UNet2DConditionModel fields); in/out channels 3, sample_size = resolution.
          unet_channels=(32, 64),
          unet_layers_per_block=1,
          unet_down_blocks=("DownBlock2D", "CrossAttnDownBlock2D"),
          unet_up_blocks=("CrossAttnUpBlock2D", "UpBlock2D"),
          unet_heads=(2, 4),  # attention heads per block (diffusers' attention_head_dim)
          unet_norm_groups=8,
          # Stage 1: eps-prediction MSE on the config.schedule, prompt dropout for CFG, AdamW, EMA.
          teacher_steps=3000,
          teacher_batch=128,
          teacher_lr=2e-3,
          teacher_warmup=100,  # linear warmup, then cosine decay to teacher_lr / 10
          teacher_ema=0.999,
          prompt_dropout=0.1,
          teacher_seed=0,
          checkpoint_every=500,
          log_every=100,
          # Digit classifier (features for FID / coverage; accuracy against the prompted digit).
          classifier_steps=1500,
          classifier_batch=128,
          classifier_lr=2e-3,
          classifier_widths=(16, 32),  # conv channels of the two conv pairs
          classifier_features=64,
          classifier_seed=0,
          # Evaluation: teacher rows "solver:steps" (ddim = DDIM eta 0; er_sde uses config.solver's order/noise_fn).
          teacher_rows=("ddim:50", "dpmpp_2m:25", "er_sde:50"),
          guidance_scale=3.0,  # CFG scale g of every row (students get w = g - 1)
          samples_per_digit=50,
          eval_batch=250,
          eval_seed=0,
          coverage_k=5,
          # Stage 2: students distilled by scott_jax.train from the stage-1 teacher (config.solver / gan / optim /
          # train / consistency as for SD1.5), one run per method and seed (scott_jax.digits.distill).
          distill_methods=("scott", "lcm"),
          distill_seeds=(0, 1, 2),
          student_steps=(1, 2, 4),  # sampling steps of the student rows
          student_params="ema",  # the sampled student: the EMA target (as LCM) or the online student
          lcm_skip=20,  # the LCM baseline's teacher: DDIM eta 0, h 1, skip lcm_skip (LCM's 50-step grid)
          ablation_eta=0.2,  # the scott_ddim ablation's DDIM eta (Table 5)
          # Mode evidence (scott_jax.digits.evidence): extra CFG scales evaluated at step 0 and the last checkpoint,
          # the sampling timesteps of every arm (() = each method's own grid), the methods trained first for every
          # seed, the teacher reference rows' DDIM steps, bootstrap replicates, and an extra copy of the report.
          eval_guidance_scales=(),
          eval_timesteps=(),
          first_methods=4,
          evidence_teacher_steps=50,
          bootstrap=1000,
          # Mode evidence's discriminator probe (scott_jax.digits.probe): (head_init, disc lr) pairs, steps, batch.
          probe_grid=(),
          probe_steps=300,
          probe_batch=16,
          evidence_doc="",  # e.g. docs/evidence.md (figures in docs/evidence/); "" = WORKDIR/evidence/report.md only
      )
  )


@_section("sample_teacher", {
    "solver": one_of(choices.SOLVER_NAMES),
    "num_steps": at_least(1),
    **SOLVER_OPTIONS,
    "num_samples": at_least(2),
    "data_std": above(0),
})
def _sample_teacher() -> ConfigDict:
  """Solver demo / teacher sampling (mode sample_teacher)."""
  return ConfigDict(
      dict(
          solver="ddim",
          num_steps=50,
          eta=0.0,
          order=1,
          noise_fn=1,
          num_samples=20000,
          data_mean=0.5,  # the toy analytic model: Gaussian data N(mean, std^2 I)
          data_std=0.3,
          dim=4,
      )
  )


@_section("sample", {
    "params": one_of(choices.PARAMS),
    "model": one_of(choices.SAMPLER_KINDS),
    "steps": STEPS,
    "timesteps": Check(_descending, "a strictly descending tuple of integers >= 0 (or empty)"),
    "guidance_scale": GUIDANCE,
    "num_per_prompt": at_least(1),
    "resolution": MULTIPLE_OF_8,
    "batch_size": at_least(1),
    "solver": one_of(choices.SOLVER_NAMES),
    **SOLVER_OPTIONS,
    "spacing": one_of(choices.SPACINGS),
    "steps_offset": at_least(0),
    "gaussian": one_of(choices.GAUSSIAN_SAMPLING),
})
def _sample() -> ConfigDict:
  """Text-to-image with the student or the teacher (mode sample; scott_jax.pipeline). Also what the export and
  eval modes load: path "" = the run in --workdir (its checkpoint `step`, -1 latest, with `params`).
  """
  return ConfigDict(
      dict(
          path="",  # "" = WORKDIR checkpoints | a Flax export (scott_export.json) | a diffusers folder
          step=-1,  # checkpoint step (-1: the latest)
          params="ema",  # ema | student: which parameters of the checkpoint
          model="student",  # student (multistep consistency sampling) | teacher (solver + CFG)
          steps=(1, 2, 4),  # one run per entry: student 1/2/4 -> LCM timesteps; teacher: solver steps
          timesteps=(),  # explicit descending timesteps instead of `steps` (one run)
          guidance_scale=8.0,  # CFG scale g; the student gets w = g - 1
          prompts=("a photo of an astronaut riding a horse on the moon",
                   "a close-up portrait of a fluffy orange cat, studio lighting"),
          prompt_file="",  # .jsonl (caption/prompt/text) or .txt; overrides `prompts`
          num_per_prompt=1,
          resolution=0,  # image size; 0 = data.resolution
          batch_size=8,  # images per jitted call
          seed=0,
          solver="ddim",  # teacher: a scott_jax.solvers name
          eta=0.0,
          order=2,
          noise_fn=7,
          spacing="leading",  # teacher timesteps: diffusers' DDIM spacing
          steps_offset=1,  # SD1.5's steps_offset
          # A Gaussian student (consistency.student_output = "gaussian"), here and in the eval job and the train
          # loop's sample grids: "sample" draws x0 from the student's Gaussian at every step, "mean" takes its mean
          gaussian="sample",
      )
  )


@_section("export", {
    "formats": Check(lambda v: len(v) >= 1 and all(f in choices.EXPORT_FORMATS for f in v),
                     f"a non-empty tuple of {', '.join(repr(f) for f in choices.EXPORT_FORMATS)}"),
})
def _export() -> ConfigDict:
  """Export of a trained student (mode export; scott_jax.export): from checkpoint sample.step / sample.params."""
  return ConfigDict(
      dict(
          formats=("flax", "diffusers", "lora"),  # lora only when the student is a LoRA overlay
          out_dir="",  # "" = WORKDIR/export/step_<step>_<params>
      )
  )


@_section("eval", {
    "num_prompts": at_least(0, note="0: all"),
    "sample_steps": STEPS,
    "params": Check(lambda v: len(v) >= 1 and all(p in choices.PARAMS for p in v),
                    f"a non-empty tuple of {', '.join(repr(p) for p in choices.PARAMS)}"),
    "checkpoint_steps": Check(lambda v: all(isinstance(k, int) and k >= 0 for k in v), "a tuple of integers >= 0"),
    "timesteps": Check(_descending_rows,
                       "a tuple of strictly descending tuples of integers >= 0 (or empty)"),
    "guidance_scale": at_least(1.0, number=True),
    "resolution": MULTIPLE_OF_8,
    "batch_size": at_least(1),
    "feature_batch_size": at_least(1),
    "coverage_k": at_least(1),
    "poll_seconds": above(0),
    "max_idle_seconds": at_least(0, number=True),
    "max_reference_features": at_least(0),
    "save_images": at_least(0),
    "prompt_metric": Check(lambda v: v == "" or (v.count(":") == 1 and all(v.split(":"))),
                           "'' or 'package.module:factory'"),
})
def _eval() -> ConfigDict:
  """The separate evaluation job (mode eval; scott_jax.evaluate) and reference statistics (mode fid_stats)."""
  return ConfigDict(
      dict(
          prompt_file="",  # COCO-2017 5K / COCO-2014 30K / MJHQ captions, .jsonl
          num_prompts=0,  # first N prompts (0: all)
          reference_stats="",  # .npz with mu, sigma (and features for coverage) from mode fid_stats
          sample_steps=(1, 2, 4),
          params=("ema",),  # ema and/or student
          checkpoint_steps=(),  # evaluate exactly these steps; () = every finalised checkpoint
          timesteps=(),  # explicit descending timestep tuples, one row each, instead of `sample_steps`
          guidance_scale=8.0,
          resolution=0,  # 0 = data.resolution
          batch_size=8,
          seed=0,
          features="inception",  # registry name (inception, random_projection) or "module:factory"
          feature_weights="",  # inception: the .npz of scott_jax.metrics.inception
          feature_batch_size=50,
          clip_model="",  # a transformers CLIPModel folder for the CLIP score; "" skips it
          prompt_metric="",  # "package.module:factory" of a per-image prompt-agreement score; "" skips it
          coverage_k=5,
          watch=False,  # keep polling WORKDIR/checkpoints for new steps
          poll_seconds=60.0,
          max_idle_seconds=3600.0,  # watch: stop after this long without a new step (or after train_done.json)
          image_folder="",  # fid_stats: the reference images (jpg/png, recursive)
          max_reference_features=10000,  # fid_stats: feature rows kept in the npz for coverage (0: none)
          save_images=0,  # eval: PNGs kept per (step, steps, params) under WORKDIR/eval/images
          save_features=False,  # eval: per-image features and prompt metric per row, WORKDIR/eval/features/*.npz
      )
  )


@_section("mesh", {
    "data": AXIS_SIZE,
    "fsdp": AXIS_SIZE,
    "tensor": AXIS_SIZE,
    "rules": Check(lambda v: _mesh_rules_ok(v),
                   f"pairs (logical, 'axis,axis') with logical in {', '.join(choices.LOGICAL_AXES)} (each once) "
                   f"and axes from {', '.join(choices.MESH_AXES)} (each used once; '' = replicated)"),
    "fsdp_min_size": at_least(0),
    "frozen": one_of(choices.FROZEN_PLACEMENTS),
    "distributed": one_of(choices.DISTRIBUTED_MODES),
    "num_processes": at_least(0, note="0: from the environment"),
    "process_id": at_least(-1, note="-1: from the environment"),
    "plan_architecture": one_of(choices.PLAN_ARCHITECTURES),
    "plan_devices": at_least(0, note="0: the devices present"),
    "plan_topology": Check(lambda v: isinstance(v, str) and (v == "" or ":" in v),
                           "'' (fake CPU devices / the devices present), a TPU topology like 'v5e:2x4' or GPUs "
                           "like 'h100:4'"),
})
def _mesh() -> ConfigDict:
  """Device mesh and sharding of the train step (scott_jax.parallel; mode plan: scott_jax.plan)."""
  return ConfigDict(
      dict(
          data=-1,  # mesh axis sizes; one of data/fsdp/tensor may be -1 (fills the remaining devices)
          fsdp=1,
          tensor=1,
          # Logical axis -> mesh axes ("a,b"; "" = replicated): batch (leading dim of every batch array),
          # param_fsdp (largest divisible dim of a large parameter), param_tensor (last dim of a kernel).
          rules=(("batch", "data,fsdp"), ("param_fsdp", "fsdp"), ("param_tensor", "tensor")),
          fsdp_min_size=1 << 18,  # parameters with fewer elements are replicated (2^18 = 1 MiB in float32)
          frozen="fsdp",  # frozen teacher / VAE / text encoder: fsdp (the parameter rules) | replicate
          distributed="auto",  # jax.distributed.initialize: auto (SLURM, TPU pod or explicit) | on | off
          coordinator_address="",  # explicit multi-process start ("" = $JAX_COORDINATOR_ADDRESS or detection)
          num_processes=0,  # 0 = $JAX_NUM_PROCESSES or detection
          process_id=-1,  # -1 = $JAX_PROCESS_ID or detection
          plan_architecture="teacher",  # mode plan: teacher (config.json files of model.teacher_path) | sd15
          plan_devices=0,  # mode plan on CPU: that many fake host devices; 0 = the devices present
          # mode plan for accelerators this host does not have: "v5e:2x4" (8 TPU v5e chips) or "h100:4" (4 H100s
          # on one host; "h100:2x8" 2 hosts of 8) compiles with the TPU / GPU compiler itself (deviceless AOT;
          # libtpu: the test extra; the CUDA plugin: the gpu-plan extra); its memory figures are that compiler's own
          plan_topology="",
          # DECISION (issue 13): mode plan on CPU keeps the optimization barriers until code generation
          # (xla_disable_hlo_passes=cse_barrier_expander), as the GPU compiler does (it removes them after
          # scheduling). XLA's CPU pipeline removes them before its late CSE, which then merges each remat
          # recomputation with the forward it repeats: remat is undone and the plan's temporaries are those of
          # a program without it. False: the CPU compiler's own pipeline.
          plan_keep_barriers=True,
      )
  )



def _flatten(d: ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, (ConfigDict, dict)):
      out[key] = v  # sections are keys too, so an unknown section is caught
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _type_ok(default: Any, value: Any) -> bool:
  if default is None or value is None:
    return True
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  if isinstance(default, (ConfigDict, dict)):
    return isinstance(value, (ConfigDict, dict))
  return isinstance(value, type(default))


def _typename(v: Any) -> str:
  return {bool: "a bool", int: "an integer", float: "a number", str: "a string"}.get(type(v), type(v).__name__)


def _unknown_key_error(key: str, known: dict[str, Any]) -> ConfigError:
  parent = key.rsplit(".", 1)[0] if "." in key else ""
  depth = key.count(".")
  siblings = sorted(k.rsplit(".", 1)[-1] for k in known
                    if k.count(".") == depth and (k.rsplit(".", 1)[0] if "." in k else "") == parent)
  where = f" in section '{parent}'" if parent else ""
  if parent and parent not in known:
    return _unknown_key_error(parent, known)
  return ConfigError(f"unknown config key '{key}'; allowed keys{where}: {', '.join(siblings)}")


def check_key(key: str, schema: ConfigDict | None = None) -> None:
  """Raises :class:`ConfigError` if the dotted ``key`` is not in the schema."""
  known = _flatten(defaults() if schema is None else schema)
  if key not in known:
    raise _unknown_key_error(key, known)


def validate(config: ConfigDict, schema: ConfigDict | None = None) -> ConfigDict:
  """Checks ``config`` against the schema; returns it unchanged or raises :class:`ConfigError`.

  Args:
    config: the experiment config.
    schema: the tree of allowed keys with default values; :func:`defaults` when None.
  """
  schema = defaults() if schema is None else schema
  known = _flatten(schema)
  given = _flatten(config)
  for key, value in given.items():
    if key not in known:
      raise _unknown_key_error(key, known)
    default = known[key]
    if not _type_ok(default, value):
      raise ConfigError(f"config key '{key}' has value {value!r}; expected {_typename(default)}")
    spec = SPECS.get(key)
    problem = spec.problem(value) if spec is not None else None
    if problem is not None:
      raise ConfigError(f"config key '{key}' has value {value!r}; {problem}")
  return config
