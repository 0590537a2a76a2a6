"""Split onnxruntime's fused residual norms back into the sum and the norm.

SkipLayerNormalization / SkipSimplifiedLayerNormalization (com.microsoft) add the sublayer's
output to the stream and normalise the sum in one op: the normalised output is computed inside
it, from a sum that exists outside only as its optional output 3. A change made to that output
would reach the next block's stream but not this norm's readers, so before the stream is changed
(an intervention, a steering vector) each such op becomes

    s = input + skip (+ bias)          the stream, a tensor of its own
    y = LayerNormalization(s, gamma, beta) / SimplifiedLayerNormalization(s, gamma)

The same arithmetic in two ops (onnxruntime fuses them back when nothing reads in between).
"""

from __future__ import annotations

import onnx_ir as ir

SKIP_NORMS = {"SkipLayerNormalization": "LayerNormalization",
              "SkipSimplifiedLayerNormalization": "SimplifiedLayerNormalization"}


def fused_norms(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.domain == "com.microsoft" and n.op_type in SKIP_NORMS]


def unfuse_skip_norms(graph: ir.Graph) -> tuple[int, list[str]]:
    """Split every fused residual norm; (how many were split, why the others were not)."""
    split, kept = 0, []
    for node in fused_norms(graph):
        why = _why_not(node)
        if why:
            kept.append(f"{node.name}: {why}")
            continue
        _split(graph, node)
        split += 1
    if split:
        graph.sort()
    return split, kept


def _why_not(node: ir.Node) -> str | None:
    for idx in (1, 2):
        if idx < len(node.outputs) and node.outputs[idx].uses():
            return f"its statistics output {idx} is read"
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return "it has no scale input"
    return None


def _split(graph: ir.Graph, node: ir.Node) -> None:
    x, skip, gamma = node.inputs[0], node.inputs[1], node.inputs[2]
    layernorm = node.op_type == "SkipLayerNormalization"
    beta = node.inputs[3] if layernorm and len(node.inputs) > 3 else None
    bias = node.inputs[4 if layernorm else 3] if len(node.inputs) > (4 if layernorm else 3) else None
    eps = node.attributes.get("epsilon")
    base = node.name or node.outputs[0].name
    added = ir.Node("", "Add", [x, skip], name=f"{base}/stream_sum")
    graph.insert_before(node, added)
    total = added.outputs[0]
    if bias is not None:
        with_bias = ir.Node("", "Add", [total, bias], name=f"{base}/stream_bias")
        graph.insert_before(node, with_bias)
        total = with_bias.outputs[0]
    attrs = [ir.AttrFloat32("epsilon", eps.value if eps is not None else 1e-5), ir.AttrInt64("axis", -1)]
    inputs = [total, gamma] + ([beta] if beta is not None else [])
    norm = ir.Node("", SKIP_NORMS[node.op_type], inputs, attributes=attrs, name=f"{base}/norm")
    graph.insert_before(node, norm)
    for new, old in ((norm.outputs[0], node.outputs[0]), (total, node.outputs[3] if len(node.outputs) > 3 else None)):
        if old is None:
            continue
        new.dtype, new.shape = old.dtype, old.shape
        name = old.name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name = None
        new.name = name
    for v in node.outputs:
        if v.uses():
            raise AssertionError(f"{base}: output {v.name} still read after splitting")
    graph.remove(node, safe=True)
