"""Config validation: every shipped config validates; bad keys and values raise ConfigError naming them."""

import glob
import os
import subprocess
import sys

import pytest

from scott_jax import config as config_lib
from scott_jax import config_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_shipped_configs_validate(path):
  config_lib.validate(config_files.load(path).get_config())


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


def test_parse_arg_types_bools_and_positional():
  spec = dict(res=224, lr=1e-3, runlocal=False, schedule="short", eta=(None, (0.0, 0.2)))
  got = config_files.parse_arg("res=128,runlocal,lr=2e-3,eta=0.20", **spec)
  assert got == dict(res=128, lr=2e-3, runlocal=True, schedule="short", eta=0.2)
  assert config_files.parse_arg(None, **spec) == dict(res=224, lr=1e-3, runlocal=False, schedule="short", eta=None)
  assert config_files.parse_arg("runlocal=False", **spec)["runlocal"] is False
  assert config_files.parse_arg("quick", positional="variant", variant=("default", ("default", "quick"))) == {
      "variant": "quick"}


@pytest.mark.parametrize("arg,match", [
    ("nope=1", r"unknown config arg key 'nope'; allowed keys: res, runlocal, eta"),
    ("runlocal=maybe", r"'runlocal' has value 'maybe'; expected a bool"),
    ("res=1.5", r"'res' has value '1.5'; expected int"),
    ("eta=0.5", r"'eta' has value '0.5'; allowed: 0.0, 0.2"),
    ("res=1,res=2", r"'res' given twice"),
    ("bare", r"config arg 'bare' is not key=value"),
])
def test_parse_arg_is_strict(arg, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_files.parse_arg(arg, res=224, runlocal=False, eta=(None, (0.0, 0.2)))


@pytest.mark.parametrize("name,arg,check", [
    ("sd15_scott", "eta=0.2,h=1", lambda c: (c.solver.name, c.solver.eta, c.solver.h) == ("ddim", 0.2, 1)),
    ("sd15_lcm", "gan=on", lambda c: c.gan.enabled and c.solver.skip == 20 and c.gan.lambda_adv == 0.4),
    ("rv51_scott", "h=2", lambda c: c.solver.h == 2 and "Realistic" in c.model.teacher_path),
    ("tiny_scott", "lcm", lambda c: c.gan.lambda_adv == 0.0 and c.train.batch_size == 2),
    ("digits", "quick", lambda c: c.train.num_steps == 10),
    ("toy2d", "quick", lambda c: c.toy2d.methods == ("scott", "lcm")),
    ("solver_demo", "ddpm", lambda c: (c.sample_teacher.solver, c.sample_teacher.eta) == ("ddim", 1.0)),
])
def test_every_config_parses_its_arg_and_rejects_unknown_keys(name, arg, check):
  assert check(config_files.get_config(f"{name}.py:{arg}"))
  with pytest.raises(config_lib.ConfigError, match="config arg"):
    config_files.get_config(name, "bogus_key=1")
