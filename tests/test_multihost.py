"""Multi-process training: 2 local processes x 2 fake CPU devices (jax.distributed over loopback, gloo CPU
collectives, started by `scott_jax.parallel.initialize_distributed` from $JAX_COORDINATOR_ADDRESS,
$JAX_NUM_PROCESSES and $JAX_PROCESS_ID) train the tiny config 3 steps on a (data 2, fsdp 2) mesh, each process
feeding its half of every batch (`make_global_batch`), and end with the parameters of 1 process x 4 devices on
the same mesh. The GAN is off here (``teacher=lcm,gan=off``: a smaller program to compile; the sharded GAN step
is covered by tests/test_parallel.py). Tolerances as there (the all-reduces run through gloo instead of
in-process, so the summation order may differ)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ARG = "teacher=lcm,gan=off"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("_test_parallel", os.path.join(ROOT, "tests", "test_parallel.py"))
tp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tp)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The two processes of the distributed run and the 1-process reference, all started together."""
  root = tmp_path_factory.mktemp("multihost")
  folder = tp._load(tp.CONFIG).write_tiny_pipeline(str(root / "tiny_sd"))
  worker = os.path.join(ROOT, "tests", "test_parallel.py")
  port = _free_port()
  dirs = {"multi": root / "multi", "single": root / "single"}
  for d in dirs.values():
    d.mkdir()
  jobs = {}
  for pid in range(2):
    env = tp.worker_env(2, root / f"cache{pid}")
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
    jobs[f"proc{pid}"] = (dirs["multi"], env)
  jobs["single"] = (dirs["single"], tp.worker_env(4, root / "cache_single"))
  procs, logs = {}, {}
  try:
    for name, (out, env) in jobs.items():
      logs[name] = open(root / f"{name}.log", "w")
      procs[name] = subprocess.Popen([sys.executable, worker, "run", str(out), folder, "2", "2", ARG], cwd=ROOT,
                                     env=env, stdout=logs[name], stderr=subprocess.STDOUT)
    for p in procs.values():
      p.wait(timeout=900)
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()
    for fh in logs.values():
      fh.close()
  for name, p in procs.items():
    assert p.returncode == 0, open(root / f"{name}.log").read()[-4000:]
  out = {}
  for name, d in dirs.items():
    with open(d / "results.json") as fh:
      out[name] = json.load(fh)
    out[name]["params"] = np.load(d / "params.npz")
  return out


def test_two_processes_match_one_process(runs):
  multi, single = runs["multi"], runs["single"]
  assert (multi["process_count"], multi["local_devices"]) == (2, 2)
  assert (single["process_count"], single["local_devices"]) == (1, 4)
  assert multi["mesh"] == single["mesh"] == [2, 2, 1]
  tp.assert_metrics_close(single["metrics"], multi["metrics"])
  # Same final parameters (student, EMA, discriminator) and optimizer state.
  a, b = single["params"], multi["params"]
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=2e-6, err_msg=k)
  assert int(a["step"]) == int(b["step"]) == tp.NUM_STEPS
  # The 2-process run's state really spans both processes: fsdp-sharded leaves exist.
  assert multi["sharding"]["student"]["sharded"] > 0
