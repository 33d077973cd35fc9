"""The stages of a study, in order: the one table the CLI, ``nnsteer run``, the report and the
"run ``nnsteer X`` first" messages read.

A :class:`Stage` names the run files it reads and writes by their key in :data:`RUN_FILES`
(also the :class:`~nnsteer.runs.store.RunDir` attribute: ``"chains"`` is ``chains.parquet``). The function that runs each stage is bound
where every stage is in reach (:data:`nnsteer.pipeline.run.RUNNERS`), so this table stays below
the stages themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The files stages write, by key (a :class:`~nnsteer.runs.store.RunDir` attribute each).
RUN_FILES: dict[str, str] = {
    "tasks": "tasks.parquet",
    "chains": "chains.parquet",
    "annotations": "annotations.parquet",
    "vectors": "vectors.safetensors",
    "attribution": "attribution.parquet",
    "layers": "layers.json",
    "steered": "steered.parquet",
    "steered_annotations": "steered_annotations.parquet",
    "evaluation": "evaluation.parquet",
    "report": "report.html",
}

#: ``nnsteer run``'s record of the stages it ran (not a stage's output).
PIPELINE_STATE = "pipeline.json"


@dataclass(frozen=True)
class Stage:
    """One step of the study: its command's name and summary, and the run files it reads and writes."""

    name: str
    summary: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    #: Options whose values name input files (their contents enter the fingerprint).
    file_options: tuple[str, ...] = ()

    def output_files(self) -> tuple[str, ...]:
        """The names of the files the stage writes (``chains.parquet``, ...)."""
        return tuple(RUN_FILES[key] for key in self.outputs)


STAGES: tuple[Stage, ...] = (
    Stage("tasks", "Write tasks.parquet from the built-in set, a file, or Claude.",
          (), ("tasks",), file_options=("path",)),
    Stage("generate", "Generate greedy reasoning chains (chains.parquet).", ("tasks",), ("chains",)),
    Stage("annotate", "Annotate chains into behaviour spans (annotations.parquet).",
          ("chains",), ("annotations",), file_options=("annotator_prompt",)),
    Stage("extract", "Difference-of-means candidate vectors at every layer (vectors.safetensors).",
          ("chains", "annotations"), ("vectors",)),
    Stage("attribute", "Attribution patching per layer and label (attribution.parquet).",
          ("chains", "annotations", "vectors"), ("attribution",)),
    Stage("select", "Choose steering layers (layers.json).", ("vectors", "attribution"), ("layers",)),
    Stage("steer", "Generate steered chains on the eval tasks (steered.parquet).",
          ("tasks", "layers", "vectors"), ("steered",)),
    Stage("evaluate", "Annotate steered chains and measure behaviour shares (evaluation.parquet).",
          ("steered", "annotations", "tasks"), ("steered_annotations", "evaluation"),
          file_options=("annotator_prompt",)),
    Stage("report", "Write report.html with every chart.",
          ("tasks", "annotations", "vectors", "attribution", "layers", "evaluation"), ("report",)),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def producer(file_name: str) -> str | None:
    """The name of the stage that writes the run file ``file_name``, if a stage does."""
    return next((s.name for s in STAGES if file_name in s.output_files()), None)
