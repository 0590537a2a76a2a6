"""Graph forms the exporters produce (or could): each is rewritten exactly or left alone.

Variants are made by editing a real export: a tied unembedding read through a Transpose,
Gemm weights stored [out, in] with transB=1, one scale initializer shared by every
LayerNorm, Identity nodes between shared tensors, and an initializer that is also read
outside any rewrite.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from helpers import BreakUnembed, feeds, logits_gap, run
from lensgraph import VerificationError
from lensgraph.graph import match
from lensgraph.graph.anatomy import analyse
from lensgraph.store.model import LensModel
from lensgraph.pipeline import PassManager
from lensgraph.process import process
from lensgraph.store.weights import LinearWeights


def edited(src: str, dst, edit) -> str:
    model = onnx.load(src)
    edit(model.graph)
    del model.graph.value_info[:]  # shapes recorded before the edit may no longer hold
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))
    return str(dst)


def _inits(graph):
    return {i.name: i for i in graph.initializer}


def tie_unembed_through_transpose(graph):
    """lm_head reads the embedding table itself, through a Transpose (dynamo's tied form)."""
    inits = _inits(graph)
    unembed = next(n for n in graph.node if "logits" in n.output)
    gather = next(n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                  and numpy_helper.to_array(inits[n.input[0]]).shape[0] == 96)
    table = numpy_helper.to_array(inits[gather.input[0]])
    np.testing.assert_array_equal(numpy_helper.to_array(inits[unembed.input[1]]), table.T)
    graph.initializer.remove(inits[unembed.input[1]])
    graph.node.insert(0, helper.make_node("Transpose", [gather.input[0]], ["tied_unembed"], perm=[1, 0],
                                          name="tied_transpose"))
    unembed.input[1] = "tied_unembed"


def gemm_weights_out_in(graph):
    """Every Gemm stores its weight [out, in] and sets transB=1 (as for nn.Linear)."""
    inits = _inits(graph)
    for node in graph.node:
        if node.op_type == "Gemm":
            init = inits[node.input[1]]
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).T.copy(), init.name))
            for attr in [a for a in node.attribute if a.name == "transB"]:
                node.attribute.remove(attr)
            node.attribute.append(helper.make_attribute("transB", 1))


def share_norm_scales(graph):
    """One scale initializer for every LayerNorm (dynamo de-duplicates equal tensors)."""
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    for n in norms[1:]:
        n.input[1] = norms[0].input[1]
    keep = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in keep]:
        graph.initializer.remove(init)


def identities_between_shared(graph):
    """TorchScript inserts Identity nodes between a de-duplicated tensor and its users."""
    inits = _inits(graph)
    for k, node in enumerate([n for n in graph.node if n.op_type in ("LayerNormalization", "Gemm")]):
        for idx in (1, 2):
            name = node.input[idx]
            if name in inits:
                graph.node.insert(0, helper.make_node("Identity", [name], [f"{name}_id{k}"], name=f"id_{k}_{idx}"))
                node.input[idx] = f"{name}_id{k}"


def scale_also_read_outside(graph):
    """The first LayerNorm's scale is also a graph output's source: it must stay as it was."""
    norm = next(n for n in graph.node if n.op_type == "LayerNormalization")
    graph.node.append(helper.make_node("Mul", [norm.input[1], norm.input[1]], ["scale_squared"], name="outside"))
    graph.output.append(helper.make_tensor_value_info("scale_squared", onnx.TensorProto.FLOAT, [32]))


VARIANTS = {
    "tied_transpose": tie_unembed_through_transpose,
    "gemm_transB": gemm_weights_out_in,
    "shared_norm_scale": share_norm_scales,
    "identity_shared": identities_between_shared,
    "read_outside": scale_also_read_outside,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_is_processed_exactly(gpt2_exports, tmp_path, variant):
    src = edited(gpt2_exports["torchscript17"] if variant == "tied_transpose" else gpt2_exports["dynamo"],
                 tmp_path / "in.onnx", VARIANTS[variant])
    out = tmp_path / "out.onnx"
    report = process(src, out)
    counts = {p["name"]: (p["matched"], p["rewritten"]) for p in report["passes"]}
    assert counts == {"fold_ln": (5, 5), "center_writing_weights": (6, 6), "center_unembed": (1, 1),
                      "fold_value_biases": (2, 2)}
    assert report["verification"]["ok"]
    assert logits_gap(src, str(out)) < 1e-5
    onnx.checker.check_model(str(out), full_check=True)
    model = LensModel.load(out)
    anatomy = analyse(model.graph)
    for norm in anatomy.norms:
        assert np.all(model.weights.read(norm.scale[0].inputs[norm.scale[1]]) == 1.0)


def test_tied_embedding_is_untied(gpt2_exports, tmp_path):
    src = edited(gpt2_exports["torchscript17"], tmp_path / "tied.onnx", tie_unembed_through_transpose)
    before = LensModel.load(src)
    a0 = analyse(before.graph)
    embed = next(w for w in a0.writers if w.role == "embed")
    assert match.back(embed.node.inputs[0])[0] is a0.unembed.source  # one tensor, two readers
    out = tmp_path / "out.onnx"
    process(src, out)
    after = LensModel.load(out)
    a1 = analyse(after.graph)
    embed = next(w for w in a1.writers if w.role == "embed")
    table = after.weights.read(embed.node.inputs[0])
    w_u = LinearWeights(after.weights).weight(a1.unembed)
    assert a1.unembed.source is not embed.node.inputs[0]
    assert np.abs(table.mean(axis=1)).max() < 1e-6  # centred over d_model as an embedding
    assert np.abs(w_u.mean(axis=1)).max() < 1e-6  # centred over vocab as an unembedding
    assert not np.allclose(table.T, w_u, atol=1e-3)


def test_initializer_read_outside_a_rewrite_is_copied(gpt2_exports, tmp_path):
    src = edited(gpt2_exports["dynamo"], tmp_path / "in.onnx", scale_also_read_outside)
    out = tmp_path / "out.onnx"
    process(src, out)
    x = feeds()
    before, after = run(src, x)["scale_squared"], run(str(out), x)["scale_squared"]
    np.testing.assert_array_equal(before, after)
    assert not np.allclose(before, 1.0)


def test_failed_verification_writes_nothing(gpt2_exports, tmp_path):
    out = tmp_path / "bad.onnx"
    with pytest.raises(VerificationError, match=r"break_unembed.*worst difference .* exceeds"):
        process(gpt2_exports["dynamo"], out, passes=PassManager([BreakUnembed()]))
    assert list(tmp_path.iterdir()) == []


def norm_output_also_feeds_relu(graph):
    """The second LayerNorm's output also feeds a non-linear op that is a graph output."""
    norm = [n for n in graph.node if n.op_type == "LayerNormalization"][1]
    graph.node.append(helper.make_node("Relu", [norm.output[0]], ["probe_relu"], name="probe_relu"))
    graph.output.append(helper.make_tensor_value_info("probe_relu", onnx.TensorProto.FLOAT, ["batch", "sequence", 32]))


def test_partly_understood_model_gets_the_safe_subset(gpt2_exports, tmp_path):
    src = edited(gpt2_exports["dynamo"], tmp_path / "in.onnx", norm_output_also_feeds_relu)
    out = tmp_path / "out.onnx"
    report = process(src, out)
    fold = report["passes"][0]
    assert fold["rewritten"] == 4
    assert len(fold["skipped"]) == 1 and "feeds Relu probe_relu" in fold["skipped"][0]["reason"]
    assert report["verification"]["ok"] and logits_gap(src, str(out)) < 1e-5
    x = feeds()
    np.testing.assert_allclose(run(src, x)["probe_relu"], run(str(out), x)["probe_relu"], atol=1e-5)


def test_the_probes_zero_weights_are_private_maps_that_hold_no_memory():
    """The probes feed zeros for the weights they hold out of the graph. numpy's zeros are heap
    memory in a process that has freed large arrays (placing convert's points grew it by 400 MiB),
    so they are private anonymous maps, which read as the kernel's zero page until written."""
    import mmap
    import resource

    from lensgraph.graph.probe import _huge_zero_page, zeros

    def rss_mib():
        with open("/proc/self/status") as f:
            return int(next(ln for ln in f if ln.startswith("VmRSS")).split()[1]) // 1024

    before = rss_mib()
    arrays = [zeros((512, 1024), np.float32) for _ in range(96)]  # 192 MiB
    assert all(a.shape == (512, 1024) and a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)
    assert all(isinstance(a.base.base.obj, mmap.mmap) for a in arrays)  # shaped, over a view of the map
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    assert sum(float(np.abs(a).max()) for a in arrays) == 0.0  # read in full: still zeros, and still no memory
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    assert rss_mib() - before < 32
    if _huge_zero_page():  # read through the kernel's huge zero page: a fault per 2 MiB, not per 4 KiB (49,152)
        assert faults < 2000, faults
    assert zeros((3,), np.float16).tolist() == [0.0, 0.0, 0.0]  # below a page: plain numpy zeros


