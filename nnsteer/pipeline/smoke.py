"""One tiny request of each kind a study sends to NDIF, to learn whether the server takes them.

:func:`smoke_requests` sends, on a loaded (remote) model, a few-token greedy ``generate``
that steers at every step (``tracer.iter``, as ``steer`` does, with a zero vector), one
``extract`` reduction, and one ``attribute`` session (a clean pass, a KV cache, a
gradient): the three shapes of request whose acceptance depends on the server's sandbox
and versions. Each kind's outcome is one line, so a user learns it before spending a
study's queue time (``nnsteer models --remote --smoke``).

Example:
    >>> for line in smoke_lines(load_model("meta-llama/Llama-3.1-8B", remote=True)):  # doctest: +SKIP
    ...     print(line)
    generate  accepted (2 new tokens, steered at every step)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nnsteer.errors import first_line
from nnsteer.generation.loop import generate
from nnsteer.generation.spec import SteeringSpec
from nnsteer.modeling.models import LoadedModel
from nnsteer.selection.attribution import Probe, probe_effects
from nnsteer.vectors.residuals import Selection, sum_sample_means

#: New tokens the smoke ``generate`` asks for; tokens of the smoke prompt for the others.
SMOKE_TOKENS = 2
SMOKE_TEXT = "One, two, three"


def smoke_requests(lm: LoadedModel) -> dict[str, Callable[[], str]]:
    """The three requests by kind, each returning what it got back, in a few words."""
    ids = lm.tokenizer(SMOKE_TEXT, add_special_tokens=False)["input_ids"][:4]
    zero = torch.zeros(lm.arch.d_model)

    def generation() -> str:
        spec = SteeringSpec({0: zero}, coefficient=0.0)
        (result,) = generate(lm, [SMOKE_TEXT], steering=spec, max_new_tokens=SMOKE_TOKENS,
                             progress=False)
        return f"{len(result.output_ids)} new tokens, steered at every step"

    def extraction() -> str:
        sums = sum_sample_means(lm, [Selection(ids, {"overall": [list(range(len(ids)))]})],
                                ["overall"], progress=False)
        return f"{len(sums.sums['overall'])} layer means"

    def attribution() -> str:
        probe = Probe("smoke", "overall", "overall", len(ids) - 2, ids[-1])
        vectors = {"overall": torch.zeros(lm.arch.n_layers, lm.arch.d_model)}
        effects = probe_effects(lm, {"smoke": ids}, [probe], vectors, "nll", progress=False)
        return f"{effects.shape[1]} layer effects"

    return {"generate": generation, "extract": extraction, "attribute": attribution}


def smoke_lines(lm: LoadedModel) -> list[str]:
    """One line per kind: ``accepted (...)`` or ``refused: <the server's last line>``."""
    lines = []
    for kind, request in smoke_requests(lm).items():
        try:
            outcome = f"accepted ({request()})"
        except Exception as exc:  # any refusal or failure is the answer here
            outcome = f"refused: {first_line(exc)}"
        lines.append(f"{kind:<9} {outcome}")
    return lines

