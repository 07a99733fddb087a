"""The package layout the import contracts rely on: every command's code is where the CLI looks for it, and every
recipe is under the no-recipe-imports-a-recipe contract (a new recipe left out of it would go unchecked)."""

import importlib
import tomllib
from pathlib import Path

from lmrefinery.cli import COMMANDS, recipe

ROOT = Path(__file__).resolve().parents[1]


def test_every_recipe_module_is_a_command_and_under_the_independence_contract():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    independent = next(c for c in contracts if c["type"] == "independence")["modules"]
    recipes = sorted(f"lmrefinery.recipes.{p.stem}" for p in (ROOT / "src/lmrefinery/recipes").glob("*.py")
                     if p.stem not in ("__init__", "common"))
    assert sorted(independent) == recipes
    commands = {recipe(name).__name__ for name in COMMANDS}
    assert set(recipes) <= commands
    assert commands - set(recipes) == {"lmrefinery.compare.run", "lmrefinery.compare.demo"}
    for name in COMMANDS:
        assert callable(importlib.import_module(recipe(name).__name__).run)
