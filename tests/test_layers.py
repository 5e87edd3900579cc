"""The package's layers: a module never imports a layer above its own (README, Architecture)."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "diffurec_jax"

# Layer of a module (its dotted name under diffurec_jax) -> layers it must never import.
_ABOVE_MODEL = ("diffurec_jax.training", "diffurec_jax.evaluate", "diffurec_jax.serve",
                "diffurec_jax.lab", "diffurec_jax.cli")
RULES = {
    "models": _ABOVE_MODEL,
    "data": _ABOVE_MODEL,
    "diffusion": _ABOVE_MODEL,
    "samplers": _ABOVE_MODEL,
    "metrics": _ABOVE_MODEL,
    "catalog": _ABOVE_MODEL,
    "sampled_softmax": _ABOVE_MODEL,
    "sharding": _ABOVE_MODEL,
    "errors": _ABOVE_MODEL,
    "config": _ABOVE_MODEL,
    "training": ("diffurec_jax.serve", "diffurec_jax.lab", "diffurec_jax.cli"),
    "evaluate": ("diffurec_jax.serve", "diffurec_jax.lab", "diffurec_jax.cli"),
    "serve": ("diffurec_jax.lab", "diffurec_jax.cli"),
}


def _imports(path: pathlib.Path) -> set[str]:
  """Every module `path` imports, at the top or inside a function."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    relative = path.relative_to(PACKAGE)
    if relative.parts[0] in RULES or relative.stem in RULES and len(relative.parts) == 1:
      layer = relative.parts[0] if len(relative.parts) > 1 else relative.stem
      yield pytest.param(path, RULES[layer], id=str(relative))


@pytest.mark.parametrize("path, forbidden", list(_modules()))
def test_no_module_imports_a_layer_above_it(path, forbidden):
  bad = sorted(name for name in _imports(path) if name.startswith(forbidden))
  assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_the_rules_cover_every_layer_below_lab():
  layers = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.glob("*")
            if p.suffix == ".py" or p.is_dir() and (p / "__init__.py").exists()}
  assert layers - set(RULES) - {"__init__", "lab", "cli", "config_check", "reference"} == set()
