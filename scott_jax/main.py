"""Command-line entry point: ``python -m scott_jax.main --config configs/X.py[:arg] --workdir DIR --mode MODE``.

Parses the flags, validates the config (``scott_jax.config.validate``) and dispatches to the mode registry
(`scott_jax.modes`).
Overrides use ml_collections syntax: ``--config.solver.eta=0.2``. A bad flag, an unknown or mistyped config
key, a value outside its allowed set or an unknown mode exits with status 2 and one line on stderr; so does a
`ConfigError` that a mode raises before its work starts, for what only the run can check (e.g. a mesh that
does not fit the devices: ``parallel.MeshError``; a data folder without captions).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import flags, logging
from ml_collections import config_flags

from scott_jax import config as config_lib
from scott_jax.modes import MODES, resolve

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, logs and outputs.", flag_values=FLAGS)
flags.DEFINE_string("mode", None, "What to run; default: the config's default_mode. One of: "
                    + ", ".join(sorted(MODES)), flag_values=FLAGS)
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/X.py[:arg]).",
                                lock_config=True, flag_values=FLAGS)


def _fail(message: object) -> None:
  """Prints one line and exits with status 2; a wrapped traceback is cut to its first and last lines."""
  lines = [line.strip() for line in str(message).splitlines() if line.strip()] or ["(no message)"]
  text = lines[0] if len(lines) == 1 else f"{lines[0].split(': ')[0]}: {lines[-1]}"
  print(f"error: {text}", file=sys.stderr)
  sys.exit(2)


def _check_args(argv: Sequence[str]) -> None:
  """Checks what absl would report poorly: a missing config file and unknown ``--config.a.b=v`` keys."""
  for i, arg in enumerate(argv):
    path = None
    if arg.startswith("--config="):
      path = arg[len("--config="):]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    elif arg.startswith("--config."):
      config_lib.check_key(arg[len("--config."):].split("=", 1)[0])
    if path is not None and not os.path.isfile(path.split(":", 1)[0]):
      raise config_lib.ConfigError(f"config file '{path.split(':', 1)[0]}' does not exist; "
                                   "expected a Python file with get_config(), e.g. configs/sd15_scott.py")


def usage() -> str:
  """The ``--help`` text: the command line, the modes and the flags."""
  return ("usage: python -m scott_jax.main --config configs/X.py[:arg] [--workdir DIR] [--mode MODE] "
          "[--config.a.b=value ...]\n\nmodes: " + ", ".join(sorted(MODES)) + "\n\n" + FLAGS.main_module_help())


def run(argv: Sequence[str]) -> None:
  """Parses ``argv`` (program name first) and runs the selected mode."""
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(usage())
    sys.exit(0)
  try:
    _check_args(argv[1:])
    FLAGS(list(argv))
    if FLAGS["config"].value is None:
      raise config_lib.ConfigError("missing --config; pass --config configs/X.py")
    cfg = FLAGS.config
  except (flags.Error, config_lib.ConfigError, OSError, KeyError, AttributeError, ValueError, TypeError) as e:
    # ml_collections raises KeyError/AttributeError/ValueError for overrides it cannot apply and OSError
    # for a config file it could not load.
    _fail(e)
  try:
    config_lib.validate(cfg)
    mode = FLAGS.mode or cfg.default_mode
    fn = resolve(mode)
  except config_lib.ConfigError as e:
    _fail(e)
  logging.set_verbosity(logging.INFO)
  enable_compilation_cache(cfg.compilation_cache, FLAGS.workdir)
  try:
    fn(cfg, FLAGS.workdir)
  except config_lib.ConfigError as e:
    _fail(e)


def enable_compilation_cache(path: str, workdir: str) -> str:
  """Turns on JAX's persistent compilation cache in ``path`` (relative: under ``workdir``) for every program,
  however fast it compiled; "" leaves JAX's settings alone. Returns the directory used ("" if none)."""
  if not path:
    return ""
  import jax

  directory = os.path.abspath(os.path.join(workdir, path))
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


def main() -> None:
  run(sys.argv)


if __name__ == "__main__":
  main()
