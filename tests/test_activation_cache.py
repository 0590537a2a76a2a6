"""The cache helpers against TransformerLens 4.3's own ActivationCache on the same model and input:
TransformerLens's bridge in compatibility mode (its default processing) beside the same HF weights
processed by lensgraph."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import lensgraph
from tl_bridge import tiny_tokenizer

IDS = np.random.default_rng(4).integers(0, 96, (2, 6))


@pytest.fixture(scope="module")
def both(family_exports):
    from transformer_lens.model_bridge import TransformerBridge

    hf = family_exports.model("gpt2")
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=copy.deepcopy(hf), tokenizer=tiny_tokenizer(96))
    bridge.enable_compatibility_mode()
    with torch.no_grad():
        _, theirs = bridge.run_with_cache(torch.tensor(IDS))
    path, _ = family_exports.processed("gpt2", "torchscript17")
    _, ours = lensgraph.run_with_cache(path, IDS)
    return ours, theirs


def same(a, b, rel=1e-5):
    a, b = np.asarray(a, np.float64), b.detach().double().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) <= rel * max(float(np.abs(b).max()), 1e-9)


@pytest.mark.parametrize("kwargs", [dict(), dict(apply_ln=True), dict(incl_mid=True), dict(layer=1, apply_ln=True),
                                    dict(layer=1, mlp_input=True, apply_ln=True), dict(apply_ln=True, pos_slice=-1)])
def test_accumulated_resid(both, kwargs):
    ours, theirs = both
    a, labels = ours.accumulated_resid(return_labels=True, **kwargs)
    b, tl_labels = theirs.accumulated_resid(return_labels=True, **kwargs)
    assert labels == tl_labels and same(a, b)


@pytest.mark.parametrize("kwargs", [dict(), dict(apply_ln=True), dict(mode="attn"), dict(layer=1, mlp_input=True)])
def test_decompose_resid(both, kwargs):
    ours, theirs = both
    a, labels = ours.decompose_resid(return_labels=True, **kwargs)
    b, tl_labels = theirs.decompose_resid(return_labels=True, **kwargs)
    assert labels == tl_labels and same(a, b)


def test_stack_head_results_and_logit_attrs(both):
    ours, theirs = both
    a, labels = ours.stack_head_results(return_labels=True, incl_remainder=True, pos_slice=-1, apply_ln=True)
    b, tl_labels = theirs.stack_head_results(return_labels=True, incl_remainder=True, pos_slice=-1, apply_ln=True)
    assert labels == tl_labels and same(a, b)
    resid = ours.decompose_resid(pos_slice=-1)
    answer, wrong = np.array([7, 3]), np.array([2, 9])
    got = ours.logit_attrs(resid, tokens=answer, incorrect_tokens=wrong, pos_slice=-1)
    expected = theirs.logit_attrs(theirs.decompose_resid(pos_slice=-1), tokens=torch.tensor(answer),
                                  incorrect_tokens=torch.tensor(wrong), pos_slice=-1)
    assert same(got, expected)


def test_the_cache_is_still_a_mapping(both):
    ours, _ = both
    assert isinstance(ours, dict) and "blocks.0.hook_resid_pre" in ours and isinstance(ours["hook_embed"], np.ndarray)


def test_hook_result_is_transformerlens_head_results(both, family_exports):
    """hook_result, added only when asked for, is TransformerLens's z through each head's W_O."""
    _, theirs = both
    path, _ = family_exports.processed("gpt2", "torchscript17")
    _, ours = lensgraph.run_with_cache(path, IDS, points=["blocks.*.attn.hook_result"])
    theirs.compute_head_results()
    for l in range(2):
        assert same(ours[f"blocks.{l}.attn.hook_result"], theirs[f"blocks.{l}.attn.hook_result"])
    _, default = lensgraph.run_with_cache(path, IDS)
    assert not [n for n in default if n.endswith("hook_result")]
