"""CLI behaviour through a real subprocess: bad input exits 2 with one line naming key, value and what is allowed."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "scott_jax.main", *args], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=timeout)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config.solver.etaa=0.2"], ["solver.etaa", "eta", "noise_fn"]),
        (["--config.nosection.x=1"], ["nosection", "solver"]),
        (["--config.solver.eta=2.5"], ["solver.eta", "2.5", "[0, 1]"]),
        (["--config.solver.name=rk4"], ["solver.name", "rk4", "er_sde", "ddim"]),
        (["--config.solver.order=5"], ["solver.order", "5", "1, 2, 3"]),
        (["--config.solver.eta=abc"], ["solver.eta", "abc"]),
        (["--mode", "dance"], ["dance", "sample_teacher"]),
        (["--no_such_flag=1"], ["no_such_flag"]),
    ],
)
def test_bad_input_exits_2_with_one_line(args, expected):
  r = _run("--config", "configs/solver_demo.py", "--workdir", "/tmp/unused", *args)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr
  assert "Traceback" not in r.stderr
  for word in expected:
    assert word in lines[0], (word, lines[0])


def test_mesh_that_does_not_fit_the_devices_exits_2_with_one_line(tmp_path):
  """A config error only the run can find (3 data-parallel devices on a 1-device CPU): --mode train stops
  before loading anything, with one line naming the mesh and both device counts."""
  r = _run("--config", "configs/tiny_scott.py", "--workdir", str(tmp_path / "run"), "--mode", "train",
           "--config.mesh.data=3", "--config.model.teacher_path=/nonexistent")
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  for word in ("config.mesh", "data=3", "3 devices", "1 are present"):
    assert word in lines[0], (word, lines[0])
  assert not (tmp_path / "run").exists()  # nothing written


def test_missing_config_file_and_bad_config_arg():
  r = _run("--config", "configs/does_not_exist.py")
  assert r.returncode == 2 and "configs/does_not_exist.py" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
  r = _run("--config", "configs/solver_demo.py:nonsense")
  assert r.returncode == 2 and "nonsense" in r.stderr and "er_sde" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1


def test_sample_teacher_mode_end_to_end(tmp_path):
  r = _run("--config", "configs/solver_demo.py", "--workdir", str(tmp_path),
           "--config.sample_teacher.num_samples=4000")
  assert r.returncode == 0, r.stderr[-2000:]
  out = r.stdout
  assert "solver=er_sde" in out and "mean:" in out and "std:" in out
  mean = float(out.split("mean:")[1].split()[0])
  std = float(out.split("std:")[1].split()[0])
  assert abs(mean - 0.5) < 0.03 and abs(std - 0.3) < 0.03


def test_help_lists_the_modes_and_flags_and_exits_0():
  """`--help` prints the command line, every registered mode and the flags, without importing a mode."""
  from scott_jax import modes

  proc = _run("--help")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("usage: python -m scott_jax.main --config")
  for mode in modes.MODES:
    assert mode in proc.stdout
  assert "--workdir" in proc.stdout and "--config" in proc.stdout
