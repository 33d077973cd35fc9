"""What a steered generation adds, where and when: :class:`SteeringSpec` and its vocabulary.

A spec is per-layer vectors, a coefficient and a direction, and a mode: ``where`` (which
phase), ``at`` (which tokens of it) and an optional :class:`Condition` (CAST-style: only where
a label's direction is detected). :mod:`nnsteer.generation.modes` turns a spec into the
per-token masks of the generation trace.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from nnsteer.errors import BadInput
from nnsteer.modeling.models import LoadedModel
from nnsteer.modeling.thinking import end_of_thinking_ids, thinking_of

Direction = Literal["positive", "negative"]
#: The two ways to steer: add (``positive``) or subtract (``negative``) the vector.
STEERING_DIRECTIONS: tuple[Direction, ...] = ("positive", "negative")

WHERE = ("all", "prompt", "generated", "thinking", "answer")
AT = ("every", "step-starts")


class WhereFlags(NamedTuple):
    """Which phases a ``where`` steers: the prompt pass or the generated tokens, each
    before the end-of-thinking marker (thinking) or from it on (answer)."""

    prompt_thinking: bool
    prompt_answer: bool
    generated_thinking: bool
    generated_answer: bool


#: The phases each ``where`` steers.
WHERE_FLAGS: dict[str, WhereFlags] = {
    "all": WhereFlags(True, True, True, True),
    "prompt": WhereFlags(True, True, False, False),
    "generated": WhereFlags(False, False, True, True),
    "thinking": WhereFlags(True, False, True, False),
    "answer": WhereFlags(False, True, False, True),
}
#: ``--when``'s ``LABEL@LAYER>THRESHOLD``, the threshold optional.
_WHEN = re.compile(r"^\s*(?P<label>[^@>\s]+)\s*@\s*(?P<layer>[^>\s]+)\s*(?:>\s*(?P<threshold>.+?))?\s*$")


def check_coefficient(value: Any, what: str) -> float:
    """``value`` as a steering coefficient: a finite number >= 0 (the direction gives the sign),
    at most 1e6 (far beyond any useful strength; the additions it makes are bounded by the
    model's residual norms in :mod:`nnsteer.steer.limits`).

    :class:`BadInput` naming ``what`` (an option or a file entry) otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise BadInput(f"{what}: {value!r} is not a number >= 0 (the direction gives the sign)")
    if value > 1e6:
        raise BadInput(f"{what}: {value!r} is more than 1e6, far beyond any useful strength")
    return float(value)


@dataclass(frozen=True, eq=False)
class Condition:
    """Steer only where ``residual[layer] · vector > threshold`` (``vector`` unit-norm)."""

    label: str
    layer: int
    threshold: float
    vector: torch.Tensor

    @property
    def name(self) -> str:
        """``LABEL@LAYER>THRESHOLD``, as ``--when`` spells it."""
        return f"{self.label}@{self.layer}>{self.threshold:g}"


def parse_when(text: str) -> tuple[str, int, float | None]:
    """``LABEL@LAYER>THRESHOLD`` (threshold optional: calibrated) as its parts; :class:`BadInput`
    in one line otherwise."""
    match = _WHEN.match(text or "")
    if not match:
        raise BadInput(f"--when {text!r}: expected LABEL@LAYER>THRESHOLD, e.g. "
                       "uncertainty-estimation@12>3.5 (or LABEL@LAYER for the calibrated threshold)")
    label, layer, threshold = match["label"], match["layer"], match["threshold"]
    if not layer.isdigit():
        raise BadInput(f"--when {text!r}: layer {layer!r} is not a layer index")
    if threshold is None:
        return label, int(layer), None
    try:
        value = float(threshold)
    except ValueError:
        raise BadInput(f"--when {text!r}: threshold {threshold!r} is not a number") from None
    if not math.isfinite(value):
        raise BadInput(f"--when {text!r}: threshold {threshold!r} is not a finite number")
    return label, int(layer), value


def unit(vector: torch.Tensor) -> torch.Tensor:
    """``vector / ‖vector‖`` in float32; :class:`BadInput` for a zero or non-finite vector."""
    vector = vector.detach().to("cpu", torch.float32)
    norm = vector.norm()
    if not torch.isfinite(vector).all() or norm == 0:
        raise BadInput("the condition vector is zero or not finite")
    return vector / norm


def mode_name(where: str = "all", at: str = "every", when: Condition | None = None) -> str:
    """The ``mode`` column of a steered chain: ``where``, then ``+step-starts`` and
    ``+when LABEL@LAYER>T`` when set (``all`` alone is the paper's setting)."""
    parts = [where]
    if at != "every":
        parts.append(at)
    if when is not None:
        parts.append(f"when {when.name}")
    return "+".join(parts)


def check_mode(where: str, at: str) -> None:
    """:class:`BadInput` unless ``where`` and ``at`` are known modes."""
    if where not in WHERE:
        raise BadInput(f"--where {where!r}: expected one of {', '.join(WHERE)}")
    if at not in AT:
        raise BadInput(f"--at {at!r}: expected one of {', '.join(AT)}")


@dataclass(frozen=True)
class SteeringSpec:
    """Vectors to add at decoder-block outputs: ``{layer: [d_model] vector}``.

    Each of the ``n`` layers receives ``±coefficient / n × vector`` (sign from ``direction``),
    at the positions ``where``, ``at`` and ``when`` select (:mod:`nnsteer.generation.modes`; the
    defaults steer every position of every step).
    """

    vectors: dict[int, torch.Tensor]
    coefficient: float
    direction: Direction = "positive"
    where: str = "all"
    at: str = "every"
    when: Condition | None = None

    def validate(self, lm: LoadedModel) -> None:
        """:class:`BadInput` unless the spec fits ``lm``: layers in range, widths, finite
        values, a mode ``lm`` can run."""
        if not self.vectors:
            raise BadInput("steering spec has no layers")
        if self.direction not in ("positive", "negative"):
            raise BadInput(
                f"steering direction must be positive or negative, not {self.direction!r}"
            )
        check_coefficient(self.coefficient, "steering coefficient")
        lm.arch.check_layers(list(self.vectors), what="steering layer")
        for layer, vector in self.vectors.items():
            if tuple(vector.shape) != (lm.arch.d_model,):
                raise BadInput(
                    f"steering vector for layer {layer} has shape {tuple(vector.shape)}; "
                    f"the model's width is {lm.arch.d_model}"
                )
            if not torch.isfinite(vector).all():
                raise BadInput(f"steering vector for layer {layer} contains NaN or inf")
        check_mode(self.where, self.at)
        if self.where in ("thinking", "answer") and not end_of_thinking_ids(lm):
            raise BadInput(f"--where {self.where}: {lm.name} has no thinking format "
                           f"({thinking_of(lm).summary()}; see --thinking-format)")
        if self.when is not None:
            self._validate_condition(lm)

    def _validate_condition(self, lm: LoadedModel) -> None:
        when = self.when
        lm.arch.check_layers([when.layer], what=f"--when {when.name}: layer")
        if tuple(when.vector.shape) != (lm.arch.d_model,):
            raise BadInput(f"--when {when.name}: the vector has shape {tuple(when.vector.shape)}; "
                           f"the model's width is {lm.arch.d_model}")
        if when.layer > min(self.vectors):
            raise BadInput(f"--when {when.name}: the detection layer must not come after the "
                           f"first steered layer ({min(self.vectors)}): the decision is made in "
                           "the same forward, before the first addition")

    @property
    def scale(self) -> float:
        """What multiplies each layer's vector: ``±coefficient / n_layers``."""
        sign = 1.0 if self.direction == "positive" else -1.0
        return sign * self.coefficient / len(self.vectors)


#: One spec for every prompt, or one spec (or ``None``: unsteered) per prompt.
Steering = SteeringSpec | Sequence[SteeringSpec | None] | None


