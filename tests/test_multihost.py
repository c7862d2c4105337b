"""Multi-process training: 2 local processes x 2 fake CPU devices (jax.distributed over loopback, gloo CPU
collectives, started by `scott_jax.parallel.initialize_distributed` from $JAX_COORDINATOR_ADDRESS,
$JAX_NUM_PROCESSES and $JAX_PROCESS_ID) run ``python -m scott_jax.main --mode train`` on the tiny config for 3
steps on a (data 2, fsdp 2) mesh, each process feeding its half of every batch, and end with the parameters of
1 process x 4 devices on the same mesh (tests/test_parallel.py's worker, an explicit loop). The GAN is off here
(``teacher=lcm,gan=off``: a smaller program to compile; the sharded GAN step is covered by
tests/test_parallel.py). Tolerances as there (the all-reduces run through gloo instead of in-process, so the
summation order may differ)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
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
  from scott_jax.testing.tiny_sd import write_tiny_pipeline

  folder = write_tiny_pipeline(str(root / "tiny_sd"))
  worker = os.path.join(ROOT, "tests", "test_parallel.py")
  port = _free_port()
  dirs = {"multi": root / "multi", "single": root / "single"}
  for d in dirs.values():
    d.mkdir()
  jobs = {}
  for pid in range(2):
    env = tp.worker_env(2, root / f"cache{pid}")
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    jobs[f"proc{pid}"] = (tp._train_cmd(folder, dirs["multi"]), env)  # both write the one checkpoint directory
  jobs["single"] = ([sys.executable, worker, "run", str(dirs["single"]), folder, "2", "2", ARG],
                    tp.worker_env(4, root / "cache_single"))
  procs, logs = {}, {}
  try:
    for name, (cmd, env) in jobs.items():
      logs[name] = open(root / f"{name}.log", "w")
      procs[name] = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=logs[name],
                                     stderr=subprocess.STDOUT)
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
  with open(dirs["single"] / "results.json") as fh:
    single = json.load(fh)
  single["params"] = np.load(dirs["single"] / "params.npz")
  return {"single": single, "multi_dir": dirs["multi"], "folder": folder,
          "logs": {name: open(root / f"{name}.log").read() for name in ("proc0", "proc1")}}


def test_two_processes_match_one_process(runs):
  """The 2-process `--mode train` run equals the 1-process run: every logged metric (the same on both) and the
  final checkpoint's student, EMA and optimizer state; the checkpoint keeps both processes' data states; the
  state spans both processes (each device holds about half of it)."""
  from scott_jax import checkpoint as ckpt_lib
  from scott_jax import step as step_lib
  from scott_jax import student as student_lib
  from scott_jax.data import batches as batches_lib

  single, logs = runs["single"], runs["logs"]
  assert (single["process_count"], single["local_devices"]) == (1, 4) and single["mesh"] == [2, 2, 1]
  assert "Mesh {'data': 2, 'fsdp': 2, 'tensor': 1} on 4 devices, 2 process(es)" in logs["proc0"]
  assert "batch 8, 4 per process" in logs["proc1"]
  tp.assert_metrics_close(single["metrics"], tp._logged_metrics(logs["proc0"]))
  assert tp._logged_metrics(logs["proc1"]) == tp._logged_metrics(logs["proc0"])  # replicated metrics
  config = tp.tiny_config(runs["folder"], data=2, fsdp=2)
  models, frozen = student_lib.load_models(config)
  spec = batches_lib.global_batch_spec(batches_lib.prepare_batch(batches_lib.make_source(config).batch(0), models))
  abstract = step_lib.abstract_state(config, models, frozen, spec)
  with ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(runs["multi_dir"]), max_to_keep=None) as ckpt:
    state, data_state = ckpt.restore(tp.NUM_STEPS, abstract)
  one = {"step": tp.NUM_STEPS, "seed": config.seed, "num_examples": 8, "batch_size": tp.BATCH}
  assert data_state == {"processes": [one, one]}
  a, b = single["params"], tp._flat(state)
  assert sorted(a.files) == sorted(b)
  for k in a.files:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=2e-6, err_msg=k)
  assert int(a["step"]) == int(b["step"]) == tp.NUM_STEPS
  local, total = (int(x) for x in re.search(r"train state bytes per device (\d+) of (\d+)", logs["proc0"]).groups())
  assert total / 2 <= local < 0.6 * total
