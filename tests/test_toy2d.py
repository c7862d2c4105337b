"""toy2d: metrics against closed forms, and the CLI run producing the report and plot."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from scott_jax import toy2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sliced_wasserstein_of_a_translation():
  # For a translation by v in 2-D, SW1 = E_theta |v . theta| = |v| * 2 / pi over uniform directions.
  x = np.random.default_rng(0).standard_normal((2000, 2))
  v = np.array([0.3, -0.4])
  assert toy2d.sliced_wasserstein(x, x) == 0.0
  np.testing.assert_allclose(toy2d.sliced_wasserstein(x, x + v, num_projections=4096), 0.5 * 2 / np.pi, rtol=0.03)


def test_mmd_and_mode_stats_on_true_samples():
  mix = toy2d.ring_mixture(8, 1.0, 0.05, (1, 0.25) * 4)
  a = np.asarray(mix.sample(jax.random.key(0), 4000))
  b = np.asarray(mix.sample(jax.random.key(1), 4000))
  assert abs(toy2d.mmd_rbf(a, b)) < 2e-3
  stats = toy2d.mode_stats(a, mix)
  assert stats["coverage"] == 1.0 and stats["quality"] > 0.98 and stats["mode_tv"] < 0.03
  # Samples on half of the modes only: coverage 1/2, and MMD far from 0.
  half = a[np.arctan2(a[:, 1], a[:, 0]) >= -0.1]
  half_stats = toy2d.mode_stats(half, mix)
  assert half_stats["coverage"] == 0.625 or half_stats["coverage"] == 0.5
  assert toy2d.mmd_rbf(half[:1000], b[:1000]) > 20 * abs(toy2d.mmd_rbf(a[:1000], b[:1000]))


def test_cli_quick_run_writes_report_and_plot(tmp_path):
  workdir = tmp_path / "toy"
  r = subprocess.run([sys.executable, "-m", "scott_jax.main", "--config", "configs/toy2d.py:quick",
                      "--workdir", str(workdir)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  report = (workdir / "report.md").read_text()
  assert "SCOTT, 4 steps" in report and "LCM, 1 step" in report
  assert (workdir / "samples.png").stat().st_size > 10_000
  rows = json.loads((workdir / "results.json").read_text())
  teacher = rows["exact teacher, DDIM 50"][0]
  assert teacher["coverage"] == 1.0 and teacher["swd"] < 0.06
  for label, runs in rows.items():
    for metrics in runs:
      assert all(np.isfinite(v) for v in metrics.values()), label
