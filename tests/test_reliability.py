"""Bad input gets one clear line and the right exit code, nothing is written, the input is never
touched; non-transformers are left alone; a rerun applies nothing twice."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

import handmade
from files import cli, cli_subprocess, one_error_line, snapshot
from helpers import BreakUnembed
from lensgraph import VerificationError
from lensgraph.pipeline import REGISTRY


def _truncated(good: bytes) -> bytes:
    return good[: len(good) // 2]


def _edited(good: bytes, edit) -> bytes:
    model = onnx.ModelProto.FromString(good)
    edit(model)
    return model.SerializeToString()


def _undefined_input(model):
    node = next(n for n in model.graph.node if n.input)
    node.input[0] = "defined_nowhere"


def _opset_99(model):
    model.opset_import[0].version = 99


BAD_FILES = {
    # kind: (how to make it from the good model's bytes, what the error says)
    "missing": (None, "no such file"),
    "directory": ("dir", "is a directory"),
    "empty": (lambda good: b"", "empty file"),
    "random_bytes": (lambda good: np.random.default_rng(0).bytes(4096), "not a readable ONNX model"),
    "truncated": (_truncated, "not a readable ONNX model"),
    "fails_checker": (lambda good: _edited(good, _undefined_input), "fails the ONNX checker"),
    "unknown_opset": (lambda good: _edited(good, _opset_99),
                      "opset ai.onnx version 99 is not supported by onnxruntime"),
    "custom_op": (lambda good: handmade.with_custom_op(onnx.ModelProto.FromString(good)).SerializeToString(),
                  "uses op com.example::Mystery, which onnxruntime cannot evaluate"),
    "fifo": ("fifo", "not a regular file"),
}

COMMANDS = {
    "process": lambda bad, good, out: ["process", bad, "-o", out],
    "process_in_place": lambda bad, good, out: ["process", bad, "--in-place"],
    "inspect": lambda bad, good, out: ["inspect", bad],
    "verify_first": lambda bad, good, out: ["verify", bad, good],
    "verify_second": lambda bad, good, out: ["verify", good, bad],
}


def make_bad(kind: str, folder, good_path: str) -> str:
    make, _ = BAD_FILES[kind]
    path = os.path.join(folder, f"{kind}.onnx")
    if make == "dir":
        os.mkdir(path)
    elif make == "fifo":
        os.mkfifo(path)  # anything that reads it blocks: the refusal must come first
    elif make is not None:
        with open(good_path, "rb") as f:
            good = f.read()
        with open(path, "wb") as f:
            f.write(make(good))
    return path


@pytest.fixture
def good(gpt2_exports):
    return gpt2_exports["torchscript17"]


RUNTIME_KINDS = ("unknown_opset", "custom_op")  # bad only for running: inspect reads them (below)
CASES = [(kind, command) for command in COMMANDS for kind in BAD_FILES
         if not (command == "inspect" and kind in RUNTIME_KINDS)]


@pytest.mark.parametrize("kind, command", CASES)
def test_bad_file_is_one_clear_line_and_writes_nothing(capsys, tmp_path, good, kind, command):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir(), outputs.mkdir()
    bad = make_bad(kind, inputs, good)
    before, good_before = snapshot(tmp_path), snapshot(os.path.dirname(good))
    code, out, err = cli(capsys, *COMMANDS[command](bad, good, outputs / "x.onnx"))
    assert code == 2, (out, err)
    line = one_error_line(err)
    assert bad in line and BAD_FILES[kind][1] in line, line
    assert snapshot(tmp_path) == before  # nothing written, the bad input untouched
    assert snapshot(os.path.dirname(good)) == good_before


@pytest.mark.parametrize("kind", RUNTIME_KINDS)
def test_inspect_reads_a_graph_onnxruntime_cannot_run_without_loading_onnxruntime(tmp_path, good, kind):
    bad = make_bad(kind, tmp_path, good)
    before = snapshot(tmp_path)
    code = "import sys\nfrom lensgraph.cli import main\nmain(['inspect', %r])\nprint('onnxruntime' in sys.modules)" % bad
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "d_model: 32" in done.stdout and done.stdout.strip().splitlines()[-1] == "False"
    assert snapshot(tmp_path) == before


def test_bad_file_from_the_console_script(tmp_path, good):
    """The installed `lensgraph` behaves the same: one line, exit 2, no traceback, nothing written."""
    bad = make_bad("truncated", tmp_path, good)
    before = snapshot(tmp_path)
    done = cli_subprocess("process", bad, "-o", tmp_path / "x.onnx")
    assert done.returncode == 2
    assert "not a readable ONNX model" in one_error_line(done.stderr)
    assert snapshot(tmp_path) == before


def test_debug_adds_the_traceback(capsys, tmp_path, good):
    bad = make_bad("custom_op", tmp_path, good)
    code, _, err = cli(capsys, "process", bad, "-o", tmp_path / "x.onnx", "--debug")
    assert code == 2
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("lensgraph: error: ")


def test_internal_error_is_exit_4_with_one_line(capsys, tmp_path, good, monkeypatch):
    import lensgraph.graph.describe

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(lensgraph.graph.describe, "describe", broken)
    code, _, err = cli(capsys, "inspect", good)
    assert code == 4
    line = err.strip()
    assert "\n" not in line and "internal error: RuntimeError: a bug" in line and "--debug" in line


@pytest.mark.parametrize("args, message", [
    (["process", "MODEL"], "one of the arguments -o/--output --in-place is required"),
    (["process", "MODEL", "-o", "x.onnx", "--in-place"], "not allowed with argument"),
    (["process", "MODEL", "-o", "."], "is a directory"),
    (["process", "MODEL", "-o", "x.onnx", "--external-data", "../x.data"], "plain file name"),
    (["process", "MODEL", "-o", "x.onnx", "--external-data", "x.onnx"], "output model's own name"),
    (["process", "MODEL", "-o", "MODEL"], "output would overwrite the input"),
    (["process", "MODEL", "-o", "x.onnx", "--external-data", ""], "external data must be a plain file name"),
    (["verify", "MODEL", "MODEL", "--provider", "NoSuchProvider"], "provider NoSuchProvider is not available"),
])
def test_usage_errors_exit_2(tmp_path, good, args, message):
    model = tmp_path / "model.onnx"
    shutil.copy(good, model)
    before = snapshot(tmp_path)
    done = cli_subprocess(*[model if a == "MODEL" else a for a in args], cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert snapshot(tmp_path) == before


# -- not a transformer ------------------------------------------------------------------
@pytest.mark.parametrize("build", [handmade.mlp, handmade.cnn], ids=["mlp", "cnn"])
def test_not_a_transformer_is_left_alone(capsys, tmp_path, build):
    src = tmp_path / "model.onnx"
    onnx.save(build(), src)
    out = tmp_path / "out.onnx"
    before = snapshot(tmp_path)
    code, stdout, err = cli(capsys, "process", src, "-o", out)
    assert code == 0, err
    assert "nothing to rewrite: no LayerNorm or RMSNorm found" in stdout and "nothing was written" in stdout
    assert snapshot(tmp_path) == before  # no output, input untouched

    out.write_bytes(b"an earlier output")  # an existing output stays as it was
    code, _, _ = cli(capsys, "process", src, "-o", out)
    assert code == 0 and out.read_bytes() == b"an earlier output"

    code, _, _ = cli(capsys, "process", src, "--in-place")
    assert code == 0 and snapshot(tmp_path)["model.onnx"] == before["model.onnx"]

    code, stdout, _ = cli(capsys, "inspect", src)
    assert code == 0 and "nothing to rewrite" in stdout


def test_norm_without_residual_stream_is_left_alone(tmp_path):
    """A LayerNorm between two linear maps, with no residual sum: not a transformer either."""
    from lensgraph.process import process

    model = handmade.mlp()
    graph = model.graph
    relu = next(n for n in graph.node if n.op_type == "Relu")
    relu.op_type, relu.name = "LayerNormalization", "ln"
    relu.input.extend(["ln_s", "ln_b"])
    graph.initializer.extend([onnx.numpy_helper.from_array(np.full(16, 1.5, np.float32), "ln_s"),
                              onnx.numpy_helper.from_array(np.full(16, 0.1, np.float32), "ln_b")])
    onnx.checker.check_model(model, full_check=True)
    src = tmp_path / "ln_mlp.onnx"
    onnx.save(model, src)
    report = process(src, tmp_path / "out.onnx")
    assert report["nothing_to_rewrite"].startswith("no residual stream") and not report["written"]
    assert not (tmp_path / "out.onnx").exists()


# -- refusing wrong results ----------------------------------------------------------------
@pytest.mark.parametrize("where", ["new", "replace", "in_place"])
def test_failed_verification_exits_1_and_writes_nothing(capsys, tmp_path, good, monkeypatch, where):
    monkeypatch.setitem(REGISTRY, "break_unembed", BreakUnembed)
    src, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    shutil.copy(good, src)
    if where == "replace":
        shutil.copy(good, out)
    before = snapshot(tmp_path)
    target = ["--in-place"] if where == "in_place" else ["-o", out]
    code, _, err = cli(capsys, "process", src, *target, "--passes", "fold_ln,break_unembed")
    assert code == VerificationError.exit_code == 1
    line = one_error_line(err)
    assert "break_unembed" in line and "worst difference" in line and "nothing was written" in line
    assert str(src) in line
    assert snapshot(tmp_path) == before


# -- idempotence, provenance, the input is never touched --------------------------------------
def test_second_run_applies_nothing_and_writes_nothing(capsys, tmp_path, gpt2_onnx):
    src = tmp_path / "model.onnx"
    shutil.copy(gpt2_onnx, src)
    before = snapshot(tmp_path)
    once, twice = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    code, _, err = cli(capsys, "process", src, "-o", once)
    assert code == 0, err
    assert snapshot(tmp_path)["model.onnx"] == before["model.onnx"]
    props = {p.key: p.value for p in onnx.load(once).metadata_props}
    assert props["lensgraph.pipeline"] == "fold_ln,center_writing_weights,center_unembed,fold_value_biases"
    assert props["lensgraph.source"].startswith("model.onnx") and props["lensgraph.version"]

    twice.write_bytes(b"an earlier file")
    code, stdout, err = cli(capsys, "process", once, "-o", twice)
    assert code == 0, err
    assert stdout.strip() == "nothing changed, so nothing was written: every pass was already applied"
    assert twice.read_bytes() == b"an earlier file"  # nothing written, nothing replaced

    once_bytes = once.read_bytes()
    code, stdout, _ = cli(capsys, "process", once, "--in-place")
    assert code == 0 and "nothing was written" in stdout
    assert once.read_bytes() == once_bytes


def test_in_place_replaces_the_input_with_the_verified_result(capsys, tmp_path, good):
    from lensgraph.verify import verify

    src, keep = tmp_path / "model.onnx", tmp_path / "original" / "model.onnx"
    keep.parent.mkdir()
    shutil.copy(good, src), shutil.copy(good, keep)
    code, stdout, err = cli(capsys, "process", src, "--in-place")
    assert code == 0, err
    assert "verification: worst centred-logit difference" in stdout
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "original"]  # no temporary left behind
    assert verify(str(keep), str(src)).ok
    assert src.read_bytes() != keep.read_bytes()


@pytest.mark.parametrize("report", ["INPUT", "OUTPUT"])
def test_report_never_overwrites_a_model(capsys, tmp_path, good, report):
    src, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    shutil.copy(good, src)
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "process", src, "-o", out, "--report", src if report == "INPUT" else out)
    assert code == 2 and "the report would overwrite a model file" in one_error_line(err)
    assert snapshot(tmp_path) == before


def test_report_is_written_even_when_there_is_nothing_to_rewrite(capsys, tmp_path):
    import json

    src, report = tmp_path / "mlp.onnx", tmp_path / "report.json"
    onnx.save(handmade.mlp(), src)
    code, _, _ = cli(capsys, "process", src, "-o", tmp_path / "out.onnx", "--report", report)
    data = json.loads(report.read_text())
    assert code == 0 and data["nothing_to_rewrite"] and not data["written"]
    assert sorted(os.listdir(tmp_path)) == ["mlp.onnx", "report.json"]
