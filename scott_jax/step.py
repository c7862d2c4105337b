"""The SCott train step: the train state and the pure update, the paper's equations in one function each.

One step (``make_train_step``), paper Eq. 1, 6, 7 and notes sections 2, 4, 5:

  z0 = VAE(images) (or precomputed latents), c = CLIP(tokens) (or precomputed text embeddings),
  w ~ U[w_min, w_max] per example, t_n on the 50-step DDIM grid, z_tn = alpha z0 + sigma eps,
  z_tm = Phi_SDE(teacher with CFG in LCM form, z_tn, t_n, t_m, h)        (no gradient),
  L_CD = d(f_theta(z_tn, t_n, c, w), sg(f_ema(z_tm, t_m, c, w))),
  L_student = L_CD + lambda_adv * L_G(D(f_theta(...))),   L_D = hinge(D(real), D(sg(fake))),

then one AdamW update of the student and one of the discriminator (each with global-norm clipping and warmup)
and the EMA update theta^- <- mu theta^- + (1 - mu) theta. The student model (its parametrisation, a full or
LoRA state, the Gaussian output) is `scott_jax.student`'s; the EMA target starts equal to the student and has
the same structure.

The train state (`TrainState`) holds only what changes: student, EMA, discriminator (LoRA + head), both optimizer
states, the step and the RNG key. The frozen networks (teacher U-Net, VAE, text encoder, the encoded empty
prompt) are a separate pytree argument ``frozen``: never donated, never checkpointed, reloaded from the
diffusers folder named by ``config.model.teacher_path``.

Batches: `scott_jax.student.encode_batch`'s two kinds (images and token ids, or precomputed latents and text
embeddings). The trainer that runs this step on a mesh is `scott_jax.train`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from scott_jax import consistency, losses, solvers
from scott_jax import student as student_lib
from scott_jax.config import ConfigDict
from scott_jax.student import Models, encode_batch, encode_shapes

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and is checkpointed). ``disc``/``opt_disc`` are {} without GAN."""

  step: Array  # () int32, number of updates done
  student: PyTree
  ema: PyTree
  disc: PyTree
  opt_student: PyTree
  opt_disc: PyTree
  key: Array  # (2,) uint32 raw PRNG key


def make_optimizer(lr: float, optim: ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup to ``lr`` over optim.warmup_steps (then constant), after global-norm clipping."""
  if optim.warmup_steps > 0:
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, optim.warmup_steps),
                                     optax.constant_schedule(lr)], [optim.warmup_steps])
  else:
    schedule = optax.constant_schedule(lr)
  tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip),
                   optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay))
  return tx, schedule

def _disc_example_shapes(models: Models, teacher_params: PyTree,
                         batch_shapes: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
  """ShapeDtypeStructs of the head's inputs (features, temb, pooled) for encoded batches of ``batch_shapes``."""
  latent, text, pooled = batch_shapes
  t = jax.ShapeDtypeStruct(latent.shape[:1], jnp.int32)
  feats, temb = models.disc.feature_shapes(teacher_params, latent, t, text)
  return feats, temb, jax.ShapeDtypeStruct(pooled.shape, jnp.float32)


def _assemble_state(config: ConfigDict, models: Models, student: PyTree, disc: PyTree) -> TrainState:
  """The initial state around given student and discriminator parameters ({} without GAN); traceable."""
  k_train = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  ema = jax.tree_util.tree_map(jnp.copy, student)
  tx_s, _ = make_optimizer(config.optim.student_lr, config.optim)
  opt_disc = {}
  if models.disc is not None:
    tx_d, _ = make_optimizer(config.optim.disc_lr, config.optim)
    opt_disc = tx_d.init(disc)
  return TrainState(step=jnp.zeros((), jnp.int32), student=student, ema=ema, disc=disc,
                    opt_student=tx_s.init(student), opt_disc=opt_disc, key=k_train)


def init_disc(config: ConfigDict, models: Models, frozen: PyTree, batch_spec: dict[str, Any]) -> PyTree:
  """A fresh discriminator ({} without GAN) for encoded batches of ``batch_spec``; host-side (not traceable)."""
  if models.disc is None:
    return {}
  shapes = _disc_example_shapes(models, frozen["unet"], encode_shapes(models, frozen, batch_spec))
  k_disc = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
  return models.disc.init(k_disc, frozen["unet"], *(jnp.zeros(s.shape, s.dtype) for s in shapes))


def init_state(config: ConfigDict, models: Models, frozen: PyTree, batch_spec: dict[str, Any],
               shardings: PyTree = None) -> TrainState:
  """The initial train state: student = EMA = teacher + zero guidance projection, fresh discriminator.

  ``batch_spec``: a batch (arrays or ShapeDtypeStructs) fixing the latent / text shapes the head is built for.
  ``shardings``: the state's shardings (`scott_jax.parallel.state_shardings`): the state is then assembled by a
  jit with those output shardings, so no device holds more than its shards (else on the default device).
  """
  disc = init_disc(config, models, frozen, batch_spec)
  if shardings is None:
    return _assemble_state(config, models, student_lib.init_student_params(models, frozen["unet"], config), disc)
  if config.model.student_lora_rank:  # lora.init runs on the host (as the discriminator's): pass it in
    student = student_lib.init_student_params(models, frozen["unet"], config)
    return jax.jit(lambda s, d: _assemble_state(config, models, s, d), out_shardings=shardings)(student, disc)
  init = student_lib.init_student_params
  return jax.jit(lambda f, d: _assemble_state(config, models, init(models, f["unet"], config), d),
                 out_shardings=shardings)(frozen, disc)


def abstract_state(config: ConfigDict, models: Models, frozen: PyTree, batch_spec: dict[str, Any]) -> TrainState:
  """`init_state`'s shapes and dtypes (jax.ShapeDtypeStruct leaves), computed without any weights."""
  disc = {}
  if models.disc is not None:
    shapes = _disc_example_shapes(models, frozen["unet"], encode_shapes(models, frozen, batch_spec))
    disc = models.disc.init_shapes(frozen["unet"], *shapes)
  student = student_lib.student_shapes(config, models, frozen["unet"])
  return jax.eval_shape(lambda s, d: _assemble_state(config, models, s, d), student, disc)


# ---------------------------------------------------------------------------------------------------------
# The step.

def _interleaved(a: Array, k: int, field: str) -> Array:
  """a (B, ...) -> (k, B / k, ...) with row i = a[i::k], as a reshape (B / k, k, ...): when the batch is split over
  devices in contiguous shards of a multiple of k examples, each shard keeps its own examples (no collective).
  ``field`` names the config field of k in the error for a batch k does not divide."""
  if a.shape[0] % k:
    raise ValueError(f"config.{field}={k} must divide the batch of {a.shape[0]} examples")
  return jnp.moveaxis(a.reshape(a.shape[0] // k, k, *a.shape[1:]), 1, 0)


def _every_nth(k: int) -> Callable[[Array], Array]:
  """a (batch, ...) -> a[::k] (`_interleaved`'s first row); the identity for k = 1."""
  return lambda a: a if k == 1 else _interleaved(a, k, "gan.example_stride")[0]


def make_gradients(config: ConfigDict, models: Models) -> Callable:
  """gradients(state, batch, frozen) -> (student gradient, discriminator gradient ({} without GAN), metrics, next
  key): the part of `make_train_step` before the optimizers; pure.

  One pass of each network: the student's prediction x = f_theta(z_tn, t_n) by `jax.vjp`; L_CD and dL_CD/dx
  at x; with the GAN, one discriminator forward on the real and one on the fake sample (each by `jax.vjp`), whose
  pullbacks give both L_D's gradient for the discriminator and L_G's gradient dL_G/dx for the student; the
  student's gradient is the pullback of dL_CD/dx + lambda_eff dL_G/dx (Eq. 7, lambda_eff by `gan.weighting`
  and `gan.start_step`, `losses.adversarial_weight`).

  A Gaussian student (``consistency.student_output``, SCott v1): the vjp gives its (mean, logvar) at (z_tn, t_n),
  L_CD is `losses.gaussian_kl`(EMA target's Gaussian at (z_tm_hat, t_m) || student's) with
  ``consistency.var_floor``, and the discriminator sees a reparameterised draw x = mean + exp(logvar / 2) noise
  (noise from fold_in(k_cd, 3)), so dL_G/dx reaches both halves through the draw's pullback; lambda_eff's norms
  are taken over both halves' gradients.

  metrics: float32 scalars loss (student total), loss_cd, loss_g, loss_d, d_real, d_fake (mean logits),
  disc_accuracy (`losses.disc_accuracy`), grad_ratio = ||lambda_eff dL_G/dx|| / ||dL_CD/dx|| at the student's
  output, lambda_eff, grad_norm_disc (before clipping), lr_disc, w (mean guidance weight); a Gaussian student adds
  std_student and std_target (root mean variance of f over the batch, at t_n and of the target at t_m).
  """
  c = config
  schedule = models.schedule
  gan = models.disc is not None
  disc = models.disc
  _, lr_d = make_optimizer(c.optim.disc_lr, c.optim)
  solver_kwargs = solvers.solver_kwargs(c.solver.name, c.solver)
  cc = c.consistency
  gaussian = cc.student_output == "gaussian"

  def disc_logits(dparams: PyTree, frozen: PyTree, x: Array, t: Array, text: Array, pooled: Array) -> Array:
    t, text, pooled = disc.condition(t, text, pooled, frozen["uncond_text"], frozen["uncond_pooled"])
    return disc.apply(dparams, frozen["unet"], x, t, text, pooled)

  def gradients(state: TrainState, batch: dict[str, Array],
                frozen: PyTree) -> tuple[PyTree, PyTree, dict[str, Array], Array]:
    key, k_vae, k_w, k_cd = jax.random.split(state.key, 4)
    z0, text, pooled = encode_batch(models, frozen, batch, k_vae if c.model.vae_sample else None)
    b = z0.shape[0]
    w = jax.random.uniform(k_w, (b,), jnp.float32, cc.w_min, cc.w_max)
    cond = {"text": text, "w": w}
    uncond = student_lib.uncond_like(frozen, text)
    # A LoRA student: the EMA target (no gradient) runs with its overlay merged, the online student as
    # model.student_lora_apply says (the same function; factorised: rank-r parameter gradients).
    alpha = c.model.student_lora_alpha
    target_fn = student_lib.make_student_fn(models, cc.guidance_embed_dim, frozen["unet"], alpha, "merged")
    student_fn = student_lib.make_student_fn(models, cc.guidance_embed_dim, frozen["unet"], alpha,
                                             c.model.student_lora_apply)
    make_f = losses.make_gaussian_consistency_fn if gaussian else losses.make_consistency_fn
    f = make_f(student_fn, schedule, timestep_scaling=cc.timestep_scaling)
    problem = losses.make_cd_target(
      make_f(target_fn, schedule, timestep_scaling=cc.timestep_scaling),
      student_lib.make_teacher_eps_fn(models, frozen["unet"], uncond), schedule, solver=c.solver.name,
      solver_kwargs=solver_kwargs, skip=c.solver.skip, h=c.solver.h, grid=cc.grid,
      num_ddim_timesteps=cc.num_ddim_timesteps)(state.ema, z0, cond, k_cd)
    t_n = problem["t_n"]

    # Eq. 1: the student's prediction and the consistency loss's gradient at it.
    if gaussian:
      # SCott v1: the student's Gaussian (mean, logvar), the KL to the target's, and the GAN's sample: a
      # reparameterised draw x = mean + std * noise, whose pullback carries dL_G/dx to both halves.
      out, pull_student = jax.vjp(lambda p: f(p, problem["z_tn"], t_n, cond)[0], state.student)
      target_mean, target_logvar = problem["target"]
      loss_cd, g_cd = jax.value_and_grad(lambda o: jnp.mean(
        losses.gaussian_kl(target_mean, target_logvar, o[0], o[1], cc.var_floor)))(out)
      noise = jax.random.normal(jax.random.fold_in(k_cd, 3), out[0].shape, out[0].dtype)
      x_fake, pull_draw = jax.vjp(lambda o: consistency.gaussian_draw(o[0], o[1], noise), out)
      metrics = {"loss_cd": loss_cd, "w": jnp.mean(w), "std_student": jnp.sqrt(jnp.mean(jnp.exp(out[1]))),
                 "std_target": jnp.sqrt(jnp.mean(jnp.exp(target_logvar)))}
    else:
      x_fake, pull_student = jax.vjp(lambda p: f(p, problem["z_tn"], t_n, cond)[0], state.student)
      loss_cd, g_cd = jax.value_and_grad(
        lambda x: jnp.mean(losses.distance(x, problem["target"], cc.distance, cc.huber_c)))(x_fake)
      metrics = {"loss_cd": loss_cd, "w": jnp.mean(w)}

    g_x, g_disc = g_cd, {}
    if gan:
      # Eq. 6: one discriminator forward per side; the fake side's pullback serves L_D and L_G. With
      # gan.example_stride k > 1 both sides see every k-th example (a reshape, so each batch shard keeps its own).
      sub = _every_nth(c.gan.example_stride)
      z0_d, t_d, eps_d, text_d, pooled_d = (sub(a) for a in (z0, t_n, problem["eps"], text, pooled))

      def on_fake(dparams: PyTree, x: Array) -> Array:
        _, _, xf, tf = losses.disc_inputs(z0_d, sub(x), t_d, eps_d, schedule, c.gan.disc_time)
        return disc_logits(dparams, frozen, xf, tf, text_d, pooled_d)

      def on_real(dparams: PyTree) -> Array:
        xr, tr, _, _ = losses.disc_inputs(z0_d, sub(x_fake), t_d, eps_d, schedule, c.gan.disc_time)
        return disc_logits(dparams, frozen, jax.lax.stop_gradient(xr), tr, text_d, pooled_d)

      fake, pull_fake = jax.vjp(on_fake, state.disc, x_fake)
      real, pull_real = jax.vjp(on_real, state.disc)
      loss_d, (ct_real, ct_fake) = jax.value_and_grad(losses.hinge_d_loss, argnums=(0, 1))(real, fake)
      g_disc = jax.tree_util.tree_map(jnp.add, pull_real(ct_real)[0], pull_fake(ct_fake)[0])
      loss_g, ct_g = jax.value_and_grad(losses.hinge_g_loss)(fake)
      g_adv = pull_fake(ct_g)[1]  # dL_G/dx; its parameter half is dead code XLA removes
      if gaussian:  # at the student's output (mean, logvar), through the draw; the weighting on both halves
        g_adv = pull_draw(g_adv)[0]
        g_cd_flat, g_adv_flat = (jnp.concatenate([g[0].ravel(), g[1].ravel()]) for g in (g_cd, g_adv))
      else:
        g_cd_flat, g_adv_flat = g_cd, g_adv
      lam = losses.adversarial_weight(g_cd_flat, g_adv_flat, c.gan.lambda_adv, c.gan.weighting, c.gan.max_weight)
      lam = jnp.where(state.step >= c.gan.start_step, lam, 0.0)
      g_x = jax.tree_util.tree_map(lambda a, b: a + lam * b, g_cd, g_adv)
      metrics.update(loss_g=loss_g, loss=losses.total_student_loss(loss_cd, loss_g, lam), loss_d=loss_d,
                     d_real=jnp.mean(real), d_fake=jnp.mean(fake), disc_accuracy=losses.disc_accuracy(real, fake),
                     grad_ratio=jnp.linalg.norm(lam * g_adv_flat) / (jnp.linalg.norm(g_cd_flat) + 1e-12),
                     lambda_eff=lam, grad_norm_disc=optax.tree.norm(g_disc), lr_disc=lr_d(state.step))
    else:
      metrics.update(loss_g=jnp.zeros(()), loss=loss_cd)
    if gaussian:
      (g_student,) = pull_student(jax.tree_util.tree_map(lambda g, o: g.astype(o.dtype), g_x, out))
    else:
      (g_student,) = pull_student(g_x.astype(x_fake.dtype))
    return g_student, g_disc, metrics, key

  return gradients


def make_train_step(config: ConfigDict, models: Models) -> Callable:
  """train_step(state, batch, frozen) -> (new state, metrics): pure; jit it with ``donate_argnums=(0,)``.

  The gradients of `make_gradients` (averaged over ``optim.grad_accum_steps`` microbatches, `accumulated`), then
  `make_update`: one AdamW update of the student and one of the discriminator and the EMA update theta^- <- mu
  theta^- + (1 - mu) theta. metrics: `make_gradients`' plus grad_norm_student (before clipping) and lr_student.
  """
  gradients = accumulated(make_gradients(config, models), config.optim.grad_accum_steps)
  update = make_update(config, models)

  def train_step(state: TrainState, batch: dict[str, Array], frozen: PyTree) -> tuple[TrainState, dict[str, Array]]:
    return update(state, *gradients(state, batch, frozen))

  return train_step


def accumulated(gradients: Callable, steps: int) -> Callable:
  """``gradients`` (`make_gradients`' signature) over ``steps`` microbatches of the batch, averaged.

  Microbatch i holds examples i, i + steps, i + 2 steps, ... (a reshape (B / steps, steps, ...), so a device
  holding a contiguous shard of a multiple of ``steps`` examples keeps its own examples) and runs with the state's
  key folded with i; the microbatches are a `jax.lax.scan`, so one microbatch's activations are live at a time.
  Returns the mean gradients and metrics and the key of one whole-batch call (``steps`` = 1 is ``gradients``).
  """
  if steps == 1:
    return gradients

  def run(state: TrainState, batch: dict[str, Array],
          frozen: PyTree) -> tuple[PyTree, PyTree, dict[str, Array], Array]:
    def body(total: PyTree, i_micro: tuple[Array, dict[str, Array]]) -> tuple[PyTree, None]:
      i, micro = i_micro
      out = gradients(state.replace(key=jax.random.fold_in(state.key, i)), micro, frozen)[:3]
      return jax.tree_util.tree_map(lambda t, o: t + o / steps, total, out), None

    micro = jax.tree_util.tree_map(lambda a: _interleaved(a, steps, "optim.grad_accum_steps"), batch)
    shapes = jax.eval_shape(lambda m: gradients(state, m, frozen)[:3], jax.tree_util.tree_map(lambda a: a[0], micro))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (g_student, g_disc, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(steps), micro))
    return g_student, g_disc, metrics, jax.random.split(state.key, 4)[0]

  return run


def make_update(config: ConfigDict, models: Models) -> Callable:
  """update(state, student gradient, discriminator gradient, metrics, key) -> (new state, metrics): one AdamW
  update of the student and one of the discriminator, the EMA update, the step count and the next key."""
  tx_s, lr_s = make_optimizer(config.optim.student_lr, config.optim)
  tx_d, _ = make_optimizer(config.optim.disc_lr, config.optim)
  mu = config.consistency.ema_decay

  def update(state: TrainState, g_student: PyTree, g_disc: PyTree, metrics: dict[str, Array],
             key: Array) -> tuple[TrainState, dict[str, Array]]:
    updates, opt_student = tx_s.update(g_student, state.opt_student, state.student)
    student = optax.apply_updates(state.student, updates)
    ema = jax.tree_util.tree_map(lambda e, p: (mu * e + (1.0 - mu) * p).astype(e.dtype), state.ema, student)
    new_disc, opt_disc = state.disc, state.opt_disc
    if models.disc is not None:
      d_updates, opt_disc = tx_d.update(g_disc, state.opt_disc, state.disc)
      new_disc = optax.apply_updates(state.disc, d_updates)
    metrics = dict(metrics, grad_norm_student=optax.tree.norm(g_student), lr_student=lr_s(state.step))
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    new_state = TrainState(step=state.step + 1, student=student, ema=ema, disc=new_disc, opt_student=opt_student,
                           opt_disc=opt_disc, key=key)
    return new_state, metrics

  return update
