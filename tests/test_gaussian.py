"""The Gaussian student of SCott v1 against closed forms: the KL consistency loss (numpy float64 reference, zero for
identical Gaussians, its minimiser over a random target), the Gaussian consistency function's boundary condition,
Gaussian multistep sampling, and on the 2-D Gaussian mixture with the exact teacher the KL's fixed point against
the Monte-Carlo variance of the SDE teacher's consistency target (fast: free per-point parameters; slow: the MLP
students of `scott_jax.toy2d` after the same budget)."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scott_jax import config as config_lib
from scott_jax import config_files, consistency, losses, schedules, solvers, toy2d


def _kl_reference(mp, lvp, mq, lvq, floor):
  """KL(N(mp, vp) || N(mq, vq)) per element in float64 numpy, v = exp(logvar) + floor; mean over non-batch dims."""
  mp, lvp, mq, lvq = (np.asarray(a, np.float64) for a in (mp, lvp, mq, lvq))
  vp, vq = np.exp(lvp) + floor, np.exp(lvq) + floor
  kl = 0.5 * (np.log(vq / vp) + (vp + (mp - mq) ** 2) / vq - 1.0)
  return kl.reshape(kl.shape[0], -1).mean(axis=1)


def test_gaussian_kl_matches_float64_reference_and_is_zero_for_identical_gaussians():
  rng = np.random.default_rng(0)
  shape = (3, 4, 5, 2)
  mp, mq = rng.standard_normal(shape), rng.standard_normal(shape)
  lvp, lvq = rng.uniform(-8, 2, shape), rng.uniform(-8, 2, shape)
  lvp[0, 0, 0, 0] = -np.inf  # variance 0 (a target at t = 0): the floor keeps the KL finite
  for floor in (1e-6, 0.1):
    got = losses.gaussian_kl(*(jnp.asarray(a, jnp.float32) for a in (mp, lvp, mq, lvq)), floor)
    np.testing.assert_allclose(np.asarray(got), _kl_reference(mp, lvp, mq, lvq, floor), rtol=2e-5)
    same = losses.gaussian_kl(*(jnp.asarray(a, jnp.float32) for a in (mq, lvq, mq, lvq)), floor)
    np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-6)
  assert np.all(np.asarray(got) > 0.0)


def test_kl_minimiser_is_the_total_mean_and_variance_of_a_random_target():
  """E_k[KL(N(m_k, v_k) || N(mu, s2))] over K equally likely target Gaussians is minimised at mu = mean(m_k) and
  s2 = mean(v_k) + var(m_k) (law of total variance): gradient descent on (mu, log s2) through `gaussian_kl`."""
  rng = np.random.default_rng(1)
  m = jnp.asarray(rng.normal(0.3, 0.5, (64, 1, 3)), jnp.float32)  # 64 draws of a target, 3 elements
  lv = jnp.asarray(rng.uniform(-3, -1, (64, 1, 3)), jnp.float32)
  floor = 1e-6

  def loss(p):
    return jnp.mean(losses.gaussian_kl(m, lv, jnp.broadcast_to(p["mu"], m.shape), jnp.broadcast_to(p["lv"], m.shape),
                                       floor))

  p = {"mu": jnp.zeros((1, 3)), "lv": jnp.zeros((1, 3))}
  tx = optax.adam(0.05)
  opt = tx.init(p)
  step = jax.jit(lambda p, o: (lambda g: (optax.apply_updates(p, tx.update(g, o)[0]), tx.update(g, o)[1]))(
    jax.grad(loss)(p)))
  for _ in range(1500):
    p, opt = step(p, opt)
  m64, v64 = np.asarray(m, np.float64), np.exp(np.asarray(lv, np.float64)) + floor
  np.testing.assert_allclose(np.asarray(p["mu"]), m64.mean(0), atol=1e-4)
  np.testing.assert_allclose(np.exp(np.asarray(p["lv"], np.float64)) + floor, v64.mean(0) + m64.var(0), rtol=1e-3)


def test_gaussian_consistency_output_boundary_and_draws():
  """The mean half is `consistency_output` of the prediction half; var_f = c_out(t)^2 exp(logvar_net), so at t = 0
  the variance is exactly 0 (f(z, 0) = z, a draw equals the mean) and the KL's gradient there stays finite."""
  schedule = schedules.sd15()
  rng = np.random.default_rng(2)
  z = jnp.asarray(rng.standard_normal((3, 4, 4, 2)), jnp.float32)
  out = jnp.asarray(rng.standard_normal((3, 4, 4, 4)), jnp.float32)
  t = jnp.asarray([0, 15, 999])
  mean, logvar, x0 = consistency.gaussian_consistency_output(out, z, t, schedule)
  ref_f, ref_x0 = consistency.consistency_output(out[..., :2], z, t, schedule)
  np.testing.assert_array_equal(np.asarray(mean), np.asarray(ref_f))
  np.testing.assert_array_equal(np.asarray(x0), np.asarray(ref_x0))
  _, c_out = consistency.boundary_scalings(t)
  var = np.exp(np.asarray(logvar, np.float64))
  np.testing.assert_allclose(var, np.asarray(c_out)[:, None, None, None] ** 2 * np.exp(np.asarray(out[..., 2:])),
                             rtol=1e-5)
  assert np.all(var[0] == 0.0) and np.array_equal(np.asarray(mean[0]), np.asarray(z[0]))
  noise = jnp.asarray(rng.standard_normal(z.shape), jnp.float32)
  draw = consistency.gaussian_draw(mean, logvar, noise)
  np.testing.assert_array_equal(np.asarray(draw[0]), np.asarray(z[0]))
  np.testing.assert_allclose(np.asarray(draw[1:]), np.asarray(mean[1:] + np.sqrt(var[1:]) * noise[1:]), rtol=1e-5,
                             atol=1e-6)

  def kl_of_net(o):
    m, lv, _ = consistency.gaussian_consistency_output(o, z, t, schedule)
    d = consistency.gaussian_draw(m, lv, noise)
    return jnp.mean(losses.gaussian_kl(jnp.zeros_like(m), jnp.zeros_like(lv), m, lv, 1e-6)) + jnp.mean(d)

  assert np.all(np.isfinite(np.asarray(jax.grad(kl_of_net)(out))))
  with pytest.raises(ValueError, match="even channel count"):
    consistency.split_gaussian(out[..., :3])


def test_gaussian_multistep_sampling():
  """'mean' is the point sampler on the mean function; 'sample' draws x0 from the Gaussian at every step (1 step:
  the draw's standard deviation is the predicted one); an unknown mode is a clear error."""
  schedule = schedules.sd15()
  z_T = jax.random.normal(jax.random.key(0), (20000, 2))
  sd = jnp.asarray([0.3, 0.05])

  def mean_fn(z, t):
    return 0.5 * z + 0.01 * t

  def gauss_fn(z, t):
    return mean_fn(z, t), jnp.broadcast_to(2 * jnp.log(sd), z.shape)

  ts = consistency.lcm_timesteps(2)
  point = consistency.multistep_sample(mean_fn, z_T, ts, schedule, jax.random.key(1))
  by_mean = consistency.multistep_sample(gauss_fn, z_T, ts, schedule, jax.random.key(1), gaussian="mean")
  np.testing.assert_array_equal(np.asarray(point), np.asarray(by_mean))
  one = consistency.multistep_sample(gauss_fn, z_T, ts[:1], schedule, jax.random.key(1), gaussian="sample")
  resid = np.asarray(one - mean_fn(z_T, ts[0]), np.float64)
  np.testing.assert_allclose(resid.std(0), np.asarray(sd), rtol=0.03)  # 20000 draws: ~0.5% standard error
  assert np.all(np.abs(resid.mean(0)) < 4 * np.asarray(sd) / np.sqrt(len(resid)))
  with pytest.raises(ValueError, match="'sample', 'mean'|sample, mean"):
    consistency.multistep_sample(gauss_fn, z_T, ts, schedule, jax.random.key(1), gaussian="median")


# ---------------------------------------------------------------------------------------------------------
# The KL's fixed point on the 2-D Gaussian mixture with the exact teacher (SCott's SDE teacher).

def _toy_config(variant="quick"):
  return config_files.load("toy2d").get_config(variant)


def _sde_targets(target_f, teps, schedule, solver, z, t_n, num):
  """draw(key) -> (mean, logvar) (num, n, 2): ``num`` draws per point of the Gaussian consistency target at
  (z (n, 2), t_n (n,)), target_f(Phi_SDE(z, t_n, t_m, h), t_m) with SCott's teacher ``solver``; one jitted program
  (op by op the solver compiles ~100 small kernels)."""
  n = z.shape[0]
  t_m = jnp.maximum(t_n - solver.skip, 0)
  kw = solvers.solver_kwargs(solver.name, solver)

  def draw(key):
    z_tm = solvers.sde_multistep(teps, jnp.tile(z, (num, 1)), jnp.tile(t_n, num), jnp.tile(t_m, num), solver.h,
                                 solver=solver.name, schedule=schedule, key=key, **kw)
    m, lv = target_f(z_tm, jnp.tile(t_m, num))
    return m.reshape(num, n, -1), lv.reshape(num, n, -1)

  return jax.jit(draw)


def _total_moments(m, lv):
  """Monte-Carlo mean and total variance (n, 2) over draws (num, n, 2) of a Gaussian target: E[var] + Var[mean]."""
  m, v = np.asarray(m, np.float64), np.exp(np.asarray(lv, np.float64))
  return m.mean(0), v.mean(0) + m.var(0)


def test_kl_fixed_point_is_the_sde_targets_total_variance_free_parameters():
  """Per-point free parameters (the network taken out): at 24 fixed (z, t_n) points the Gaussian student's
  prediction (eps, logvar) is trained with `losses.gaussian_kl` against the Gaussian target of the exact mixture
  (mean: its consistency function at t_m, variance 0.02 c_out^2) reached by SCott's teacher (ER-SDE noise fn 7,
  order 2, skip 24, h 3), 16 fresh teacher draws per point and step, and a point student with the L2 distance on
  the same draws, the same 250 Adam steps (cosine-decayed). Both must reach the fixed point measured on 4000
  independent teacher draws per point: std within 5% (the Monte-Carlo error of a standard deviation from 4000
  draws is ~1.1% for a Gaussian; the students' own 4000 draws add as much), means within 0.1 target std of it and
  of each other (Monte-Carlo error of a mean: 1.6% of the std). Measured: std ratios within 1%, means within
  0.02 std."""
  c = _toy_config()
  schedule = schedules.sd15()
  mix = toy2d.make_mixture(c.toy2d)
  teps = mix.eps_fn(schedule)
  s = c.solver
  n, batch, steps = 24, 16, 250
  k_x, k_e, k_train, k_mc = jax.random.split(jax.random.key(0), 4)
  t_n = jnp.asarray(np.repeat([999, 759, 495, 255, 111, 39], n // 6))
  z = jax.jit(lambda k1, k2: schedule.add_noise(mix.sample(k1, n), jax.random.normal(k2, (n, 2)), t_n))(k_x, k_e)

  def target_f(zz, tt):
    mean, _ = consistency.consistency_output(teps(zz, tt), zz, tt, schedule)
    _, c_out = consistency.boundary_scalings(tt)
    return mean, jnp.log(0.02 * c_out**2 + 1e-30)[:, None] + jnp.zeros_like(zz)

  draw = _sde_targets(target_f, teps, schedule, s, z, t_n, batch * steps)

  def student(p):  # free per-point network outputs (eps, logvar) -> the Gaussian consistency output
    mean, logvar, _ = consistency.gaussian_consistency_output(p["out"], z, t_n, schedule)
    return mean, logvar

  def loss(p, m, lv):  # m, lv: (batch, n, 2) target draws
    mean, logvar = student(p)
    kl = losses.gaussian_kl(m.reshape(-1, 2), lv.reshape(-1, 2), jnp.tile(mean, (batch, 1)),
                            jnp.tile(logvar, (batch, 1)), 1e-6)
    point = consistency.consistency_output(p["point"], z, t_n, schedule)[0]
    return jnp.mean(kl) + jnp.mean(losses.distance(m.reshape(-1, 2), jnp.tile(point, (batch, 1))))

  tx = optax.adam(optax.cosine_decay_schedule(0.05, steps, alpha=0.01))

  def step(carry, targets):
    p, o = carry
    updates, o = tx.update(jax.grad(loss)(p, *targets), o, p)
    return (optax.apply_updates(p, updates), o), None

  @jax.jit
  def train(m, lv):
    # logvar starts above the target (variance 1): from far below, the KL's first gradients (~ d^2 / v) fill Adam's
    # second moment and slow the approach for thousands of steps (docs/decisions.md, consistency.logvar_init)
    init = {"out": jnp.concatenate([teps(z, t_n), jnp.zeros((n, 2))], axis=1), "point": teps(z, t_n)}
    split = lambda a: a.reshape(steps, batch, n, 2)  # noqa: E731
    (p, _), _ = jax.lax.scan(step, (init, tx.init(init)), (split(m), split(lv)))
    mean, logvar = student(p)
    return mean, logvar, consistency.consistency_output(p["point"], z, t_n, schedule)[0]

  mean, logvar, point = train(*draw(k_train))
  mc_mean, mc_var = _total_moments(*draw(k_mc))
  sd = np.sqrt(mc_var)
  np.testing.assert_allclose(np.exp(0.5 * np.asarray(logvar, np.float64)), sd, rtol=0.05)
  assert np.max(np.abs(np.asarray(mean) - mc_mean) / sd) < 0.1
  assert np.max(np.abs(np.asarray(point) - np.asarray(mean)) / sd) < 0.1
  assert np.min(mc_var) > 0.02 * 0.5  # the target is random: the check is not trivially about a fixed variance


def test_config_fields_are_validated():
  for key, value, match in (("consistency.student_output", "mixture", "allowed: 'point', 'gaussian'"),
                            ("consistency.var_floor", 0.0, "a number > 0"),
                            ("consistency.logvar_init", -100.0, r"a number in \[-30, 10\]"),
                            ("sample.gaussian", "mode", "allowed: 'sample', 'mean'"),
                            ("toy2d.methods", ("scott", "dmd"), "scott, lcm, scott_gaussian")):
    c = config_lib.defaults()
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(config_lib.ConfigError, match=f"'{key}' has value .*{match}"):
      config_lib.validate(c)


@pytest.mark.slow
def test_toy2d_gaussian_student_variance_matches_the_sde_target_and_its_mean_the_point_student():
  """The MLP students of `scott_jax.toy2d` (configs/toy2d.py: the exact mixture teacher, SCott's ER-SDE teacher,
  pretrained for 3000 steps, distilled for the same 3000 steps, batch 512, EMA 0.95) at 16 forward-noised points at
  each of the 4-step sampling times [999, 759, 495, 255]: the Gaussian student's std against the Monte-Carlo total
  std of its consistency target (2000 teacher draws per point through its EMA target: E[var] + Var[mean]), and the
  point SCott student's prediction against the Gaussian student's mean.

  Tolerance, per time, on the median over the 16 points, both in units of the target's std: |std_g / std_MC - 1|
  <= 0.25 and |point - mean_g| / std_MC <= 0.75. The Monte-Carlo error is ~1.6% of a std; the rest is the
  students' fit after a constant-learning-rate budget to a target that itself moves during training (the
  free-parameter test above shows the loss's fixed point to 1%). Measured (seed 0): std ratios 0.90 / 0.95 / 1.03 /
  1.04 (medians), point vs mean 0.20 / 0.09 / 0.18 / 0.40 std. The student's initial std (0.03) is below 0.75 of the
  target's at every time, so an untrained variance head fails the tolerance.
  """
  c = _toy_config("default")
  c.toy2d.seeds = (0,)
  cfg, s = c.toy2d, c.solver
  schedule = schedules.sd15()
  mix = toy2d.make_mixture(cfg)
  teps = mix.eps_fn(schedule)
  methods = toy2d.method_settings(c)
  model = toy2d.MLPDenoiser(cfg.hidden, cfg.depth)
  gmodel = toy2d.MLPDenoiser(cfg.hidden, cfg.depth, out_dim=4)
  k_pre, k_dist = jax.random.split(jax.random.key(0))
  init = toy2d.pretrain(model, teps, mix.sample, schedule, cfg, k_pre)
  point = toy2d.distill(model, init, teps, mix.sample, schedule, c, methods["scott"], k_dist)
  gauss, gauss_ema = toy2d.distill(gmodel, toy2d.gaussian_params(init, c.consistency.logvar_init), teps, mix.sample,
                                   schedule, c, methods["scott_gaussian"], k_dist, return_ema=True)
  ts = c.consistency.timestep_scaling
  f_point = jax.jit(toy2d.make_f_fn(model, point, schedule, ts))
  f_gauss = jax.jit(toy2d.make_f_fn(gmodel, gauss, schedule, ts, True))
  target_f = toy2d.make_f_fn(gmodel, gauss_ema, schedule, ts, True)
  n, times = 16, (999, 759, 495, 255)
  t_n = jnp.asarray(np.repeat(times, n))
  k_x, k_e, k_mc = jax.random.split(jax.random.key(123), 3)
  z = jax.jit(lambda k1, k2: schedule.add_noise(mix.sample(k1, len(t_n)), jax.random.normal(k2, (len(t_n), 2)),
                                                t_n))(k_x, k_e)
  mc_mean, mc_var = _total_moments(*_sde_targets(target_f, teps, schedule, s, z, t_n, 2000)(k_mc))
  mean, logvar = f_gauss(z, t_n)
  sd = np.sqrt(mc_var)
  ratio = (np.exp(0.5 * np.asarray(logvar, np.float64)) / sd).reshape(len(times), -1)
  gap = (np.abs(np.asarray(f_point(z, t_n)) - np.asarray(mean)) / sd).reshape(len(times), -1)
  assert np.all(np.abs(np.median(ratio, 1) - 1.0) <= 0.25), np.median(ratio, 1)
  assert np.all(np.median(gap, 1) <= 0.75), np.median(gap, 1)
  assert np.all(np.exp(0.5 * c.consistency.logvar_init) < 0.75 * np.median(sd.reshape(len(times), -1), 1))
