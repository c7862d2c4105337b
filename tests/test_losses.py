"""CD, hinge and total losses against closed forms.

Gaussian data N(m, s^2 I) has a closed-form probability-flow ODE: in x = z/alpha, lam = sigma/alpha,
dx/dlam = eps = lam (x - m) / (s^2 + lam^2), so (x - m) / sqrt(s^2 + lam^2) is constant along trajectories and the
exact consistency function (to the boundary t = 0) is F(z, t) = alpha_0 (m + (z/alpha_t - m) sqrt((s^2 + lam_0^2) /
(s^2 + lam_t^2))). A student whose consistency output equals F has CD loss ~0 against an ODE teacher (up to the
teacher's discretisation error); a perturbed one does not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scott_jax import analytic, consistency, losses, schedules

M, S = 0.4, 0.6


def _exact_student(schedule):
  """student_fn(params, z, t, cond) -> eps whose LCM consistency output is params['scale'] * F(z, t)."""
  lam0 = schedule.lam(0)

  def student_fn(params, z, t, cond):
    a, s = schedule.alpha_sigma(t, z)
    lam = s / a
    f_exact = schedule.alpha(0) * (M + (z / a - M) * jnp.sqrt((S**2 + lam0**2) / (S**2 + lam**2)))
    f_target = params["scale"] * f_exact + params["shift"]
    c_skip, c_out = consistency.boundary_scalings(t)
    c_skip, c_out = c_skip[:, None], c_out[:, None]
    safe = jnp.where(c_out > 0, c_out, 1.0)
    x0 = jnp.where(c_out > 0, (f_target - c_skip * z) / safe, z / a)
    return (z - a * x0) / s

  return student_fn


@pytest.fixture(scope="module")
def setup():
  schedule = schedules.sd15()
  teacher = analytic.gaussian_eps_fn(schedule, M, S)
  student = _exact_student(schedule)
  z0 = M + S * jax.random.normal(jax.random.key(0), (4096, 4))
  return schedule, teacher, student, z0


@pytest.mark.parametrize("solver, kw, h", [("ddim", {"eta": 0.0}, 1), ("er_sde", {"order": 2, "noise_fn": 1}, 3)])
def test_exact_consistency_function_has_near_zero_cd_loss(setup, solver, kw, h):
  schedule, teacher, student, z0 = setup
  loss_fn = jax.jit(losses.make_cd_loss(student, lambda z, t, c: teacher(z, t), schedule, solver=solver,
                                        solver_kwargs=kw, skip=20, h=h))
  exact = {"scale": jnp.float32(1.0), "shift": jnp.float32(0.0)}
  key = jax.random.key(1)
  loss_exact, aux = loss_fn(exact, exact, z0, None, key)
  loss_scaled, _ = loss_fn({"scale": jnp.float32(1.05), "shift": jnp.float32(0.0)}, exact, z0, None, key)
  loss_shift, _ = loss_fn({"scale": jnp.float32(1.0), "shift": jnp.float32(0.02)}, exact, z0, None, key)
  # The perturbed students are off by ~1e-3..4e-4 in mean square; the exact one only by the teacher's
  # local discretisation error.
  assert float(loss_exact) < 1e-5
  assert float(loss_scaled) > 100 * float(loss_exact)
  assert float(loss_shift) > 100 * float(loss_exact)
  np.testing.assert_allclose(float(loss_shift), 0.02**2, rtol=0.05)
  assert aux["x_fake"].shape == z0.shape


def test_sde_teacher_cd_loss_is_noise_of_the_teacher(setup):
  """With an SDE teacher the target is random: the exact ODE consistency function no longer gives ~0."""
  schedule, teacher, student, z0 = setup
  exact = {"scale": jnp.float32(1.0), "shift": jnp.float32(0.0)}
  ode = losses.make_cd_loss(student, lambda z, t, c: teacher(z, t), schedule, solver="ddim",
                            solver_kwargs={"eta": 0.0}, skip=20, h=1)
  sde = losses.make_cd_loss(student, lambda z, t, c: teacher(z, t), schedule, solver="ddim",
                            solver_kwargs={"eta": 1.0}, skip=20, h=1)
  key = jax.random.key(2)
  assert float(sde(exact, exact, z0, None, key)[0]) > 10 * float(ode(exact, exact, z0, None, key)[0])


def test_gradient_flows_only_into_online_params(setup):
  schedule, teacher, student, z0 = setup
  loss_fn = losses.make_cd_loss(student, lambda z, t, c: teacher(z, t), schedule, solver="ddim",
                                solver_kwargs={"eta": 0.0}, skip=20, h=1)
  p = {"scale": jnp.float32(1.1), "shift": jnp.float32(0.0)}
  g_online = jax.grad(lambda q: loss_fn(q, p, z0, None, jax.random.key(3))[0])(p)
  g_target = jax.grad(lambda q: loss_fn(p, q, z0, None, jax.random.key(3))[0])(p)
  assert abs(float(g_online["scale"])) > 0
  assert float(g_target["scale"]) == 0.0 and float(g_target["shift"]) == 0.0


def test_distances():
  a = jnp.array([[0.0, 3.0], [1.0, 1.0]])
  b = jnp.zeros_like(a)
  np.testing.assert_allclose(losses.distance(a, b, "l2"), [4.5, 1.0])
  c = 0.001
  expected = [np.mean([np.sqrt(0 + c**2) - c, np.sqrt(9 + c**2) - c]), np.sqrt(1 + c**2) - c]
  np.testing.assert_allclose(losses.distance(a, b, "pseudo_huber", c), expected, rtol=1e-6)
  with pytest.raises(ValueError, match="l1"):
    losses.distance(a, b, "l1")


def test_hinge_losses_closed_form():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 1.5])
  # relu(1 - real) = [0, 0.5, 2] ; relu(1 + fake) = [0, 1, 2.5]
  np.testing.assert_allclose(losses.hinge_d_loss(real, fake), 2.5 / 3 + 3.5 / 3, rtol=1e-6)
  np.testing.assert_allclose(losses.hinge_g_loss(fake), 0.5 / 3, rtol=1e-6)
  np.testing.assert_allclose(losses.total_student_loss(jnp.float32(1.0), jnp.float32(-2.0), 0.4), 0.2, rtol=1e-6)


def test_disc_accuracy_and_adversarial_weight_closed_form():
  """disc_accuracy is the share of (real_i, fake_i) pairs ordered right, per logit position; the adaptive weight
  is lambda ||g_cd|| / (||g_adv|| + 1e-8) clipped to [0, max_weight] (numpy float64 reference); fixed is lambda."""
  real = jnp.array([[[1.0, -0.5]], [[0.2, 0.3]]])  # (B=2, 1, 2) logit maps
  fake = jnp.array([[[0.0, 0.5]], [[-1.0, 0.3]]])
  assert float(losses.disc_accuracy(real, fake)) == 0.5  # 1 > 0, -0.5 < 0.5, 0.2 > -1, 0.3 == 0.3 (not >)
  rng = np.random.default_rng(0)
  g_cd, g_adv = rng.standard_normal((2, 4, 4, 3)), 30.0 * rng.standard_normal((2, 4, 4, 3))
  want = 0.4 * np.linalg.norm(g_cd) / (np.linalg.norm(g_adv) + 1e-8)
  got = losses.adversarial_weight(jnp.asarray(g_cd, jnp.float32), jnp.asarray(g_adv, jnp.float32), 0.4, "adaptive",
                                  10.0)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert float(losses.adversarial_weight(jnp.asarray(g_cd), jnp.asarray(g_adv), 0.4, "adaptive", 0.5 * want)) == (
    pytest.approx(0.5 * want, rel=1e-6))
  assert float(losses.adversarial_weight(jnp.asarray(g_cd), jnp.asarray(g_adv), 0.4, "fixed", 1e-3)) == (
    pytest.approx(0.4))
  with pytest.raises(ValueError, match="fixed, adaptive"):
    losses.adversarial_weight(jnp.asarray(g_cd), jnp.asarray(g_adv), 0.4, "vqgan", 1.0)


def test_disc_inputs_modes():
  schedule = schedules.sd15()
  x_real, x_fake = jnp.ones((2, 3)), -jnp.ones((2, 3))
  t_n = jnp.array([100, 900])
  eps = jnp.full((2, 3), 0.5)
  xr, tr, xf, tf = losses.disc_inputs(x_real, x_fake, t_n, eps, schedule, "shared")
  assert (tr == t_n).all() and (tf == t_n).all() and (xr == x_real).all()
  _, tr, _, tf = losses.disc_inputs(x_real, x_fake, t_n, eps, schedule, "paper")
  assert (tr == 0).all() and (tf == t_n).all()
  xr, tr, xf, tf = losses.disc_inputs(x_real, x_fake, t_n, eps, schedule, "renoise")
  np.testing.assert_allclose(xr, schedule.add_noise(x_real, eps, t_n))
  np.testing.assert_allclose(xf - xr, schedule.add_noise(x_fake - x_real, jnp.zeros_like(eps), t_n), atol=1e-6)
  with pytest.raises(ValueError, match="shared"):
    losses.disc_inputs(x_real, x_fake, t_n, eps, schedule, "always")
