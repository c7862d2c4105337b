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
  tiny-model programs (train steps, samplers, eval jobs) compile once; and the CPU backend's LLVM optimisation
  level (below). Set before jax is imported (collection); a cache dir already set in the environment is kept."""
  if hasattr(config, "workerinput"):
    return  # an xdist worker inherits the controller's environment
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(config._tmp_path_factory.getbasetemp() / "jax_cache"))
  # LLVM optimisation level 1 instead of XLA's default 2 for the CPU code: the tests' programs compile about 15%
  # faster and the tiny models run as fast (measured on the digits teacher step; level 0 halves the step speed).
  # Subprocesses inherit it; a level already in XLA_FLAGS is kept.
  flags = os.environ.get("XLA_FLAGS", "")
  if "--xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=1".strip()


def pytest_collection_modifyitems(config, items):
  """`@pytest.mark.slow` tests run only when selected with `-m` (e.g. `-m slow`); a default run skips them."""
  if config.option.markexpr:
    return
  skip = pytest.mark.skip(reason="slow: run with -m slow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
