"""The config files (``configs/*.py``): loading one by name or path, and the strict parser of their argument.

Every ``configs/X.py`` defines ``get_config(arg)``, where ``arg`` is what follows the colon of
``--config configs/X.py:arg`` (None without one). `parse_arg` is the one parser of that string (big_vision's
``parse_arg`` style: comma-separated ``key=value`` pairs, typed values, strict bools, a one-line
`ConfigError` for anything it does not know); `load` is the one loader of a config file as a module (for a
config built on another, for tests and benchmarks). Like `scott_jax.config`, this module imports no jax.
"""

from __future__ import annotations

import importlib.util
import os
import types
from typing import Any

from scott_jax.config import ConfigDict, ConfigError

# The repository's configs/ folder (the package is used from its checkout).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def path_of(name: str) -> str:
  """``name`` as a file: "sd15_scott" or "sd15_scott.py" -> CONFIGS_DIR/sd15_scott.py; a path is kept."""
  if os.sep in name or name.startswith("."):
    return name
  return os.path.join(CONFIGS_DIR, name if name.endswith(".py") else f"{name}.py")


def load(name: str) -> types.ModuleType:
  """The config file ``name`` (see `path_of`) executed as a fresh module (not registered in sys.modules)."""
  path = path_of(name)
  if not os.path.isfile(path):
    raise ConfigError(f"config file '{path}' does not exist; expected a Python file with get_config()")
  stem = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"_scott_config_{stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(name: str, arg: str | None = None) -> ConfigDict:
  """``load(name).get_config(arg)``; ``name`` may carry the arg as --config does: "sd15_scott.py:eta=0.2"."""
  if arg is None and ":" in name:
    name, arg = name.split(":", 1)
  return load(name).get_config(arg)


def _convert(key: str, text: str, kind: type) -> Any:
  """``text`` as a value of type ``kind`` (bool: true/false, yes/no, on/off, 1/0, any case)."""
  if kind is bool:
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise ConfigError(f"config arg '{key}' has value '{text}'; expected a bool (true or false)")
  try:
    return kind(text)
  except ValueError:
    raise ConfigError(f"config arg '{key}' has value '{text}'; expected {kind.__name__}") from None


def parse_arg(arg: str | None, *, positional: str | None = None, **spec: Any) -> dict[str, Any]:
  """Parses a config file's ``arg`` "key=value,key=value" against ``spec``; returns {key: value} for every key.

  Args:
    arg: the string after the config file's colon, or None / "" (every key at its default).
    positional: a key whose value may be given bare, as the first item ("quick" for "variant=quick").
    **spec: per key its default (whose type, bool / int / float / str, is the value's type), or a pair
      (default, allowed): a tuple of the allowed values (converted to their type first; default None means
      "not given").
  A bare item ``key`` is ``key=true`` for a bool key (big_vision's form). Unknown keys, malformed items, a key
  given twice, values that do not convert (bools accept only true/false, yes/no, on/off, 1/0) and values outside
  ``allowed`` raise `ConfigError` with one line that names the key and what is allowed.
  """
  defaults: dict[str, Any] = {}
  allowed: dict[str, tuple[Any, ...]] = {}
  kinds: dict[str, type] = {}
  for key, entry in spec.items():
    if isinstance(entry, tuple):
      default, choices = entry
      allowed[key] = tuple(choices)
      kinds[key] = type(choices[0])
    else:
      default = entry
      kinds[key] = type(entry)
    defaults[key] = default
  out = dict(defaults)
  given: set[str] = set()
  items = [item.strip() for item in arg.split(",")] if arg else []
  for i, item in enumerate(items):
    if "=" in item:
      key, text = (s.strip() for s in item.split("=", 1))
    elif kinds.get(item) is bool:
      key, text = item, "true"
    elif positional is not None and i == 0:
      key, text = positional, item
    else:
      raise ConfigError(f"config arg '{item}' is not key=value; allowed keys: {', '.join(spec)}")
    if key not in spec:
      raise ConfigError(f"unknown config arg key '{key}'; allowed keys: {', '.join(spec)}")
    if key in given:
      raise ConfigError(f"config arg '{key}' given twice")
    value = _convert(key, text, kinds[key])
    if key in allowed and value not in allowed[key]:
      raise ConfigError(f"config arg '{key}' has value '{text}'; allowed: {', '.join(str(a) for a in allowed[key])}")
    out[key] = value
    given.add(key)
  return out

