"""`lensgraph hooks`, `lensgraph view` and the optional pass on the command line."""

from __future__ import annotations

import os
import subprocess
import sys

import onnx
import pytest

from lensgraph.graph.hookpoints import all_names


def gpt2_points(n_layers: int = 2) -> list[str]:
    """Every point GPT-2 has (but hook_result, added only when named): all of TransformerLens's but a gated
    MLP's linear branch and rotated queries and keys."""
    return [n for n in all_names(n_layers)
            if not n.endswith(("mlp.hook_pre_linear", "hook_rot_q", "hook_rot_k", "hook_result"))]
from lensgraph.process import process

LENSGRAPH = os.path.join(os.path.dirname(sys.executable), "lensgraph")


def lensgraph(*args) -> subprocess.CompletedProcess:
    return subprocess.run([LENSGRAPH, *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def processed(gpt2_exports, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-hooks") / "gpt2.lens.onnx"
    process(gpt2_exports["torchscript17"], out)
    return out


def test_hooks_adds_every_point_and_changes_no_output(processed, tmp_path):
    out = tmp_path / "hooks.onnx"
    done = lensgraph("hooks", processed, "-o", out)
    assert done.returncode == 0, done.stderr
    assert f"{len(gpt2_points())} hook outputs" in done.stdout
    names = [o.name for o in onnx.load(out).graph.output]
    assert names == ["logits"] + gpt2_points()
    onnx.checker.check_model(str(out), full_check=True)
    done = lensgraph("verify", processed, out)
    assert done.returncode == 0 and done.stdout.startswith("equivalent"), done.stdout + done.stderr


def test_hooks_points_choose(processed, tmp_path):
    out = tmp_path / "post.onnx"
    done = lensgraph("hooks", processed, "-o", out, "--points", "blocks.*.hook_resid_post", "ln_final.*")
    assert done.returncode == 0, done.stderr
    names = [o.name for o in onnx.load(out).graph.output]
    assert names == ["logits", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "ln_final.hook_scale",
                     "ln_final.hook_normalized"]


def test_hooks_list_and_errors(processed, tmp_path):
    done = lensgraph("hooks", processed, "--list")
    assert done.returncode == 0
    assert "blocks.1.attn.hook_pattern: output of /model/transformer/h.1/attn/Softmax" in done.stdout
    done = lensgraph("hooks", processed, "-o", tmp_path / "x.onnx", "--points", "blocks.*.hook_nowhere")
    assert done.returncode == 2 and "no hook point matches 'blocks.*.hook_nowhere'" in done.stderr
    assert not (tmp_path / "x.onnx").exists()
    assert lensgraph("hooks", processed).returncode == 2  # no -o and no --list


def test_hooks_lists_points_a_family_lacks(tmp_path):
    """A graph without norms has no stream to hook: every point is listed with the reason."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["logits"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph), path)
    done = lensgraph("hooks", path, "--list")
    assert done.returncode == 0
    assert "not placed: blocks.*.hook_resid_pre: no norms found" in done.stdout
    out = tmp_path / "hooked.onnx"
    done = lensgraph("hooks", path, "-o", out)  # nothing to place: nothing written, and it says why
    assert done.returncode == 2 and not out.exists()
    assert "no hook point can be placed, so nothing was written" in done.stderr and "no norms found" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_view_reports_a_missing_file(tmp_path):
    done = lensgraph("view", tmp_path / "missing.onnx")
    assert done.returncode == 2 and "no such file" in done.stderr


def test_passes_lists_the_optional_pass():
    done = lensgraph("passes")
    assert "  ln_to_rms: replace each LayerNorm" in done.stdout
    assert "* ln_to_rms" not in done.stdout
