"""Linear maps with constant weights, seen through whatever the exporter wrapped them in.

A MatMul or Gemm reading a constant (through Identity, Cast or a 2-D Transpose), with its
optional bias (Gemm's input 2, the Add after a MatMul, or onnxruntime's FastGelu/BiasGelu
holding it). The weight is always described as [in, out], whatever the node stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_ir as ir

from . import match

LINEAR_OPS = {"MatMul", "Gemm"}
WEIGHT_PATH_OPS = {"Identity", "Cast", "Transpose"}
BIAS_ACTIVATIONS = {"FastGelu", "BiasGelu"}  # onnxruntime ops computing act(x + bias)


@dataclass(eq=False)
class Linear:
    """y = x @ W + c with W constant; W read as [in, out] whatever the node stores."""

    node: ir.Node
    source: ir.Value  # the constant the weight comes from
    path: list[ir.Node]  # no-op nodes between `source` and the node (Transpose, Cast)
    transposed: bool  # the node sees W as [out, in] (Gemm transB=1)
    d_in: int
    d_out: int
    bias: tuple[ir.Node, int] | None = None
    layer: int | None = None

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def out(self) -> ir.Value:
        """The output after the bias."""
        if self.bias is not None and self.bias[0] is not self.node:
            return self.bias[0].outputs[0]
        return self.node.outputs[0]


def as_linear(node: ir.Node) -> Linear | str:
    """Read `node` as a linear map of its input 0, or say why it is not one."""
    if node.op_type not in LINEAR_OPS or node.domain != "":
        return f"{node.op_type} is not a linear map"
    if node.op_type == "Gemm":
        if match.attr(node, "transA", 0) != 0:
            return "Gemm with transA=1"
        if match.attr(node, "alpha", 1.0) != 1.0 or match.attr(node, "beta", 1.0) != 1.0:
            return "Gemm with alpha or beta other than 1"
    source, path = match.back(node.inputs[1], WEIGHT_PATH_OPS)
    shape = match.const_shape(source)
    if shape is None:
        return "weight is not a constant"
    if len(shape) != 2:
        return f"weight has {len(shape)} dimensions"
    for p in path:
        if p.op_type == "Transpose" and list(match.attr(p, "perm", [1, 0])) != [1, 0]:
            return "weight transpose is not a 2-D transpose"
    flips = sum(p.op_type == "Transpose" for p in path)
    transposed = node.op_type == "Gemm" and match.attr(node, "transB", 0) == 1
    if (flips % 2 == 1) != transposed:
        d_in, d_out = shape[1], shape[0]
    else:
        d_in, d_out = shape[0], shape[1]
    lin = Linear(node, source, path, transposed, int(d_in), int(d_out))
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        c = match.const_shape(node.inputs[2])
        if c is None or math.prod(c) not in (1, d_out):
            return "Gemm bias is not a constant vector"
        lin.bias = (node, 2)
    elif node.op_type == "MatMul":
        use = match.single_use(node.outputs[0])
        if use is not None and use[0].op_type == "Add":
            add, idx = use
            c = match.const_shape(match.other_input(add, idx))
            if c is not None and math.prod(c) == d_out and c[-1] == d_out:
                lin.bias = (add, 1 - idx)
        elif use is not None and use[0].op_type in BIAS_ACTIVATIONS and use[1] == 0:
            c = match.const_shape(use[0].inputs[1]) if len(use[0].inputs) > 1 else None
            if c is not None and math.prod(c) == d_out:
                lin.bias = (use[0], 1)  # onnxruntime moved the bias into the activation
    return lin


def linear_producing(value: ir.Value) -> Linear | None:
    """The linear map whose output (after its bias) is `value`."""
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Add":
        for idx in (0, 1):
            inner = node.inputs[idx].producer() if node.inputs[idx] is not None else None
            if inner is not None and inner.op_type == "MatMul":
                lin = as_linear(inner)
                if isinstance(lin, Linear) and lin.bias is not None and lin.bias[0] is node:
                    return lin
        return None
    lin = as_linear(node) if node.op_type in LINEAR_OPS else None
    return lin if isinstance(lin, Linear) and lin.out is value else None
