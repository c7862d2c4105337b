"""The named choices of the library modules, written once, in a module that imports nothing.

`scott_jax.config` validates every config key against these without importing jax, so that ``--help`` and a
config error stay as fast as Python's start-up; each owner module imports its own names from here and is
where they are documented and handled (``losses.DISTANCES is choices.DISTANCES``). A new choice is added
here and handled in its owner; a test per owner checks that its registry (e.g. ``solvers.SOLVERS``) and the
names here agree.
"""

from __future__ import annotations

# scott_jax.schedules: diffusers' scheduler fields.
BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# scott_jax.solvers: the registry's names (the keys of solvers.SOLVERS, in order), the ER-SDE orders and
# noise scale functions (the keys of solvers.NOISE_FNS, notes numbering), diffusers' timestep spacings.
SOLVER_NAMES = ("ddim", "er_sde", "dpmpp_2m", "addim")
ER_SDE_ORDERS = (1, 2, 3)
ER_SDE_NOISE_FNS = (1, 2, 3, 4, 5, 6, 7)
SPACINGS = ("leading", "trailing", "linspace")

# scott_jax.consistency: the student's output, how a Gaussian student is sampled, the training grid and the
# k-step sampling times.
STUDENT_OUTPUTS = ("point", "gaussian")
GAUSSIAN_SAMPLING = ("sample", "mean")
GRIDS = ("skip", "ddim")
TIMESTEP_RULES = ("grid", "lcm")

# scott_jax.losses: the consistency distance, the discriminator's times, the weight of L_G.
DISTANCES = ("l2", "pseudo_huber")
DISC_TIMES = ("shared", "paper", "renoise")
WEIGHTINGS = ("fixed", "adaptive")

# scott_jax.discriminator: the variant and the head's initialisation.
VARIANTS = ("lora", "full", "no_cond")
HEAD_INITS = ("zero", "normal")

# scott_jax.models.lora: how a network runs with a LoRA overlay (the same function): lora.factorised or lora.merge.
LORA_APPLY = ("factorised", "merged")

# scott_jax.models: compute dtypes (models.loading.compute_dtype), the U-Net's attention implementations and
# rematerialisation policies (jax.checkpoint_policies names).
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "chunked", "auto")
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")

# The parameters of a checkpoint that sampling, export and evaluation read: the EMA target or the online student.
PARAMS = ("ema", "student")

# scott_jax.data: the sources of pipeline.make_pipeline; the crops of transforms.crop.
DATA_SOURCES = ("folder", "tar", "tfds", "latent_cache", "synthetic")
CROP_MODES = ("center", "random")

# scott_jax.pipeline: what mode sample samples with (the student's multistep sampler or the teacher's solver).
SAMPLER_KINDS = ("student", "teacher")

# scott_jax.export: what mode export writes.
EXPORT_FORMATS = ("flax", "diffusers", "lora")

# scott_jax.toy2d: the distilled methods of the 2-D toy.
TOY2D_METHODS = ("scott", "lcm", "scott_gaussian")

# scott_jax.digits.distill: the students of the digits experiment (distill.METHODS).
DIGITS_METHODS = ("scott", "lcm", "scott_no_gan", "scott_ddim", "scott_h1", "lcm_gan", "ode",
                  "scott_fixed_gan", "scott_gaussian", "scott_gaussian_no_gan", "scott_k2")

# scott_jax.parallel: the device mesh's axes and the logical axes that config.mesh.rules maps onto them.
MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXES = ("batch", "param_fsdp", "param_tensor")
# Where the frozen networks live, and when jax.distributed starts (parallel.distributed_spec).
FROZEN_PLACEMENTS = ("fsdp", "replicate")
DISTRIBUTED_MODES = ("auto", "on", "off")

# scott_jax.plan: where mode plan takes the architectures from.
PLAN_ARCHITECTURES = ("teacher", "sd15", "sdxl")
