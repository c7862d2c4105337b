"""Shared test setup (generic; module-specific fixtures live in their test files)."""

import os
import sys

import pytest

from scott_jax.testing import fast_compile

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
  # XLA:CPU compile settings for speed (`scott_jax.testing.fast_compile`: LLVM level 0, the classic fusion
  # emitters): the tests' programs run a few steps, so compiling dominates (19-33% less CPU than LLVM level 1 on
  # test_train / test_unet / test_pipeline / test_solvers, measured); the few runs of hundreds of steps use level 1
  # in a child process (tests/test_digits.py). Subprocesses inherit it; a level already in XLA_FLAGS is kept.
  flags = os.environ.get("XLA_FLAGS", "")
  if "--xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {fast_compile.XLA_FLAGS}".strip()


def pytest_collection_modifyitems(config, items):
  """`@pytest.mark.slow` tests run only when selected with `-m` (e.g. `-m slow`); a default run skips them."""
  if config.option.markexpr:
    return
  skip = pytest.mark.skip(reason="slow: run with -m slow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
