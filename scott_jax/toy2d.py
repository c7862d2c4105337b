"""The 2-D toy experiment (paper Figure 4 made measurable): data, a small MLP denoiser, metrics, the run.

The data is a mixture of isotropic Gaussians whose exact eps is known in closed form (``scott_jax.analytic``),
so the teacher is exact and needs no training. Distances to the true distribution are computed in numpy.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from scott_jax import analytic, consistency, losses, solvers
from scott_jax.choices import TOY2D_METHODS
from scott_jax.schedules import NoiseSchedule

PyTree = Any


def ring_mixture(num_modes: int = 8, radius: float = 1.0, std: float = 0.05,
                 weights: tuple[float, ...] | None = None) -> analytic.GaussianMixture:
  """``num_modes`` Gaussians evenly on a circle; unequal ``weights`` make rare modes for coverage tests."""
  angles = 2 * np.pi * np.arange(num_modes) / num_modes
  means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  w = np.ones(num_modes) if weights is None else np.asarray(weights, np.float64)
  if w.shape != (num_modes,) or np.any(w <= 0):
    raise ValueError(f"weights must be {num_modes} positive numbers; got {weights!r}")
  return analytic.GaussianMixture(means.astype(np.float32), std, w.astype(np.float32))


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal embedding of (B,) timesteps (0..999) -> (B, dim), as the SD U-Net (flip_sin_to_cos)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class MLPDenoiser(nn.Module):
  """eps-prediction MLP for 2-D data: (z (B, 2), t (B,) or scalar) -> eps (B, 2); ``out_dim`` 4 (a Gaussian
  student, `gaussian_params`): (eps (B, 2), log-variance of x0_hat (B, 2)) concatenated."""

  hidden: int = 128
  depth: int = 3
  time_dim: int = 64
  out_dim: int = 0  # 0: the data dimension

  @nn.compact
  def __call__(self, z: jax.Array, t: jax.Array) -> jax.Array:
    t = jnp.broadcast_to(jnp.asarray(t), z.shape[:1])
    temb = nn.Dense(self.hidden)(timestep_embedding(t, self.time_dim))
    h = nn.Dense(self.hidden)(z) + nn.silu(temb)
    for _ in range(self.depth):
      h = h + nn.Dense(self.hidden)(nn.silu(nn.LayerNorm()(h)))
    return nn.Dense(self.out_dim or z.shape[-1])(nn.silu(h))


def gaussian_params(params: PyTree, logvar_init: float) -> PyTree:
  """A point MLP's parameters -> the Gaussian student's (`MLPDenoiser` with twice the outputs): the last Dense's
  kernel and bias get a second half, zero kernel and bias ``logvar_init`` (as `scott_jax.train`'s doubled
  conv_out), so the student starts equal to the point model and near-deterministic."""
  inner = dict(params["params"])
  last = max((k for k in inner if k.startswith("Dense_")), key=lambda k: int(k.split("_")[1]))
  kernel, bias = inner[last]["kernel"], inner[last]["bias"]
  inner[last] = {"kernel": jnp.concatenate([kernel, jnp.zeros_like(kernel)], axis=-1),
                 "bias": jnp.concatenate([bias, jnp.full_like(bias, logvar_init)])}
  return {"params": inner}


# ---------------------------------------------------------------------------------------------------
# Metrics against the true distribution (numpy, float64).

def sliced_wasserstein(x: np.ndarray, y: np.ndarray, num_projections: int = 256, seed: int = 0) -> float:
  """Sliced 1-Wasserstein distance between two equally sized point clouds (N, D)."""
  if x.shape != y.shape:
    raise ValueError(f"point clouds must have the same shape; got {x.shape} and {y.shape}")
  rng = np.random.default_rng(seed)
  dirs = rng.standard_normal((x.shape[1], num_projections))
  dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
  px = np.sort(np.asarray(x, np.float64) @ dirs, axis=0)
  py = np.sort(np.asarray(y, np.float64) @ dirs, axis=0)
  return float(np.mean(np.abs(px - py)))


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidth: float = 0.1) -> float:
  """Unbiased squared MMD with an RBF kernel of the given bandwidth."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)

  def k(a, b):
    d2 = np.sum(a**2, 1)[:, None] + np.sum(b**2, 1)[None] - 2 * a @ b.T
    return np.exp(-d2 / (2 * bandwidth**2))

  n, m = len(x), len(y)
  kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
  return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
               - 2 * kxy.mean())


def mode_stats(samples: np.ndarray, mixture: analytic.GaussianMixture, num_std: float = 3.0) -> dict[str, float]:
  """Mode coverage and quality of 2-D samples.

  Returns:
    coverage: fraction of modes that received at least 20% of the samples they would get from the true
      distribution (within ``num_std`` stds of the mean);
    quality: fraction of samples within ``num_std`` stds of some mode's mean;
    mode_tv: total variation between the true mode weights and the sample assignment frequencies (of the
      samples within range).
  """
  means, stds, weights = (np.asarray(a, np.float64) for a in (mixture.means, mixture.stds, mixture.weights))
  d = np.linalg.norm(samples[:, None, :] - means[None], axis=-1) / stds[None]
  nearest = np.argmin(d, axis=1)
  good = d[np.arange(len(samples)), nearest] <= num_std
  counts = np.bincount(nearest[good], minlength=len(weights))
  expected = weights * len(samples)
  freq = counts / max(counts.sum(), 1)
  return {
      "coverage": float(np.mean(counts >= 0.2 * expected)),
      "quality": float(np.mean(good)),
      "mode_tv": float(0.5 * np.abs(freq - weights).sum()),
  }


# ---------------------------------------------------------------------------------------------------
# The experiment: exact teacher, MLP student, SCott (SDE teacher) vs LCM (ODE teacher), same budget.

def make_mixture(cfg) -> analytic.GaussianMixture:
  """The toy data of ``config.toy2d``: every other mode gets weight ``rare_mode_weight``."""
  weights = [1.0 if i % 2 == 0 else cfg.rare_mode_weight for i in range(cfg.num_modes)]
  return ring_mixture(cfg.num_modes, cfg.radius, cfg.mode_std, tuple(weights))


METHODS = TOY2D_METHODS
LABELS = {"scott": "SCOTT", "lcm": "LCM", "scott_gaussian": "SCOTT GAUSSIAN"}


def method_settings(config) -> dict[str, dict]:
  """The methods of ``config.toy2d.methods``: SCott uses ``config.solver``; LCM is the same loss with the ODE
  teacher (ddim, eta 0, h 1); SCott Gaussian is SCott's teacher with the Gaussian student (SCott v1: KL loss,
  ``consistency.logvar_init`` / ``var_floor``)."""
  s = config.solver
  scott = dict(solver=s.name, solver_kwargs=solvers.solver_kwargs(s.name, s), skip=s.skip, h=s.h,
               student_output="point")
  every = {
      "scott": scott,
      "lcm": dict(solver="ddim", solver_kwargs=dict(eta=0.0), skip=config.toy2d.lcm_skip, h=1, student_output="point"),
      "scott_gaussian": dict(scott, student_output="gaussian"),
  }
  return {m: every[m] for m in config.toy2d.methods}


def _train_loop(step_fn: Callable, carry: Any, num_steps: int, chunk: int = 250) -> Any:
  """Runs ``carry = step_fn(carry)`` num_steps times, ``chunk`` steps per jitted lax.scan call."""
  run = jax.jit(lambda c, n: jax.lax.scan(lambda c, _: (step_fn(c), None), c, None, length=n)[0],
                static_argnums=1)
  done = 0
  while done < num_steps:
    n = min(chunk, num_steps - done)
    carry = run(carry, n)
    done += n
  return carry


def pretrain(model: MLPDenoiser, teacher_eps: Callable, data: Callable, schedule: NoiseSchedule, cfg,
             key: jax.Array) -> PyTree:
  """``data(key, n) -> (n, 2)`` draws clean samples; returns the regressed MLP parameters."""
  k_init, k_loop = jax.random.split(key)
  params = model.init(k_init, jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32))
  tx = optax.adam(cfg.learning_rate)

  def step(carry):
    params, opt_state, key = carry
    key, k_x, k_t, k_e = jax.random.split(key, 4)
    x0 = data(k_x, cfg.batch_size)
    t = jax.random.randint(k_t, (cfg.batch_size,), 0, schedule.num_train_timesteps)
    z = schedule.add_noise(x0, jax.random.normal(k_e, x0.shape), t)
    target = teacher_eps(z, t)
    grads = jax.grad(lambda p: jnp.mean((model.apply(p, z, t) - target) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, key

  params, _, _ = _train_loop(step, (params, tx.init(params), k_loop), cfg.pretrain_steps)
  return params


def distill(model: MLPDenoiser, init_params: PyTree, teacher_eps: Callable, data: Callable,
            schedule: NoiseSchedule, config, method: dict, key: jax.Array, return_ema: bool = False) -> PyTree:
  """Consistency distillation of the MLP with ``losses.make_cd_loss`` (the same loss code as SD); a Gaussian
  ``method`` (student_output "gaussian") needs the Gaussian MLP and its parameters (`gaussian_params`)."""
  cfg, ccfg = config.toy2d, config.consistency
  loss_fn = losses.make_cd_loss(
      lambda p, z, t, c: model.apply(p, z, t), lambda z, t, c: teacher_eps(z, t), schedule,
      solver=method["solver"], solver_kwargs=method["solver_kwargs"], skip=method["skip"], h=method["h"],
      grid=ccfg.grid, num_ddim_timesteps=ccfg.num_ddim_timesteps, distance_kind=ccfg.distance, huber_c=ccfg.huber_c,
      timestep_scaling=ccfg.timestep_scaling, student_output=method.get("student_output", "point"),
      var_floor=ccfg.var_floor)
  tx = optax.adam(cfg.learning_rate)
  mu = ccfg.ema_decay

  def step(carry):
    params, ema, opt_state, key = carry
    key, k_x, k_loss = jax.random.split(key, 3)
    x0 = data(k_x, cfg.batch_size)
    grads, _ = jax.grad(loss_fn, has_aux=True)(params, ema, x0, None, k_loss)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: mu * e + (1 - mu) * p, ema, params)
    return params, ema, opt_state, key

  carry = (init_params, init_params, tx.init(init_params), key)
  params, ema, _, _ = _train_loop(step, carry, cfg.distill_steps)
  return (params, ema) if return_ema else params


def make_f_fn(model: MLPDenoiser, params: PyTree, schedule: NoiseSchedule, timestep_scaling: float,
              gaussian: bool = False) -> Callable:
  """f_fn(z (B, 2), t scalar or (B,)) -> the consistency function f (B, 2) of the MLP, or for a Gaussian MLP the
  pair (mean, logvar) (`consistency.gaussian_consistency_output`), as `consistency.multistep_sample` takes it."""

  def f_fn(z, t):
    t = jnp.broadcast_to(t, z.shape[:1])
    out = model.apply(params, z, t)
    if gaussian:
      mean, logvar, _ = consistency.gaussian_consistency_output(out, z, t, schedule,
                                                                timestep_scaling=timestep_scaling)
      return mean, logvar
    return consistency.consistency_output(out, z, t, schedule, timestep_scaling=timestep_scaling)[0]

  return f_fn


def evaluate(samples: np.ndarray, reference: np.ndarray, mixture: analytic.GaussianMixture) -> dict[str, float]:
  """Distances of ``samples`` (N, 2) to the true distribution (``reference``: N true samples)."""
  return {"swd": sliced_wasserstein(samples, reference), "mmd": mmd_rbf(samples, reference),
          **mode_stats(samples, mixture)}


def run_toy2d(config, workdir: str) -> dict[str, Any]:
  """SCott (SDE teacher) vs LCM (ODE teacher) vs SCott's Gaussian student (``toy2d.methods``) on a 2-D Gaussian
  mixture with the exact teacher.

  For every seed: pretrain the MLP on the exact eps, distil it with each method (same budget), sample at
  ``sample_steps`` with multistep consistency sampling and measure SWD, MMD, mode coverage and quality against
  fresh true samples. Writes ``report.md`` (mean ± std over seeds), ``results.json`` and ``samples.png`` in
  ``workdir`` and returns the results.
  """
  cfg = config.toy2d
  os.makedirs(workdir, exist_ok=True)
  schedule = NoiseSchedule.from_config(config.schedule)
  mixture = make_mixture(cfg)
  teacher_eps = mixture.eps_fn(schedule)
  data = mixture.sample

  model = MLPDenoiser(cfg.hidden, cfg.depth)
  methods = method_settings(config)
  rows: dict[str, list[dict[str, float]]] = {}
  plots: dict[str, np.ndarray] = {}
  start = time.time()
  for seed in cfg.seeds:
    key = jax.random.key(seed)
    k_pre, k_dist, k_eval = jax.random.split(key, 3)
    reference = np.asarray(mixture.sample(jax.random.key(10_000 + seed), cfg.eval_samples))
    z_T = jax.random.normal(k_eval, (cfg.eval_samples, 2))
    teacher_ddim = solvers.sample(teacher_eps, z_T, solvers.ddim_timesteps(50), solver="ddim", schedule=schedule)
    rows.setdefault("exact teacher, DDIM 50", []).append(evaluate(np.asarray(teacher_ddim), reference, mixture))
    init = pretrain(model, teacher_eps, data, schedule, cfg, k_pre)
    init_ddim = solvers.sample(functools.partial(model.apply, init), z_T, solvers.ddim_timesteps(50),
                               solver="ddim", schedule=schedule)
    rows.setdefault("pretrained MLP, DDIM 50", []).append(evaluate(np.asarray(init_ddim), reference, mixture))
    for name, method in methods.items():
      gaussian = method["student_output"] == "gaussian"
      student = MLPDenoiser(cfg.hidden, cfg.depth, out_dim=4) if gaussian else model
      start_params = gaussian_params(init, config.consistency.logvar_init) if gaussian else init
      params = distill(student, start_params, teacher_eps, data, schedule, config, method, k_dist)
      f_fn = make_f_fn(student, params, schedule, config.consistency.timestep_scaling, gaussian)
      for how in (("sample", "mean") if gaussian else (None,)):
        for k in cfg.sample_steps:
          x = consistency.multistep_sample(f_fn, z_T, consistency.lcm_timesteps(k), schedule,
                                           jax.random.fold_in(k_eval, k), gaussian=how)
          label = f"{LABELS[name]}{' (mean)' if how == 'mean' else ''}, {k} step{'s' if k > 1 else ''}"
          rows.setdefault(label, []).append(evaluate(np.asarray(x), reference, mixture))
          if seed == cfg.seeds[0]:
            plots[label] = np.asarray(x)
    logging.info("toy2d: seed %d done (%.0f s)", seed, time.time() - start)
  plots["true data"] = reference
  report = _write_report(workdir, config, rows, plots, time.time() - start)
  print(report)
  return rows


def _write_report(workdir: str, config, rows: dict[str, list[dict[str, float]]],
                  plots: dict[str, np.ndarray], seconds: float) -> str:
  cfg = config.toy2d
  keys = ("swd", "mmd", "coverage", "quality", "mode_tv")
  head = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  lines = []
  for label, runs in rows.items():
    cells = []
    for k in keys:
      v = np.array([r[k] for r in runs])
      cells.append(f"{v.mean():.4f} ± {v.std():.4f}")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  s = config.solver
  text = "\n".join([
      "# toy2d: SCott (SDE teacher) vs LCM (ODE teacher) on a 2-D Gaussian mixture",
      "",
      f"{cfg.num_modes} modes on a circle of radius {cfg.radius}, std {cfg.mode_std}, every other mode weighted "
      f"{cfg.rare_mode_weight}. Exact teacher (closed-form eps). MLP student pretrained for {cfg.pretrain_steps} "
      f"steps on the exact eps, then distilled for {cfg.distill_steps} steps (batch {cfg.batch_size}) by each "
      f"method. SCott: {s.name} (eta {s.eta}, order {s.order}, noise fn {s.noise_fn}), skip {s.skip}, h {s.h}. "
      f"LCM: ddim eta 0, skip {cfg.lcm_skip}, h 1. SCott Gaussian (SCott v1): SCott's teacher, the MLP with a "
      f"log-variance head (init {config.consistency.logvar_init}) trained with KL(target || student) (variance "
      f"floor {config.consistency.var_floor}); its rows draw x0 from the Gaussian at every step, its '(mean)' rows "
      f"take the mean. Methods run: {', '.join(cfg.methods)}. Seeds {tuple(cfg.seeds)}; mean ± std over seeds; "
      f"{cfg.eval_samples} samples per row. swd: sliced Wasserstein-1, mmd: RBF MMD^2 (bandwidth 0.1), "
      "coverage: share of modes with >= 20% of their expected samples, quality: share of samples within 3 std of "
      "a mode, mode_tv: total variation between true and sampled mode weights. Lower is better for swd, mmd, "
      "mode_tv.",
      "",
      *head, *lines, "",
      f"Wall time {seconds:.0f} s. Samples (first seed): samples.png.", ""])
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(text)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
  _scatter(os.path.join(workdir, "samples.png"), plots, cfg.radius)
  return text


def _scatter(path: str, plots: dict[str, np.ndarray], radius: float) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = len(plots)
  cols = min(n, 4)
  rows = (n + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
  lim = 1.6 * radius
  for ax, (label, pts) in zip(axes.flat, plots.items(), strict=False):
    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(label, fontsize=9)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
