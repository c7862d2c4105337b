"""Precision, recall, density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
Generative Models"), k-nearest-neighbour manifolds on feature vectors (Inception pool_3 features here), in JAX.

For real features R (N, D), fake features F (M, D) and k (5 in the paper and in SCott's tables):
  r_i = distance from R_i to its k-th nearest neighbour in R (itself excluded), likewise s_j in F;
  precision = mean_j [exists i: |R_i - F_j| < r_i]      recall   = mean_i [exists j: |R_i - F_j| < s_j]
  density   = mean_j sum_i [|R_i - F_j| < r_i] / k       coverage = mean_i [min_j |R_i - F_j| < r_i]
(the definitions of the reference `prdc` package). Distances are Euclidean, computed blockwise over rows of the
first argument so that N x M matrices never need to fit in memory; arithmetic in the features' dtype (float32
unless jax_enable_x64) with the matmul at HIGHEST precision.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

NEAREST_K = 5


def pairwise_distances(x: Array, y: Array) -> Array:
  """Euclidean distances (N, M) between rows of x (N, D) and y (M, D), via |x|^2 + |y|^2 - 2 x.y clipped at 0."""
  xy = jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.sum(x * x, axis=-1)[:, None] + jnp.sum(y * y, axis=-1)[None, :] - 2.0 * xy
  return jnp.sqrt(jnp.maximum(sq, 0.0))


@partial(jax.jit, static_argnames="k")
def _kth_smallest(x_block: Array, y: Array, k: int) -> Array:
  """The (k + 1)-th smallest distance from each row of x_block to the rows of y (the k-th neighbour when x is
  part of y, its own zero distance being the smallest)."""
  neg, _ = jax.lax.top_k(-pairwise_distances(x_block, y), k + 1)
  return -neg[:, -1]


def _blocks(n: int, block_size: int):
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}")
  return [slice(s, min(s + block_size, n)) for s in range(0, n, block_size)]


def nearest_neighbour_radii(features: Array, k: int = NEAREST_K, block_size: int = 2048) -> Array:
  """features (N, D) -> (N,) distance of each point to its k-th nearest other point (N > k required)."""
  features = jnp.asarray(features)
  n = features.shape[0]
  if features.ndim != 2 or n <= k:
    raise ValueError(f"need features (N > k = {k}, D), got shape {features.shape}")
  return jnp.concatenate([_kth_smallest(features[b], features, k) for b in _blocks(n, block_size)])


@jax.jit
def _real_block_stats(
  real_block: Array, real_radii_block: Array, fake: Array, fake_radii: Array
) -> tuple[Array, Array, Array]:
  """For a block of real points: (covered (B,), recalled (B,), per-fake count of real balls containing it (M,))."""
  d = pairwise_distances(real_block, fake)  # (B, M)
  inside_real = d < real_radii_block[:, None]
  covered = jnp.min(d, axis=1) < real_radii_block
  recalled = jnp.any(d < fake_radii[None, :], axis=1)
  return covered, recalled, jnp.sum(inside_real, axis=0, dtype=jnp.int32)


def prdc(
  real_features: Array, fake_features: Array, k: int = NEAREST_K, block_size: int = 2048
) -> dict[str, float]:
  """Precision, recall, density and coverage of fake_features (M, D) against real_features (N, D).

  Returns a dict of Python floats {"precision", "recall", "density", "coverage"}; all in [0, 1] except
  density (>= 0, about 1 when the two sets come from the same distribution).
  """
  real, fake = jnp.asarray(real_features), jnp.asarray(fake_features)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"expected (N, D) and (M, D) features, got {real.shape} and {fake.shape}")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  real_radii = nearest_neighbour_radii(real, k, block_size)
  fake_radii = nearest_neighbour_radii(fake, k, block_size)
  covered, recalled, counts = [], [], jnp.zeros((fake.shape[0],), jnp.int32)
  for b in _blocks(real.shape[0], block_size):
    c, r, n = _real_block_stats(real[b], real_radii[b], fake, fake_radii)
    covered.append(c)
    recalled.append(r)
    counts = counts + n
  counts = np.asarray(counts, dtype=np.int64)
  return {
    "precision": float(np.mean(counts > 0)),
    "recall": float(np.mean(np.asarray(jnp.concatenate(recalled)))),
    "density": float(np.mean(counts) / k),
    "coverage": float(np.mean(np.asarray(jnp.concatenate(covered)))),
  }


def coverage(real_features: Array, fake_features: Array, k: int = NEAREST_K, block_size: int = 2048) -> float:
  """Coverage (Naeem et al. 2020): the fraction of real points whose k-NN ball holds at least one fake point."""
  return prdc(real_features, fake_features, k, block_size)["coverage"]
