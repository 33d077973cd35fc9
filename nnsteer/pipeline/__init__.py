"""The whole study from one TOML config, stage by stage, skipping what is up to date."""

from nnsteer.pipeline.run import read_config, run_pipeline

__all__ = ["read_config", "run_pipeline"]
