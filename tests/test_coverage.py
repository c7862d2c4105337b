"""Precision / recall / density / coverage against the reference `prdc` package (Naeem et al. 2020)."""

import contextlib
import io

import numpy as np
import pytest

from scott_jax.metrics import coverage

prdc_ref = pytest.importorskip("prdc")


def _reference(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
  with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints the set sizes
    return {name: float(v) for name, v in prdc_ref.compute_prdc(real, fake, nearest_k=k).items()}


def _clusters(rng: np.random.Generator, n: int, centres: np.ndarray, scale: float) -> np.ndarray:
  labels = rng.integers(0, len(centres), n)
  return (centres[labels] + scale * rng.normal(size=(n, centres.shape[1]))).astype(np.float32)


@pytest.mark.parametrize(
  "case, block_size",
  [("same", 2048), ("shifted", 64), ("mode_dropped", 100), ("spread", 37)],
)
def test_prdc_matches_reference(case: str, block_size: int):
  rng = np.random.default_rng(["same", "shifted", "mode_dropped", "spread"].index(case))
  d = 32
  centres = 4.0 * rng.normal(size=(6, d))
  real = _clusters(rng, 300, centres, 1.0)
  if case == "same":
    fake = _clusters(rng, 250, centres, 1.0)
  elif case == "shifted":
    fake = _clusters(rng, 250, centres, 1.0) + 0.7
  elif case == "mode_dropped":
    fake = _clusters(rng, 250, centres[:3], 0.8)
  else:
    fake = _clusters(rng, 250, centres, 1.6)
  ours = coverage.prdc(real, fake, k=5, block_size=block_size)
  ref = _reference(real, fake, 5)
  assert ours == pytest.approx(ref, abs=1e-12), (ours, ref)
  assert coverage.coverage(real, fake) == pytest.approx(ref["coverage"], abs=1e-12)


def test_cases_are_distinguished():
  """The metrics move the way the paper describes: dropping modes lowers recall and coverage."""
  rng = np.random.default_rng(7)
  centres = 4.0 * rng.normal(size=(6, 32))
  real = _clusters(rng, 300, centres, 1.0)
  full = coverage.prdc(real, _clusters(rng, 300, centres, 1.0))
  dropped = coverage.prdc(real, _clusters(rng, 300, centres[:2], 1.0))
  assert dropped["coverage"] < 0.6 * full["coverage"] and dropped["recall"] < 0.6 * full["recall"]


def test_identical_sets_and_radii():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(40, 8)).astype(np.float32)
  out = coverage.prdc(x, x, k=3)
  assert out["precision"] == out["recall"] == out["coverage"] == 1.0
  # Radii: the k-th nearest other point, by brute force in float64.
  d = np.linalg.norm(x[:, None].astype(np.float64) - x[None].astype(np.float64), axis=-1)
  expected = np.sort(d, axis=1)[:, 3]
  np.testing.assert_allclose(
    np.asarray(coverage.nearest_neighbour_radii(x, k=3, block_size=7)), expected, rtol=1e-5
  )
  with pytest.raises(ValueError, match="N > k"):
    coverage.nearest_neighbour_radii(x[:3], k=3)
