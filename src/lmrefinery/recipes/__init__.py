"""Recipes: one module per single-stage command (config → library calls → outputs), plus common.py, the set-up they
share. No recipe imports another (an import-linter contract in pyproject.toml); the commands that run others as
stages, `compare` and `demo`, live in lmrefinery.compare, the layer above."""
