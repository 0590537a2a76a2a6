"""ln_to_rms: a LayerNorm whose input has zero mean is an RMSNorm.

    LayerNorm(x) = (x - mean x) / sqrt(var x + eps) * w + b
                 = x / sqrt(mean(x^2) + eps) * w + b        when mean x = 0

After fold_ln and center_writing_weights every term written into the residual stream
is centred over d_model, so every stream tensor is too, and the mean removal is dead
work. Each LayerNorm reading the stream becomes the RMS form: `RMSNormalization` at
opset >= 23, otherwise the chain onnxruntime fuses into SimplifiedLayerNormalization:

    x ─┬─ Pow(2) ─ ReduceMean ─ Add(eps) ─ Sqrt ─┐
       └────────────────────────────────────── Div ─ Mul(w) [─ Add(b)]

The guard proves the centring from the weights: no writer may be skipped or of unknown
kind, and each writer's weight, bias or table must have zero mean over d_model.
"""

import numpy as np
import onnx_ir as ir
from onnx_ir.convenience import convert_attributes, replace_all_uses_with

from lensgraph.graph import match
from lensgraph.pipeline import Pass, PassResult, check, register
from lensgraph.store.weights import LinearWeights

TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 1e-2, np.dtype(np.float64): 1e-12}
FORMULA = "LayerNorm(x) = x / sqrt(mean(x^2) + eps) * w + b, exact because mean(x) = 0 on the centred stream"


@register
class LayerNormToRMS(Pass):
    name = "ln_to_rms"

    def requires(self, model, anatomy):
        missing = [p for p in ("fold_ln", "center_writing_weights") if p not in model.applied]
        if missing:
            return f"needs {' and '.join(missing)} first: only a centred stream makes LayerNorm an RMSNorm"
        if not anatomy.stream:
            return "no residual stream read by a norm was found"
        return uncentred(model, anatomy)

    def run(self, model, anatomy) -> PassResult:
        result = PassResult(self.name)
        stream = {id(v) for v in anatomy.stream}
        opset = model.graph.opset_imports.get("", 17)
        self.converted = []
        for norm in anatomy.norms:
            result.matched += 1
            if norm.kind != "layernorm":
                result.skip(norm.name, f"a {norm.kind}, not a LayerNorm")
                continue
            if id(match.back(norm.input)[0]) not in stream:
                result.skip(norm.name, "its input is not a residual-stream tensor proven centred")
                continue
            if norm.form == "LayerNormalization":
                _replace_fused(model, norm, opset, self.name)
            else:
                _drop_mean(model, norm, self.name)
            self.converted.append(norm.name)
            result.rewritten += 1
        result.modified = result.rewritten > 0
        return result

    def ensures(self, model, anatomy) -> None:
        left = {n.name for n in anatomy.norms if n.kind == "layernorm"} & set(getattr(self, "converted", []))
        check(not left, f"ln_to_rms left LayerNorms in place: {', '.join(sorted(left))}")


def uncentred(model, anatomy) -> str | None:
    """Why the residual stream is not provably centred, or None when it is."""
    if anatomy.stream_blocker:
        return anatomy.stream_blocker
    if not anatomy.writers:
        return "no terms written into the residual stream were found"
    linear = LinearWeights(model.weights)
    for w in anatomy.writers:
        if w.blocker:
            return f"stream term {w.name} is not proven centred ({w.blocker})"
        if w.kind == "linear":
            arrays = [linear.weight(w.linear), linear.bias(w.linear)[None, :]]
            dtype = _dtype(w.linear.source)
        elif w.kind in ("embed", "bias"):
            value, _ = match.back(w.node.inputs[w.idx], {"Identity"})
            arrays, dtype = [model.weights.read(value)], _dtype(value)
        else:
            return f"stream term {w.name} is of unknown kind"
        for arr in arrays:
            arr = arr.reshape(-1, arr.shape[-1])
            scale = max(float(np.abs(arr).max()), 1e-30)
            if float(np.abs(arr.mean(axis=-1)).max()) > TOLERANCE.get(dtype, 1e-5) * scale:
                return f"stream term {w.name} is not centred over d_model (run center_writing_weights)"
    return None


def _dtype(value: ir.Value) -> np.dtype:
    return np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.float32)


def _const(model, name: str, array: np.ndarray) -> ir.Value:
    return model.weights.new_initializer(name, array)


def _node(graph, before: ir.Node, op: str, inputs, name: str, **attrs) -> ir.Node:
    node = ir.Node("", op, inputs, attributes=convert_attributes(attrs), name=name)
    graph.insert_before(before, node)
    return node


def _replace_fused(model, norm, opset: int, pass_name: str) -> None:
    """LayerNormalization(x, w, b) -> the RMS form, the last node keeping the LayerNorm's name."""
    graph, ln = model.graph, norm.nodes[0]
    x, w = ln.inputs[0], ln.inputs[1]
    b = ln.inputs[2] if len(ln.inputs) > 2 else None
    dtype = _dtype(x)
    name, out_name = ln.name, ln.outputs[0].name
    nodes = []
    if opset >= 23:
        rms = _node(graph, ln, "RMSNormalization", [x, w], f"{name}/RMSNormalization", axis=-1,
                    epsilon=float(norm.eps), stash_type=1)
        nodes.append(rms)
    else:
        two = _const(model, f"{name}.two", np.array(2.0, dtype))
        eps = _const(model, f"{name}.epsilon", np.array(norm.eps, dtype))
        nodes.append(_node(graph, ln, "Pow", [x, two], f"{name}/Pow"))
        if opset >= 18:
            axes = _const(model, f"{name}.axes", np.array([-1], np.int64))
            nodes.append(_node(graph, ln, "ReduceMean", [nodes[-1].outputs[0], axes], f"{name}/ReduceMean", keepdims=1))
        else:
            nodes.append(_node(graph, ln, "ReduceMean", [nodes[-1].outputs[0]], f"{name}/ReduceMean", axes=[-1],
                               keepdims=1))
        nodes.append(_node(graph, ln, "Add", [nodes[-1].outputs[0], eps], f"{name}/Add"))
        nodes.append(_node(graph, ln, "Sqrt", [nodes[-1].outputs[0]], f"{name}/Sqrt"))
        nodes.append(_node(graph, ln, "Div", [x, nodes[-1].outputs[0]], f"{name}/Div"))
        nodes.append(_node(graph, ln, "Mul", [nodes[-1].outputs[0], w], f"{name}/Mul"))
    if b is not None and np.any(model.weights.read(b) != 0):
        nodes.append(_node(graph, ln, "Add", [nodes[-1].outputs[0], b], f"{name}/AddBias"))
    out = nodes[-1].outputs[0]
    old = ln.outputs[0]
    replace_all_uses_with(old, out)
    for i, v in enumerate(graph.outputs):
        if v is old:
            graph.outputs[i] = out
    old.name = f"{out_name}.layernorm"
    graph.remove(ln, safe=True)
    out.dtype, out.shape = old.dtype, old.shape
    nodes[-1].name, out.name = name, out_name  # the graph keeps the LayerNorm's names
    for node in nodes:
        if node.outputs[0] is not out:
            node.outputs[0].name = f"{node.name}_output"
        model.tag(node, pass_name, FORMULA + f" (replaces LayerNormalization {name})")


def _drop_mean(model, norm, pass_name: str) -> None:
    """Decomposed LayerNorm: Pow and Div read x itself, so the mean and the Sub fall away."""
    x = norm.input
    sub = next(n for n in norm.nodes if n.op_type == "Sub")
    for node in norm.nodes:
        if node is sub:
            continue
        for i, value in enumerate(node.inputs):
            if value is sub.outputs[0]:
                node.replace_input_with(i, x)
                model.tag(node, pass_name, FORMULA + " (reads x, not x - mean(x))")
    if norm.bias is not None:  # a zero bias (as fold_ln leaves it) is dropped, as LayerNorm fusion would
        add, idx = norm.bias
        out = add.outputs[0]
        if not out.is_graph_output() and not np.any(model.weights.read(add.inputs[idx])):
            replace_all_uses_with(out, add.inputs[1 - idx])
