"""The residual stream, traced forward from the token embedding.

    tokens ─ Gather(W_E) [─ Mul(scale)] = s0 ─ Add ─ s1 ─ Add ─ s2 ─ ... ─ s_n ─ final norm ─ unembed
                                              │          │
                                         pos table    term(s)     each Add reads the stream and the
                                                                  terms of one step (a sum of terms
                                                                  in a parallel block)

Each stream tensor is read by the next sum (an Add, or a Skip*Normalization that fuses the
sum with the next norm) and by whatever reads the stream (norms, or linear maps directly).
A norm whose output is the stream (BERT-style post-LN) carries it on. Which side of a sum
is the stream is never guessed: it is the tensor the walk arrived on. Order along this
chain is structure, not graph order, so layers are counted from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from . import match
from .linear import linear_producing
from .norms import Norm

SCALE_OPS = {"Mul"}  # a constant scalar applied to the embedding (Gemma's sqrt(d_model))
TABLE_PATH_OPS = {"Identity", "Transpose"}  # onnxruntime-genai reads a tied table as the unembedding's weight transposed


@dataclass(eq=False)
class Step:
    """One sum of the residual stream: after = before + the terms."""

    before: ir.Value
    after: ir.Value | None  # None: the sum exists only inside a fused norm
    node: ir.Node  # the Add, or the Skip*Normalization computing the sum
    terms: list[ir.Value]  # the addends that are not the stream, as the sum reads them
    fused: Norm | None = None  # the Skip*Normalization, when the sum is fused into a norm


@dataclass
class Chain:
    token: ir.Node | None = None  # the token-embedding Gather
    base: ir.Value | None = None  # where the stream starts: the token embedding (scaled, if the model scales it)
    steps: list[Step] = field(default_factory=list)
    stream_norms: list[Norm] = field(default_factory=list)  # norms whose output is the stream
    values: dict[int, ir.Value] = field(default_factory=dict)  # every stream tensor and its no-op copies
    blocker: str | None = None


def trace(graph: ir.Graph, norms: list[Norm], vocab: int | None) -> Chain:
    token, why = token_embedding(graph, vocab)
    if token is None:
        return Chain(blocker=why)
    chain = Chain(token=token, base=_scaled(token.outputs[0]))
    fused = {id(n.nodes[0]): n for n in norms if n.terms}
    by_entry = {id(node): n for n in norms for node in n.entry_nodes}
    outputs = {id(n.output) for n in norms}
    stream = chain.base
    while stream is not None:
        if id(stream) in chain.values:
            chain.blocker = f"the residual stream loops back to {stream.name}"
            break
        uses = _copies(stream, chain.values)
        sums = [(node, idx) for node, idx, _ in uses if _is_sum(node, idx, fused)]
        if len(sums) > 1:
            names = ", ".join(node.name or node.op_type for node, _ in sums)
            chain.blocker = f"stream tensor {stream.name} is added into {len(sums)} sums ({names})"
            break
        if sums:
            node, idx = sums[0]
            norm = fused.get(id(node))
            other = node.inputs[1 - idx]
            terms = _terms(other, outputs)
            if norm is not None and norm.sum_bias is not None:
                terms.append(node.inputs[norm.sum_bias[1]])
            after = norm.input if norm is not None else node.outputs[0]
            chain.steps.append(Step(stream, after, node, terms, norm))
            stream = after
            continue
        carriers = {id(by_entry[id(node)]): by_entry[id(node)] for node, _, _ in uses if id(node) in by_entry}
        onward = [n for n in carriers.values()
                  if any(_is_sum(node, idx, fused) for node, idx, _ in match.forward(n.output)[0])]
        if len(onward) != 1:
            break
        chain.stream_norms.append(onward[0])
        stream = onward[0].output
    return chain


def token_embedding(graph: ir.Graph, vocab: int | None) -> tuple[ir.Node | None, str | None]:
    """The Gather reading the token-embedding table at the token ids (a graph input).

    A table read at a `position_ids` input is a position table; where several tables are
    read at graph inputs, the token table is the one with a row per vocabulary entry.
    """
    found = []
    for node in graph:
        if node.op_type != "Gather" or node.domain != "" or match.attr(node, "axis", 0) != 0:
            continue
        shape = match.const_shape(match.back(node.inputs[0], TABLE_PATH_OPS)[0])
        ids, _ = match.back(node.inputs[1], match.ROW_NOOPS)
        if shape is None or len(shape) != 2 or not ids.is_graph_input():
            continue
        if any(word in ids.name.lower() for word in ("position", "type", "mask")):
            continue
        found.append((node, shape))
    if len(found) > 1 and vocab:
        found = [(node, shape) for node, shape in found if shape[0] == vocab]
    if not found:
        return None, "no embedding table is read at the token ids"
    if len(found) > 1:
        return None, f"{len(found)} embedding tables are read at the token ids"
    return found[0][0], None


def _scaled(value: ir.Value) -> ir.Value:
    """The embedding as it enters the stream: after a constant scalar factor, if any (seen
    through casts, which are not themselves taken as the start)."""
    start = value
    while True:
        use = match.single_use(value)
        if use is None:
            return start
        node, idx = use
        if match.is_noop(node) and idx == 0:
            value = node.outputs[0]
        elif node.op_type in SCALE_OPS and node.domain == "" and len(node.inputs) == 2:
            factor = match.const_value(match.other_input(node, idx))
            if factor is None or factor.size != 1:
                return start
            value = start = node.outputs[0]
        else:
            return start


def _copies(value: ir.Value, seen: dict) -> list[tuple[ir.Node, int, ir.Value]]:
    """The uses of a stream tensor and of its no-op copies; records every copy as a stream value."""
    seen[id(value)] = value
    uses, _ = match.forward(value)
    todo = [value]
    while todo:  # the copies themselves, for `values`
        v = todo.pop()
        for node, idx in match.value_uses(v):
            if idx == 0 and match.is_noop(node) and id(node.outputs[0]) not in seen:
                seen[id(node.outputs[0])] = node.outputs[0]
                todo.append(node.outputs[0])
    return uses


def _is_sum(node: ir.Node, idx: int, fused: dict) -> bool:
    if id(node) in fused:
        return idx in (0, 1)
    return node.op_type == "Add" and node.domain == "" and len(node.inputs) == 2 and node.inputs[1 - idx] is not None


def _terms(value: ir.Value, norm_outputs: set) -> list[ir.Value]:
    """The leaves of a sum of terms (a parallel block adds attention and MLP together first)."""
    source, _ = match.back(value)
    node = source.producer()
    if (node is not None and node.op_type == "Add" and node.domain == "" and len(node.inputs) == 2
            and id(source) not in norm_outputs and linear_producing(source) is None
            and not any(match.is_const(v) for v in node.inputs)):
        return _terms(node.inputs[0], norm_outputs) + _terms(node.inputs[1], norm_outputs)
    return [value]


def adder_of(value: ir.Value, step: Step) -> tuple[ir.Node, int] | None:
    """The node and input index through which a term enters the sum."""
    if step.fused is not None and step.fused.sum_bias is not None and value is step.node.inputs[step.fused.sum_bias[1]]:
        return step.fused.sum_bias
    for node, idx in match.value_uses(value):
        if node is step.node or (node.op_type == "Add" and node.domain == ""):
            return node, idx
    return None
