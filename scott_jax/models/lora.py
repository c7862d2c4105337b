"""LoRA overlays on Flax parameter trees (pure functions), with PEFT-layout export for diffusers.

A LoRA overlay adds a low-rank update to selected kernels: W' = W + (alpha / r) * delta(A, B), with B = 0 at
init so that the overlay starts as the identity. The overlay tree mirrors the parameter tree down to each
selected kernel and replaces the kernel leaf by ``{"lora_A": A, "lora_B": B}``:

  Dense kernel W (in, out):        A (in, r), B (r, out),             delta = A @ B.
  Conv kernel W (kh, kw, in, out): A (kh, kw, in, r), B (1, 1, r, out), delta[h, w] = A[h, w] @ B[0, 0].

The conv form is PEFT's: A is a conv with the base kernel size (and stride/padding) to r channels, B a 1x1
conv from r channels, so conv(conv(x, A), B) = conv(x, delta). Kernels are selected by regular expressions
matched (`re.search`) against the '/'-joined Flax parameter path, e.g.
``up_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q/kernel``; `PRESETS` names the usual groups. alpha
is a static hyper-parameter (not in the tree, so it is never trained); r is read from the shape of A, so
targets may have different ranks.

Two ways to run a network with an overlay, the same function: `merge` builds the merged kernels W' once (the
network then runs as usual); `factorised` intercepts the overlaid ``nn.Dense`` / ``nn.Conv`` calls and computes
y = x W + (alpha / r) (x A) B (for a conv: A with the layer's stride, padding and dilation, B as a 1x1), as PEFT
does. With gradients wrt the overlay, merged costs a full-size kernel gradient dL/dW' = x^T dy (as many FLOPs as
the layer's forward) before projecting it onto A and B; factorised costs rank-r matmuls instead, about
3 r (k d_in + d_out) / (k d_in d_out) of the layer's forward (k = kh kw), i.e. less than the full-size gradient
when that fraction is below 1. Without gradients wrt the overlay, merged is cheaper (a batch-independent merge).

`export_peft` / `import_peft` write and read a .safetensors file in the layout that diffusers' PEFT
integration loads (a pipeline's `load_lora_weights`, `UNet2DConditionModel.load_lora_adapter`): keys
``unet.<torch module>.lora_A.weight`` / ``lora_B.weight`` in torch layout and the `LoraConfig` (r,
lora_alpha, target_modules, rank_pattern) as JSON under the file metadata key ``lora_adapter_metadata``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Array = jax.Array

LORA_A = "lora_A"
LORA_B = "lora_B"

# Named groups of kernels (regexes over '/'-joined Flax paths, diffusers module names with `_<index>`).
PRESETS: dict[str, str] = {
  # Self- and cross-attention projections of the transformer blocks (diffusers `Attention`).
  "attention": r"(^|/)attn\d+/(to_q|to_k|to_v|to_out_0)/kernel$",
  # The GEGLU feed-forward of the transformer blocks.
  "feed_forward": r"(^|/)ff/(net_0/proj|net_2)/kernel$",
  # The transformer's input/output projections (1x1 conv or linear, as configured).
  "proj": r"(^|/)attentions_\d+/(proj_in|proj_out)/kernel$",
  # Conv kernels of the residual blocks and of the down/up samplers.
  "conv": r"(^|/)(resnets_\d+/(conv1|conv2|conv_shortcut)|downsamplers_0/conv|upsamplers_0/conv)/kernel$",
}

INIT_KINDS = ("kaiming", "gaussian")


def _path_str(path: tuple[str, ...]) -> str:
  return "/".join(str(p) for p in path)


def _compile_targets(targets: Sequence[str] | str) -> list[re.Pattern]:
  if isinstance(targets, str):
    targets = (targets,)
  if not targets:
    raise ValueError("targets must name at least one preset or regex")
  return [re.compile(PRESETS.get(t, t)) for t in targets]


def select_targets(params: PyTree, targets: Sequence[str] | str, scope: str | None = None) -> list[str]:
  """Sorted '/'-joined paths of the kernels selected by ``targets`` (preset names or regexes).

  A kernel is selected when its path matches any target and, if given, the ``scope`` regex (e.g.
  ``r"^up_blocks_"``, or ``r"^params/up_blocks_"`` on a tree with the Flax ``params`` wrapper: both are
  matched against the full path of ``params`` as given). Only 2-D (Dense) and 4-D (Conv HWIO) leaves can be
  targets; a selected leaf of any other rank raises, and so does a selection that matches nothing.
  """
  patterns = _compile_targets(targets)
  scope_re = re.compile(scope) if scope is not None else None
  selected = []
  for path, leaf in traverse_util.flatten_dict(params).items():
    name = _path_str(path)
    if not any(p.search(name) for p in patterns) or (scope_re is not None and not scope_re.search(name)):
      continue
    if np.ndim(leaf) not in (2, 4):
      raise ValueError(
        f"LoRA target '{name}' has shape {np.shape(leaf)}; only 2-D and 4-D kernels are supported")
    selected.append(name)
  if not selected:
    raise ValueError(f"no parameter matches targets {list(targets)} (scope {scope!r})")
  return sorted(selected)


def _overlay_shapes(params: PyTree, targets: Sequence[str] | str, rank: int,
                    scope: str | None) -> list[tuple[str, tuple[int, ...], tuple[int, ...], int]]:
  """[(kernel path, A shape, B shape, fan_in)] of the overlay `init` creates (shapes only; any array-like or
  ShapeDtypeStruct leaves)."""
  if rank < 1:
    raise ValueError(f"rank must be >= 1, got {rank}")
  flat = {_path_str(k): v for k, v in traverse_util.flatten_dict(params).items()}
  out = []
  for name in select_targets(params, targets, scope):
    *window, d_in, d_out = np.shape(flat[name])
    out.append((name, (*window, d_in, rank), (1,) * len(window) + (rank, d_out), d_in * math.prod(window)))
  return out


def init(key: Array, params: PyTree, targets: Sequence[str] | str, rank: int, *, scope: str | None = None,
         init_a: str = "kaiming") -> PyTree:
  """A LoRA overlay tree for the kernels of ``params`` selected by ``targets`` (see `select_targets`).

  B = 0 (the overlay starts as the identity). A is initialised as PEFT does: ``"kaiming"`` is torch's
  kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = in * kh * kw;
  ``"gaussian"`` is N(0, (1/r)^2). Arrays are float32. Returns the nested overlay dict (module docstring).
  Not traceable (the draw is cut up on the host); `init_shapes` gives the shapes under tracing.
  """
  if init_a not in INIT_KINDS:
    raise ValueError(f"unknown init_a '{init_a}'; allowed: {', '.join(INIT_KINDS)}")
  shapes = _overlay_shapes(params, targets, rank, scope)
  # One draw for all targets, cut up on the host: per-target draws would compile a kernel per shape.
  sizes = [math.prod(a_shape) for _, a_shape, _, _ in shapes]
  if init_a == "kaiming":
    draw = np.asarray(jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0))
  else:
    draw = np.asarray(jax.random.normal(key, (sum(sizes),), jnp.float32))
  chunks = np.split(draw, np.cumsum(sizes)[:-1])
  out = {}
  for (name, a_shape, b_shape, fan_in), chunk in zip(shapes, chunks, strict=True):
    scale = 1.0 / math.sqrt(fan_in) if init_a == "kaiming" else 1.0 / rank
    path = tuple(name.split("/"))
    out[path + (LORA_A,)] = jnp.asarray((chunk * np.float32(scale)).reshape(a_shape))
    out[path + (LORA_B,)] = jnp.asarray(np.zeros(b_shape, np.float32))
  return traverse_util.unflatten_dict(out)


def init_shapes(params: PyTree, targets: Sequence[str] | str, rank: int, *, scope: str | None = None) -> PyTree:
  """`init`'s overlay as float32 jax.ShapeDtypeStruct leaves (no draw; ``params`` may be abstract)."""
  out = {}
  for name, a_shape, b_shape, _ in _overlay_shapes(params, targets, rank, scope):
    path = tuple(name.split("/"))
    out[path + (LORA_A,)] = jax.ShapeDtypeStruct(a_shape, jnp.float32)
    out[path + (LORA_B,)] = jax.ShapeDtypeStruct(b_shape, jnp.float32)
  return traverse_util.unflatten_dict(out)


def overlay_size(params: PyTree, targets: Sequence[str] | str, rank: int, *, scope: str | None = None) -> int:
  """Number of LoRA parameters `init` would create: sum over targets of r (kh * kw * in + out).

  Allocates nothing (shapes only), so it can size the rank for a target trainable share, e.g. the paper's
  ~3.6% of the U-Net for the discriminator: rank = round(share * count_params(params) / overlay_size(.., 1)).
  """
  return int(sum(math.prod(a) + math.prod(b) for _, a, b, _ in _overlay_shapes(params, targets, rank, scope)))


def _delta(a: Array, b: Array) -> Array:
  """The low-rank update (without the alpha / r scale), shaped like the base kernel."""
  if a.ndim == 2:
    return a @ b
  return jnp.einsum("...ir,ro->...io", a, b.reshape(b.shape[-2:]))


def _overlays(lora: PyTree) -> dict[tuple[str, ...], tuple[Array, Array]]:
  """{kernel path: (A, B)} from an overlay tree."""
  flat = traverse_util.flatten_dict(lora)
  pairs: dict[tuple[str, ...], dict[str, Array]] = {}
  for path, leaf in flat.items():
    if path[-1] not in (LORA_A, LORA_B):
      raise ValueError(f"not a LoRA overlay leaf: {_path_str(path)}")
    pairs.setdefault(path[:-1], {})[path[-1]] = leaf
  out = {}
  for path, ab in pairs.items():
    if set(ab) != {LORA_A, LORA_B}:
      raise ValueError(f"LoRA overlay for '{_path_str(path)}' must have both {LORA_A} and {LORA_B}")
    out[path] = (ab[LORA_A], ab[LORA_B])
  return out


def merge(params: PyTree, lora: PyTree, alpha: float) -> PyTree:
  """params with W + (alpha / r) * delta(A, B) for every overlaid kernel (r = A.shape[-1]); jit-able.

  ``params`` is any nested dict of arrays (a Flax ``{"params": ...}`` dict or its inside, whichever the
  overlay was built from); untouched leaves are passed through. The update is computed in float32 and cast to
  W's dtype.
  """
  flat = traverse_util.flatten_dict(params)
  for path, (a, b) in _overlays(lora).items():
    if path not in flat:
      raise KeyError(f"LoRA overlay for '{_path_str(path)}' has no kernel in params")
    w = flat[path]
    scale = alpha / a.shape[-1]
    delta = _delta(a.astype(jnp.float32), b.astype(jnp.float32))
    if delta.shape != w.shape:
      raise ValueError(f"LoRA delta {delta.shape} does not match kernel '{_path_str(path)}' {w.shape}")
    flat[path] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
  return traverse_util.unflatten_dict(flat)


def _branch(module: nn.Module, x: Array, a: Array, b: Array, scale: float) -> Array:
  """scale * B(A(x)) for the flax ``nn.Dense`` / ``nn.Conv`` ``module`` in its compute dtype: A applied as the layer
  itself (same strides, padding, dilation; r output features, no bias), then B (1 x ... x r x d_out) as a
  matmul over the channels (a 1x1 conv). The scale is folded into B in float32 before the cast."""
  if isinstance(module, nn.Conv) and (module.feature_group_count != 1 or module.mask is not None):
    raise ValueError(f"factorised LoRA does not support grouped or masked convs ({'/'.join(module.path)})")
  rank = a.shape[-1]
  u = module.clone(parent=None, name=None, features=rank, use_bias=False).apply({"params": {"kernel": a}}, x)
  b_mat = scale * b.astype(jnp.float32).reshape(rank, b.shape[-1])
  u, b_mat = nn.dtypes.promote_dtype(u, b_mat, dtype=module.dtype)
  return jax.lax.dot_general(u, b_mat, (((u.ndim - 1,), (0,)), ((), ())), precision=module.precision)


@contextlib.contextmanager
def factorised(lora: PyTree, alpha: float) -> Iterator[None]:
  """Within the block, every flax ``nn.Dense`` / ``nn.Conv`` call whose kernel has an overlay in ``lora`` computes
  base(x) + (alpha / r) * B(A(x)) (see `_branch`) instead of using a merged kernel: ``module.apply(teacher_params,
  ...)`` inside it is the same function as ``module.apply(merge(teacher_params, lora, alpha), ...)`` (float32:
  to rounding; lower compute dtypes round the branch separately), with rank-r parameter gradients.

  The overlay's kernel paths are matched against the modules' paths (`nn.Module.path`, which includes the names
  of ``nn.remat``-wrapped blocks); a leading ``params`` (an overlay built from a ``{"params": ...}`` tree) is
  dropped. Functions must be traced inside the block (a jitted function traced before it keeps its trace). On
  leaving the block, an overlay that no call used raises (a path that names no Dense / Conv, or a function
  traced outside the block), so an overlay is never silently dropped; run only the part of a network the
  overlay covers.
  """
  overlays: dict[tuple[str, ...], tuple[Array, Array]] = {}
  for path, ab in _overlays(lora).items():
    if path[-1] != "kernel":
      raise ValueError(f"factorised LoRA needs kernel paths; got '{_path_str(path)}'")
    module_path = path[1:-1] if path[0] == "params" else path[:-1]
    overlays[module_path] = ab
  used: set[tuple[str, ...]] = set()

  def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv)):
      return next_fun(*args, **kwargs)
    path = tuple(module.path)
    if path not in overlays:
      return next_fun(*args, **kwargs)
    a, b = overlays[path]
    kernel = module.get_variable("params", "kernel")
    if kernel is None or a.shape[:-1] != kernel.shape[:-1] or b.shape[-1] != kernel.shape[-1]:
      raise ValueError(f"LoRA overlay A {a.shape}, B {b.shape} does not match kernel '{'/'.join(path)}' "
                       f"{None if kernel is None else kernel.shape}")
    used.add(path)
    x = args[0] if args else kwargs["inputs"]
    return next_fun(*args, **kwargs) + _branch(module, x, a, b, alpha / a.shape[-1])

  with nn.intercept_methods(interceptor):
    yield
  unused = sorted("/".join(p + ("kernel",)) for p in set(overlays) - used)
  if unused:
    raise ValueError(f"{len(unused)} LoRA overlays were not applied (no nn.Dense / nn.Conv call at their path "
                     f"inside the block), e.g. {unused[:3]}")


def trainable_mask(tree: PyTree, patterns: Sequence[str] | str | None = None) -> PyTree:
  """A bool pytree shaped like ``tree``: True for trainable leaves.

  With ``patterns=None`` the LoRA leaves (paths ending in lora_A / lora_B) are trainable; otherwise the leaves
  whose '/'-joined path matches any regex (or preset name) in ``patterns``. Use `mask_labels` for
  `optax.multi_transform` or pass the bools to `optax.masked`.
  """
  regexes = None if patterns is None else _compile_targets(patterns)

  def is_trainable(path: tuple[Any, ...], _: Any) -> bool:
    names = tuple(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p))) for p in path)
    if regexes is None:
      return bool(names) and names[-1] in (LORA_A, LORA_B)
    name = _path_str(names)
    return any(r.search(name) for r in regexes)

  return jax.tree_util.tree_map_with_path(is_trainable, tree)


def mask_labels(mask: PyTree, trainable: str = "trainable", frozen: str = "frozen") -> PyTree:
  """Label pytree for `optax.multi_transform` from a bool mask.

  E.g. ``optax.multi_transform({"trainable": optax.adamw(...), "frozen": optax.set_to_zero()}, labels)``.
  """
  return jax.tree_util.tree_map(lambda m: trainable if m else frozen, mask)


def count_params(tree: PyTree) -> int:
  """Total number of scalars in the array leaves of ``tree``."""
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


# ---------------------------------------------------------------------------------------------------
# PEFT / diffusers export and import.

METADATA_KEY = "lora_adapter_metadata"  # diffusers `loaders.lora_base.LORA_ADAPTER_METADATA_KEY`


def _to_torch_layout(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(A, B) Flax layout -> torch `lora_A.weight`, `lora_B.weight` (r, in[, kh, kw]), (out, r[, 1, 1])."""
  if a.ndim == 2:
    return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
  return np.ascontiguousarray(a.transpose(3, 2, 0, 1)), np.ascontiguousarray(b.transpose(3, 2, 0, 1))


def _from_torch_layout(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  if a.ndim == 2:
    return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
  return np.ascontiguousarray(a.transpose(2, 3, 1, 0)), np.ascontiguousarray(b.transpose(2, 3, 1, 0))


def _default_to_torch_module(path: str) -> str:
  from scott_jax.models import loading

  parts = tuple(path.split("/"))
  if parts[0] == "params":
    parts = parts[1:]
  if parts[-1] != "kernel":
    raise ValueError(f"LoRA target '{path}' is not a kernel")
  return loading.flax_to_torch_module(parts[:-1])


def _default_to_flax_path(module: str) -> str:
  from scott_jax.models import loading

  return "/".join(loading.torch_module_to_flax(module) + ("kernel",))


def peft_state_dict(lora: PyTree, alpha: float, *, prefix: str = "unet",
                    to_torch_module: Callable[[str], str] | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state dict, LoraConfig kwargs) in diffusers' PEFT layout.

  ``to_torch_module`` maps a '/'-joined Flax kernel path (``down_blocks_0/.../to_out_0/kernel``, with or
  without a leading ``params/``) to the torch module name (``down_blocks.0....to_out.0``); default
  `scott_jax.models.loading.flax_to_torch_module` of the path without its ``kernel`` leaf. Keys are
  ``{prefix}.{module}.lora_A.weight``; the config holds r (the most common rank, others in rank_pattern),
  lora_alpha and the exact target module names.
  """
  to_torch_module = to_torch_module or _default_to_torch_module
  sd: dict[str, np.ndarray] = {}
  ranks: dict[str, int] = {}
  for path, (a, b) in sorted(_overlays(lora).items()):
    module = to_torch_module(_path_str(path))
    ta, tb = _to_torch_layout(np.asarray(a, np.float32), np.asarray(b, np.float32))
    sd[f"{prefix}.{module}.{LORA_A}.weight"] = ta
    sd[f"{prefix}.{module}.{LORA_B}.weight"] = tb
    ranks[module] = int(a.shape[-1])
  counts: dict[int, int] = {}
  for r in ranks.values():
    counts[r] = counts.get(r, 0) + 1
  r_main = max(sorted(counts), key=lambda r: counts[r])
  config = {
    "r": r_main,
    "lora_alpha": float(alpha),
    "target_modules": sorted(ranks),
    "rank_pattern": {f"^{m}": r for m, r in sorted(ranks.items()) if r != r_main},
    "alpha_pattern": {},
    "init_lora_weights": True,
    "use_dora": False,
    "lora_bias": False,
  }
  return sd, config


def export_peft(path: str, lora: PyTree, alpha: float, *, prefix: str = "unet",
                to_torch_module: Callable[[str], str] | None = None) -> None:
  """Write ``lora`` as a diffusers/PEFT LoRA .safetensors file (see `peft_state_dict`).

  The LoraConfig goes to the file metadata under ``lora_adapter_metadata`` with keys ``{prefix}.r`` etc., as
  diffusers' `save_lora_weights` writes it. A pipeline's `load_lora_weights(path)` reads it; a bare model's
  `load_lora_adapter(path, prefix=prefix, use_safetensors=True)` needs ``use_safetensors=True``, without which
  diffusers 0.42 skips the file metadata and silently uses alpha = r.
  """
  from safetensors.numpy import save_file

  sd, config = peft_state_dict(lora, alpha, prefix=prefix, to_torch_module=to_torch_module)
  meta = {f"{prefix}.{k}": v for k, v in config.items()}
  save_file(sd, path, metadata={"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)})


def import_peft(path: str, *, prefix: str = "unet",
                to_flax_path: Callable[[str], str] | None = None) -> tuple[PyTree, float]:
  """Read a PEFT-layout LoRA .safetensors file -> (overlay tree, alpha); the inverse of `export_peft`.

  ``to_flax_path`` maps a torch module name to the '/'-joined Flax kernel path (default
  `scott_jax.models.loading.torch_module_to_flax` plus ``kernel``; the tree has no ``params`` wrapper).
  Without LoRA metadata in the file the diffusers convention applies (alpha = r, scale 1), which needs a
  single rank. Per-module alphas (alpha_pattern) are not representable here and raise.
  """
  from safetensors import safe_open
  from safetensors.numpy import load_file

  to_flax_path = to_flax_path or _default_to_flax_path
  with safe_open(path, framework="np") as fh:
    file_meta = fh.metadata() or {}
  sd = load_file(path)
  lead = f"{prefix}."
  pairs: dict[str, dict[str, np.ndarray]] = {}
  for key, value in sd.items():
    if not key.startswith(lead):
      continue
    m = re.fullmatch(rf"{re.escape(lead)}(.+)\.({LORA_A}|{LORA_B})\.weight", key)
    if m is None:
      raise ValueError(f"unsupported LoRA key '{key}' (expected {lead}<module>.lora_A/lora_B.weight)")
    pairs.setdefault(m.group(1), {})[m.group(2)] = value
  if not pairs:
    raise ValueError(f"no LoRA weights with prefix '{prefix}' in {path}")
  ranks = {int(ab[LORA_A].shape[0]) for ab in pairs.values()}
  if METADATA_KEY in file_meta:
    meta = json.loads(file_meta[METADATA_KEY])
    config = {k.removeprefix(lead): v for k, v in meta.items() if k.startswith(lead)}
    if config.get("alpha_pattern"):
      raise ValueError("per-module LoRA alphas (alpha_pattern) are not supported")
    alpha = float(config["lora_alpha"])
  elif len(ranks) == 1:
    alpha = float(ranks.pop())
  else:
    raise ValueError("a LoRA file without metadata and with mixed ranks has no single alpha")
  flat = {}
  for module, ab in pairs.items():
    if set(ab) != {LORA_A, LORA_B}:
      raise ValueError(f"LoRA module '{module}' must have both {LORA_A} and {LORA_B}")
    a, b = _from_torch_layout(ab[LORA_A], ab[LORA_B])
    kernel = tuple(to_flax_path(module).split("/"))
    flat[kernel + (LORA_A,)] = a
    flat[kernel + (LORA_B,)] = b
  return traverse_util.unflatten_dict(flat), alpha
