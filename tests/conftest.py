"""Shared test setup (generic; module-specific fixtures live in their test files)."""

import os
import sys

import pytest

# A CUDA torchvision wheel next to the CPU torch fails to import; hide it so that transformers and diffusers
# treat it as absent (the same guard as in the individual test files, applied once for the whole session).
try:
  import torchvision  # noqa: F401
except (ImportError, RuntimeError, OSError):
  sys.modules["torchvision"] = None


@pytest.hookimpl(trylast=True)  # after the tmpdir plugin has made config._tmp_path_factory
def pytest_configure(config):
  """One persistent JAX compilation cache for the session (under pytest's basetemp), shared by the in-process
  tests, the pytest-xdist workers and the ``python -m scott_jax.main`` subprocesses the tests start: the same
  tiny-model programs (train steps, samplers, eval jobs) compile once. Set before jax is imported (collection);
  a cache dir already set in the environment is kept."""
  if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return  # an xdist worker inherits the controller's environment
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(config._tmp_path_factory.getbasetemp() / "jax_cache")


def pytest_collection_modifyitems(config, items):
  """`@pytest.mark.slow` tests run only when selected with `-m` (e.g. `-m slow`); a default run skips them."""
  if config.option.markexpr:
    return
  skip = pytest.mark.skip(reason="slow: run with -m slow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
