"""The shipped study configs, inside the package as ``nnsteer.pipeline.configs`` (pyproject.toml maps this folder)."""
