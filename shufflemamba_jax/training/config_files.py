"""Loads config files (`configs/*.py`) by path, the way ml_collections' `config_flags` does.

Config files are Python modules found by path, so they work whatever the current directory and
whether or not the repository root is on sys.path. Being code, they are local files (pathlib).
"""

import importlib.util
import pathlib


def load_module(path: str):
  """Imports the Python file at `path` as a fresh module."""
  path = pathlib.Path(path).resolve()
  if not path.is_file():
    raise FileNotFoundError(f"No config file at {path}.")
  spec = importlib.util.spec_from_file_location(f"shufflemamba_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(path: str, arg: str | None = None):
  """`get_config(arg)` of the config file at `path` (`get_config()` when `arg` is None)."""
  module = load_module(path)
  return module.get_config() if arg is None else module.get_config(arg)


def sibling(config_file: str, name: str) -> str:
  """The path of `name` in the folder of `config_file` (a config file's `__file__`)."""
  return str(pathlib.Path(config_file).resolve().parent / name)


def override(config, overrides: dict):
  """`config` with `overrides` ({"model.variant": ..., "batch_size": ...}, dotted names) set in
  place, as `--config.<name>=value` would set them; returns `config`."""
  for name, value in overrides.items():
    *parents, leaf = name.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config
