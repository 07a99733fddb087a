"""Recipes: one linear script per command (setup → train → save), over the library modules."""
