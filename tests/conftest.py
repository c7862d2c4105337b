"""Shared test setup (generic; module-specific fixtures live in their test files)."""

import sys

# A CUDA torchvision wheel next to the CPU torch fails to import; hide it so that transformers and diffusers
# treat it as absent (the same guard as in the individual test files, applied once for the whole session).
try:
  import torchvision  # noqa: F401
except (ImportError, RuntimeError, OSError):
  sys.modules["torchvision"] = None


def pytest_collection_modifyitems(config, items):
  """`@pytest.mark.slow` tests run only when selected with `-m` (e.g. `-m slow`); a default run skips them."""
  if config.option.markexpr:
    return
  import pytest

  skip = pytest.mark.skip(reason="slow: run with -m slow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
