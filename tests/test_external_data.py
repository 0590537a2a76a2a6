"""External data: read only from inside the model's folder, written only into the output's.

A model keeps its weights in a data file named by each tensor's `location`. A downloaded
model could name any file on the machine there; lensgraph refuses every such reference
before any data is read, and on write never follows a symlink or overwrites the input's data.
"""

from __future__ import annotations

import builtins
import os
import shutil

import onnx
import pytest

from files import cli, one_error_line, snapshot
from lensgraph.verify import verify

DATA = "model.onnx.data"


def external_copy(src: str, folder) -> str:
    """Save `src` into `folder` with every tensor in one external data file."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.onnx")
    onnx.save(onnx.load(src), path, save_as_external_data=True, location=DATA, size_threshold=0)
    return path


def locations(path) -> set[str]:
    model = onnx.load(path, load_external_data=False)
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


def set_external(path: str, **entries) -> None:
    """Rewrite every external tensor's entries (location, offset, length) in the model file."""
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        for key, value in entries.items():
            info[key] = value(info) if callable(value) else value
        del tensor.external_data[:]
        for key, value in info.items():
            tensor.external_data.add(key=key, value=str(value))
    onnx.save(model, path)


@pytest.fixture
def layout(tmp_path, gpt2_exports):
    """tmp/models/model.onnx + model.onnx.data, and a valid copy of the data outside: tmp/outside/."""
    model = external_copy(gpt2_exports["torchscript17"], tmp_path / "models")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(tmp_path / "models" / DATA, outside / DATA)
    return model, outside / DATA


@pytest.fixture
def opened(monkeypatch):
    """Real paths of every file Python opens from here on."""
    seen = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            seen.append(os.path.realpath(file))
        return real_open(file, *args, **kwargs)

    def spy_os_open(path, *args, **kwargs):
        seen.append(os.path.realpath(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    return seen


def _absolute(model, outside):
    set_external(model, location=str(outside))


def _dotdot(model, outside):
    set_external(model, location=f"../outside/{DATA}")


def _nested_dotdot(model, outside):
    os.mkdir(os.path.join(os.path.dirname(model), "a"))
    set_external(model, location=f"a/../../outside/{DATA}")


def _symlink_file(model, outside):
    os.symlink(outside, os.path.join(os.path.dirname(model), "link.data"))
    set_external(model, location="link.data")


def _symlink_folder(model, outside):
    os.symlink(os.path.dirname(outside), os.path.join(os.path.dirname(model), "sub"))
    set_external(model, location=f"sub/{DATA}")


def _too_short(model, outside):
    data = os.path.join(os.path.dirname(model), DATA)
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)


def _length_past_end(model, outside):
    set_external(model, length=lambda info: int(info.get("length", 0)) + 10 ** 9)


def _missing_file(model, outside):
    set_external(model, location="nowhere.data")


def _negative_offset(model, outside):
    set_external(model, offset=-4)


REFUSED = {
    "absolute": (_absolute, "is absolute"),
    "dotdot": (_dotdot, "leads outside the model's folder"),
    "nested_dotdot": (_nested_dotdot, "leads outside the model's folder"),
    "symlink_out": (_symlink_file, "leads outside the model's folder"),
    "symlinked_folder_out": (_symlink_folder, "leads outside the model's folder"),
    "file_too_short": (_too_short, "too short for offset"),
    "length_past_end": (_length_past_end, "does not match its shape"),
    "missing_file": (_missing_file, "does not exist"),
    "negative_offset": (_negative_offset, "offset -4 is negative"),
}


@pytest.mark.parametrize("command", ["process", "inspect", "verify_first", "verify_second"])
@pytest.mark.parametrize("case", list(REFUSED))
def test_unsafe_reference_is_refused_before_any_data_is_read(capsys, tmp_path, layout, gpt2_exports,
                                                              opened, case, command):
    model, outside = layout
    REFUSED[case][0](model, outside)
    before = snapshot(tmp_path)
    good = gpt2_exports["torchscript17"]
    args = {"process": ["process", model, "-o", tmp_path / "out.onnx"], "inspect": ["inspect", model],
            "verify_first": ["verify", model, good], "verify_second": ["verify", good, model]}[command]
    opened.clear()
    code, out, err = cli(capsys, *args)
    assert code == 2, (out, err)
    line = one_error_line(err)
    assert model in line and REFUSED[case][1] in line, line
    data_files = {os.path.realpath(outside), os.path.realpath(os.path.join(os.path.dirname(model), DATA))}
    assert not data_files & set(opened), "data was read before the refusal"
    assert snapshot(tmp_path) == before


def test_safe_external_model_is_processed_into_the_output_folder(capsys, tmp_path, layout):
    model, _ = layout
    before = snapshot(os.path.dirname(model))
    out = tmp_path / "elsewhere" / "lens.onnx"
    code, stdout, err = cli(capsys, "process", model, "-o", out)
    assert code == 0, err
    assert f"weights in {out}.data" in stdout
    assert sorted(os.listdir(out.parent)) == ["lens.onnx", "lens.onnx.data"]
    assert locations(out) == {"lens.onnx.data"}
    assert snapshot(os.path.dirname(model)) == before
    assert verify(model, str(out)).ok


def test_a_nested_location_inside_the_folder_is_fine(capsys, tmp_path, layout):
    model, _ = layout
    folder = os.path.dirname(model)
    os.mkdir(os.path.join(folder, "weights"))
    os.rename(os.path.join(folder, DATA), os.path.join(folder, "weights", DATA))
    set_external(model, location=f"weights/../weights/{DATA}")
    code, _, err = cli(capsys, "process", model, "-o", tmp_path / "out.onnx")
    assert code == 0, err


def test_output_data_file_never_overwrites_the_input_data(capsys, tmp_path, layout):
    model, _ = layout
    folder = os.path.dirname(model)
    before = snapshot(folder)
    code, _, err = cli(capsys, "process", model, "-o", os.path.join(folder, "lens.onnx"), "--external-data", DATA)
    assert code == 2
    assert "would overwrite the input's data file" in one_error_line(err)
    assert snapshot(folder) == before


def test_output_data_file_never_follows_a_symlink(capsys, tmp_path, layout):
    model, _ = layout
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / "lens.onnx.data")
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "process", model, "-o", out / "lens.onnx")
    assert code == 2
    assert "is a symbolic link; refusing to write through it" in one_error_line(err)
    assert snapshot(tmp_path) == before and victim.read_bytes() == b"precious"


def test_output_model_never_follows_a_symlink(capsys, tmp_path, layout):
    model, _ = layout
    victim = tmp_path / "victim.onnx"
    victim.write_bytes(b"precious")
    os.symlink(victim, tmp_path / "lens.onnx")
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "process", model, "-o", tmp_path / "lens.onnx")
    assert code == 2 and "is a symbolic link" in one_error_line(err)
    assert snapshot(tmp_path) == before


def test_replacing_an_output_keeps_the_old_one_whole_until_the_switch(capsys, tmp_path, layout):
    """The old model reads OUT.data until the last rename, so the new data goes to OUT.1.data."""
    model, _ = layout
    out = tmp_path / "out" / "lens.onnx"
    assert cli(capsys, "process", model, "-o", out, "--passes", "fold_ln")[0] == 0
    assert locations(out) == {"lens.onnx.data"}
    assert cli(capsys, "process", model, "-o", out)[0] == 0
    assert locations(out) == {"lens.onnx.1.data"}
    assert sorted(os.listdir(out.parent)) == ["lens.onnx", "lens.onnx.1.data"]  # the old data is gone
    assert cli(capsys, "process", model, "-o", out, "--passes", "fold_ln,center_unembed")[0] == 0
    assert sorted(os.listdir(out.parent)) == ["lens.onnx", "lens.onnx.data"]
    assert verify(model, str(out)).ok


def test_in_place_with_external_data(capsys, tmp_path, layout, gpt2_exports):
    model, _ = layout
    folder = os.path.dirname(model)
    code, _, err = cli(capsys, "process", model, "--in-place", "--passes", "fold_ln")
    assert code == 0, err
    assert sorted(os.listdir(folder)) == ["model.onnx", "model.onnx.1.data"]
    assert locations(model) == {"model.onnx.1.data"}
    code, _, err = cli(capsys, "process", model, "--in-place")
    assert code == 0, err
    assert sorted(os.listdir(folder)) == ["model.onnx", DATA]
    props = {p.key: p.value for p in onnx.load(model, load_external_data=False).metadata_props}
    assert props["lensgraph.pipeline"] == "fold_ln,center_writing_weights,center_unembed,fold_value_biases"
    assert verify(gpt2_exports["torchscript17"], model).ok
