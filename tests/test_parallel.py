"""Sharded train step (scott_jax.parallel): mesh arithmetic and sharding rules in process, and, in a subprocess
with 8 fake CPU devices, the tiny SCott step (LCM teacher, GAN off; with the GAN in a slow test) on meshes
(data x fsdp) (8,1), (2,4), (1,8) against the 1-device step, checkpoint resharding from 8 to 2 devices, and
``--mode plan``.

The 8-device runs need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is imported, so they run
in a subprocess: this file doubles as the worker (``python tests/test_parallel.py meshes OUT FOLDER``; also
``run`` for tests/test_multihost.py). The worker compiles at XLA backend optimisation level 0 (faster compiles;
the same flag for every run compared) and shares a persistent compilation cache with the plan subprocess.

Tolerances: the sharded programs reduce in a different order (gradient all-reduces, sharded norms), so results
agree to float32 round-off, not bit for bit. Metrics (losses, gradient norms) of each of the 3 steps: relative
1e-4. Parameters: the summed update of the 3 steps (final - initial) over all student / EMA / discriminator
leaves agrees to 2e-4 of its norm, and elementwise to 2e-6 + 2e-3 |update| (an update is O(lr) = 1e-4 per
step, so that bound is far below one step's change; the observed differences are ~2e-5 of the norm).

Compile time dominates, so the 8-device runs are split over two worker processes started together (both CPU
cores busy), and the plan subprocess starts alongside them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from scott_jax.testing import fast_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_scott.py")
CONFIG_ARG = "teacher=lcm,gan=off"  # one teacher sub-step, no GAN: the smallest program (compiles dominate)
GAN_ARG = "teacher=lcm"  # the slow test: the same with the LoRA discriminator (its state sharded too)
BATCH = 8
NUM_STEPS = 3
MIN_SIZE = 256  # fsdp_min_size for the tiny model, so that its kernels do get sharded
METRIC_RTOL = 1e-4
UPDATE_RTOL = 2e-4
UPDATE_ATOL = 2e-6


def tiny_config(folder, data=1, fsdp=1, arg=CONFIG_ARG):
  from scott_jax import config as config_lib
  from scott_jax import config_files

  c = config_files.load(CONFIG).get_config(arg)
  c.model.teacher_path = str(folder)
  c.train.batch_size = BATCH
  c.mesh.update(dict(data=data, fsdp=fsdp, tensor=1, fsdp_min_size=MIN_SIZE))
  return config_lib.validate(c)


def worker_env(num_devices, cache_dir):
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} {fast_compile.XLA_FLAGS}",
              JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def run_worker(args, env, log, timeout=900):
  with open(log, "w") as fh:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, args)], cwd=ROOT, env=env,
                          stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
  text = open(log).read()
  assert proc.returncode == 0, text[-4000:]
  return text


def trainables(npz):
  """The student / EMA / discriminator leaves of a flat {path: array} (an .npz file or a dict)."""
  return {k: npz[k] for k in getattr(npz, "files", npz) if k.split("/")[0] in ("student", "ema", "disc")}


def assert_updates_close(initial, ref, other, rtol=UPDATE_RTOL, atol=UPDATE_ATOL):
  """The updates (final - initial) of ``other`` equal ``ref``'s: globally to ``rtol`` of the norm and per
  element to ``atol + rtol |update|``."""
  keys = sorted(trainables(ref))
  assert keys and keys == sorted(trainables(other))
  du_ref = np.concatenate([(ref[k] - initial[k]).ravel() for k in keys])
  du = np.concatenate([(other[k] - initial[k]).ravel() for k in keys])
  assert np.linalg.norm(du_ref) > 0
  assert np.linalg.norm(du - du_ref) <= rtol * np.linalg.norm(du_ref), np.linalg.norm(du - du_ref)
  np.testing.assert_allclose(du, du_ref, rtol=10 * rtol, atol=atol)


def assert_metrics_close(ref, other, rtol=METRIC_RTOL):
  assert len(ref) == len(other) == NUM_STEPS
  for a, b in zip(ref, other, strict=True):
    assert a.keys() == b.keys()
    for k in a:
      assert abs(a[k] - b[k]) <= rtol * max(abs(a[k]), 1e-3), (k, a[k], b[k])


# ---------------------------------------------------------------------------------------------------------
# In-process tests (1 device): the arithmetic of meshes and rules.

def _mesh_cfg(**kw):
  from scott_jax import config as config_lib

  c = config_lib.defaults().mesh
  c.update(kw)
  return c


def test_mesh_shape_fills_and_rejects():
  from scott_jax import parallel

  assert parallel.mesh_shape(_mesh_cfg(data=-1, fsdp=4, tensor=1), 8) == (2, 4, 1)
  assert parallel.mesh_shape(_mesh_cfg(data=2, fsdp=1, tensor=-1), 8) == (2, 1, 4)
  assert parallel.mesh_shape(_mesh_cfg(data=2, fsdp=2, tensor=2), 8) == (2, 2, 2)
  with pytest.raises(parallel.MeshError, match="has 6 devices but 8 are present"):
    parallel.mesh_shape(_mesh_cfg(data=3, fsdp=2, tensor=1), 8)
  with pytest.raises(parallel.MeshError, match="product 3 does not divide the 8 devices"):
    parallel.mesh_shape(_mesh_cfg(data=-1, fsdp=3, tensor=1), 8)
  with pytest.raises(parallel.MeshError, match="more than one axis set to -1"):
    parallel.mesh_shape(_mesh_cfg(data=-1, fsdp=-1, tensor=1), 8)
  mesh = parallel.make_mesh(_mesh_cfg(data=-1, fsdp=1, tensor=1))
  assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (1, 1, 1)


def test_partition_rule_picks_largest_divisible_dim():
  """Against hand-worked cases on an abstract (data 2, fsdp 4, tensor 2) mesh."""
  from jax.sharding import AbstractMesh
  from jax.sharding import PartitionSpec as P

  from scott_jax import parallel

  mesh = AbstractMesh((2, 4, 2), ("data", "fsdp", "tensor"))
  rules = parallel.logical_rules(_mesh_cfg())
  spec = lambda shape, min_size=1: parallel.param_partition_spec(shape, mesh, rules, min_size)  # noqa: E731
  assert spec((3, 3, 320, 640)) == P(None, None, "fsdp", "tensor")  # conv kernel: Cout over tensor, Cin over fsdp
  assert spec((768, 320)) == P("fsdp", "tensor")
  assert spec((1280,)) == P("fsdp")  # 1-D: fsdp only
  assert spec((6, 10)) == P(None, "tensor")  # no dim divisible by 4 left
  assert spec((8, 7)) == P("fsdp", None)  # 7 not divisible by tensor 2
  assert spec((320, 640), min_size=320 * 640 + 1) == P(None, None)  # below fsdp_min_size: replicated
  assert spec(()) == P()
  zero3 = parallel.logical_rules(_mesh_cfg(rules=(("batch", "data,fsdp"), ("param_fsdp", "data,fsdp"))))
  assert parallel.param_partition_spec((64, 3), mesh, zero3, 1) == P(("data", "fsdp"), None)
  assert zero3["param_tensor"] == ()


def test_state_frozen_and_batch_shardings_on_an_abstract_mesh():
  """Whole-tree shardings on an abstract (2, 4, 1) mesh: state leaves by the rule except step and key (whose
  (4,) shape the rule would split), Adam moments like their parameters, frozen models by the rule or
  replicated as configured, batches over (data, fsdp) with a clear error when the batch does not divide."""
  import jax
  from jax.sharding import AbstractMesh
  from jax.sharding import PartitionSpec as P

  from scott_jax import parallel
  from scott_jax.train import TrainState

  mesh = AbstractMesh((2, 4, 1), ("data", "fsdp", "tensor"))
  sds = lambda *shape, dt=np.float32: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
  params = {"w": sds(8, 32), "b": sds(3)}
  state = TrainState(step=sds(dt=np.int32), student=params, ema=params, disc={}, opt_student=(params, {}),
                     opt_disc={}, key=sds(4, dt=np.uint32))
  cfg = _mesh_cfg(fsdp_min_size=1)
  sh = parallel.state_shardings(state, mesh, cfg)
  assert sh.step.spec == P() and sh.key.spec == P()
  for tree in (sh.student, sh.ema, sh.opt_student[0]):
    assert tree["w"].spec == P(None, "fsdp") and tree["b"].spec == P(None)
  assert parallel.frozen_shardings(params, mesh, _mesh_cfg(fsdp_min_size=16))["w"].spec == P(None, "fsdp")
  assert parallel.frozen_shardings(params, mesh, _mesh_cfg(frozen="replicate"))["w"].spec == P()
  assert parallel.batch_shardings({"x": sds(8, 3)}, mesh, cfg)["x"].spec == P(("data", "fsdp"), None)
  with pytest.raises(parallel.MeshError, match=r"batch size 6, not divisible by the 8 devices"):
    parallel.batch_shardings({"x": sds(6, 3)}, mesh, cfg)


def test_batch_sharding_and_errors():
  import jax
  from jax.sharding import PartitionSpec as P

  from scott_jax import config as config_lib
  from scott_jax import parallel

  mesh = parallel.make_mesh(_mesh_cfg())
  sh = parallel.batch_shardings({"images": jax.ShapeDtypeStruct((8, 4, 4, 3), np.float32)}, mesh, _mesh_cfg())
  assert sh["images"].spec == P(None, None, None, None)  # axes of size 1 are dropped
  bad = _mesh_cfg(rules=(("batch", "data,nope"),))
  with pytest.raises(config_lib.ConfigError, match="mesh.rules"):
    config_lib.validate(config_lib.ConfigDict({**config_lib.defaults().to_dict(), "mesh": bad.to_dict()}))
  with pytest.raises(parallel.MeshError, match="unknown mesh axes"):
    parallel.logical_rules(bad)


def test_distributed_spec_from_environment():
  from scott_jax import parallel

  cfg = _mesh_cfg()
  assert parallel.distributed_spec(cfg, {}) is None
  assert parallel.distributed_spec(cfg, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert parallel.distributed_spec(cfg, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}).source == "slurm"
  assert parallel.distributed_spec(cfg, {"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}).source == "tpu"
  assert parallel.distributed_spec(cfg, {"TPU_WORKER_HOSTNAMES": "h0"}) is None
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  spec = parallel.distributed_spec(cfg, env)
  assert spec.kwargs() == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
  explicit = _mesh_cfg(coordinator_address="h:1", num_processes=2, process_id=1)
  assert parallel.distributed_spec(explicit, env).kwargs() == {"coordinator_address": "h:1", "num_processes": 2,
                                                                 "process_id": 1}
  with pytest.raises(parallel.MeshError, match="number of processes"):
    parallel.distributed_spec(cfg, {"JAX_COORDINATOR_ADDRESS": "h:1"})
  with pytest.raises(parallel.MeshError, match="outside"):
    parallel.distributed_spec(_mesh_cfg(coordinator_address="h:1", num_processes=2, process_id=2), {})
  assert parallel.distributed_spec(_mesh_cfg(distributed="off"), env) is None
  assert parallel.distributed_spec(_mesh_cfg(distributed="on"), {}).source == "forced"


def test_launch_scripts_dry_run():
  """The SLURM and TPU-pod scripts print the command they would run (and run nothing) with --dry-run; the
  printed commands carry main's arguments unchanged, a bad call exits 2."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  args = ["--config", "configs/sd15_scott.py", "--workdir", "runs/a b", "--config.mesh.data=4"]
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm_gpu.sh"), "--dry-run", *args], env=env,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  line = out.stdout.strip().splitlines()[-1]
  assert line.startswith("srun --kill-on-bad-exit=1") and "-m scott_jax.main --mode train --config" in line
  assert line.endswith("--workdir runs/a b --config.mesh.data=4")
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "--tpu", "pod", "--zone", "z",
                        "--setup", "--dry-run", "--", *args], env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  setup, train = out.stdout.strip().splitlines()
  assert setup.startswith("gcloud compute tpus tpu-vm ssh pod --zone z --worker=all --command") and "pip" in setup
  # The --command argument, unquoted by a shell, is the remote command line with the run dir kept whole.
  remote = subprocess.run(["bash", "-c", f"set -- {train.split(' --command ', 1)[1]}; printf %s \"$1\""],
                          capture_output=True, text=True).stdout
  assert "scott_jax.main --mode train --config.mesh.distributed=on --config configs/sd15_scott.py" in remote
  assert "--workdir runs/a\\ b" in remote
  bad = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "--dry-run"], capture_output=True,
                       text=True, timeout=60)
  assert bad.returncode == 2 and "usage" in bad.stderr


# ---------------------------------------------------------------------------------------------------------
# 8 fake devices (subprocess).

def _plan_cmd(folder, workdir, arg=CONFIG_ARG):
  return [sys.executable, "-m", "scott_jax.main", "--config", f"{CONFIG}:{arg}", "--mode", "plan",
          "--workdir", str(workdir), f"--config.model.teacher_path={folder}", f"--config.train.batch_size={BATCH}",
          "--config.mesh.data=2", "--config.mesh.fsdp=4", f"--config.mesh.fsdp_min_size={MIN_SIZE}",
          "--config.mesh.plan_devices=8"]


def _train_cmd(folder, workdir):
  """`--mode train` of the tiny config (GAN off) for 3 steps of batch 8 on a (data 2, fsdp 2) mesh."""
  return [sys.executable, "-m", "scott_jax.main", "--config", f"{CONFIG}:{CONFIG_ARG}", "--mode", "train",
          "--workdir", str(workdir), f"--config.model.teacher_path={folder}", f"--config.train.batch_size={BATCH}",
          f"--config.train.num_steps={NUM_STEPS}", "--config.mesh.data=2", "--config.mesh.fsdp=2",
          f"--config.mesh.fsdp_min_size={MIN_SIZE}"]


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
  """Runs the two 8-device workers and `--mode plan` concurrently; returns their outputs."""
  root = tmp_path_factory.mktemp("parallel")
  from scott_jax.testing.tiny_sd import write_tiny_pipeline

  folder = write_tiny_pipeline(str(root / "tiny_sd"))
  out = root / "out"
  out.mkdir()
  plan_env = worker_env(8, root / "jax_cache_plan")
  plan_env["XLA_FLAGS"] = fast_compile.XLA_FLAGS  # the plan makes its own 8 CPU devices
  me = os.path.abspath(__file__)
  jobs = {"a": ([sys.executable, me, "meshes", out, folder, "a", CONFIG_ARG], worker_env(8, root / "c_a")),
          "b": ([sys.executable, me, "meshes", out, folder, "b", CONFIG_ARG], worker_env(8, root / "c_b")),
          "plan": (_plan_cmd(folder, root / "plan"), plan_env)}
  procs, logs = {}, {}
  try:
    for name, (cmd, env) in jobs.items():
      logs[name] = open(root / f"{name}.log", "w")
      procs[name] = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=logs[name],
                                     stderr=subprocess.STDOUT)
    for p in procs.values():
      p.wait(timeout=1200)
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()
    for fh in logs.values():
      fh.close()
  texts = {name: open(root / f"{name}.log").read() for name in jobs}
  for name in ("a", "b"):
    assert procs[name].returncode == 0, texts[name][-4000:]
  results = {}
  for part in ("a", "b"):
    with open(out / f"results_{part}.json") as fh:
      results.update(json.load(fh))
  return {"root": root, "folder": folder, "out": out, "results": results, "plan_rc": procs["plan"].returncode,
          "plan_log": texts["plan"], "plan_dir": root / "plan"}


def test_sharded_step_matches_single_device(mesh_run):
  """3 steps on meshes (8,1), (2,4), (1,8) = the 1-device steps: every metric of every step and the parameter
  updates of student and EMA, to the tolerances of the module docstring (GAN on: the slow test below)."""
  res, out = mesh_run["results"], mesh_run["out"]
  initial = np.load(out / "initial.npz")
  ref = np.load(out / "ref.npz")
  assert res["ref"]["mesh"] == [1, 1, 1]
  for name, shape in (("m8x1", [8, 1, 1]), ("m2x4", [2, 4, 1]), ("m1x8", [1, 8, 1])):
    assert res[name]["mesh"] == shape
    assert_metrics_close(res["ref"]["metrics"], res[name]["metrics"])
    assert_updates_close(initial, ref, np.load(out / f"{name}.npz"))
  # The runs did train (loss values differ between steps) and the state stayed on its shardings.
  assert len({round(m["loss"], 6) for m in res["ref"]["metrics"]}) == NUM_STEPS


def test_parameters_are_sharded(mesh_run):
  """Read from the arrays' .sharding after 3 steps: with fsdp 4 or 8 the large leaves of the student, EMA, Adam
  moments and frozen models are split (each device holds 1/fsdp of them), batches over
  (data, fsdp), the step/key replicated; with fsdp 1 (pure data parallel) everything is replicated."""
  res = mesh_run["results"]
  for name, fsdp in (("m2x4", 4), ("m1x8", 8)):
    info = res[name]["sharding"]
    for group in ("student", "ema", "opt_student", "frozen"):
      assert info[group]["sharded"] > 0, (name, group, info[group])
      # Sharded leaves hold exactly 1/fsdp per device, and they are most of the bytes.
      assert info[group]["bytes_sharded_local"] * fsdp == info[group]["bytes_sharded_global"]
      assert info[group]["bytes_sharded_global"] > 0.5 * info[group]["bytes_global"], (name, group)
    assert info["step"] == info["key"] == "P()"
    ex = info["example"]  # a (1, 1, 32, 32) 1x1-conv kernel: split on one of its 32s, whole on the other dims
    assert ex["spec"].count("fsdp") == 1 and ex["num_shards"] == 8
    assert np.prod(ex["shard_shape"]) * fsdp == np.prod(ex["shape"]) and ex["shard_shape"][:2] == [1, 1]
    assert info["batch"] == ("P(('data', 'fsdp'), None, None, None)" if name == "m2x4" else
                             "P('fsdp', None, None, None)")
  info = res["m8x1"]["sharding"]
  assert all(info[g]["sharded"] == 0 for g in ("student", "ema", "opt_student", "frozen"))
  assert info["batch"] == "P('data', None, None, None)"


def test_checkpoint_from_8_devices_continues_on_2(mesh_run):
  """A checkpoint written by the (1,8) run after step 1 (scott_jax.checkpoint.Checkpointer) restores onto a
  (1,2) mesh (2 devices, the new shardings) and steps 2-3 there give the unbroken (1,8) run's metrics and final
  parameters."""
  res, out = mesh_run["results"], mesh_run["out"]
  assert res["restored"]["restored_step"] == 1
  assert res["restored"]["mesh"] == [1, 2, 1] and res["restored"]["restored_shardings_ok"]
  unbroken = res["m1x8"]["metrics"][1:]
  resumed = res["restored"]["metrics"]
  assert len(resumed) == NUM_STEPS - 1
  for a, b in zip(unbroken, resumed, strict=True):
    for k in a:
      assert abs(a[k] - b[k]) <= METRIC_RTOL * max(abs(a[k]), 1e-3), (k, a[k], b[k])
  assert_updates_close(np.load(out / "initial.npz"), np.load(out / "m1x8.npz"), np.load(out / "restored.npz"))


def test_plan_mode_on_the_tiny_config(mesh_run):
  """``--mode plan`` (CLI; architectures from the teacher folder's config.json files, no weights) on 8 fake
  devices, mesh (2,4): compiles from shapes and reports per-device memory and FLOPs. Its per-device train-state
  bytes equal those of the real sharded state of the (2,4) run (so the abstract models and shardings are the
  real ones), and XLA's donated (aliased) bytes per device equal them too."""
  assert mesh_run["plan_rc"] == 0, mesh_run["plan_log"][-4000:]
  with open(mesh_run["plan_dir"] / "plan.json") as fh:
    plan = json.load(fh)
  assert plan["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and plan["devices"] == 8
  assert plan["batch_per_device"] == 1 and plan["batch_kind"] == "images"
  assert plan["state_bytes_per_device"] == mesh_run["results"]["m2x4"]["state_bytes_per_device"]
  assert plan["memory"]["alias_bytes"] == plan["state_bytes_per_device"]
  assert plan["state_bytes_per_device"] < plan["state_bytes_total"] / 3
  assert plan["flops_per_device"] > 0 and plan["memory"]["temp_bytes"] > 0
  assert "FLOPs per device" in mesh_run["plan_log"] and "XLA memory per device" in mesh_run["plan_log"]


@pytest.mark.slow  # two more compiles (tiny: ~40 s TPU, ~100 s GPU on 2 cores)
@pytest.mark.parametrize("topology,module,platform,kind", [("v5e:2x4", "libtpu", "tpu", "TPU v5"),
                                                           ("h100:8", "jax_plugins.xla_cuda12", "gpu", "NVIDIA H100")])
def test_plan_for_accelerators_without_them(mesh_run, topology, module, platform, kind):
  """``mesh.plan_topology`` compiles the same sharded step for 8 TPU v5e chips or 8 H100s with that accelerator's
  own XLA compiler on this host (deviceless; libtpu of the test extra, the CUDA plugin of the gpu-plan extra): the
  per-device train state is the real (2,4) run's (the same sharding rules), the compiler aliases all of it
  (donation) and takes it as an argument (arguments >= state; a TPU pads small dimensions to tiles). A bad
  topology is an error naming it."""
  pytest.importorskip(module)
  from scott_jax import plan

  config = tiny_config(mesh_run["folder"], data=2, fsdp=4)
  config.mesh.plan_topology = topology
  report = plan.make_plan(config)
  assert report["device_kind"].startswith(kind) and report["platform"] == platform
  assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and report["devices"] == 8
  assert report["state_bytes_per_device"] == mesh_run["results"]["m2x4"]["state_bytes_per_device"]
  memory = report["memory"]
  assert memory["alias_bytes"] >= report["state_bytes_per_device"]
  assert memory["argument_bytes"] >= report["state_bytes_per_device"] and memory["temp_bytes"] > 0
  assert report["compiler_options"] == ({"xla_gpu_enable_triton_gemm": False} if platform == "gpu" else {})
  chip = topology.split(":")[0]
  bad = f"{chip}:9x9x9" if platform == "tpu" else f"{chip}:x"
  with pytest.raises(Exception, match=bad):  # libtpu: JaxRuntimeError; a malformed GPU name: ValueError
    plan.topology_devices(bad)


@pytest.mark.slow  # three deviceless GPU compiles of the tiny step (~60 s each on 2 cores)
def test_cudnn_attention_compiles_under_fsdp(mesh_run, tmp_path, monkeypatch):
  """cuDNN's fused attention under FSDP: its partitioners take q, k, v only sharded alike and along the batch
  alone, and the backward's output cotangent only in a layout the mesh can name. The tiny step in bfloat16 with
  ``attention auto`` (= cuDNN on a GPU; 2 heads, head dims 16 and 32, which cuDNN takes) on 8 H100s compiles with
  the GPU compiler on mesh (2,4) and on fsdp 8 (1,8), where the cotangent from the FSDP-sharded output projection
  came as (heads 2 x head dim 4) tiles before the output was constrained too; jitted without the logical rules
  (the models' constraints then no-ops) the (2,4) compile fails in cuDNN attention's custom partitioner, as it did
  before the constraints. Needs the gpu-plan extra."""
  pytest.importorskip("jax_plugins.xla_cuda12")
  import shutil

  from scott_jax import parallel, plan

  folder = tmp_path / "tiny_sd"
  shutil.copytree(mesh_run["folder"], folder)
  unet_json = folder / "unet" / "config.json"
  unet_cfg = json.loads(unet_json.read_text())
  unet_json.write_text(json.dumps(dict(unet_cfg, attention_head_dim=2)))  # 2 heads: head dims 16 and 32
  configs = [tiny_config(folder, data=data, fsdp=fsdp, arg="teacher=lcm") for data, fsdp in ((2, 4), (1, 8))]
  for config in configs:
    config.model.update(dtype="bfloat16", attention="auto")
    config.mesh.plan_topology = "h100:8"
    report = plan.make_plan(config)
    assert report["attention"] == "cudnn" and report["memory"]["temp_bytes"] > 0
  jit_train_step = parallel.jit_train_step
  monkeypatch.setattr(parallel, "jit_train_step", lambda *args, rules=None: jit_train_step(*args[:5]))
  with pytest.raises(Exception, match="custom_partitioner"):  # "same sharding" or a dim not divisible by the axis
    plan.make_plan(configs[0])


def test_plan_keeps_remat_on_cpu():
  """Mode plan's CPU compile keeps the optimization barriers (``mesh.plan_keep_barriers``): remat survives, so a
  chain of 6 checkpointed layers, each with a (4096, 256) float32 intermediate, needs a fraction of the
  temporaries the CPU pipeline's own program needs (there the late CSE merges each recomputation with its forward
  and every intermediate is kept: ~80 MiB against ~12 MiB measured). Other platforms get no options."""
  import jax
  import jax.numpy as jnp

  from scott_jax import config as config_lib
  from scott_jax import plan

  mesh = config_lib.defaults().mesh
  assert plan.compiler_options(mesh, "cpu") == {"xla_disable_hlo_passes": "cse_barrier_expander"}
  assert plan.compiler_options(mesh, "gpu") is None and plan.compiler_options(mesh, "tpu") is None
  off = mesh.copy_and_resolve_references()
  off.plan_keep_barriers = False
  assert plan.compiler_options(off, "cpu") is None

  def layer(h, w):
    return jnp.sum(jnp.tanh(jnp.sin(h)[:, None] * w[None, :]), axis=1)

  def loss(x, ws):
    for w in ws:
      x = jax.checkpoint(layer)(x, w)
    return jnp.sum(x)

  x, ws = jnp.ones(4096), [jnp.full((256,), 0.1 * i) for i in range(6)]
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, ws)
  kept, plain = lowered.compile(plan.compiler_options(mesh, "cpu")), lowered.compile()
  assert "opt-barrier" in kept.as_text() and "opt-barrier" not in plain.as_text()
  assert kept.memory_analysis().temp_size_in_bytes < plain.memory_analysis().temp_size_in_bytes / 3
  for a, b in zip(jax.tree.leaves(kept(x, ws)), jax.tree.leaves(plain(x, ws)), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def _logged_metrics(log):
  """Per-step metrics from the clu logging writer's lines '[step] key=value, ...' (6 significant digits)."""
  out = {}
  for step, body in re.findall(r"\[(\d+)\] (.*loss_cd=.*)$", log, flags=re.M):
    out[int(step)] = {k: float(v) for k, v in (kv.split("=") for kv in body.split(", "))
                      if k not in ("steps_per_sec", "images_per_sec")}
  return [out[k] for k in sorted(out)]


@pytest.mark.slow  # a fifth concurrent compile; the default suite runs `--mode train` on a mesh in test_multihost
def test_train_loop_on_a_4_device_mesh_matches_one_device(mesh_run):
  """`python -m scott_jax.main --mode train` on 4 fake devices, mesh (data 2, fsdp 2): the loop's 3 steps (its
  batches from the in-memory synthetic source, the state initialised sharded) give the 1-device reference's
  metrics (relative 1e-4; logged to 6 significant digits) and parameter updates (the checkpoint of step 3, to
  the module docstring's tolerances), and the train state is sharded: the per-device bytes it logs are the
  rules' prediction for that mesh, about half the whole state."""
  from jax.sharding import AbstractMesh

  from scott_jax import checkpoint as ckpt_lib
  from scott_jax import parallel
  from scott_jax import step as step_lib
  from scott_jax import student as student_lib
  from scott_jax.data import batches as batches_lib

  cli_dir = mesh_run["root"] / "cli"
  proc = subprocess.run([str(c) for c in _train_cmd(mesh_run["folder"], cli_dir)], cwd=ROOT, capture_output=True,
                        text=True, env=worker_env(4, mesh_run["root"] / "c_cli"), timeout=1200)
  log, out = proc.stdout + proc.stderr, mesh_run["out"]
  assert proc.returncode == 0, log[-4000:]
  assert "Mesh {'data': 2, 'fsdp': 2, 'tensor': 1} on 4 devices, 1 process(es)" in log
  assert_metrics_close(mesh_run["results"]["ref"]["metrics"], _logged_metrics(log))
  config = tiny_config(mesh_run["folder"], data=2, fsdp=2)
  models, frozen = student_lib.load_models(config)
  spec = batches_lib.global_batch_spec(batches_lib.prepare_batch(batches_lib.make_source(config).batch(0), models))
  abstract = step_lib.abstract_state(config, models, frozen, spec)
  with ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(cli_dir), max_to_keep=None) as ckpt:
    state, data_state = ckpt.restore(NUM_STEPS, abstract)
  assert data_state == {"step": NUM_STEPS, "seed": config.seed, "num_examples": 8, "batch_size": BATCH}
  assert_updates_close(np.load(out / "initial.npz"), np.load(out / "ref.npz"), _flat(state))
  local, total = (int(x) for x in re.search(r"train state bytes per device (\d+) of (\d+)", log).groups())
  mesh = AbstractMesh((2, 2, 1), ("data", "fsdp", "tensor"))
  assert local == parallel.bytes_per_device(abstract, parallel.state_shardings(abstract, mesh, config.mesh))
  import jax

  assert total == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  assert total / 2 <= local < 0.6 * total


@pytest.mark.slow
def test_sharded_gan_step_matches_single_device(tmp_path):
  """With the LoRA discriminator (the paper's setting): the 1-device reference and meshes (8,1), (2,4) agree
  (metrics and updates of student, EMA and discriminator), and the discriminator's state is fsdp-sharded."""
  from scott_jax.testing.tiny_sd import write_tiny_pipeline

  folder = write_tiny_pipeline(str(tmp_path / "tiny_sd"))
  out = tmp_path / "out"
  out.mkdir()
  run_worker(["meshes", out, folder, "a", GAN_ARG], worker_env(8, tmp_path / "cache"), tmp_path / "a.log")
  with open(out / "results_a.json") as fh:
    res = json.load(fh)
  initial, ref = np.load(out / "initial.npz"), np.load(out / "ref.npz")
  assert any(k.startswith("disc/") for k in ref.files)
  for name in ("m8x1", "m2x4"):
    assert_metrics_close(res["ref"]["metrics"], res[name]["metrics"])
    assert_updates_close(initial, ref, np.load(out / f"{name}.npz"))
  assert "loss_d" in res["ref"]["metrics"][0]
  disc = res["m2x4"]["sharding"]["disc"]
  assert disc["sharded"] > 0 and disc["bytes_sharded_local"] * 4 == disc["bytes_sharded_global"]


@pytest.mark.slow
def test_plan_mode_on_sd15(tmp_path):
  """``--mode plan`` on configs/sd15_scott.py (built-in SD1.5 architecture, batch 40 of 512px images, GAN on) for
  8 fake devices, mesh (1,8): the parameter counts are SD1.5's published ones (U-Net 859,520,964, VAE 83,653,863,
  CLIP ViT-L/14 text 123,060,480; student = U-Net + the 256 -> 320 guidance projection), the LoRA discriminator
  is 3.64% of the U-Net, and FSDP leaves each device little more than 1/8 of the train state, all of it
  donated."""
  env = worker_env(8, tmp_path / "cache")
  env["XLA_FLAGS"] = fast_compile.XLA_FLAGS
  cmd = [sys.executable, "-m", "scott_jax.main", "--config", os.path.join(ROOT, "configs", "sd15_scott.py"),
         "--mode", "plan", "--workdir", str(tmp_path), "--config.mesh.plan_architecture=sd15",
         "--config.mesh.plan_devices=8", "--config.mesh.data=1", "--config.mesh.fsdp=8"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  with open(tmp_path / "plan.json") as fh:
    plan = json.load(fh)
  p = plan["params"]
  assert (p["teacher_unet"], p["vae"], p["text_encoder"]) == (859_520_964, 83_653_863, 123_060_480)
  assert p["student"] == p["teacher_unet"] + 256 * 320
  assert abs(p["disc_trainable"] / p["teacher_unet"] - 0.0364) < 5e-4
  assert plan["batch_per_device"] == 5 and plan["batch_kind"] == "images" and plan["resolution"] == 512
  # Leaves under fsdp_min_size (2^18 elements: biases, norms, the first blocks' 320 x 320 and 768 x 320 attention
  # projections) stay whole on every device: 1.127 x 1/8 of the state is observed.
  assert plan["state_bytes_total"] / 8 <= plan["state_bytes_per_device"] < 1.15 * plan["state_bytes_total"] / 8
  assert plan["memory"]["alias_bytes"] == plan["state_bytes_per_device"]
  assert plan["flops_per_device"] > 1e12


@pytest.mark.slow  # about an hour of compile on a 2-core CPU
def test_plan_mode_on_sdxl(tmp_path):
  """``--mode plan`` on configs/sdxl_scott.py as shipped (built-in SDXL base 1.0, batch 40 of 1024px images, GAN
  on) for 8 fake devices with fsdp 8 (TPU v5e-class chips): it compiles, the parameter counts are SDXL's (U-Net
  2,567,463,684 as diffusers'; student = U-Net + the 256 -> 320 guidance projection), each device holds little
  more than 1/8 of the train state, all of it donated (docs/scaling.md, SDXL section)."""
  env = worker_env(8, tmp_path / "cache")
  env["XLA_FLAGS"] = fast_compile.XLA_FLAGS
  cmd = [sys.executable, "-m", "scott_jax.main", "--config", os.path.join(ROOT, "configs", "sdxl_scott.py"),
         "--mode", "plan", "--workdir", str(tmp_path), "--config.mesh.plan_architecture=sdxl",
         "--config.mesh.plan_devices=8", "--config.mesh.data=1", "--config.mesh.fsdp=8"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3 * 3600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  with open(tmp_path / "plan.json") as fh:
    plan = json.load(fh)
  p = plan["params"]
  assert p["teacher_unet"] == 2_567_463_684 and p["student"] == p["teacher_unet"] + 256 * 320
  assert plan["batch_per_device"] == 5 and plan["batch_kind"] == "images" and plan["resolution"] == 1024
  assert plan["state_bytes_total"] / 8 <= plan["state_bytes_per_device"] < 1.15 * plan["state_bytes_total"] / 8
  assert plan["memory"]["alias_bytes"] == plan["state_bytes_per_device"]
  assert plan["flops_per_device"] > 1e13


# ---------------------------------------------------------------------------------------------------------
# The worker (runs in a subprocess with fake devices).

def _flat(tree):
  import jax

  return {jax.tree_util.keystr(p).replace("['", "/").replace("']", "").replace(".", "/").lstrip("/"): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _sharding_info(state, frozen, batch):
  import jax

  def group(tree):
    n, b_loc, b_glob, b_all = 0, 0, 0, 0
    for x in jax.tree.leaves(tree):
      local = x.sharding.shard_shape(x.shape)
      b_all += x.nbytes
      if local != x.shape:
        n += 1
        b_loc += int(np.prod(local)) * x.dtype.itemsize
        b_glob += x.nbytes
    return {"sharded": n, "bytes_sharded_local": b_loc, "bytes_sharded_global": b_glob, "bytes_global": b_all}

  k = state.student["params"]["up_blocks_1"]["attentions_0"]["proj_in"]["kernel"]
  return {"student": group(state.student), "ema": group(state.ema), "opt_student": group(state.opt_student),
          "disc": group(state.disc), "frozen": group(frozen), "step": str(state.step.sharding.spec),
          "key": str(state.key.sharding.spec), "batch": str(jax.tree.leaves(batch)[0].sharding.spec),
          "example": {"spec": str(k.sharding.spec), "num_shards": len(k.addressable_shards),
                      "shape": list(k.shape), "shard_shape": list(k.addressable_shards[0].data.shape)}}


class _Run:
  """The tiny config's models, 3 fixed batches of 8 and the initial state (host), shared by the runs."""

  def __init__(self, folder, arg=CONFIG_ARG):
    import jax

    from scott_jax import step as step_lib
    from scott_jax import student as student_lib
    from scott_jax.data import batches as batches_lib

    self.config = tiny_config(folder, arg=arg)
    self.models, frozen = student_lib.load_models(self.config)
    source = batches_lib.make_source(self.config)
    self.batches = [batches_lib.prepare_batch(source.batch(k), self.models) for k in range(NUM_STEPS)]
    self.state0 = jax.device_get(step_lib.init_state(self.config, self.models, frozen, self.batches[0]))
    self.frozen = jax.device_get(frozen)
    self.step_fn = step_lib.make_train_step(self.config, self.models)

  def mesh_cfg(self, data, fsdp):
    c = self.config.mesh.copy_and_resolve_references()
    c.update(dict(data=data, fsdp=fsdp, tensor=1))
    return c

  def setup(self, data, fsdp, devices):
    from scott_jax import parallel

    mcfg = self.mesh_cfg(data, fsdp)
    mesh = parallel.make_mesh(mcfg, devices)
    state_sh, frozen_sh, batch_sh = parallel.shardings_for(mcfg, mesh, self.state0, self.frozen, self.batches[0])
    step = parallel.jit_train_step(self.step_fn, mesh, state_sh, batch_sh, frozen_sh)
    return mesh, state_sh, frozen_sh, batch_sh, step

  def local_batch(self, k):
    """This process's contiguous part of batch k (all of it in one process)."""
    import jax

    from scott_jax import parallel

    n = parallel.local_batch_size(BATCH)
    i = jax.process_index()
    return {key: v[i * n:(i + 1) * n] for key, v in self.batches[k].items()}

  def train(self, data, fsdp, devices, state=None, steps=range(NUM_STEPS), on_step=None):
    from scott_jax import parallel

    mesh, state_sh, frozen_sh, batch_sh, step = self.setup(data, fsdp, devices)
    state = parallel.put_tree(self.state0 if state is None else state, state_sh)
    frozen = parallel.put_tree(self.frozen, frozen_sh)
    metrics = []
    batch = None
    for k in steps:
      batch = parallel.make_global_batch(self.local_batch(k), batch_sh)
      state, m = step(state, batch, frozen)
      metrics.append({key: float(v) for key, v in m.items()})
      if on_step is not None:
        on_step(k, state)
    info = _sharding_info(state, frozen, batch)
    result = {"mesh": list(mesh.devices.shape), "metrics": metrics, "sharding": info,
              "state_bytes_per_device": parallel.bytes_per_device(state, state_sh)}
    return state, result


def _save(path, state):
  from scott_jax import parallel

  flat = _flat(parallel.gather_tree(state))
  np.savez(path, **flat)


def worker_meshes(out, folder, part, arg=CONFIG_ARG):
  """Part a: the 1-device reference and meshes (8,1), (2,4). Part b: mesh (1,8) with a checkpoint after step 1,
  restored onto a (1,2) mesh for steps 2-3. Writes OUT/<run>.npz (gathered state) and OUT/results_<part>.json."""
  import jax

  from scott_jax import checkpoint as ckpt_lib
  from scott_jax import parallel

  devices = jax.devices()
  assert len(devices) == 8, devices
  run = _Run(folder, arg)
  results = {}
  if part == "a":
    _save(os.path.join(out, "initial.npz"), run.state0)
    state, results["ref"] = run.train(1, 1, devices[:1])
    _save(os.path.join(out, "ref.npz"), state)
    for name, (data, fsdp) in (("m8x1", (8, 1)), ("m2x4", (2, 4))):
      state, results[name] = run.train(data, fsdp, devices)
      _save(os.path.join(out, f"{name}.npz"), state)
  elif part == "b":
    ckpt_dir = os.path.join(out, "ckpt")
    with ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=None) as ckpt:
      def save_first(k, st):
        if k == 0:
          ckpt.save(int(st.step), st, force=True)
      state, results["m1x8"] = run.train(1, 8, devices, on_step=save_first)
    _save(os.path.join(out, "m1x8.npz"), state)
    # Restore the 8-device checkpoint onto a (1, 2) mesh and continue.
    _, state_sh2, _, _, _ = run.setup(1, 2, devices[:2])
    target = parallel.with_shardings(run.state0, state_sh2)
    with ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=None) as ckpt:
      step = ckpt.latest_step()
      restored, _ = ckpt.restore(step, target)
    ok = all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in
             zip(jax.tree.leaves(restored), jax.tree.leaves(state_sh2), strict=True))
    state, results["restored"] = run.train(1, 2, devices[:2], state=restored, steps=range(1, NUM_STEPS))
    results["restored"].update(restored_step=step, restored_shardings_ok=bool(ok))
    _save(os.path.join(out, "restored.npz"), state)
  else:
    raise ValueError(part)
  with open(os.path.join(out, f"results_{part}.json"), "w") as fh:
    json.dump(results, fh)


def worker_run(out, folder, data, fsdp, arg):
  """One training run of 3 steps of the tiny config with ``arg`` on a (data, fsdp) mesh of all devices (all
  processes); process 0 writes OUT/params.npz and OUT/results.json. Multi-process when jax.distributed is
  configured by the environment."""
  import jax

  from scott_jax import parallel

  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # before the backend starts
  parallel.initialize_distributed(tiny_config(folder, arg=arg).mesh)
  run = _Run(folder, arg)
  state, result = run.train(int(data), int(fsdp), jax.devices())
  result.update(process_count=jax.process_count(), local_devices=jax.local_device_count())
  flat = _flat(parallel.gather_tree(state))
  if jax.process_index() == 0:
    np.savez(os.path.join(out, "params.npz"), **flat)
    with open(os.path.join(out, "results.json"), "w") as fh:
      json.dump(result, fh)


def test_plan_reports_a_program_too_large_for_the_chip(tmp_path):
  """A plan for a chip the program does not fit is a result, not a crash: libtpu's compiler refuses an
  outer product of 80,000 float32 values (25.6e9 bytes) on one v5e chip, and `plan.compile_or_out_of_memory`
  returns the bytes it names (within its 2-decimal rounding) and the chip's 15.75 GiB; an 8,192-value one
  compiles (output bytes exact: 8,192 is a whole number of the chip's tiles). In a subprocess, so libtpu stays
  out of the test worker. The older message form parses the same way, and no other error is taken for it."""
  pytest.importorskip("libtpu")
  from scott_jax import plan

  out = tmp_path / "oom.json"
  run_worker(["oom", out], dict(os.environ, JAX_PLATFORMS="cpu", TPU_LOG_DIR=str(tmp_path)), tmp_path / "oom.log",
             timeout=300)
  res = json.loads(out.read_text())
  big = res["big"]
  assert res["big_compiled"] is False and big["memory_space"] == "hbm"
  assert abs(big["needed_bytes"] - 80_000**2 * 4) <= 0.005 * 2**30
  assert big["device_bytes"] == int(15.75 * 2**30) and "exceeds" in big["report"]
  assert res["small"] == {"out_of_memory": None, "output_bytes": 8_192**2 * 4}
  old = plan.out_of_memory("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
                           "hbm. Used 21.95G of 15.48G hbm.\n Exceeded hbm capacity by 6.47G.\n\nTotal hbm usage")
  assert old["needed_bytes"] == int(21.95 * 2**30) and old["device_bytes"] == int(15.48 * 2**30)
  assert "Exceeded hbm capacity" in old["report"]
  assert plan.out_of_memory("INVALID_ARGUMENT: Ran out of patience") is None
  report = {"mesh": {"data": 1}, "devices": 1, "platform": "tpu", "device_kind": "TPU v5 lite", "batch_size": 1,
            "batch_per_device": 1, "batch_kind": "images", "resolution": 8, "dtype": "float32", "attention": "xla",
            "attention_chunk_size": 0, "remat": False, "remat_policy": "", "frozen_sharding": "fsdp",
            "params": dict.fromkeys(["student", "disc_trainable", "teacher_unet", "vae", "text_encoder"], 0),
            "state_bytes_total": 0, "state_bytes_per_device": 0, "frozen_bytes_per_device": 0, "memory": {},
            "out_of_memory": big, "flops_per_device": 0.0, "lower_seconds": 0, "compile_seconds": 0}
  assert "DOES NOT FIT: the compiler needs 23.84 GiB of hbm per device, the device has 15.75 GiB" in (
    plan.format_plan(report))


def worker_oom(out):
  """Compiles two outer products for one TPU v5e chip (deviceless) and writes what the plan makes of them."""
  import jax
  import jax.numpy as jnp

  from scott_jax import plan

  sharding = jax.sharding.SingleDeviceSharding(plan.topology_devices("v5e:2x2")[0])
  res = {}
  for name, n in (("big", 80_000), ("small", 8_192)):
    lowered = jax.jit(lambda v: jnp.outer(v, v) + 1.0, out_shardings=sharding).lower(
      jax.ShapeDtypeStruct((n,), jnp.float32, sharding=sharding))
    compiled, oom = plan.compile_or_out_of_memory(lowered, None)
    if name == "big":
      res.update(big=oom, big_compiled=compiled is not None)
    else:
      res["small"] = {"out_of_memory": oom, "output_bytes": int(compiled.memory_analysis().output_size_in_bytes)}
  with open(out, "w") as fh:
    json.dump(res, fh)


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  if sys.argv[1] == "meshes":
    worker_meshes(*sys.argv[2:6])
  elif sys.argv[1] == "run":
    worker_run(*sys.argv[2:7])
  elif sys.argv[1] == "oom":
    worker_oom(sys.argv[2])
  else:
    raise SystemExit(f"unknown worker mode {sys.argv[1]}")
