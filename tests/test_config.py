"""Config validation: every shipped config validates; bad keys and values raise ConfigError naming them."""

import glob
import importlib.util
import os

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
