"""The command line, driven as a user would: subprocesses, exit codes, files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lensgraph.tiny_models import tiny_gpt2

LENSGRAPH = os.path.join(os.path.dirname(sys.executable), "lensgraph")


def lensgraph(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([LENSGRAPH, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-gpt2"
    tiny_gpt2(seed=3, n_layer=2, n_embd=32, n_head=4, vocab_size=80).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "model.onnx"
    done = lensgraph("export", checkpoint, "-o", out, "--exporter", "torchscript", "--opset", "17")
    assert done.returncode == 0, done.stderr
    assert "exported" in done.stdout
    return out


def test_export_local_checkpoint_folder(exported):
    import onnx

    model = onnx.load(exported)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["logits"]
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert all(dims), "batch and sequence axes are dynamic"


def test_export_dynamo(checkpoint, tmp_path):
    out = tmp_path / "dyn.onnx"
    done = lensgraph("export", checkpoint, "-o", out)
    assert done.returncode == 0, done.stderr
    assert out.exists() and "dynamo" in done.stdout


def test_process_verify_inspect(exported, tmp_path):
    out, report = tmp_path / "lens.onnx", tmp_path / "report.json"
    done = lensgraph("process", exported, "-o", out, "--report", report)
    assert done.returncode == 0, done.stderr
    for name in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"):
        assert name in done.stdout
    assert "verification: worst centred-logit difference" in done.stdout
    data = json.loads(report.read_text())
    assert data["verification"]["ok"] and data["verification"]["max_rel_diff"] < 1e-5
    assert [p["name"] for p in data["passes"]] == ["fold_ln", "center_writing_weights", "center_unembed",
                                                  "fold_value_biases"]

    done = lensgraph("verify", exported, out)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("equivalent")

    done = lensgraph("inspect", out)
    assert done.returncode == 0, done.stderr
    assert "applied passes: fold_ln, center_writing_weights, center_unembed, fold_value_biases" in done.stdout
    assert "norms: 5 reading the stream (layernorm (LayerNormalization) x5)" in done.stdout
    assert "family traits: 2 layers; layernorm (LayerNormalization); pre-norm; sequential blocks" in done.stdout
    assert "attention V->O: 2 blocks" in done.stdout

    info = json.loads(lensgraph("inspect", exported, "--json").stdout)
    assert len(info["norms"]) == 5 and info["unembed"]["vocab"] == 80 and info["applied"] == []

    again = lensgraph("process", out, "-o", tmp_path / "again.onnx")
    assert again.returncode == 0, again.stderr
    assert "already applied" in again.stdout and "nothing changed" in again.stdout


def test_verify_fails_on_a_different_model(exported, checkpoint, tmp_path):
    other_ckpt = tmp_path / "other"
    tiny_gpt2(seed=4, n_layer=2, n_embd=32, n_head=4, vocab_size=80).save_pretrained(other_ckpt)
    other = tmp_path / "other.onnx"
    assert lensgraph("export", other_ckpt, "-o", other, "--exporter", "torchscript").returncode == 0
    done = lensgraph("verify", exported, other)
    assert done.returncode == 1
    assert done.stdout.startswith("NOT equivalent")


def test_no_verify_and_single_pass(exported, tmp_path):
    out = tmp_path / "fold.onnx"
    done = lensgraph("process", exported, "-o", out, "--passes", "fold_ln", "--no-verify")
    assert done.returncode == 0, done.stderr
    assert "verification: skipped" in done.stdout
    assert lensgraph("verify", exported, out).returncode == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["process", "missing.onnx", "-o", "x.onnx"], "missing.onnx: no such file"),
        (["process", "MODEL", "-o", "x.onnx", "--passes", "fold_ln,nope"], "unknown pass 'nope'"),
        (["process", "MODEL", "-o", "x.onnx", "--passes", "ln_to_rms"], "'ln_to_rms' needs fold_ln and "
         "center_writing_weights first"),
        (["process", "MODEL", "-o", "x.onnx", "--passes", "fold_ln", "--no-center-unembed"], "not both"),
        (["process", "MODEL", "-o", "x.onnx", "--no-processing", "--no-fold-ln"], "cannot go with --no-fold-ln"),
        (["inspect", "missing.onnx"], "no such file"),
        (["export", "no-such-folder/", "-o", "x.onnx"], "no-such-folder"),
    ],
)
def test_bad_input_is_one_clear_line(exported, tmp_path, args, message):
    args = [str(exported) if a == "MODEL" else a for a in args]
    done = lensgraph(*args, cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_passes_lists_the_default_pipeline():
    done = lensgraph("passes")
    assert done.returncode == 0
    assert "fold_ln,center_writing_weights,center_unembed,fold_value_biases" in done.stdout


def test_demo_runs_offline(tmp_path):
    done = lensgraph("demo", "--dir", tmp_path / "demo")
    assert done.returncode == 0, done.stderr
    assert "verification: worst centred-logit difference" in done.stdout
    assert "every pass was already applied" in done.stdout
    assert (tmp_path / "demo" / "tiny-gpt2.lens.onnx").exists()
