"""What the anatomy found, as plain data for `lensgraph inspect` (text or JSON)."""

from __future__ import annotations

from collections import Counter

from ..store.model import LensModel
from . import match
from .anatomy import Anatomy, analyse, nothing_to_rewrite


def describe(model: LensModel, anatomy: Anatomy | None = None) -> dict:
    a = anatomy or analyse(model.graph)
    return {
        "applied": model.applied,
        "nothing_to_rewrite": nothing_to_rewrite(a),
        "traits": traits(a),
        "d_model": a.d_model,
        "norms": [
            {
                "name": n.name,
                "layer": n.layer,
                "role": n.role,
                "kind": n.kind,
                "form": n.form,
                "d_model": n.d_model,
                "readers": [r.name for r in n.readers],
                "skipped": n.blocker,
            }
            for n in a.norms
        ],
        "norm_kinds": dict(Counter(f"{n.kind} ({n.form})" for n in a.stream_readers)),
        "norm_roles": dict(Counter(n.role for n in a.norms)),
        "writers": [
            {"role": w.role, "name": w.name, "layer": w.layer, "skipped": w.blocker,
             "through_norm": w.norm.name if w.norm is not None else None} for w in a.writers
        ],
        "layers": len(a.layers),
        "layers_skipped": a.layers_blocker,
        "stream_tensors": len(a.stream),
        "stream_skipped": a.stream_blocker,
        "unembed": (
            {"name": a.unembed.name, "d_model": a.unembed.d_in, "vocab": a.unembed.d_out,
             "bias": a.unembed.bias is not None, "final_norm": a.final_norm.name if a.final_norm else None}
            if a.unembed else None
        ),
        "unembed_skipped": a.unembed_blocker,
        "unembed_nonlinear": a.unembed_nonlinear,
        "attention": [
            {"layer": t.layer, "v": t.v.name, "o": t.o.name,
             "query_heads_per_value_head": t.n_groups, "skipped": t.blocker}
            for t in a.attention
        ],
        "notes": a.notes,
    }


def traits(a: Anatomy) -> dict:
    """The family traits that decide what can be rewritten."""
    parallel = any(layer.parallel for layer in a.layers)
    groups = sorted({t.n_groups for t in a.attention})
    return {
        "layers": len(a.layers),
        "sublayer_output_norms": any(n.role == "sublayer_output" for n in a.norms),
        "head_norms": any(n.role == "head" for n in a.norms),
        "norms": sorted({f"{n.kind} ({n.form})" for n in a.stream_readers or a.norms}),
        "post_norm": a.post_norm,
        "parallel_block": parallel,
        "query_heads_per_value_head": groups[-1] if groups else None,
        "tied_embedding_shared": _tied(a),
    }


def _tied(a: Anatomy) -> bool:
    if a.unembed is None:
        return False
    tables = [match.back(w.node.inputs[w.idx], {"Identity"})[0] for w in a.writers if w.role == "embed"]
    return any(t is a.unembed.source for t in tables)


def as_text(info: dict) -> str:
    lines = [f"applied passes: {', '.join(info['applied']) or 'none'}"]
    if info["nothing_to_rewrite"]:
        lines.append(f"not a transformer lensgraph can process: nothing to rewrite ({info['nothing_to_rewrite']})")
        return "\n".join(lines)
    t = info["traits"]
    shape = ["post-norm" if t["post_norm"] else "pre-norm",
             "parallel attention+MLP" if t["parallel_block"] else "sequential blocks"]
    if t["query_heads_per_value_head"] and t["query_heads_per_value_head"] > 1:
        shape.append(f"grouped-query attention ({t['query_heads_per_value_head']} query heads per value head)")
    if t["sublayer_output_norms"]:
        shape.append("a norm on each sublayer's output")
    if t["head_norms"]:
        shape.append("query/key norms")
    if t["tied_embedding_shared"]:
        shape.append("embedding and unembedding share one tensor")
    lines.append(f"family traits: {t['layers']} layers; {', '.join(t['norms'])}; {'; '.join(shape)}")
    lines.append(f"d_model: {info['d_model']}")
    kinds = ", ".join(f"{k} x{v}" for k, v in info["norm_kinds"].items())
    readers = [n for n in info["norms"] if n["role"] in ("reader", "final")]
    others = ", ".join(f"{k} x{v}" for k, v in info["norm_roles"].items() if k not in ("reader", "final"))
    lines.append(f"norms: {len(readers)} reading the stream ({kinds})" + (f"; also {others}" if others else ""))
    for n in info["norms"]:
        state = f"skipped: {n['skipped']}" if n["skipped"] else f"read by {', '.join(n['readers'])}"
        lines.append(f"  [{_layer(n['layer'])}] {n['role']} {n['name']}: {state}")
    if info["layers_skipped"]:
        lines.append(f"blocks: none recognised ({info['layers_skipped']})")
    lines.append(f"residual stream: {info['stream_tensors']} tensors, {len(info['writers'])} writers"
                 + (f" (centring skipped: {info['stream_skipped']})" if info["stream_skipped"] else ""))
    for w in info["writers"]:
        extra = f" (skipped: {w['skipped']})" if w["skipped"] else ""
        via = f" through {w['through_norm']}" if w["through_norm"] else ""
        lines.append(f"  [{_layer(w['layer'])}] {w['role']}: {w['name']}{via}{extra}")
    u = info["unembed"]
    if u:
        lines.append(f"unembed: {u['name']} [{u['d_model']} -> {u['vocab']}], "
                     f"bias: {'yes' if u['bias'] else 'no'}, final norm: {u['final_norm']}")
        if info["unembed_nonlinear"]:
            lines.append(f"  centring skipped: {info['unembed_nonlinear']}")
    else:
        lines.append(f"unembed: not found ({info['unembed_skipped']})")
    lines.append(f"attention V->O: {len(info['attention'])} blocks")
    for t in info["attention"]:
        extra = f" (skipped: {t['skipped']})" if t["skipped"] else ""
        groups = t["query_heads_per_value_head"]
        grouped = f" ({groups} query heads per value head)" if groups > 1 else ""
        lines.append(f"  [{_layer(t['layer'])}] V {t['v']} -> O {t['o']}{grouped}{extra}")
    for note in info["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _layer(layer) -> str:
    return "-" if layer is None else str(layer)
