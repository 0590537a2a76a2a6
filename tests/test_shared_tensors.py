"""An initializer read both inside and outside a rewrite is copied; the outside reader sees the
original values. The graph is built node by node (tests/handmade.py), not edited from an export."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

import handmade
from helpers import run
from lensgraph.process import process
from lensgraph.verify import verify


def test_shared_initializers_are_copied_for_the_rewrite(tmp_path):
    src, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(handmade.shared_transformer(), src)
    report = process(src, out)
    done = {p["name"]: p["rewritten"] for p in report["passes"]}
    assert done["fold_ln"] == 2 and done["center_unembed"] == 1
    assert report["verification"]["ok"]

    ids = np.random.default_rng(0).integers(0, handmade.VOCAB, (2, 5)).astype(np.int64)
    before, after = run(str(src), {"input_ids": ids}), run(str(out), {"input_ids": ids})
    for side in ("side_w", "side_s"):  # the outside readers see exactly the original values
        np.testing.assert_array_equal(before[side], after[side])

    model = onnx.load(out)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(src).graph.initializer}
    np.testing.assert_array_equal(inits["w_in"], original["w_in"])
    np.testing.assert_array_equal(inits["ln1_s"], original["ln1_s"])
    nodes = {n.name: n for n in model.graph.node}
    folded_w, folded_s = nodes["mlp_in"].input[1], nodes["ln_1"].input[1]
    assert folded_w != "w_in" and folded_s != "ln1_s"  # the rewrite got its own copies
    assert nodes["outside_identity"].input[0] == "w_in" and list(nodes["outside_mul"].input) == ["ln1_s"] * 2
    np.testing.assert_array_equal(inits[folded_s], 1.0)
    assert not np.allclose(inits[folded_w], original["w_in"])
    assert verify(str(src), str(out)).ok
