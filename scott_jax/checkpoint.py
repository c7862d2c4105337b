"""Checkpointing of the train state: orbax CheckpointManager, fallback past corrupt steps, SIGTERM handling.

Model-agnostic. One checkpoint step (a directory ``<directory>/<step>``) holds three orbax items:

- ``state``: the train-state pytree (any pytree whose leaves are jax/numpy arrays or numpy scalars, typed PRNG
  key arrays included), written with ``StandardSave`` and restored onto the shardings of an abstract tree;
- ``data_state``: the data-iterator state (JSON-able value, or ``bytes`` such as grain's
  ``DataLoader.get_state()``), written with ``JsonSave``;
- ``manifest``: our own JSON description of the state tree (leaf key paths, shapes, dtypes), used to report a
  structure/shape/dtype mismatch leaf by leaf before anything is read.

Only trainable state belongs here. The frozen models (teacher UNet, VAE, text encoder, the base weights under
LoRA) are never checkpointed: they are reloaded from their own files by the caller, which keeps checkpoints
small and the teacher provenance explicit (as big_vision's distill.py and maxdiffusion do).

Atomicity comes from orbax: on POSIX file systems a step is written into ``<step>.orbax-checkpoint-tmp-<t>``
and renamed to ``<step>`` once complete (on GCS a ``commit_success.txt`` marks completion instead). A step
that was never finalised is invisible to ``all_steps``; such leftovers are reported by a warning and never
deleted here.

Restore policy (``Checkpointer.restore_latest``): no finalised step at all -> ``None`` (fresh start). A step
that cannot be read (truncated array file, missing or garbled metadata, missing item) is corrupt: a WARNING
names it, the previous step is tried, and once an older step restores the corrupt newer ones are moved (not
deleted) into ``<directory>/corrupt/`` so that the resumed run can save those step numbers again. If every
step is corrupt, ``CheckpointCorruptError`` is raised and nothing is moved. A readable step whose tree differs
from the expected abstract tree is a configuration error, not corruption: ``CheckpointMismatchError`` is
raised at once.

End of training: a finished run writes ``WORKDIR/train_done.json`` (`write_train_done`, atomically, after its
last checkpoint is final) holding the last step; a run that starts again under the same workdir removes it
first (`remove_train_done`). The separate eval job (``scott_jax.evaluate``, watch mode) stops on it.

Preemption: ``PreemptionGuard`` (or ``install_sigterm_handler()``) turns SIGTERM into a flag the train loop
polls with ``should_stop(step)``; the loop then saves with ``force=True`` and exits cleanly. In a
multi-process run the Python handler is not installed (JAX's preemption service owns SIGTERM there) and
``should_stop(step)`` is orbax's ``reached_preemption(step)``, which all processes reach at the same step.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import logging
import os
import re
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import flax.traverse_util as traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocp_managers

PyTree = Any

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
TRAIN_DONE = "train_done.json"
QUARANTINE_SUBDIR = "corrupt"
MANIFEST_FORMAT = "scott_jax.checkpoint/1"

_STATE, _DATA, _MANIFEST = "state", "data_state", "manifest"
_TMP_MARK = ".orbax-checkpoint-tmp"
_STEP_NAME = re.compile(r"^(0|[1-9]\d*)$")
# Entries orbax itself may create at the root of a checkpoint directory, besides step directories.
_ORBAX_ROOT_ENTRIES = frozenset({"metadata"})


class CheckpointMismatchError(ValueError):
  """A readable checkpoint whose tree structure, shapes or dtypes differ from the expected abstract state."""


class CheckpointCorruptError(RuntimeError):
  """Checkpoints exist but none of them can be read."""


class CheckpointDirectoryError(RuntimeError):
  """The checkpoint directory is not a directory, is unreadable, or holds things that are not checkpoints."""


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  """Shape and dtype of one state leaf; ``dtype`` is ``str(np.dtype)`` (e.g. 'bfloat16', 'key<fry>')."""
  shape: tuple[int, ...]
  dtype: str

  def __str__(self) -> str:
    return f"{self.dtype}{list(self.shape)}"


def checkpoint_dir(workdir: str | epath.PathLike) -> epath.Path:
  """The checkpoint directory of a run: ``WORKDIR/checkpoints``."""
  return epath.Path(workdir) / CHECKPOINT_SUBDIR


def write_train_done(workdir: str, step: int, **info: Any) -> str:
  """Writes WORKDIR/train_done.json = {"step": step, "time": unix seconds, **info} atomically (a temporary file
  renamed over it, so a reader sees all of it or nothing). Call once the last checkpoint is final. Returns the
  path."""
  path = os.path.join(workdir, TRAIN_DONE)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as fh:
    json.dump({"step": int(step), "time": datetime.datetime.now().timestamp(), **info}, fh)
  os.replace(tmp, path)
  return path


def read_train_done(workdir: str) -> dict[str, Any] | None:
  """The contents of WORKDIR/train_done.json, or None while training has not finished (or it is unreadable)."""
  try:
    with open(os.path.join(workdir, TRAIN_DONE)) as fh:
      value = json.load(fh)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) and "step" in value else None


def remove_train_done(workdir: str) -> bool:
  """Removes WORKDIR/train_done.json (a run continues under this workdir); returns whether there was one."""
  try:
    os.remove(os.path.join(workdir, TRAIN_DONE))
  except FileNotFoundError:
    return False
  return True


def leaf_specs(tree: PyTree) -> dict[str, LeafSpec]:
  """Maps each leaf's key path (``jax.tree_util.keystr``, e.g. ``"['opt'][0].mu['w']"``) to its shape/dtype.

  Leaves must carry ``shape`` and ``dtype`` (jax/numpy arrays, numpy scalars, ``jax.ShapeDtypeStruct``); a
  Python scalar raises ``TypeError`` naming the leaf (wrap it with ``jnp.asarray`` so its dtype is explicit).
  """
  specs: dict[str, LeafSpec] = {}
  bad: list[str] = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = jax.tree_util.keystr(path)
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
      bad.append(f"{name} ({type(leaf).__name__})")
      continue
    specs[name] = LeafSpec(tuple(int(d) for d in leaf.shape), str(leaf.dtype))
  if bad:
    raise TypeError("State leaves must be arrays with a shape and dtype (jax.Array, np.ndarray, numpy "
                    f"scalar); got: {', '.join(bad)}")
  return specs


def abstract_state(tree: PyTree) -> PyTree:
  """``jax.ShapeDtypeStruct`` tree of ``tree`` carrying each leaf's sharding (None for numpy leaves)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                      tree)


def _restore_target(abstract: PyTree) -> PyTree:
  """Abstract tree with every leaf's sharding set; a missing sharding means the first local device.

  In a multi-process run every leaf must carry its sharding (there is no sensible default), else ValueError.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  leaves, missing = [], []
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  for path, leaf in flat:
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, jax.sharding.Sharding):
      missing.append(jax.tree_util.keystr(path))
      sharding = default
    leaves.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding))
  if missing and jax.process_count() > 1:
    raise ValueError(f"Multi-process restore needs a sharding on every abstract leaf; missing on: {missing}")
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _encode_data_state(value: Any) -> dict[str, Any]:
  """Wraps the data-iterator state for JsonSave: bytes via base64; other values must round-trip JSON."""
  if value is None:
    return {"kind": "none"}
  if isinstance(value, bytes):
    return {"kind": "bytes", "base64": base64.b64encode(value).decode("ascii")}
  try:
    round_trip = json.loads(json.dumps(value))
  except (TypeError, ValueError) as e:
    raise TypeError(f"data_state must be JSON-serialisable or bytes: {e}") from e
  if round_trip != value:
    raise TypeError("data_state does not survive a JSON round trip unchanged (tuples or non-string dict "
                    f"keys?); got {value!r}, which would come back as {round_trip!r}")
  return {"kind": "json", "value": value}


def _decode_data_state(item: Any) -> Any:
  if not isinstance(item, dict) or item.get("kind") not in ("none", "bytes", "json"):
    raise ValueError(f"malformed data_state item: {item!r}")
  if item["kind"] == "none":
    return None
  if item["kind"] == "bytes":
    return base64.b64decode(item["base64"])
  return item["value"]


def _mismatch_report(step: int, saved: dict[str, LeafSpec], expected: dict[str, LeafSpec]) -> str | None:
  """Lists every leaf that differs between a saved manifest and the expected tree; None when they agree."""
  lines = []
  for name in expected:
    if name not in saved:
      lines.append(f"  {name}: missing from the checkpoint (expected {expected[name]})")
    elif saved[name] != expected[name]:
      lines.append(f"  {name}: saved {saved[name]}, expected {expected[name]}")
  for name in saved:
    if name not in expected:
      lines.append(f"  {name}: in the checkpoint ({saved[name]}) but not in the expected state")
  if not lines:
    return None
  return (f"Checkpoint step {step} does not match the expected train state ({len(lines)} leaves differ); "
          "this is a configuration change, not corruption, so no older step is tried:\n" + "\n".join(lines))


def _parse_manifest(item: Any) -> dict[str, LeafSpec]:
  fmt = item.get("format") if isinstance(item, dict) else None
  if fmt != MANIFEST_FORMAT or not isinstance(item.get("leaves"), dict):
    raise ValueError(f"malformed manifest item (format {fmt!r}, expected {MANIFEST_FORMAT!r})")
  return {name: LeafSpec(tuple(int(d) for d in spec["shape"]), str(spec["dtype"]))
          for name, spec in item["leaves"].items()}


def _all_processes_ok(ok: bool) -> bool:
  """True when ``ok`` holds on every process (a collective in multi-process runs, so all must call it)."""
  if jax.process_count() == 1:
    return ok
  flags = multihost_utils.process_allgather(np.asarray(ok, np.int32))
  return bool(np.all(flags))


def _summary(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


class Checkpointer:
  """Saves and restores (step, train state, data-iterator state) under one directory with orbax.

  Args:
    directory: checkpoint directory, usually ``checkpoint_dir(workdir)``; created if absent. If it exists it
      must be a readable directory holding only checkpoint steps, orbax temporaries/metadata and
      ``corrupt/``, else ``CheckpointDirectoryError``.
    max_to_keep: how many most recent steps to keep (None keeps all). Older steps are deleted by orbax after
      each save; corrupt steps moved to ``corrupt/`` no longer count.
    save_every: ``save(step, ...)`` writes only when ``step % save_every == 0`` (or ``force=True``, or when a
      multi-process preemption sync point is reached).
    async_: write in a background thread after the device-to-host copy (``wait_until_finished`` / ``close``
      wait for it). Default synchronous.

  Use as a context manager, or call ``close()``, so pending writes and deletions finish.
  """

  def __init__(self, directory: str | epath.PathLike, *, max_to_keep: int | None = 3, save_every: int = 1000,
               async_: bool = False):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}")
    path = epath.Path(directory)
    # orbax rejects relative local paths (`--workdir runs/x`); remote ones (gs://...) are absolute already.
    self._directory = path if path.is_absolute() or "://" in str(directory) else epath.Path(os.path.abspath(path))
    self._check_directory()
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(_STATE, ocp.args.StandardSave)
    registry.add(_STATE, ocp.args.StandardRestore)
    for item in (_DATA, _MANIFEST):
      registry.add(item, ocp.args.JsonSave)
      registry.add(item, ocp.args.JsonRestore)
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp_managers.AnySavePolicy([
            ocp_managers.FixedIntervalPolicy(save_every),
            ocp_managers.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=ocp_managers.LatestN(max_to_keep),
        enable_async_checkpointing=async_,
        # AUTO: tmp dir + atomic rename on POSIX, commit_success.txt on GCS. Both are atomic.
        atomicity_options=ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.AUTO),
        cleanup_tmp_directories=False,  # leftovers of interrupted saves are reported, never deleted here
        create=True,
    )
    self._manager = ocp.CheckpointManager(self._directory, options=options, handler_registry=registry)
    self._warn_unfinished()

  # ----------------------------------------------------------------------------------------------- inspection
  @property
  def directory(self) -> epath.Path:
    return self._directory

  def all_steps(self) -> list[int]:
    """Finalised steps, ascending (re-read from disk)."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Highest finalised step on disk (not checked for corruption), or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def should_save(self, step: int) -> bool:
    """Whether ``save(step, ...)`` without ``force`` would write (interval, preemption, step > latest)."""
    return self._manager.should_save(int(step))

  def reached_preemption(self, step: int) -> bool:
    """Orbax/JAX multi-process preemption sync point (False in a single process without that service)."""
    return self._manager.reached_preemption(int(step))

  # ---------------------------------------------------------------------------------------------------- save
  def save(self, step: int, state: PyTree, *, data_state: Any = None, force: bool = False) -> bool:
    """Writes ``state`` and ``data_state`` as checkpoint ``step``; returns whether a checkpoint was written.

    Skips (returns False) when the step is already saved, or, unless ``force``, when the save policy says no.
    ``state`` is any pytree of arrays (typed PRNG keys included); never pass frozen models here.
    ``data_state``: JSON-serialisable value that survives a JSON round trip unchanged, or ``bytes``, or None.
    """
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    if step in self._manager.all_steps():
      log.info("Checkpoint step %d already saved in %s; not saving again.", step, self._directory)
      return False
    if not force and not self._manager.should_save(step):
      return False
    specs = leaf_specs(state)
    manifest = {"format": MANIFEST_FORMAT, "step": step,
                "leaves": {name: {"shape": list(s.shape), "dtype": s.dtype} for name, s in specs.items()}}
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _DATA: ocp.args.JsonSave(_encode_data_state(data_state)),
        _MANIFEST: ocp.args.JsonSave(manifest),
    })
    saved = self._manager.save(step, args=args, force=True)
    if saved:
      log.info("Saved checkpoint step %d to %s.", step, self._directory)
    return saved

  def wait_until_finished(self) -> None:
    """Blocks until a pending asynchronous save (and its old-step deletions) has finished."""
    self._manager.wait_until_finished()

  # ------------------------------------------------------------------------------------------------- restore
  def restore(self, step: int, abstract: PyTree) -> tuple[PyTree, Any]:
    """Restores checkpoint ``step`` onto ``abstract``'s shardings: ``(state, data_state)``; no fallback.

    ``abstract``: tree of ``jax.ShapeDtypeStruct`` (with ``.sharding``) or arrays, e.g. ``abstract_state(x)``
    or ``jax.eval_shape(init, ...)``. Raises ``CheckpointMismatchError`` if the saved tree differs.
    """
    target = _restore_target(abstract)
    manifest = self._read_manifest(int(step))
    self._check_match(int(step), manifest, leaf_specs(target))
    return self._read_state(int(step), target)

  def restore_latest(self, abstract: PyTree) -> tuple[int, PyTree, Any] | None:
    """Restores the newest readable checkpoint: ``(step, state, data_state)``; None if there is none at all.

    Corrupt newer steps are skipped with a WARNING and, once an older step restored, moved to ``corrupt/``.
    Raises ``CheckpointMismatchError`` (no fallback) if a readable step's tree differs from ``abstract``, and
    ``CheckpointCorruptError`` if no step can be read.
    """
    target = _restore_target(abstract)
    expected = leaf_specs(target)
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return None
    failures: list[tuple[int, BaseException]] = []
    for step in steps:
      manifest, error = None, None
      try:
        manifest = self._read_manifest(step)
      except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable
        error = e
      if not _all_processes_ok(error is None):
        failures.append((step, error or RuntimeError("unreadable on another process")))
        self._warn_corrupt(step, failures[-1][1])
        continue
      self._check_match(step, manifest, expected)
      restored, error = None, None
      try:
        restored = self._read_state(step, target)
      except Exception as e:  # noqa: BLE001
        error = e
      if not _all_processes_ok(error is None):
        failures.append((step, error or RuntimeError("unreadable on another process")))
        self._warn_corrupt(step, failures[-1][1])
        continue
      if failures:
        self._quarantine([s for s, _ in failures], restored_step=step)
      log.info("Restored checkpoint step %d from %s.", step, self._directory)
      return (step, *restored)
    details = "\n".join(f"  step {s} ({self._step_path(s)}): {_summary(e)}" for s, e in failures)
    raise CheckpointCorruptError(f"None of the {len(failures)} checkpoints in {self._directory} can be read; "
                                 f"nothing was moved or deleted:\n{details}")

  # ------------------------------------------------------------------------------------------------ lifecycle
  def close(self) -> None:
    """Waits for pending writes/deletions and releases orbax resources."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

  # ---------------------------------------------------------------------------------------------- internals
  def _step_path(self, step: int) -> epath.Path:
    return self._directory / str(step)

  def _read_manifest(self, step: int) -> dict[str, LeafSpec]:
    restored = self._manager.restore(step, args=ocp.args.Composite(**{_MANIFEST: ocp.args.JsonRestore()}))
    return _parse_manifest(restored[_MANIFEST])

  def _read_state(self, step: int, target: PyTree) -> tuple[PyTree, Any]:
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(target),
        _DATA: ocp.args.JsonRestore(),
    }))
    return restored[_STATE], _decode_data_state(restored[_DATA])

  @staticmethod
  def _check_match(step: int, saved: dict[str, LeafSpec], expected: dict[str, LeafSpec]) -> None:
    report = _mismatch_report(step, saved, expected)
    if report is not None:
      raise CheckpointMismatchError(report)

  def _warn_corrupt(self, step: int, error: BaseException) -> None:
    log.warning("Checkpoint step %d at %s is unreadable (%s); trying the previous step.",
                step, self._step_path(step), _summary(error))

  def _quarantine(self, steps: Sequence[int], *, restored_step: int) -> None:
    """Moves corrupt step directories into ``corrupt/<step>.<UTC time>`` (primary process only)."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%f")
    quarantine = self._directory / QUARANTINE_SUBDIR
    if jax.process_index() == 0:
      quarantine.mkdir(parents=True, exist_ok=True)
      for step in steps:
        dest = quarantine / f"{step}.{stamp}"
        self._step_path(step).rename(dest)
        log.warning("Moved corrupt checkpoint step %d to %s (restored step %d instead; nothing deleted).",
                    step, dest, restored_step)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"scott_jax.checkpoint.quarantine.{restored_step}")
    self._manager.reload()

  def _check_directory(self) -> None:
    path = self._directory
    if not path.exists():
      return
    if not path.is_dir():
      raise CheckpointDirectoryError(f"Checkpoint path {path} exists but is not a directory.")
    try:
      entries = list(path.iterdir())
    except OSError as e:
      raise CheckpointDirectoryError(f"Checkpoint directory {path} cannot be read: {e}") from e
    foreign = []
    for entry in entries:
      name = entry.name
      if _TMP_MARK in name or name in _ORBAX_ROOT_ENTRIES or name == QUARANTINE_SUBDIR:
        continue
      if _STEP_NAME.match(name) and entry.is_dir():
        continue
      foreign.append(name)
    if foreign:
      raise CheckpointDirectoryError(
          f"{path} does not look like a checkpoint directory: it holds {sorted(foreign)}, which are neither "
          "step directories nor orbax files. Point the checkpointer at WORKDIR/checkpoints (checkpoint_dir).")

  def _warn_unfinished(self) -> None:
    finalised = {str(s) for s in self._manager.all_steps()}
    unfinished = sorted(e.name for e in self._directory.iterdir()
                        if _TMP_MARK in e.name or (_STEP_NAME.match(e.name) and e.name not in finalised))
    if unfinished:
      log.warning("Ignoring unfinished checkpoint saves in %s (left by an interrupted run; not deleted): %s",
                  self._directory, unfinished)


class PreemptionGuard:
  """Turns SIGTERM (by default) into a flag the train loop polls with ``should_stop(step)``.

  Usage::

    with PreemptionGuard() as guard, Checkpointer(dir, save_every=n) as ckpt:
      for step in range(start + 1, num_steps + 1):
        state = train_step(state, batch)
        ckpt.save(step, state, data_state=it.get_state())
        if guard.should_stop(step):
          ckpt.save(step, state, data_state=it.get_state(), force=True)
          break

  Single process: the handler only records the signal (no work inside the handler); previous handlers come
  back on ``uninstall``/exit. Multi-process (``jax.process_count() > 1``): no Python handler is installed,
  since JAX's preemption service owns SIGTERM there, and ``should_stop(step)`` is orbax's
  ``reached_preemption(step)``, which every process must call at every step and which turns True on all of
  them at the same step.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
    self._signals = tuple(signals)
    self._previous: dict[int, Any] = {}
    self._received: int | None = None
    self._reported = False
    self._multiprocess = False

  def install(self) -> PreemptionGuard:
    """Installs the handlers (main thread only); returns self. Installing twice is a no-op."""
    if self._previous:
      return self
    self._multiprocess = jax.process_count() > 1
    if self._multiprocess:
      log.info("Multi-process run: SIGTERM is left to JAX's preemption service; should_stop polls it.")
      return self
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("PreemptionGuard.install must be called from the main thread (Python signal rule).")
    for sig in self._signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def uninstall(self) -> None:
    """Restores the handlers that were in place before ``install``."""
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    del frame
    self._received = signum

  def request_stop(self) -> None:
    """Sets the stop flag programmatically (as if a signal had arrived)."""
    self._received = signal.SIGTERM

  def should_stop(self, step: int | None = None) -> bool:
    """True once a stop signal arrived (single process) or at a multi-process preemption sync point.

    ``step`` is required in multi-process runs (the sync point is per step).
    """
    if self._multiprocess:
      if step is None:
        raise ValueError("should_stop needs the step in a multi-process run (preemption sync point).")
      return ocp.multihost.reached_preemption(int(step))
    if self._received is not None:
      if not self._reported:
        log.warning("Received %s; stopping after saving a checkpoint.", signal.Signals(self._received).name)
        self._reported = True
      return True
    return False

  def __enter__(self) -> PreemptionGuard:
    return self.install()

  def __exit__(self, *exc: object) -> None:
    self.uninstall()


def install_sigterm_handler() -> PreemptionGuard:
  """Installs a ``PreemptionGuard`` for SIGTERM and returns it (call ``uninstall()`` to undo)."""
  return PreemptionGuard().install()


# ---------------------------------------------------------------------------------------------------------
# Reading one field of a checkpoint without the train state's code (export, the eval job, sampling).

_KEY_PART = re.compile(r"\['([^']*)'\]|\[(\d+)\]|\.([A-Za-z_]\w*)")


class CheckpointReadError(RuntimeError):
  """A finalised checkpoint step that cannot be read (missing manifest, unreadable arrays, missing field)."""


def finalised_steps(directory: str | os.PathLike) -> tuple[list[int], list[str]]:
  """(complete steps ascending, names of steps still being written) in a checkpoint directory.

  orbax writes a step into ``<step>.orbax-checkpoint-tmp-<t>`` and renames it to ``<step>`` when complete, so
  an integer-named directory is complete. A missing directory gives ([], []).
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return [], []
  steps, pending = [], []
  for name in os.listdir(directory):
    if _TMP_MARK in name:
      pending.append(name)
    elif name.isdigit() and os.path.isdir(os.path.join(directory, name)):
      steps.append(int(name))
  return sorted(steps), sorted(pending)


def _parse_keystr(key: str) -> tuple[str, ...]:
  """``.ema['params']['conv_in']['kernel']`` (jax.tree_util.keystr) -> ('ema', 'params', 'conv_in', 'kernel')."""
  parts = [next(g for g in m.groups() if g is not None) for m in _KEY_PART.finditer(key)]
  if "".join(m.group(0) for m in _KEY_PART.finditer(key)) != key:
    raise ValueError(f"cannot parse state key {key!r}")
  return tuple(parts)


def read_manifest(directory: str | os.PathLike, step: int) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
  """The manifest of checkpoint ``step`` (`scott_jax.checkpoint`): {leaf path: (shape, dtype)}."""
  path = os.path.join(os.fspath(directory), str(step), "manifest", "metadata")
  try:
    with open(path) as fh:
      manifest = json.load(fh)
  except (OSError, ValueError) as e:
    raise CheckpointReadError(f"checkpoint step {step} in {os.fspath(directory)} has no readable manifest "
                              f"({path}): {e}") from e
  if manifest.get("format") != MANIFEST_FORMAT:
    raise CheckpointReadError(f"{path}: manifest format {manifest.get('format')!r}, expected "
                              f"{MANIFEST_FORMAT!r}")
  return {_parse_keystr(k): (tuple(v["shape"]), v["dtype"]) for k, v in manifest["leaves"].items()}


def restore_subtree(directory: str | os.PathLike, step: int, field: str) -> PyTree:
  """The train-state field ``field`` (e.g. "ema") of checkpoint ``step``, as a nested dict of device arrays.

  Only that subtree is read (orbax partial restore), its target built from the manifest. Raises
  CheckpointReadError naming the step when the step is missing, has no such field or cannot be read.
  """
  directory = os.path.abspath(os.fspath(directory))  # orbax rejects relative paths
  step_dir = os.path.join(directory, str(step))
  if not os.path.isdir(step_dir):
    raise CheckpointReadError(f"checkpoint step {step} does not exist in {directory}")
  leaves = {p[1:]: v for p, v in read_manifest(directory, step).items() if p[0] == field}
  if not leaves:
    raise CheckpointReadError(f"checkpoint step {step} in {directory} has no field '{field}'")
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = traverse_util.unflatten_dict(
    {p: jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding) for p, (shape, dtype) in leaves.items()})
  item = {field: abstract}
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), item)
  try:
    with ocp.PyTreeCheckpointer() as reader:
      out = reader.restore(os.path.join(step_dir, "state"),
                           args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # noqa: BLE001 - any orbax failure means the step is unreadable
    raise CheckpointReadError(f"checkpoint step {step} in {directory} cannot be read: "
                              f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
  return out[field]
