"""A model's weights under TransformerLens's state-dict names and shapes.

    w = lensgraph.tl_weights("gpt2.lens.onnx")
    w["blocks.0.attn.W_Q"]          # [n_heads, d_model, d_head]
    w.missing                       # name -> why it is absent

Found through the anatomy (the token and position tables, each block's attention and MLP, the
unembedding) and the measured head layout (graph/heads.py), whatever the exporter made of the
maps: a packed q|k|v map, columns interleaved per head, separate maps, a Gemm with transB, a
weight seen through a Transpose. A name that cannot be read with certainty is absent, with the
reason in `missing`, never filled with a guess.
"""

from __future__ import annotations

import fnmatch
import os

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..errors import BadInputError, LensError
from ..graph import match
from ..graph.anatomy import analyse
from ..graph.heads import head_layout, recorded
from ..graph.linear import linear_producing
from ..graph.sublayers import mlp_branches
from ..graph.stream import TABLE_PATH_OPS
from ..store.model import LensModel
from ..store.resolve import resolve
from ..store.weights import LinearWeights
from .points_record import recorded_layouts


class TLWeights(dict):
    """name -> numpy array, as TransformerLens names and shapes them; `missing`: name -> reason."""

    def __init__(self):
        super().__init__()
        self.missing: dict[str, str] = {}


def tl_weights(model, names: str | list[str] | None = None, copy: bool = True) -> TLWeights:
    """The weights of `model` (a path or a LensModel) by TransformerLens name; `names`: globs to keep.
    Each is a fresh array of its own; with `copy` off, a weight kept as stored may be a read-only view
    of the file (listing names and shapes reads next to nothing)."""
    record = {}
    if isinstance(model, (str, os.PathLike)):
        record = recorded_layouts(model)  # a converted folder's, measured on this very file
        model = LensModel.load(resolve(model).model)
    elif not isinstance(model, LensModel):
        raise BadInputError(f"model must be a path or a LensModel, not {type(model).__name__}")
    anatomy = analyse(model.graph)
    if not anatomy.layers:
        raise LensError(f"{model.path}: no transformer blocks found ({anatomy.layers_blocker})")
    store, linear = model.weights, LinearWeights(model.weights)
    out = TLWeights()

    def table(writer):
        source, path = match.back(writer.node.inputs[writer.idx], TABLE_PATH_OPS)
        arr = store.stored(source, populate=copy)
        return arr.T if sum(p.op_type == "Transpose" for p in path) % 2 else arr

    for writer in anatomy.writers:
        if writer.step == -1:
            out["embed.W_E"] = table(writer)
        elif writer.role == "pos_embed":
            out["pos_embed.W_pos"] = table(writer)
    found = (recorded(anatomy.attention, record) if record else None) or head_layout(model, anatomy.attention)
    layouts = dict(zip([id(a) for a in anatomy.attention], found))
    by_o = {id(a.o.node): a for a in anatomy.attention}
    for layer in anatomy.layers:
        p = f"blocks.{layer.index}."
        for key, norm in (("ln1", layer.ln1), ("ln2", layer.ln2)):
            _norm(out, store, p + key, norm)
        att = by_o.get(id(layer.attn.linear.node)) if layer.attn is not None else None
        layout = layouts.get(id(att)) if att is not None else "no attention block"
        if isinstance(layout, str):
            out.missing[p + "attn.*"] = layout
        else:
            _attention(out, linear, p, layout, populate=copy)
        if layer.mlp is not None:
            _mlp(out, linear, p, layer.mlp.linear, populate=copy)
    _norm(out, store, "ln_final", anatomy.final_norm)
    if anatomy.unembed is not None:
        unembed = anatomy.unembed
        out["unembed.W_U"] = linear.weight(unembed, stored=True, populate=copy)
        out["unembed.b_U"] = linear.bias(unembed)
    else:
        out.missing["unembed.*"] = anatomy.unembed_blocker or "no unembedding"
    if names is not None:
        patterns = [names] if isinstance(names, str) else list(names)
        kept = [k for k in out if any(fnmatch.fnmatchcase(k, pat) for pat in patterns)]
        if not kept:
            raise BadInputError(f"no weight matches {', '.join(patterns)}")
        for k in [k for k in out if k not in kept]:
            del out[k]
    dtype = np.dtype(anatomy.unembed.source.dtype.numpy()) if anatomy.unembed is not None else np.float32
    # matrices are copied as stored (nothing is computed from them); norms and biases are read in
    # float64 (a missing bias is float64 zeros): all given back in the model's own dtype
    for k in out:
        out[k] = np.array(out[k], dtype=dtype) if copy else np.asarray(out[k], dtype=dtype)
    return out


def _norm(out: TLWeights, store, key: str, norm) -> None:
    """A norm's w and b, where it keeps them (a folded norm is a bare normaliser: TransformerLens's
    LayerNormPre has no parameters)."""
    if norm is None:
        return
    w = store.read(norm.scale[0].inputs[norm.scale[1]]).reshape(-1) if norm.scale else np.ones(norm.d_model)
    b = store.read(norm.bias[0].inputs[norm.bias[1]]).reshape(-1) if norm.bias else np.zeros(norm.d_model)
    if np.all(w == 1) and np.all(b == 0):
        return
    out[f"{key}.w"] = w
    if norm.centring:
        out[f"{key}.b"] = b


def _attention(out: TLWeights, linear: LinearWeights, p: str, layout, populate: bool) -> None:
    """W_Q/W_K/W_V [heads, d_model, d_head] and their biases, W_O [heads, d_head, d_model], b_O; with
    grouped-query attention the key and value heads as TransformerLens stores them (_W_K, _b_K, ...)."""
    grouped = layout.n_kv_heads < layout.n_heads
    for name, lin, cols in (("Q", layout.q, layout.q_cols), ("K", layout.k, layout.k_cols),
                            ("V", layout.v, layout.v_cols)):
        w, b = linear.weight(lin, stored=True, populate=populate), linear.bias(lin)
        prefix = "_" if grouped and name in "KV" else ""
        out[f"{p}attn.{prefix}W_{name}"] = _per_head(w, cols, axis=1)
        out[f"{p}attn.{prefix}b_{name}"] = np.stack([b[c] for c in cols])
    w_o = linear.weight(layout.o, stored=True, populate=populate)
    out[f"{p}attn.W_O"] = _per_head(w_o, layout.o_rows, axis=0)
    out[f"{p}attn.b_O"] = linear.bias(layout.o)


def _per_head(w: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """`w` taken at `index[h]` along `axis` for each head h, heads first. Where the index steps
    evenly (the layouts exporters write: q|k|v blocks, heads interleaved, separate maps) this is a
    read-only view, so a listing reads no values; otherwise a copy."""
    n, d = index.shape
    start = int(index[0, 0])
    head_step = int(index[1, 0]) - start if n > 1 else 0
    step = int(index[0, 1]) - start if d > 1 else 1
    if head_step < 0 or step <= 0 or not np.array_equal(
            index, start + head_step * np.arange(n)[:, None] + step * np.arange(d)):
        return np.stack([np.take(w, i, axis=axis) for i in index])
    s = w.strides
    if axis == 1:  # [d_model, columns] -> [heads, d_model, d_head]
        return as_strided(w[:, start:], (n, w.shape[0], d), (head_step * s[1], s[0], step * s[1]), writeable=False)
    return as_strided(w[start:], (n, d, w.shape[1]), (head_step * s[0], step * s[0], s[1]), writeable=False)


def _mlp(out: TLWeights, linear: LinearWeights, p: str, down, populate: bool) -> None:
    post, _ = match.back(down.node.inputs[0])
    pre, branch = mlp_branches(post)
    gate = linear_producing(match.back(pre)[0]) if not isinstance(pre, str) else None
    up = linear_producing(match.back(branch)[0]) if not isinstance(branch, str) else None
    if gate is None or (not isinstance(branch, str) and up is None):
        out.missing[p + "mlp.*"] = pre if isinstance(pre, str) else "the MLP's maps are slices of a packed map"
        return

    def weight(lin):
        return linear.weight(lin, stored=True, populate=populate)

    if up is None:  # act(W_in x)
        out[p + "mlp.W_in"], out[p + "mlp.b_in"] = weight(gate), linear.bias(gate)
    else:  # act(W_gate x) * (W_in x)
        out[p + "mlp.W_gate"], out[p + "mlp.W_in"] = weight(gate), weight(up)
        out[p + "mlp.b_in"] = linear.bias(up)
    out[p + "mlp.W_out"], out[p + "mlp.b_out"] = weight(down), linear.bias(down)
