"""Every hook point lensgraph places, on every family and exporter form, equals the activation it
names in the HuggingFace modules themselves (read with torch forward hooks); the points a family
lacks are absent with a reason; and the stream's identities hold:

    resid_mid = resid_pre + attn_out      resid_post = resid_mid + mlp_out
    (parallel blocks: resid_post = resid_pre + attn_out + mlp_out)
    resid_pre[l + 1] = resid_post[l]      hook_embed (+ hook_pos_embed) = resid_pre[0]
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from hf_oracle import hf_points, relative_error
from lensgraph import run_with_cache
from lensgraph.graph.hookpoints import place, template
from lensgraph.process import process
from lensgraph.store.model import LensModel

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "optimum")
FAMILIES = ["gpt2", "gpt_neox", "llama", "gemma2", "gemma3", "qwen3", "olmo2", "phi3"]
FORMS = ["torchscript17", "dynamo"]
ROTARY = {"hook_pos_embed"}
UNGATED = {"blocks.*.mlp.hook_pre_linear"}  # GPT-2 and NeoX: act(W_in x), no linear branch
UNROTATED = {"blocks.*.attn.hook_rot_q", "blocks.*.attn.hook_rot_k"}
# q/k norms between the maps and the product: the per-head columns are not measured through them
HEAD_NORMED = {f"blocks.*.attn.hook_{n}" for n in ("q", "k", "v", "rot_q", "rot_k", "result")}
ABSENT = {
    "gpt2": UNGATED | UNROTATED,
    "gpt_neox": ROTARY | UNGATED | {"blocks.*.hook_resid_mid"},  # parallel attention and MLP
    "olmo2": ROTARY | HEAD_NORMED | {f"blocks.*.ln{i}.hook_{p}" for i in (1, 2) for p in ("scale", "normalized")},
    "gemma3": ROTARY | HEAD_NORMED, "qwen3": ROTARY | HEAD_NORMED,
    # optimum's scaled-dot-product export scales the queries and keys before their product: the codes
    # that measure the heads do not come out whole there
    "optimum-gpt2": UNGATED | UNROTATED | HEAD_NORMED, "optimum-llama": ROTARY | HEAD_NORMED,
}
PARALLEL = {"gpt_neox"}
TOLERANCE = 1e-4
IDS = np.random.default_rng(3).integers(0, 96, (2, 6))


def check_points(path: str, hf, family: str, processed: bool) -> dict:
    model = LensModel.load(path)
    placement = place(model.graph, model=model)
    absent = ABSENT.get(family, ROTARY)
    assert {template(n) for n in placement.unplaced} == absent, placement.unplaced
    assert all(placement.unplaced.values())
    _, cache = run_with_cache(path, IDS)
    oracle = hf_points(hf, IDS, processed)
    check_scores(cache, oracle)
    drop_rotated(cache)
    for name in [n for n in oracle if n not in placement.points and template(n) in absent]:
        oracle.pop(name)  # what HF has but the graph cannot show with certainty (said why above)
    assert set(cache) == set(oracle), set(cache) ^ set(oracle)
    wrong = {name: relative_error(cache[name], oracle[name]) for name in oracle}
    assert all(err <= TOLERANCE for err in wrong.values()), {k: e for k, e in wrong.items() if e > TOLERANCE}
    check_identities(cache, family in PARALLEL, hf.config.num_hidden_layers)
    return cache


def check_scores(cache: dict, oracle: dict) -> None:
    """hook_attn_scores is no module's output in HF: checked through HF's pattern (its softmax) and
    TransformerLens's masking (the future is -inf), then taken out of the cache."""
    for name in [n for n in cache if n.endswith("attn.hook_attn_scores")]:
        scores = cache.pop(name)
        pattern = oracle[name.replace("hook_attn_scores", "hook_pattern")]
        e = np.exp(scores - scores.max(-1, keepdims=True))
        assert relative_error(e / e.sum(-1, keepdims=True), pattern) <= TOLERANCE, name
        q, k = np.triu_indices(scores.shape[-1], 1)
        assert np.all(np.isneginf(scores[..., q, k])), name


def drop_rotated(cache: dict) -> None:
    """hook_rot_q/rot_k are no module's output in HF: test_hooks compares them with TransformerLens."""
    for name in [n for n in cache if "hook_rot_" in n]:
        cache.pop(name)


def check_identities(cache: dict, parallel: bool, n_layers: int) -> None:
    def same(a, b, what):
        assert relative_error(a, b) <= 1e-5, what

    embed = cache["hook_embed"] + cache.get("hook_pos_embed", 0)
    same(embed, cache["blocks.0.hook_resid_pre"], "hook_embed (+ hook_pos_embed) = resid_pre[0]")
    for l in range(n_layers):
        p = f"blocks.{l}."
        pre, post = cache[p + "hook_resid_pre"], cache[p + "hook_resid_post"]
        attn, mlp = cache[p + "hook_attn_out"], cache[p + "hook_mlp_out"]
        if parallel:
            same(pre + attn + mlp, post, f"{p}resid_post = resid_pre + attn_out + mlp_out")
        else:
            same(pre + attn, cache[p + "hook_resid_mid"], f"{p}resid_mid = resid_pre + attn_out")
            same(cache[p + "hook_resid_mid"] + mlp, post, f"{p}resid_post = resid_mid + mlp_out")
        if l + 1 < n_layers:
            same(post, cache[f"blocks.{l + 1}.hook_resid_pre"], f"resid_pre[{l + 1}] = resid_post[{l}]")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_processed_model_hook_points_are_hf_activations(family_exports, family, form):
    path, report = family_exports.processed(family, form)
    assert report["written"]
    check_points(path, family_exports.model(family), family, processed=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_unprocessed_model_hook_points_are_hf_activations(family_exports, family):
    check_points(family_exports(family, "torchscript17"), family_exports.model(family), family, processed=False)


# -- optimum's exports (text-generation-with-past), made by scripts/make_optimum_fixtures.py -------
@pytest.fixture(scope="module")
def optimum(tmp_path_factory):
    """family -> (HF model, the export, the export processed, the process report)."""
    folder = tmp_path_factory.mktemp("optimum")
    out = {}
    for family in ("gpt2", "llama"):
        hf = AutoModelForCausalLM.from_pretrained(os.path.join(DATA, family, "checkpoint"),
                                                  attn_implementation="eager").eval()
        src = os.path.join(DATA, family, "model.onnx")
        dst = str(folder / f"{family}.lens.onnx")
        out[family] = (hf, src, dst, process(src, dst))
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_optimum_export_is_processed_with_every_block_found(optimum, family):
    hf, src, dst, report = optimum[family]
    assert report["verification"]["ok"]
    passes = {p["name"]: p for p in report["passes"]}
    assert passes["fold_ln"]["rewritten"] == 5 and passes["center_unembed"]["rewritten"] == 1
    if family == "gpt2":  # value biases through the packed c_attn, and the centred stream
        assert passes["fold_value_biases"]["rewritten"] == 2 and passes["center_writing_weights"]["rewritten"] == 6
    anatomy = place(LensModel.load(src).graph).anatomy
    assert len(anatomy.layers) == len(anatomy.attention) == 2
    assert [(w.role, w.layer) for w in anatomy.writers if w.kind == "linear"] == [
        ("attn_out", 0), ("mlp_out", 0), ("attn_out", 1), ("mlp_out", 1)]


@pytest.mark.parametrize("processed", [False, True], ids=["export", "processed"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_optimum_hook_points_are_hf_activations(optimum, family, processed):
    hf, src, dst, _ = optimum[family]
    cache = check_points(dst if processed else src, hf, f"optimum-{family}", processed)
    if family == "gpt2":
        assert "hook_pos_embed" in cache  # wpe gathered at the position_ids input


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_onnxruntime_optimised_graph_points_are_right_or_absent(family_exports, tmp_path, family):
    """After onnxruntime's transformer optimizer (Skip*Normalization fusing the residual sums, biases
    moved into them) a point is either the HF activation or absent with its reason."""
    from test_forms import ort_optimised

    path = ort_optimised(family_exports(family, "torchscript17"), str(tmp_path / "opt.onnx"), "gpt2")
    model = LensModel.load(path)
    placement = place(model.graph, model=model)
    assert len(placement.points) >= 15 and all(placement.unplaced.values())
    _, cache = run_with_cache(path, IDS)
    oracle = hf_points(family_exports.model(family), IDS, processed=False)
    assert set(cache) == {n for n in placement.points if not n.endswith("hook_result")}  # that one: when named
    check_scores(cache, oracle)
    drop_rotated(cache)
    wrong = {name: relative_error(cache[name], oracle[name]) for name in cache}
    assert all(err <= TOLERANCE for err in wrong.values()), {k: e for k, e in wrong.items() if e > TOLERANCE}
