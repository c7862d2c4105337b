"""Frechet Inception Distance: Inception pool_3 features, their float64 statistics and the Frechet distance.

Protocol (notes section 7): uint8 images -> PIL bicubic per-channel float resize to 299 on the host ->
(x - 128) / 128 -> the FID Inception-v3 (scott_jax.metrics.inception, 2015-12-05 weights) -> 2048-d features;
mean and covariance in float64 (numpy); distance with scipy.linalg.sqrtm as pytorch-fid's
`calculate_frechet_distance`. Reference statistics are stored as .npz files with arrays `mu` and `sigma`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import scipy.linalg

from scott_jax.metrics import inception

Array = jax.Array


def inception_features(
  params: Any,
  images_uint8_nhwc: np.ndarray | Sequence[np.ndarray],
  batch_size: int = 50,
  apply_fn: Callable[[Any, Array], Array] | None = None,
) -> np.ndarray:
  """pool_3 features of uint8 images.

  params: {"params": ...} from `inception.load_inception_params`.
  images_uint8_nhwc: (N, H, W, 3) uint8 in [0, 255], or a list of (H_i, W_i, 3) uint8 images.
  batch_size: images per network call (the last batch is padded to keep one compiled shape).
  apply_fn: the jitted network (`inception.make_apply_fn()`); made here when None.
  Returns (N, 2048) float32 numpy.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  apply_fn = inception.make_apply_fn() if apply_fn is None else apply_fn
  n = len(images_uint8_nhwc)
  if n == 0:
    raise ValueError("no images")
  out = []
  for start in range(0, n, batch_size):
    x = inception.preprocess(images_uint8_nhwc[start : start + batch_size])
    valid = x.shape[0]
    if n > batch_size and valid < batch_size:  # pad the last batch to the compiled batch shape
      x = np.concatenate([x, np.zeros((batch_size - valid, *x.shape[1:]), x.dtype)])
    out.append(np.asarray(apply_fn(params, x))[:valid])
  return np.concatenate(out).astype(np.float32)


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """features (N, D), N >= 2 -> (mu (D,), sigma (D, D)) float64; sigma is the unbiased covariance (np.cov)."""
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"expected features (N >= 2, D), got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
  """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2) (mu (D,), sigma (D, D)), in float64:
  |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

  As pytorch-fid: scipy.linalg.sqrtm of the product; if it is not finite, eps * I is added to both covariances;
  a complex result whose diagonal has an imaginary part above 1e-3 raises ValueError, else its real part is used.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = (
    np.atleast_2d(np.asarray(sigma1, np.float64)),
    np.atleast_2d(np.asarray(sigma2, np.float64)),
  )
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    imag = np.max(np.abs(np.diagonal(covmean).imag))
    if imag > 1e-3:
      raise ValueError(f"sqrtm has an imaginary component {imag:.3g}")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID of two feature sets (N1, D) and (N2, D)."""
  return frechet_distance(*stats(features1), *stats(features2))


def write_stats(npz_path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Saves reference statistics mu (D,), sigma (D, D) as float64 arrays `mu`, `sigma` of an .npz file."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"expected mu (D,), sigma (D, D), got {mu.shape}, {sigma.shape}")
  os.makedirs(os.path.dirname(os.path.abspath(npz_path)), exist_ok=True)
  with open(npz_path, "wb") as f:
    np.savez(f, mu=mu, sigma=sigma)


def read_stats(npz_path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads (mu (D,), sigma (D, D)) float64 written by `write_stats` (or pytorch-fid's .npz with mu, sigma).

  A missing file raises FileNotFoundError naming it.
  """
  if not os.path.isfile(npz_path):
    raise FileNotFoundError(f"FID reference statistics not found: {npz_path}")
  with np.load(npz_path, allow_pickle=False) as data:
    missing = {"mu", "sigma"} - set(data.files)
    if missing:
      raise ValueError(f"{npz_path} lacks {sorted(missing)} (has {data.files})")
    mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{npz_path}: expected mu (D,), sigma (D, D), got {mu.shape}, {sigma.shape}")
  return mu, sigma
