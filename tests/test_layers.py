"""The package's layers: which subpackage may import which, read from every import statement."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "shufflemamba_jax"
ENTRY_POINTS = {"main", "predict", "convert", "prepare", "benchmark", "ablation"}
# What each layer may import from the package, besides itself.
# `checks` (a module at the root, the settings errors) is the bottom layer.
ALLOWED = {
  "checks": set(),
  "parallel": {"checks"},
  "models": {"checks", "parallel"},
  "data": {"checks", "models", "parallel"},
  "weights": {"checks", "models", "parallel"},
  "training": {"checks", "data", "weights", "models", "parallel"},
}


def imports(path: pathlib.Path) -> set[str]:
  """Every module (or module.name) that `path` imports, at the top or inside functions."""
  imported = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      imported.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      imported.update(f"{node.module}.{alias.name}" for alias in node.names)
  return imported


def package_imports(path: pathlib.Path) -> set[str]:
  return {name for name in imports(path) if name.split(".")[0] == PACKAGE.name}


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_imports_run_only_down_the_layers(path):
  parts = path.relative_to(PACKAGE).parts
  layer = parts[0] if len(parts) > 1 else (path.stem if path.stem in ALLOWED else None)
  for name in package_imports(path):
    target = (name.split(".") + [""])[1]  # "" for `import shufflemamba_jax` itself.
    assert target not in ENTRY_POINTS, f"{path.name} imports the entry point {name}"
    if layer is None:  # The package root and the entry points may import any layer.
      continue
    assert target in ALLOWED, f"{path} imports {name} from the package root"
    assert target == layer or target in ALLOWED[layer], f"{path} ({layer}) imports {name}"


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_only_public_jax_apis(path):
  """A JAX upgrade may move its private modules; an import of them would break ours."""
  assert not [name for name in imports(path) if name.startswith("jax._src")], path


def test_the_model_layer_loads_neither_tensorflow_nor_orbax():
  code = (
    "import sys, shufflemamba_jax, shufflemamba_jax.models;"
    "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'orbax', 'ml_collections'}))"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
  assert result.stdout.strip() == "[]", result.stdout
