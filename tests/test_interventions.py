"""Interventions at hook points equal HuggingFace with a torch hook making the same change at the
same module, and TransformerLens's run_with_hooks on the same weights.

The four changes, on every family and exporter form, processed and not: zero-ablating one head's
hook_z, mean-ablating one MLP neuron, replacing hook_resid_pre at one position with another
prompt's, and adding a vector to hook_resid_post. Each is made by a hook function
(run_with_hooks) and declaratively (ablate, patch, add). On a model processed with
fold_value_biases, hook_z holds each head's output without its value bias (as in TransformerLens),
so zeroing it in HF terms sets the head's z to that bias.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hf_oracle import _get, _value_bias, family_of, logits_under, relative_error
from lensgraph import ablate, add, patch, run_with_cache, run_with_hooks, run_with_interventions
from lensgraph.errors import BadInputError
from lensgraph.verify import centred
from tl_bridge import tiny_tokenizer

FAMILIES = ["gpt2", "gpt_neox", "llama", "qwen3", "gemma3"]
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
IDS = np.random.default_rng(3).integers(0, 96, (2, 6))
OTHER = np.random.default_rng(4).integers(0, 96, (2, 6))
HEAD, LAYER, NEURON, POS = 1, 1, 3, 2
Z, POST, PRE, RESID = ("blocks.1.attn.hook_z", "blocks.0.mlp.hook_post", "blocks.1.hook_resid_pre",
                       "blocks.0.hook_resid_post")
VECTOR = np.random.default_rng(5).normal(0, 1.0, 32).astype(np.float32)
TOLERANCE = 1e-4


def gap(ours, theirs) -> float:
    return relative_error(centred(np.asarray(ours, np.float64)), centred(np.asarray(theirs, np.float64)))


def effect_gap(ours, ours_before, theirs, theirs_before) -> float:
    """How far the change a intervention makes to the (centred) logits is from HF's, relative to
    its size: sharper than comparing the logits when the change is small."""
    c = lambda x: centred(np.asarray(x, np.float64))  # noqa: E731
    return relative_error(c(ours) - c(ours_before), c(theirs) - c(theirs_before))


# -- HuggingFace with torch hooks: the oracle ----------------------------------------------------
def hf_logits(hf, ids, change: str, processed: bool) -> np.ndarray:
    fam = family_of(hf)
    layers = _get(hf, fam["layers"])
    cfg = hf.config
    n_heads = cfg.num_attention_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    handles = []
    if change == "z":  # the head's slice of the output projection's input
        bias = _value_bias(hf, layers[LAYER], n_heads, d_head)[HEAD] if processed else np.zeros(d_head)

        def z_hook(module, args):
            x = args[0].clone()
            x[..., HEAD * d_head:(HEAD + 1) * d_head] = torch.tensor(bias, dtype=x.dtype)
            return (x,) + args[1:]
        handles.append(_get(layers[LAYER], fam["o"]).register_forward_pre_hook(z_hook))
    elif change == "neuron":  # the MLP's activation entering its output projection

        def neuron_hook(module, args):
            x = args[0].clone()
            x[..., NEURON] = x[..., NEURON].mean()
            return (x,) + args[1:]
        handles.append(_get(layers[0], fam["down"]).register_forward_pre_hook(neuron_hook))
    elif change == "resid":  # block 1's input at one position, from a run on the other prompt
        seen = {}

        def grab(module, args, kwargs):
            seen["x"] = (args[0] if args else kwargs["hidden_states"]).clone()
        h = layers[LAYER].register_forward_pre_hook(grab, with_kwargs=True)
        with torch.no_grad():
            hf(torch.tensor(OTHER))
        h.remove()

        def resid_hook(module, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).clone()
            x[:, POS] = seen["x"][:, POS]
            if args:
                return (x,) + args[1:], kwargs
            return args, {**kwargs, "hidden_states": x}
        handles.append(layers[LAYER].register_forward_pre_hook(resid_hook, with_kwargs=True))
    elif change == "vector":  # added to block 0's output

        def vector_hook(module, args, output):
            v = torch.tensor(VECTOR)
            return (output[0] + v,) + tuple(output[1:]) if isinstance(output, tuple) else output + v
        handles.append(layers[0].register_forward_hook(vector_hook))
    return logits_under(hf, ids, handles)


# -- the same changes as hook functions (numpy here, torch in TransformerLens) ---------------------
def hook_functions(other_resid):
    def zero_head(z, hook):
        z[:, :, HEAD] = 0
        return z

    def mean_neuron(x, hook):
        x[..., NEURON] = x[..., NEURON].mean()
        return x

    def replace_resid(x, hook):
        x[:, POS] = other_resid[:, POS]
        return x

    def add_vector(x, hook):
        return x + (torch.tensor(VECTOR) if isinstance(x, torch.Tensor) else VECTOR)

    return {"z": (Z, zero_head), "neuron": (POST, mean_neuron), "resid": (PRE, replace_resid),
            "vector": (RESID, add_vector)}


def declared(other_resid):
    return {"z": ablate(Z, heads=[HEAD]), "neuron": ablate(POST, neurons=[NEURON], value="mean"),
            "resid": patch(PRE, other_resid, positions=[POS]), "vector": add(RESID, VECTOR)}


CHANGES = ["z", "neuron", "resid", "vector"]


@pytest.mark.parametrize("processed", [False, True], ids=["export", "processed"])
@pytest.mark.parametrize("form", ["torchscript17", "dynamo"])
@pytest.mark.parametrize("family", FAMILIES)
def test_interventions_equal_huggingface_with_torch_hooks(family_exports, family, form, processed):
    hf = family_exports.model(family)
    path = family_exports.processed(family, form)[0] if processed else family_exports(family, form)
    other = run_with_cache(path, OTHER, points=[PRE])[1][PRE]
    fns, ivs = hook_functions(other.copy()), declared(other)
    before, oracle_before = run_with_cache(path, IDS, points=[])[0], hf_logits(hf, IDS, "none", processed)
    for change in CHANGES:
        oracle = hf_logits(hf, IDS, change, processed)
        by_hook = run_with_hooks(path, IDS, fwd_hooks=[fns[change]])
        by_declaration = run_with_interventions(path, IDS, [ivs[change]], sites=[Z, POST, PRE, RESID])
        for how, ours in (("hook", by_hook), ("declared", by_declaration)):
            assert gap(ours, oracle) <= TOLERANCE, (change, how, gap(ours, oracle))
            assert effect_gap(ours, before, oracle, oracle_before) <= 1e-2, (change, how, "effect")
        assert gap(by_hook, before) > 1e-5, (change, "changed nothing")


@pytest.mark.parametrize("family", FAMILIES)
def test_run_with_hooks_equals_transformerlens(family_exports, family):
    """TransformerLens's bridge in compatibility mode processes the weights as lensgraph's default
    pipeline does; its run_with_hooks with the same functions gives the same logits."""
    from transformer_lens.model_bridge import TransformerBridge

    hf = family_exports.model(family)
    bridge = TransformerBridge.boot_transformers(ARCHITECTURES[family], hf_model=copy.deepcopy(hf),
                                                 tokenizer=tiny_tokenizer(hf.config.vocab_size))
    bridge.enable_compatibility_mode()
    path = family_exports.processed(family, "dynamo")[0]
    with torch.no_grad():
        _, tl_cache = bridge.run_with_cache(torch.tensor(OTHER))
        tl_fns = hook_functions(tl_cache[PRE].clone())
        ours_fns = hook_functions(run_with_cache(path, OTHER, points=[PRE])[1][PRE].copy())
        for change in CHANGES:
            theirs = bridge.run_with_hooks(torch.tensor(IDS), fwd_hooks=[tl_fns[change]]).numpy()
            ours = run_with_hooks(path, IDS, fwd_hooks=[ours_fns[change]])
            assert gap(ours, theirs) <= TOLERANCE, (change, gap(ours, theirs))


def test_a_batch_of_different_interventions_runs_in_one_forward(family_exports):
    """Each row of one batch gets its own change (rows=), and equals HF making that change alone."""
    hf = family_exports.model("llama")
    path = family_exports("llama", "torchscript17")
    ids = np.concatenate([IDS[:1]] * 3)
    logits = run_with_interventions(path, ids, [ablate(Z, heads=[HEAD], rows=[0]), add(RESID, VECTOR, rows=[1])])
    assert gap(logits[0], hf_logits(hf, ids[:1], "z", False)[0]) <= TOLERANCE
    assert gap(logits[1], hf_logits(hf, ids[:1], "vector", False)[0]) <= TOLERANCE
    assert gap(logits[2], hf_logits(hf, ids[:1], "none", False)[0]) <= TOLERANCE


def test_neutral_interventions_keep_every_bit_and_the_cache_shows_the_change(family_exports):
    path = family_exports.processed("gpt2", "torchscript17")[0]
    plain, cache = run_with_cache(path, IDS, points=[RESID, "blocks.1.hook_resid_pre"])
    same = run_with_interventions(path, IDS, [add(RESID, VECTOR, coeff=0.0), ablate(Z, heads=[HEAD], rows=[])])
    assert np.array_equal(same, plain)
    _, changed = run_with_interventions(path, IDS, [add(RESID, VECTOR)], points=[RESID, "blocks.1.hook_resid_pre"])
    for name in (RESID, "blocks.1.hook_resid_pre"):  # the same tensor: both show the vector added
        assert np.allclose(changed[name], cache[name] + VECTOR, atol=1e-6)


def test_a_hook_functions_cache_shows_the_changed_model(family_exports):
    """Points before the hook come from the first piece, those after it from the second."""
    path = family_exports("gpt2", "dynamo")
    names = ["hook_embed", RESID, "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    _, plain = run_with_cache(path, IDS, points=names)
    logits, changed = run_with_hooks(path, IDS, [(RESID, lambda x, hook: x + VECTOR)], points=names)
    _, declared = run_with_interventions(path, IDS, [add(RESID, VECTOR)], points=names)
    assert np.array_equal(changed["hook_embed"], plain["hook_embed"])
    for name in (RESID, "blocks.1.hook_resid_pre"):
        assert np.allclose(changed[name], plain[name] + VECTOR, atol=1e-6)
    assert relative_error(changed["blocks.1.hook_resid_post"], declared["blocks.1.hook_resid_post"]) <= 1e-6
    assert relative_error(changed["blocks.1.hook_resid_post"], plain["blocks.1.hook_resid_post"]) > 1e-3


# -- bad input: a clear error naming the point, nothing run -------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda p: run_with_hooks(p, IDS, [("blocks.9.hook_z", lambda x, hook: x)]), "no hook point matches 'blocks.9"),
    (lambda p: run_with_interventions(p, IDS, [add("blocks.*.nothing", VECTOR)]), "no hook point matches"),
    (lambda p: run_with_interventions(p, IDS, [add(RESID, VECTOR[:5])]), "blocks.0.hook_resid_post: the vector is [5]"),
    (lambda p: run_with_interventions(p, IDS, [add(RESID, np.full(32, np.nan, np.float32))]), "non-finite"),
    (lambda p: run_with_interventions(p, IDS, [ablate(Z, heads=[4])]), "blocks.1.attn.hook_z: heads 4 is out of range"),
    (lambda p: run_with_interventions(p, IDS, [ablate(POST, neurons=[999])]), "neuron 999 is out of range"),
    (lambda p: run_with_hooks(p, IDS, [(RESID, lambda x, hook: x[:, :3])]), "returned shape [2, 3, 32]"),
    (lambda p: run_with_hooks(p, IDS, [(RESID, lambda x, hook: x.astype(np.float64))]), "returned float64"),
    (lambda p: run_with_hooks(p, IDS, [("blocks.0.ln1.hook_scale", lambda x, hook: x)]), "computed beside the graph"),
])
def test_bad_interventions_name_the_point(family_exports, call, message):
    with pytest.raises(BadInputError, match=_escape(message)):
        call(family_exports("gpt2", "torchscript17"))


def _escape(text: str) -> str:
    import re

    return re.escape(text)
