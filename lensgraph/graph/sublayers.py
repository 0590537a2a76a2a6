"""What a term of the residual stream is, proven from the graph: attention or MLP.

    attention   O( softmax(...) @ V ),  V = a linear map of the stream; the probabilities may be
                guarded as Where(IsNaN(p), 0, p) (optimum's scaled-dot-product export)
    MLP         W_out( act(W_in x) )  or  W_out( act(W_gate x) * (W_up x) ),  the activation any
                elementwise non-linearity (Gelu, its tanh or erf expansion, SiLU as x * Sigmoid(x)...)

Each test returns its parts or a reason, never a guess: an unrecognised term is "other".
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from . import match
from .linear import LINEAR_OPS, Linear, as_linear, linear_producing

VALUE_PATH_OPS = match.LAYOUT_OPS | {"Expand", "Slice", "Split"}

# Elementwise ops an MLP's hidden layer may pass through between its linear maps.
NONLINEAR = {"Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Relu", "LeakyRelu", "Elu", "Selu", "Tanh", "Erf",
             "Sigmoid", "HardSigmoid", "Softplus", "Exp", "Clip", "Max", "Min", "Abs", "Mish", "HardSwish"}
ELEMENTWISE = NONLINEAR | {"Mul", "Add", "Sub", "Div", "Pow", "Neg", "Sqrt", "Identity", "Cast", "Dropout",
                           "Split", "Slice", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose"}
MLP_SEARCH_LIMIT = 64  # nodes visited walking back from an MLP's output projection


def softmax_of(value: ir.Value) -> ir.Node | None:
    """The Softmax producing attention probabilities `value` (through casts and a NaN guard)."""
    probs, _ = match.back(value, match.VALUE_NOOPS)
    node = probs.producer()
    if node is not None and node.op_type == "Where" and len(node.inputs) == 3:
        cond = node.inputs[0].producer() if node.inputs[0] is not None else None
        if cond is not None and cond.op_type == "IsNaN" and cond.inputs[0] is node.inputs[2] \
                and match.is_const(node.inputs[1]):
            probs, _ = match.back(node.inputs[2], match.VALUE_NOOPS)
            node = probs.producer()
    return node if node is not None and node.op_type == "Softmax" else None


@dataclass(eq=False)
class ValuePath:
    v: Linear  # the linear map making the values (a packed q|k|v map included)
    passed: list[ir.Node]


FUSED_ATTENTION = ("GroupQueryAttention", "MultiHeadAttention")  # onnxruntime's, com.microsoft


def fused_attention(o: Linear) -> ir.Node | None:
    """The onnxruntime attention op (softmax(q k^T) v inside one node) feeding projection `o`."""
    x, _ = match.back(o.node.inputs[0], match.LAYOUT_OPS)
    node = x.producer()
    if node is not None and node.domain == "com.microsoft" and node.op_type in FUSED_ATTENTION and x is node.outputs[0]:
        return node
    return None


def fused_values(node: ir.Node) -> ValuePath | str:
    """The linear map making a fused attention op's values: its value input, or the packed q|k|v
    input when the key and value inputs are empty."""
    inputs = list(node.inputs) + [None] * 3
    source = inputs[2] if inputs[1] is not None and inputs[2] is not None else inputs[0]
    return _trace_values(source, node)


def attention_parts(o: Linear) -> tuple[ir.Node, ir.Node] | str:
    """(Softmax, probabilities @ values MatMul) feeding output projection `o`, or why not."""
    x, _ = match.back(o.node.inputs[0], match.LAYOUT_OPS)
    pv = x.producer()
    if pv is None or pv.op_type != "MatMul" or match.is_const(pv.inputs[1]):
        return f"{o.name} is not fed by a MatMul of probabilities and values"
    softmax = softmax_of(pv.inputs[0])
    if softmax is None:
        return f"{o.name}: the attention probabilities do not come from a Softmax"
    return softmax, pv


def value_source(pv: ir.Node) -> ValuePath | str:
    """Walk from the attention product back to the linear map that makes the values."""
    return _trace_values(pv.inputs[1], pv)


def _trace_values(start: ir.Value, consumer: ir.Node) -> ValuePath | str:
    """From the values `consumer` reads back to the linear map making them: through re-layouts,
    grouped-query repeats and a KV cache's Concat of past and new values."""
    v, passed = match.back(start, VALUE_PATH_OPS)
    node = v.producer()
    while node is not None and node.op_type in ("Concat", "Expand"):
        live = [i for i in node.inputs if i is not None and not match.is_const(i)
                and not match.back(i)[0].is_graph_input()]
        if len(live) != 1:
            break
        passed.append(node)
        v, more = match.back(live[0], VALUE_PATH_OPS)
        passed += more
        node = v.producer()
    lin = linear_producing(v)
    if lin is None:
        node = v.producer()
        return f"values come from {node.op_type if node else 'a graph input'}, not a linear map"
    # Everything between the values' own slice and the consumer must serve only it (a KV-cache
    # output may also read it).
    for node in passed:
        if node.op_type in ("Slice", "Split"):
            break
        if any(n is not consumer and n not in passed for n, _ in match.value_uses(node.outputs[0])):
            return f"values at {node.name} are also read outside the attention product"
    return ValuePath(lin, passed)


def mlp_inputs(out: Linear) -> list[Linear] | str:
    """The linear maps (W_in, or W_gate and W_up) whose activated product `out` projects, or why
    `out` is not an MLP's output projection."""
    start = out.node.inputs[0]
    inputs: list[Linear] = []
    nonlinear = False
    todo, seen = [start], set()
    while todo:
        value = todo.pop()
        if id(value) in seen or match.is_const(value):
            continue
        seen.add(id(value))
        if len(seen) > MLP_SEARCH_LIMIT:
            return f"{out.name}: no hidden layer found within {MLP_SEARCH_LIMIT} nodes"
        lin = linear_producing(value) if value is not start else None
        if lin is not None:
            inputs.append(lin)
            continue
        node = value.producer()
        if node is None:
            return f"{out.name} reads graph input {value.name} through elementwise ops, not a hidden layer"
        if node.op_type in LINEAR_OPS:
            lin = as_linear(node)
            if isinstance(lin, Linear):  # the bias-free output of a linear map
                inputs.append(lin)
                continue
            return f"{out.name}: its hidden layer comes from {node.op_type} {node.name} ({lin})"
        if node.op_type not in ELEMENTWISE or node.domain not in ("", "ai.onnx", "com.microsoft"):
            return f"{out.name}: its input comes from {node.op_type} {node.name}, not an activated hidden layer"
        computed = [i for i in node.inputs if i is not None and not match.is_const(i)]
        if node.op_type in NONLINEAR or (node.op_type in ("Mul", "Div", "Pow") and len(computed) == 2):
            nonlinear = True  # x * Sigmoid(x), act(gate) * up, and their like
        todo += computed[:1] if node.op_type in ("Split", "Slice", "Reshape", "Squeeze", "Unsqueeze",
                                                 "Flatten", "Transpose") else computed
    if not inputs:
        return f"{out.name}: no linear map feeds its hidden layer"
    if not nonlinear:
        return f"{out.name}: no activation between it and {inputs[0].name}"
    unique = []
    for lin in inputs:
        if all(lin.node is not u.node for u in unique):
            unique.append(lin)
    return unique


def mlp_branches(post: ir.Value) -> tuple[ir.Value | str, ir.Value | str]:
    """(pre-activation, linear branch) of an MLP whose activated hidden layer is `post`: in
    act(W_in x) the pre-activation is W_in x; in act(W_gate x) * (W_up x), W_gate x and W_up x."""
    node = post.producer()
    if node is not None and node.op_type == "Mul" and len(node.inputs) == 2:
        sides = [_linear_output(v) for v in node.inputs]
        plain = [i for i, v in enumerate(sides) if v is not None]
        if len(plain) == 1:  # one side is a linear map's output as it is: the gated product
            gate = _activation_input(node.inputs[1 - plain[0]])
            if gate is None:
                return "the gate's pre-activation is not one linear map's output", "the MLP's gate is not traced"
            if gate is not sides[plain[0]]:  # x * act(x) is an activation (SiLU), not a gate
                return gate, sides[plain[0]]
    pre = _activation_input(post)
    if pre is None:
        return "the MLP's pre-activation is not one linear map's output", "the MLP is not traced"
    return pre, "the MLP is not gated: it has no linear branch"


def _linear_output(value: ir.Value) -> ir.Value | None:
    """`value` (through no-ops) when it is a linear map's output, or a slice of a packed one."""
    source, _ = match.back(value)
    node = source.producer()
    if linear_producing(source) is not None:
        return source
    if node is not None and node.op_type in ("Split", "Slice") and linear_producing(match.back(node.inputs[0])[0]):
        return source
    return None


def _activation_input(value: ir.Value) -> ir.Value | None:
    """The one linear-map output an elementwise activation chain is computed from."""
    found, todo, seen = set(), [value], set()
    while todo and len(seen) < 32:
        v = todo.pop()
        if id(v) in seen or match.is_const(v):
            continue
        seen.add(id(v))
        out = _linear_output(v)
        if out is not None:
            found.add(out)
            continue
        node = v.producer()
        if node is None or node.op_type not in ELEMENTWISE:
            return None
        todo += [i for i in node.inputs if i is not None]
    return found.pop() if len(found) == 1 else None
