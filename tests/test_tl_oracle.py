"""TransformerLens as the oracle: the same HF weights processed by TL and by lensgraph agree."""

from __future__ import annotations

import numpy as np
import pytest

from lensgraph.graph import match
from lensgraph.graph.anatomy import analyse
from lensgraph.store.model import LensModel
from lensgraph.process import process
from lensgraph.store.weights import LinearWeights
from lensgraph import tiny_models
from tl_reference import gpt2_tl_processed, llama_tl_processed, neox_tl_processed


def onnx_as_tl(path: str, n_heads: int) -> dict[str, np.ndarray]:
    """Read a processed GPT-2 graph back into TL's names and shapes, through the anatomy."""
    model = LensModel.load(path)
    a = analyse(model.graph)
    linear = LinearWeights(model.weights)
    out = {}
    for w in a.writers:
        if w.kind == "embed":
            table, _ = match.back(w.node.inputs[w.idx], {"Identity"})
            out["embed.W_E" if w.role == "embed" else "pos_embed.W_pos"] = model.weights.read(table)
    d = a.d_model
    d_head = d // n_heads
    mlp_out = {w.layer: w.linear for w in a.writers if w.role == "mlp_out"}
    for att in a.attention:
        p = f"blocks.{att.layer}."
        qkv, bias = linear.weight(att.v), linear.bias(att.v)
        for i, name in enumerate("QKV"):
            out[p + f"attn.W_{name}"] = qkv[:, i * d:(i + 1) * d].reshape(d, n_heads, d_head).transpose(1, 0, 2)
            out[p + f"attn.b_{name}"] = bias[i * d:(i + 1) * d].reshape(n_heads, d_head)
        out[p + "attn.W_O"] = linear.weight(att.o).reshape(n_heads, d_head, d)
        out[p + "attn.b_O"] = linear.bias(att.o)
        ln2 = [n for n in a.norms if n.layer == att.layer][1]
        (fc,) = ln2.readers
        out[p + "mlp.W_in"], out[p + "mlp.b_in"] = linear.weight(fc), linear.bias(fc)
        proj = mlp_out[att.layer]
        out[p + "mlp.W_out"], out[p + "mlp.b_out"] = linear.weight(proj), linear.bias(proj)
    out["unembed.W_U"], out["unembed.b_U"] = linear.weight(a.unembed), linear.bias(a.unembed)
    return out


MATRICES = ["embed.W_E", "pos_embed.W_pos", "unembed.W_U", "unembed.b_U"] + [
    f"blocks.{l}.{k}"
    for l in range(2)
    for k in ("attn.W_Q", "attn.W_K", "attn.W_V", "attn.b_Q", "attn.b_K", "attn.b_V", "attn.W_O", "attn.b_O",
              "mlp.W_in", "mlp.b_in", "mlp.W_out", "mlp.b_out")
]


@pytest.mark.parametrize("form", ["torchscript17", "torchscript14", "dynamo"])
def test_matches_transformerlens_process_weights(gpt2_hf, gpt2_exports, tmp_path, form):
    out = tmp_path / "tl.onnx"
    process(gpt2_exports[form], out)
    ours = onnx_as_tl(str(out), gpt2_hf.config.n_head)
    theirs = gpt2_tl_processed(gpt2_hf)
    assert set(MATRICES) <= set(ours)
    for key in MATRICES:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_unprocessed_graph_differs_from_transformerlens(gpt2_hf, gpt2_exports):
    """Guards the comparison itself: the raw export must not already match TL's output."""
    ours = onnx_as_tl(gpt2_exports["dynamo"], gpt2_hf.config.n_head)
    theirs = gpt2_tl_processed(gpt2_hf)
    assert not np.allclose(ours["blocks.0.attn.W_Q"], theirs["blocks.0.attn.W_Q"], atol=1e-5)
    assert not np.allclose(ours["unembed.W_U"], theirs["unembed.W_U"], atol=1e-5)


def _scope(node) -> str:
    """Where a node came from: its TorchScript name or dynamo's name-scope metadata."""
    return (node.name or "") + node.metadata_props.get("pkg.torch.onnx.name_scopes", "")


def _common(model, a, linear) -> dict:
    out = {"unembed.W_U": linear.weight(a.unembed)}
    for w in a.writers:
        if w.role == "embed":
            out["embed.W_E"] = model.weights.read(match.back(w.node.inputs[w.idx], {"Identity"})[0])
    return out


def neox_onnx_as_tl(path: str, n_heads: int) -> dict[str, np.ndarray]:
    """GPT-NeoX: query_key_value's output columns are interleaved per head as [head, q|k|v, d_head]."""
    model = LensModel.load(path)
    a = analyse(model.graph)
    linear = LinearWeights(model.weights)
    out = _common(model, a, linear)
    out["unembed.b_U"] = linear.bias(a.unembed)
    d = a.d_model
    dh = d // n_heads
    mlp_out = {w.layer: w.linear for w in a.writers if w.role == "mlp_out"}
    for att in a.attention:
        p = f"blocks.{att.layer}."
        w = linear.weight(att.v).reshape(d, n_heads, 3, dh)
        b = linear.bias(att.v).reshape(n_heads, 3, dh)
        for i, name in enumerate("QKV"):
            out[p + f"attn.W_{name}"] = w[:, :, i].transpose(1, 0, 2)
            out[p + f"attn.b_{name}"] = b[:, i]
        out[p + "attn.W_O"] = linear.weight(att.o).reshape(n_heads, dh, d)
        out[p + "attn.b_O"] = linear.bias(att.o)
        ln2 = next(n for n in a.norms if n.layer == att.layer and all(r.node is not att.v.node for r in n.readers))
        (fc,) = ln2.readers
        out[p + "mlp.W_in"], out[p + "mlp.b_in"] = linear.weight(fc), linear.bias(fc)
        out[p + "mlp.W_out"], out[p + "mlp.b_out"] = linear.weight(mlp_out[att.layer]), linear.bias(mlp_out[att.layer])
    return out


def llama_onnx_as_tl(path: str, n_heads: int, n_kv: int) -> dict[str, np.ndarray]:
    """LLaMA: separate q/k/v maps (k and v narrower under grouped-query attention), gated MLP."""
    model = LensModel.load(path)
    a = analyse(model.graph)
    linear = LinearWeights(model.weights)
    out = _common(model, a, linear)
    d = a.d_model
    dh = d // n_heads
    mlp_out = {w.layer: w.linear for w in a.writers if w.role == "mlp_out"}
    for att in a.attention:
        p = f"blocks.{att.layer}."
        ln1, ln2 = [n for n in a.norms if n.layer == att.layer]
        by = {name: next(r for r in ln1.readers if f"{name}_proj" in _scope(r.node)) for name in "qkv"}
        out[p + "attn.W_Q"] = linear.weight(by["q"]).reshape(d, n_heads, dh).transpose(1, 0, 2)
        out[p + "attn._W_K"] = linear.weight(by["k"]).reshape(d, n_kv, dh).transpose(1, 0, 2)
        out[p + "attn._W_V"] = linear.weight(by["v"]).reshape(d, n_kv, dh).transpose(1, 0, 2)
        out[p + "attn.W_O"] = linear.weight(att.o).reshape(n_heads, dh, d)
        gate = next(r for r in ln2.readers if "gate_proj" in _scope(r.node))
        up = next(r for r in ln2.readers if "up_proj" in _scope(r.node))
        out[p + "mlp.W_gate"], out[p + "mlp.W_in"] = linear.weight(gate), linear.weight(up)
        out[p + "mlp.W_out"] = linear.weight(mlp_out[att.layer])
    return out


@pytest.mark.parametrize("form", ["torchscript17", "dynamo"])
def test_neox_matches_transformerlens(family_exports, tmp_path, form):
    out = tmp_path / "neox.onnx"
    process(family_exports("gpt_neox", form), out)
    hf = tiny_models.build("gpt_neox", seed=7)
    ours = neox_onnx_as_tl(str(out), hf.config.num_attention_heads)
    theirs = neox_tl_processed(hf)
    keys = [k for k in theirs if not k.startswith(("blocks.0.ln", "blocks.1.ln", "ln_final"))]
    assert set(keys) == set(ours)
    for key in keys:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("form", ["torchscript17", "dynamo"])
def test_llama_matches_transformerlens(family_exports, tmp_path, form):
    out = tmp_path / "llama.onnx"
    process(family_exports("llama", form), out)
    hf = tiny_models.build("llama", seed=7)
    ours = llama_onnx_as_tl(str(out), hf.config.num_attention_heads, hf.config.num_key_value_heads)
    theirs = llama_tl_processed(hf)
    keys = [k for k in theirs if not k.startswith(("blocks.0.ln", "blocks.1.ln", "ln_final"))]
    assert set(keys) == set(ours)
    for key in keys:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-5, err_msg=key)
