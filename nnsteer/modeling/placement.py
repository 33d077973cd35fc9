"""Where a local model runs: its device, its dtype, and accelerate's placement over GPUs,
the CPU and the disk (``device_map``, ``max_memory``).

Example:
    >>> check_placement("auto", {"0": "20GiB", "cpu": "64GiB"})
    {'device_map': 'auto', 'max_memory': {0: '20GiB', 'cpu': '64GiB'}}
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from nnsteer.errors import BadInput


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    """``auto`` (float32 on CPU, bfloat16 on GPU) or a torch dtype name."""
    if dtype in (None, "auto"):
        return torch.float32 if device == "cpu" else torch.bfloat16
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise BadInput(f"--dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
    return value


def resolve_device(device: str | None) -> str:
    """``None`` picks ``cuda`` when a GPU is present, else ``cpu``; ``auto`` spreads over GPUs.

    :class:`BadInput` for a device this machine does not have.
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "auto":
        if not torch.cuda.is_available():
            raise BadInput("--device auto: spreads a model over GPUs, and no CUDA GPU is available")
        return device
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise BadInput(f"--device {device!r}: expected cpu, cuda, cuda:N, mps or auto") from None
    if parsed.type == "cuda":
        present = torch.cuda.is_available() and (parsed.index or 0) < torch.cuda.device_count()
    elif parsed.type == "mps":
        present = torch.backends.mps.is_available()
    else:
        present = parsed.type == "cpu"
    if not present:
        raise BadInput(f"--device {device!r}: not available on this machine")
    return device


#: The named ``device_map`` strategies of accelerate.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_placement(device_map: Any, max_memory: Any) -> dict[str, Any]:
    """The ``from_pretrained`` keywords of a ``device_map`` (a name of :data:`DEVICE_MAPS`,
    or ``{module: device}`` with devices GPU indices, ``cuda:N``, ``cpu`` or ``disk``) and a
    ``max_memory`` (``{device: size}``, ``{"0": "20GiB", "cpu": "64GiB"}``);
    :class:`BadInput` naming the option otherwise. ``{}`` when neither is given."""
    if device_map is None:
        if max_memory is not None:
            raise BadInput("max_memory needs a device_map (auto, or an explicit map)")
        return {}
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise BadInput(f"device_map {device_map!r}: expected {', '.join(DEVICE_MAPS)} or a "
                       "table of module = device")
    if isinstance(device_map, dict):
        device_map = {str(k): _placement_device(v, "device_map") for k, v in device_map.items()}
    elif not isinstance(device_map, str):
        raise BadInput(f"device_map {device_map!r}: expected a name or a table of module = device")
    placement: dict[str, Any] = {"device_map": device_map}
    if max_memory is not None:
        if not isinstance(max_memory, dict) or not all(isinstance(v, (str, int)) for v in max_memory.values()):
            raise BadInput(f"max_memory {max_memory!r}: expected a table of device = size "
                           '("20GiB" or bytes)')
        placement["max_memory"] = {_placement_device(k, "max_memory"): v for k, v in max_memory.items()}
    return placement


def _placement_device(device: Any, option: str) -> int | str:
    """A device of a placement: a GPU index (``0``, ``"0"``), ``cuda:N``, ``cpu`` or ``disk``."""
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return device
    if isinstance(device, str) and device.isdigit():
        return int(device)
    if isinstance(device, str) and (device in ("cpu", "disk", "mps") or re.fullmatch(r"cuda:\d+", device)):
        return device
    raise BadInput(f"{option}: device {device!r}: expected a GPU index, cuda:N, cpu or disk")


def parse_placement_text(device_map: str | None, max_memory: str | None) -> tuple[Any, Any]:
    """``--device-map`` (a name, or a JSON object) and ``--max-memory`` (``0=20GiB,cpu=64GiB``)
    as :func:`check_placement` takes them."""
    if device_map and device_map.lstrip().startswith("{"):
        try:
            device_map = json.loads(device_map)
        except json.JSONDecodeError as exc:
            raise BadInput(f"--device-map: not a JSON object ({exc})") from None
    memory = None
    if max_memory:
        pairs = [item.partition("=") for item in max_memory.split(",") if item.strip()]
        if not all(sep and key.strip() and value.strip() for key, sep, value in pairs):
            raise BadInput(f"--max-memory {max_memory!r}: expected device=size pairs, "
                           "e.g. 0=20GiB,cpu=64GiB")
        memory = {key.strip(): value.strip() for key, _, value in pairs}
    return device_map, memory
