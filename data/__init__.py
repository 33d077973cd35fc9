"""The built-in task set, shipped inside the package as ``nnsteer.tasks.builtin`` (pyproject.toml maps this folder)."""
