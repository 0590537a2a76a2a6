"""Anatomy: find the transformer in an exported graph.

Passes never walk the graph themselves; they ask this module. It returns plain data:
the norms with their roles and the linear maps that read them, the residual stream and
every term written into it (each proven to be attention, an MLP, an embedding or a
constant), the layers, the unembedding, and attention's V->O paths. Whatever it cannot
prove is left out with a reason, and the passes skip it.

Norm roles:
    reader            reads the residual stream; its output feeds linear maps (foldable)
    final             the reader before the unembedding
    sublayer_output   normalises a sublayer's output before it is added into the stream
                      (Gemma 2/3's post_attention/post_feedforward norms, OLMo 2's)
    head              inside attention, over queries or keys (Qwen3, Gemma 3, OLMo 2)
    stream            its output is the stream itself (BERT-style post-LN): a post-norm model
    other             none of these
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import onnx_ir as ir

from . import match
from .linear import LINEAR_OPS, Linear, as_linear, linear_producing
from .norms import Norm, find_norms
from .stream import TABLE_PATH_OPS, Chain, adder_of, trace
from .sublayers import attention_parts, fused_attention, fused_values, mlp_inputs, value_source

ROLE_REASONS = {
    "sublayer_output": "sublayer-output norm: it normalises a sublayer's output before the residual Add, "
                       "so no linear map reads it (kept as it is)",
    "head": "head norm: it normalises queries or keys inside attention (kept as it is, as TransformerLens keeps it)",
    "stream": "post-norm: its output is the residual stream itself",
}
FOLDABLE_ROLES = ("reader", "final")
QUANTIZED = {"MatMulNBits", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
             "QGemm", "GatherBlockQuantized"}  # int4/int8 linear maps: a fold would round differently
ATTENTION_SEARCH_LIMIT = 48  # nodes visited forward from a head norm looking for its Softmax


# -- residual stream -----------------------------------------------------------------
@dataclass(eq=False)
class Writer:
    """One term added into the residual stream."""

    kind: str  # "embed" (a table Gather) | "linear" | "bias" (a constant added on its own) | "other"
    role: str  # "embed" | "pos_embed" | "attn_out" | "mlp_out" | "bias" | "other"
    name: str
    node: ir.Node | None  # the Gather, the linear node, or the node holding the constant
    idx: int  # the input of `node` holding the table / constant
    linear: Linear | None = None
    layer: int | None = None
    blocker: str | None = None
    step: int | None = None  # which sum of the stream it enters (-1: where the stream starts)
    value: ir.Value | None = None  # the term as the stream's sum reads it
    norm: Norm | None = None  # a sublayer-output norm between the linear map and the stream
    why: str | None = None  # for role "other": why it is neither attention nor MLP


@dataclass(eq=False)
class Attention:
    """The V->O path of one attention block: softmax(...) @ V, re-laid out, read by O.

    Which of V's output columns feed which of O's input rows (heads, grouped heads,
    columns interleaved per head) is measured by `probe.value_index`, not assumed.
    """

    layer: int | None
    v: Linear
    o: Linear
    pv: ir.Node  # the probabilities @ values MatMul, or onnxruntime's fused attention op
    n_groups: int = 1  # query heads per value head, where q/k/v are separate maps
    blocker: str | None = None
    softmax: ir.Node | None = None


@dataclass(eq=False)
class Layer:
    """One transformer block, as the residual stream shows it."""

    index: int
    pre: ir.Value | None  # the stream the block starts from
    post: ir.Value | None = None  # the stream after it
    mid: ir.Value | None = None  # between attention and MLP (sequential blocks only)
    attn: Writer | None = None
    mlp: Writer | None = None
    ln1: Norm | None = None  # the norm between the stream and attention (None: attention reads it directly)
    ln2: Norm | None = None  # the same for the MLP
    parallel: bool = False  # attention and MLP read the same stream tensor


@dataclass
class Anatomy:
    norms: list[Norm]
    stream: list[ir.Value] = field(default_factory=list)  # the stream tensors in order
    writers: list[Writer] = field(default_factory=list)
    stream_blocker: str | None = None
    unembed: Linear | None = None
    unembed_blocker: str | None = None
    unembed_nonlinear: str | None = None  # why the logits are not linear in the unembedding's output
    final_norm: Norm | None = None
    post_norm: bool = False  # the stream passes through a norm (BERT, OPT-350m)
    attention: list[Attention] = field(default_factory=list)
    layers: list[Layer] = field(default_factory=list)
    layers_blocker: str | None = None
    notes: list[str] = field(default_factory=list)
    chain: Chain | None = None
    head_softmax: dict = field(default_factory=dict)  # id(head norm) -> the attention Softmax it feeds

    @property
    def d_model(self) -> int | None:
        if self.unembed is not None:
            return self.unembed.d_in
        readers = [n for n in self.norms if n.role in FOLDABLE_ROLES] or self.norms
        return readers[0].d_model if readers else None

    @property
    def stream_readers(self) -> list[Norm]:
        return [n for n in self.norms if n.role in FOLDABLE_ROLES]


def analyse(graph: ir.Graph) -> Anatomy:
    order = {id(n): i for i, n in enumerate(graph)}
    norms = sorted(find_norms(graph), key=lambda n: order[id(n.nodes[0])])
    for norm in norms:
        norm.layer = layer_of(norm.nodes[0])
        norm.readers, norm.blocker = _readers(norm)
    anatomy = Anatomy(norms=norms)
    _find_unembed(graph, anatomy)
    chain = trace(graph, norms, anatomy.unembed.d_out if anatomy.unembed else None)
    anatomy.chain = chain
    _find_stream(anatomy, chain)
    _assign_roles(anatomy, chain)
    _find_attention(anatomy)
    _find_layers(anatomy, chain)
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
        elif node.op_type in QUANTIZED:
            return [], (f"norm output feeds {node.op_type} {node.name}: a quantized map, whose weights a fold "
                        "cannot change exactly")
        else:
            return [], f"norm output feeds {node.op_type} {node.name} (not a linear map)"
    if not readers:
        return [], "norm output is not read by any linear map"
    return readers, None


# -- unembedding ---------------------------------------------------------------------
def _find_unembed(graph: ir.Graph, anatomy: Anatomy) -> None:
    outputs = [v for v in graph.outputs if v.name == "logits"] or list(graph.outputs[:1])
    if not outputs:
        anatomy.unembed_blocker = "graph has no output"
        return
    value, _ = match.back(outputs[0])
    capped = _softcap(value)
    if capped is not None:
        value, cap, _ = capped
        anatomy.unembed_nonlinear = (f"the logits are soft-capped ({cap:g} * tanh(z / {cap:g})) after the unembedding, "
                                     "so a constant shift of z is not a constant shift of the logits")
    lin = linear_producing(value)
    if lin is None:
        node = value.producer()
        what = f"{node.op_type} {node.name}" if node is not None else "a graph input"
        quantized = node is not None and node.op_type in QUANTIZED
        anatomy.unembed_blocker = (f"logits come from {what}, a quantized map, whose weights cannot be centred "
                                   "exactly" if quantized else f"logits come from {what}, not a linear map")
        return
    others = [node for node, _, _ in match.forward(lin.out)[0] if capped is None or node is not capped[2]]
    if others:
        anatomy.unembed_blocker = f"unembedding output also feeds {others[0].op_type} {others[0].name}"
        return
    anatomy.unembed = lin
    source, _ = match.back(lin.node.inputs[0])
    anatomy.final_norm = next((n for n in anatomy.norms if n.output is source), None)


def _softcap(value: ir.Value):
    """Gemma 2's logit cap, cap * tanh(z / cap): (z, cap, the node reading z) or None."""
    mul = value.producer()
    if mul is None or mul.op_type != "Mul" or len(mul.inputs) != 2:
        return None
    for idx in (0, 1):
        cap = match.const_value(mul.inputs[1 - idx])
        tanh = match.back(mul.inputs[idx], match.VALUE_NOOPS)[0].producer() if mul.inputs[idx] is not None else None
        if cap is None or cap.size != 1 or tanh is None or tanh.op_type != "Tanh":
            continue
        inner = match.back(tanh.inputs[0], match.VALUE_NOOPS)[0].producer()
        if inner is None or inner.op_type not in ("Div", "Mul") or len(inner.inputs) != 2:
            continue
        factor = match.const_value(inner.inputs[1])
        if factor is None or factor.size != 1:
            continue
        c, f = float(cap.reshape(-1)[0]), float(factor.reshape(-1)[0])
        if f == 0 or abs((f if inner.op_type == "Div" else 1.0 / f) - c) > 1e-6 * abs(c):
            continue
        return match.back(inner.inputs[0])[0], c, inner
    return None


# -- residual stream -----------------------------------------------------------------
def _find_stream(anatomy: Anatomy, chain: Chain) -> None:
    """The stream tensors and the terms written into them.

    Centring the terms is exact only when every reader of every stream tensor is a
    centring LayerNorm; anything else blocks it, with the reason.
    """
    if chain.blocker and not chain.steps:
        anatomy.stream_blocker = chain.blocker
        return
    anatomy.stream = [chain.base] + [s.after for s in chain.steps if s.after is not None]
    anatomy.post_norm = bool(chain.stream_norms)
    d_model = anatomy.d_model
    norm_of_output = {id(n.output): n for n in anatomy.norms}
    base = _embedding(chain.token, chain.base, "embed", d_model)
    base.step = -1
    writers = [base]
    for k, step in enumerate(chain.steps):
        for term in step.terms:
            writer = _writer(term, step, d_model, chain, norm_of_output)
            writer.step = k
            writers.append(writer)
    anatomy.writers = writers

    blockers = [chain.blocker] if chain.blocker else []
    if chain.stream_norms:
        blockers.append(f"post-norm: the stream passes through {chain.stream_norms[0].name}")
    chain_nodes = {id(s.node) for s in chain.steps}
    entries = {}  # entry node -> its norm, for the norms reading the stream
    for norm in anatomy.norms:
        for node in norm.entry_nodes:
            entries[id(node)] = norm
    for v in chain.values.values():
        if v.is_graph_output():
            blockers.append(f"stream tensor {v.name} is a graph output")
        for node, _ in match.value_uses(v):
            if id(node) in chain_nodes or any(id(o) in chain.values for o in node.outputs):
                continue
            norm = entries.get(id(node))
            if norm is None:
                blockers.append(f"stream tensor {v.name} also feeds {node.op_type} {node.name}")
            elif not norm.centring:
                blockers.append(f"{norm.kind} {norm.name} reads the stream and does not remove its mean")
    for step in chain.steps:
        if step.fused is not None and not step.fused.centring:
            blockers.append(f"{step.fused.kind} {step.fused.name} reads the stream and does not remove its mean")
    blockers.sort(key=lambda b: "does not remove its mean" not in b)  # the family's reason first
    anatomy.stream_blocker = blockers[0] if blockers else None


def _embedding(gather: ir.Node, value: ir.Value, role: str, d_model: int | None) -> Writer:
    table, path = match.back(gather.inputs[0], TABLE_PATH_OPS)
    writer = Writer("embed", role, table.name or gather.name, gather, 0, value=value)
    shape = match.const_shape(table)
    if any(p.op_type == "Transpose" for p in path):
        writer.blocker = f"the table is read through {path[0].op_type} {path[0].name} (the unembedding's weight)"
    elif d_model is not None and shape is not None and shape[1] != d_model:
        writer.blocker = f"table has {shape[1]} columns, not d_model={d_model}"
    return writer


def _writer(term: ir.Value, step, d_model: int | None, chain: Chain, norm_of_output: dict) -> Writer:
    source, passed = match.back(term)
    node = source.producer()
    if match.is_const(source):
        holder = adder_of(term, step) or (step.node, 0)
        writer = Writer("bias", "bias", source.name, holder[0], holder[1], value=term)
        reshaped = [p for p in passed if p.op_type != "Identity"]
        if reshaped or not match.is_const(holder[0].inputs[holder[1]]):
            writer.blocker = (f"the constant reaches the stream through {reshaped[0].op_type} {reshaped[0].name}"
                              if reshaped else "the constant is not an input of the sum")
        return writer
    if node is None:
        return Writer("other", "other", source.name, None, 0, value=term,
                      blocker=f"stream term {source.name} is a graph input, not a constant table")
    exclusive = all(len(match.value_uses(v)) == 1 and not v.is_graph_output()
                    for v in [source] + [p.outputs[0] for p in passed] if id(v) not in chain.values)
    norm = norm_of_output.get(id(source))
    if norm is not None:  # a sublayer-output norm: the term is the norm of a sublayer's output
        inner, _ = match.back(norm.input) if norm.input is not None else (None, [])
        lin = linear_producing(inner) if inner is not None else None
        if lin is None:
            return Writer("other", "other", norm.name, node, 0, value=term, norm=norm,
                          blocker=f"stream term from norm {norm.name}, which does not normalise a linear map's output")
        writer = _linear_writer(lin, term, d_model)
        writer.norm = norm
        writer.blocker = (f"it is written through sublayer-output norm {norm.name}, which sees its mean: "
                          "centring it would change what the norm computes")
        return writer
    if node.op_type == "Gather" and match.attr(node, "axis", 0) == 0 and len(match.const_shape(
            match.back(node.inputs[0], {"Identity"})[0]) or ()) == 2:
        ids, _ = match.back(node.inputs[1], match.ROW_NOOPS)
        positions = not ids.is_graph_input() or "position" in ids.name.lower()
        writer = _embedding(node, term, "pos_embed" if positions else "other", d_model)
        if not positions:
            writer.why = f"table read at graph input {ids.name}, neither tokens nor positions"
    else:
        lin = linear_producing(source)
        if lin is None:
            return Writer("other", "other", node.name, node, 0, value=term,
                          blocker=f"stream term from {node.op_type} {node.name} is not a linear writer")
        writer = _linear_writer(lin, term, d_model)
    if not exclusive and writer.blocker is None:
        writer.blocker = "its output is also read outside the residual stream"
    return writer


def _linear_writer(lin: Linear, term: ir.Value, d_model: int | None) -> Writer:
    lin.layer = layer_of(lin.node)
    parts = attention_parts(lin)
    if not isinstance(parts, str) or fused_attention(lin) is not None:
        role, why = "attn_out", None
    else:
        hidden = mlp_inputs(lin)
        role, why = ("mlp_out", None) if not isinstance(hidden, str) else ("other", f"{parts}; {hidden}")
    writer = Writer("linear", role, lin.name, lin.node, 1, linear=lin, layer=lin.layer, value=term, why=why)
    if d_model is not None and lin.d_out != d_model:
        writer.blocker = f"writes {lin.d_out} features, not d_model={d_model}"
    return writer


# -- norm roles ----------------------------------------------------------------------
def _assign_roles(anatomy: Anatomy, chain: Chain) -> None:
    stream = chain.values
    terms = {id(match.back(w.value)[0]) for w in anatomy.writers if w.value is not None}
    fused = {id(s.fused) for s in chain.steps if s.fused is not None}
    stream_norms = {id(n) for n in chain.stream_norms}
    for norm in anatomy.norms:
        if id(norm) in stream_norms:
            norm.role = "stream"
        elif id(norm) in fused or (norm.input is not None and id(match.back(norm.input)[0]) in stream):
            norm.role = "reader"
        elif id(norm.output) in terms:
            norm.role = "sublayer_output"
        elif (softmax := _softmax_after(norm)) is not None:
            norm.role = "head"
            anatomy.head_softmax[id(norm)] = softmax
        elif not stream and norm.blocker is None:
            norm.role = "reader"  # no stream traced: a norm read by linear maps only is still foldable
        else:
            norm.role = "other"
        if norm is anatomy.final_norm and norm.role == "reader":
            norm.role = "final"
        if norm.role in ROLE_REASONS:
            norm.blocker = ROLE_REASONS[norm.role]
        elif norm.role not in FOLDABLE_ROLES and norm.blocker is None:
            norm.blocker = "it does not read the residual stream"


def _softmax_after(norm: Norm) -> ir.Node | None:
    """The attention Softmax a head norm's output reaches, before any linear map."""
    if norm.input is None or linear_producing(match.back(norm.input, match.LAYOUT_OPS)[0]) is None:
        return None
    todo, seen = [norm.output], set()
    while todo and len(seen) < ATTENTION_SEARCH_LIMIT:
        value = todo.pop(0)
        if id(value) in seen:
            continue
        seen.add(id(value))
        for node, _ in match.value_uses(value):
            if node.op_type == "Softmax":
                return node
            if node.op_type in LINEAR_OPS and not isinstance(as_linear(node), str):
                continue
            todo += list(node.outputs)
    return None


# -- attention and layers ------------------------------------------------------------
def _find_attention(anatomy: Anatomy) -> None:
    """Attention blocks: a linear writer fed by softmax(...) @ V with V from a linear map."""
    for writer in anatomy.writers:
        if writer.role != "attn_out":
            continue
        o = writer.linear
        fused = fused_attention(o)
        softmax, pv = (None, fused) if fused is not None else attention_parts(o)
        path = fused_values(fused) if fused is not None else value_source(pv)
        if isinstance(path, str):
            anatomy.notes.append(f"attention {o.name}: {path}")
            continue
        lin = path.v
        lin.layer = layer_of(lin.node)
        groups = o.d_in // lin.d_out if lin.d_out < o.d_in and o.d_in % lin.d_out == 0 else 1
        anatomy.attention.append(Attention(layer=o.layer, v=lin, o=o, pv=pv, n_groups=groups, softmax=softmax))


def _find_layers(anatomy: Anatomy, chain: Chain) -> None:
    """Blocks from the order of the stream's sums: an attention step starts a block, the MLP
    step after it (or the same step: a parallel block) ends it."""
    if not chain.steps or chain.blocker:
        anatomy.layers_blocker = chain.blocker or "no residual stream was traced"
        return
    if chain.stream_norms:
        anatomy.layers_blocker = (f"post-norm model (the stream passes through {chain.stream_norms[0].name}): "
                                  "TransformerLens's hook points assume norms that read the stream")
        return
    before = [chain.base] + [s.after for s in chain.steps]  # stream tensor k comes before sum k
    position = {id(match.back(v)[0]): k for k, v in enumerate(before) if v is not None}
    by_o = {id(a.o.node): a for a in anatomy.attention}

    def reads(writer: Writer):
        """(stream position, norm in between) that a sublayer reads, or a reason."""
        if writer.role == "attn_out":
            att = by_o.get(id(writer.linear.node))
            if att is None:
                return "its values are not traced to a linear map"
            sources = [att.v]
        else:
            sources = mlp_inputs(writer.linear)
        found = set()
        for lin in sources:
            x, _ = match.back(lin.node.inputs[0])
            norm = next((n for n in anatomy.norms if n.output is x and n.role in FOLDABLE_ROLES), None)
            if norm is None:
                at = position.get(id(x))
            elif norm.input is None:  # a fused sum read by nothing else: the norm computes it itself
                at = next((k + 1 for k, s in enumerate(chain.steps) if s.fused is norm), None)
            else:
                at = position.get(id(match.back(norm.input)[0]))
            if at is None:
                return f"{lin.name} does not read the residual stream"
            found.add((at, norm))
        if len({at for at, _ in found}) != 1 or len(found) != 1:
            return "its input maps read different stream tensors or norms"
        return found.pop()

    layers: list[Layer] = []
    current: Layer | None = None
    for k, step in enumerate(chain.steps):
        terms = [w for w in anatomy.writers if w.step == k and w.kind != "bias"]
        for writer in sorted(terms, key=lambda w: w.role != "attn_out"):
            if writer.role not in ("attn_out", "mlp_out"):
                if not layers and current is None and writer.kind == "embed":
                    continue  # the embedding sum, before the first block
                anatomy.layers_blocker = (f"stream term {writer.name} (sum {k}) is neither attention nor MLP"
                                          + (f" ({writer.why})" if writer.why else ""))
                return
            found = reads(writer)
            if isinstance(found, str):
                anatomy.layers_blocker = f"{writer.role.split('_')[0]} {writer.name}: {found}"
                return
            at, norm = found
            if writer.role == "attn_out":
                if current is not None:
                    layers.append(current)
                if at != k:
                    anatomy.layers_blocker = (f"attention {writer.name} reads stream tensor {at} "
                                              f"but is added at sum {k}")
                    return
                current = Layer(len(layers), pre=before[k], post=step.after, attn=writer, ln1=norm)
                continue
            if current is None or current.mlp is not None:
                anatomy.layers_blocker = f"MLP {writer.name} (sum {k}) follows no attention block"
                return
            if at == position.get(id(match.back(current.pre)[0])):
                current.parallel = True
            elif at == k and current.post is before[k]:
                current.mid = before[k]
            else:
                anatomy.layers_blocker = (f"MLP {writer.name} reads stream tensor {at}, neither the block's "
                                          "input nor the sum after its attention")
                return
            current.mlp, current.ln2, current.post = writer, norm, step.after
            layers.append(current)
            current = None
    if current is not None:
        layers.append(current)
    if not layers:
        anatomy.layers_blocker = "no attention block adds into the residual stream"
        return
    for layer in layers:
        named = {layer_of(w.node) for w in (layer.attn, layer.mlp) if w is not None} - {None}
        if named and named != {layer.index}:
            anatomy.layers_blocker = (f"block {layer.index} of the residual stream is named layer "
                                      f"{sorted(named)} in the graph: the structure is not what it seems")
            return
    anatomy.layers = layers
    _number(anatomy)


def _number(anatomy: Anatomy) -> None:
    """Give every writer, norm and attention block the index of the block it belongs to."""
    by_o = {id(a.o.node): a for a in anatomy.attention}
    heads: dict[int, list[Norm]] = {}
    for norm in anatomy.norms:
        if norm.role == "head":
            heads.setdefault(id(anatomy.head_softmax.get(id(norm))), []).append(norm)
    for layer in anatomy.layers:
        for writer in (layer.attn, layer.mlp):
            if writer is None:
                continue
            writer.layer = writer.linear.layer = layer.index
            if writer.norm is not None:
                writer.norm.layer = layer.index
        for norm in (layer.ln1, layer.ln2):
            if norm is not None:
                norm.layer = layer.index
                for r in norm.readers:
                    r.layer = layer.index
        att = by_o.get(id(layer.attn.linear.node)) if layer.attn is not None else None
        if att is not None:
            att.layer = att.v.layer = layer.index
            for norm in heads.get(id(att.softmax), []):
                norm.layer = layer.index
    if anatomy.final_norm is not None:
        anatomy.final_norm.layer = None


_LAYER = re.compile(r"(?:^|[./_])(?:h|layers|layer|blocks|block|decoder_layers)[._](\d+)(?:[./_]|$)")


def layer_of(node: ir.Node) -> int | None:
    """Layer index from a TorchScript node name or dynamo's name-scope metadata."""
    for text in (node.name or "", node.metadata_props.get("pkg.torch.onnx.name_scopes", "")):
        found = _LAYER.findall(text)
        if found:
            return int(found[-1])
    return None


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
    if any(w.kind == "linear" for w in anatomy.writers):
        return None  # a linear map writes into a traced residual stream
    for norm in anatomy.norms:
        if norm.input is None:
            continue
        node = match.back(norm.input)[0].producer()
        if node is not None and node.op_type == "Add" and not any(match.is_const(v) for v in node.inputs):
            return None
    return "no residual stream (no norm reads a sum of computed terms)"
