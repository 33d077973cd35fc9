"""What a vector file says about where it applies and which model it was made on.

Every vector file nnsteer writes (``vectors.safetensors``, control-vector GGUFs, ``.pt``
exports) carries :func:`application` in its metadata: the hook site, the operation, the
layer numbering, the model family, a fingerprint of the model's weights, the dtypes and
the nnsteer version. :func:`check_made_on` refuses vectors made on another model.

The fingerprint (:func:`weights_fingerprint`) is the SHA-256 of the token-embedding
matrix plus the first row of every other parameter (the whole of a 1-D one), each cast
to bfloat16 first, so that loading the same weights in float32 or bfloat16 gives the same
fingerprint while a fine-tune (a merged LoRA leaves the embedding alone) gives another.
A model on NDIF has no local weights (meta tensors): its fingerprint is ``None`` and the
check falls back to the model id.

Example:
    >>> application(lm)["fingerprint"]
    'c1f0...'
    >>> check_made_on(vs.metadata, lm, where="runs/x/vectors.safetensors")
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from nnsteer.errors import BadInput
from nnsteer.modeling.models import LoadedModel
from nnsteer.runs.store import nnsteer_version

HOOK_SITE = "output of decoder block l (the residual stream after it: hidden_states[l + 1])"
LAYER_NUMBERING = ("0-based decoder-block index l = 0..n_layers-1; llama.cpp's direction.N "
                   "is block N's output, so N = l")
OPERATION = ("add coefficient / len(layers) x vector (sign from the direction) to the output of "
             "each steered block at every position, prompt and generated tokens alike")
FINGERPRINT_METHOD = ("sha256 of the token-embedding matrix then the first row of every other "
                      "parameter (whole 1-D parameters), in named_parameters order, as bfloat16")
NO_FINGERPRINT = "remote model: its weights are not local, so the check uses the model id"


def weights_fingerprint(hf_model: Any, embed_name: str = "model.embed_tokens.weight") -> str | None:
    """:data:`FINGERPRINT_METHOD` of a transformers model; ``None`` if its weights are meta."""
    params = dict(hf_model.named_parameters())
    if any(p.is_meta for p in params.values()):
        return None
    digest = hashlib.sha256()
    for name, param in sorted(params.items(), key=lambda item: item[0] != embed_name):
        part = param if name == embed_name or param.dim() < 2 else param.reshape(param.shape[0], -1)[0]
        digest.update(name.encode())
        digest.update(part.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(lm: LoadedModel) -> str | None:
    """The fingerprint of ``lm``'s weights (``None`` for a model on NDIF)."""
    if lm.remote is True:
        return None
    return weights_fingerprint(lm.hf_model, f"{lm.arch.embed_path}.weight")


def application(lm: LoadedModel, fingerprint: str | None = None) -> dict[str, Any]:
    """The metadata keys that say where and how a vector applies and which model made it
    (``fingerprint``: already computed, else computed here)."""
    fingerprint = fingerprint or model_fingerprint(lm)
    return {
        "hook_site": HOOK_SITE,
        "operation": OPERATION,
        "layer_numbering": LAYER_NUMBERING,
        "family": lm.arch.family,
        "fingerprint": fingerprint,
        "fingerprint_method": FINGERPRINT_METHOD if fingerprint else NO_FINGERPRINT,
        "vector_dtype": "float32",
        "model_dtype": str(lm.dtype).removeprefix("torch."),
        "nnsteer_version": nnsteer_version(),
    }


def check_made_on(metadata: dict[str, Any], lm: LoadedModel, where: str, force: bool = False) -> None:
    """:class:`BadInput` (one line naming ``where``) if vectors whose ``metadata`` is given
    were made on another model than ``lm``, unless ``force``.

    Fingerprints are compared when both are known, else the model ids; vectors that
    recorded neither are not checked.
    """
    if force:
        return
    made_by = metadata.get("model", {}) if isinstance(metadata.get("model"), dict) else {}
    made_name, recorded = made_by.get("model"), metadata.get("fingerprint")
    current = model_fingerprint(lm) if recorded else None
    if recorded and current:
        if recorded != current:
            raise BadInput(
                f"{where}: made on {made_name or 'another model'} (weights fingerprint "
                f"{recorded[:12]}), but {lm.name} has fingerprint {current[:12]}: extract "
                "vectors on this model, or pass --force to use them anyway"
            )
    elif made_name and made_name != lm.name:
        raise BadInput(f"{where}: made on {made_name}, not {lm.name}: extract vectors on this "
                       "model, or pass --force to use them anyway")


def check_fits(n_layers: int, d_model: int, lm: LoadedModel, where: str) -> None:
    """:class:`BadInput` (one line naming ``where``) unless per-layer vectors of
    ``[n_layers, d_model]`` fit ``lm``'s layers and width."""
    if (n_layers, d_model) != (lm.arch.n_layers, lm.arch.d_model):
        raise BadInput(f"{where}: vectors are [{n_layers}, {d_model}] per label but {lm.name} has "
                       f"{lm.arch.n_layers} layers of width {lm.arch.d_model}")
