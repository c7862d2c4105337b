"""Discrete variance-preserving noise schedules (notes section 1) and prediction-type conversions.

The forward process at integer timestep t in 0..N-1 is z_t = alpha_t x0 + sigma_t eps with
abar_t = prod_{i<=t} (1 - beta_i), alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and the VE noise level
lambda_t = sigma_t / alpha_t (ER-SDE's "sigma"; DPM-Solver's log-SNR is -log(lambda_t)).

Convention used by the solvers: the timestep t = -1 (any negative value) denotes clean data, abar = 1
(diffusers' ``set_alpha_to_one=True``). All gathers take integer arrays of any shape; per-example coefficients
of shape t.shape broadcast against data z of shape t.shape + trailing dims.

A model output is in the schedule's ``prediction_type``: "epsilon" (eps), "v_prediction"
(v = alpha eps - sigma x0) or "sample" (x0). The conversions between the three live here and only here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from scott_jax.choices import BETA_SCHEDULES, PREDICTION_TYPES

Array = jax.Array



def betas(beta_schedule: str, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
          beta_end: float = 0.012) -> np.ndarray:
  """beta_i, i = 0..N-1, float64 numpy (N,), with diffusers' definitions of the three schedules.

  scaled_linear: linspace(sqrt(beta_start), sqrt(beta_end), N)^2 (SD1.5); linear: linspace(beta_start,
  beta_end, N); squaredcos_cap_v2: the GLIDE cosine schedule, beta_i = min(1 - f((i+1)/N) / f(i/N), 0.999),
  f(u) = cos((u + 0.008) / 1.008 * pi / 2)^2.
  """
  n = int(num_train_timesteps)
  if beta_schedule == "scaled_linear":
    return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
  if beta_schedule == "linear":
    return np.linspace(beta_start, beta_end, n, dtype=np.float64)
  if beta_schedule == "squaredcos_cap_v2":
    def f(u: float) -> float:
      return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=np.float64)
  raise ValueError(f"unknown beta_schedule {beta_schedule!r}; allowed: {', '.join(BETA_SCHEDULES)}")


def expand(c: Array, like: Array) -> Array:
  """Per-example coefficients c (t.shape: (B,) or ()) reshaped to broadcast against ``like`` (t.shape + trailing
  dims, e.g. (B, H, W, C)); the one helper of schedules, solvers and consistency."""
  c = jnp.asarray(c)
  return c.reshape(c.shape + (1,) * (like.ndim - c.ndim))


@flax.struct.dataclass
class NoiseSchedule:
  """A discrete VP noise schedule: abar (N,) plus the model's prediction type (static).

  Build with :meth:`from_config` or :func:`sd15`. It is a pytree (abar is a leaf), so it can be passed to
  jitted functions as an argument or closed over as a constant. abar is float32, or float64 when built under
  ``jax.experimental.enable_x64``.
  """

  abar: Array  # (N,) cumulative product of (1 - beta), decreasing from ~1 to ~0
  prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
    """From diffusers-style scheduler fields (dict or ConfigDict, e.g. ``config.schedule``).

    Fields: beta_schedule (scaled_linear | linear | squaredcos_cap_v2), num_train_timesteps, beta_start,
    beta_end, prediction_type (epsilon | v_prediction | sample). Missing fields take the SD1.5 values.
    Raises ValueError naming a bad value.
    """
    get = config.get
    prediction_type = get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")
    n = int(get("num_train_timesteps", 1000))
    if n < 2:
      raise ValueError(f"num_train_timesteps must be >= 2, got {n}")
    b = betas(get("beta_schedule", "scaled_linear"), n, float(get("beta_start", 0.00085)),
              float(get("beta_end", 0.012)))
    abar = np.cumprod(1.0 - b)
    return cls(abar=jnp.asarray(abar, dtype=jnp.asarray(0.0).dtype), prediction_type=prediction_type)

  @property
  def num_train_timesteps(self) -> int:
    return int(self.abar.shape[0])

  # --- coefficients at integer timesteps (any shape); t < 0 is clean data (abar = 1) -------------------

  def abar_at(self, t: Array | int) -> Array:
    """abar_t, same shape as the integer array t; 1 where t < 0."""
    t = jnp.asarray(t)
    gathered = self.abar[jnp.clip(t, 0, self.num_train_timesteps - 1).astype(jnp.int32)]
    return jnp.where(t < 0, jnp.ones_like(gathered), gathered)

  def alpha(self, t: Array | int) -> Array:
    """alpha_t = sqrt(abar_t), shape of t."""
    return jnp.sqrt(self.abar_at(t))

  def sigma(self, t: Array | int) -> Array:
    """sigma_t = sqrt(1 - abar_t), shape of t."""
    return jnp.sqrt(1.0 - self.abar_at(t))

  def lam(self, t: Array | int) -> Array:
    """lambda_t = sigma_t / alpha_t (VE noise level), shape of t; 0 for clean data."""
    abar = self.abar_at(t)
    return jnp.sqrt((1.0 - abar) / abar)

  def alpha_sigma(self, t: Array | int, like: Array) -> tuple[Array, Array]:
    """(alpha_t, sigma_t) reshaped to broadcast against ``like`` (t.shape + trailing dims), in like's dtype."""
    abar = expand(self.abar_at(t), like)
    return jnp.sqrt(abar).astype(like.dtype), jnp.sqrt(1.0 - abar).astype(like.dtype)

  # --- forward process ---------------------------------------------------------------------------------

  def add_noise(self, x0: Array, eps: Array, t: Array | int) -> Array:
    """z_t = alpha_t x0 + sigma_t eps; x0, eps (B, ...), t () or (B,)."""
    a, s = self.alpha_sigma(t, x0)
    return a * x0 + s * eps

  def velocity(self, x0: Array, eps: Array, t: Array | int) -> Array:
    """v = alpha_t eps - sigma_t x0 (the v-prediction target)."""
    a, s = self.alpha_sigma(t, x0)
    return a * eps - s * x0

  def target(self, x0: Array, eps: Array, t: Array | int) -> Array:
    """The regression target of a model in this schedule's prediction type (eps, v or x0)."""
    return self.from_x0_eps(x0, eps, t)

  # --- conversions between predictions -----------------------------------------------------------------

  def to_x0(self, model_out: Array, z: Array, t: Array | int) -> Array:
    """x0 prediction from a model output (prediction_type) at (z, t). z (B, ...), t () or (B,)."""
    a, s = self.alpha_sigma(t, z)
    if self.prediction_type == "epsilon":
      return (z - s * model_out) / a
    if self.prediction_type == "v_prediction":
      return a * z - s * model_out
    return model_out

  def to_eps(self, model_out: Array, z: Array, t: Array | int) -> Array:
    """eps prediction from a model output (prediction_type) at (z, t). Needs sigma_t > 0 for "sample"."""
    a, s = self.alpha_sigma(t, z)
    if self.prediction_type == "epsilon":
      return model_out
    if self.prediction_type == "v_prediction":
      return a * model_out + s * z
    return (z - a * model_out) / s

  def to_v(self, model_out: Array, z: Array, t: Array | int) -> Array:
    """v prediction (alpha eps - sigma x0) from a model output (prediction_type) at (z, t)."""
    if self.prediction_type == "v_prediction":
      return model_out
    a, s = self.alpha_sigma(t, z)
    return a * self.to_eps(model_out, z, t) - s * self.to_x0(model_out, z, t)

  def from_x0_eps(self, x0: Array, eps: Array, t: Array | int) -> Array:
    """The model output (prediction_type) whose x0 and eps predictions are (x0, eps)."""
    if self.prediction_type == "epsilon":
      return eps
    if self.prediction_type == "v_prediction":
      return self.velocity(x0, eps, t)
    return x0

  def from_eps(self, eps: Array, z: Array, t: Array | int) -> Array:
    """The model output (prediction_type) equivalent to the eps prediction ``eps`` at (z, t)."""
    a, s = self.alpha_sigma(t, z)
    return self.from_x0_eps((z - s * eps) / a, eps, t)

  def x0_eps(self, model_out: Array, z: Array, t: Array | int) -> tuple[Array, Array]:
    """(x0, eps) predictions from a model output (prediction_type)."""
    return self.to_x0(model_out, z, t), self.to_eps(model_out, z, t)


def sd15(prediction_type: str = "epsilon") -> NoiseSchedule:
  """Stable Diffusion 1.5's schedule: scaled_linear, beta 0.00085..0.012, 1000 steps."""
  return NoiseSchedule.from_config(dict(beta_schedule="scaled_linear", num_train_timesteps=1000,
                                        beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type))
