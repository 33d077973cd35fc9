"""The ``steer`` stage: steered and baseline chains on the eval tasks (``steered.parquet``).

For each behaviour in ``layers.json``, the behaviour's vector taken at its
``vector_layer`` is added (``positive``) or subtracted (``negative``) at each of its
``layers`` with ``coefficient / len(layers)``; one unsteered baseline per task is the
reference. A control steers with a seeded random direction of the same norm at the same
layers and coefficient. Every chain of every behaviour and direction shares the batches.
``where``, ``at`` and ``when`` narrow the positions steered (:mod:`nnsteer.generation.modes`); each
``where`` given is one more condition, recorded in the ``mode`` column with the random
control under the same mask.

Example:
    >>> steer_chains(RunDir("runs/smollm2-135m"), lm, coefficients=[0.5, 1.0], limit=10)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import polars as pl
import torch

from nnsteer.errors import BadInput
from nnsteer.generation.chains import (
    ChainJob,
    chains_resume_key,
    run_chain_jobs,
    split_tasks,
)
from nnsteer.generation.prompts import DEFAULT_PROMPT_TEMPLATE, check_prompt_template
from nnsteer.generation.spec import (
    STEERING_DIRECTIONS,
    Condition,
    Direction,
    SteeringSpec,
    check_coefficient,
    check_mode,
    mode_name,
    parse_when,
    unit,
)
from nnsteer.modeling.identity import check_fits, check_made_on
from nnsteer.modeling.models import LoadedModel
from nnsteer.runs.checkpoint import tensor_digest
from nnsteer.runs.store import (
    RunDir,
    provenance,
    read_json,
    read_metadata,
    read_parquet,
)
from nnsteer.steer.choices import LayerChoice, read_layers
from nnsteer.steer.export import additions
from nnsteer.steer.limits import check_additions, model_residual_norms
from nnsteer.vectors.extract import VectorSet, load_vectors, per_layer, steered_rows


def read_layer_choices(
    run: RunDir, behaviours: Sequence[str] | None, lm: LoadedModel
) -> dict[str, LayerChoice]:
    """The ``layers.json`` entries of ``behaviours`` (default: every behaviour it has),
    checked against the model."""
    path = run.layers
    every = read_layers(path)
    if behaviours is None:
        if not every:
            raise BadInput(f"{path} names no behaviour: nothing to steer")
        behaviours = list(every)
    if not behaviours or len(set(behaviours)) != len(behaviours):
        raise BadInput(f"behaviours must be distinct and at least one, got {list(behaviours)}")
    for behaviour in behaviours:
        if behaviour not in every:
            raise BadInput(
                f"{path}: no layers for {behaviour!r} (it has {', '.join(every) or 'none'}); "
                "run `nnsteer select` or name other behaviours"
            )
        choice = every[behaviour]
        lm.arch.check_layers([choice.vector_layer, *choice.layers],
                             what=f"{path}: {behaviour}: layer")
    return {behaviour: every[behaviour] for behaviour in behaviours}


def random_like(vector: torch.Tensor, seed: int, behaviour: str) -> torch.Tensor:
    """A random direction with the norm of ``vector``, fixed by ``seed`` and ``behaviour``."""
    generator = torch.Generator().manual_seed(_seed_for(seed, behaviour))
    direction = torch.randn(vector.shape, generator=generator, dtype=torch.float32)
    return direction * (vector.norm() / direction.norm())


def _seed_for(seed: int, behaviour: str) -> int:
    return (
        int.from_bytes(hashlib.sha256(f"{seed}|{behaviour}".encode()).digest()[:8], "little") >> 1
    )


def steered_chain_id(
    task_id: str, behaviour: str, direction: str, coefficient: float, vector: str,
    mode: str = "all",
) -> str:
    """``{task_id}|{behaviour}|{direction}|{coefficient:g}|{vector}``, then ``|{mode}``
    unless the mode is ``all``."""
    suffix = "" if mode == "all" else f"|{mode}"
    return f"{task_id}|{behaviour}|{direction}|{coefficient:g}|{vector}{suffix}"


def baseline_chain_id(task_id: str) -> str:
    """The ``chain_id`` of the unsteered chain of ``task_id``."""
    return f"{task_id}|baseline"


def steer_chains(
    run: RunDir,
    lm: LoadedModel,
    *,
    behaviours: list[str] | None = None,
    coefficients: list[float] | None = None,
    random_control: bool = True,
    limit: int | None = None,
    max_new_tokens: int = 500,
    batch_size: int = 8,
    seed: int = 0,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    where: Sequence[str] = ("all",),
    at: str = "every",
    when: str | None = None,
    force: bool = False,
) -> pl.DataFrame:
    """The ``steer`` stage: baseline, positive and negative chains per eval task (``run.steered``).

    ``coefficients`` (a sweep) replaces each behaviour's ``layers.json`` coefficient;
    ``random_control`` adds chains steered by a norm-matched random vector;
    ``prompt_template`` names the user-turn preset (``generation.PROMPT_TEMPLATES``);
    ``where`` (one condition each), ``at`` and ``when`` (``LABEL@LAYER>THRESHOLD``, or
    ``LABEL@LAYER`` for ``select --calibrate-conditions``' threshold) choose the positions
    steered (:mod:`nnsteer.generation.modes`); ``force`` steers with vectors made on another model
    (:func:`check_made_on`). Resumable.
    A sweep adds conditions: chains already in ``run.steered`` at other coefficients,
    with the same vectors, layers and settings, are kept (and stay in the table).
    """
    check_prompt_template(prompt_template)
    for c in coefficients or []:
        check_coefficient(c, "--coefficients")
    tasks = split_tasks(run, "eval", limit)
    if not where or len(set(where)) != len(where):
        raise BadInput(f"--where: give distinct modes, at least one, got {list(where)}")
    for name in where:
        check_mode(name, at)
    choices = read_layer_choices(run, behaviours, lm)
    behaviours = list(choices)
    vector_set = load_vectors(run.vectors)
    check_made_on(vector_set.metadata, lm, str(run.vectors), force)
    vectors = behaviour_vectors(vector_set, choices, lm, seed, random_control)
    condition = None if when is None else read_condition(run, when, vector_set, lm)
    used = {b: {k: vector_digest(v) for k, v in kinds.items()} for b, kinds in vectors.items()}
    if condition is not None:
        used["when"] = {condition.name: vector_digest(condition.vector)}
    earlier = _earlier_coefficients(run, chains_resume_key(lm, max_new_tokens, used), choices)
    plan = {behaviour: sorted({*(coefficients or [choice.coefficient]), *earlier.get(behaviour, ())})
            for behaviour, choice in choices.items()}
    check_plan(vector_set, choices, plan, lm, "--coefficients" if coefficients else str(run.layers))
    jobs = steering_jobs(tasks, "eval", choices, vectors, plan, where=where, at=at,
                         condition=condition)
    options = {
        "behaviours": behaviours,
        "coefficients": coefficients,
        "random_control": random_control,
        "limit": limit,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "seed": seed,
        "prompt_template": prompt_template,
        "where": list(where),
        "at": at,
        "when": condition.name if condition else None,
    }
    return run_chain_jobs(
        lm,
        jobs,
        run.steered,
        provenance("steer", options, lm.provenance()),
        used,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        prompt_template=prompt_template,
    )


def check_plan(
    vs: VectorSet, choices: dict[str, LayerChoice], plan: dict[str, Sequence[float]],
    lm: LoadedModel | None, origin: str,
) -> None:
    """:class:`BadInput` if steering a behaviour at one of its planned coefficients would add
    more than the model's residual norms allow (:func:`nnsteer.steer.limits.check_additions`);
    ``origin`` names where the coefficients came from."""
    norms = model_residual_norms(vs, lm)
    for behaviour, choice in choices.items():
        for coefficient in plan[behaviour]:
            check_additions(additions(vs, behaviour, choice=choice, coefficient=coefficient),
                            norms, f"{origin}: {behaviour} at coefficient {coefficient:g}")


def steering_jobs(
    tasks: pl.DataFrame,
    split: str,
    choices: dict[str, LayerChoice],
    vectors: dict[str, dict[str, torch.Tensor]],
    coefficients: dict[str, Sequence[float]],
    *,
    directions: Sequence[Direction] = STEERING_DIRECTIONS,
    where: Sequence[str] = ("all",),
    at: str = "every",
    condition: Condition | None = None,
) -> list[ChainJob]:
    """The chains to generate: per task its unsteered chain, then one per behaviour,
    coefficient, direction, vector kind (``vectors[behaviour]``: ``behaviour``, ``random``)
    and ``where`` mode, in that order."""
    jobs = []
    for task_id, prompt in tasks.select("task_id", "prompt").iter_rows():
        jobs.append(ChainJob(baseline_chain_id(task_id), task_id, split, prompt))
        for behaviour, choice in choices.items():
            for coefficient in coefficients[behaviour]:
                for direction in directions:
                    for kind, vector in vectors[behaviour].items():
                        for place in where:
                            spec = SteeringSpec(per_layer(vector, choice.layers),
                                                coefficient, direction, place, at, condition)
                            mode = mode_name(place, at, condition)
                            jobs.append(ChainJob(
                                steered_chain_id(task_id, behaviour, direction, coefficient,
                                                 kind, mode),
                                task_id, split, prompt, spec, behaviour, direction,
                                coefficient, choice.layers, kind, mode,
                            ))
    return jobs


def read_condition(run: RunDir, when: str, vector_set: VectorSet, lm: LoadedModel) -> Condition:
    """The :class:`Condition` ``--when LABEL@LAYER[>THRESHOLD]`` names: the label's unit
    vector at that layer; without a threshold, the one ``select --calibrate-conditions``
    wrote to ``layers.json``. :class:`BadInput` in one line for a label without a vector,
    a layer out of range or no calibrated threshold."""
    label, layer, threshold = parse_when(when)
    if label not in vector_set.vectors:
        raise BadInput(f"--when {when!r}: {run.vectors} has no vector for {label!r} "
                       f"(it has {', '.join(vector_set.labels) or 'none'})")
    lm.arch.check_layers([layer], what=f"--when {when!r}: layer")
    if threshold is None:
        entry = read_json(run.layers).get(label, {})
        calibrated = entry.get("conditions", {}).get(str(layer)) if isinstance(entry, dict) else None
        if not isinstance(calibrated, dict) or "threshold" not in calibrated:
            raise BadInput(f"--when {when!r}: {run.layers} has no calibrated threshold for "
                           f"{label!r} at layer {layer}; run `nnsteer select "
                           "--calibrate-conditions` or give LABEL@LAYER>THRESHOLD")
        threshold = float(calibrated["threshold"])
    return Condition(label, layer, threshold, unit(vector_set[label][layer]))


def _earlier_coefficients(
    run: RunDir, resume_key: str, choices: dict[str, LayerChoice]
) -> dict[str, set[float]]:
    """Per behaviour, the coefficients ``run.steered`` already holds chains for at the
    behaviour's current layers, if its rows are reusable (same ``resume_key``)."""
    path = run.steered
    if not path.exists() or read_metadata(path).get("resume_key") != resume_key:
        return {}
    rows = read_parquet(path, columns=["behaviour", "coefficient", "layers", "vector"])
    earlier: dict[str, set[float]] = {}
    for row in rows.filter(pl.col("vector") == "behaviour").iter_rows(named=True):
        choice = choices.get(row["behaviour"])
        if choice is not None and tuple(row["layers"]) == choice.layers:
            earlier.setdefault(row["behaviour"], set()).add(float(row["coefficient"]))
    return earlier


def behaviour_vectors(
    vector_set: VectorSet,
    choices: dict[str, LayerChoice],
    lm: LoadedModel,
    seed: int,
    control: bool,
) -> dict[str, dict[str, torch.Tensor]]:
    """``{behaviour: {"behaviour": vector, "random": control}}`` at each vector layer."""
    check_fits(vector_set.n_layers, vector_set.d_model, lm, "the vectors")
    vectors = {}
    for behaviour, choice in choices.items():
        vector = steered_rows(vector_set, behaviour, choice.vector_layer, choice.layers).float()
        if not torch.isfinite(vector).all():
            raise BadInput(
                f"the {behaviour!r} vector at layer {choice.vector_layer} contains NaN or inf"
            )
        vectors[behaviour] = {"behaviour": vector}
        if control:
            vectors[behaviour]["random"] = random_like(vector, seed, behaviour)
    return vectors


def vector_digest(vector: torch.Tensor) -> str:
    """The short digest ``steer`` records of each vector it steers with (in its resume key)."""
    return tensor_digest(vector, layout=False)[:16]
