"""Gemma 2/3, Qwen3, OLMo 2 and Phi-3 processed: every matrix that reads a stream norm holds that
norm's scale (Gemma's 1 + w included), the unembedding holds the final norm's and is centred
(not on Gemma 2, whose logits are soft-capped), and nothing else changes. Checked against the
HuggingFace weights folded here, and against TransformerLens 4.x's own processing
(TransformerBridge in compatibility mode) for the families it processes.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lensgraph.graph.anatomy import analyse
from lensgraph.store.model import LensModel
from lensgraph.store.weights import LinearWeights
from tl_bridge import tiny_tokenizer

FAMILIES = ["gemma2", "gemma3", "qwen3", "olmo2", "phi3"]
FORMS = ["torchscript17", "dynamo"]
SOFTCAPPED = {"gemma2"}
TL_PROCESSES = {"gemma2", "gemma3", "qwen3", "phi3"}  # TransformerLens 4.3 does not fold OLMo 2's norms
ATTENTION = ("q_proj", "k_proj", "v_proj", "qkv_proj")
MLP = ("gate_proj", "up_proj", "gate_up_proj")


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def effective_scale(family: str, norm) -> np.ndarray:
    w = np64(norm.weight)
    return 1.0 + w if family.startswith("gemma") else w  # Gemma's RMSNorm multiplies by (1 + w)


def maps(module, names) -> list[np.ndarray]:
    """The named linear maps of `module`, as [in, out]."""
    return [np64(getattr(module, n).weight).T for n in names if hasattr(module, n)]


def assert_one_to_one(ours: list[np.ndarray], expected: list[np.ndarray], what: str) -> None:
    if len(ours) == 1 and len(expected) > 1:  # a packed map (Phi-3's qkv_proj, gate_up_proj)
        expected = [np.concatenate(expected, axis=1)]
    assert len(ours) == len(expected), what
    left = list(expected)
    for o in ours:
        hit = next((i for i, e in enumerate(left) if e.shape == o.shape
                    and np.abs(o - e).max() <= 1e-5 * max(np.abs(e).max(), 1e-6)), None)
        assert hit is not None, f"{what}: a rewritten matrix matches none expected"
        left.pop(hit)


def ours(family_exports, family, form):
    path, report = family_exports.processed(family, form)
    model = LensModel.load(path)
    return report, analyse(model.graph), LinearWeights(model.weights)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_folds_against_hf_weights(family_exports, family, form):
    report, anatomy, linear = ours(family_exports, family, form)
    assert report["verification"]["ok"] and report["verification"]["max_rel_diff"] <= 1e-4
    hf = family_exports.model(family)
    for layer, block in zip(anatomy.layers, hf.model.layers):
        what = f"{family} {form} block {layer.index}"
        if family == "olmo2":  # no norm reads the stream before a sublayer: the maps stay as they were
            assert layer.ln1 is None and layer.ln2 is None
            assert_one_to_one([linear.weight(a.v) for a in anatomy.attention if a.layer == layer.index],
                              maps(block.self_attn, ("v_proj",)), what + " v_proj")
            continue
        scale1 = effective_scale(family, block.input_layernorm)
        ln2 = block.pre_feedforward_layernorm if family.startswith("gemma") else block.post_attention_layernorm
        assert_one_to_one([linear.weight(r) for r in layer.ln1.readers],
                          [scale1[:, None] * w for w in maps(block.self_attn, ATTENTION)], what + " ln1 readers")
        assert_one_to_one([linear.weight(r) for r in layer.ln2.readers],
                          [effective_scale(family, ln2)[:, None] * w for w in maps(block.mlp, MLP)],
                          what + " ln2 readers")
        for w in (layer.attn, layer.mlp):  # the maps written through sublayer-output norms are untouched
            expected = maps(block.self_attn, ("o_proj",)) if w is layer.attn else maps(block.mlp, ("down_proj",))
            assert_one_to_one([linear.weight(w.linear)], expected, what + f" {w.role}")
    w_u = effective_scale(family, hf.model.norm)[:, None] * np64(hf.lm_head.weight).T
    if family not in SOFTCAPPED:
        w_u = w_u - w_u.mean(axis=1, keepdims=True)
    assert_one_to_one([linear.weight(anatomy.unembed)], [w_u], f"{family} {form} unembedding")
    for norm in anatomy.norms:  # head and sublayer-output norms keep their scales
        if norm.role in ("head", "sublayer_output"):
            node, idx = norm.scale
            assert not np.all(linear.store.read(node.inputs[idx]) == 1.0), norm.name


@pytest.mark.parametrize("family", sorted(TL_PROCESSES))
def test_folds_match_transformerlens(family_exports, family):
    from transformer_lens.model_bridge import TransformerBridge

    hf = family_exports.model(family)
    bridge = TransformerBridge.boot_transformers(type(hf).__name__, hf_model=copy.deepcopy(hf),
                                                 tokenizer=tiny_tokenizer(hf.config.vocab_size))
    bridge.enable_compatibility_mode()  # TransformerLens's from_pretrained processing
    tl = {k: np64(v) for k, v in bridge.state_dict().items()}
    _, anatomy, linear = ours(family_exports, family, "dynamo")
    for layer in anatomy.layers:
        p = f"blocks.{layer.index}."
        assert_one_to_one([linear.weight(r) for r in layer.ln1.readers],
                          [tl[p + f"attn.{n}.weight"].T for n in "qkv"], p + "attn")
        assert_one_to_one([linear.weight(r) for r in layer.ln2.readers],
                          [tl[p + f"mlp.{n}.weight"].T for n in ("gate", "in")], p + "mlp")
    w_u = tl["unembed.weight"]
    w_u = w_u.T if w_u.shape[0] == hf.config.vocab_size else w_u
    assert_one_to_one([linear.weight(anatomy.unembed)], [w_u], "unembed")
