"""Stage inputs checked before any work: the tasks file, the device, and a study in which no
steered behaviour got a vector."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from nnsteer.cli import cli
from nnsteer.errors import BadInput
from nnsteer.modeling.placement import resolve_device
from nnsteer.runs.store import RunDir, write_json
from nnsteer.selection.attribution import attribute
from nnsteer.selection.layers import select_layers
from nnsteer.steer.chains import read_layer_choices
from nnsteer.vectors.extract import VectorSet, save_vectors


def test_generate_needs_tasks_and_loads_no_model(tmp_path):
    # The model would take seconds to load (or fail: it does not exist): the check comes first.
    result = CliRunner().invoke(cli, ["--run-dir", str(tmp_path), "generate", "--model",
                                      str(tmp_path / "no-such-model")])
    assert result.exit_code == 2
    assert f"tasks.parquet not found: run `nnsteer --run-dir {tmp_path} tasks` first" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device, message", [
    ("tpu", "--device 'tpu': expected cpu, cuda, cuda:N, mps or auto"),
    ("cuda:not-a-number", "expected cpu, cuda, cuda:N, mps or auto"),
])
def test_unknown_device_is_bad_input(device, message):
    with pytest.raises(BadInput, match=message):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_missing_gpu_is_one_line_exit_2():
    for device in ("cuda", "cuda:1", "auto"):
        with pytest.raises(BadInput, match=f"--device '?{device}'?: "):
            resolve_device(device)
    result = CliRunner().invoke(cli, ["models", "--device", "cuda"])
    assert result.exit_code == 2
    assert result.output.strip() == "nnsteer: error: --device 'cuda': not available on this machine"
    assert resolve_device("cpu") == "cpu"


@pytest.fixture()
def unsteerable(tmp_path, tiny_llama) -> RunDir:
    """A run whose annotations gave vectors only for behaviours that are not steered."""
    run = RunDir(tmp_path)
    shape = (tiny_llama.arch.n_layers, tiny_llama.arch.d_model)
    vectors = {label: torch.zeros(shape) for label in ("initializing", "deduction", "overall")}
    save_vectors(VectorSet(vectors, {}), run.vectors)
    return run


def test_nothing_to_attribute_or_select(unsteerable, tiny_llama):
    message = "has no vector for any steered behaviour .*: no usable span of them in annotations.parquet"
    with pytest.raises(BadInput, match=message):
        attribute(unsteerable, tiny_llama)
    with pytest.raises(BadInput, match=message):
        select_layers(unsteerable)
    assert not unsteerable.attribution.exists() and not unsteerable.layers.exists()


def test_empty_layer_choices_say_so(unsteerable, tiny_llama):
    write_json(unsteerable.layers, {})
    with pytest.raises(BadInput, match="layers.json names no behaviour: nothing to steer"):
        read_layer_choices(unsteerable, None, tiny_llama)
