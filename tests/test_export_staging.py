"""export writes through store/atomic.py: complete under the final names or not at all, and a model
with external data (the >1.5 GiB rule, lowered here) reads the data file the staging area chose."""

from __future__ import annotations

import os

import onnx
import pytest

import lensgraph.export
from lensgraph.export import ExportError, export_model
from lensgraph.verify import verify

from files import snapshot


def _locations(path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_export_with_external_data_replaces_a_previous_one_whole(tmp_path, gpt2_hf, gpt2_exports, monkeypatch,
                                                                 exporter):
    monkeypatch.setattr(lensgraph.export, "SINGLE_FILE_LIMIT", 0)  # every model counts as large
    out = tmp_path / "m.onnx"
    first = export_model(gpt2_hf, out, exporter=exporter)
    assert first["external_data"] and _locations(out) == {"m.onnx.data"}
    assert first["data_file"] == str(tmp_path / "m.onnx.data")
    # the model being replaced reads m.onnx.data until the last rename: the new data goes beside it
    second = export_model(gpt2_hf, out, exporter=exporter)
    assert _locations(out) == {"m.onnx.1.data"} and second["data_file"] == str(tmp_path / "m.onnx.1.data")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.1.data"]  # old data removed, no staging left
    assert verify(gpt2_exports["torchscript17"], out).ok


def test_a_failed_export_writes_nothing(tmp_path, gpt2_hf, monkeypatch):
    out = tmp_path / "sub" / "m.onnx"

    def broken(*args, **kwargs):
        raise RuntimeError("the exporter broke")

    monkeypatch.setattr(lensgraph.export, "_export_torchscript", broken)
    with pytest.raises(ExportError, match="the exporter broke"):
        export_model(gpt2_hf, out, exporter="torchscript")
    assert snapshot(tmp_path) == {}  # not even the folder made for the output


def test_export_refuses_to_write_through_a_symlink(tmp_path, gpt2_hf):
    target = tmp_path / "elsewhere.onnx"
    target.write_bytes(b"keep")
    link = tmp_path / "m.onnx"
    link.symlink_to(target)
    with pytest.raises(lensgraph.BadInputError, match="symbolic link"):
        export_model(gpt2_hf, link, exporter="torchscript")
    assert target.read_bytes() == b"keep"


def test_an_export_held_in_memory_runs_on_the_torch_weights_and_writes_nothing(tmp_path, gpt2_hf, monkeypatch):
    """convert's in-memory export: onnxruntime runs torch's graph fed the torch model's own tensors (no
    copy, no file), its logits match torch's, and the graph lensgraph processes views the same memory
    read-only (a tied table and its transposed view share it: nothing may edit either in place)."""
    import numpy as np

    monkeypatch.chdir(tmp_path)
    traced = lensgraph.export.export_in_memory(gpt2_hf, cache=True)
    assert os.listdir(tmp_path) == []
    table = gpt2_hf.transformer.wte.weight.detach().numpy()
    views = [v.const_value.numpy() for v in traced.model.graph.initializers.values()
             if v.const_value is not None and np.shares_memory(v.const_value.numpy(), table)]
    assert len(views) == 2 and not any(v.flags.writeable for v in views)  # the table and the unembedding
    with pytest.raises(ValueError, match="read-only"):
        views[0][0, 0] = 0.0
    assert traced.check.run(traced.runner("in memory")) <= 1e-4 * np.abs(traced.check.expected).max()
