"""Config validation: every shipped config validates; bad keys and values raise ConfigError naming them."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from scott_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_shipped_configs_validate(path):
  config_lib.validate(_load(path).get_config())


def test_defaults_validate():
  config_lib.validate(config_lib.defaults())


def test_unknown_key_names_key_and_siblings():
  c = config_lib.defaults()
  c.solver.etta = 0.1
  with pytest.raises(config_lib.ConfigError, match=r"solver\.etta.*eta"):
    config_lib.validate(c)


def test_value_outside_allowed_set():
  c = config_lib.defaults()
  c.solver.noise_fn = 8
  with pytest.raises(config_lib.ConfigError, match=r"solver\.noise_fn.*8.*1, 2, 3, 4, 5, 6, 7"):
    config_lib.validate(c)


def test_wrong_type():
  c = config_lib.defaults().to_dict()
  c["solver"]["h"] = "three"
  with pytest.raises(config_lib.ConfigError, match=r"solver\.h.*'three'.*integer"):
    config_lib.validate(config_lib.ConfigDict(c))


def test_every_spec_names_a_key_of_the_tree():
  """A spec for a key that defaults() does not have would never run (a typo in a section's spec)."""
  known = config_lib._flatten(config_lib.defaults())
  missing = [key for key in config_lib.SPECS if key not in known]
  assert not missing, missing
  assert len(config_lib.SPECS) > 100


def test_range_error_is_one_line_with_key_value_and_text():
  c = config_lib.defaults()
  c.solver.eta = 2.0
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  assert str(e.value) == "config key 'solver.eta' has value 2.0; expected a number in [0, 1]"
  c = config_lib.defaults()
  c.consistency.ema_decay = 1.0
  with pytest.raises(config_lib.ConfigError, match=r"ema_decay' has value 1\.0; expected a number in \[0, 1\)$"):
    config_lib.validate(c)


def test_validation_imports_no_jax():
  """--help and a config error pay Python's start-up and ml_collections only: config and choices import no jax."""
  code = ("import sys, scott_jax.config as c; c.validate(c.defaults()); "
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'numpy', 'torch')); "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
