"""What the anatomy found, as plain data for `lensgraph inspect` (text or JSON)."""

from __future__ import annotations

from collections import Counter

from .anatomy import Anatomy, analyse
from .model import LensModel
from .pipeline import nothing_to_rewrite


def describe(model: LensModel, anatomy: Anatomy | None = None) -> dict:
    a = anatomy or analyse(model.graph)
    return {
        "applied": model.applied,
        "nothing_to_rewrite": nothing_to_rewrite(a),
        "d_model": a.d_model,
        "norms": [
            {
                "name": n.name,
                "layer": n.layer,
                "kind": n.kind,
                "form": n.form,
                "d_model": n.d_model,
                "readers": [r.name for r in n.readers],
                "skipped": n.blocker,
            }
            for n in a.norms
        ],
        "norm_kinds": dict(Counter(f"{n.kind} ({n.form})" for n in a.norms)),
        "writers": [
            {"role": w.role, "name": w.name, "layer": w.layer, "skipped": w.blocker} for w in a.writers
        ],
        "stream_tensors": len(a.stream),
        "stream_skipped": a.stream_blocker,
        "unembed": (
            {"name": a.unembed.name, "d_model": a.unembed.d_in, "vocab": a.unembed.d_out,
             "bias": a.unembed.bias is not None, "final_norm": a.final_norm.name if a.final_norm else None}
            if a.unembed else None
        ),
        "unembed_skipped": a.unembed_blocker,
        "attention": [
            {"layer": t.layer, "v": t.v.name, "v_columns": list(t.v_cols), "o": t.o.name,
             "query_heads_per_value_head": t.n_groups, "skipped": t.blocker}
            for t in a.attention
        ],
        "notes": a.notes,
    }


def as_text(info: dict) -> str:
    lines = [f"applied passes: {', '.join(info['applied']) or 'none'}"]
    if info["nothing_to_rewrite"]:
        lines.append(f"not a transformer lensgraph can process: nothing to rewrite ({info['nothing_to_rewrite']})")
        return "\n".join(lines)
    lines.append(f"d_model: {info['d_model']}")
    kinds = ", ".join(f"{k} x{v}" for k, v in info["norm_kinds"].items())
    lines.append(f"norms: {len(info['norms'])} ({kinds})")
    for n in info["norms"]:
        state = f"skipped: {n['skipped']}" if n["skipped"] else f"read by {', '.join(n['readers'])}"
        lines.append(f"  [{_layer(n['layer'])}] {n['name']}: {state}")
    lines.append(f"residual stream: {info['stream_tensors']} tensors, {len(info['writers'])} writers"
                 + (f" (centring skipped: {info['stream_skipped']})" if info["stream_skipped"] else ""))
    for w in info["writers"]:
        extra = f" (skipped: {w['skipped']})" if w["skipped"] else ""
        lines.append(f"  [{_layer(w['layer'])}] {w['role']}: {w['name']}{extra}")
    u = info["unembed"]
    if u:
        lines.append(f"unembed: {u['name']} [{u['d_model']} -> {u['vocab']}], "
                     f"bias: {'yes' if u['bias'] else 'no'}, final norm: {u['final_norm']}")
    else:
        lines.append(f"unembed: not found ({info['unembed_skipped']})")
    lines.append(f"attention V->O: {len(info['attention'])} blocks")
    for t in info["attention"]:
        extra = f" (skipped: {t['skipped']})" if t["skipped"] else ""
        cols = t["v_columns"]
        lines.append(f"  [{_layer(t['layer'])}] V {t['v']}[:, {cols[0]}:{cols[1]}] -> O {t['o']}{extra}")
    for note in info["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _layer(layer) -> str:
    return "-" if layer is None else str(layer)
