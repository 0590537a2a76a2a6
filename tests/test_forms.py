"""Graph forms beyond the plain exports: onnxruntime's optimiser output and opset 23's
RMSNormalization. Each is processed exactly (logits equal up to a constant per position)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import logits_gap
from lensgraph.graph.anatomy import analyse
from lensgraph.store.model import LensModel
from lensgraph.graph.norms import find_norms
from lensgraph.process import process


def ort_optimised(src: str, dst: str, model_type: str) -> str:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(model_type)
    model = optimize_model(src, model_type=model_type, num_heads=4, hidden_size=32,
                           optimization_options=options, opt_level=0)
    model.save_model_to_file(dst)
    return dst


# family, ORT model type, fused ops expected, (fold_ln, centred writers or None, value folds)
ORT_CASES = [
    ("gpt2", "gpt2", {"SkipLayerNormalization", "FastGelu"}, (5, 8, 2)),
    ("gpt_neox", "gpt_neox", {"SkipLayerNormalization", "BiasGelu"}, (5, 5, 2)),
    ("llama", "gpt2", {"SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"}, (5, None, 0)),
]


@pytest.mark.parametrize("family, model_type, fused, expected", ORT_CASES, ids=[c[0] for c in ORT_CASES])
def test_onnxruntime_optimised_graph(family_exports, tmp_path, family, model_type, fused, expected):
    src = ort_optimised(family_exports(family, "torchscript17"), str(tmp_path / "opt.onnx"), model_type)
    ops = {n.op_type for n in onnx.load(src).graph.node}
    assert fused <= ops
    out = str(tmp_path / "out.onnx")
    report = process(src, out)
    passes = {p["name"]: p for p in report["passes"]}
    folded, centred, value_folds = expected
    assert passes["fold_ln"]["rewritten"] == folded
    if centred is not None:
        assert passes["center_writing_weights"]["rewritten"] == centred
    assert passes["fold_value_biases"]["rewritten"] == value_folds
    assert logits_gap(src, out) < 1e-5
    assert fused <= {n.op_type for n in onnx.load(out).graph.node}  # the fusions survive
    model = LensModel.load(out)
    for norm in analyse(model.graph).norms:
        node, idx = norm.scale
        assert np.all(model.weights.read(node.inputs[idx]) == 1.0)


def test_rmsnormalization_opset23(family_exports, tmp_path):
    """Dynamo at opset 23 writes RMSNormalization; made here from the decomposed form,
    since onnxruntime cannot run the RotaryEmbedding that same export also contains."""
    src = family_exports("llama", "dynamo")
    model = onnx.load(src)
    norms = find_norms(LensModel.load(src).graph)
    first = {n.nodes[0].name: n for n in norms}
    dropped = {node.name for n in norms for node in n.nodes}
    nodes = []
    for node in model.graph.node:
        if node.name in first:
            n = first[node.name]
            scale = n.scale[0].inputs[n.scale[1]].name
            nodes.append(helper.make_node("RMSNormalization", [n.input.name, scale], [n.output.name],
                                          axis=-1, epsilon=n.eps, name=f"rms_{len(nodes)}"))
        if node.name not in dropped:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for opset in model.opset_import:
        if opset.domain == "":
            opset.version = 23
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    path = str(tmp_path / "rms23.onnx")
    onnx.save(model, path)
    assert logits_gap(src, path) < 1e-6
    out = str(tmp_path / "out.onnx")
    report = process(path, out)
    assert report["passes"][0]["rewritten"] == 5
    assert {n.form for n in analyse(LensModel.load(out).graph).norms} == {"RMSNormalization"}
    assert logits_gap(path, out) < 1e-5
