"""Scale-out of the train step: device mesh, sharding rules, the sharded jit, multi-process start, global batches.

The mesh has three named axes (``config.mesh``): ``data`` (pure data parallelism), ``fsdp`` (data parallelism
whose parameters, optimizer states and, by config, frozen models are sharded: ZeRO-3 / FSDP) and ``tensor``
(the last dimension of large kernels split, XLA's SPMD partitioner inserting the collectives). One size may be
-1 and then fills the devices; a product that does not match the device count raises `MeshError`.

Sharding is decided by logical-axis rules (``config.mesh.rules``) applied to shapes, with no annotation in the
models (the Flax modules are the diffusers layout, so the rule must work on any parameter tree) but one: cuDNN
attention's inputs and output are constrained to ``batch`` (its partitioners demand it; `jit_train_step`):

- ``batch``: the leading dimension of every batch array, over ``data,fsdp`` by default (batch size must divide);
- ``param_fsdp``: a parameter (or optimizer moment) with at least ``fsdp_min_size`` elements is split along its
  largest dimension divisible by the axes' size (the first such when several tie);
- ``param_tensor``: the last dimension (output features) of a >= 2-D large kernel, when divisible.

Smaller leaves, scalars (the step, Adam counts) and the PRNG key are replicated. Optimizer moments have the
parameters' shapes, so they get the same shardings. The frozen networks are sharded by the same rules
(``mesh.frozen = "fsdp"``) or replicated.

Typical use (single or multiple processes; `make_global_batch` turns each process's part of a batch into one
global array)::

  initialize_distributed(config.mesh)                    # before any other JAX call
  mesh = make_mesh(config.mesh)
  state_sh, frozen_sh, batch_sh = shardings_for(config.mesh, mesh, abstract_state, frozen, batch_spec)
  step = jit_train_step(make_train_step(config, models), mesh, state_sh, batch_sh, frozen_sh,
                        logical_rules(config.mesh))
  state, frozen = put_tree(state, state_sh), put_tree(frozen, frozen_sh)
  state, metrics = step(state, make_global_batch(local_batch, batch_sh), frozen)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from scott_jax.choices import DISTRIBUTED_MODES, FROZEN_PLACEMENTS, LOGICAL_AXES, MESH_AXES
from scott_jax.config import ConfigDict, ConfigError

PyTree = Any


class MeshError(ConfigError):
  """The mesh config does not fit the devices, or an array does not fit its sharding (a ConfigError: the CLI
  exits 2 with its one line)."""


# ---------------------------------------------------------------------------------------------------------
# Mesh.

def mesh_shape(mesh_cfg: ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes for ``num_devices`` devices; a -1 entry takes the remaining factor.

  Raises MeshError when more than one size is -1, when the fixed sizes do not divide ``num_devices`` (with a
  -1) or when their product differs from ``num_devices`` (without one).
  """
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  fill = [a for a, s in zip(MESH_AXES, sizes, strict=True) if s == -1]
  desc = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
  if len(fill) > 1:
    raise MeshError(f"config.mesh has more than one axis set to -1 ({desc}); at most one may fill the devices")
  fixed = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % fixed:
      raise MeshError(f"config.mesh ({desc}): the fixed axes' product {fixed} does not divide the "
                      f"{num_devices} devices")
    sizes[MESH_AXES.index(fill[0])] = num_devices // fixed
  elif fixed != num_devices:
    raise MeshError(f"config.mesh ({desc}) has {fixed} devices but {num_devices} are present; make the product "
                    "match or set one axis to -1")
  return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over ``devices`` (default: all devices of all processes), Auto axis types.

  Devices are laid out with ``mesh_utils.create_device_mesh`` (topology-aware on TPU and GPU), so the innermost
  axis (tensor, then fsdp) gets the closest devices.
  """
  from jax.experimental import mesh_utils

  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):  # unusual topologies: plain order
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_rules(mesh_cfg: ConfigDict) -> dict[str, tuple[str, ...]]:
  """``mesh.rules`` as {logical axis: mesh axes}; logical axes without a rule map to () (replicated)."""
  out = {name: () for name in LOGICAL_AXES}
  for name, axes in mesh_cfg.rules:
    if name not in LOGICAL_AXES:
      raise MeshError(f"config.mesh.rules names unknown logical axis '{name}'; allowed: {', '.join(LOGICAL_AXES)}")
    parsed = tuple(a.strip() for a in str(axes).split(",") if a.strip())
    bad = [a for a in parsed if a not in MESH_AXES]
    if bad:
      raise MeshError(f"config.mesh.rules maps '{name}' to unknown mesh axes {bad}; allowed: {', '.join(MESH_AXES)}")
    out[name] = parsed
  return out


def _active(mesh: Mesh, axes: Sequence[str]) -> tuple[tuple[str, ...], int]:
  """The axes of size > 1 and their product."""
  kept = tuple(a for a in axes if mesh.shape[a] > 1)
  return kept, math.prod(mesh.shape[a] for a in kept)


def _spec_entry(axes: tuple[str, ...]) -> Any:
  return axes[0] if len(axes) == 1 else axes


# ---------------------------------------------------------------------------------------------------------
# Sharding rules.

def param_partition_spec(shape: Sequence[int], mesh: Mesh, rules: Mapping[str, tuple[str, ...]],
                         min_size: int) -> P:
  """PartitionSpec of one parameter-like leaf of ``shape`` (see the module docstring for the rule)."""
  shape = tuple(int(d) for d in shape)
  spec: list[Any] = [None] * len(shape)
  if not shape or math.prod(shape) < max(min_size, 1):
    return P(*spec)
  t_axes, t_size = _active(mesh, rules.get("param_tensor", ()))
  if t_axes and len(shape) >= 2 and shape[-1] % t_size == 0:
    spec[-1] = _spec_entry(t_axes)
  f_axes, f_size = _active(mesh, rules.get("param_fsdp", ()))
  if f_axes:
    free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % f_size == 0]
    if free:
      spec[max(free, key=lambda i: (shape[i], -i))] = _spec_entry(f_axes)
  return P(*spec)


def _leaf_shape(x: Any) -> tuple[int, ...]:
  return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def param_shardings(tree: PyTree, mesh: Mesh, mesh_cfg: ConfigDict) -> PyTree:
  """NamedSharding tree for a tree of parameter-like leaves (arrays or ShapeDtypeStructs), by the rules."""
  rules = logical_rules(mesh_cfg)
  return jax.tree.map(
    lambda x: NamedSharding(mesh, param_partition_spec(_leaf_shape(x), mesh, rules, int(mesh_cfg.fsdp_min_size))),
    tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shardings(batch_spec: PyTree, mesh: Mesh, mesh_cfg: ConfigDict) -> PyTree:
  """NamedSharding tree splitting the leading (batch) dimension over the ``batch`` rule's mesh axes.

  Raises MeshError naming the array when its batch size does not divide by those axes' size.
  """
  axes, size = _active(mesh, logical_rules(mesh_cfg)["batch"])

  def one(path: Any, x: Any) -> NamedSharding:
    shape = _leaf_shape(x)
    if not shape:
      return replicated(mesh)
    if shape[0] % size:
      raise MeshError(f"batch array {jax.tree_util.keystr(path)} has batch size {shape[0]}, not divisible by the "
                      f"{size} devices of mesh axes {axes}; change train.batch_size or config.mesh")
    return NamedSharding(mesh, P(_spec_entry(axes) if axes else None, *([None] * (len(shape) - 1))))

  return jax.tree_util.tree_map_with_path(one, batch_spec)


def state_shardings(abstract_state: PyTree, mesh: Mesh, mesh_cfg: ConfigDict) -> PyTree:
  """Shardings of a train state (`scott_jax.step.TrainState` or any pytree): the parameter rules on every
  leaf, except ``step`` and ``key`` fields (replicated)."""
  out = param_shardings(abstract_state, mesh, mesh_cfg)
  if dataclasses.is_dataclass(abstract_state) and hasattr(out, "replace"):
    fields = {f.name for f in dataclasses.fields(abstract_state)}
    out = out.replace(**{k: replicated(mesh) for k in ("step", "key") if k in fields})
  return out


def frozen_shardings(frozen: PyTree, mesh: Mesh, mesh_cfg: ConfigDict) -> PyTree:
  """Shardings of the frozen networks: the parameter rules (``mesh.frozen = "fsdp"``) or replicated."""
  if mesh_cfg.frozen == "replicate":
    return jax.tree.map(lambda _: replicated(mesh), frozen)
  if mesh_cfg.frozen != "fsdp":
    raise MeshError(f"config.mesh.frozen = {mesh_cfg.frozen!r}; allowed: {', '.join(FROZEN_PLACEMENTS)}")
  return param_shardings(frozen, mesh, mesh_cfg)


def shardings_for(mesh_cfg: ConfigDict, mesh: Mesh, abstract_state: PyTree, frozen: PyTree,
                  batch_spec: PyTree) -> tuple[PyTree, PyTree, PyTree]:
  """(state, frozen, batch) sharding trees for the train step's three arguments."""
  return (state_shardings(abstract_state, mesh, mesh_cfg), frozen_shardings(frozen, mesh, mesh_cfg),
          batch_shardings(batch_spec, mesh, mesh_cfg))


def with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs of ``tree`` (arrays or structs) carrying ``shardings``: abstract inputs for ``lower``."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(_leaf_shape(x), x.dtype, sharding=s), tree, shardings)


# ---------------------------------------------------------------------------------------------------------
# The sharded step and data placement.

def jit_train_step(step_fn: Callable, mesh: Mesh, state_sh: PyTree, batch_sh: PyTree, frozen_sh: PyTree,
                   rules: Mapping[str, Sequence[str]] | None = None) -> Any:
  """``jax.jit(step_fn)`` for ``step_fn(state, batch, frozen) -> (state, metrics)`` with explicit in/out
  shardings (the state keeps its shardings, metrics are replicated) and the state donated.

  ``rules`` (`logical_rules` of the mesh config) are in force while the step is traced, on the mesh, as Flax
  logical-axis rules: the models' one activation constraint (cuDNN attention's inputs and output, so also its
  backward's cotangent, sharded along ``batch`` only, `scott_jax.models.unet.batch_sharded`) follows them.
  ``step_fn`` must be un-jitted (`scott_jax.step.make_train_step` returns it so); a jitted function's
  ``__wrapped__`` is used if given one.
  """
  fn = getattr(step_fn, "__wrapped__", step_fn)
  if rules is not None:
    flax_rules = tuple((name, tuple(axes) or None) for name, axes in rules.items())
    inner = fn

    def fn(state: PyTree, batch: PyTree, frozen: PyTree) -> Any:
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(flax_rules):
        return inner(state, batch, frozen)

  return jax.jit(fn, in_shardings=(state_sh, batch_sh, frozen_sh), out_shardings=(state_sh, replicated(mesh)),
                 donate_argnums=(0,))


def put_tree(tree: PyTree, shardings: PyTree) -> PyTree:
  """Global arrays of ``tree``'s values with ``shardings``; every process must hold the same full values
  (host or device arrays, e.g. models loaded from the same files). Each device gets only its slice."""
  def one(x: Any, s: jax.sharding.Sharding) -> jax.Array:
    if isinstance(x, jax.Array) and x.sharding == s:
      return x
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

  return jax.tree.map(one, tree, shardings)


def make_global_batch(local_batch: PyTree, batch_sh: PyTree) -> PyTree:
  """One global batch from each process's part (numpy, leading dim = global batch / process count), in process
  order along the batch axis (``jax.make_array_from_process_local_data``). In one process: a device_put."""
  n = jax.process_count()

  def one(x: Any, s: jax.sharding.Sharding) -> jax.Array:
    x = np.asarray(x)
    if not x.shape:
      return jax.make_array_from_process_local_data(s, x, ())
    return jax.make_array_from_process_local_data(s, x, (x.shape[0] * n, *x.shape[1:]))

  return jax.tree.map(one, local_batch, batch_sh)


def local_batch_size(global_batch: int) -> int:
  """This process's share of a global batch; raises MeshError when the process count does not divide it."""
  n = jax.process_count()
  if global_batch % n:
    raise MeshError(f"global batch {global_batch} does not divide over {n} processes")
  return global_batch // n


def gather_tree(tree: PyTree) -> PyTree:
  """numpy copies of the full global values of ``tree`` on every process (a collective in multi-process runs:
  every process must call it)."""
  if jax.process_count() == 1:
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
  from jax.experimental import multihost_utils

  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def allgather_json(value: Any) -> list[Any]:
  """Every process's JSON-able ``value``, in process order (a collective in multi-process runs: every process
  must call it), e.g. the per-process data-iterator states a checkpoint keeps."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils

  data = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(rows[i, :int(n)].tobytes().decode("utf-8")) for i, n in enumerate(sizes)]


def bytes_per_device(tree: PyTree, shardings: PyTree) -> int:
  """Bytes one device holds of ``tree`` under ``shardings`` (the largest shard; leaves' own dtypes)."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
    total += math.prod(s.shard_shape(_leaf_shape(x))) * np.dtype(x.dtype).itemsize
  return total


# ---------------------------------------------------------------------------------------------------------
# Multi-process start.

@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  """How to call ``jax.distributed.initialize``: ``source`` is explicit | slurm | tpu | forced; None fields are
  left to JAX's own cluster detection."""

  source: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def kwargs(self) -> dict[str, Any]:
    return {k: v for k, v in (("coordinator_address", self.coordinator_address),
                              ("num_processes", self.num_processes), ("process_id", self.process_id))
            if v is not None}


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
  if name not in environ or environ[name] == "":
    return None
  try:
    return int(environ[name])
  except ValueError as e:
    raise MeshError(f"environment variable {name}={environ[name]!r} is not an integer") from e


def distributed_spec(mesh_cfg: ConfigDict, environ: Mapping[str, str] | None = None) -> DistributedSpec | None:
  """Whether and how to start JAX's distributed runtime, from ``config.mesh`` and the environment.

  ``mesh.distributed``: off -> None; on -> always (explicit values where given, JAX's detection for the rest);
  auto -> explicit when a coordinator address is given (``mesh.coordinator_address`` or
  ``$JAX_COORDINATOR_ADDRESS``, then num_processes / process_id must be given too, by config or
  ``$JAX_NUM_PROCESSES`` / ``$JAX_PROCESS_ID``), else slurm when SLURM runs more than one task
  (``SLURM_JOB_ID``, ``SLURM_NTASKS`` > 1), else tpu on a multi-host TPU slice (``TPU_WORKER_HOSTNAMES`` or
  ``TPU_PROCESS_ADDRESSES`` listing several hosts), else None (one process).
  """
  env = os.environ if environ is None else environ
  mode = mesh_cfg.distributed
  if mode == "off":
    return None
  if mode not in DISTRIBUTED_MODES:
    raise MeshError(f"config.mesh.distributed = {mode!r}; allowed: {', '.join(DISTRIBUTED_MODES)}")
  address = mesh_cfg.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  nproc = int(mesh_cfg.num_processes) or _int_env(env, "JAX_NUM_PROCESSES")
  pid = int(mesh_cfg.process_id) if int(mesh_cfg.process_id) >= 0 else _int_env(env, "JAX_PROCESS_ID")
  if address is not None:
    if nproc is None or pid is None:
      raise MeshError(f"coordinator address {address} is set but the number of processes ({nproc}) or this process's "
                      f"id ({pid}) is not: set config.mesh.num_processes / process_id or $JAX_NUM_PROCESSES / "
                      "$JAX_PROCESS_ID")
    if not 0 <= pid < nproc:
      raise MeshError(f"process id {pid} is outside [0, {nproc})")
    return DistributedSpec("explicit", address, nproc, pid)
  if mode == "on":
    return DistributedSpec("forced", None, nproc, pid)
  if "SLURM_JOB_ID" in env and (_int_env(env, "SLURM_NTASKS") or 1) > 1:
    return DistributedSpec("slurm", None, nproc, pid)
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return DistributedSpec("tpu", None, nproc, pid)
  return None


def initialize_distributed(mesh_cfg: ConfigDict, environ: Mapping[str, str] | None = None) -> bool:
  """Calls ``jax.distributed.initialize`` as `distributed_spec` says (once; before any other JAX call).
  Returns whether the distributed runtime is up."""
  if jax.distributed.is_initialized():
    return True
  spec = distributed_spec(mesh_cfg, environ)
  if spec is None:
    return False
  logging.info("Starting jax.distributed (%s): %s", spec.source, spec.kwargs())
  jax.distributed.initialize(**spec.kwargs())
  logging.info("Process %d of %d; %d local / %d global devices.", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True
