"""ln_to_rms: LayerNorms on the centred stream become RMSNorms, exactly, and only when proven safe."""

from __future__ import annotations

import collections

import onnx
import onnxruntime as ort
import pytest

from helpers import logits_gap
from lensgraph.store.model import LensModel
from lensgraph.errors import PipelineError
from lensgraph.pipeline import DEFAULT_PIPELINE, PassManager
from lensgraph.process import process
from lensgraph.store.weights import LinearWeights

FULL = list(DEFAULT_PIPELINE) + ["ln_to_rms"]


@pytest.fixture(scope="module")
def opset23(gpt2_hf, tmp_path_factory):
    from lensgraph.export import export_model

    path = tmp_path_factory.mktemp("rms") / "gpt2-dynamo23.onnx"
    export_model(gpt2_hf, path, exporter="dynamo", opset=23)
    return str(path)


def optimized_ops(path, tmp_path):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def test_rms_form_is_exact_and_fused_by_onnxruntime(gpt2_onnx, tmp_path):
    out = tmp_path / "rms.onnx"
    report = process(gpt2_onnx, out, passes=FULL)
    result = report["passes"][-1]
    assert (result["name"], result["matched"], result["rewritten"], result["skipped"]) == ("ln_to_rms", 5, 5, [])
    assert report["verification"]["ok"]
    assert logits_gap(gpt2_onnx, str(out)) < 1e-5
    ops = collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops["LayerNormalization"] == 0 and ops["ReduceMean"] == 5  # mean(x^2) only: no mean(x) left
    ops = optimized_ops(str(out), tmp_path)
    assert ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"] == 5
    assert ops["LayerNormalization"] == ops["SkipLayerNormalization"] == 0


def test_opset_23_uses_rmsnormalization(opset23, tmp_path):
    out = tmp_path / "rms23.onnx"
    report = process(opset23, out, passes=FULL)
    assert report["verification"]["ok"]
    assert logits_gap(opset23, str(out)) < 1e-5
    ops = collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops["RMSNormalization"] == 5 and ops["LayerNormalization"] == 0


def test_rewritten_norms_keep_their_names_and_say_why(gpt2_exports, tmp_path):
    src = gpt2_exports["torchscript17"]
    out = tmp_path / "rms.onnx"
    process(src, out, passes=FULL)
    before = {n.name for n in onnx.load(src).graph.node if n.op_type == "LayerNormalization"}
    after = {n.name: n for n in onnx.load(str(out)).graph.node}
    assert before and before <= set(after)
    for name in before:
        node = after[name]
        props = {p.key: p.value for p in node.metadata_props}
        assert "ln_to_rms" in props["lensgraph.pass"]
        assert "mean(x) = 0" in node.doc_string


def test_needs_a_centred_stream(gpt2_exports, tmp_path):
    """Without center_writing_weights in the pipeline or applied, the pipeline is refused (exit 2)."""
    with pytest.raises(PipelineError, match="'ln_to_rms' needs center_writing_weights first"):
        process(gpt2_exports["dynamo"], tmp_path / "x.onnx", passes=["fold_ln", "ln_to_rms"])
    assert not (tmp_path / "x.onnx").exists()


def test_guard_checks_the_weights_themselves(gpt2_exports, tmp_path):
    """Metadata says the stream was centred, but one writer's bias is not: the pass refuses."""
    processed = tmp_path / "lens.onnx"
    process(gpt2_exports["dynamo"], processed)
    model = LensModel.load(processed)
    from lensgraph.graph.anatomy import analyse

    writer = next(w for w in analyse(model.graph).writers if w.role == "mlp_out")
    linear = LinearWeights(model.weights)
    linear.set_bias(writer.linear, linear.bias(writer.linear) + 0.5)
    (result,) = PassManager(["ln_to_rms"]).run(model)
    assert not result.modified
    assert "not centred over d_model" in result.skipped[0][1]


def test_not_in_the_default_pipeline():
    assert "ln_to_rms" not in DEFAULT_PIPELINE
    assert "ln_to_rms" in PassManager.parse("fold_ln,center_writing_weights,ln_to_rms").names
    manager = PassManager.parse("ln_to_rms,center_writing_weights,fold_ln")
    assert manager.names == ["fold_ln", "center_writing_weights", "ln_to_rms"]
    assert manager.notes == ["reordered to fold_ln,center_writing_weights,ln_to_rms: 'ln_to_rms' must run after "
                             "'fold_ln'"]
