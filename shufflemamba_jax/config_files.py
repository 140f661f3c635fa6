"""Loads config files (`configs/*.py`) by path, the way ml_collections' `config_flags` does.

Config files are not a package: they are found by path, so that they work whatever the current
directory and whether or not the repository root is on sys.path.
"""

import importlib.util
import os


def load_module(path: str):
  """Imports the Python file at `path` as a fresh module."""
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No config file at {path}.')
  name = 'shufflemamba_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(path: str, arg: str | None = None):
  """`get_config(arg)` of the config file at `path` (`get_config()` when `arg` is None)."""
  module = load_module(path)
  return module.get_config() if arg is None else module.get_config(arg)


def sibling(config_file: str, name: str) -> str:
  """The path of `name` in the folder of `config_file` (a config file's `__file__`)."""
  return os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
