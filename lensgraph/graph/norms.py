"""Norm forms: find each LayerNorm / RMSNorm in the graph, whatever shape it was exported in.

    fused         LayerNormalization(X, scale, bias), axis -1
    decomposed    X ─┬─ ReduceMean ─┐
                     └──────────── Sub ─┬─ Pow(2) ─ ReduceMean ─ Add(eps) ─ Sqrt ─┐
                                        └────────────────────────────────────── Div ─ Mul(scale) ─ Add(bias)
    RMSNormalization(X, scale)   (opset 23), SimplifiedLayerNormalization (onnxruntime)
    SkipLayerNormalization(x, skip, scale, bias, sum_bias) / SkipSimplifiedLayerNormalization
                  (onnxruntime's fusion of the residual Add with the next norm: output 0 is
                  the normalised sum, output 3 the sum itself, i.e. the residual stream)
    decomposed RMS  X ─┬─ Pow(2) ─ ReduceMean ─ Add(eps) ─ Sqrt ─ Reciprocal | Div(1, .) ─┐
                       └────────────────────────────────────────────────────────────── Mul ─ [Cast] ─ Mul(scale)
                    (or Div(X, Sqrt) directly; Gemma's scale is already 1 + w)

Each match gives the tensor normalised, the output after scale and bias, where the
scale and bias constants sit (node, input index), and the nodes that read the input
(those are what make a stream tensor "read by a centring norm").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from . import match


@dataclass(eq=False)
class Norm:
    name: str
    kind: str  # "layernorm" | "rmsnorm"
    form: str  # the op it was exported as, or "decomposed"
    input: ir.Value | None  # the stream tensor it normalises (None: a fused sum nobody else reads)
    output: ir.Value
    entry_nodes: list[ir.Node]
    nodes: list[ir.Node]
    d_model: int
    eps: float | None
    scale: tuple[ir.Node, int] | None = None
    bias: tuple[ir.Node, int] | None = None
    layer: int | None = None
    readers: list = field(default_factory=list)
    blocker: str | None = None
    terms: list = field(default_factory=list)  # fused residual sum (Skip*Normalization): its addends
    sum_bias: tuple[ir.Node, int] | None = None  # and the constant it adds
    role: str | None = None  # its place in the model (anatomy.py): reader, final, sublayer_output, head, ...

    @property
    def centring(self) -> bool:
        return self.kind == "layernorm"


def find_norms(graph: ir.Graph) -> list[Norm]:
    norms = []
    for node in graph:
        if node.domain == "com.microsoft" and node.op_type in SKIP_FORMS:
            norm = _skip_norm(node)
        elif node.domain != "":
            continue
        elif node.op_type == "LayerNormalization":
            norm = _fused_layernorm(node)
        elif node.op_type in ("RMSNormalization", "SimplifiedLayerNormalization"):
            norm = _fused_rmsnorm(node)
        elif node.op_type == "Div":
            norm = _decomposed_layernorm(node)
        elif node.op_type == "Sqrt":
            norm = _decomposed_rmsnorm(node)
        else:
            norm = None
        if norm is not None:
            norms.append(norm)
    return norms


SKIP_FORMS = {"SkipLayerNormalization": "layernorm", "SkipSimplifiedLayerNormalization": "rmsnorm"}


def _skip_norm(node: ir.Node) -> Norm | None:
    kind = SKIP_FORMS[node.op_type]
    if any(out.uses() for out in node.outputs[1:3]) or len(node.inputs) < 3:
        return None
    scale = _vector(node.inputs[2])
    if scale is None:
        return None
    inputs = list(node.inputs) + [None] * 5
    bias_idx, sum_bias_idx = (3, 4) if kind == "layernorm" else (None, 3)
    for idx in (bias_idx, sum_bias_idx):
        if idx is not None and inputs[idx] is not None and _vector(inputs[idx]) is None:
            return None
    total = node.outputs[3] if len(node.outputs) > 3 and node.outputs[3].name else None
    return _fused(node, kind, total, scale, 2,
                  bias=(node, bias_idx) if bias_idx is not None and inputs[bias_idx] is not None else None,
                  terms=[node.inputs[0], node.inputs[1]],
                  sum_bias=(node, sum_bias_idx) if inputs[sum_bias_idx] is not None else None)


def _fused(node: ir.Node, kind: str, x: ir.Value | None, scale: np.ndarray, scale_idx: int, **more) -> Norm:
    """A norm computed by one node, its scale at input `scale_idx`."""
    return Norm(name=node.name or node.outputs[0].name, kind=kind, form=node.op_type, input=x,
                output=node.outputs[0], entry_nodes=[node], nodes=[node], d_model=int(scale.size),
                eps=float(match.attr(node, "epsilon", 1e-5)), scale=(node, scale_idx), **more)


def _vector(value: ir.Value | None) -> np.ndarray | None:
    arr = match.const_value(value)
    return None if arr is None else np.asarray(arr)


def _fused_layernorm(node: ir.Node) -> Norm | None:
    x = node.inputs[0]
    if match.attr(node, "axis", -1) != -1 and not match.is_last_axis([match.attr(node, "axis")], x):
        return None
    if any(out.uses() for out in node.outputs[1:]):
        return None  # mean / inv-std outputs are read: not a plain norm
    scale = _vector(node.inputs[1])
    if scale is None:
        return None
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    if has_bias and _vector(node.inputs[2]) is None:
        return None
    return _fused(node, "layernorm", x, scale, 1, bias=(node, 2) if has_bias else None)


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op and node.domain == "" else None


def _mean_last(node: ir.Node | None) -> bool:
    return (
        node is not None
        and node.op_type == "ReduceMean"
        and match.attr(node, "keepdims", 1) == 1
        and match.is_last_axis(match.reduce_axes(node), node.inputs[0])
    )


def _decomposed_layernorm(div: ir.Node) -> Norm | None:
    centred, denom = div.inputs[0], div.inputs[1]
    sub = _producer(centred, "Sub")
    sqrt = _producer(denom, "Sqrt")
    if sub is None or sqrt is None:
        return None
    x = sub.inputs[0]
    mean = sub.inputs[1].producer() if sub.inputs[1] is not None else None
    if not _mean_last(mean) or mean.inputs[0] is not x:
        return None
    core = _root_mean_square(sqrt)
    if core is None or core[0].inputs[0] is not centred:
        return None
    power, var, add_eps, eps = core
    nodes = [mean, sub, power, var, add_eps, sqrt, div]
    return _decomposed("layernorm", _scope(sub.name) or div.name, x, div.outputs[0], nodes, (mean, sub), eps)


def _decomposed(kind: str, name: str, x: ir.Value, normalised: ir.Value, nodes: list, entry: tuple,
                eps) -> Norm | None:
    """A decomposed norm, from the tensor it normalises and its normalised tensor: the scale (and a
    LayerNorm's bias) applied after it complete the match."""
    out, scale, bias, d_model = _scale_and_bias(normalised, nodes, _last_dim(x), with_bias=kind == "layernorm")
    if d_model is None:
        return None
    return Norm(name=name, kind=kind, form="decomposed", input=x, output=out,
                entry_nodes=[u.node for u in x.uses() if u.node in entry], nodes=nodes, d_model=d_model,
                eps=float(np.asarray(eps).reshape(-1)[0]), scale=scale, bias=bias)


def _scale_and_bias(out: ir.Value, nodes: list, d_model, with_bias: bool):
    """The optional Mul(scale) and Add(bias) after a normaliser (through a float Cast)."""
    scale = bias = None
    step = match.single_use(out)
    if step is not None and step[0].op_type == "Cast" and match.is_noop(step[0]):
        cast = step[0]
        later = match.single_use(cast.outputs[0])
        if later is not None and later[0].op_type == "Mul":
            nodes.append(cast)
            out, step = cast.outputs[0], later
    if step is not None and step[0].op_type == "Mul":
        mul, idx = step
        w = _vector(match.other_input(mul, idx))
        if w is not None and w.ndim >= 1 and w.size == w.shape[-1] and (d_model is None or w.size == d_model):
            scale, out, d_model = (mul, 1 - idx), mul.outputs[0], int(w.size)
            nodes.append(mul)
            step = match.single_use(out)
            if with_bias and step is not None and step[0].op_type == "Add":
                add, idx = step
                b = _vector(match.other_input(add, idx))
                if b is not None and b.ndim >= 1 and b.size == d_model:
                    bias, out = (add, 1 - idx), add.outputs[0]
                    nodes.append(add)
    return out, scale, bias, d_model


def _fused_rmsnorm(node: ir.Node) -> Norm | None:
    x = node.inputs[0]
    if match.attr(node, "axis", -1) != -1 and not match.is_last_axis([match.attr(node, "axis")], x):
        return None
    scale = _vector(node.inputs[1])
    if scale is None:
        return None
    return _fused(node, "rmsnorm", x, scale, 1)


def _root_mean_square(sqrt: ir.Node):
    """Sqrt(ReduceMean(Pow(v, 2), last axis) + eps): (Pow, ReduceMean, Add, eps) or None."""
    add_eps = _producer(sqrt.inputs[0], "Add")
    if add_eps is None:
        return None
    var_idx = 0 if match.const_value(add_eps.inputs[1]) is not None else 1
    eps = match.const_value(add_eps.inputs[1 - var_idx])
    var = add_eps.inputs[var_idx].producer()
    if eps is None or not _mean_last(var):
        return None
    power = _producer(var.inputs[0], "Pow")
    if power is None:
        return None
    exponent = match.const_value(power.inputs[1])
    if exponent is None or float(np.asarray(exponent).reshape(-1)[0]) != 2.0:
        return None
    return power, var, add_eps, eps


def _decomposed_rmsnorm(sqrt: ir.Node) -> Norm | None:
    core = _root_mean_square(sqrt)
    if core is None:
        return None
    power, var, add_eps, eps = core
    x = power.inputs[0]
    if _producer(x, "Sub") is not None:
        return None  # the mean was removed first: a LayerNorm, matched from its Div
    nodes = [power, var, add_eps, sqrt]
    normalised = None
    uses = match.value_uses(sqrt.outputs[0])
    if len(uses) != 1:
        return None
    step, idx = uses[0]
    if step.op_type == "Div" and idx == 1 and step.inputs[0] is x:
        normalised = step
    else:
        if step.op_type == "Reciprocal":
            inv = step
        elif step.op_type == "Div" and idx == 1:
            one = match.const_value(step.inputs[0])
            if one is None or one.size != 1 or float(one.reshape(-1)[0]) != 1.0:
                return None
            inv = step
        else:
            return None
        nodes.append(inv)
        use = match.single_use(inv.outputs[0])
        if use is None or use[0].op_type != "Mul" or match.other_input(*use) is not x:
            return None
        normalised = use[0]
    nodes.append(normalised)
    return _decomposed("rmsnorm", _scope(sqrt.name) or sqrt.name, x, normalised.outputs[0], nodes,
                       (power, normalised), eps)


def _last_dim(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or len(shape) == 0 or not isinstance(shape[-1], int):
        return None
    return int(shape[-1])


def _scope(name: str | None) -> str | None:
    """'/transformer/h.0/ln_1/Sub' -> '/transformer/h.0/ln_1' (TorchScript module paths)."""
    if name and "/" in name:
        return name.rsplit("/", 1)[0]
    return name
