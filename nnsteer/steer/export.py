"""Vectors that travel: llama.cpp control vectors and plain ``.pt`` files, out and in.

:func:`additions` is what nnsteer's ``steer`` adds for one behaviour: ``{layer: ±coefficient
/ len(layers) × vector}`` (from ``layers.json`` unless overridden). :func:`export_vector`
writes those additions as a llama.cpp control vector (GGUF: ``general.architecture =
controlvector``, one float32 1-D tensor ``direction.N`` per layer, nnsteer's provenance
under ``nnsteer.*`` keys) or as a plain ``{layer: tensor}`` ``.pt`` file with a ``.json``
beside it. :func:`import_vector` reads a control vector made by another tool into a run's
``vectors.safetensors`` and ``layers.json``, so ``steer`` and ``evaluate`` can use it.

Layer numbering (llama.cpp, ``src/llama-adapter.cpp`` and ``common/common.cpp``):
``direction.N`` is added to the output of decoder block N (0-based), the same site as
nnsteer's layer N; N = 0 is refused by llama.cpp's reader, so block 0's output cannot be
steered there, while the last block can.

Example:
    >>> export_vector(RunDir("runs/smollm2-135m"), "backtracking", "gguf", "bt.gguf")
    >>> import_vector(RunDir("runs/smollm2-135m"), lm, "happy.gguf", "backtracking")
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from nnsteer.errors import BadInput
from nnsteer.generation.spec import Direction, SteeringSpec, check_coefficient
from nnsteer.labels import OVERALL
from nnsteer.modeling.identity import (
    HOOK_SITE,
    LAYER_NUMBERING,
    OPERATION,
    application,
    check_fits,
    check_made_on,
    model_fingerprint,
)
from nnsteer.modeling.models import LoadedModel
from nnsteer.runs.store import (
    RunDir,
    atomic_path,
    damaged,
    file_digest,
    provenance,
    read_json,
    require,
    write_json,
)
from nnsteer.steer.choices import LayerChoice, read_layers
from nnsteer.steer.limits import (
    RESIDUAL_NORMS,
    check_additions,
    measure_residual_norms,
    residual_norms,
)
from nnsteer.vectors.extract import (
    PER_LAYER,
    VectorSet,
    load_vectors,
    per_layer,
    save_vectors,
    steered_rows,
)

FORMATS = ("gguf", "pt")
ARCHITECTURE = "controlvector"
#: GGUF key prefix of nnsteer's provenance in an exported control vector.
PROVENANCE_PREFIX = "nnsteer."


def additions(
    vs: VectorSet,
    behaviour: str,
    *,
    choice: LayerChoice | None = None,
    coefficient: float | None = None,
    layers: Sequence[int] | None = None,
    vector_layer: int | None = None,
    direction: Direction = "positive",
) -> dict[int, torch.Tensor]:
    """``{layer: float32 addition}`` exactly as ``steer`` adds them for ``behaviour``.

    ``choice`` (its ``layers.json`` entry) gives the defaults; ``coefficient``, ``layers``
    and ``vector_layer`` override it. Without a ``choice``, ``layers`` and ``coefficient``
    are needed, and ``vector_layer`` too when there are several layers.
    """
    layers = list(layers if layers is not None else choice.layers if choice else [])
    coefficient = coefficient if coefficient is not None else choice.coefficient if choice else None
    if vector_layer is None:
        vector_layer = choice.vector_layer if choice else layers[0] if len(layers) == 1 else None
    if not layers or coefficient is None:
        raise BadInput(f"{behaviour}: give the layers and the coefficient (no layers.json entry)")
    if vector_layer is None and behaviour not in vs.metadata.get(PER_LAYER, ()):
        raise BadInput(f"{behaviour}: several layers: say which layer's vector to add (vector_layer)")
    check_coefficient(coefficient, "coefficient")
    for layer in [*layers, *([vector_layer] if vector_layer is not None else [])]:
        if not 0 <= layer < vs.n_layers:
            raise BadInput(f"layer {layer} is out of range: the vectors have layers 0..{vs.n_layers - 1}")
    rows = steered_rows(vs, behaviour, vector_layer if vector_layer is not None else layers[0], layers)
    spec = SteeringSpec(per_layer(rows.float(), layers), coefficient, direction)
    return {layer: spec.scale * vector for layer, vector in spec.vectors.items()}


def run_additions(
    run: RunDir,
    behaviour: str,
    **overrides: Any,
) -> tuple[dict[int, torch.Tensor], VectorSet]:
    """:func:`additions` for ``behaviour`` from ``run``'s vectors and ``layers.json`` entry
    (``overrides``: its keyword arguments), with the vector set they came from."""
    vs = load_vectors(run.vectors)
    choice = read_layers(run.layers).get(behaviour) if run.layers.exists() else None
    return additions(vs, behaviour, choice=choice, **overrides), vs


# --------------------------------------------------------------------------- export


def export_vector(
    run: RunDir,
    behaviour: str,
    fmt: Literal["gguf", "pt"],
    out: Path | str,
    *,
    coefficient: float | None = None,
    layers: Sequence[int] | None = None,
    direction: Direction = "positive",
    force: bool = False,
) -> dict[int, torch.Tensor]:
    """Write ``behaviour``'s steering as a llama.cpp control vector or a ``.pt`` file at ``out``.

    Raises :class:`BadInput` for an unknown format, for GGUF for layer 0 (llama.cpp
    cannot steer block 0's output), for additions out of bounds
    (:func:`nnsteer.steer.limits.check_additions`), and for a file it would write over
    (:func:`export_targets`). Returns the additions written.
    """
    if fmt not in FORMATS:
        raise BadInput(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    added, vs = run_additions(run, behaviour, coefficient=coefficient, layers=layers, direction=direction)
    if fmt == "gguf" and 0 in added:
        raise BadInput("layer 0: llama.cpp cannot steer the output of block 0 (its control "
                       "vectors start at direction.1); choose layers from 1")
    check_additions(added, residual_norms(vs), f"{behaviour} at --coefficient {coefficient:g}"
                    if coefficient is not None else f"{run.layers}: {behaviour}")
    export_targets(run, fmt, out, force)
    meta = {"hook_site": HOOK_SITE, "operation": OPERATION, "layer_numbering": LAYER_NUMBERING,
            **{k: v for k, v in vs.metadata.items() if k in _CARRIED}, "behaviour": behaviour,
            "direction": direction, "layers": sorted(added),
            "coefficient": coefficient if coefficient is not None else _choice_coefficient(run, behaviour),
            **provenance("export", {"format": fmt, "behaviour": behaviour}, vs.metadata.get("model"))}
    if fmt == "gguf":
        write_control_vector(added, out, meta, model_hint=str(vs.metadata.get("family", "")))
    else:
        write_pt(added, out, meta)
    return added


def export_targets(run: RunDir, fmt: str, out: Path | str, force: bool = False) -> list[Path]:
    """The files an export to ``out`` writes (a ``.pt`` file's metadata goes to ``.json``
    beside it); :class:`BadInput` if one of them is a file of ``run`` (:meth:`RunDir.owns`),
    is a directory, would be both files, or exists and ``force`` is not given."""
    out = Path(out)
    targets = [out] if fmt == "gguf" else [out, out.with_suffix(".json")]
    if len(set(targets)) < len(targets):
        raise BadInput(f"--out {out}: the pt format writes its metadata to {targets[1]}, which "
                       "would replace the vectors: give the file another suffix (.pt)")
    for target in targets:
        if run.owns(target):
            raise BadInput(f"--out {out}: would write {target}, a file of the run directory "
                           f"{run.root}: choose another name or folder")
        if target.is_dir():
            raise BadInput(f"--out {out}: {target} is a directory")
        if target.exists() and not force:
            raise BadInput(f"--out {out}: {target} exists: choose another name, or pass --force "
                           "to replace it")
    return targets


#: The vector file's metadata that every export carries along.
_CARRIED = ("family", "fingerprint",
            "fingerprint_method", "vector_dtype", "model_dtype", "variant", "normalisation")


def _choice_coefficient(run: RunDir, behaviour: str) -> float | None:
    choice = read_layers(run.layers).get(behaviour) if run.layers.exists() else None
    return choice.coefficient if choice else None


def write_control_vector(
    directions: Mapping[int, torch.Tensor], path: Path | str, metadata: Mapping[str, Any], model_hint: str
) -> None:
    """A GGUF file as llama.cpp's reader expects: ``general.architecture = controlvector``,
    ``controlvector.model_hint``, ``controlvector.layer_count`` and one float32 1-D tensor
    ``direction.N`` per layer N; each ``metadata`` item is a string under ``nnsteer.<key>``
    (JSON for non-strings). Written atomically."""
    import gguf

    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", model_hint)
        writer.add_int32(f"{ARCHITECTURE}.layer_count", len(directions))
        for key, value in metadata.items():
            writer.add_string(PROVENANCE_PREFIX + key, value if isinstance(value, str) else json.dumps(value, default=str))
        for layer in sorted(directions):
            writer.add_tensor(f"direction.{layer}", directions[layer].detach().to("cpu", torch.float32).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def write_pt(directions: Mapping[int, torch.Tensor], path: Path | str, metadata: Mapping[str, Any]) -> None:
    """``torch.save({layer: float32 tensor})`` at ``path``, ``metadata`` as JSON beside it
    (same name, ``.json``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({int(k): v.detach().to("cpu", torch.float32).clone() for k, v in directions.items()}, tmp)
    write_json(path.with_suffix(".json"), dict(metadata))


# --------------------------------------------------------------------------- import


def read_control_vector(path: Path | str) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """``({N: direction.N}, key-values)`` of a control vector, checked by
    :func:`check_directions`.

    A GGUF file is read by llama.cpp's rules: tensors named ``direction.N`` with N >= 1,
    float32, 1-D; tensors of the same N add up; its key-values are the GGUF keys. A
    ``.pt`` file is read as ``{layer: tensor}`` (a layer an integer or a string of digits,
    each once); its key-values are those of the ``.json`` file beside it, as ``export``
    writes it, under ``nnsteer.`` keys. :class:`BadInput` names the file and what is wrong.
    """
    path = require(path)
    if path.suffix == ".pt":
        directions, fields = _read_pt(path), _read_pt_metadata(path)
    else:
        directions, fields = _read_gguf(path)
    check_directions(path, directions)
    return {layer: vector.float() for layer, vector in directions.items()}, fields


def _read_gguf(path: Path) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # truncated or foreign files fail in many ways
        raise damaged(path, exc) from None
    fields = {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            raise BadInput(f"{path}: tensor {tensor.name!r} is not named direction.N")
        if int(index) == 0:
            raise BadInput(f"{path}: direction.0: llama.cpp has no layer 0 in a control vector")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise BadInput(f"{path}: {tensor.name} must be a float32 1-D tensor")
        data = torch.from_numpy(tensor.data.copy()).float()
        directions[int(index)] = directions.get(int(index), 0) + data
    return directions, fields


def _read_pt(path: Path) -> dict[int, torch.Tensor]:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise damaged(path, exc) from None
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise BadInput(f"{path}: expected a {{layer: tensor}} dict")
    directions: dict[int, torch.Tensor] = {}
    for key, vector in raw.items():
        if isinstance(key, str) and re.fullmatch(r"[0-9]+", key):
            layer = int(key)
        elif isinstance(key, int) and not isinstance(key, bool):
            layer = key
        else:
            raise BadInput(f"{path}: key {key!r} is not a layer number")
        if layer in directions:
            raise BadInput(f"{path}: layer {layer} appears more than once among its keys")
        directions[layer] = vector
    return directions


def _read_pt_metadata(path: Path) -> dict[str, Any]:
    """The provenance ``export`` writes beside a ``.pt`` file, as GGUF-style ``nnsteer.`` keys
    (strings, JSON for the rest); {} if there is none (or the ``.json`` is another tool's)."""
    beside = path.with_suffix(".json")
    if not beside.is_file():
        return {}
    metadata = read_json(beside)
    if not isinstance(metadata, dict) or metadata.get("stage") != "export":
        return {}
    return {PROVENANCE_PREFIX + key: value if isinstance(value, str) else json.dumps(value)
            for key, value in metadata.items()}


def check_directions(path: Path, directions: Mapping[int, Any]) -> None:
    """:class:`BadInput` naming ``path`` and the layer unless every direction is a dense
    1-D tensor of real floats, all of one width, finite in float32 and not all zeros."""
    if not directions:
        raise BadInput(f"{path}: holds no direction tensors")
    for layer, vector in sorted(directions.items()):
        where = f"{path}: layer {layer}"
        if vector.layout != torch.strided:
            raise BadInput(f"{where}: a sparse tensor; save it dense (tensor.to_dense())")
        if not vector.is_floating_point():
            raise BadInput(f"{where}: holds {str(vector.dtype).removeprefix('torch.')} values, "
                           "not real floating-point numbers")
        if vector.dim() != 1:
            raise BadInput(f"{where}: has shape {list(vector.shape)}, not one vector (1-D)")
        if not torch.isfinite(vector.float()).all():
            raise BadInput(f"{where}: holds NaN or inf (in float32)")
        if not vector.any():
            raise BadInput(f"{where}: is all zeros: there is no direction to steer along")
    widths = sorted({int(v.numel()) for v in directions.values()})
    if len(widths) != 1:
        raise BadInput(f"{path}: direction tensors have different widths {widths}")


def _field_value(field: Any) -> Any:
    """A GGUF key's value as Python (strings decoded, arrays as lists)."""
    try:
        return field.contents()
    except Exception:  # older gguf packages: a string or the first scalar
        part = field.parts[field.data[0]]
        return bytes(part).decode("utf-8", "replace") if part.dtype.kind == "u" and part.dtype.itemsize == 1 else part.tolist()


def _made_on(path: Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The model a control vector says it was made on (``nnsteer.model``,
    ``nnsteer.fingerprint``), as :func:`check_made_on` reads vector metadata; {} if it does
    not say."""
    fingerprint = fields.get(PROVENANCE_PREFIX + "fingerprint")
    model = fields.get(PROVENANCE_PREFIX + "model")
    try:
        model = json.loads(model) if isinstance(model, str) else model
    except json.JSONDecodeError:
        raise damaged(path, f"its {PROVENANCE_PREFIX}model key is not JSON") from None
    made_on: dict[str, Any] = {}
    if isinstance(model, dict) and model.get("model"):
        made_on["model"] = {"model": str(model["model"])}
    if isinstance(fingerprint, str) and fingerprint not in ("", "null"):
        made_on["fingerprint"] = fingerprint
    return made_on


def import_vector(run: RunDir, lm: LoadedModel, path: Path | str, name: str, *, replace: bool = False,
                  force: bool = False) -> VectorSet:
    """Add the control vector at ``path`` to ``run``'s vectors as label ``name``, steered at
    its own layers with llama.cpp's strength 1 (``layers.json``: those layers, coefficient
    ``len(layers)``, each layer its own row).

    Raises :class:`BadInput` for a vector whose width is not ``lm``'s or whose layers it
    does not have, a ``name`` that would overwrite an extracted vector (unless ``replace``),
    or a file or vectors in ``run`` made on another model (unless ``force``; a file
    imported so records it under ``forced``).
    """
    path = Path(path)
    directions, fields = read_control_vector(path)
    made_on = _made_on(path, fields)
    try:
        check_made_on(made_on, lm, str(path))
        forced = False
    except BadInput:
        if not force:
            raise
        forced = True
    width = int(next(iter(directions.values())).numel())
    if width != lm.arch.d_model:
        raise BadInput(f"{path}: its vectors have width {width}, {lm.name} has width {lm.arch.d_model}")
    beyond = [n for n in sorted(directions) if not 0 <= n < lm.arch.n_layers]
    if beyond:
        raise BadInput(f"{path}: has layer {beyond[0]} ({len(directions)} layers up to {max(directions)}), "
                       f"{lm.name} has layers 0..{lm.arch.n_layers - 1}")
    if name == OVERALL or not name.strip():
        raise BadInput(f"--as {name!r}: choose another name")
    entries: dict[str, Any] = {}
    if run.layers.exists():  # read and checked before anything is written
        read_layers(run.layers)
        entries = read_json(run.layers)
    if run.vectors.exists():
        vs = load_vectors(run.vectors)
        check_made_on(vs.metadata, lm, str(run.vectors), force)
        check_fits(vs.n_layers, vs.d_model, lm, str(run.vectors))
        imported = vs.metadata.get(PER_LAYER, [])
        if name in vs.vectors and name not in imported and not replace:
            raise BadInput(f"--as {name}: {run.vectors} already has an extracted {name!r} vector; "
                           "import into another run directory (--run-dir) or pass --replace")
    else:
        vs = VectorSet({}, {**provenance("import", {}, lm.provenance()), **application(lm)})
    norms = residual_norms(vs) if vs.vectors else None
    measured = norms is None
    if measured:
        norms = measure_residual_norms(lm)
    check_additions(directions, norms, str(path), advice="scale the vectors down")
    stacked = torch.zeros(lm.arch.n_layers, width)
    for layer, vector in directions.items():
        stacked[layer] = vector.reshape(-1)
    layers = sorted(directions)
    source = {"file": str(path), "sha256": file_digest(path), "layers": layers,
              **{k: v for k, v in fields.items() if k.startswith(("general.", f"{ARCHITECTURE}.", PROVENANCE_PREFIX))}}
    if forced:
        source["forced"] = {"made_on": made_on, "imported_into": lm.name,
                            "fingerprint": model_fingerprint(lm)}
    metadata = {**vs.metadata, PER_LAYER: sorted({*vs.metadata.get(PER_LAYER, []), name}),
                "imported": {**vs.metadata.get("imported", {}), name: source},
                **({RESIDUAL_NORMS: norms} if measured else {})}
    result = VectorSet({**vs.vectors, name: stacked}, metadata)
    save_vectors(result, run.vectors)
    entries[name] = {"vector_layer": layers[0], "layers": layers, "coefficient": float(len(layers)),
                     "chosen_by": f"import {path.name}"}
    write_json(run.layers, entries)
    return load_vectors(run.vectors)
