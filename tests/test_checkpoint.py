"""Tests for scott_jax.checkpoint: bit-exact round trips, keep-last-k, corruption fallback, atomic saves,
mismatch reports, directory checks, resharded restore and SIGTERM resume (subprocesses)."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax.checkpoint._src.path import atomicity

from scott_jax import checkpoint as ck

# A failed tensorstore read (the corruption tests) makes orbax's per-call asyncio loop log "Event loop is
# closed" from a callback after the error has already been raised to us; it is noise, not a test outcome.
_IGNORE_CLOSED_LOOP = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(seed: int) -> dict:
  """Nested train state: params (f32 + bf16), adam state after one update, int32 step, typed and raw keys."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  dense = {"w": jax.random.normal(k1, (3, 5)), "b": jax.random.normal(k2, (5,)).astype(jnp.bfloat16)}
  params = {"dense": dense, "scale": jnp.float32(seed + 0.5)}
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * (seed + 1), params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return {"params": params, "opt_state": opt_state, "step": jnp.int32(seed), "rng": jax.random.key(seed + 7),
          "raw_rng": jax.random.PRNGKey(seed + 11), "ema_decay": np.float32(0.999)}


def _bits(x) -> tuple[str, tuple[int, ...], bytes]:
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return str(x.dtype), x.shape, np.asarray(jax.random.key_data(x)).tobytes()
  x = np.asarray(x)
  return str(x.dtype), x.shape, x.tobytes()


def _assert_bit_equal(actual, expected) -> None:
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  flat = jax.tree_util.tree_flatten_with_path(actual)[0]
  for (path, a), b in zip(flat, jax.tree.leaves(expected), strict=True):
    assert _bits(a) == _bits(b), jax.tree_util.keystr(path)


def _step_files(directory: Path, step: int) -> list[Path]:
  return sorted(p for p in (directory / str(step)).rglob("*") if p.is_file())


def _truncate_array_data(directory: Path, step: int) -> None:
  files = [p for p in _step_files(directory, step) if p.parent.name == "d" and "state" in p.parts]
  assert files
  for p in files:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _remove_ocdbt_manifests(directory: Path, step: int) -> None:
  files = [p for p in _step_files(directory, step) if p.name == "manifest.ocdbt"]
  assert files
  for p in files:
    p.unlink()


def _garble_manifest_item(directory: Path, step: int) -> None:
  files = [p for p in _step_files(directory, step) if "manifest" in p.parts and p.name == "metadata"]
  assert len(files) == 1
  files[0].write_text(files[0].read_text()[:10])


def test_round_trip_bit_exact(tmp_path):
  state = _state(3)
  data_state = {"epoch": 2, "position": 1234, "seed": 7, "shards": [0, 3], "name": "laion"}
  with ck.Checkpointer(tmp_path / "ckpt", save_every=10) as saver:
    assert saver.save(10, state, data_state=data_state)
  with ck.Checkpointer(tmp_path / "ckpt", save_every=10) as loader:
    step, restored, restored_data = loader.restore_latest(ck.abstract_state(state))
  assert step == 10
  assert restored_data == data_state
  _assert_bit_equal(restored, state)
  # Restored as jax arrays on the abstract tree's shardings (the numpy scalar leaf lands on the first device).
  for leaf, ref in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    assert isinstance(leaf, jax.Array)
    if isinstance(ref, jax.Array):
      assert leaf.sharding == ref.sharding
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)


@pytest.mark.parametrize("data_state", [None, b"\x00{\"idx\": 5}\xff", "plain string", [1, 2.5, None, True]])
def test_data_state_kinds_round_trip(tmp_path, data_state):
  state = {"w": jnp.arange(4.0)}
  with ck.Checkpointer(tmp_path, save_every=1) as c:
    c.save(1, state, data_state=data_state)
    _, _, restored = c.restore_latest(ck.abstract_state(state))
  assert restored == data_state and type(restored) is type(data_state)


def test_data_state_that_json_would_alter_is_rejected(tmp_path):
  with ck.Checkpointer(tmp_path, save_every=1) as c:
    with pytest.raises(TypeError, match="round trip"):
      c.save(1, {"w": jnp.ones(2)}, data_state={"pair": (1, 2)})
    with pytest.raises(TypeError, match="JSON"):
      c.save(1, {"w": jnp.ones(2)}, data_state={"obj": object()})
    with pytest.raises(TypeError, match=re.escape("['n']")):
      c.save(1, {"w": jnp.ones(2), "n": 3})
    assert c.all_steps() == []


def test_fresh_start_returns_none(tmp_path):
  with ck.Checkpointer(ck.checkpoint_dir(tmp_path)) as c:
    assert c.latest_step() is None
    assert c.restore_latest(ck.abstract_state(_state(0))) is None
  assert ck.checkpoint_dir(tmp_path) == tmp_path / "checkpoints"


def test_async_saves_finish_and_restore(tmp_path):
  with ck.Checkpointer(tmp_path, max_to_keep=2, save_every=1, async_=True) as c:
    for step in (1, 2, 3):
      assert c.save(step, _state(step), data_state={"pos": step})
    c.wait_until_finished()
    assert c.all_steps() == [2, 3]
  with ck.Checkpointer(tmp_path, max_to_keep=2, save_every=1) as c:
    step, state, data = c.restore_latest(ck.abstract_state(_state(0)))
  assert (step, data) == (3, {"pos": 3})
  _assert_bit_equal(state, _state(3))


def test_keep_last_k_and_resume_from_highest(tmp_path):
  with ck.Checkpointer(tmp_path, max_to_keep=2, save_every=2) as c:
    wrote = [c.save(step, _state(step), data_state={"pos": step}) for step in range(1, 10)]
  assert wrote == [step % 2 == 0 for step in range(1, 10)]
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [6, 8]
  with ck.Checkpointer(tmp_path, max_to_keep=2, save_every=2) as c:
    assert c.all_steps() == [6, 8] and c.latest_step() == 8
    step, state, data = c.restore_latest(ck.abstract_state(_state(0)))
    assert not c.save(8, _state(8), force=True)  # an existing step is never overwritten
  assert step == 8 and data == {"pos": 8}
  _assert_bit_equal(state, _state(8))


@_IGNORE_CLOSED_LOOP
@pytest.mark.parametrize("corrupt", [_truncate_array_data, _remove_ocdbt_manifests, _garble_manifest_item],
                         ids=["truncated-array-file", "missing-ocdbt-manifest", "garbled-manifest-item"])
def test_corrupt_latest_falls_back_and_keeps_files(tmp_path, caplog, corrupt):
  with ck.Checkpointer(tmp_path, max_to_keep=3, save_every=2) as c:
    for step in (2, 4, 6):
      c.save(step, _state(step), data_state={"pos": step})
  corrupt(tmp_path, 6)
  n_files = len(_step_files(tmp_path, 6))

  with caplog.at_level(logging.WARNING, logger="scott_jax.checkpoint"):
    with ck.Checkpointer(tmp_path, max_to_keep=3, save_every=2) as c:
      step, state, data = c.restore_latest(ck.abstract_state(_state(0)))
      assert (step, data) == (4, {"pos": 4})
      _assert_bit_equal(state, _state(4))
      assert c.all_steps() == [2, 4]
      # The resumed run saves the same step numbers again, then later ones.
      assert c.save(6, _state(60), data_state={"pos": 60}) and c.save(8, _state(8), data_state={"pos": 8})
      assert c.all_steps() == [4, 6, 8]
      step, state, _ = c.restore_latest(ck.abstract_state(_state(0)))
  assert step == 8
  _assert_bit_equal(state, _state(8))
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("step 6" in m and str(tmp_path / "6") in m and "unreadable" in m for m in warnings), warnings
  # The corrupt step was moved aside with all its files, not deleted.
  moved = list((tmp_path / ck.QUARANTINE_SUBDIR).iterdir())
  assert [p.name.split(".")[0] for p in moved] == ["6"]
  assert len([p for p in moved[0].rglob("*") if p.is_file()]) == n_files
  assert any(str(moved[0]) in m for m in warnings)


@_IGNORE_CLOSED_LOOP
def test_all_checkpoints_corrupt_raises_and_moves_nothing(tmp_path):
  with ck.Checkpointer(tmp_path, save_every=1) as c:
    c.save(1, _state(1))
    c.save(2, _state(2))
  _truncate_array_data(tmp_path, 1)
  _garble_manifest_item(tmp_path, 2)
  with ck.Checkpointer(tmp_path, save_every=1) as c:
    with pytest.raises(ck.CheckpointCorruptError, match=r"step 2 .*\n.*step 1 "):
      c.restore_latest(ck.abstract_state(_state(0)))
  assert not (tmp_path / ck.QUARANTINE_SUBDIR).exists()
  assert (tmp_path / "1").is_dir() and (tmp_path / "2").is_dir()


@_IGNORE_CLOSED_LOOP
def test_interrupted_save_leaves_only_an_ignored_tmp_dir(tmp_path, caplog, monkeypatch):
  with ck.Checkpointer(tmp_path, save_every=2) as c:
    c.save(2, _state(2))

    async def killed_before_rename(self, *args, **kwargs):
      raise OSError("process killed before the final rename")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", killed_before_rename)
    with pytest.raises(OSError, match="killed"):
      c.save(4, _state(4))
    monkeypatch.undo()
  leftovers = [p.name for p in tmp_path.iterdir() if ".orbax-checkpoint-tmp" in p.name]
  assert len(leftovers) == 1 and leftovers[0].startswith("4.")
  assert not (tmp_path / "4").exists()

  with caplog.at_level(logging.WARNING, logger="scott_jax.checkpoint"):
    with ck.Checkpointer(tmp_path, save_every=2) as c:
      assert c.all_steps() == [2]
      step, state, _ = c.restore_latest(ck.abstract_state(_state(0)))
      assert (tmp_path / leftovers[0]).is_dir()  # not deleted by us
      assert c.save(4, _state(4))
  assert step == 2
  _assert_bit_equal(state, _state(2))
  assert any(leftovers[0] in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_shape_and_dtype_mismatch_names_leaves_and_does_not_fall_back(tmp_path):
  with ck.Checkpointer(tmp_path, save_every=1) as c:
    c.save(1, _state(1))
    c.save(2, _state(2))
  abstract = ck.abstract_state(_state(0))
  abstract["params"]["dense"]["w"] = jax.ShapeDtypeStruct((3, 6), jnp.float32)
  abstract["params"]["dense"]["b"] = jax.ShapeDtypeStruct((5,), jnp.float32)
  with ck.Checkpointer(tmp_path, save_every=1) as c:
    with pytest.raises(ck.CheckpointMismatchError) as info:
      c.restore_latest(abstract)
  msg = str(info.value)
  assert "step 2" in msg and "2 leaves differ" in msg
  assert "['params']['dense']['w']: saved float32[3, 5], expected float32[3, 6]" in msg
  assert "['params']['dense']['b']: saved bfloat16[5], expected float32[5]" in msg
  assert not (tmp_path / ck.QUARANTINE_SUBDIR).exists()
  assert (tmp_path / "1").is_dir() and (tmp_path / "2").is_dir()


def test_structure_mismatch_names_missing_and_extra_leaves(tmp_path):
  with ck.Checkpointer(tmp_path, save_every=1) as c:
    c.save(1, _state(1))
  abstract = ck.abstract_state(_state(0))
  del abstract["ema_decay"]
  abstract["params"]["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32)
  abstract["rng"] = jax.ShapeDtypeStruct((2,), jnp.uint32)  # raw key expected where a typed key was saved
  with ck.Checkpointer(tmp_path, save_every=1) as c:
    with pytest.raises(ck.CheckpointMismatchError) as info:
      c.restore(1, abstract)
  msg = str(info.value)
  assert "['params']['extra']: missing from the checkpoint (expected float32[2])" in msg
  assert "['ema_decay']: in the checkpoint (float32[]) but not in the expected state" in msg
  assert "['rng']: saved key<fry>[], expected uint32[2]" in msg


def test_directory_that_is_not_a_checkpoint_directory(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(ck.CheckpointDirectoryError, match="not a directory"):
    ck.Checkpointer(tmp_path / "file")
  workdir = tmp_path / "workdir"
  (workdir / "logs").mkdir(parents=True)
  (workdir / "config.json").write_text("{}")
  with pytest.raises(ck.CheckpointDirectoryError, match=re.escape("['config.json', 'logs']")):
    ck.Checkpointer(workdir)


def test_preemption_guard_sets_flag_and_restores_handler():
  previous = signal.getsignal(signal.SIGTERM)
  with ck.PreemptionGuard() as guard:
    assert not guard.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.should_stop(1)
  assert signal.getsignal(signal.SIGTERM) is previous
  guard = ck.install_sigterm_handler()
  try:
    assert not guard.should_stop()
    guard.request_stop()
    assert guard.should_stop()
  finally:
    guard.uninstall()
  assert signal.getsignal(signal.SIGTERM) is previous


_TRAIN_SCRIPT = textwrap.dedent("""
  import sys, time
  import jax, jax.numpy as jnp, numpy as np
  from scott_jax import checkpoint as ck

  workdir, total, sleep = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

  @jax.jit
  def update(state, batch):
    key, sub = jax.random.split(state["key"])
    w = 0.9 * state["w"] + batch + 0.01 * jax.random.normal(sub, state["w"].shape)
    m = (0.5 * state["m"].astype(jnp.float32) + w).astype(jnp.bfloat16)
    return {"w": w, "m": m, "key": key, "step": state["step"] + 1}

  def batch_at(pos):
    return jnp.asarray(np.random.default_rng(pos).normal(size=(4, 3)), jnp.float32)

  state = {"w": jnp.zeros((4, 3)), "m": jnp.zeros((4, 3), jnp.bfloat16), "key": jax.random.key(1),
           "step": jnp.int32(0)}
  start, pos, stopped = 0, 0, False
  with ck.PreemptionGuard() as guard, ck.Checkpointer(ck.checkpoint_dir(workdir), max_to_keep=3,
                                                      save_every=2) as ckpt:
    restored = ckpt.restore_latest(ck.abstract_state(state))
    if restored is not None:
      start, state, data = restored
      pos = data["pos"]
      print(f"resumed {start}", flush=True)
    for step in range(start + 1, total + 1):
      state = update(state, batch_at(pos))
      pos += 1
      ckpt.save(step, state, data_state={"pos": pos})
      print(f"step {step}", flush=True)
      time.sleep(sleep)
      if guard.should_stop(step):
        ckpt.save(step, state, data_state={"pos": pos}, force=True)
        print(f"stopped {step}", flush=True)
        stopped = True
        break
  if not stopped:
    np.savez(f"{workdir}/final.npz", w=np.asarray(state["w"]), m=np.asarray(state["m"]).view(np.uint16),
             key=np.asarray(jax.random.key_data(state["key"])), step=np.asarray(state["step"]), pos=pos)
    print("done", flush=True)
""")


def _env(**extra: str) -> dict[str, str]:
  return {**os.environ, "JAX_PLATFORMS": "cpu", **extra}


def test_sigterm_saves_and_resume_matches_unbroken_run(tmp_path):
  script = tmp_path / "train.py"
  script.write_text(_TRAIN_SCRIPT)
  total = 20
  ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
  ref = subprocess.Popen([sys.executable, str(script), str(ref_dir), str(total), "0"], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  run = subprocess.Popen([sys.executable, str(script), str(run_dir), str(total), "0.2"], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in run.stdout:
    lines.append(line)
    if line.strip() == "step 3":
      run.send_signal(signal.SIGTERM)
      break
  out, err = run.communicate(timeout=120)
  out = "".join(lines) + out
  assert run.returncode == 0, err[-3000:]
  stopped = int(re.search(r"^stopped (\d+)$", out, re.M).group(1))
  assert 3 <= stopped < total and "done" not in out
  assert not (run_dir / "final.npz").exists()

  rerun = subprocess.run([sys.executable, str(script), str(run_dir), str(total), "0"], env=_env(),
                         capture_output=True, text=True, timeout=120)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed {stopped}\n" in rerun.stdout and "done" in rerun.stdout
  ref_out, ref_err = ref.communicate(timeout=120)
  assert ref.returncode == 0, ref_err[-3000:]
  final, expected = np.load(run_dir / "final.npz"), np.load(ref_dir / "final.npz")
  assert sorted(final.files) == sorted(expected.files)
  for name in expected.files:
    assert final[name].dtype == expected[name].dtype, name
    assert final[name].tobytes() == expected[name].tobytes(), name
  assert int(final["step"]) == total and int(final["pos"]) == total


_RESHARD_SCRIPT = textwrap.dedent("""
  import sys
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding
  from scott_jax import checkpoint as ck

  devices = jax.devices()
  assert len(devices) == 2, devices
  mesh = Mesh(np.array(devices), ("x",))
  row = NamedSharding(mesh, P("x"))
  state = {"w": jax.device_put(jnp.arange(32.0).reshape(8, 4), row),
           "k": jax.device_put(jax.random.split(jax.random.key(0), 4), row)}
  with ck.Checkpointer(sys.argv[1], save_every=1) as c:
    c.save(1, state)
  targets = {"replicated": NamedSharding(mesh, P()), "cols": NamedSharding(mesh, P(None, "x")),
             "device1": SingleDeviceSharding(devices[1])}
  for name, sharding in targets.items():
    k_sharding = sharding if name != "cols" else NamedSharding(mesh, P())
    abstract = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sharding),
                "k": jax.ShapeDtypeStruct((4,), state["k"].dtype, sharding=k_sharding)}
    with ck.Checkpointer(sys.argv[1], save_every=1) as c:
      step, restored, _ = c.restore_latest(abstract)
    assert restored["w"].sharding.is_equivalent_to(sharding, 2), (name, restored["w"].sharding)
    assert restored["k"].sharding.is_equivalent_to(k_sharding, 1), (name, restored["k"].sharding)
    assert np.asarray(restored["w"]).tobytes() == np.asarray(state["w"]).tobytes(), name
    assert np.array_equal(jax.random.key_data(restored["k"]), jax.random.key_data(state["k"])), name
    print("ok", name, flush=True)
""")


def test_restore_onto_a_different_sharding(tmp_path):
  script = tmp_path / "reshard.py"
  script.write_text(_RESHARD_SCRIPT)
  env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
  result = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], capture_output=True,
                          text=True, timeout=120, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split("\n")[:3] == ["ok replicated", "ok cols", "ok device1"]


def test_relative_directory_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with ck.Checkpointer("runs/rel/checkpoints", save_every=1) as c:
    assert c.directory.is_absolute()
    c.save(1, {"w": jnp.ones((2,))})
    c.wait_until_finished()
  assert (tmp_path / "runs" / "rel" / "checkpoints" / "1").is_dir()
