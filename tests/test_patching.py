"""The patching sweeps equal TransformerLens's `patching` functions on the same weights (GPT-2,
processed as TransformerLens's compatibility mode processes it), with the same metric."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hf_oracle import relative_error
from lensgraph import run_with_cache
from lensgraph.errors import BadInputError
from lensgraph.interp import patching
from tl_bridge import tiny_tokenizer

CLEAN = np.random.default_rng(11).integers(0, 96, (2, 5))
CORRUPTED = CLEAN.copy()
CORRUPTED[:, 1] = (CLEAN[:, 1] + 7) % 96
SWEEPS = ["resid_pre", "resid_mid", "attn_out", "mlp_out", "attn_head_out_all_pos", "attn_head_out_by_pos",
          "attn_head_v_by_pos", "attn_head_pattern_all_pos"]


def logit_diff(logits):
    """Works on numpy and torch alike: the answer's logit over a distractor's, at the last position."""
    return (logits[:, -1, 3] - logits[:, -1, 4]).mean()


@pytest.fixture(scope="module")
def bridge(family_exports):
    from transformer_lens.model_bridge import TransformerBridge

    hf = family_exports.model("gpt2")
    tl = TransformerBridge.boot_transformers("gpt2", hf_model=copy.deepcopy(hf), tokenizer=tiny_tokenizer(96))
    tl.enable_compatibility_mode()
    return tl


@pytest.mark.parametrize("sweep", SWEEPS)
def test_patching_sweeps_equal_transformerlens(family_exports, bridge, sweep):
    from transformer_lens import patching as tl_patching

    path = family_exports.processed("gpt2", "torchscript17")[0]
    template = patching.SWEEPS[sweep][0]
    _, clean_cache = run_with_cache(path, CLEAN, points=[template.format(l="*")])
    with torch.no_grad():
        _, tl_clean = bridge.run_with_cache(torch.tensor(CLEAN))
        theirs = getattr(tl_patching, f"get_act_patch_{sweep}")(bridge, torch.tensor(CORRUPTED), tl_clean,
                                                                 logit_diff).numpy()
    ours = getattr(patching, f"get_act_patch_{sweep}")(path, CORRUPTED, clean_cache, logit_diff,
                                                       tokens_per_forward=24)  # several forwards per sweep
    assert ours.shape == theirs.shape
    assert relative_error(ours, theirs) <= 1e-4, relative_error(ours, theirs)
    # each patch's effect (against the unpatched corrupted run) too, sharper when the effects are small
    before = float(logit_diff(run_with_cache(path, CORRUPTED, points=[])[0]))
    with torch.no_grad():
        tl_before = float(logit_diff(bridge(torch.tensor(CORRUPTED))))
    assert np.abs(ours - before).max() > 1e-5, "the patches changed nothing"
    assert relative_error(ours - before, theirs - tl_before) <= 1e-2


def test_patching_refuses_a_clean_cache_of_another_shape(family_exports):
    path = family_exports.processed("gpt2", "torchscript17")[0]
    _, clean = run_with_cache(path, CLEAN[:1], points=["blocks.*.hook_resid_pre"])
    with pytest.raises(BadInputError, match="batch of 2 prompts of 5 tokens"):
        patching.get_act_patch_resid_pre(path, CORRUPTED, clean, logit_diff)
    with pytest.raises(BadInputError, match="must return one number"):
        _, clean = run_with_cache(path, CLEAN, points=["blocks.*.hook_resid_pre"])
        patching.get_act_patch_resid_pre(path, CORRUPTED, clean, lambda logits: logits[:, -1, 3])
