"""Anatomy: find the transformer in an exported graph.

Passes never walk the graph themselves; they ask this module. It returns plain data:
the norms and the linear maps that read them, the residual stream and every term
written into it, the unembedding, and attention's V->O paths. Whatever it cannot
prove is left out with a reason, and the passes skip it.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field

import onnx_ir as ir

from . import match
from .norms import Norm, find_norms

LINEAR_OPS = {"MatMul", "Gemm"}
WEIGHT_PATH_OPS = {"Identity", "Cast", "Transpose"}
LAYOUT_OPS = match.ROW_NOOPS | {"Transpose"}
BIAS_ACTIVATIONS = {"FastGelu", "BiasGelu"}  # onnxruntime ops computing act(x + bias)


# -- linear maps -------------------------------------------------------------------------
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


# -- residual stream -----------------------------------------------------------------
@dataclass(eq=False)
class Writer:
    """One term added into the residual stream."""

    kind: str  # "embed" (a table Gather) | "linear" | "bias" (a constant added on its own)
    role: str  # "embed" | "pos_embed" | "attn_out" | "mlp_out" | "bias"
    name: str
    node: ir.Node  # the Gather, the linear node, or the Add holding the constant
    idx: int  # the input of `node` holding the table / constant
    linear: Linear | None = None
    layer: int | None = None
    blocker: str | None = None
    step: int | None = None  # which stream tensor it is added into (same step: parallel block)


@dataclass(eq=False)
class Attention:
    """The V->O path of one attention block: softmax(...) @ V, re-laid out, read by O.

    Which of V's output columns feed which of O's input rows (heads, grouped heads,
    columns interleaved per head) is measured by `probe.value_index`, not assumed.
    """

    layer: int | None
    v: Linear
    o: Linear
    pv: ir.Node  # the probabilities @ values MatMul
    n_groups: int = 1  # query heads per value head, where q/k/v are separate maps
    blocker: str | None = None


@dataclass
class Anatomy:
    norms: list[Norm]
    stream: list[ir.Value] = field(default_factory=list)
    writers: list[Writer] = field(default_factory=list)
    stream_blocker: str | None = None
    unembed: Linear | None = None
    unembed_blocker: str | None = None
    final_norm: Norm | None = None
    post_norm: bool = False  # a norm's output is a term of the residual stream (BERT, OPT-350m)
    attention: list[Attention] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def d_model(self) -> int | None:
        return self.norms[0].d_model if self.norms else None


def analyse(graph: ir.Graph) -> Anatomy:
    order = {id(n): i for i, n in enumerate(graph)}
    norms = sorted(find_norms(graph), key=lambda n: order[id(n.nodes[0])])
    for norm in norms:
        norm.layer = layer_of(norm.nodes[0])
        norm.readers, norm.blocker = _readers(norm)
    anatomy = Anatomy(norms=norms)
    _find_unembed(graph, anatomy)
    _find_stream(anatomy, order)
    _find_attention(anatomy)
    _number_layers(anatomy, order)
    return anatomy


def _readers(norm: Norm) -> tuple[list[Linear], str | None]:
    uses, reaches_output = match.forward(norm.output)
    if reaches_output:
        return [], "norm output is a graph output"
    readers, seen = [], set()
    for node, idx, _ in uses:
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in LINEAR_OPS and idx == 0:
            lin = as_linear(node)
            if isinstance(lin, str):
                return [], f"reader {node.name}: {lin}"
            if lin.d_in != norm.d_model:
                return [], f"reader {node.name} reads {lin.d_in} features, not d_model={norm.d_model}"
            lin.layer = layer_of(node)
            readers.append(lin)
        elif node.op_type == "Add":
            return [], f"norm output feeds Add {node.name} (post-norm residual, not a linear map)"
        else:
            return [], f"norm output feeds {node.op_type} {node.name} (not a linear map)"
    if not readers:
        return [], "norm output is not read by any linear map"
    return readers, None


def _find_unembed(graph: ir.Graph, anatomy: Anatomy) -> None:
    outputs = [v for v in graph.outputs if v.name == "logits"] or list(graph.outputs[:1])
    if not outputs:
        anatomy.unembed_blocker = "graph has no output"
        return
    value, _ = match.back(outputs[0])
    lin = linear_producing(value)
    if lin is None:
        node = value.producer()
        what = f"{node.op_type} {node.name}" if node is not None else "a graph input"
        anatomy.unembed_blocker = f"logits come from {what}, not a linear map"
        return
    uses, _ = match.forward(lin.out)
    if uses:
        anatomy.unembed_blocker = f"unembedding output also feeds {uses[0][0].op_type} {uses[0][0].name}"
        return
    anatomy.unembed = lin
    source, _ = match.back(lin.node.inputs[0])
    anatomy.final_norm = next((n for n in anatomy.norms if n.output is source), None)


def _find_stream(anatomy: Anatomy, order: dict) -> None:
    """Split each norm's input into the terms summed into it.

    Stream tensors are the norm inputs. Each is a tree of Adds whose leaves are either
    an earlier stream tensor or a term: a linear map's output, an embedding Gather, or
    a constant. Centring those terms is exact only when every reader of every stream
    tensor is a centring LayerNorm; anything else blocks it, with the reason.
    """
    norms = anatomy.norms
    if not norms:
        return
    roots: dict[int, ir.Value] = {}
    sums: dict[int, ir.Value] = {}  # every value that is (a copy of) a partial stream sum
    fused = {id(n.nodes[0]): n for n in norms if n.terms}  # Skip*Normalization: sum and norm in one
    for norm in norms:
        if norm.input is None:
            continue
        root, passed = match.back(norm.input)
        roots.setdefault(id(root), root)
        for v in [norm.input] + [p.inputs[0] for p in passed]:
            sums[id(v)] = v  # copies of the stream on the way to the norm (Cast, 2-D Reshape)
    anatomy.stream = sorted(roots.values(), key=lambda v: order.get(id(v.producer()), -1))
    leaves: list[ir.Value] = []
    fused_biases: list[Writer] = []
    norm_outputs = {id(n.output) for n in norms}

    def walk(value: ir.Value, root: ir.Value | None) -> None:
        source, passed = match.back(value)
        chain = [value] + [p.inputs[0] for p in passed]
        for v in chain:
            sums[id(v)] = v
        if source is not root and id(source) in roots:
            return
        node = source.producer()
        if node is not None and id(node) in fused and source is fused[id(node)].input:
            expand(fused[id(node)], root)
            return
        is_sum = node is not None and node.op_type == "Add" and node.domain == "" and len(node.inputs) == 2
        if is_sum and id(source) not in norm_outputs:  # a decomposed norm ends in its bias Add
            walk(node.inputs[0], root)
            walk(node.inputs[1], root)
        else:
            leaves.append(value)
            step[id(value)] = len(done)

    def expand(norm, root) -> None:
        """The addends of a fused residual sum, and its constant."""
        for term in norm.terms:
            walk(term, root)
        if norm.sum_bias is not None:
            node, idx = norm.sum_bias
            fused_biases.append(Writer("bias", "bias", node.inputs[idx].name, node, idx, step=len(done)))

    step: dict[int, int] = {}  # leaf -> index of the stream tensor it is first added into
    done: list = []
    for root in anatomy.stream:
        walk(root, root)
        done.append(root)
    for norm in norms:
        if norm.terms and norm.input is None:  # a fused sum read by nothing else (the last one)
            expand(norm, None)
            done.append(norm)
    anatomy.post_norm = any(id(match.back(leaf)[0]) in norm_outputs for leaf in leaves)

    blockers = []
    centring_entries = {id(n) for norm in norms if norm.centring for n in norm.entry_nodes}
    for norm in norms:
        if not norm.centring:
            blockers.append(f"{norm.kind} {norm.name} reads the stream and does not remove its mean")
    for v in sums.values():
        if v.is_graph_output():
            blockers.append(f"stream tensor {v.name} is a graph output")
        for node, _ in match.value_uses(v):
            if id(node) in centring_entries or any(id(o) in sums for o in node.outputs):
                continue
            blockers.append(f"stream tensor {v.name} also feeds {node.op_type} {node.name}")
    anatomy.stream_blocker = blockers[0] if blockers else None

    linear_biases = set()
    for leaf in leaves:
        writer = _writer(leaf, anatomy.d_model, sums)
        if writer is None:
            continue
        writer.step = step.get(id(leaf))
        if writer.linear is not None and writer.linear.bias is not None:
            linear_biases.add(id(writer.linear.bias[0]))
        anatomy.writers.append(writer)
    anatomy.writers = [
        w for w in anatomy.writers if not (w.kind == "bias" and id(w.node) in linear_biases)
    ] + fused_biases
    for w in anatomy.writers:
        if w.blocker and not anatomy.stream_blocker and w.kind == "other":
            anatomy.stream_blocker = w.blocker


def _writer(leaf: ir.Value, d_model: int | None, sums: dict) -> Writer | None:
    source, passed = match.back(leaf)
    exclusive = all(
        len(match.value_uses(v)) == 1 and not v.is_graph_output()
        for v in [source] + [p.outputs[0] for p in passed]
        if id(v) not in sums
    )
    node = source.producer()
    add_use = [(n, i) for n, i in match.value_uses(leaf) if id(n.outputs[0]) in sums]
    if match.is_const(source):
        if not add_use:
            return None
        add, idx = add_use[0]
        return Writer("bias", "bias", source.name, add, idx)
    if node is None:
        return Writer("other", "other", source.name, add_use[0][0] if add_use else None, 0,
                      blocker=f"stream term {source.name} is a graph input, not a constant table")
    writer = None
    if node.op_type == "Mul" and len(node.inputs) == 2:
        for idx in (0, 1):
            factor = match.const_value(node.inputs[1 - idx])
            inner = match.back(node.inputs[idx])[0].producer() if node.inputs[idx] is not None else None
            if factor is not None and factor.size == 1 and inner is not None and inner.op_type == "Gather":
                node = inner  # a scaled embedding: centring commutes with the scalar
                break
    if node.op_type in LINEAR_OPS:
        lin = as_linear(node)
        if isinstance(lin, Linear):
            lin.layer = layer_of(node)
            writer = Writer("linear", "mlp_out", lin.name, node, 1, linear=lin, layer=lin.layer)
            if d_model is not None and lin.d_out != d_model:
                writer.blocker = f"writes {lin.d_out} features, not d_model={d_model}"
    elif node.op_type == "Gather" and match.attr(node, "axis", 0) == 0:
        table, _ = match.back(node.inputs[0], {"Identity"})
        shape = match.const_shape(table)
        if shape is not None and len(shape) == 2:
            ids, _ = match.back(node.inputs[1], match.ROW_NOOPS | {"Unsqueeze"})
            role = "embed" if ids.is_graph_input() else "pos_embed"
            writer = Writer("embed", role, table.name or node.name, node, 0, layer=None)
            if d_model is not None and shape[1] != d_model:
                writer.blocker = f"table has {shape[1]} columns, not d_model={d_model}"
    if writer is None:
        return Writer("other", "other", node.name, node, 0,
                      blocker=f"stream term from {node.op_type} {node.name} is not a linear writer")
    if not exclusive and writer.blocker is None:
        writer.blocker = "its output is also read outside the residual stream"
    return writer


def _find_attention(anatomy: Anatomy) -> None:
    """Attention blocks: a linear writer fed by softmax(...) @ V with V from a linear map."""
    for writer in anatomy.writers:
        if writer.kind != "linear":
            continue
        o = writer.linear
        x, _ = match.back(o.node.inputs[0], LAYOUT_OPS)
        pv = x.producer()
        if pv is None or pv.op_type != "MatMul" or match.is_const(pv.inputs[1]):
            continue
        probs, _ = match.back(pv.inputs[0], match.VALUE_NOOPS)
        if probs.producer() is None or probs.producer().op_type != "Softmax":
            continue
        writer.role = "attn_out"
        att = _value_source(pv, o)
        if isinstance(att, Attention):
            anatomy.attention.append(att)
        else:
            anatomy.notes.append(f"attention {o.name}: {att}")


VALUE_PATH_OPS = LAYOUT_OPS | {"Expand", "Slice", "Split"}


def _value_source(pv: ir.Node, o: Linear) -> Attention | str:
    """Walk from the attention product back to the linear map that makes the values."""
    v, passed = match.back(pv.inputs[1], VALUE_PATH_OPS)
    node = v.producer()
    while node is not None and node.op_type == "Concat":  # a KV cache: past values ++ new values
        live = [i for i in node.inputs if i is not None and not match.back(i)[0].is_graph_input()]
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
    # Everything between the values' own slice and the product must serve only this product
    # (a KV-cache output may also read it).
    for node in passed:
        if node.op_type in ("Slice", "Split"):
            break
        if any(n is not pv and n not in passed for n, _ in match.value_uses(node.outputs[0])):
            return f"values at {node.name} are also read outside the attention product"
    lin.layer = layer_of(lin.node)
    groups = o.d_in // lin.d_out if lin.d_out < o.d_in and o.d_in % lin.d_out == 0 else 1
    return Attention(layer=o.layer, v=lin, o=o, pv=pv, n_groups=groups)


# -- layers --------------------------------------------------------------------------
_LAYER = re.compile(r"(?:^|[./_])(?:h|layers|layer|blocks|block|decoder_layers)[._](\d+)(?:[./_]|$)")


def layer_of(node: ir.Node) -> int | None:
    """Layer index from a TorchScript node name or dynamo's name-scope metadata."""
    for text in (node.name or "", node.metadata_props.get("pkg.torch.onnx.name_scopes", "")):
        found = _LAYER.findall(text)
        if found:
            return int(found[-1])
    return None


def _number_layers(anatomy: Anatomy, order: dict) -> None:
    """Where names and metadata give no layer, number the blocks by graph order.

    Attention blocks are numbered in order; a norm read by an attention block's value map
    gets that block's layer; any other norm or writer belongs to the last attention block
    before it (its MLP half). The final norm has no layer.
    """
    named = [n.layer for n in anatomy.norms if n is not anatomy.final_norm] + [a.layer for a in anatomy.attention]
    if all(layer is not None for layer in named):
        return
    blocks = sorted(anatomy.attention, key=lambda a: order[id(a.o.node)])
    starts = [order[id(a.o.node)] for a in blocks]
    for i, att in enumerate(blocks):
        att.layer = att.o.layer = att.v.layer = i

    def after_attention(node) -> int:
        return max(bisect.bisect_left(starts, order[id(node)]) - 1, 0)

    by_v = {id(a.v.node): a.layer for a in blocks}
    for norm in anatomy.norms:
        if norm is anatomy.final_norm:
            norm.layer = None
            continue
        layers = [by_v[id(r.node)] for r in norm.readers if id(r.node) in by_v]
        norm.layer = layers[0] if layers else after_attention(norm.nodes[0])
        for r in norm.readers:
            r.layer = norm.layer
    for writer in anatomy.writers:
        if writer.kind == "linear":
            att = next((a for a in blocks if a.o is writer.linear or a.o.node is writer.node), None)
            writer.layer = writer.linear.layer = att.layer if att else after_attention(writer.node)


def nothing_to_rewrite(anatomy: Anatomy) -> str | None:
    """Why the graph is not a transformer whose weights lensgraph processes; None if it is.

    The passes are exact only on a residual stream read through norms. An MLP or a CNN
    has neither, and centring its outputs, say, would still pass verification (which
    compares logits up to a constant) while changing what the model means.
    """
    if not anatomy.norms:
        return "no LayerNorm or RMSNorm found"
    if any(n.terms for n in anatomy.norms):
        return None  # onnxruntime fused the residual sums into the norms
    for value in anatomy.stream:
        node = match.back(value)[0].producer()
        if node is not None and node.op_type == "Add" and not any(match.is_const(v) for v in node.inputs):
            return None
    return "no residual stream (no norm reads a sum of computed terms)"
