"""SCott objectives: consistency distillation with a multi-step SDE teacher (paper Eq. 1), the hinge GAN
losses (Eq. 6) and their total (Eq. 7). Notes: ``shared/notes/algorithms.md`` section 5.

Everything here is a pure function of (params, arrays, key). Model functions are passed in:

- ``student_fn(params, z, t, cond) -> model output`` (eps by default), z (B, ...), t (B,) int timesteps,
  cond any pytree the model understands (text embeddings and guidance scale w for SD; None for toy data).
- ``teacher_eps_fn(z, t, cond) -> eps``: the frozen teacher, classifier-free guidance already applied
  (``solvers`` has the guidance helpers). It is only ever evaluated under ``stop_gradient``.
- ``disc_fn(params, x, t, cond) -> logits (B,)``: the discriminator.

The LCM baseline is this same code with ``solver="ddim", eta=0, h=1, skip=20`` and ``lambda_adv=0``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from scott_jax import consistency, solvers
from scott_jax.choices import DISC_TIMES, DISTANCES, STUDENT_OUTPUTS, WEIGHTINGS
from scott_jax.schedules import NoiseSchedule

PyTree = Any


def distance(pred: jax.Array, target: jax.Array, kind: str = "l2", huber_c: float = 0.001) -> jax.Array:
  """Per-example distance d(pred, target) -> (B,), averaged over the non-batch dimensions.

  l2: mean squared error (paper Eq. 1). pseudo_huber: sqrt(a^2 + c^2) - c elementwise, as the LCM script.
  """
  diff = (pred - target).astype(jnp.float32)
  if kind == "l2":
    per_elem = diff**2
  elif kind == "pseudo_huber":
    per_elem = jnp.sqrt(diff**2 + huber_c**2) - huber_c
  else:
    raise ValueError(f"unknown distance '{kind}'; allowed: {', '.join(DISTANCES)}")
  return jnp.mean(per_elem.reshape(per_elem.shape[0], -1), axis=1)


def gaussian_kl(mean_p: jax.Array, logvar_p: jax.Array, mean_q: jax.Array, logvar_q: jax.Array,
                var_floor: float) -> jax.Array:
  """Per-example KL(N(mean_p, v_p) || N(mean_q, v_q)) of diagonal Gaussians -> (B,), the per-element KL averaged
  over the non-batch dimensions (as `distance` averages the squared error), in nats per element.

  v = exp(logvar) + var_floor for both sides (logvar -inf is variance 0, then v = var_floor).
  KL = 0.5 (log(v_q / v_p) + (v_p + (mean_p - mean_q)^2) / v_q - 1), zero iff the two Gaussians are equal.
  SCott v1's consistency loss is this with p = the EMA target (no gradient) and q = the student (DECISION,
  docs/decisions.md: with the target p random (the SDE teacher), the expected KL is minimised by mean_q = E[mean_p]
  and v_q = E[v_p] + Var[mean_p], the target's total variance).
  """
  mp, mq = mean_p.astype(jnp.float32), mean_q.astype(jnp.float32)
  vp = jnp.exp(logvar_p.astype(jnp.float32)) + var_floor
  vq = jnp.exp(logvar_q.astype(jnp.float32)) + var_floor
  per_elem = 0.5 * (jnp.log(vq) - jnp.log(vp) + (vp + (mp - mq) ** 2) / vq - 1.0)
  return jnp.mean(per_elem.reshape(per_elem.shape[0], -1), axis=1)


def make_gaussian_consistency_fn(student_fn: Callable, schedule: NoiseSchedule, *,
                                 timestep_scaling: float = 10.0) -> Callable:
  """The Gaussian student's f_theta(params, z, t, cond) -> ((mean, logvar) (B, ...) each, x0_hat (B, ...)):
  `consistency.gaussian_consistency_output` around ``student_fn`` (whose output has 2C channels: prediction,
  log-variance). Same call signature as `make_consistency_fn`, with the pair (mean, logvar) in place of f."""

  def f(params: PyTree, z: jax.Array, t: jax.Array, cond: PyTree) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    out = student_fn(params, z, t, cond)
    mean, logvar, x0_hat = consistency.gaussian_consistency_output(out, z, t, schedule,
                                                                   timestep_scaling=timestep_scaling)
    return (mean, logvar), x0_hat

  return f


def make_consistency_fn(student_fn: Callable, schedule: NoiseSchedule, *,
                        timestep_scaling: float = 10.0) -> Callable:
  """f_theta(params, z, t, cond) -> (f (B, ...), x0_hat (B, ...)): LCM boundary conditions around ``student_fn``."""

  def f(params: PyTree, z: jax.Array, t: jax.Array, cond: PyTree) -> tuple[jax.Array, jax.Array]:
    out = student_fn(params, z, t, cond)
    return consistency.consistency_output(out, z, t, schedule, timestep_scaling=timestep_scaling)

  return f


def make_cd_target(target_fn: Callable, teacher_eps_fn: Callable, schedule: NoiseSchedule, *, solver: str,
                   solver_kwargs: dict[str, Any] | None = None, skip: int, h: int, grid: str = "skip",
                   num_ddim_timesteps: int = 50) -> Callable:
  """The student-independent half of paper Eq. 1: where the student is evaluated and what it must match.

  ``target_fn(target_params, z, t, cond) -> (f (B, ...), x0_hat)`` is the consistency function of the EMA target
  (`make_consistency_fn`). Returns ``problem(target_params, z0, cond, key) -> dict`` with t_n (B,) drawn
  uniformly from ``consistency.training_grid(grid, ...)``, t_m = max(t_n - skip, 0), eps (B, ...), z_tn =
  alpha_tn z0 + sigma_tn eps, and target = sg(f_theta^-(Phi_SDE(z_tn, t_n, t_m, h), t_m)) (B, ...), or the pair
  sg((mean, logvar)) for a Gaussian ``target_fn`` (`make_gaussian_consistency_fn`).
  """
  grid = consistency.training_grid(grid, skip=skip, num_ddim_timesteps=num_ddim_timesteps,
                                   num_train=schedule.num_train_timesteps)
  solver_kwargs = dict(solver_kwargs or {})

  def problem(target_params: PyTree, z0: jax.Array, cond: PyTree, key: jax.Array) -> dict[str, jax.Array]:
    k_t, k_eps, k_solver = jax.random.split(key, 3)
    batch = z0.shape[0]
    t_n = grid[jax.random.randint(k_t, (batch,), 0, grid.shape[0])]
    t_m = jnp.maximum(t_n - skip, 0)  # DECISION (notes section 3): t_m = max(t_n - skip, 0)
    eps = jax.random.normal(k_eps, z0.shape, z0.dtype)
    z_tn = schedule.add_noise(z0, eps, t_n)
    # Teacher: z_tm_hat = Phi_SDE(eps_teacher, z_tn, t_n, t_m, h), no gradient (paper Fig. 3).
    z_tm = solvers.sde_multistep(lambda z, t: teacher_eps_fn(z, t, cond), z_tn, t_n, t_m, h,
                                 solver=solver, schedule=schedule, key=k_solver, **solver_kwargs)
    target, _ = target_fn(target_params, jax.lax.stop_gradient(z_tm), t_m, cond)
    return {"t_n": t_n, "t_m": t_m, "eps": eps, "z_tn": z_tn, "target": jax.lax.stop_gradient(target)}

  return problem


def make_cd_loss(student_fn: Callable, teacher_eps_fn: Callable, schedule: NoiseSchedule, *,
                 solver: str, solver_kwargs: dict[str, Any] | None = None, skip: int, h: int,
                 grid: str = "skip", num_ddim_timesteps: int = 50, distance_kind: str = "l2",
                 huber_c: float = 0.001, timestep_scaling: float = 10.0, student_output: str = "point",
                 var_floor: float = 1e-6) -> Callable:
  """Consistency-distillation loss with the multi-step SDE teacher (paper Eq. 1 with Phi_SDE).

  Returns ``loss_fn(params, target_params, z0, cond, key) -> (loss, aux)`` where z0 (B, ...) is clean data
  (latents), ``target_params`` the EMA parameters theta^- (no gradient flows into them) and aux a dict with
  the per-batch diagnostics and the student's prediction ``x_fake`` = f_theta(z_tn, t_n) for the GAN loss.
  t_n is drawn uniformly from ``consistency.training_grid(grid, ...)`` (`make_cd_target`).

  ``student_output`` "gaussian" (SCott v1): ``student_fn``'s output has 2C channels (`make_gaussian_consistency_fn`)
  and the loss is the mean `gaussian_kl`(target || student) with ``var_floor`` (the distance is not used); aux
  then holds the student's ``mean`` and ``logvar`` and ``x_fake`` is the mean.
  """
  if distance_kind not in DISTANCES:
    raise ValueError(f"unknown distance '{distance_kind}'; allowed: {', '.join(DISTANCES)}")
  if student_output not in STUDENT_OUTPUTS:
    raise ValueError(f"unknown student output '{student_output}'; allowed: {', '.join(STUDENT_OUTPUTS)}")
  gaussian = student_output == "gaussian"
  f = (make_gaussian_consistency_fn if gaussian else make_consistency_fn)(student_fn, schedule,
                                                                          timestep_scaling=timestep_scaling)
  problem_fn = make_cd_target(f, teacher_eps_fn, schedule, solver=solver, solver_kwargs=solver_kwargs, skip=skip,
                              h=h, grid=grid, num_ddim_timesteps=num_ddim_timesteps)

  def loss_fn(params: PyTree, target_params: PyTree, z0: jax.Array, cond: PyTree,
              key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    problem = problem_fn(target_params, z0, cond, key)
    pred, x0_pred = f(params, problem["z_tn"], problem["t_n"], cond)
    aux = {"t_n": problem["t_n"], "x0_pred": x0_pred, "z_tn": problem["z_tn"], "eps": problem["eps"]}
    if gaussian:
      (mean, logvar), (target_mean, target_logvar) = pred, problem["target"]
      loss = jnp.mean(gaussian_kl(target_mean, target_logvar, mean, logvar, var_floor))
      aux.update(x_fake=mean, mean=mean, logvar=logvar)
    else:
      loss = jnp.mean(distance(pred, problem["target"], distance_kind, huber_c))
      aux.update(x_fake=pred)
    return loss, dict(aux, loss_cd=loss)

  return loss_fn


# ---------------------------------------------------------------------------------------------------
# Hinge GAN (paper Eq. 6) and the total objective (Eq. 7).

def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """L_D = E[relu(1 - D(real))] + E[relu(1 + D(fake))] (paper Eq. 6)."""
  return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))


def hinge_g_loss(fake_logits: jax.Array) -> jax.Array:
  """L_G = -E[D(fake)], the generator side of Eq. 6."""
  return -jnp.mean(fake_logits)


def disc_inputs(x_real: jax.Array, x_fake: jax.Array, t_n: jax.Array, eps: jax.Array, schedule: NoiseSchedule,
                disc_time: str) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """What the discriminator sees for real and fake samples: (x_real, t_real, x_fake, t_fake).

  DECISION (notes section 5): "shared" conditions both on t_n; "paper" is Eq. 6 read literally (real at t=0,
  fake at t_n); "renoise" re-noises both to t_n with one shared eps (as PCM/UFOGen).
  """
  if disc_time == "shared":
    return x_real, t_n, x_fake, t_n
  if disc_time == "paper":
    return x_real, jnp.zeros_like(t_n), x_fake, t_n
  if disc_time == "renoise":
    return schedule.add_noise(x_real, eps, t_n), t_n, schedule.add_noise(x_fake, eps, t_n), t_n
  raise ValueError(f"unknown disc_time '{disc_time}'; allowed: {', '.join(DISC_TIMES)}")


def total_student_loss(loss_cd: jax.Array, loss_g: jax.Array, lambda_adv: float | jax.Array) -> jax.Array:
  """L_SCott = L_CD + lambda_adv * L_G (paper Eq. 7, student side)."""
  return loss_cd + lambda_adv * loss_g


def disc_accuracy(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """Share of the (real_i, fake_i) pairs with D(real) > D(fake), averaged over the batch and the logit positions.

  real_logits, fake_logits: (B, ...) logits of the batch's real samples and of the student's samples for the
  same examples (same t and prompt). 0.5 is chance; 1.0 every pair separated."""
  return jnp.mean((real_logits > fake_logits).astype(jnp.float32))


def adversarial_weight(g_cd: jax.Array, g_adv: jax.Array, lambda_adv: float, weighting: str,
                       max_weight: float) -> jax.Array:
  """lambda_eff of Eq. 7: the weight of L_G in the student's loss, a scalar with no gradient.

  g_cd = dL_CD/dx and g_adv = dL_G/dx at the student's output x (same shape). ``fixed``: lambda_adv (the paper).
  ``adaptive`` (DECISION, the VQGAN rule taken at the student's output): lambda_adv ||g_cd|| / (||g_adv|| +
  1e-8), clipped to [0, max_weight], so the adversarial gradient reaching the student is lambda_adv times the
  consistency gradient whatever the discriminator's scale.
  """
  if weighting == "fixed":
    return jnp.asarray(lambda_adv, jnp.float32)
  if weighting != "adaptive":
    raise ValueError(f"unknown GAN weighting '{weighting}'; allowed: {', '.join(WEIGHTINGS)}")
  ratio = jnp.linalg.norm(g_cd.astype(jnp.float32)) / (jnp.linalg.norm(g_adv.astype(jnp.float32)) + 1e-8)
  return jax.lax.stop_gradient(jnp.clip(lambda_adv * ratio, 0.0, max_weight))
