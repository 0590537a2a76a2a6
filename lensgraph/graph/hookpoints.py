"""Where TransformerLens's hook points sit in an exported graph.

Placement reads the anatomy (the norms and the stream tensors they read, the writers
with their roles and layers, the final norm) and adds two short walks of its own: from
an attention output projection back to its Softmax and to the per-head values it
reads. Each point becomes a tensor of the graph plus the small reshaping that gives it
TransformerLens's layout; a point that cannot be placed is reported with the reason.

    resid_pre[l]   input of layer l's first norm       resid_mid[l]  input of its second norm
    resid_post[l]  resid_pre[l+1] (last: final norm's input)
    attn_out[l], mlp_out[l]   the writer's term, after its bias, as added into the stream
    pattern[l]     Softmax output [batch, head, query, key]
    z[l]           per-head attention output [batch, pos, head, d_head] entering O
    mlp.hook_post  the MLP's activation, entering its output projection
    ln*.hook_scale sqrt(var + eps) of the norm's input (RMSNorm: sqrt(mean(x^2) + eps))
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import onnx_ir as ir

from . import match
from .anatomy import Anatomy, Writer, analyse
from .norms import Norm

LAYOUT_OPS = match.ROW_NOOPS | {"Transpose"}

# TransformerLens's names, in its order; {l} is the layer.
GLOBAL_POINTS = ("hook_embed", "hook_pos_embed")
LAYER_POINTS = (
    "blocks.{l}.hook_resid_pre",
    "blocks.{l}.ln1.hook_scale",
    "blocks.{l}.attn.hook_pattern",
    "blocks.{l}.attn.hook_z",
    "blocks.{l}.hook_attn_out",
    "blocks.{l}.hook_resid_mid",
    "blocks.{l}.ln2.hook_scale",
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


@dataclass(eq=False)
class Point:
    name: str
    value: ir.Value
    form: str
    found: str  # where it was found, in words (goes into the node's doc_string)
    norm: Norm | None = None


@dataclass
class Placement:
    points: dict[str, Point] = field(default_factory=dict)
    unplaced: dict[str, str] = field(default_factory=dict)  # point name -> reason
    n_layers: int = 0
    anatomy: Anatomy | None = None

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


def place(graph: ir.Graph, anatomy: Anatomy | None = None) -> Placement:
    anatomy = anatomy or analyse(graph)
    result = Placement(anatomy=anatomy)
    layers, final, reason = _layer_norms(anatomy)
    result.n_layers = len(layers)
    if reason:
        for name in list(GLOBAL_POINTS) + [t.format(l="*") for t in LAYER_POINTS] + list(FINAL_POINTS):
            result.unplaced[name] = reason
        return result

    def put(name: str, found: Point | str) -> None:
        if isinstance(found, Point):
            result.points[name] = found
        else:
            result.unplaced[name] = found

    writers = writers_by_role(anatomy)
    embeds = writers.get("embed", {})
    put("hook_embed", Point("hook_embed", embeds[0].node.outputs[0], AS_IS, f"embedding Gather {embeds[0].node.name}")
        if embeds else "no token-embedding table Gather writes into the residual stream")
    pos = writers.get("pos_embed", {})
    put("hook_pos_embed", Point("hook_pos_embed", pos[0].node.outputs[0], BROADCAST, f"position Gather {pos[0].node.name}")
        if pos else "no learned position table writes into the residual stream (rotary or no positions)")

    for l, norms in enumerate(layers):
        p = f"blocks.{l}."
        pre = _root(norms[0].input)
        put(p + "hook_resid_pre", Point(p + "hook_resid_pre", pre, PER_POSITION, f"input of {norms[0].name}"))
        put(p + "ln1.hook_scale", Point(p + "ln1.hook_scale", norms[0].input, SCALE, f"scale of {norms[0].name}",
                                         norms[0]))
        if len(norms) > 1:
            put(p + "ln2.hook_scale", Point(p + "ln2.hook_scale", norms[1].input, SCALE, f"scale of {norms[1].name}",
                                             norms[1]))
        else:
            put(p + "ln2.hook_scale", "the layer has one norm")
        mid = next((n for n in norms[1:] if _root(n.input) is not pre), None)
        if mid is not None:
            put(p + "hook_resid_mid", Point(p + "hook_resid_mid", _root(mid.input), PER_POSITION, f"input of {mid.name}"))
        else:
            put(p + "hook_resid_mid", "attention and MLP read the same stream tensor (parallel block): "
                                      "there is no stream between them" if len(norms) > 1 else "the layer has one norm")
        attn = writers.get("attn_out", {}).get(l)
        if attn is None:
            for suffix in ("hook_attn_out", "attn.hook_pattern", "attn.hook_z"):
                put(p + suffix, f"no attention output projection (fed by Softmax(...) @ V) found for layer {l}")
        else:
            put(p + "hook_attn_out", Point(p + "hook_attn_out", _term(attn), PER_POSITION, f"output of {attn.name}"))
            put(p + "attn.hook_pattern", _pattern(p + "attn.hook_pattern", attn))
            put(p + "attn.hook_z", _z(p + "attn.hook_z", attn))
        mlp = writers.get("mlp_out", {}).get(l)
        if mlp is None:
            for suffix in ("hook_mlp_out", "mlp.hook_post"):
                put(p + suffix, f"no MLP output projection found for layer {l}")
        else:
            put(p + "hook_mlp_out", Point(p + "hook_mlp_out", _term(mlp), PER_POSITION, f"output of {mlp.name}"))
            post, _ = match.back(mlp.linear.node.inputs[0])
            put(p + "mlp.hook_post", Point(p + "mlp.hook_post", post, PER_POSITION, f"input of {mlp.name}"))
        if l + 1 < len(layers):
            nxt = layers[l + 1][0]
            post = Point(p + "hook_resid_post", _root(nxt.input), PER_POSITION, f"input of {nxt.name}")
        elif final is not None:
            post = Point(p + "hook_resid_post", _root(final.input), PER_POSITION, f"input of {final.name}")
        else:
            post = "no final norm before the unembedding"
        put(p + "hook_resid_post", post)

    if final is None:
        for name in FINAL_POINTS:
            put(name, "no final norm before the unembedding")
    else:
        put("ln_final.hook_scale", Point("ln_final.hook_scale", final.input, SCALE, f"scale of {final.name}", final))
        put("ln_final.hook_normalized", Point("ln_final.hook_normalized", final.output, PER_POSITION,
                                               f"output of {final.name}"))
    order = {name: i for i, name in enumerate(all_names(len(layers)))}
    result.points = dict(sorted(result.points.items(), key=lambda kv: order[kv[0]]))
    result.unplaced = dict(sorted(result.unplaced.items(), key=lambda kv: order[kv[0]]))
    return result


def _root(value: ir.Value) -> ir.Value:
    return match.back(value)[0]


def _layer_norms(anatomy: Anatomy) -> tuple[list[list[Norm]], Norm | None, str | None]:
    """Each layer's norms in graph order, and the final norm."""
    if not anatomy.norms:
        return [], None, "no norms found: the graph's residual stream cannot be located"
    final = anatomy.final_norm
    if final is None and anatomy.norms[-1].layer is None:
        final = anatomy.norms[-1]
    blocks = [n for n in anatomy.norms if n is not final]
    if not blocks:
        return [], final, "no norms inside the layers"
    if all(n.layer is not None for n in blocks):
        grouped = defaultdict(list)
        for n in blocks:
            grouped[n.layer].append(n)
        if sorted(grouped) != list(range(len(grouped))):
            return [], final, f"layer numbers of the norms are not 0..n-1 ({sorted(grouped)})"
        return [grouped[l] for l in range(len(grouped))], final, None
    n_layers = len([w for w in anatomy.writers if w.role == "attn_out"]) or len(anatomy.attention)
    if not n_layers or len(blocks) % n_layers:
        return [], final, "norms carry no layer numbers and do not split evenly into layers"
    k = len(blocks) // n_layers
    return [blocks[i * k:(i + 1) * k] for i in range(n_layers)], final, None


def writers_by_role(anatomy: Anatomy) -> dict[str, dict[int, Writer]]:
    """role -> layer -> writer; writers without a layer number are numbered in graph order."""
    out: dict[str, dict[int, Writer]] = defaultdict(dict)
    for role in ("embed", "pos_embed", "attn_out", "mlp_out"):
        ws = [w for w in anatomy.writers if w.role == role]
        numbered = all(w.layer is not None for w in ws) and len({w.layer for w in ws}) == len(ws)
        for i, w in enumerate(ws):
            out[role][w.layer if numbered and role not in ("embed", "pos_embed") else i] = w
    return out


def _term(writer: Writer) -> ir.Value:
    """The writer's output as the residual Add reads it (after bias and any reshape back to 3-D)."""
    lin = writer.linear
    uses, _ = match.forward(lin.out)
    for node, _, value in uses:
        if node.op_type == "Add" and node.domain == "":
            return value
    return lin.out


def _attention_parts(writer: Writer) -> tuple[ir.Node, ir.Node] | str:
    """The Softmax and the probabilities-times-values MatMul that feed this output projection."""
    x, _ = match.back(writer.linear.node.inputs[0], LAYOUT_OPS)
    pv = x.producer()
    if pv is None or pv.op_type != "MatMul":
        return f"{writer.name} is not fed by a MatMul of probabilities and values"
    probs, _ = match.back(pv.inputs[0], match.VALUE_NOOPS)
    softmax = probs.producer()
    if softmax is None or softmax.op_type != "Softmax":
        return f"{writer.name}: the attention probabilities do not come from a Softmax"
    return softmax, pv


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _pattern(name: str, writer: Writer) -> Point | str:
    parts = _attention_parts(writer)
    if isinstance(parts, str):
        return parts
    softmax, _ = parts
    probs = softmax.outputs[0]
    if _rank(probs) not in (None, 4):
        return f"Softmax {softmax.name} gives rank {_rank(probs)}, not [batch, head, query, key]"
    if match.attr(softmax, "axis", -1) not in (-1, 3):
        return f"Softmax {softmax.name} is not over the last axis"
    return Point(name, probs, AS_IS, f"output of {softmax.name}")


def _z(name: str, writer: Writer) -> Point | str:
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
