"""Hook points on GPT-NeoX (parallel attention and MLP, rotary) and LLaMA (RMSNorm, gated MLP,
grouped values), checked against HuggingFace's own hidden states and attentions.

On a processed LayerNorm model the residual stream is centred, so resid_pre is HF's stream
minus its mean; an RMSNorm stream cannot be centred, so there it is HF's stream itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import feeds
from lensgraph import run_with_cache
from lensgraph.tiny_models import randomise_1d
from lensgraph.graph.hookpoints import all_names, place
from lensgraph.store.model import LensModel
from lensgraph.process import process

FORMS = {"torchscript17": dict(exporter="torchscript", opset=17), "dynamo": dict(exporter="dynamo")}
LAYERNORM = {"neox": True, "llama": False}
# Points these families do not have, whatever the anatomy finds.
ABSENT = {
    "neox": {"hook_pos_embed", "blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid"},  # rotary; parallel block
    "llama": {"hook_pos_embed"},  # rotary
}
def tiny(family: str):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, attn_implementation="eager")
    if family == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(rotary_pct=0.25, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))
    model.eval()
    randomise_1d(model, 0)
    return model


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(family, form) -> (HF model, processed ONNX path)."""
    from lensgraph.export import export_model

    folder = tmp_path_factory.mktemp("families")
    out = {}
    for family in LAYERNORM:
        hf = tiny(family)
        for form, kwargs in FORMS.items():
            path = folder / f"{family}-{form}.onnx"
            export_model(hf, path, **kwargs)
            processed = folder / f"{family}-{form}.lens.onnx"
            process(path, processed)
            out[family, form] = (hf, str(processed))
    return out


def hf_run(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids), output_hidden_states=True, output_attentions=True)


def close(a, b, rel=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and float(np.abs(a - b).max()) <= rel * max(float(np.abs(b).max()), 1e-6)


CASES = [pytest.param(f, form, id=f"{f}-{form}")
         for f in LAYERNORM for form in FORMS]


@pytest.mark.parametrize("family,form", CASES)
def test_every_point_the_family_has_is_placed(zoo, family, form):
    placement = place(LensModel.load(zoo[family, form][1]).graph)
    assert set(placement.unplaced) == ABSENT[family], placement.unplaced
    assert set(placement.points) == set(all_names(2)) - ABSENT[family]


@pytest.mark.parametrize("family,form", CASES)
def test_attention_pattern_is_hf_attention(zoo, family, form):
    hf, path = zoo[family, form]
    ids = feeds(2, 6)["input_ids"]
    _, cache = run_with_cache(path, ids, points=["blocks.*.attn.hook_pattern"])
    out = hf_run(hf, ids)
    for l in range(2):
        assert close(cache[f"blocks.{l}.attn.hook_pattern"], out.attentions[l].numpy()), l


@pytest.mark.parametrize("family,form", CASES)
def test_resid_pre_is_hf_stream(zoo, family, form):
    hf, path = zoo[family, form]
    ids = feeds(2, 6, seed=1)["input_ids"]
    _, cache = run_with_cache(path, ids, points=["blocks.*.hook_resid_pre"])
    out = hf_run(hf, ids)
    for l in range(2):
        stream = out.hidden_states[l].numpy()
        if LAYERNORM[family]:
            stream = stream - stream.mean(-1, keepdims=True)
        assert close(cache[f"blocks.{l}.hook_resid_pre"], stream), l
