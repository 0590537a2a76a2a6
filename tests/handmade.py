"""Models built node by node with onnx.helper: non-transformers, and a tiny transformer whose
initializers are shared with consumers outside any rewrite."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "handmade", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="handmade")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp(seed: int = 0) -> onnx.ModelProto:
    """x -> Linear -> Relu -> Linear -> logits: no norm, no residual stream."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["a"], name="relu"),
        helper.make_node("MatMul", ["a", "w2"], ["o"], name="fc2"),
        helper.make_node("Add", ["o", "b2"], ["logits"], name="fc2_bias"),
    ]
    inits = [_init("w1", rng.normal(size=(8, 16)).astype(np.float32)),
             _init("b1", rng.normal(size=16).astype(np.float32)),
             _init("w2", rng.normal(size=(16, 10)).astype(np.float32)),
             _init("b2", rng.normal(size=10).astype(np.float32))]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)


def cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv -> BatchNorm -> Relu -> global pool -> Gemm: a classifier, not a transformer."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["img", "k", "kb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    inits = [_init("k", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
             _init("kb", rng.normal(size=4).astype(np.float32)),
             _init("bn_s", rng.uniform(0.5, 1.5, 4).astype(np.float32)),
             _init("bn_b", rng.normal(size=4).astype(np.float32)),
             _init("bn_m", rng.normal(size=4).astype(np.float32)),
             _init("bn_v", rng.uniform(0.5, 1.5, 4).astype(np.float32)),
             _init("fc_w", rng.normal(size=(5, 4)).astype(np.float32)),
             _init("fc_b", rng.normal(size=5).astype(np.float32))]
    return _model(nodes, [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])], inits)


VOCAB, D_MODEL, D_MLP = 16, 8, 12


def shared_transformer(seed: int = 0) -> onnx.ModelProto:
    """One pre-LN MLP block on a token embedding, then a final LayerNorm and the unembedding.

    Two initializers are also read outside any rewrite: the MLP's input weight `w_in` by
    an Identity feeding graph output `side_w`, and the first norm's scale `ln1_s` by a Mul
    feeding `side_s`. The rewrite must copy them, leaving those outputs as they were.
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Gather", ["w_e", "input_ids"], ["tok"], name="embed"),
        helper.make_node("LayerNormalization", ["tok", "ln1_s", "ln1_b"], ["h0"], name="ln_1", axis=-1),
        helper.make_node("MatMul", ["h0", "w_in"], ["m"], name="mlp_in"),
        helper.make_node("Add", ["m", "b_in"], ["mb"], name="mlp_in_bias"),
        helper.make_node("Relu", ["mb"], ["act"], name="act"),
        helper.make_node("MatMul", ["act", "w_out"], ["o"], name="mlp_out"),
        helper.make_node("Add", ["o", "b_out"], ["ob"], name="mlp_out_bias"),
        helper.make_node("Add", ["tok", "ob"], ["resid"], name="residual"),
        helper.make_node("LayerNormalization", ["resid", "lnf_s", "lnf_b"], ["hf"], name="ln_f", axis=-1),
        helper.make_node("MatMul", ["hf", "w_u"], ["logits"], name="unembed"),
        helper.make_node("Identity", ["w_in"], ["side_w"], name="outside_identity"),
        helper.make_node("Mul", ["ln1_s", "ln1_s"], ["side_s"], name="outside_mul"),
    ]
    f32 = np.float32
    inits = [_init("w_e", rng.normal(size=(VOCAB, D_MODEL)).astype(f32)),
             _init("ln1_s", rng.uniform(0.5, 1.5, D_MODEL).astype(f32)),
             _init("ln1_b", rng.normal(0, 0.3, D_MODEL).astype(f32)),
             _init("w_in", rng.normal(size=(D_MODEL, D_MLP)).astype(f32)),
             _init("b_in", rng.normal(0, 0.3, D_MLP).astype(f32)),
             _init("w_out", rng.normal(size=(D_MLP, D_MODEL)).astype(f32)),
             _init("b_out", rng.normal(0, 0.3, D_MODEL).astype(f32)),
             _init("lnf_s", rng.uniform(0.5, 1.5, D_MODEL).astype(f32)),
             _init("lnf_b", rng.normal(0, 0.3, D_MODEL).astype(f32)),
             _init("w_u", rng.normal(size=(D_MODEL, VOCAB)).astype(f32))]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB]),
               helper.make_tensor_value_info("side_w", TensorProto.FLOAT, [D_MODEL, D_MLP]),
               helper.make_tensor_value_info("side_s", TensorProto.FLOAT, [D_MODEL])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    return _model(nodes, inputs, outputs, inits)


def with_custom_op(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its first Relu (or its output) passed through an op from an unknown domain."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    first = graph.node[0]
    out = first.output[0]
    first.output[0] = out + "_pre"
    graph.node.insert(1, helper.make_node("Mystery", [out + "_pre"], [out], name="mystery", domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.checker.check_model(model)
    return model
