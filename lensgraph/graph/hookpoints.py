"""Where TransformerLens's hook points sit in an exported graph.

Placement reads the anatomy's blocks, found from the residual stream's structure (anatomy.py):
each point is a tensor of the graph plus the small reshaping that gives it TransformerLens's
layout, or it is absent with the reason, never placed on a guess.

    hook_embed     the token embedding as it enters the stream (scaled, where the model scales it)
    hook_pos_embed the learned position table's rows, whatever computes the positions
    resid_pre[l]   the stream before block l          resid_mid[l]  between its attention and MLP
    resid_post[l]  the stream after block l (= resid_pre[l+1])
    attn_out[l], mlp_out[l]   exactly what the sublayer adds into the stream (after its bias, and
                   after a sublayer-output norm)
    pattern[l]     Softmax output [batch, head, query, key]
    z[l]           per-head attention output [batch, pos, head, d_head] entering O
    mlp.hook_post  the MLP's activation, entering its output projection
    ln*.hook_scale sqrt(var + eps) of the input of the norm that reads the stream before the
                   sublayer (RMSNorm: sqrt(mean(x^2) + eps)); ln_final's before the unembedding
    ln_final.hook_normalized   that input divided by the scale, before the norm's weight
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from . import match
from .anatomy import Anatomy, Writer, analyse
from .norms import Norm
from .sublayers import attention_parts, fused_attention, mlp_branches

# TransformerLens's names, in its order; {l} is the layer.
GLOBAL_POINTS = ("hook_embed", "hook_pos_embed")
LAYER_POINTS = (
    "blocks.{l}.hook_resid_pre",
    "blocks.{l}.ln1.hook_scale",
    "blocks.{l}.ln1.hook_normalized",
    "blocks.{l}.attn.hook_q",
    "blocks.{l}.attn.hook_k",
    "blocks.{l}.attn.hook_v",
    "blocks.{l}.attn.hook_rot_q",
    "blocks.{l}.attn.hook_rot_k",
    "blocks.{l}.attn.hook_attn_scores",
    "blocks.{l}.attn.hook_pattern",
    "blocks.{l}.attn.hook_z",
    "blocks.{l}.attn.hook_result",
    "blocks.{l}.hook_attn_out",
    "blocks.{l}.hook_resid_mid",
    "blocks.{l}.ln2.hook_scale",
    "blocks.{l}.ln2.hook_normalized",
    "blocks.{l}.mlp.hook_pre",
    "blocks.{l}.mlp.hook_pre_linear",
    "blocks.{l}.mlp.hook_post",
    "blocks.{l}.hook_mlp_out",
    "blocks.{l}.hook_resid_post",
)
FINAL_POINTS = ("ln_final.hook_scale", "ln_final.hook_normalized")

# How a point's tensor becomes TransformerLens's layout.
AS_IS = "as_is"  # already [batch, pos, ...] (or the pattern's [batch, head, q, k])
PER_POSITION = "per_position"  # reshape to [batch, pos, -1] when the graph holds it 2-D
BROADCAST = "broadcast"  # position table rows, expanded over the batch
HEADS = "heads"  # [batch, head, pos, d_head] transposed to [batch, pos, head, d_head]
SCALE = "scale"  # a norm's scale, computed from its input
NORMALIZED = "normalized"  # a norm's input divided by that scale (centred first for a LayerNorm)
SCORES = "scores"  # attention scores, the additive mask's large negatives made -inf (TransformerLens's masking)
COLUMNS = "columns"  # a map's output columns picked per head: [batch, pos, head, d_head]
KEYS = "keys"  # the transposed keys [batch, head, d_head, key] as [batch, pos, head, d_head], each head once
RESULT = "result"  # each head's z through its slice of W_O: [batch, pos, head, d_model]
# Points as large as [batch, pos, head, d_model]: added only when named, as TransformerLens's use_attn_result
ON_REQUEST = ("attn.hook_result",)


@dataclass(eq=False)
class Point:
    name: str
    value: ir.Value
    form: str
    found: str  # where it was found, in words (goes into the node's doc_string)
    norm: Norm | None = None
    indices: object = None  # COLUMNS: [head, d_head] column indices; KEYS: the head indices to keep;
    # RESULT: (a function giving W_O per head [head, d_head, d_model], z's form, the output projection's output)


@dataclass
class Placement:
    points: dict[str, Point] = field(default_factory=dict)
    unplaced: dict[str, str] = field(default_factory=dict)  # point name -> reason
    n_layers: int = 0
    anatomy: Anatomy | None = None
    layouts: dict = field(default_factory=dict)  # output projection node id -> HeadLayout or a reason

    @property
    def names(self) -> list[str]:
        return list(self.points) + list(self.unplaced)


def all_names(n_layers: int) -> list[str]:
    names = list(GLOBAL_POINTS)
    for l in range(n_layers):
        names += [p.format(l=l) for p in LAYER_POINTS]
    return names + list(FINAL_POINTS)


def template(name: str) -> str:
    """'blocks.3.hook_z' -> 'blocks.*.hook_z' (to group per-layer reasons)."""
    return re.sub(r"^blocks\.\d+\.", "blocks.*.", name)


def place(graph: ir.Graph, anatomy: Anatomy | None = None, model=None) -> Placement:
    """Where each point sits; with `model` (a LensModel of this graph) the per-head queries, keys and
    values too, whose columns are measured on its weights (graph/heads.py)."""
    anatomy = anatomy or analyse(graph)
    result = Placement(anatomy=anatomy)
    layers = anatomy.layers
    result.n_layers = len(layers)
    if not layers:
        reason = ("no norms found: the graph's residual stream cannot be located" if not anatomy.norms
                  else anatomy.layers_blocker or "no transformer blocks were found in the residual stream")
        for name in list(GLOBAL_POINTS) + [t.format(l="*") for t in LAYER_POINTS] + list(FINAL_POINTS):
            result.unplaced[name] = reason
        return result

    def put(name: str, found: Point | str) -> None:
        if isinstance(found, Point):
            result.points[name] = found
        else:
            result.unplaced[name] = found

    embeds = [w for w in anatomy.writers if w.step is not None and w.step < _first_step(layers[0])
              and w.kind != "bias"]
    token = next((w for w in embeds if w.step == -1), None)
    put("hook_embed", Point("hook_embed", token.value, PER_POSITION, f"token embedding {token.node.name}"
                            + ("" if token.value is token.node.outputs[0] else f", scaled ({token.value.name})"))
        if token is not None else "no token-embedding table starts the residual stream")
    positions = [w for w in embeds if w.role == "pos_embed"]
    if len(positions) == 1:
        put("hook_pos_embed", Point("hook_pos_embed", positions[0].value, BROADCAST,
                                    f"position table Gather {positions[0].node.name}"))
    else:
        put("hook_pos_embed", "no learned position table writes into the residual stream (rotary or no positions)"
            if not positions else f"{len(positions)} position tables write into the stream")

    layouts = result.layouts = _layouts(anatomy, model)
    for layer in layers:
        l, p = layer.index, f"blocks.{layer.index}."
        for suffix, found in _heads(p, layer, layouts).items():
            put(p + suffix, found)
        put(p + "hook_resid_pre", Point(p + "hook_resid_pre", layer.pre, PER_POSITION, f"stream before block {l}"))
        put(p + "hook_resid_post", Point(p + "hook_resid_post", layer.post, PER_POSITION, f"stream after block {l}")
            if layer.post is not None else f"the stream after block {l} exists only inside a fused norm")
        if layer.mid is not None:
            put(p + "hook_resid_mid", Point(p + "hook_resid_mid", layer.mid, PER_POSITION,
                                            f"stream between attention and MLP of block {l}"))
        else:
            put(p + "hook_resid_mid", "attention and MLP read the same stream tensor (parallel block): "
                                      "there is no stream between them" if layer.parallel
                else f"block {l} has no MLP")
        put(p + "ln1.hook_scale", _scale(p + "ln1.hook_scale", layer.ln1, "attention", l))
        put(p + "ln2.hook_scale", _scale(p + "ln2.hook_scale", layer.ln2, "MLP", l) if layer.mlp is not None
            else f"block {l} has no MLP")
        for key, norm, sublayer in (("ln1", layer.ln1, "attention"), ("ln2", layer.ln2, "MLP")):
            found = _scale(p + f"{key}.hook_normalized", norm, sublayer, l)
            put(p + f"{key}.hook_normalized", _normalized(p + f"{key}.hook_normalized", norm)
                if isinstance(found, Point) else found)
        attn, mlp = layer.attn, layer.mlp
        put(p + "hook_attn_out", _term(p + "hook_attn_out", attn, anatomy))
        put(p + "attn.hook_pattern", _softmax_point(p + "attn.hook_pattern", attn, "pattern"))
        put(p + "attn.hook_attn_scores", _softmax_point(p + "attn.hook_attn_scores", attn, "scores"))
        z = _z(p + "attn.hook_z", attn)
        put(p + "attn.hook_z", z)
        put(p + "attn.hook_result", _result(p + "attn.hook_result", z, layouts.get(id(attn.linear.node)), model))
        if mlp is None:
            for suffix in ("hook_mlp_out", "mlp.hook_post", "mlp.hook_pre", "mlp.hook_pre_linear"):
                put(p + suffix, f"block {l} has no MLP")
        else:
            put(p + "hook_mlp_out", _term(p + "hook_mlp_out", mlp, anatomy))
            post, _ = match.back(mlp.linear.node.inputs[0])
            put(p + "mlp.hook_post", Point(p + "mlp.hook_post", post, PER_POSITION, f"input of {mlp.name}"))
            pre, linear = mlp_branches(post)
            put(p + "mlp.hook_pre", Point(p + "mlp.hook_pre", pre, PER_POSITION, "the MLP's pre-activation")
                if isinstance(pre, ir.Value) else pre)
            put(p + "mlp.hook_pre_linear", Point(p + "mlp.hook_pre_linear", linear, PER_POSITION,
                                                 "the gated MLP's linear branch") if isinstance(linear, ir.Value)
                else linear)

    final = anatomy.final_norm
    if final is None:
        for name in FINAL_POINTS:
            put(name, "no final norm before the unembedding")
    else:
        put("ln_final.hook_scale", Point("ln_final.hook_scale", final.input, SCALE, f"scale of {final.name}", final)
            if final.input is not None else f"the input of {final.name} exists only inside it (fused sum)")
        put("ln_final.hook_normalized", _normalized("ln_final.hook_normalized", final))
    order = {name: i for i, name in enumerate(all_names(len(layers)))}
    result.points = dict(sorted(result.points.items(), key=lambda kv: order[kv[0]]))
    result.unplaced = dict(sorted(result.unplaced.items(), key=lambda kv: order[kv[0]]))
    return result


def _layouts(anatomy: Anatomy, model) -> dict:
    """attention output projection node -> its HeadLayout or a reason."""
    if model is None:
        return {}
    from ..errors import LensError
    from .heads import head_layout

    try:
        found = head_layout(model, anatomy.attention)
    except LensError as exc:  # the measuring run failed: every head point is absent, with why
        found = [f"the head layout could not be measured ({exc})"] * len(anatomy.attention)
    return {id(a.o.node): r for a, r in zip(anatomy.attention, found)}


def _heads(p: str, layer, layouts: dict) -> dict[str, Point | str]:
    """hook_q/k/v (each map's columns per head, before any repeat) and hook_rot_q/rot_k (the rotated
    queries and keys the product reads)."""
    names = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k")
    if layer.attn is None:
        return dict.fromkeys(names, f"block {layer.index} has no attention")
    layout = layouts.get(id(layer.attn.linear.node), "the head layout is measured on the model's weights "
                                                     "(placed with the model)")
    if isinstance(layout, str):
        return dict.fromkeys(names, layout)
    out = {}
    for name, lin, cols in (("attn.hook_q", layout.q, layout.q_cols), ("attn.hook_k", layout.k, layout.k_cols),
                            ("attn.hook_v", layout.v, layout.v_cols)):
        out[name] = Point(p + name, lin.out, COLUMNS, f"columns of {lin.name} per head", indices=cols)
    if not layout.rotary:
        out["attn.hook_rot_q"] = out["attn.hook_rot_k"] = "no rotary embedding: the product reads hook_q and hook_k"
        return out
    q, k = layout.qk.inputs[0], layout.qk.inputs[1]
    if _rank(q) not in (None, 4) or _rank(k) not in (None, 4):
        out["attn.hook_rot_q"] = out["attn.hook_rot_k"] = "the query-key operands are not [batch, head, ., .]"
        return out
    out["attn.hook_rot_q"] = Point(p + "attn.hook_rot_q", q, HEADS, f"queries entering {layout.qk.name}")
    out["attn.hook_rot_k"] = Point(p + "attn.hook_rot_k", k, KEYS, f"keys entering {layout.qk.name}",
                                   indices=layout.k_heads)
    return out


def _result(name: str, z, layout, model) -> Point | str:
    """Each head's output through its rows of the output projection (its z times its slice of W_O)."""
    if isinstance(z, str):
        return z
    if layout is None or isinstance(layout, str):
        return layout or "the head layout is measured on the model's weights (placed with the model)"
    from ..store.weights import LinearWeights

    @functools.cache
    def per_head() -> np.ndarray:  # read where the point is added: a listing or a points graph without it reads
        w_o = LinearWeights(model.weights).weight(layout.o)  # none of W_O (SmolLM2: 40 MiB)
        return np.stack([w_o[rows] for rows in layout.o_rows]).astype(layout.o.source.dtype.numpy())

    return Point(name, z.value, RESULT, f"{z.found}, through each head's rows of {layout.o.name}",
                 indices=(per_head, z.form, layout.o.node.outputs[0]))


def _first_step(layer) -> int:
    return layer.attn.step if layer.attn is not None else 0


def _scale(name: str, norm: Norm | None, sublayer: str, l: int) -> Point | str:
    if norm is None:
        return f"block {l}'s {sublayer} reads the residual stream with no norm in between"
    if norm.input is None:
        return f"the stream {norm.name} reads exists only inside it (fused sum)"
    return Point(name, norm.input, SCALE, f"scale of {norm.name}", norm)


def _normalized(name: str, norm: Norm) -> Point | str:
    """The norm's input normalised, before its scale and bias (TransformerLens's hook_normalized):
    the norm's own output once fold_ln has made it a bare normaliser, else computed from its input."""
    plain = all(ref is None or _all_equal(ref, fill) for ref, fill in ((norm.scale, 1.0), (norm.bias, 0.0)))
    if plain:
        return Point(name, norm.output, PER_POSITION, f"output of {norm.name} (scale 1, bias 0)")
    if norm.input is None:
        return f"the input of {norm.name} exists only inside it (fused sum)"
    return Point(name, norm.input, NORMALIZED, f"input of {norm.name}, normalised without its scale", norm)


def _all_equal(ref, fill: float) -> bool:
    node, idx = ref
    arr = match.const_value(node.inputs[idx])
    return arr is not None and bool((arr == fill).all())


def writers_by_role(anatomy: Anatomy) -> dict[str, dict[int, Writer]]:
    """role -> layer -> writer, for the blocks the anatomy found."""
    out: dict[str, dict[int, Writer]] = defaultdict(dict)
    for layer in anatomy.layers:
        for writer in (layer.attn, layer.mlp):
            if writer is not None:
                out[writer.role][layer.index] = writer
    return out


def _term(name: str, writer: Writer, anatomy: Anatomy) -> Point | str:
    """What the sublayer adds into the stream (after its bias, and after a sublayer-output norm)."""
    others = [w for w in anatomy.writers if w.step == writer.step and w.kind == "bias"]
    if others:
        return f"{writer.name}'s bias {others[0].name} is added in the same sum ({others[0].node.name}), not to its output"
    where = f"output of {writer.norm.name} (normalising {writer.name})" if writer.norm else f"output of {writer.name}"
    return Point(name, writer.value, PER_POSITION, where)


def _attention_parts(writer: Writer) -> tuple[ir.Node, ir.Node] | str:
    """The Softmax and the probabilities-times-values MatMul that feed this output projection."""
    fused = fused_attention(writer.linear)
    if fused is not None:
        return (f"attention is one {fused.op_type} op ({fused.name}): its pattern and per-head outputs "
                "exist only inside it")
    return attention_parts(writer.linear)


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _softmax_point(name: str, writer: Writer, side: str) -> Point | str:
    """The attention Softmax's input (`side` "scores") or output ("pattern"), [batch, head, query, key]."""
    parts = _attention_parts(writer)
    if isinstance(parts, str):
        return parts
    softmax, _ = parts
    value = softmax.inputs[0] if side == "scores" else softmax.outputs[0]
    if _rank(value) not in (None, 4) or match.attr(softmax, "axis", -1) not in (-1, 3):
        return f"Softmax {softmax.name} is not over the keys of [batch, head, query, key] {side}"
    if side == "scores":
        return Point(name, value, SCORES, f"input of {softmax.name}, masked positions -inf")
    return Point(name, value, AS_IS, f"output of {softmax.name}")

def _z(name: str, writer: Writer) -> Point | str:
    fused = fused_attention(writer.linear)
    if fused is not None:
        return (f"{fused.op_type} {fused.name} gives its heads merged: the split per head is not placed "
                "for fused attention")
    parts = _attention_parts(writer)
    if isinstance(parts, str):
        return parts
    _, pv = parts
    merged, _ = match.back(writer.linear.node.inputs[0])
    node = merged.producer()
    if (node is not None and node.op_type == "Transpose" and _rank(merged) == 4
            and list(match.attr(node, "perm", [])) == [0, 2, 1, 3]
            and match.back(node.inputs[0], match.VALUE_NOOPS)[0] is pv.outputs[0]):
        return Point(name, merged, AS_IS, f"heads entering {writer.name} ({node.name})")
    if _rank(pv.outputs[0]) == 4:
        return Point(name, pv.outputs[0], HEADS, f"per-head output of {pv.name}")
    return f"per-head attention output of {pv.name} is not [batch, head, pos, d_head]"
