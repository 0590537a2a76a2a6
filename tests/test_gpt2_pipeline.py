"""The default pipeline on GPT-2 from every exporter path: equivalence and the TL properties."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from helpers import feeds, logits_gap, run
from lensgraph.graph import match
from lensgraph.graph.anatomy import analyse
from lensgraph.store.model import LensModel
from lensgraph.pipeline import DEFAULT_PIPELINE
from lensgraph.process import process
from lensgraph.store.weights import LinearWeights


@pytest.fixture
def processed(gpt2_onnx, tmp_path):
    out = tmp_path / "out.onnx"
    report = process(gpt2_onnx, out)
    return gpt2_onnx, str(out), report


def test_logits_equal_up_to_a_constant_per_position(processed):
    original, rewritten, report = processed
    assert report["changed"]
    assert report["verification"]["ok"]
    assert logits_gap(original, rewritten) < 1e-5


def test_every_pass_rewrote_everything_it_matched(processed):
    _, _, report = processed
    counts = {p["name"]: (p["matched"], p["rewritten"], p["skipped"]) for p in report["passes"]}
    assert counts["fold_ln"] == (5, 5, [])  # 2 layers x 2 + ln_f
    assert counts["center_writing_weights"] == (6, 6, [])  # wte, wpe, 2 x (attn, mlp)
    assert counts["center_unembed"] == (1, 1, [])
    assert counts["fold_value_biases"] == (2, 2, [])


def test_norms_are_bare_normalisers(processed):
    _, rewritten, _ = processed
    model = LensModel.load(rewritten)
    anatomy = analyse(model.graph)
    assert len(anatomy.norms) == 5
    for norm in anatomy.norms:
        node, idx = norm.scale
        assert np.all(model.weights.read(node.inputs[idx]) == 1.0)
        node, idx = norm.bias
        assert np.all(model.weights.read(node.inputs[idx]) == 0.0)


def test_residual_stream_has_zero_mean_at_every_norm_input(processed):
    original, rewritten, _ = processed
    anatomy = analyse(LensModel.load(rewritten).graph)
    names = [n.input.name for n in anatomy.norms]
    original_names = [n.input.name for n in analyse(LensModel.load(original).graph).norms]
    x = feeds(2, 6)
    after = run(rewritten, x, names)
    before = run(original, x, original_names)
    for name in names:
        stream = after[name].astype(np.float64)
        scale = np.abs(stream).max()
        assert np.abs(stream.mean(axis=-1)).max() < 1e-5 * scale, name
    # the original stream was not centred, so a no-op rewrite would fail this test
    for name in original_names:
        assert np.abs(before[name].mean(axis=-1)).max() > 1e-3, name


def test_writing_weights_and_unembed_are_centred(processed):
    _, rewritten, _ = processed
    model = LensModel.load(rewritten)
    anatomy = analyse(model.graph)
    linear = LinearWeights(model.weights)
    roles = sorted(w.role for w in anatomy.writers)
    assert roles == ["attn_out", "attn_out", "embed", "mlp_out", "mlp_out", "pos_embed"]
    for writer in anatomy.writers:
        if writer.kind == "linear":
            w, b = linear.weight(writer.linear), linear.bias(writer.linear)
            assert np.abs(w.mean(axis=1)).max() < 1e-6 * np.abs(w).max()
            assert abs(b.mean()) < 1e-6 * max(np.abs(b).max(), 1e-12)
        else:
            table, _ = match.back(writer.node.inputs[writer.idx], {"Identity"})
            t = model.weights.read(table)
            assert np.abs(t.mean(axis=1)).max() < 1e-6 * np.abs(t).max()
    w_u = linear.weight(anatomy.unembed)
    assert np.abs(w_u.mean(axis=1)).max() < 1e-6 * np.abs(w_u).max()
    assert anatomy.unembed.bias is not None  # created: folding ln_f's bias gives b_U
    b_u = linear.bias(anatomy.unembed)
    assert np.any(b_u != 0) and abs(b_u.mean()) < 1e-6 * np.abs(b_u).max()


def test_value_biases_moved_into_output_bias(processed):
    original, rewritten, _ = processed
    before, after = LensModel.load(original), LensModel.load(rewritten)
    a0, a1 = analyse(before.graph), analyse(after.graph)
    assert len(a1.attention) == 2
    for att0, att1 in zip(a0.attention, a1.attention):
        b0 = LinearWeights(before.weights).bias(att0.v)
        b1 = LinearWeights(after.weights).bias(att1.v)
        assert not np.any(b1[64:96])  # GPT-2's c_attn: q | k | v, v in the last third
        assert np.any(b0[64:96])
        assert np.any(b1[:64])  # q and k biases stay


@pytest.mark.parametrize("n", range(1, len(DEFAULT_PIPELINE) + 1))
def test_every_prefix_of_the_pipeline_verifies(gpt2_onnx, tmp_path, n):
    out = tmp_path / "prefix.onnx"
    report = process(gpt2_onnx, out, passes=list(DEFAULT_PIPELINE[:n]))
    assert report["verification"]["ok"]
    assert logits_gap(gpt2_onnx, str(out)) < 1e-5


@pytest.mark.parametrize("name", DEFAULT_PIPELINE)
def test_each_pass_alone_verifies(gpt2_onnx, tmp_path, name):
    out = tmp_path / f"{name}.onnx"
    report = process(gpt2_onnx, out, passes=[name])
    (result,) = report["passes"]
    assert result["rewritten"] >= 1 and result["modified"]
    assert report["verification"]["ok"]
    assert logits_gap(gpt2_onnx, str(out)) < 1e-5


def test_output_passes_full_onnx_check_and_carries_provenance(processed):
    original, rewritten, report = processed
    onnx.checker.check_model(rewritten, full_check=True)
    proto = onnx.load(rewritten)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["lensgraph.applied"]) == list(DEFAULT_PIPELINE)
    assert props["lensgraph.version"]
    assert "gpt2-" in props["lensgraph.source"]
    tagged = [n for n in proto.graph.node if any(p.key == "lensgraph.pass" for p in n.metadata_props)]
    assert tagged
    for node in tagged:
        assert "lensgraph" in node.doc_string
    # original node names are kept
    before = {n.name for n in onnx.load(original).graph.node}
    assert {n.name for n in tagged if not n.name.endswith("_bias")} <= before
    # shapes are on the edges for viewers
    assert len(proto.graph.value_info) > 0


def test_processing_twice_changes_nothing(processed, tmp_path):
    """An already processed model: every pass is a no-op, so no output is written at all."""
    _, rewritten, _ = processed
    again = tmp_path / "again.onnx"
    report = process(rewritten, again)
    assert not report["changed"] and not report["written"]
    assert all(p["already_applied"] for p in report["passes"])
    assert not again.exists()


def test_input_file_is_untouched(gpt2_onnx, tmp_path):
    before = open(gpt2_onnx, "rb").read()
    process(gpt2_onnx, tmp_path / "x.onnx")
    assert open(gpt2_onnx, "rb").read() == before


def test_a_clean_up_after_a_change_of_weights_only_drops_the_weights_no_longer_read(gpt2_exports):
    """After a rewrite that left every node in place (weights changed), the clean-up keeps the graph as
    it is and drops only the initializers no longer read; after one that left a node unread, the whole
    clean-up runs and the node goes."""
    import onnx_ir as ir

    model = LensModel.load(gpt2_exports["torchscript17"])
    model.cleanup()
    nodes = list(model.graph)
    reader = next(n for n in nodes if n.op_type == "MatMul" and n.inputs[1].const_value is not None
                  and len(n.inputs[1].uses()) == 1)
    old = reader.inputs[1]
    new = ir.Value(name=old.name + "_new", shape=old.shape, type=old.type,
                   const_value=ir.Tensor(np.array(old.const_value.numpy()), name=old.name + "_new"))
    model.graph.register_initializer(new)
    reader.replace_input_with(1, new)
    model.cleanup(nodes)
    assert list(model.graph) == nodes and old.name not in model.graph.initializers
    assert new.name in model.graph.initializers
    bypassed = next(n for n in nodes if n.op_type == "Cast" and len(n.outputs[0].uses()) == 1)
    user = bypassed.outputs[0].uses()[0]
    user.node.replace_input_with(user.idx, bypassed.inputs[0])
    model.cleanup(nodes)
    assert bypassed not in list(model.graph) and len(model.graph) < len(nodes)
    model.check()
