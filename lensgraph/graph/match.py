"""Small graph-walking helpers: constants, producer/consumer walks through no-op ops.

Exporters wrap the same computation in different shells (Reshape to 2-D for a Gemm,
Cast around a norm, Dropout in inference mode, Identity between de-duplicated
tensors). These helpers see through such shells so the anatomy can match the maths.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

# Ops that pass values through unchanged (or only re-layout them without touching the
# last axis's grouping, which the callers check by dimension). Dropout is an identity at
# inference: dynamo exports it with training_mode=True, and onnxruntime removes it.
VALUE_NOOPS = {"Identity", "Cast", "Dropout"}
ROW_NOOPS = VALUE_NOOPS | {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
LAYOUT_OPS = ROW_NOOPS | {"Transpose"}  # re-layouts: heads split off or merged back
SHAPE_ONLY = {"Shape", "Size"}


def const_source(value: ir.Value | None) -> ir.Value | None:
    """The initializer or Constant-node output behind `value`, seen through Identity nodes
    (TorchScript inserts them between de-duplicated tensors); None if not constant."""
    node = value.producer() if value is not None else None
    while node is not None and node.op_type == "Identity" and node.inputs and node.inputs[0] is not None:
        value = node.inputs[0]
        node = value.producer()
    if value is None:
        return None
    if value.const_value is not None or (node is not None and node.op_type == "Constant" and node.domain == ""):
        return value
    return None


def const_value(value: ir.Value | None) -> np.ndarray | None:
    """The array behind a constant tensor, else None."""
    value = const_source(value)
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    attr = node.attributes.get("value")
    if attr is not None:
        return attr.value.numpy()
    for name in ("value_float", "value_int"):
        if name in node.attributes:
            return np.array(node.attributes[name].value)
    for name in ("value_floats", "value_ints"):
        if name in node.attributes:
            return np.array(list(node.attributes[name].value))
    return None


def const_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of a constant tensor without reading its data (weights stay on disk), else None."""
    source = const_source(value)
    if source is None:
        return None
    if source.const_value is not None:
        return tuple(int(d) for d in source.const_value.shape.numpy())
    arr = const_value(source)
    return None if arr is None else tuple(np.shape(arr))


def is_const(value: ir.Value | None) -> bool:
    return const_source(value) is not None


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def value_uses(value: ir.Value) -> list[tuple[ir.Node, int]]:
    """Uses that depend on the values of the tensor (Shape/Size only read its shape)."""
    return [(u.node, u.idx) for u in value.uses() if u.node.op_type not in SHAPE_ONLY]


def is_noop(node: ir.Node, ops=ROW_NOOPS) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ops:
        return False
    if node.op_type == "Cast":
        return ir.DataType(attr(node, "to")).is_floating_point()
    return True


def back(value: ir.Value, ops=ROW_NOOPS) -> tuple[ir.Value, list[ir.Node]]:
    """Walk up through no-op producers; returns the source value and the ops passed."""
    passed = []
    while True:
        node = value.producer()
        if node is None or not is_noop(node, ops) or not node.inputs or node.inputs[0] is None:
            return value, passed
        passed.append(node)
        value = node.inputs[0]


def forward(value: ir.Value, ops=ROW_NOOPS) -> tuple[list[tuple[ir.Node, int, ir.Value]], bool]:
    """Every value use reached from `value` through no-op consumers.

    Returns (uses, reaches_output): each use is (node, input index, the value it reads);
    reaches_output says whether the tensor or a no-op copy of it is a graph output.
    """
    uses, reaches_output, todo, seen = [], False, [value], set()
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        reaches_output |= v.is_graph_output()
        for node, idx in value_uses(v):
            if idx == 0 and is_noop(node, ops) and len(node.outputs) >= 1:
                if node.op_type == "Dropout" and len(node.outputs) > 1 and node.outputs[1].uses():
                    uses.append((node, idx, v))
                    continue
                todo.append(node.outputs[0])
            else:
                uses.append((node, idx, v))
    return uses, reaches_output


def other_input(node: ir.Node, idx: int) -> ir.Value | None:
    """The other operand of a binary node."""
    return node.inputs[1 - idx] if len(node.inputs) == 2 else None


def single_use(value: ir.Value) -> tuple[ir.Node, int] | None:
    uses = value_uses(value)
    if len(uses) == 1 and not value.is_graph_output():
        return uses[0]
    return None


def reduce_axes(node: ir.Node) -> list[int] | None:
    """Axes of a Reduce* node, whether given as attribute (opset < 18) or input."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const_value(node.inputs[1])
        return None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    axes = attr(node, "axes")
    return None if axes is None else [int(a) for a in axes]


def is_last_axis(axes, value: ir.Value | None) -> bool:
    if axes is None or len(axes) != 1:
        return False
    axis = axes[0]
    if axis == -1:
        return True
    shape = value.shape if value is not None else None
    return shape is not None and axis == len(shape) - 1
