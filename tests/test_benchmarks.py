"""benchmarks/train_step.py's FLOP counting: loop bodies count once per iteration (closed form of a matmul)."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import train_step  # noqa: E402

M, K, STEPS = 16, 64, 5


def _scanned(x, w):
  def body(c, _):
    return jnp.tanh(c @ w), None

  return jax.lax.scan(body, x, None, length=STEPS)[0]


def test_scan_counted_once_per_iteration_when_unrolled():
  """XLA's cost analysis counts a scan body once; under `unrolled_scans` it counts STEPS x 2 M K K (the
  matmul's closed form), and the compiled program has no loop with a matmul left."""
  original = jax.lax.scan
  x, w = jax.ShapeDtypeStruct((M, K), jnp.float32), jax.ShapeDtypeStruct((K, K), jnp.float32)
  one = 2 * M * K * K
  rolled, rolled_loops = train_step.count_flops(_scanned, x, w, unroll=False)
  unrolled, loops = train_step.count_flops(_scanned, x, w)
  lowered, _ = train_step.count_flops(_scanned, x, w, compiled=False)
  assert rolled_loops == 1 and loops == 0
  assert one <= rolled < 1.1 * one  # the body once (plus the loop counter)
  assert STEPS * one <= unrolled < 1.01 * STEPS * one
  assert STEPS * one <= lowered < 1.01 * STEPS * one
  assert jax.lax.scan is original  # the patch is undone
