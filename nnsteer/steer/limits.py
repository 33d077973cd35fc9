"""How hard steering may push: what it adds, bounded by the model's residual norms.

An addition (``coefficient / len(layers) × vector`` at a layer, or an imported direction at
llama.cpp's strength 1) whose norm is more than :data:`MAX_ADDITION_RATIO` times the
model's residual norm at that layer no longer steers the model: it drowns the residual
stream (float32 infinities make the model write token 0 over and over). ``steer``,
``export``, ``select`` and ``import`` refuse such additions in one line.

The residual norm at a layer is the norm of the model's mean residual there: the
``overall`` mean of extracted vectors, else the norms ``import`` measured and recorded
(:data:`RESIDUAL_NORMS` in the vectors' metadata), else, with the model at hand, measured on
:data:`PROBE_TEXT`. Without any of these only float32 overflow is refused.

Example:
    >>> check_additions({12: 1e6 * vs["backtracking"][12]}, residual_norms(vs), "--coefficient 1e6")
    BadInput: --coefficient 1e6: the addition at layer 12 has norm 3.1e+06, 5.2e+04 times ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from nnsteer.errors import BadInput
from nnsteer.labels import OVERALL
from nnsteer.modeling.models import LoadedModel
from nnsteer.vectors.extract import VectorSet
from nnsteer.vectors.residuals import Selection, sum_sample_means

#: An addition may be at most this many times the model's residual norm at its layer.
MAX_ADDITION_RATIO = 100.0
#: Metadata key of the residual norms per layer that ``import`` measured.
RESIDUAL_NORMS = "residual_norms"
#: The text whose mean residual stands for the model's when no vectors say (its first
#: token, often an attention sink with outsized activations, left out).
PROBE_TEXT = ("Let me think about this step by step. First, 12 times 12 is 144, and 144 minus "
              "44 is 100. Wait, let me check that again: yes, the answer is 100.")


def residual_norms(vs: VectorSet) -> list[float] | None:
    """The model's residual norm at each layer as ``vs`` records it (its ``overall`` mean,
    else :data:`RESIDUAL_NORMS`); None if it records neither."""
    if OVERALL in vs.vectors:
        return vs.vectors[OVERALL].double().norm(dim=-1).tolist()
    recorded = vs.metadata.get(RESIDUAL_NORMS)
    if (isinstance(recorded, list) and len(recorded) == vs.n_layers
            and all(isinstance(n, int | float) and not isinstance(n, bool) for n in recorded)):
        return [float(n) for n in recorded]
    return None


def measure_residual_norms(lm: LoadedModel) -> list[float]:
    """The norm of ``lm``'s mean residual at each layer over :data:`PROBE_TEXT`."""
    ids = lm.tokenizer.encode(PROBE_TEXT)
    sample = Selection(ids, {OVERALL: [list(range(1, len(ids)))]})
    means = sum_sample_means(lm, [sample], [OVERALL], batch_size=1, progress=False).means()
    return means[OVERALL].double().norm(dim=-1).tolist()


def model_residual_norms(vs: VectorSet, lm: LoadedModel | None = None) -> list[float] | None:
    """:func:`residual_norms` of ``vs``, else measured on ``lm`` if given, else None."""
    norms = residual_norms(vs)
    if norms is None and lm is not None:
        norms = measure_residual_norms(lm)
    return norms


def check_additions(
    added: Mapping[int, torch.Tensor], norms: Sequence[float] | None, what: str,
    advice: str = "lower the coefficient",
) -> None:
    """:class:`BadInput` naming ``what`` and the layer, with ``advice``, if an addition
    overflows float32, or its norm is more than :data:`MAX_ADDITION_RATIO` times ``norms``
    at its layer (a layer whose norm is unknown or zero is checked for overflow only)."""
    for layer, vector in sorted(added.items()):
        norm = float(vector.double().norm())
        if not math.isfinite(norm) or not torch.isfinite(vector.float()).all():
            raise BadInput(f"{what}: the addition at layer {layer} overflows float32: {advice}")
        reference = norms[layer] if norms is not None and 0 <= layer < len(norms) else 0.0
        if math.isfinite(reference) and reference > 0 and norm > MAX_ADDITION_RATIO * reference:
            raise BadInput(
                f"{what}: the addition at layer {layer} has norm {norm:.3g}, {norm / reference:.3g} "
                f"times the model's residual norm there ({reference:.3g}; at most "
                f"{MAX_ADDITION_RATIO:g} times): {advice}")
