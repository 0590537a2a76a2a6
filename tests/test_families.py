"""Every decoder family x every exporter form: exact rewrites, or skips with reasons.

Each family is built tiny from its config with every 1-D parameter randomised, exported
once per session by TorchScript (opset 17 and 14) and dynamo, processed with the default
pipeline and compared with the original in onnxruntime.
"""

from __future__ import annotations


import numpy as np
import onnx
import pytest

from lensgraph import tiny_models
from helpers import feeds, logits_gap, run
from lensgraph.graph.anatomy import analyse
from lensgraph.graph.describe import describe
from lensgraph.store.model import LensModel
from lensgraph.process import process
from lensgraph.store.weights import LinearWeights

from conftest import EXPORT_FORMS as FORMS

# family: (norm kind, norms found, fold_ln rewrites, writers centred (None: skipped), value folds)
EXPECTED = {
    "gpt2": ("layernorm", 5, 5, 6, 2),
    "gpt_neox": ("layernorm", 5, 5, 5, 2),
    "gptj": ("layernorm", 3, 3, 5, 2),
    "gpt_neo": ("layernorm", 5, 5, 6, 2),
    "opt": ("layernorm", 5, 5, 6, 2),
    "phi": ("layernorm", 3, 3, 5, 2),
    "llama": ("rmsnorm", 5, 5, None, 0),
    "mistral": ("rmsnorm", 5, 5, None, 0),
    "qwen2": ("rmsnorm", 5, 5, None, 2),
    "gemma": ("rmsnorm", 5, 5, None, 0),
    # norms around each sublayer (kept), query/key norms (kept); OLMo 2 has only its final norm on the stream
    "gemma2": ("rmsnorm", 5, 5, None, 0),
    "gemma3": ("rmsnorm", 5, 5, None, 0),
    "qwen3": ("rmsnorm", 5, 5, None, 0),
    "olmo2": ("rmsnorm", 1, 1, None, 0),
    "phi3": ("rmsnorm", 5, 5, None, 0),
}
PARALLEL = {"gpt_neox", "gptj", "phi"}
SOFTCAPPED = {"gemma2"}  # cap * tanh(z / cap) after the unembedding: centring it is not exact
KEPT_NORMS = {"gemma2": 4, "gemma3": 8, "qwen3": 4, "olmo2": 8}  # sublayer-output and head norms


def _stream(path: str, x: dict) -> list[np.ndarray]:
    names = [n.input.name for n in analyse(LensModel.load(path).graph).stream_readers]
    out = run(path, x, names)
    return [out[n].astype(np.float64) for n in names]


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("family", list(EXPECTED))
def test_family_form(family_exports, tmp_path, family, form):
    kind, n_norms, folded, centred, value_folds = EXPECTED[family]
    src = family_exports(family, form)
    out = str(tmp_path / "out.onnx")
    report = process(src, out)
    passes = {p["name"]: p for p in report["passes"]}
    assert report["verification"]["ok"]
    assert logits_gap(src, out) < 1e-5

    assert passes["fold_ln"]["matched"] == n_norms and passes["fold_ln"]["rewritten"] == folded
    kept = sum(int(s["what"].split()[0]) if s["what"].split()[0].isdigit() else 1 for s in passes["fold_ln"]["skipped"])
    assert kept == KEPT_NORMS.get(family, 0), passes["fold_ln"]["skipped"]
    assert all(s["reason"].startswith(("sublayer-output norm", "head norm")) for s in passes["fold_ln"]["skipped"])
    cww = passes["center_writing_weights"]
    if centred is None:
        assert cww["rewritten"] == 0 and "does not remove its mean" in cww["skipped"][0]["reason"]
    else:
        assert cww["rewritten"] == centred and not cww["skipped"]
    if family in SOFTCAPPED:
        assert passes["center_unembed"]["rewritten"] == 0
        assert "soft-capped" in passes["center_unembed"]["skipped"][0]["reason"]
    else:
        assert passes["center_unembed"]["rewritten"] == 1
    assert passes["fold_value_biases"]["rewritten"] == value_folds

    model = LensModel.load(out)
    anatomy = analyse(model.graph)
    assert {n.kind for n in anatomy.norms} == {kind}
    for norm in anatomy.stream_readers:  # bare normalisers
        node, idx = norm.scale
        assert np.all(model.weights.read(node.inputs[idx]) == 1.0), norm.name
        if norm.bias is not None:
            node, idx = norm.bias
            assert np.all(model.weights.read(node.inputs[idx]) == 0.0), norm.name

    x = feeds(2, 6, vocab=tiny_models.VOCAB)
    before, after = _stream(src, x), _stream(out, x)
    assert len(before) == len(after) == n_norms
    for b, a in zip(before, after):
        if kind == "layernorm":  # centred stream: TransformerLens's resid has zero mean
            assert np.abs(a.mean(axis=-1)).max() < 1e-5 * np.abs(a).max()
        else:  # RMSNorm families: the stream itself is untouched
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())

    traits = describe(model, anatomy)["traits"]
    assert traits["parallel_block"] == (family in PARALLEL)
    assert traits["layers"] == 2
    assert traits["query_heads_per_value_head"] == {"gpt2": 1, "gpt_neox": 1, "gptj": 1, "gpt_neo": 1, "opt": 1,
                                                    "phi": 1, "phi3": 1, "gemma": 4}.get(family, 2)  # packed qkv: 1


def test_gptj_fold_creates_biases(family_exports, tmp_path):
    """GPT-J's q/k/v have no bias: folding ln_1's bias creates them, and the value fold creates b_O."""
    src = family_exports("gptj", "torchscript17")
    a0 = analyse(LensModel.load(src).graph)
    assert all(r.bias is None for r in a0.norms[0].readers if r.d_out == 32)
    assert all(att.o.bias is None for att in a0.attention)
    out = tmp_path / "gptj.onnx"
    process(src, out)
    model = LensModel.load(out)
    a1 = analyse(model.graph)
    linear = LinearWeights(model.weights)
    assert all(r.bias is not None for r in a1.norms[0].readers)
    for att in a1.attention:
        assert att.o.bias is not None and np.any(linear.bias(att.o))
        assert not np.any(linear.bias(att.v))


def test_qwen2_value_fold_creates_output_bias(family_exports, tmp_path):
    src = family_exports("qwen2", "dynamo")
    assert all(att.o.bias is None for att in analyse(LensModel.load(src).graph).attention)
    out = tmp_path / "qwen2.onnx"
    process(src, out)
    model = LensModel.load(out)
    linear = LinearWeights(model.weights)
    for att in analyse(model.graph).attention:
        assert att.o.bias is not None and np.any(linear.bias(att.o))
        assert not np.any(linear.bias(att.v))


@pytest.mark.parametrize("form", list(FORMS))
def test_bert_post_norm_is_skipped_with_reason(family_exports, tmp_path, form):
    src = family_exports("bert", form)
    out = tmp_path / "bert.onnx"
    report = process(src, out)
    assert not report["changed"] and not report["written"] and not out.exists()
    for p in report["passes"]:
        assert p["rewritten"] == 0
        assert "post-norm" in p["skipped"][0]["reason"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layers_found_without_names(family_exports, tmp_path, family):
    """With every node name and metadata stripped, layers come from graph order."""
    src = family_exports(family, "dynamo")
    proto = onnx.load(src)
    for i, node in enumerate(proto.graph.node):
        node.name = f"n{i}"
        del node.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, bare)
    named, stripped = analyse(LensModel.load(src).graph), analyse(LensModel.load(bare).graph)
    assert [n.layer for n in stripped.norms] == [n.layer for n in named.norms] == [0, 0, 1, 1, None]
    assert [a.layer for a in stripped.attention] == [0, 1]
    assert sorted((w.role, w.layer) for w in stripped.writers if w.kind == "linear") == sorted(
        (w.role, w.layer) for w in named.writers if w.kind == "linear")
    report = process(bare, tmp_path / "out.onnx")
    assert report["verification"]["ok"]
