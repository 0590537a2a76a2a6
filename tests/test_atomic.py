"""The output appears complete or not at all, even when the process is killed while writing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import lensgraph.store.atomic
from files import LENSGRAPH, cli, one_error_line, snapshot
from lensgraph.store.model import LensModel
from lensgraph.verify import verify

BALLAST = 24 * 2**20  # float32 values: a 96 MiB tensor, long enough to write that a kill lands mid-way


@pytest.fixture(scope="module")
def big_gpt2(gpt2_exports, tmp_path_factory):
    """The tiny GPT-2 plus a large tensor copied to a second output: a large model to kill mid-write."""
    model = onnx.load(gpt2_exports["torchscript17"])
    ballast = np.random.default_rng(0).standard_normal(BALLAST, dtype=np.float32)
    model.graph.initializer.append(numpy_helper.from_array(ballast, "ballast"))
    model.graph.node.append(helper.make_node("Identity", ["ballast"], ["ballast_out"], name="ballast_copy"))
    model.graph.output.append(helper.make_tensor_value_info("ballast_out", onnx.TensorProto.FLOAT, [BALLAST]))
    folder = tmp_path_factory.mktemp("big")
    inline, external = folder / "inline" / "model.onnx", folder / "external" / "model.onnx"
    inline.parent.mkdir(), external.parent.mkdir()
    onnx.save(model, inline)
    onnx.save(model, external, save_as_external_data=True, location="model.onnx.data")
    return {"inline": inline, "external": external}


def _final_names(folder) -> dict[str, str]:
    """What a reader sees: everything but the hidden staging folders."""
    return {k: v for k, v in snapshot(folder).items() if not k.startswith(".")}


def _kill_while_writing(args, folder, at_bytes: int = 1) -> None:
    """Start `lensgraph ARGS`, SIGKILL it once a staged file holds `at_bytes` or more."""
    for _ in range(3):
        proc = subprocess.Popen([LENSGRAPH, *map(str, args)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            staged = [e for d in os.scandir(folder) if d.name.endswith(".tmp") and d.is_dir()
                      for e in os.scandir(d.path) if e.stat().st_size >= at_bytes]
            if staged:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            return
        for d in os.scandir(folder):  # finished first: undo and try again
            if d.name.endswith(".tmp"):
                shutil.rmtree(d.path)
    pytest.fail("the run always finished before it could be killed mid-write")


def test_killed_run_leaves_nothing(tmp_path, big_gpt2):
    src_before = snapshot(big_gpt2["inline"].parent)
    out = tmp_path / "out" / "lens.onnx"
    out.parent.mkdir()
    _kill_while_writing(["process", big_gpt2["inline"], "-o", out, "--no-verify"], out.parent, BALLAST * 2)
    assert _final_names(out.parent) == {}
    assert snapshot(big_gpt2["inline"].parent) == src_before


def test_killed_run_leaves_the_previous_output(tmp_path, big_gpt2):
    src_before = snapshot(big_gpt2["external"].parent)
    out = tmp_path / "out" / "lens.onnx"
    out.parent.mkdir()
    done = subprocess.run([LENSGRAPH, "process", big_gpt2["external"], "-o", out, "--passes", "fold_ln",
                           "--no-verify"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    previous = _final_names(out.parent)
    assert sorted(previous) == ["lens.onnx", "lens.onnx.data"]
    _kill_while_writing(["process", big_gpt2["external"], "-o", out, "--no-verify"], out.parent)
    assert _final_names(out.parent) == previous
    assert LensModel.load(out).applied == ["fold_ln"]  # the previous output, whole
    assert snapshot(big_gpt2["external"].parent) == src_before


def test_killed_in_place_run_leaves_the_input(tmp_path, big_gpt2):
    folder = tmp_path / "model"
    shutil.copytree(big_gpt2["external"].parent, folder)
    before = _final_names(folder)
    _kill_while_writing(["process", folder / "model.onnx", "--in-place", "--no-verify"], folder, BALLAST * 2)
    assert _final_names(folder) == before


def test_failed_final_rename_keeps_the_previous_output_loadable(capsys, tmp_path, gpt2_exports, monkeypatch):
    """Killed (here: failing) between the data rename and the model rename: the old pair still holds."""
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(gpt2_exports["dynamo"]), src, save_as_external_data=True, location="model.onnx.data")
    out = tmp_path / "out" / "lens.onnx"
    assert cli(capsys, "process", src, "-o", out, "--passes", "fold_ln")[0] == 0
    previous = snapshot(out.parent)
    real_replace, calls = os.replace, []

    def replace_data_then_fail(a, b):
        if os.path.dirname(b) != str(out.parent):  # the staging folder's own writes
            return real_replace(a, b)
        calls.append(b)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(a, b)

    monkeypatch.setattr(lensgraph.store.atomic.os, "replace", replace_data_then_fail)
    code, _, err = cli(capsys, "process", src, "-o", out)
    assert code == 3
    assert "cannot move the output into place (No space left on device)" in one_error_line(err)
    now = snapshot(out.parent)
    assert {k: now[k] for k in previous} == previous  # model and its data as they were
    assert set(now) - set(previous) == {"lens.onnx.1.data"}  # the new data, under the other name
    monkeypatch.undo()
    assert LensModel.load(out).applied == ["fold_ln"]
    assert verify(str(src), str(out)).ok


def test_failed_write_publishes_nothing(capsys, tmp_path, gpt2_exports, monkeypatch):
    real_write = lensgraph.store.atomic.write_model

    def write_half_then_fail(model, path, *args, **kwargs):
        real_write(model, path, *args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lensgraph.store.atomic, "write_model", write_half_then_fail)
    out = tmp_path / "lens.onnx"
    code, _, err = cli(capsys, "process", gpt2_exports["dynamo"], "-o", out)
    assert code == 3 and "cannot write the output (No space left on device)" in one_error_line(err)
    assert os.listdir(tmp_path) == []
