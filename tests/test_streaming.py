"""Weights read in place, rewritten weights computed while streamed out, external data above a threshold.

The >2 GB path is the external-data path with a lower threshold: the benchmark
(scripts/bench_process.py --size gpt2-large) runs it on a 3.1 GB model.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

import lensgraph.store.model
from files import cli
from lensgraph.store import wire
from lensgraph.store.model import LensModel
from lensgraph.pipeline import PassManager
from lensgraph.process import process
from lensgraph.verify import verify
from lensgraph.store.deferred import DeferredTensor


def test_skeleton_finds_every_large_initializer_in_place(gpt2_exports):
    path = gpt2_exports["dynamo"]
    full = onnx.load(path)
    data, cut = wire.skeleton(path, limit=0)
    skeleton = onnx.ModelProto.FromString(data)
    assert len(skeleton.graph.node) == len(full.graph.node)
    assert len(skeleton.SerializeToString()) < len(full.SerializeToString())
    with open(path, "rb") as f:
        raw = f.read()
    by_index = {c.index: c for c in cut}
    for k, tensor in enumerate(full.graph.initializer):
        if tensor.HasField("raw_data") and len(tensor.raw_data):
            piece = by_index[k]
            assert raw[piece.offset:piece.offset + piece.length] == tensor.raw_data
            assert skeleton.graph.initializer[k].name == tensor.name


def test_skeleton_refuses_bytes_that_are_not_protobuf(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x0a\xff\xff\xff\xff\x0f" + b"x" * 10)  # a length past the end
    with pytest.raises(ValueError):
        wire.skeleton(str(bad))


def test_single_file_written_by_streaming_loads_and_runs_the_same(tmp_path, gpt2_exports):
    src = gpt2_exports["dynamo"]
    out = tmp_path / "copy.onnx"
    LensModel.load(src).save(out)
    a, b = onnx.load(src), onnx.load(str(out))
    onnx.checker.check_model(b, full_check=True)
    want = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    got = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    result = verify(src, str(out))
    assert result.ok and result.max_abs_diff == 0.0


def test_deferred_weights_are_streamed_exactly_as_computed_whole(tmp_path, gpt2_exports):
    """Every rewritten matrix written block by block equals the same matrix computed at once."""
    src = gpt2_exports["torchscript17"]
    model = LensModel.load(src)
    PassManager().run(model)
    deferred = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()
                if isinstance(v.const_value, DeferredTensor)}
    assert len(deferred) >= 10  # nearly every matrix of the model was rewritten
    model.save(tmp_path / "streamed.onnx")
    written = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "streamed.onnx")).graph.initializer}
    for name, whole in deferred.items():
        np.testing.assert_array_equal(written[name], whole)
    assert verify(src, str(tmp_path / "streamed.onnx")).ok


@pytest.mark.parametrize("form", ["dynamo", "torchscript14"])
def test_a_model_over_the_threshold_goes_to_external_data(tmp_path, gpt2_exports, monkeypatch, form):
    """The >2 GB rule at small size: the threshold is lowered, so the weights go to OUT.data."""
    monkeypatch.setattr(lensgraph.store.model, "EXTERNAL_ABOVE", 1000)
    src = gpt2_exports[form]
    out = tmp_path / "out" / "lens.onnx"
    report = process(src, out)
    assert report["written"] and report["verification"]["ok"]
    data = tmp_path / "out" / "lens.onnx.data"
    assert report["data_file"] == str(data) and data.is_file()
    assert os.path.getsize(out) < os.path.getsize(src) < os.path.getsize(data) + os.path.getsize(out)
    proto = onnx.load(str(out), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(int({e.key: e.value for e in t.external_data}["offset"]) % 4096 == 0 for t in external)
    assert verify(src, str(out)).ok
    again = tmp_path / "again.onnx"  # reading external data back in, in place
    assert process(out, again)["changed"] is False


def test_external_data_on_request_at_any_size(capsys, tmp_path, gpt2_exports):
    out = tmp_path / "m.onnx"
    code, _, err = cli(capsys, "process", gpt2_exports["dynamo"], "-o", out, "--external-data", "w.bin", "--quiet")
    assert code == 0 and err == ""
    assert (tmp_path / "w.bin").is_file()
    assert verify(gpt2_exports["dynamo"], str(out)).ok


def test_verify_takes_a_provider(capsys, gpt2_exports, tmp_path):
    out = tmp_path / "m.onnx"
    process(gpt2_exports["dynamo"], out)
    code, stdout, _ = cli(capsys, "verify", gpt2_exports["dynamo"], out, "--provider", "CPUExecutionProvider")
    assert code == 0 and "CPUExecutionProvider" in stdout
    code, _, err = cli(capsys, "verify", gpt2_exports["dynamo"], out, "--provider", "NoSuchExecutionProvider")
    assert code == 2 and "not available" in err
