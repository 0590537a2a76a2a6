"""Promises at the edges: bad metadata, outputs and reports refused before anything is written,
device nodes never replaced, two writers of one output, abandoned staging folders, hard links,
the Python API's argument types, token ids run_with_cache cannot take, and `view`'s checks."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time

import numpy as np
import onnx
import pytest

import lensgraph
from files import cli, one_error_line, snapshot
from lensgraph import BadInputError, LensModel
from lensgraph.store.atomic import ABANDONED_AFTER


@pytest.fixture
def good(gpt2_exports):
    return gpt2_exports["torchscript17"]


def _save_with(good, path, edit) -> str:
    model = onnx.load(good)
    edit(model)
    onnx.save(model, path)
    return str(path)


# -- metadata, outputs, external data: exit 2, one line, nothing written ----------------------
@pytest.mark.parametrize("raw", ["5", "null", "[1, 2]", "true", "[[]]", '"fold_ln"'])
@pytest.mark.parametrize("command", ["process", "inspect", "hooks"])
def test_applied_metadata_that_is_not_a_list_of_names(capsys, tmp_path, good, raw, command):
    def edit(model):
        model.metadata_props.add(key="lensgraph.applied", value=raw)

    src = _save_with(good, tmp_path / "m.onnx", edit)
    before = snapshot(tmp_path)
    args = {"process": ["process", src, "-o", tmp_path / "o.onnx"], "inspect": ["inspect", src],
            "hooks": ["hooks", src, "-o", tmp_path / "o.onnx"]}[command]
    code, _, err = cli(capsys, *args)
    assert code == 2 and "lensgraph.applied is not a list of pass names" in one_error_line(err) and src in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["no_outputs", "scalar_logits"])
@pytest.mark.parametrize("command", ["process", "verify"])
def test_graphs_without_logits(capsys, tmp_path, good, case, command):
    def edit(model):
        if case == "no_outputs":
            del model.graph.output[:]
        else:
            node = onnx.helper.make_node("ReduceSum", ["logits"], ["scalar"], keepdims=0)
            model.graph.node.append(node)
            del model.graph.output[:]
            model.graph.output.append(onnx.helper.make_tensor_value_info("scalar", onnx.TensorProto.FLOAT, []))

    src = _save_with(good, tmp_path / "m.onnx", edit)
    before = snapshot(tmp_path)
    args = ["process", src, "-o", tmp_path / "o.onnx"] if command == "process" else ["verify", src, src]
    code, _, err = cli(capsys, *args)
    assert code == 2, err
    assert src in one_error_line(err)
    assert snapshot(tmp_path) == before


def test_external_data_location_with_a_trailing_slash(capsys, tmp_path, good):
    src = tmp_path / "m.onnx"
    onnx.save(onnx.load(good), src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    model = onnx.load(src, load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "m.onnx.data/"
    onnx.save(model, src)
    code, _, err = cli(capsys, "process", src, "-o", tmp_path / "o.onnx")
    assert code == 2 and "names a folder, not a file" in one_error_line(err)


def test_external_data_that_is_a_hard_link_is_refused(capsys, tmp_path, good):
    src = tmp_path / "model" / "m.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(good), src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    os.link(src.parent / "m.onnx.data", tmp_path / "elsewhere.data")  # the same bytes, outside the folder
    code, _, err = cli(capsys, "inspect", src)
    assert code == 2 and "hard links" in one_error_line(err)


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_output_that_is_not_a_regular_file_is_never_replaced(capsys, tmp_path, good, kind):
    out = tmp_path / "o.onnx"
    if kind == "fifo":
        os.mkfifo(out)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(out))
    code, _, err = cli(capsys, "process", good, "-o", out)
    assert code == 2 and "not a regular file" in one_error_line(err)
    assert not out.is_file() and out.exists()  # still the FIFO or socket
    if kind == "socket":
        sock.close()


def test_empty_external_data_name_is_refused(capsys, tmp_path, good):
    code, _, err = cli(capsys, "process", good, "-o", tmp_path / "o.onnx", "--external-data", "")
    assert code == 2 and "external data" in one_error_line(err)
    assert not (tmp_path / "o.onnx").exists()


# -- the report: refused before the model is written -------------------------------------------
@pytest.mark.parametrize("where", ["missing_folder", "folder", "symlink", "output_data", "input"])
def test_bad_report_path_is_refused_before_anything_is_written(capsys, tmp_path, good, where):
    out = tmp_path / "o.onnx"
    extra = []
    if where == "missing_folder":
        report = tmp_path / "nope" / "r.json"
    elif where == "folder":
        report = tmp_path / "r.json"
        report.mkdir()
    elif where == "symlink":
        report = tmp_path / "r.json"
        report.symlink_to(tmp_path / "target.json")
    elif where == "output_data":
        report, extra = tmp_path / "w.bin", ["--external-data", "w.bin"]
    else:
        report = good
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "process", good, "-o", out, "--report", report, *extra)
    assert code == 2, err
    assert not out.exists() and snapshot(tmp_path) == before


# -- two runs writing one output ---------------------------------------------------------------
def test_a_run_overtaken_by_another_publishes_nothing(tmp_path, good):
    """Both runs replace a model that reads out.onnx.data, so both stage out.onnx.1.data; the second
    to publish would break the first's model (or delete the data it reads): it is refused instead."""
    out = str(tmp_path / "out.onnx")
    LensModel.load(good).save(out, external_data=True)
    a = LensModel.load(good).stage(out, external_data=True)
    b = LensModel.load(good).stage(out, external_data=True)
    assert a.data_name == b.data_name == "out.onnx.1.data"
    b.commit()
    with pytest.raises(lensgraph.LensError, match="another run replaced it"):
        a.commit()
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.1.data"]
    assert lensgraph.verify(good, out).ok


def test_abandoned_staging_folders_are_cleaned_but_not_live_ones(capsys, tmp_path, good):
    old, young, locked = (tmp_path / f".o.onnx.{n}.tmp" for n in ("old", "young", "locked"))
    for d in (old, young, locked):
        d.mkdir()
        (d / "o.onnx").write_bytes(b"half a model")
    past = time.time() - ABANDONED_AFTER - 60
    for d in (old, locked):
        os.utime(d, (past, past))
    fd = os.open(locked, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a run still writing there
    try:
        code, _, err = cli(capsys, "process", good, "-o", tmp_path / "o.onnx")
    finally:
        os.close(fd)
    assert code == 0, err
    assert not old.exists() and young.exists() and locked.exists()


# -- the Python API and run_with_cache -----------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(src=None), dict(passes=42), dict(tolerance="x"), dict(verify="yes"),
                                    dict(dst=3.5), dict(passes=[None])])
def test_python_api_wrong_argument_types(tmp_path, good, kwargs):
    args = dict(src=good, dst=str(tmp_path / "o.onnx"))
    args.update(kwargs)
    with pytest.raises(BadInputError):
        lensgraph.process(args.pop("src"), **args)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("passes", ["", []])
def test_an_empty_pipeline_changes_nothing_and_writes_nothing(tmp_path, good, passes):
    report = lensgraph.process(good, tmp_path / "o.onnx", passes=passes)
    assert report["pipeline"] == [] and not report["changed"] and not report["written"]
    assert not (tmp_path / "o.onnx").exists()


def test_points_must_be_globs(good):
    with pytest.raises(BadInputError, match="points must be a list of glob strings"):
        lensgraph.run_with_cache(good, np.zeros((1, 3), np.int64), points=[None])


@pytest.mark.parametrize("ids, message", [
    (np.array([[1, -1, 2]]), "must lie in 0..95"),
    (np.array([[1, 96, 2]]), "must lie in 0..95"),
    (np.zeros((0, 3), np.int64), "is empty"),
    (np.zeros((1, 0), np.int64), "is empty"),
    (np.zeros((1, 129), np.int64), "more than the model's 128 learned positions"),
])
def test_token_ids_the_model_cannot_take(good, ids, message):
    with pytest.raises(BadInputError, match=message):
        lensgraph.run_with_cache(good, ids)


# -- view -------------------------------------------------------------------------------------
def test_view_refuses_a_bad_port_a_busy_port_and_a_broken_file(capsys, tmp_path, good):
    code, _, err = cli(capsys, "view", good, "--port", "70000")
    assert code == 2 and "to 65535" in one_error_line(err)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        code, _, err = cli(capsys, "view", good, "--port", str(busy.getsockname()[1]))
        assert code == 2 and "cannot serve there" in one_error_line(err)
    finally:
        busy.close()
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(0).bytes(2048))
    code, _, err = cli(capsys, "view", garbage)
    assert code == 2 and "not a readable ONNX model" in one_error_line(err)


def test_report_is_written_whole(capsys, tmp_path, good):
    report = tmp_path / "r.json"
    code, _, err = cli(capsys, "process", good, "-o", tmp_path / "o.onnx", "--report", report)
    assert code == 0, err
    assert json.loads(report.read_text())["written"]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    shutil.rmtree(tmp_path)


def test_hooks_on_a_graph_shape_inference_cannot_follow(capsys, tmp_path, good):
    """LayerNormalization at opset 16 (an op onnxruntime has there, the ONNX standard not): shape
    inference gives up, which is neither a traceback nor a reason to fail."""
    src = _save_with(good, tmp_path / "m.onnx", lambda m: m.opset_import[0].__setattr__("version", 16))
    out = tmp_path / "h.onnx"
    code, _, err = cli(capsys, "hooks", src, "-o", out)
    assert code == 0 and "Traceback" not in err, err
    assert lensgraph.verify(src, str(out)).ok
