"""Diffusion solvers on a discrete noise schedule (notes section 3): DDIM-eta, ER-SDE, DPM-Solver++(2M), aDDIM.

Every solver is a single-step function with the same signature,

  step(eps, z, t, s, state, *, schedule, key=None, noise=None, **solver_kwargs) -> (z_s, new_state)

- eps (B, ...): the eps prediction at (z, t) (convert other prediction types with ``schedule.to_eps``);
- z (B, ...): the current sample at timestep t; the leading axis is the batch;
- t, s: integer timesteps, scalar () or per-example (B,) arrays, t >= s; s < 0 means clean data (abar = 1),
  and then z_s is exactly the x0 prediction (as diffusers' ``set_alpha_to_one=True`` and k-diffusion);
  t == s is an exact no-op (z and state unchanged);
- state: :class:`SolverState`, the fixed-size history of earlier x0 predictions and noise levels that the
  multistep solvers (dpmpp_2m, er_sde orders 2 and 3) need; every solver keeps it up to date, so it is a
  valid lax.scan carry whatever the solver. Start with :func:`init_state`; with no history the multistep
  solvers take a first-order step.
- key: a jax.random key for the stochastic solvers (or ``noise``, the standard normal draw itself, shaped
  like z). A solver that needs noise and gets neither raises ValueError.

Solvers are looked up by name in :data:`SOLVERS` (:func:`get_solver`). :func:`integrate` steps through an
explicit timestep grid, :func:`sample` runs a whole sampling trajectory (ending with the jump to clean data)
and :func:`sde_multistep` the SCott multi-step teacher Phi_SDE; all use one lax.scan (one trace of the model,
no host synchronisation per step) and are jit-able. Everything is a pure function of arrays.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from scott_jax.choices import ER_SDE_ORDERS, SPACINGS
from scott_jax.schedules import NoiseSchedule, expand

Array = jax.Array
PyTree = Any
EpsFn = Callable[[Array, Array], Array]

HISTORY = 2  # x0 predictions kept: enough for the third-order ER-SDE solver


@flax.struct.dataclass
class SolverState:
  """Fixed-size solver history (a pytree, usable as a lax.scan carry).

  x0: (HISTORY, *z.shape) x0 predictions of the latest steps, most recent first, in z's dtype.
  lam: (HISTORY, *t.shape) the noise levels lambda = sigma/alpha at which they were made.
  count: t.shape int32, how many entries are valid (0..HISTORY).
  """

  x0: Array
  lam: Array
  count: Array


def init_state(z: Array, t: Array | int, dtype: jnp.dtype = jnp.float32) -> SolverState:
  """Empty history for samples z (B, ...) at timesteps t (() or (B,)); lam kept in ``dtype``."""
  t = jnp.asarray(t)
  return SolverState(x0=jnp.zeros((HISTORY,) + z.shape, z.dtype), lam=jnp.ones((HISTORY,) + t.shape, dtype),
                     count=jnp.zeros(t.shape, jnp.int32))


def _std_normal(key: Array | None, noise: Array | None, like: Array, who: str) -> Array:
  if noise is not None:
    return jnp.asarray(noise, like.dtype)
  if key is None:
    raise ValueError(f"solver '{who}' is stochastic with these settings; pass key= (or noise=)")
  return jax.random.normal(key, like.shape, like.dtype)


def _finish(z: Array, z_s: Array, x0: Array, t: Array, s: Array, state: SolverState,
            lam_t: Array) -> tuple[Array, SolverState]:
  """Common end of every step: exact x0 at s < 0, no-op at t == s, history pushed for moved examples."""
  moved = s != t
  z_s = jnp.where(expand(s < 0, z), x0, z_s)
  z_s = jnp.where(expand(moved, z), z_s.astype(z.dtype), z)
  new_x0 = jnp.concatenate([x0[None].astype(state.x0.dtype), state.x0[:-1]], axis=0)
  new_lam = jnp.concatenate([lam_t[None].astype(state.lam.dtype), state.lam[:-1]], axis=0)
  new = SolverState(x0=jnp.where(expand(moved, new_x0[0])[None], new_x0, state.x0),
                    lam=jnp.where(moved[None], new_lam, state.lam),
                    count=jnp.where(moved, jnp.minimum(state.count + 1, HISTORY), state.count))
  return z_s, new


def _coeffs(schedule: NoiseSchedule, t: Array, s: Array) -> tuple[Array, ...]:
  t, s = jnp.asarray(t), jnp.asarray(s)
  t, s = jnp.broadcast_arrays(t, s)
  abar_t, abar_s = schedule.abar_at(t), schedule.abar_at(s)
  return t, s, abar_t, abar_s


# ---------------------------------------------------------------------------------------------------------
# DDIM with eta (paper Eq. 2 and 5).

def ddim_step(eps: Array, z: Array, t: Array | int, s: Array | int, state: SolverState, *,
              schedule: NoiseSchedule, key: Array | None = None, noise: Array | None = None,
              eta: float | Array = 0.0) -> tuple[Array, SolverState]:
  """DDIM-eta step t -> s (Song et al. 2021; paper Eq. 2, 5).

  x0 = (z - sigma_t eps)/alpha_t, std = eta sqrt((1-abar_s)/(1-abar_t)) sqrt(1 - abar_t/abar_s),
  z_s = alpha_s x0 + sqrt(1 - abar_s - std^2) eps + std xi. eta = 0: deterministic DDIM; eta = 1: DDPM.
  Equals diffusers ``DDIMScheduler.step(eps, t, z, eta, variance_noise=xi)`` with prev_timestep s.
  """
  t, s, abar_t, abar_s = _coeffs(schedule, t, s)
  a_t, sig_t = jnp.sqrt(abar_t), jnp.sqrt(1.0 - abar_t)
  x0 = (z - expand(sig_t, z) * eps) / expand(a_t, z)
  var = (1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s)
  std = eta * jnp.sqrt(jnp.maximum(var, 0.0))
  z_s = expand(jnp.sqrt(abar_s), z) * x0 + expand(jnp.sqrt(jnp.maximum(1.0 - abar_s - std**2, 0.0)), z) * eps
  if not (isinstance(eta, (int, float)) and eta == 0):
    z_s = z_s + expand(std, z) * _std_normal(key, noise, z, "ddim")
  return _finish(z, z_s, x0, t, s, state, schedule.lam(t))


# ---------------------------------------------------------------------------------------------------------
# ER-SDE (Cui et al. 2023), VP form of the official solver; noise scale functions in its numbering.

NOISE_FNS: dict[int, Callable[[Array], Array]] = {
    1: lambda x: x,  # ODE: equals DDIM eta = 0
    2: lambda x: x**2,  # the reverse SDE of the forward process: equals DDPM (DDIM eta = 1)
    3: lambda x: x * (jnp.exp(-1.0 / x) + 10.0),
    4: lambda x: x**1.5,
    5: lambda x: x**2.5,
    6: lambda x: x**0.9 * jnp.log10(1.0 + 100.0 * x**1.5),
    7: lambda x: x * (jnp.exp(x**0.3) + 10.0),  # the official default; the SCott paper's "ER-SDE 5"
}


def _riemann(phi: Callable[[Array], Array], lam_s: Array, lam_t: Array, points: int) -> tuple[Array, Array]:
  """S1 = int_{lam_s}^{lam_t} dl/phi(l), S2 = int (l - lam_t)/phi(l) dl: left Riemann sums as the official code."""
  k = jnp.arange(points, dtype=lam_t.dtype).reshape((points,) + (1,) * lam_t.ndim) / points
  width = lam_t - lam_s
  grid = lam_s[None] + k * width[None]
  inv = 1.0 / phi(grid)
  s1 = jnp.sum(inv, axis=0) * width / points
  s2 = jnp.sum((grid - lam_t[None]) * inv, axis=0) * width / points
  return s1, s2


def er_sde_step(eps: Array, z: Array, t: Array | int, s: Array | int, state: SolverState, *,
                schedule: NoiseSchedule, key: Array | None = None, noise: Array | None = None,
                order: int = 1, noise_fn: int = 7, integration_points: int = 100) -> tuple[Array, SolverState]:
  """ER-SDE step t -> s, order 1-3 (Taylor method), noise scale function ``noise_fn`` 1-7.

  In VE coordinates x = z/alpha, lam = sigma/alpha, r = phi(lam_s)/phi(lam_t):
  x_s = r x_t + (1-r) x0 + [order >= 2] (lam_s - lam_t + S1 phi(lam_s)) D1
        + [order 3] ((lam_s - lam_t)^2/2 + S2 phi(lam_s)) D2 + sqrt(max(lam_s^2 - lam_t^2 r^2, 0)) xi,
  z_s = alpha_s x_s, with D1, D2 divided differences of the x0 history over lam and S1, S2 the integrals of
  the notes (left Riemann sums with ``integration_points`` points, 100 as the official solver). With too
  little history, or when s is clean data, the step falls back to the highest order available (order 1).
  ``order`` and ``noise_fn`` are static Python ints. As in the official solver, D1 is the plain backward
  difference (x0_t - x0_prev)/(lam_t - lam_prev), so order 3 lowers the error constant but its global order
  stays 2 (tests/test_solvers.py measures the slopes); order 2 is second order.
  """
  if order not in ER_SDE_ORDERS:
    raise ValueError(f"er_sde order must be 1, 2 or 3, got {order!r}")
  if noise_fn not in NOISE_FNS:
    raise ValueError(f"er_sde noise_fn must be one of {sorted(NOISE_FNS)}, got {noise_fn!r}")
  phi = NOISE_FNS[noise_fn]
  t, s, abar_t, abar_s = _coeffs(schedule, t, s)
  a_t, sig_t, a_s = jnp.sqrt(abar_t), jnp.sqrt(1.0 - abar_t), jnp.sqrt(abar_s)
  lam_t, lam_s = sig_t / a_t, jnp.sqrt(1.0 - abar_s) / a_s
  x0 = (z - expand(sig_t, z) * eps) / expand(a_t, z)
  x_t = z / expand(a_t, z)

  final = s < 0
  lam_s_safe = jnp.where(final, lam_t, lam_s)  # keeps the unused higher-order terms finite at clean data
  phi_s = phi(lam_s_safe)
  r = jnp.where(final, 0.0, phi_s / phi(lam_t))
  x_s = expand(r, z) * x_t + expand(1.0 - r, z) * x0

  if order >= 2:
    s1, s2 = _riemann(phi, lam_s_safe, lam_t, integration_points)
    have1 = (state.count >= 1) & ~final
    den1 = jnp.where(have1, lam_t - state.lam[0], 1.0)
    d1 = (x0 - state.x0[0]) / expand(den1, z)
    c1 = jnp.where(have1, lam_s_safe - lam_t + s1 * phi_s, 0.0)
    x_s = x_s + expand(c1, z) * d1
    if order == 3:
      have2 = (state.count >= 2) & have1
      den_prev = jnp.where(have2, state.lam[0] - state.lam[1], 1.0)
      den2 = jnp.where(have2, lam_t - state.lam[1], 1.0)
      d1_prev = (state.x0[0] - state.x0[1]) / expand(den_prev, z)
      d2 = 2.0 * (d1 - d1_prev) / expand(den2, z)
      c2 = jnp.where(have2, (lam_s_safe - lam_t) ** 2 / 2.0 + s2 * phi_s, 0.0)
      x_s = x_s + expand(c2, z) * d2

  if noise_fn != 1:  # noise_fn 1 is the ODE: lam_s^2 - lam_t^2 r^2 = 0 exactly (round-off would leak noise)
    std = jnp.where(final, 0.0, jnp.sqrt(jnp.maximum(lam_s**2 - lam_t**2 * r**2, 0.0)))
    x_s = x_s + expand(std, z) * _std_normal(key, noise, z, "er_sde")
  z_s = expand(a_s, z) * x_s
  return _finish(z, z_s, x0, t, s, state, lam_t)


# ---------------------------------------------------------------------------------------------------------
# DPM-Solver++(2M) (Lu et al. 2022), data prediction, midpoint form as diffusers.

def dpmpp_2m_step(eps: Array, z: Array, t: Array | int, s: Array | int, state: SolverState, *,
                  schedule: NoiseSchedule, key: Array | None = None,
                  noise: Array | None = None) -> tuple[Array, SolverState]:
  """DPM-Solver++(2M) step t -> s. Deterministic (key and noise are ignored).

  With log-SNR L = -log(lam), h = L_s - L_t: z_s = (sigma_s/sigma_t) z - alpha_s (e^-h - 1) (x0 + D/2),
  D = (h/h_0)(x0 - x0_prev), h_0 = L_t - L_prev (D = 0 without history: first order). Equals diffusers
  ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint")``;
  the final step to clean data gives x0 (its ``final_sigmas_type="zero"``, where that step is first order).
  """
  del key, noise
  t, s, abar_t, abar_s = _coeffs(schedule, t, s)
  a_t, sig_t, a_s, sig_s = jnp.sqrt(abar_t), jnp.sqrt(1.0 - abar_t), jnp.sqrt(abar_s), jnp.sqrt(1.0 - abar_s)
  lam_t = sig_t / a_t
  final = s < 0
  lam_s = jnp.where(final, lam_t, sig_s / a_s)
  x0 = (z - expand(sig_t, z) * eps) / expand(a_t, z)
  h = jnp.log(lam_t) - jnp.log(lam_s)
  have1 = state.count >= 1
  h0 = jnp.where(have1, jnp.log(state.lam[0]) - jnp.log(lam_t), 1.0)
  ratio = jnp.where(have1, h / h0, 0.0)
  d = x0 + 0.5 * expand(ratio, z) * (x0 - state.x0[0])
  z_s = expand(sig_s / sig_t, z) * z - expand(a_s * jnp.expm1(-h), z) * d
  return _finish(z, z_s, x0, t, s, state, lam_t)


# ---------------------------------------------------------------------------------------------------------
# aDDIM (Multistep Consistency Models, Heek et al. 2024).

def addim_step(eps: Array, z: Array, t: Array | int, s: Array | int, state: SolverState, *,
               schedule: NoiseSchedule, key: Array | None = None, noise: Array | None = None,
               x_var_scale: float = 0.1) -> tuple[Array, SolverState]:
  """Deterministic aDDIM step t -> s.

  x0 = (z - sigma_t eps)/alpha_t, eps_hat = (z - alpha_t x0)/sigma_t (= eps), x_var = c/(2 + alpha_t^2/sigma_t^2)
  with c = ``x_var_scale`` (0.1 in the paper), d = number of elements per example (z.shape[1:]),
  z_s = alpha_s x0 + sqrt(sigma_s^2 + (d/||eps_hat||^2) (alpha_s - alpha_t sigma_s/sigma_t)^2 x_var) eps_hat,
  ||.|| per example over all non-batch axes. x_var_scale = 0 is DDIM (eta 0). Key and noise are ignored.
  """
  del key, noise
  t, s, abar_t, abar_s = _coeffs(schedule, t, s)
  a_t, sig_t, a_s, sig_s = jnp.sqrt(abar_t), jnp.sqrt(1.0 - abar_t), jnp.sqrt(abar_s), jnp.sqrt(1.0 - abar_s)
  x0 = (z - expand(sig_t, z) * eps) / expand(a_t, z)
  eps_hat = (z - expand(a_t, z) * x0) / expand(sig_t, z)
  d = int(np.prod(z.shape[1:]))
  sq = jnp.sum(jnp.square(eps_hat).reshape(z.shape[0], -1), axis=1)  # (B,)
  x_var = x_var_scale / (2.0 + abar_t / (1.0 - abar_t))
  gap = (a_s - a_t * sig_s / sig_t) ** 2 * x_var  # t.shape
  scale = jnp.sqrt(expand(sig_s**2, sq) + d / sq * expand(gap, sq))  # (B,) (t () or (B,))
  z_s = expand(a_s, z) * x0 + expand(scale, z) * eps_hat
  return _finish(z, z_s, x0, t, s, state, sig_t / a_t)


# ---------------------------------------------------------------------------------------------------------
# Registry (its names, in order, are scott_jax.choices.SOLVER_NAMES, which config validation reads).

SOLVERS: dict[str, Callable[..., tuple[Array, SolverState]]] = {
    "ddim": ddim_step,
    "er_sde": er_sde_step,
    "dpmpp_2m": dpmpp_2m_step,
    "addim": addim_step,
}


def get_solver(name: str) -> Callable[..., tuple[Array, SolverState]]:
  """The step function registered as ``name``; ValueError listing the registry otherwise."""
  if name not in SOLVERS:
    raise ValueError(f"unknown solver {name!r}; available solvers: {', '.join(SOLVERS)}")
  return SOLVERS[name]


def solver_kwargs(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
  """The entries of ``options`` (e.g. ``config.solver``: eta, order, noise_fn, skip, h, ...) that solver
  ``name`` accepts as keyword arguments (eta for ddim; order, noise_fn for er_sde; ...)."""
  params = inspect.signature(get_solver(name)).parameters
  skip = {"eps", "z", "t", "s", "state", "schedule", "key", "noise"}
  return {k: v for k, v in options.items() if k in params and k not in skip}


# ---------------------------------------------------------------------------------------------------------
# Loops.

def integrate(eps_fn: EpsFn, z: Array, grid: Array | np.ndarray, *, solver: str, schedule: NoiseSchedule,
              key: Array | None = None, **solver_kwargs: Any) -> Array:
  """Steps z from grid[0] through grid[1], ..., to grid[-1] with ``solver``: one lax.scan, history empty at
  grid[0]. grid: (K + 1,) or (K + 1, B) integer timesteps, non-increasing along the first axis (may be a traced
  array; a negative entry is clean data, a repeated entry an exact no-op step). ``eps_fn(z, t)`` gets t of
  shape grid.shape[1:]. ``key`` is split once per step. Returns z at grid[-1], shaped and typed like z.
  """
  grid = jnp.asarray(grid, jnp.int32)
  if grid.ndim not in (1, 2) or grid.shape[0] < 2:
    raise ValueError(f"grid must have shape (K + 1,) or (K + 1, B) with K >= 1, got {grid.shape}")
  step = get_solver(solver)
  ts, ss = grid[:-1], grid[1:]
  state = init_state(z, ts[0], schedule.abar.dtype)
  keys = None if key is None else jax.random.split(key, ts.shape[0])

  def body(carry: tuple[Array, SolverState], inp: tuple[Array, ...]) -> tuple[tuple[Array, SolverState], None]:
    z, state = carry
    t, s, k = inp if keys is not None else (*inp, None)
    eps = eps_fn(z, t)
    z, state = step(eps, z, t, s, state, schedule=schedule, key=k, **solver_kwargs)
    return (z, state), None

  xs = (ts, ss) if keys is None else (ts, ss, keys)
  (z, _), _ = jax.lax.scan(body, (z, state), xs)
  return z


def sample(eps_fn: EpsFn, z_T: Array, timesteps: Array | np.ndarray | list[int], *, solver: str,
           schedule: NoiseSchedule, key: Array | None = None, **solver_kwargs: Any) -> Array:
  """Samples from z_T (B, ...) by evaluating ``eps_fn(z, t) -> eps`` (t a scalar int32 array) at ``timesteps``.

  ``timesteps`` (K,) descending integers: the loop steps from each to the next and from the last one to
  clean data, where the result is that step's x0 prediction. ``solver`` a registry name, solver_kwargs its
  options (eta=, order=, noise_fn=, ...). ``key`` drives the noise of stochastic solvers (one split per step).
  One lax.scan; jit-able with the eps_fn closed over. Returns the sample (B, ...) in z_T's dtype.
  """
  ts = jnp.asarray(timesteps, jnp.int32)
  if ts.ndim != 1 or ts.shape[0] < 1:
    raise ValueError(f"timesteps must be a non-empty 1-D array, got shape {ts.shape}")
  grid = jnp.concatenate([ts, jnp.full((1,), -1, jnp.int32)])
  return integrate(eps_fn, z_T, grid, solver=solver, schedule=schedule, key=key, **solver_kwargs)


def multistep_grid(t_n: Array | int, t_m: Array | int, h: int) -> Array:
  """round(linspace(t_n, t_m, h + 1)) as int32, shape (h + 1, *t_n.shape): the sub-step timesteps.

  Exact integer arithmetic with numpy's rounding (half to even), so no float round-off decides a timestep.
  """
  t_n, t_m = jnp.broadcast_arrays(jnp.asarray(t_n, jnp.int32), jnp.asarray(t_m, jnp.int32))
  i = jnp.arange(h + 1, dtype=jnp.int32).reshape((h + 1,) + (1,) * t_n.ndim)
  v = t_n[None] * h - (t_n - t_m)[None] * i  # h * linspace value, an integer >= 0
  q, r = v // h, v % h
  return q + ((2 * r > h) | ((2 * r == h) & (q % 2 == 1))).astype(jnp.int32)


def sde_multistep(eps_fn: EpsFn, z_tn: Array, t_n: Array | int, t_m: Array | int, h: int, *, solver: str,
                  schedule: NoiseSchedule, key: Array | None = None, **solver_kwargs: Any) -> Array:
  """The SCott multi-step teacher Phi_SDE(z_tn, t_n, t_m, h) (notes section 3): z at t_m, shaped like z_tn.

  h (static int) sub-steps of ``solver`` on round(linspace(t_n, t_m, h + 1)) with empty history at t_n (so the
  first sub-step is first order), ending at the integer timestep t_m (abar[t_m]; t_m = 0 is abar[0], not clean
  data). t_n, t_m: scalars or per-example (B,) int arrays; ``eps_fn(z, t)`` is then called with t of that same
  shape, so it must accept a scalar or a (B,) t. A sub-step with equal ends (t_n - t_m < h) is a no-op.
  ``key`` is split into h step keys (required by the stochastic solvers).
  """
  if not isinstance(h, int) or h < 1:
    raise ValueError(f"h must be a Python int >= 1, got {h!r}")
  return integrate(eps_fn, z_tn, multistep_grid(t_n, t_m, h), solver=solver, schedule=schedule, key=key,
                   **solver_kwargs)


def ddim_timesteps(num_steps: int, num_train: int = 1000, spacing: str = "leading",
                   offset: int = 0) -> np.ndarray:
  """Descending int64 timesteps (num_steps,) as diffusers' DDIMScheduler.set_timesteps.

  leading: arange(num_steps) * (num_train // num_steps), reversed, + offset (``steps_offset``; SD1.5 uses 1);
  trailing: round(arange(num_train, 0, -num_train / num_steps)) - 1 (starts at num_train - 1);
  linspace: round(linspace(0, num_train - 1, num_steps)), reversed.
  """
  if not 1 <= num_steps <= num_train:
    raise ValueError(f"num_steps must be in [1, {num_train}], got {num_steps}")
  if spacing == "leading":
    ts = (np.arange(0, num_steps) * (num_train // num_steps)).round()[::-1] + offset
  elif spacing == "trailing":
    ts = np.round(np.arange(num_train, 0, -num_train / num_steps)) - 1
  elif spacing == "linspace":
    ts = np.linspace(0, num_train - 1, num_steps).round()[::-1]
  else:
    raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
  return ts.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# Classifier-free guidance (notes section 2).

def cfg(eps_u: Array, eps_c: Array, scale: float | Array) -> Array:
  """Standard CFG: eps_u + g (eps_c - eps_u); g scalar or per-example (B,)."""
  return eps_u + expand(jnp.asarray(scale, eps_c.dtype), eps_c) * (eps_c - eps_u)


def cfg_lcm(eps_u: Array, eps_c: Array, w: float | Array) -> Array:
  """LCM form: eps_c + w (eps_c - eps_u) = cfg(eps_u, eps_c, 1 + w); w scalar or per-example (B,)."""
  return eps_c + expand(jnp.asarray(w, eps_c.dtype), eps_c) * (eps_c - eps_u)


def make_guided_eps_fn(eps_fn: Callable[[Array, Array, PyTree], Array], cond: PyTree, uncond: PyTree,
                       w: float | Array) -> EpsFn:
  """Wraps a conditional ``eps_fn(z, t, c)`` into a guided ``eps(z, t)`` (LCM form, w = g - 1).

  cond, uncond: pytrees of the same structure whose leaves have a leading batch axis B (same as z); uncond
  leaves may have batch 1 (broadcast). The model is called once on the batch [uncond; cond] (2B examples;
  t () stays scalar, t (B,) is tiled), then eps = eps_c + w (eps_c - eps_u). w scalar or (B,).
  """

  def guided(z: Array, t: Array) -> Array:
    t = jnp.asarray(t)
    c2 = jax.tree_util.tree_map(
        lambda u, c: jnp.concatenate([jnp.broadcast_to(u, c.shape).astype(c.dtype), c], axis=0), uncond, cond)
    t2 = t if t.ndim == 0 else jnp.concatenate([t, t], axis=0)
    out = eps_fn(jnp.concatenate([z, z], axis=0), t2, c2)
    eps_u, eps_c = jnp.split(out, 2, axis=0)
    return cfg_lcm(eps_u, eps_c, w)

  return guided
