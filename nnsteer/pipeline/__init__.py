"""The whole study from one TOML config, stage by stage, skipping what is up to date."""

from nnsteer.pipeline.run import load_config, run_pipeline

__all__ = ["load_config", "run_pipeline"]
