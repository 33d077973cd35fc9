"""What a study will cost before it runs: ``nnsteer plan --config FILE``.

Per stage of the registry (:data:`nnsteer.runs.registry.STAGES`), from the config and the
model's config alone (no weights, no tokenizer, nothing generated):

- the chains and the tokens to generate (chains × ``max_new_tokens``, an upper bound: a
  chain that ends sooner generates fewer);
- the forward and backward passes, as the stage's code makes them;
- the peak memory of the tensors the stage holds: the weights at the dtype, the KV cache at
  the batch size and length (per layer with a cache: 2 × kv heads × head dim, or a sliding
  window's last tokens), and the layer outputs attribution keeps for its gradient;
- the annotator's (and the grader's) calls and tokens, and their cost at a price;
- on NDIF (``[model] remote = true``), the jobs and the megabytes sent, by the formulas
  ``bench/bench_ndif.py`` checks against a loopback NDIF (:func:`ndif_jobs`,
  :func:`ndif_distinct`, :func:`ndif_upload`).

Each figure says how it was made (:class:`Figure`'s ``kind`` and ``how``): ``count`` (exact,
from the config and the task set), ``formula`` (the formula is named; ``≤`` marks an upper
bound) or ``measured`` (a constant measured by a bench, named with its date and machine).
A model whose config cannot be read (a hub model, offline) is planned from nnsteer's copy
of the config of each model a shipped config names (:data:`KNOWN_CONFIGS`); any other gets
its counts, and one line saying that its memory is not known.

Example:
    >>> plan = plan_study(read_config("demo"))
    >>> print(plan.table())
    >>> plan.summary()
    'plan: 290 chains, ≤ 34,400 new tokens, ≤ 1,402 forward and 60 backward passes; ...'
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnsteer.annotation.llm import API_KEY_ENV, DEFAULT_ANNOTATOR_MODEL
from nnsteer.annotation.llm import PROMPT as ANNOTATOR_PROMPT
from nnsteer.errors import BadInput, first_line
from nnsteer.generation.prompts import PROMPT_TEMPLATES
from nnsteer.labels import STEERED_LABELS
from nnsteer.modeling.architecture import Architecture
from nnsteer.modeling.sources import model_config, resolve_source
from nnsteer.package_data import package_path
from nnsteer.pipeline.released import apply_released
from nnsteer.pipeline.run import SUPPLIED, Config, stage_function, stage_options
from nnsteer.runs.registry import STAGES
from nnsteer.selection.attribution import FIRST_ORDER, REQUEST_ROWS, VALIDATION_REFERENCES
from nnsteer.selection.layers import AUTO
from nnsteer.selection.strength import check_grid
from nnsteer.tasks.files import (
    CATEGORIES,
    PAPER_EVAL_PER_CATEGORY,
    PAPER_PER_CATEGORY,
    cap_tasks,
    carve_validation,
    load_builtin_tasks,
    read_task_file,
)
from nnsteer.vectors.residuals import BATCHES_PER_REQUEST

GIB = 1024**3
#: Bytes per element of each dtype name a config may give.
DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}

#: A prompt's tokens, estimated from its characters (task and user-turn template) without
#: a tokenizer: characters / :data:`CHARS_PER_TOKEN` plus :data:`CHAT_TEMPLATE_TOKENS` for the
#: chat template's own text (system prompt, role markers). On the built-in tasks this is
#: above the real count for SmolLM2's tokenizer (tests/test_plan.py checks it).
CHARS_PER_TOKEN = 4
CHAT_TEMPLATE_TOKENS = 64
#: Attribution's probes per generated token, before annotation has found them: 12 spans of
#: the steered labels per 500-token chain (bench/bench_ndif.py's paper-sized study).
PROBES_PER_TOKEN = 12 / 500
#: The annotator's reply copies the reasoning with labels between its parts: its tokens
#: per token of reasoning.
REPLY_PER_REASONING_TOKEN = 1.1

#: Bytes one NDIF request sends beyond the distinct data it carries (code, module tree,
#: pickling, tensors the server could derive), per stage, for a model of 32 layers × 4096:
#: measured by ``python bench/bench_ndif.py --study-json`` (bench/results/ndif.txt) on a loopback
#: NDIF (nnsight's real client, NDIF main's sandbox), 8 chains of 12 tokens, batch 4;
#: :func:`ndif_upload` scales them to a model's layers (its width for steer). Attribute's
#: is net of the vectors every job carries, and negative: its request bodies carry the
#: vectors in fewer bytes than their raw size. Steer's requests were no bigger than the
#: distinct data: 0.
NDIF_EXCESS: dict[str, float] = {
    "generate": 6_460.0,
    "extract": 3_069.0,
    "attribute": -221_342.0,
    "steer": 0.0,
}
#: Where :data:`NDIF_EXCESS` was measured (the figures' ``how``).
NDIF_MEASURED = "bench/results/ndif.txt: loopback NDIF, 2026-12-08, x86_64, 2 CPUs"
#: The layers and width :data:`NDIF_EXCESS` was measured at.
NDIF_BENCH_SHAPE = (32, 4096)

#: The config.json values of the hub models the shipped configs name, for planning them
#: where the hub cannot be reached (their configs as published on the Hugging Face hub).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=131072, tie_word_embeddings=False),
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=131072, tie_word_embeddings=False),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": dict(
        model_type="qwen2", hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
        num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
        max_position_embeddings=131072, tie_word_embeddings=False),
    "Qwen/Qwen3-8B": dict(
        model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, tie_word_embeddings=False),
    "openai/gpt-oss-20b": dict(
        model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088,
        num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * 12,
        max_position_embeddings=131072, tie_word_embeddings=False,
        quantization_config={"quant_method": "mxfp4"}),
}


# ------------------------------------------------------------------------ the model

@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model, read from its config (built on meta weights)."""

    family: str
    n_layers: int
    d_model: int
    vocab_size: int
    parameters: int
    #: Per decoder layer with a key/value cache: (values per cached token, summed over the
    #: keys and values of its kv heads; sliding window or None).
    kv_layers: tuple[tuple[int, int | None], ...]
    #: Layers whose cache is a fixed-size recurrent state (linear attention, Mamba): not counted.
    recurrent_layers: int = 0
    plain_kv_cache: bool = True
    max_positions: int | None = None
    quantization: str | None = None

    @classmethod
    def from_config(cls, config: Any, source: str = "") -> ModelShape:
        """The shape of a transformers config (its text config for a multimodal one)."""
        import torch
        from transformers import AutoModelForCausalLM, DynamicCache

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        arch = Architecture.discover(model, source)
        text = config.get_text_config()
        heads = int(getattr(text, "num_attention_heads", 0) or 0)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else 0)
        if getattr(text, "kv_lora_rank", None):  # multi-head latent attention: one latent per token
            per_token = int(text.kv_lora_rank) + int(text.qk_rope_head_dim)
        else:
            per_token = 2 * kv_heads * int(head_dim)
        layers, recurrent = [], 0
        for layer in DynamicCache(config=text).layers:
            kind = type(layer).__name__
            if kind == "DynamicLayer":
                layers.append((per_token, None))
            elif kind == "DynamicSlidingWindowLayer":
                layers.append((per_token, int(layer.sliding_window)))
            elif kind != "DummyLayer":
                recurrent += 1
        quantization = getattr(config, "quantization_config", None)
        if isinstance(quantization, dict):
            quantization = quantization.get("quant_method")
        elif quantization is not None:
            quantization = getattr(quantization, "quant_method", str(quantization))
        return cls(
            family=arch.family, n_layers=arch.n_layers, d_model=arch.d_model,
            vocab_size=arch.vocab_size, parameters=sum(p.numel() for p in model.parameters()),
            kv_layers=tuple(layers), recurrent_layers=recurrent,
            plain_kv_cache=arch.plain_kv_cache,
            max_positions=getattr(text, "max_position_embeddings", None),
            quantization=str(quantization) if quantization else None,
        )

    def weight_bytes(self, dtype_bytes: int) -> int:
        """The parameters at ``dtype_bytes`` each."""
        return self.parameters * dtype_bytes

    def kv_cache_bytes(self, batch: int, tokens: int, dtype_bytes: int) -> int:
        """The KV cache of ``batch`` rows of ``tokens`` cached positions: per layer with a
        cache, its values per token × the tokens it keeps (a sliding window keeps its last
        ``window - 1``)."""
        kept = sum(width * (tokens if window is None else min(tokens, window - 1))
                   for width, window in self.kv_layers)
        return batch * kept * dtype_bytes

    def activation_bytes(self, rows: int, positions: int, dtype_bytes: int) -> int:
        """Every decoder block's output for ``rows`` × ``positions``: what attribution keeps
        for its gradient (``n_layers × rows × positions × d_model``)."""
        return self.n_layers * rows * positions * self.d_model * dtype_bytes

    def describe_kv(self) -> str:
        """The KV cache's shape in words, for the figures' ``how``."""
        widths = {width for width, _ in self.kv_layers}
        windows = sorted({w for _, w in self.kv_layers if w is not None})
        full = sum(1 for _, w in self.kv_layers if w is None)
        parts = [f"{full} layers × {'/'.join(map(str, sorted(widths)))} values per token"]
        if windows:
            parts.append(f"{len(self.kv_layers) - full} sliding-window layers keep their "
                         f"last {'/'.join(str(w - 1) for w in windows)} tokens")
        if self.recurrent_layers:
            parts.append(f"{self.recurrent_layers} recurrent layers' fixed state not counted")
        return "; ".join(parts)


def model_shape(name: str) -> tuple[ModelShape | None, str]:
    """The shape of the model ``name`` and where it came from: its config (embedded model,
    local directory, the hub or its cache), else nnsteer's copy of its config
    (:data:`KNOWN_CONFIGS`); ``None`` and the reason, in one line, otherwise."""
    try:
        return ModelShape.from_config(model_config(resolve_source(name)), name), "its config"
    except BadInput as exc:
        if name not in KNOWN_CONFIGS:
            return None, f"model config not available offline ({first_line(str(exc))})"
    from transformers import AutoConfig

    settings = dict(KNOWN_CONFIGS[name])
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    return (ModelShape.from_config(config, name),
            "nnsteer's copy of its config.json (the hub is out of reach)")


# ------------------------------------------------------------------------ attribution

def probe_rows_per_trace(batch: int, metric: str, n_layers: int) -> int:
    """Probes one attribution trace holds: ``batch``, or for ``kl2`` and ``exact``, whose
    probes take a row per layer and a clean one, ``batch // (n_layers + 1)`` (one at least)."""
    return batch if metric in FIRST_ORDER else max(1, batch // (n_layers + 1))


def attribution_passes(chain_probes: Sequence[int], batch: int, metric: str,
                       n_layers: int) -> tuple[int, int]:
    """Forward and backward passes (model calls) of one attribution run over chains with
    ``chain_probes`` probes each (:func:`nnsteer.selection.attribution.probe_effects`): per
    chain with a probe, one clean forward and one forward per trace of probes
    (:func:`probe_rows_per_trace`); a backward per trace for the first-order metrics, two
    for ``kl2`` (a Jacobian-vector product), none for ``exact``."""
    per_trace = probe_rows_per_trace(batch, metric, n_layers)
    traces = sum(math.ceil(n / per_trace) for n in chain_probes if n > 0)
    chains = sum(1 for n in chain_probes if n > 0)
    per_backward = 1 if metric in FIRST_ORDER else 2 if metric == "kl2" else 0
    return chains + traces, traces * per_backward


# ------------------------------------------------------------------------ NDIF formulas

def chains_per_request(probes_per_chain: float, rows_per_request: int = REQUEST_ROWS,
                       reps: int = 1) -> int:
    """Chains one attribution request holds: whole chains up to ``rows_per_request``
    probe rows (``reps`` rows per probe), at least one."""
    return max(1, int((rows_per_request // reps) // max(probes_per_chain, 1)))


def ndif_jobs(stage: str, chains: int, batch: int = 8, *, per_request: int | None = None) -> int:
    """NDIF jobs of ``stage`` for ``chains`` chains: one per batch of ``batch`` (generate,
    steer, and the NLL batches of evaluate), one per ``per_request`` batches (extract,
    default :data:`BATCHES_PER_REQUEST`), one per ``per_request`` chains (attribute, see
    :func:`chains_per_request`)."""
    if chains <= 0:
        return 0
    batches = math.ceil(chains / batch)
    if stage == "extract":
        return math.ceil(batches / (per_request or BATCHES_PER_REQUEST))
    if stage == "attribute":
        return math.ceil(chains / (per_request or chains_per_request(1)))
    return batches


def ndif_distinct(stage: str, *, chains: int, prompt: float, tokens: float = 0, spans: float = 0,
                  vectors: int = 0, n_layers: int = 0, d_model: int = 0,
                  dtype_bytes: int = 2) -> float:
    """The data ``stage`` must send at least, in bytes: token ids at 4 bytes (the prompts for
    generate and steer, whose ``chains`` are then the distinct prompts; prompt and chain
    for extract and attribute), 8 bytes per sample or probe (position and label), and
    ``vectors`` vectors once: whole ``[n_layers, d_model]`` ones for attribute, one layer's
    for steer (``vectors`` = behaviours × steered layers)."""
    if stage in ("generate", "steer"):
        return 4 * chains * prompt + (vectors * d_model * dtype_bytes if stage == "steer" else 0)
    ids = 4 * chains * (prompt + tokens)
    if stage == "extract":
        return ids + 8 * chains * (spans + 1)  # + each chain's "overall" sample
    return ids + 8 * chains * spans + vectors * n_layers * d_model * dtype_bytes


def ndif_upload(stage: str, jobs: int, distinct: float, n_layers: int, d_model: int, *,
                vector_bytes: float = 0.0, excess: dict[str, float] | None = None) -> float:
    """Bytes up: ``jobs`` × the stage's per-job excess (:data:`NDIF_EXCESS`, or
    ``excess``), scaled from :data:`NDIF_BENCH_SHAPE` to this model's layers (its width for
    steer, whose excess is mostly per-row deltas), plus the distinct data; attribute's
    vectors (``vector_bytes``, counted once in ``distinct``) travel with every job."""
    per_job = (excess or NDIF_EXCESS).get(stage, NDIF_EXCESS["generate"])
    layers, width = NDIF_BENCH_SHAPE
    scale = d_model / width if stage == "steer" else n_layers / layers
    return jobs * per_job * scale + distinct + max(jobs - 1, 0) * vector_bytes


def ndif_excess(stage: str, up: float, distinct: float, jobs: int, vector_bytes: float = 0.0) -> float:
    """The per-job excess a measurement shows (:func:`ndif_upload` solved for it at the
    measured shape): what ``bench/bench_ndif.py`` measures for :data:`NDIF_EXCESS`. 0 at
    least, except for attribute, whose vectors (``vector_bytes``, in ``distinct`` once)
    travel in every job."""
    if not jobs:
        return 0.0
    if stage == "attribute":
        return (up - distinct - (jobs - 1) * vector_bytes) / jobs
    return max(0.0, (up - distinct) / jobs)


# ------------------------------------------------------------------------ the plan

@dataclass(frozen=True)
class Figure:
    """One planned figure of one stage: its value, how it is shown, and how it was made
    (``kind``: ``count``, ``formula`` or ``measured``; ``how``: the formula or the source)."""

    stage: str
    name: str
    value: float | None
    text: str
    kind: str
    how: str


@dataclass
class Plan:
    """The figures of a study's stages, and the model they are for."""

    config: Path
    model: str
    where: str
    shape: ModelShape | None
    shape_source: str
    dtype: str
    batch_size: int
    figures: list[Figure] = field(default_factory=list)
    #: The estimated tokens of each split's longest prompt (:func:`prompt_tokens`).
    prompt_tokens: dict[str, int] = field(default_factory=dict)

    def add(self, stage: str, name: str, value: float | None, text: str, kind: str, how: str) -> None:
        """Append one :class:`Figure`."""
        self.figures.append(Figure(stage, name, value, text, kind, how))

    def values(self, name: str) -> dict[str, float]:
        """The figure ``name`` of each stage that has it."""
        out: dict[str, float] = {}
        for f in self.figures:
            if f.name == name and f.value is not None:
                out[f.stage] = out.get(f.stage, 0.0) + f.value
        return out

    def total(self, name: str) -> float:
        """The sum of the figure ``name`` over the stages."""
        return sum(self.values(name).values())

    def header(self) -> str:
        """Which model, where, at what dtype and batch size."""
        if self.shape is None:
            about = self.shape_source
        else:
            s = self.shape
            about = (f"{s.family}, {s.n_layers} layers × {s.d_model}, "
                     f"{_count(s.parameters)} parameters; from {self.shape_source}")
        return (f"plan for {self.config}: {self.model} ({about}), {self.dtype}, "
                f"batch {self.batch_size}, {self.where}")

    def table(self) -> str:
        """The figures as a table: stage, figure, value, kind and how."""
        rows = [("stage", "figure", "value", "kind", "how")]
        rows += [(f.stage, f.name, f.text, f.kind, f.how) for f in self.figures]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [self.header()]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths)) + "  " + r[4]
                  for r in rows]
        return "\n".join(line.rstrip() for line in lines)

    def summary(self) -> str:
        """One line: chains, new tokens, passes, the peak memory and the annotator's calls."""
        parts = [f"{_count(self.total('chains'))} chains",
                 f"≤ {_count(self.total('new tokens'))} new tokens",
                 f"≤ {_count(self.total('forward passes'))} forward and "
                 f"{_count(self.total('backward passes'))} backward passes"]
        peaks = self.values("peak memory")
        if peaks:
            stage = max(peaks, key=peaks.get)
            parts.append(f"peak memory ≈ {peaks[stage] / GIB:.2f} GiB ({stage})")
        elif self.shape is None:
            parts.append("memory unknown (model config not available offline)")
        calls = self.total("annotator calls")
        parts.append(f"{_count(calls)} annotator calls" if calls else "no annotator calls")
        cost = self.total("annotator cost") + self.total("grader cost")
        if cost:
            parts.append(f"≈ ${cost:,.2f}")
        jobs = self.total("NDIF jobs")
        if jobs:
            parts.append(f"{_count(jobs)} NDIF jobs, ≈ {self.total('NDIF MB up'):,.1f} MB up")
        return "plan: " + ", ".join(parts)


def _count(n: float) -> str:
    return f"{int(round(n)):,}"


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _n(count: int, noun: str) -> str:
    """``1 batch``, ``2 batches``."""
    plural = noun + ("es" if noun.endswith(("ch", "ss")) else "s")
    return f"{count:,} {noun if count == 1 else plural}"


def stage_settings(config: Config) -> dict[str, dict[str, Any]]:
    """Each stage's options as the pipeline runs it: its function's defaults, overlaid with
    the config's (checked; ``batch_size`` from ``[model]``)."""
    settings = {}
    for stage in STAGES:
        function = stage_function(stage)
        given = stage_options(config, stage, function)
        defaults = {n: p.default for n, p in inspect.signature(function).parameters.items()
                    if n not in SUPPLIED and p.default is not p.empty}
        settings[stage.name] = {**defaults, **given}
    return settings


@dataclass(frozen=True)
class TaskSet:
    """How many tasks each split has, and its prompts' characters (longest, mean)."""

    counts: dict[str, int]
    longest: dict[str, int]
    mean: dict[str, float]
    how: str


def task_set(options: dict[str, Any]) -> TaskSet:
    """The tasks ``tasks`` would write with ``options`` (the built-in set or a file, capped
    as the stage caps it; for Claude, the numbers asked for, with the built-in prompts'
    lengths)."""
    source = options.get("source", "builtin")
    per, per_eval = options.get("per_category"), options.get("eval_per_category")
    if source == "claude":
        builtin = load_builtin_tasks()
        per = PAPER_PER_CATEGORY if per is None else per
        per_eval = PAPER_EVAL_PER_CATEGORY if per_eval is None else per_eval
        counts = {"train": per * len(CATEGORIES), "validation": 0,
                  "eval": per_eval * len(CATEGORIES)}
        chars = builtin["prompt"].str.len_chars()
        return TaskSet(counts, dict.fromkeys(counts, int(chars.max())),
                       dict.fromkeys(counts, float(chars.mean())),
                       f"Claude writes per_category {per} and eval_per_category {per_eval} for "
                       f"each of {len(CATEGORIES)} categories (prompt lengths: the built-in set's)")
    if source == "file":
        if options.get("path") is None:
            raise BadInput("[tasks] source = 'file' needs a path")
        tasks, origin = read_task_file(options["path"]), f"the {options['path']} file"
    else:
        tasks, origin = load_builtin_tasks(), "the built-in set"
    tasks = cap_tasks(carve_validation(tasks, options.get("validation_per_category")), per, per_eval)
    counts, longest, mean = {}, {}, {}
    for split in ("train", "validation", "eval"):
        prompts = tasks.filter(tasks["split"] == split)["prompt"].str.len_chars()
        counts[split] = prompts.len()
        longest[split] = int(prompts.max() or 0)
        mean[split] = float(prompts.mean() or 0.0)
    caps = ", ".join(f"{k} {v}" for k, v in (("per_category", per), ("eval_per_category", per_eval),
                                              ("validation_per_category",
                                               options.get("validation_per_category")))
                     if v is not None)
    return TaskSet(counts, longest, mean, f"{origin}{': ' + caps if caps else ''}")


def prompt_tokens(chars: float, template: str) -> int:
    """Estimated tokens of a task prompt of ``chars`` characters in the user-turn preset
    ``template`` (:data:`CHARS_PER_TOKEN`, :data:`CHAT_TEMPLATE_TOKENS`)."""
    wrapper = len(PROMPT_TEMPLATES.get(template, "{prompt}")) - len("{prompt}")
    return math.ceil((chars + wrapper) / CHARS_PER_TOKEN) + CHAT_TEMPLATE_TOKENS


def resolved_annotator(name: str) -> str:
    """``auto`` as the stage resolves it here (``openai:gpt-4o`` with an API key, else
    ``rules``), other names as given; says nothing."""
    if name == "auto":
        return f"openai:{DEFAULT_ANNOTATOR_MODEL}" if os.environ.get(API_KEY_ENV) else "rules"
    return name


def _dtype(config: Config) -> str:
    dtype = config.model.dtype
    if dtype not in (None, "auto"):
        return dtype
    if config.model.remote:
        return "bfloat16"
    device = config.model.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "float32" if device == "cpu" else "bfloat16"


def plan_study(config: Config, *, stages: Iterable[str] | None = None,
               price_per_mtok: float | None = None) -> Plan:
    """The :class:`Plan` of ``config``'s study (of ``stages`` only, if given);
    ``price_per_mtok``: the annotator's and grader's price per million tokens, input and
    output alike, for their cost. :class:`BadInput` naming the config for a bad option."""
    config = apply_released(config, lambda message: None)
    settings = stage_settings(config)
    shape, source = model_shape(config.model.name)
    dtype = _dtype(config)
    plan = Plan(config.path, config.model.name, "NDIF" if config.model.remote else "local",
                shape, source, dtype, config.model.batch_size)
    _Planner(plan, config, settings, shape, DTYPE_BYTES.get(dtype, 2), price_per_mtok).run(
        set(stages) if stages is not None else {s.name for s in STAGES})
    return plan


class _Planner:
    """Fills a :class:`Plan`, stage by stage, keeping what later stages need."""

    def __init__(self, plan: Plan, config: Config, settings: dict[str, dict[str, Any]],
                 shape: ModelShape | None, dtype_bytes: int, price: float | None):
        self.plan, self.config, self.s = plan, config, settings
        self.shape, self.bytes, self.price = shape, dtype_bytes, price
        self.remote = config.model.remote
        self.tasks = task_set(settings["tasks"])
        self.template = settings["generate"]["prompt_template"]
        self.prompt = {split: prompt_tokens(n, self.template)
                       for split, n in self.tasks.longest.items()}
        self.prompt_mean = {split: prompt_tokens(n, self.template)
                            for split, n in self.tasks.mean.items()}
        self.annotator = resolved_annotator(settings["annotate"]["annotator"])
        plan.prompt_tokens = dict(self.prompt)

    def run(self, selected: set[str]) -> None:
        for stage in STAGES:
            if stage.name in selected:
                getattr(self, f"_{stage.name}")(stage.name)

    # -- helpers

    def add(self, stage: str, name: str, value: float | None, text: str, kind: str, how: str) -> None:
        self.plan.add(stage, name, value, text, kind, how)

    def _prompt_how(self, split: str) -> str:
        return (f"prompt ≤ {self.prompt[split]} tokens (estimated: the longest {split} task's "
                f"characters and its template / {CHARS_PER_TOKEN} + {CHAT_TEMPLATE_TOKENS})")

    def generation(self, stage: str, chains: int, new: int, split: str, batch: int,
                   chains_how: str, prompts: int, vectors: int = 0) -> None:
        """Chains, tokens, passes and memory of a generating stage (generate, steer, a sweep)."""
        bound = "≤ " if chains_how.count("≤ ") else ""
        self.add(stage, "chains", chains, bound + _count(chains), "count", chains_how)
        self.add(stage, "new tokens", chains * new, f"≤ {_count(chains * new)}", "formula",
                 f"{_count(chains)} chains × max_new_tokens {new}")
        batches = math.ceil(chains / batch) if chains else 0
        self.add(stage, "forward passes", batches * new, f"≤ {_count(batches * new)}", "formula",
                 f"{_n(batches, 'batch')} of ≤ {batch} × (1 prefill + {new - 1} decoding steps); "
                 "fewer when a batch's chains all stop early")
        self.add(stage, "backward passes", 0, "0", "count", "generation runs no backward pass")
        self.memory(stage, min(batch, chains), self.prompt[split] + new - 1,
                    f"{self._prompt_how(split)} + {new - 1} generated")
        if self.remote:
            self.ndif("steer" if stage == "steer" else "generate", chains, prompts=prompts,
                      split=split, batch=batch, vectors=vectors, label=stage)

    def memory(self, stage: str, batch: int, tokens: int, tokens_how: str, *,
               extra: tuple[int, str] | None = None, kv_batch: int | None = None) -> None:
        """Weights + the KV cache of ``batch`` × ``tokens`` (+ ``extra``: bytes, how)."""
        if self.remote:
            self.add(stage, "peak memory", None, "on NDIF", "count", "the model runs on NDIF")
            return
        if self.shape is None:
            self.add(stage, "peak memory", None, "unknown", "formula", self.plan.shape_source)
            return
        s, b = self.shape, self.bytes
        weights = s.weight_bytes(b)
        kv = s.kv_cache_bytes(batch, tokens, b)
        total = weights + kv + (extra[0] if extra else 0)
        quantized = (f"; the checkpoint is {s.quantization}-quantized: at its {self.plan.dtype} "
                     "dtype as loaded" if s.quantization else "")
        how = (f"weights {_gib(weights)} ({_count(s.parameters)} parameters × {b} B{quantized})"
               f" + KV cache {_gib(kv)} (batch {batch} × {tokens} tokens: {tokens_how}; "
               f"{s.describe_kv()}; × {b} B)")
        if extra:
            how += f" + {extra[1]}"
        self.add(stage, "peak memory", total, _gib(total), "formula", how)

    def annotator_figures(self, stage: str, annotator: str, calls: int, reasoning: int,
                          prompt_chars: int, chains_how: str, what: str = "annotator") -> None:
        """Calls, tokens and cost of an LLM annotator (or grader) over ``calls`` chains of
        ≤ ``reasoning`` tokens."""
        if not annotator.startswith("openai:"):
            self.add(stage, f"{what} calls", 0, "0", "count",
                     f"{annotator}: offline, no calls")
            return
        self.add(stage, f"{what} calls", calls, _count(calls), "count",
                 f"{annotator}: one call per chain ({chains_how})")
        prompt = math.ceil(prompt_chars / CHARS_PER_TOKEN)
        sent = calls * (prompt + reasoning)
        reply = math.ceil(calls * reasoning * (REPLY_PER_REASONING_TOKEN if what == "annotator" else 0.1))
        self.add(stage, f"{what} tokens", sent + reply, f"≤ {_count(sent + reply)}", "formula",
                 f"{_count(calls)} calls × ({prompt} prompt + {reasoning} chain) in, "
                 f"{_count(reply)} out (the reply copies the text ≈ ×{REPLY_PER_REASONING_TOKEN})"
                 if what == "annotator" else
                 f"{_count(calls)} calls × ({prompt} prompt + {reasoning} answer) in, "
                 f"{_count(reply)} out (a verdict, ≈ a tenth of the answer)")
        if self.price is not None:
            cost = (sent + reply) / 1e6 * self.price
            self.add(stage, f"{what} cost", cost, f"≤ ${cost:,.2f}", "formula",
                     f"{_count(sent + reply)} tokens × ${self.price:g} per million")

    def ndif(self, stage: str, chains: int, *, prompts: int = 0, split: str = "train",
             batch: int = 8, tokens: int = 0, spans: float = 0, vectors: int = 0,
             per_request: int | None = None, extra_jobs: int = 0, label: str | None = None) -> None:
        """NDIF jobs and MB up of one stage (:func:`ndif_jobs`, :func:`ndif_upload`)."""
        name = label or stage
        jobs = ndif_jobs(stage, chains, batch, per_request=per_request) + extra_jobs
        self.add(name, "NDIF jobs", jobs, _count(jobs), "formula",
                 {"generate": f"one per batch: ⌈{chains} / {batch}⌉",
                  "steer": f"one per batch: ⌈{chains} / {batch}⌉",
                  "extract": f"one per {per_request or BATCHES_PER_REQUEST} batches of {batch}",
                  "attribute": f"whole chains up to {REQUEST_ROWS} probe rows per job",
                  "evaluate": f"one per batch of the NLL: ⌈{chains} / {batch}⌉"}.get(stage, "")
                 + (f" + {extra_jobs} (validation)" if extra_jobs else ""))
        if self.shape is None:
            self.add(name, "NDIF MB up", None, "unknown", "formula", self.plan.shape_source)
            return
        s = self.shape
        if stage == "evaluate":
            distinct = 4 * chains * (self.prompt_mean[split] + tokens) + 8 * chains * tokens
            up = jobs * NDIF_EXCESS["extract"] * s.n_layers / NDIF_BENCH_SHAPE[0] + distinct
            how = (f"{jobs} jobs × extract's measured excess per job (scaled to {s.n_layers} "
                   f"layers; {NDIF_MEASURED}) + ids and positions {distinct / 1e6:.2f} MB")
            self.add(name, "NDIF MB up", up / 1e6, f"≈ {up / 1e6:.2f}", "measured", how)
            return
        distinct = ndif_distinct(stage, chains=prompts if stage in ("generate", "steer") else chains,
                                 prompt=self.prompt_mean[split], tokens=tokens, spans=spans,
                                 vectors=vectors, n_layers=s.n_layers, d_model=s.d_model,
                                 dtype_bytes=self.bytes)
        vector_bytes = vectors * s.n_layers * s.d_model * self.bytes if stage == "attribute" else 0
        up = ndif_upload(stage, jobs, distinct, s.n_layers, s.d_model, vector_bytes=vector_bytes)
        self.add(name, "NDIF MB up", up / 1e6, f"≈ {up / 1e6:.2f}", "measured",
                 f"{jobs} jobs × {NDIF_EXCESS[stage] / 1e3:g} kB measured excess per job at 32 "
                 f"layers × 4096, scaled to {s.n_layers} × {s.d_model} ({NDIF_MEASURED}) + "
                 f"distinct data {distinct / 1e6:.2f} MB (ids 4 B, positions 8 B"
                 + (", vectors" if vectors else "") + ")")

    # -- the stages

    def _tasks(self, stage: str) -> None:
        counts = self.tasks.counts
        text = ", ".join(f"{n} {split}" for split, n in counts.items() if n)
        self.add(stage, "tasks", sum(counts.values()), text, "count", self.tasks.how)

    def generate_chains(self) -> int:
        o = self.s["generate"]
        n = self.tasks.counts.get(o["split"], 0)
        return n if o["limit"] is None else min(n, o["limit"])

    def _generate(self, stage: str) -> None:
        o = self.s["generate"]
        chains = self.generate_chains()
        how = f"the {o['split']} tasks" + (f", limit {o['limit']}" if o["limit"] else "")
        self.generation(stage, chains, o["max_new_tokens"], o["split"], o["batch_size"], how,
                        prompts=chains)

    def _annotate(self, stage: str) -> None:
        chains = self.generate_chains()
        prompt = self._annotator_prompt_chars(self.s["annotate"].get("annotator_prompt"))
        self.annotator_figures(stage, self.annotator, chains, self.s["generate"]["max_new_tokens"],
                               prompt, f"{_count(chains)} chains")

    def _annotator_prompt_chars(self, path: str | None) -> int:
        if path is None:
            return len(ANNOTATOR_PROMPT)
        try:
            return len(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            return len(ANNOTATOR_PROMPT)

    def _extract(self, stage: str) -> None:
        o, new = self.s["extract"], self.s["generate"]["max_new_tokens"]
        chains, batch = self.generate_chains(), o["batch_size"]
        calls = math.ceil(chains / batch) if chains else 0
        self.add(stage, "forward passes", calls, _count(calls), "formula",
                 f"one forward per chain, {batch} chains per call: ⌈{chains} / {batch}⌉")
        self.add(stage, "backward passes", 0, "0", "count", "extraction runs no backward pass")
        split = self.s["generate"]["split"]
        self.memory(stage, min(batch, chains), self.prompt[split] + new,
                    f"{self._prompt_how(split)} + {new} generated (the forward's cache)")
        if self.remote:
            spans = PROBES_PER_TOKEN * new
            self.ndif(stage, chains, split=split, batch=batch, tokens=new, spans=spans)

    def attribute_chains(self) -> int:
        limit = self.s["attribute"]["limit"]
        chains = self.generate_chains()
        return chains if limit is None else min(chains, limit)

    def _attribute(self, stage: str) -> None:
        o = self.s["attribute"]
        new, split = self.s["generate"]["max_new_tokens"], self.s["generate"]["split"]
        chains, batch, metric = self.attribute_chains(), o["batch_size"], o["metric"]
        labels = len(o["labels"]) if o["labels"] else len(STEERED_LABELS)
        probes = max(1, math.ceil(PROBES_PER_TOKEN * new))
        n_layers = self.shape.n_layers if self.shape else 0
        first_order = metric in FIRST_ORDER
        reps = 1 if first_order else n_layers + 1
        per_trace = probe_rows_per_trace(batch, metric, n_layers)
        forward, backward = attribution_passes([probes] * chains, batch, metric, n_layers)
        how = (f"{_count(chains)} chains × (1 clean forward + "
               f"{_n(math.ceil(probes / per_trace), 'probe pass')} of ≤ {per_trace} probes"
               f"{' × ' + str(reps) + ' rows' if reps > 1 else ''}); ≈ {probes} probes per chain "
               f"(estimated: {PROBES_PER_TOKEN * 500:g} per 500 tokens)")
        extra_jobs = 0
        if o["validate"]:
            sample = min(o["validate"] * labels, chains * probes)
            references = [m for m in VALIDATION_REFERENCES if m != metric] + ["exact"]
            for reference in references:  # the sample spread over chains: one probe each
                f, b = attribution_passes([1] * sample, batch, reference, n_layers)
                forward, backward = forward + f, backward + b
                if self.remote:
                    rows = 1 if reference in FIRST_ORDER else n_layers + 1
                    extra_jobs += math.ceil(sample / max(1, REQUEST_ROWS // rows))
            how += (f"; validate {o['validate']} × {labels} labels = {sample} probes (one per "
                    f"chain, estimated) again by {', '.join(references)}")
        self.add(stage, "chains attributed", chains, _count(chains), "count",
                 "the generated chains" + (f", limit {o['limit']}" if o["limit"] else ""))
        self.add(stage, "forward passes", forward, f"≈ {_count(forward)}", "formula", how)
        self.add(stage, "backward passes", backward, f"≈ {_count(backward)}", "formula",
                 {"nll": "one per probe pass", "released-code": "one per probe pass",
                  "kl2": "two per probe pass (a Jacobian-vector product)",
                  "exact": "none (really patches)"}.get(metric, "") +
                 ("; the validation's first-order passes" if o["validate"] else ""))
        tokens = self.prompt[split] + new
        if self.shape is not None and not self.remote:
            s = self.shape
            rows = min(per_trace, probes) * reps  # a trace holds one chain's probes
            positions = 1 if s.plain_kv_cache else tokens
            kept = s.activation_bytes(rows, positions, self.bytes) if metric != "exact" else 0
            clean = s.kv_cache_bytes(1, tokens, self.bytes)
            if s.plain_kv_cache:
                extra = (clean + kept,
                         f"the clean pass's cache {_gib(clean)} (1 × {tokens} tokens) + layer "
                         f"outputs kept for the gradient {_gib(kept)} ({s.n_layers} layers × "
                         f"{rows} probes × 1 position × {s.d_model} × {self.bytes} B)")
                self.memory(stage, rows, tokens, f"each probe row's copy of the cache up to "
                            f"its position, ≤ {tokens}", extra=extra)
            else:
                extra = (kept, f"layer outputs kept for the gradient {_gib(kept)} ({s.n_layers} "
                         f"layers × {rows} rows × {positions} positions × {s.d_model} × "
                         f"{self.bytes} B; no plain KV cache: each probe runs its prefix)")
                self.memory(stage, 1, tokens, "the clean pass over the chain", extra=extra)
        else:
            self.memory(stage, 1, tokens, "")
        if self.remote:
            per_request = chains_per_request(probes, o["rows_per_request"], reps)
            self.ndif(stage, chains, split=split, tokens=new, spans=probes, vectors=labels,
                      per_request=per_request, extra_jobs=extra_jobs)

    def behaviours(self) -> tuple[int, str]:
        """How many behaviours steer (and a sweep) steer, and why."""
        steer, select = self.s["steer"], self.s["select"]
        if steer["behaviours"]:
            return len(steer["behaviours"]), f"{_n(len(steer['behaviours']), 'behaviour')} ([steer])"
        by_hand = set(select["layers"] or {})
        if select["labels"]:
            n = len(set(select["labels"]) | by_hand)
            return n, f"{_n(n, 'behaviour')} ([select] labels, layers)"
        n = len(set(STEERED_LABELS) | by_hand)
        return n, f"≤ {n} behaviours (each steered one that gets a vector)"

    def sweep_chains(self) -> tuple[int, int, str]:
        """The validation sweep of ``select --coefficient auto``: tasks, chains, why."""
        o = self.s["select"]
        tasks = self.tasks.counts.get("validation", 0)
        if o["validation_limit"] is not None:
            tasks = min(tasks, o["validation_limit"])
        grid = check_grid(o["grid"])
        behaviours, why = self.behaviours()
        chains = tasks * (1 + behaviours * len(grid))
        return tasks, chains, (f"{tasks} validation tasks × (1 unsteered + {why} × "
                               f"{_n(len(grid), 'coefficient')}, positive)")

    def _select(self, stage: str) -> None:
        o = self.s["select"]
        if o["coefficient"] != AUTO:
            self.add(stage, "forward passes", 0, "0", "count",
                     "no model work: layers from the attribution or the config, coefficient "
                     f"{o['coefficient']:g}")
            return
        tasks, chains, how = self.sweep_chains()
        self.generation(stage, chains, o["max_new_tokens"], "validation", o["batch_size"], how,
                        prompts=tasks)
        self.annotator_figures(stage, self.annotator, chains, o["max_new_tokens"],
                               self._annotator_prompt_chars(self.s["annotate"].get("annotator_prompt")),
                               f"{_count(chains)} sweep chains, with annotate's annotator")
        calls = math.ceil(chains / o["batch_size"]) if chains else 0
        self.add(stage, "forward passes", calls, _count(calls), "formula",
                 f"the coherence cost (NLL): one forward per sweep chain, {o['batch_size']} "
                 f"chains per call: ⌈{chains} / {o['batch_size']}⌉")
        if self.remote:
            self.ndif("evaluate", chains, batch=o["batch_size"], tokens=o["max_new_tokens"],
                      split="validation", label=stage)

    def eval_tasks(self) -> int:
        tasks, limit = self.tasks.counts.get("eval", 0), self.s["steer"]["limit"]
        return tasks if limit is None else min(tasks, limit)

    def steer_chains(self) -> tuple[int, str]:
        o = self.s["steer"]
        tasks = self.eval_tasks()
        behaviours, why = self.behaviours()
        coefficients = len(o["coefficients"]) if o["coefficients"] else 1
        kinds = 2 if o["random_control"] else 1
        modes = len(o["where"])
        per_task = 1 + behaviours * coefficients * 2 * kinds * modes
        how = (f"{tasks} eval tasks × (1 baseline + {why} × {_n(coefficients, 'coefficient')}"
               f" × 2 directions × {_n(kinds, 'vector')}"
               f"{' (behaviour, random)' if kinds == 2 else ''} × {_n(modes, 'mode')})")
        return tasks * per_task, how

    def _steer(self, stage: str) -> None:
        o = self.s["steer"]
        chains, how = self.steer_chains()
        behaviours, _ = self.behaviours()
        by_hand = self.s["select"]["layers"] or {}
        layers = (max((len(v) for v in by_hand.values()), default=0)
                  or self.s["select"]["top_k"])
        self.generation(stage, chains, o["max_new_tokens"], "eval", o["batch_size"], how,
                        prompts=self.eval_tasks(), vectors=behaviours * layers)

    def _evaluate(self, stage: str) -> None:
        o, steer = self.s["evaluate"], self.s["steer"]
        chains, _ = self.steer_chains()
        new, batch = steer["max_new_tokens"], o["batch_size"]
        annotator = resolved_annotator(o["annotator"]) if o["annotator"] else self.annotator
        prompt = o.get("annotator_prompt") or self.s["annotate"].get("annotator_prompt")
        self.annotator_figures(stage, annotator, chains, new, self._annotator_prompt_chars(prompt),
                               f"{_count(chains)} steered chains")
        grader = o["grader"]
        if grader != "offline":
            grader_prompt = len(package_path("nnsteer.data", "grader_prompt.txt").read_text())
            self.annotator_figures(stage, grader, chains, new,
                                   grader_prompt + self.tasks.longest.get("eval", 0),
                                   f"{_count(chains)} steered chains", what="grader")
        calls = math.ceil(chains / batch) if chains else 0
        self.add(stage, "forward passes", calls, _count(calls), "formula",
                 f"the coherence cost (NLL under the unsteered model): one forward per steered "
                 f"chain, {batch} chains per call: ⌈{chains} / {batch}⌉")
        self.add(stage, "backward passes", 0, "0", "count", "no backward pass")
        self.memory(stage, min(batch, chains), self.prompt["eval"] + new,
                    f"{self._prompt_how('eval')} + {new} generated (the forward's cache)")
        if self.remote:
            self.ndif(stage, chains, batch=batch, tokens=new, split="eval")

    def _report(self, stage: str) -> None:
        self.add(stage, "forward passes", 0, "0", "count", "no model work: charts from the files")

