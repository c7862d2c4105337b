"""Statistics of the evidence report (scott_jax.digits.evidence_report): the batched FID against the project's
FID (scipy sqrtm, an independent formula), the paired bootstrap against controls (identical arms, a shifted
arm, a pairing that matters), and the verdict rule."""

import numpy as np
import pytest

from scott_jax.digits import evidence_report as er
from scott_jax.metrics import fid


def _reference(rng, n=3000, f=8):
  x = rng.standard_normal((n, f)) @ rng.standard_normal((f, f)) * 0.5
  return fid.stats(x)


def test_fid_many_equals_the_sqrtm_fid():
  rng = np.random.default_rng(0)
  mu_r, sigma_r = _reference(rng)
  sets = rng.standard_normal((4, 500, 8)) * np.array([0.5, 1.0, 1.5, 2.0])[:, None, None] + 0.3
  got = er.fid_many(sets, mu_r, sigma_r)
  want = [fid.frechet_distance(*fid.stats(s), mu_r, sigma_r) for s in sets]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_resampled_fid_equals_the_fid_of_the_gathered_sets():
  """The bootstrap's GEMM form (counts against per-image outer products) against fid_many on the resampled sets
  built by indexing (the draws behind `resample_counts`)."""
  rng = np.random.default_rng(2)
  mu_r, sigma_r = _reference(rng)
  feats = rng.standard_normal((300, 8)) * 1.3 + 0.7
  counts = er.resample_counts(5, 300, 3)
  samples = np.random.default_rng(3).integers(0, 300, (5, 300))
  assert np.array_equal(counts, np.stack([np.bincount(row, minlength=300) for row in samples]))
  np.testing.assert_allclose(er.fid_resampled(feats, counts, mu_r, sigma_r), er.fid_many(feats[samples], mu_r, sigma_r),
                             rtol=1e-9, atol=1e-9)


def _arm(rng, shift, seeds=4, n=400, f=8, acc=0.8):
  return [{"features": rng.standard_normal((n, f)) + shift, "prompt_metric": (rng.random(n) < acc).astype(float)}
          for _ in range(seeds)]


def test_bootstrap_controls():
  rng = np.random.default_rng(1)
  mu_r, sigma_r = _reference(rng)
  a = _arm(rng, 0.0)
  same = er.paired_bootstrap(a, a, mu_r, sigma_r, 200)
  assert same["fid"] == (0.0, 0.0, 0.0) and same["accuracy"] == (0.0, 0.0, 0.0)
  assert er.judge(same["fid"], True) == "not resolved"
  # A is B moved away from the data: A's FID is larger, beyond the interval; accuracy equal in distribution.
  b = _arm(rng, 0.0)
  far = [dict(x, features=x["features"] + 0.5) for x in b]
  res = er.paired_bootstrap(far, b, mu_r, sigma_r, 200)
  assert res["fid"][1] > 0 and er.judge(res["fid"], True) == "reversed"
  assert er.judge(er.paired_bootstrap(b, far, mu_r, sigma_r, 200)["fid"], True) == "reproduced"
  # Two independent draws of one arm: the interval contains 0 (in most draws; fixed seeds here).
  assert er.judge(er.paired_bootstrap(_arm(rng, 0.0), b, mu_r, sigma_r, 200)["fid"], True) == "not resolved"
  # Pairing: per-image hits shared by both arms except 2% flipped -> a tight interval around the 2% difference.
  hits = (rng.random(2000) < 0.5).astype(float)
  flip = hits.copy()
  flip[:40] = 1.0 - flip[:40]
  feats = rng.standard_normal((2000, 8))
  res = er.paired_bootstrap([{"features": feats, "prompt_metric": hits}],
                            [{"features": feats, "prompt_metric": flip}], mu_r, sigma_r, 300)
  lo, hi = res["accuracy"][1:]
  assert hi - lo < 0.03 and lo <= res["accuracy"][0] <= hi
  with pytest.raises(ValueError, match="same number of seeds"):
    er.paired_bootstrap(a, a[:2], mu_r, sigma_r, 10)


def test_judge():
  assert er.judge((-2.0, -3.0, -1.0), True) == "reproduced"
  assert er.judge((2.0, 1.0, 3.0), True) == "reversed"
  assert er.judge((0.01, 0.005, 0.02), False) == "reproduced"
  assert er.judge((0.0, -1.0, 1.0), False) == "not resolved"


def test_verdict_summary_counts_each_claims_rows():
  comps = [{"claim": "X", "verdict_fid": "reproduced", "verdict_accuracy": "not resolved"},
           {"claim": "X", "verdict_fid": "reversed", "verdict_accuracy": "not resolved"},
           {"claim": "Y", "verdict_fid": "reversed", "verdict_accuracy": "reproduced"}]
  lines = er.verdict_summary(comps)
  assert "| X | 2 | 1 / 1 / 0 | 0 / 0 / 2 |" in lines and "| Y | 1 | 0 / 1 / 0 | 1 / 0 / 0 |" in lines
  assert er.verdict_summary([]) == []
