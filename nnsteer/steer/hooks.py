"""Steering a plain transformers model with forward hooks, no nnsight.

:func:`steering` adds what ``nnsteer steer`` adds (:func:`nnsteer.steer.export.additions`) to
the output of each steered decoder block, at every position, for as long as the ``with``
block runs; the hooks are removed when it ends, by an error too. It works wherever the
model runs: ``model.generate``, ``transformers.pipeline``, lm-evaluation-harness's
``HFLM`` (its ``.model``).

Example:
    >>> with nnsteer.steering(hf_model, "runs/smollm2-135m", behaviour="backtracking"):
    ...     out = hf_model.generate(**inputs, max_new_tokens=64)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from nnsteer.errors import BadInput
from nnsteer.generation.spec import Direction
from nnsteer.modeling.architecture import Architecture
from nnsteer.runs.store import RunDir
from nnsteer.steer.export import additions, read_control_vector, run_additions
from nnsteer.vectors.extract import VectorSet, load_vectors

Vectors = VectorSet | RunDir | Path | str | Mapping[int, torch.Tensor]


@contextlib.contextmanager
def steering(
    model: Any,
    vectors: Vectors,
    *,
    behaviour: str | None = None,
    coefficient: float | None = None,
    layers: Sequence[int] | None = None,
    vector_layer: int | None = None,
    direction: Direction = "positive",
) -> Iterator[dict[int, torch.Tensor]]:
    """Steer ``model`` (a transformers causal LM) inside the ``with`` block; yields the
    ``{layer: addition}`` it applies.

    ``vectors`` is a run directory (its ``layers.json`` gives the defaults for
    ``behaviour``), a ``vectors.safetensors`` path or :class:`VectorSet` (then ``behaviour``,
    ``layers`` and ``coefficient`` are needed), or ready additions: a ``{layer: tensor}``
    mapping, a ``.pt`` or a control-vector ``.gguf`` path, scaled by ``coefficient``
    (default 1) and the direction's sign.
    """
    added = _resolve(vectors, behaviour=behaviour, coefficient=coefficient, layers=layers,
                     vector_layer=vector_layer, direction=direction)
    arch = Architecture.from_config(model.config)
    arch.check_layers(list(added), what="steering layer")
    blocks = arch.layers(model)
    handles = []
    try:
        for layer, delta in added.items():
            if tuple(delta.shape) != (arch.d_model,):
                raise BadInput(f"steering vector for layer {layer} has shape {tuple(delta.shape)}; "
                               f"the model's width is {arch.d_model}")
            handles.append(blocks[layer].register_forward_hook(_adder(delta)))
        yield added
    finally:
        for handle in handles:
            handle.remove()


def _adder(delta: torch.Tensor) -> Any:
    """A forward hook adding ``delta`` (in the output's dtype) to a block's hidden states."""

    def hook(module: Any, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        steered = hidden + delta.to(device=hidden.device, dtype=hidden.dtype)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    return hook


def _resolve(vectors: Vectors, *, behaviour: str | None, coefficient: float | None,
             direction: Direction, **choice: Any) -> dict[int, torch.Tensor]:
    if isinstance(vectors, (str, Path)) and Path(vectors).suffix in (".gguf", ".pt"):
        vectors = read_control_vector(vectors)[0]
    if isinstance(vectors, Mapping):
        sign = 1.0 if direction == "positive" else -1.0
        scale = sign * (1.0 if coefficient is None else coefficient)
        return {int(layer): scale * v.detach().to("cpu", torch.float32).reshape(-1)
                for layer, v in vectors.items()}
    if behaviour is None:
        raise BadInput("steering: name the behaviour whose vector to add (behaviour=...)")
    overrides = dict(coefficient=coefficient, direction=direction, **choice)
    if isinstance(vectors, RunDir) or (isinstance(vectors, (str, Path)) and Path(vectors).is_dir()):
        run = vectors if isinstance(vectors, RunDir) else RunDir(Path(vectors))
        return run_additions(run, behaviour, **overrides)[0]
    if isinstance(vectors, (str, Path)):
        vectors = load_vectors(vectors)
    return additions(vectors, behaviour, **overrides)
