"""The embedded default: SCott end to end on real data (sklearn's handwritten digits) on 2 CPU cores.

  python -m scott_jax.main --config configs/digits.py --workdir runs/digits          # full run
  python -m scott_jax.main --config configs/digits.py:quick --workdir runs/digits_q  # the same, in minutes

No downloads, weights or GPU: the data is sklearn's load_digits, the tokenizer and a frozen random CLIP text
encoder are written at setup, the teacher is trained in stage 1 (scott_jax.digits). The U-Net, text encoder,
tokenizer, solvers, losses, discriminator, train step and checkpoints are the SD1.5 run's, at a small size.
Stage 2 uses the SD1.5 SCott settings below (ER-SDE noise fn 7, order 2, skip 24, h = 3, GAN on); the
teacher's diffusers folder is WORKDIR/teacher_pipeline. Writes WORKDIR/report.md.

Variants: ``default``, ``quick`` (fewer steps and samples; the CI test and a first look), ``ablations``
(the default plus SCott without GAN, with the DDIM-eta teacher, with h = 1, and LCM + GAN), ``evidence`` (mode
evidence, `scott_jax.digits.evidence`: the decisive experiment behind docs/evidence.md; same teacher and
classifier as the default, the untrained student and 4 trained arms x 5 seeds, learning curves, 2,000 samples
per row), ``evidence_all`` (the same plus 5 more arms: the ODE control, LCM + GAN, h = 1 and the Gaussian
students) and ``evidence_quick`` (the same pipeline at CI size).

  python -m scott_jax.main --config configs/digits.py:evidence --workdir runs/evidence \
      --config.digits.evidence_doc=docs/evidence.md
"""

from __future__ import annotations

from scott_jax import config as config_lib
from scott_jax.config_files import parse_arg

VARIANTS = ("default", "quick", "ablations", "evidence", "evidence_all", "evidence_quick")


def working_gan(c: config_lib.ConfigDict, start_step: int) -> None:
  """The working GAN of docs/evidence.md, arm f ("scott_fixed_gan" is the paper's fixed lambda from step 0), and
  the config the evidence arms share: zero-initialised head, adaptive weighting (max 10), L_G from ``start_step``
  (50 in the experiment, 2 in the CI-sized variants, whose runs are 6-10 steps), disc lr 1e-3 (10x the
  student's: the discriminator probe on the untrained student took the zero-head discriminator to hinge 0.55 /
  disc_accuracy 0.96 in 150 steps at 1e-3, but only to 1.45 / 0.90 at 2.5e-4, the paper's 2.5 ratio); w from 0
  (CFG 1, the second evaluation scale, inside every student's training range); the Gaussian arms' initial
  log-variance as configs/toy2d.py (-10 learns the variance slowly)."""
  c.gan.update(dict(head_init="zero", weighting="adaptive", max_weight=10.0, start_step=start_step))
  c.optim.update(dict(disc_lr=1e-3))
  c.consistency.update(dict(w_min=0.0, logvar_init=-7.0))


def get_config(arg: str | None = None) -> config_lib.ConfigDict:
  variant = parse_arg(arg, positional="variant", variant=("default", VARIANTS))["variant"]
  c = config_lib.defaults()
  c.default_mode = "digits"
  c.model.teacher_path = ""  # stage 2 reads WORKDIR/teacher_pipeline (written by stage 1)
  # Stage 2: the paper's SCott teacher, at digits size.
  c.solver.update(dict(name="er_sde", order=2, noise_fn=7, skip=24, h=3, eta=0.0))
  c.consistency.update(dict(w_min=0.5, w_max=3.0, ema_decay=0.95, distance="l2"))  # CFG g in [1.5, 4]
  c.gan.update(dict(enabled=True, lambda_adv=0.4, variant="lora", lora_rank=4, lora_alpha=4.0))
  c.optim.update(dict(student_lr=1e-4, warmup_steps=20))
  # The working GAN of docs/evidence.md for every variant (the paper's fixed lambda from step 0 collapsed 5 of 5
  # seeds there); the CI-sized variants, whose runs are 6-10 steps, switch L_G on at step 2.
  working_gan(c, start_step=2 if variant in ("quick", "evidence_quick") else 50)
  # 200 steps of batch 32 per student: in docs/evidence.md the 2-step FID curves flatten between steps 300 and 450,
  # the 4-step FID is best at step 150-300 and the 1-step still improves at 600.
  c.train.update(dict(batch_size=32, num_steps=200, log_every=25, checkpoint_every=100, keep_checkpoints=2,
                      sample_every=0, sample_steps=(1, 2, 4), sample_guidance_scale=2.0,
                      sample_prompts=("a handwritten digit three", "a handwritten digit seven")))
  c.data.update(dict(source="synthetic", path="", resolution=16, num_examples=8))
  c.compilation_cache = "jax_cache"  # WORKDIR/jax_cache: the seeds of a method share one compiled train step
  # Sized for 15 minutes on 2 CPU cores: teacher 1500 x 64 images, classifier 500 x 128, students 2 seeds per
  # method (docs/evidence.md has 5 per arm and bootstrap intervals), 50 samples per digit per row, one teacher
  # reference row (DDIM 50; the DPM-Solver++ 25 and ER-SDE 50 rows, 40% of the eval stage, are one override away).
  # CFG scale 2 (w = 1): the 2000-step teacher's DDIM-50 samples are 99.6% recognised as the prompted digit
  # (g = 1.5: 98%, FID 33; g = 3: 100%, FID 117 with recall 0.37), so diversity is left to compare.
  c.digits.update(dict(unet_channels=(16, 32), unet_heads=(2, 4), unet_norm_groups=8, teacher_steps=1500,
                       teacher_batch=64, teacher_lr=2e-3, teacher_warmup=100, teacher_ema=0.999,
                       classifier_steps=500, classifier_batch=128, guidance_scale=2.0, samples_per_digit=50,
                       eval_batch=250, distill_seeds=(0, 1), teacher_rows=("ddim:50",)))
  quick = dict(teacher_steps=300, teacher_batch=16, classifier_steps=150, samples_per_digit=10, eval_batch=100,
               checkpoint_every=150, log_every=100)
  if variant == "quick":  # the same pipeline in a few minutes (the CI test); its short-trained models are weak
    c.digits.update(dict(quick, teacher_rows=("ddim:10", "er_sde:10"), distill_seeds=(0, 1)))
    c.train.update(dict(batch_size=16, num_steps=10, log_every=5, checkpoint_every=5))
  if variant in ("evidence", "evidence_all", "evidence_quick"):
    c.default_mode = "evidence"
    # Arms (docs/evidence.md; (a) is every run's step 0): b, d, e, f, the first arms, 5 seeds each, are
    # what the 3-hour CPU budget holds; `evidence_all` adds c, g, h, i, j after them (about 4 hours more on 2
    # cores), in the same workdir.
    methods = ("lcm", "scott_no_gan", "scott_fixed_gan", "scott")
    if variant == "evidence_all":
      methods += ("ode", "lcm_gan", "scott_h1", "scott_gaussian_no_gan", "scott_gaussian")
    c.digits.update(dict(distill_methods=methods, first_methods=4, distill_seeds=(0, 1, 2, 3, 4),
                         samples_per_digit=200, eval_batch=500, eval_guidance_scales=(1.0,),
                         # on both training grids (skip 20 and 24): 999 - 120 k
                         eval_timesteps=((999,), (999, 519), (999, 759, 519, 279)), evidence_teacher_steps=50,
                         bootstrap=1000, probe_steps=300, probe_batch=16,
                         probe_grid=(("zero", 1e-4), ("normal", 1e-4), ("zero", 2.5e-4), ("normal", 2.5e-4),
                                     ("zero", 1e-3), ("normal", 1e-3))))
    c.train.update(dict(num_steps=600, log_every=10, checkpoint_every=150, keep_checkpoints=10, save_initial=True))
  if variant == "evidence_quick":  # the CI test's size: the quick teacher, 2 arms x 1 seed, a few steps
    c.digits.update(dict(quick, distill_methods=("lcm", "scott"), first_methods=1, distill_seeds=(0,),
                         evidence_teacher_steps=10, bootstrap=20, probe_grid=(("zero", 1e-3),), probe_steps=4))
    c.train.update(dict(batch_size=16, num_steps=6, log_every=2, checkpoint_every=3))
  if variant == "ablations":  # the default run plus Tables 5-7's ablations at digits size (about 3x the time)
    c.digits.distill_methods = ("scott", "lcm", "scott_no_gan", "scott_ddim", "scott_h1", "lcm_gan")
  return c
