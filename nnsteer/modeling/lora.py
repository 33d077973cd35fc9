"""Low-rank adapters (LoRA) on a decoder's linear projections: train, save, merge.

A :class:`LoraLinear` wraps one ``nn.Linear`` and adds ``(alpha / rank) * B @ A`` to its
weight, with ``B`` starting at zero so the wrapped model starts equal to the base.
:func:`attach` wraps the projections of every decoder block, :func:`adapter_state` reads
the trained factors, and :func:`merge` adds them into a plain model's weights once, so
the merged model runs at the base model's speed with no adapter code in the forward.

Example:
    >>> wrapped = attach(model, rank=8, alpha=16.0)     # train wrapped.parameters()
    >>> factors = adapter_state(model)                  # {"model.layers.0.self_attn.q_proj.lora_a": ...}
    >>> merge(plain_model, factors, alpha=16.0)         # plain_model now carries the adapter
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from nnsteer.errors import BadInput

#: The projections an adapter touches in every decoder block (Llama / Qwen names).
TARGETS: tuple[str, ...] = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

_A, _B = "lora_a", "lora_b"


class LoraLinear(nn.Module):
    """``base(x) + (alpha / rank) * x @ A.T @ B.T``; only ``A`` and ``B`` are trainable."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base projection of ``x`` plus the scaled low-rank update."""
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale


def _projections(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{"model.layers.3.mlp.up_proj": (parent module, attribute)}`` for every target."""
    found: dict[str, tuple[nn.Module, str]] = {}
    for index, block in enumerate(model.model.layers):
        for target in TARGETS:
            parent_path, _, attr = target.rpartition(".")
            parent = block.get_submodule(parent_path)
            found[f"model.layers.{index}.{target}"] = (parent, attr)
    return found


def attach(model: nn.Module, *, rank: int, alpha: float) -> nn.Module:
    """Wrap every target projection of ``model`` in a :class:`LoraLinear` (in place).

    The base weights are frozen; the model's trainable parameters are the factors alone.
    """
    model.requires_grad_(False)
    for parent, attr in _projections(model).values():
        setattr(parent, attr, LoraLinear(getattr(parent, attr), rank, alpha))
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained factors of a model :func:`attach` wrapped, keyed ``<projection>.lora_a|b``."""
    state: dict[str, torch.Tensor] = {}
    for path, (parent, attr) in _projections(model).items():
        module = getattr(parent, attr)
        state[f"{path}.{_A}"] = module.lora_a.detach().clone()
        state[f"{path}.{_B}"] = module.lora_b.detach().clone()
    return state


def merge(model: nn.Module, factors: dict[str, torch.Tensor], *, alpha: float) -> nn.Module:
    """Add ``(alpha / rank) * B @ A`` into each target weight of a plain ``model`` (in place).

    :class:`BadInput` when the factors do not fit the model (another architecture).
    """
    projections = _projections(model)
    expected = {f"{p}.{s}" for p in projections for s in (_A, _B)}
    if set(factors) != expected:
        missing, extra = sorted(expected - set(factors)), sorted(set(factors) - expected)
        parts = [f"{len(keys)} factors {what} (first {keys[0]})"
                 for what, keys in (("missing", missing), ("unexpected", extra)) if keys]
        raise BadInput(f"adapter does not fit the model: {', '.join(parts)}")
    with torch.no_grad():
        for path, (parent, attr) in projections.items():
            weight = getattr(parent, attr).weight
            a = factors[f"{path}.{_A}"].to(torch.float32)
            b = factors[f"{path}.{_B}"].to(torch.float32)
            if (b.shape[0], a.shape[1]) != tuple(weight.shape):
                raise BadInput(
                    f"adapter factor {path} is {b.shape[0]}x{a.shape[1]}, "
                    f"the model's weight is {tuple(weight.shape)}"
                )
            delta = (b @ a) * (alpha / a.shape[0])
            weight.add_(delta.to(weight.dtype))
    return model


def save_adapter(path: Any, factors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write the factors as float16 safetensors with string metadata (the provenance)."""
    from safetensors.torch import save_file

    save_file({k: v.to(torch.float16).contiguous() for k, v in factors.items()}, str(path), metadata)


def load_adapter(path: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The factors and metadata of an adapter file :func:`save_adapter` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
