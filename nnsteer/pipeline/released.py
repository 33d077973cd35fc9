"""The authors' released pipeline (``cvenhoff/steering-thinking-llms``) as nnsteer options.

``nnsteer run --released-code`` (or ``released_code = true`` in a config) makes every
choice below as the released code made it; each names the released file and function it
follows. A value the config sets itself still wins, and the run says so in one line.
nnsteer's defaults stay as they are (METHOD.md says why they are the better science).

Example:
    >>> released_options("deepseek-ai/DeepSeek-R1-Distill-Llama-8B")["attribute"]
    {'metric': 'released-code', 'spans': 'others', 'limit': 50, 'aggregate': 'chains'}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: The steering layers the authors picked by hand for each model (vector layer = steering
#: layer, coefficient 1), from ``utils/utils.py`` ``steering_config``.
RELEASED_LAYERS: dict[str, dict[str, list[int]]] = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": {
        "backtracking": [17], "uncertainty-estimation": [18], "example-testing": [15],
        "adding-knowledge": [18]},
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": {
        "backtracking": [12], "uncertainty-estimation": [12], "example-testing": [12],
        "adding-knowledge": [12]},
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": {
        "backtracking": [29], "uncertainty-estimation": [29], "example-testing": [29],
        "adding-knowledge": [24]},
}


@dataclass(frozen=True)
class ReleasedChoice:
    """One option of one stage, set as the released code does, and where it does so."""

    stage: str
    option: str
    value: Any
    source: str  # released file and function


RELEASED_CHOICES: tuple[ReleasedChoice, ...] = (
    ReleasedChoice("generate", "prompt_template", "released-thinking",
                   "train-steering-vectors/generate_responses.py, get_batched_message_ids: the "
                   "bare question of messages/messages.py through the chat template"),
    ReleasedChoice("generate", "max_new_tokens", 1000,
                   "train-steering-vectors/run.sh: generate_responses.py --max_tokens 1000"),
    ReleasedChoice("annotate", "annotator", "openai:gpt-4.1",
                   "utils/utils.py, chat (default model) called by process_batch_annotations"),
    ReleasedChoice("extract", "variant", "released-code",
                   "train-steering-vectors/train_vectors.py, update_mean_vectors; "
                   "utils/utils.py, load_model_and_vectors (rescaling)"),
    ReleasedChoice("attribute", "metric", "released-code",
                   "vector-layer-attribution/analyze_layer_effects.py, "
                   "compute_kl_divergence_metric and analyze_layer_effects"),
    ReleasedChoice("attribute", "spans", "others",
                   "analyze_layer_effects.py, main loop: the spans whose label is not the "
                   "vector's (category_label != label)"),
    ReleasedChoice("attribute", "limit", 50,
                   "vector-layer-attribution/run.sh: --n_examples 50 (results[:n_examples])"),
    ReleasedChoice("attribute", "aggregate", "chains",
                   "analyze_layer_effects.py, analyze_layer_effects (mean over a chain's spans) "
                   "and plot_layer_effects (np.nanmean, np.nanstd over chains)"),
    ReleasedChoice("select", "layers", RELEASED_LAYERS,
                   "utils/utils.py, steering_config (vector_layer, pos_layers, neg_layers)"),
    ReleasedChoice("select", "coefficient", 1.0,
                   "utils/utils.py, steering_config (pos_coefficient, neg_coefficient)"),
    ReleasedChoice("steer", "prompt_template", "released-thinking",
                   "steering/evaluate_steering.py, generate_and_analyze"),
    ReleasedChoice("steer", "max_new_tokens", 1000,
                   "steering/run.sh: evaluate_steering.py --max_tokens 1000"),
    ReleasedChoice("steer", "limit", 50, "steering/run.sh: evaluate_steering.py --n_examples 50"),
    ReleasedChoice("evaluate", "annotator", "openai:gpt-4.1",
                   "steering/evaluate_steering.py, get_label_counts → process_batch_annotations"),
    ReleasedChoice("evaluate", "denominator", "steered",
                   "steering/evaluate_steering.py, get_label_counts: tokens of the steered "
                   "labels only"),
)


def released_options(model: str) -> dict[str, dict[str, Any]]:
    """Per stage, the options that reproduce the released code for ``model``.

    ``select``'s layers are the authors' for the three models they steered; for any other
    model there are none, and ``select`` chooses from the attribution.
    """
    options: dict[str, dict[str, Any]] = {}
    for choice in RELEASED_CHOICES:
        value = choice.value
        if choice.option == "layers":
            if model not in RELEASED_LAYERS:
                continue
            value = RELEASED_LAYERS[model]
        options.setdefault(choice.stage, {})[choice.option] = value
    return options


def apply_released(config: Any, log: Callable[[str], None]) -> Any:
    """``config`` (a :class:`nnsteer.pipeline.run.Config`) with the released options under its own.

    Logs each option the config sets to another value than the released code, and the
    lack of released layers for a model the authors did not steer.
    """
    if not config.released_code:
        return config
    model = config.model.name
    merged = {}
    for stage, released in released_options(model).items():
        own = config.options.get(stage, {})
        for key, value in own.items():
            if key in released and released[key] != value:
                log(f"released_code: [{stage}] {key} = {value!r} from {config.path} replaces "
                    f"the released {released[key]!r}")
        merged[stage] = {**released, **own}
    if model not in RELEASED_LAYERS and "layers" not in config.options.get("select", {}):
        log(f"released_code: the authors picked no layers for {model}; select chooses them "
            "from the attribution")
    return dataclasses.replace(config, options={**config.options, **merged})
