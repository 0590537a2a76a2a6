"""Hook points on GPT-2 from every exporter path: placed, named and valued as TransformerLens has them."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from helpers import feeds
from lensgraph import BadInputError, run_with_cache
from lensgraph.interp.cache import session
from lensgraph.graph.hookpoints import all_names


def gpt2_points(n_layers: int = 2) -> list[str]:
    """Every point GPT-2 has (but hook_result, added only when named): all of TransformerLens's but a gated
    MLP's linear branch and rotated queries and keys."""
    return [n for n in all_names(n_layers)
            if not n.endswith(("mlp.hook_pre_linear", "hook_rot_q", "hook_rot_k", "hook_result"))]
from lensgraph.interp.hooks import add_hooks, hook_names
from lensgraph.store.model import LensModel
from lensgraph.process import process
from lensgraph.verify import verify
from tl_bridge import bridge_cache

FORMS = ["torchscript17", "torchscript14", "dynamo"]
# Ops onnxruntime makes by fusing; adding hooks must not lose any of them.
FUSED = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
         "SkipSimplifiedLayerNormalization", "FastGelu", "Gelu", "BiasGelu", "FusedMatMul", "Gemm", "MatMul",
         "Softmax", "Attention", "MultiHeadAttention"}


@pytest.fixture(scope="module")
def models(gpt2_exports, tmp_path_factory):
    """form -> (export, processed, processed with every hook)."""
    folder = tmp_path_factory.mktemp("hooks")
    out = {}
    for form, path in gpt2_exports.items():
        processed, hooked = folder / f"{form}.lens.onnx", folder / f"{form}.hooks.onnx"
        process(path, processed)
        model = LensModel.load(processed)
        add_hooks(model)
        model.save(hooked)
        out[form] = (path, str(processed), str(hooked))
    return out


def close(a, b, rel=1e-5):
    """Equal to `rel` of b's scale, infinities (masked attention scores) in the same places."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    if not np.array_equal(np.isinf(a) * np.sign(a), np.isinf(b) * np.sign(b)):
        return False
    finite = np.isfinite(b)
    return float(np.abs(a[finite] - b[finite]).max()) <= rel * max(float(np.abs(b[finite]).max()), 1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_every_point_is_placed_on_gpt2(models, form):
    model = LensModel.load(models[form][2])
    assert hook_names(model) == gpt2_points()
    assert json.loads(model.ir.metadata_props["lensgraph.hooks"]) == gpt2_points()


@pytest.mark.parametrize("form", FORMS)
def test_hooks_match_transformerlens_bridge(gpt2_hf, models, form):
    ids = feeds(2, 6)["input_ids"]
    tl_logits, tl_cache = bridge_cache(gpt2_hf, "gpt2", ids)
    logits, cache = run_with_cache(models[form][2], ids)
    assert list(cache) == gpt2_points()
    for name, value in cache.items():
        assert close(value, tl_cache[name]), name
    assert close(logits, tl_logits)


@pytest.mark.parametrize("form", FORMS)
def test_hooks_match_huggingface_hidden_states_and_attentions(gpt2_hf, models, form):
    """resid_pre is HF's residual stream minus its mean over d_model; the pattern is HF's."""
    x = feeds(2, 6, seed=3)
    with torch.no_grad():
        hf = gpt2_hf(torch.tensor(x["input_ids"]), output_hidden_states=True, output_attentions=True)
    _, cache = run_with_cache(models[form][2], x["input_ids"])
    for l in range(2):
        stream = hf.hidden_states[l].numpy()
        assert close(cache[f"blocks.{l}.hook_resid_pre"], stream - stream.mean(-1, keepdims=True)), l
        assert close(cache[f"blocks.{l}.attn.hook_pattern"], hf.attentions[l].numpy()), l
        assert np.abs(stream.mean(-1)).max() > 1e-3  # the original stream is not centred
    ln_f = gpt2_hf.transformer.ln_f  # HF's last hidden state is ln_f's output
    with torch.no_grad():
        final = (hf.hidden_states[-1] - ln_f.bias) / ln_f.weight
    assert close(cache["ln_final.hook_normalized"], final.numpy(), 1e-4)


def test_unprocessed_export_gives_hf_stream_itself(gpt2_hf, models):
    ids = feeds(1, 5)["input_ids"]
    with torch.no_grad():
        hf = gpt2_hf(torch.tensor(ids), output_hidden_states=True)
    _, cache = run_with_cache(models["dynamo"][0], ids, points=["blocks.*.hook_resid_pre"])
    assert list(cache) == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    for l in range(2):
        assert close(cache[f"blocks.{l}.hook_resid_pre"], hf.hidden_states[l].numpy())


@pytest.mark.parametrize("form", FORMS)
def test_adding_hooks_changes_no_output(models, form):
    _, processed, hooked = models[form]
    assert verify(processed, hooked).ok
    x = feeds(3, 4)
    a = ort.InferenceSession(processed, providers=["CPUExecutionProvider"]).run(["logits"], x)[0]
    b = ort.InferenceSession(hooked, providers=["CPUExecutionProvider"]).run(["logits"], x)[0]
    np.testing.assert_array_equal(a, b)


def optimized_ops(path: str, tmp_path) -> collections.Counter:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / (os.path.basename(path) + ".opt.onnx"))
    options.log_severity_level = 3
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("form", FORMS)
def test_hooks_keep_onnxruntime_fusions(models, form, tmp_path):
    """A hook read must not stop onnxruntime fusing (e.g. the last residual Add into ln_f)."""
    _, processed, hooked = models[form]
    before, after = optimized_ops(processed, tmp_path), optimized_ops(hooked, tmp_path)
    assert before["LayerNormalization"] + before["SkipLayerNormalization"] == 5
    assert {op: before[op] for op in FUSED} == {op: after[op] for op in FUSED}


def executed_kernels(sess_or_path, fetch=("logits",)) -> list[str]:
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3
    sess = ort.InferenceSession(sess_or_path, options, providers=["CPUExecutionProvider"])
    sess.run(list(fetch), feeds(1, 5))
    profile = sess.end_profiling()
    with open(profile) as f:
        events = json.load(f)
    os.remove(profile)
    return sorted(e["name"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))


def test_no_hooks_requested_runs_the_plain_graph(models, tmp_path, monkeypatch):
    """run_with_cache with points=[] builds the session from the graph without hooks:
    the same kernels run as for the processed model, so latency is unchanged."""
    monkeypatch.chdir(tmp_path)  # profiles land here
    _, processed, hooked = models["dynamo"]
    sess = session(hooked, points=[])
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    proto = LensModel.load(processed).to_proto().SerializeToString()
    plain = LensModel.load(hooked)
    from lensgraph.interp.hooks import remove_hooks

    remove_hooks(plain)
    assert executed_kernels(plain.to_proto().SerializeToString()) == executed_kernels(proto)
    # a file with hook outputs runs them even when only the logits are fetched
    assert len(executed_kernels(hooked)) > len(executed_kernels(proto))
    logits, cache = run_with_cache(hooked, feeds(1, 5)["input_ids"], points=[])
    assert cache == {} and logits.shape == (1, 5, 96)


def test_sessions_are_reused_and_follow_the_points(models):
    _, processed, _ = models["torchscript17"]
    a = session(processed, points=["blocks.*.attn.hook_pattern"])
    assert session(processed, points="blocks.*.attn.hook_pattern") is a
    assert [o.name for o in a.get_outputs()] == ["logits", "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    assert session(processed) is session(processed)
    assert session(processed) is not a


def test_run_with_cache_inputs(models):
    _, processed, hooked = models["torchscript17"]
    ids = feeds(2, 5)["input_ids"]
    full, cache = run_with_cache(processed, ids, points=["hook_embed"])
    one, cache1 = run_with_cache(processed, ids[0].tolist(), points=["hook_embed"])
    np.testing.assert_allclose(one[0], full[0], atol=1e-6)
    np.testing.assert_allclose(cache1["hook_embed"][0], cache["hook_embed"][0])
    mask = np.ones_like(ids)
    mask[1, -2:] = 0
    padded, cache = run_with_cache(processed, ids, attention_mask=mask, points=["blocks.0.attn.hook_pattern"])
    assert np.all(cache["blocks.0.attn.hook_pattern"][1, :, :, -2:] < 1e-6)  # no attention to padding
    # an InferenceSession with hook outputs is run as it is
    sess = ort.InferenceSession(hooked, providers=["CPUExecutionProvider"])
    logits, cache = run_with_cache(sess, ids, points=["*.hook_resid_post"])
    assert list(cache) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    np.testing.assert_allclose(logits, full, atol=1e-5)
    with pytest.raises(BadInputError, match="no hook point matches 'blocks.9.*'"):
        run_with_cache(processed, ids, points=["blocks.9.*"])
    with pytest.raises(BadInputError, match="input_ids"):
        run_with_cache(processed, np.zeros((1, 2, 3), np.int64))


@pytest.mark.parametrize("form", FORMS)
def test_run_with_cache_fetches_the_same_bits_as_a_hooks_file(models, form):
    """run_with_cache lists a tensor that already is a point as its own output and reads
    onnxruntime's buffers without a copy: the values of the file's named hook outputs, and a
    later call does not overwrite them."""
    _, processed, hooked = models[form]
    ids, other = feeds(2, 6)["input_ids"], feeds(2, 6, seed=9)["input_ids"]
    sess = ort.InferenceSession(hooked, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    named = dict(zip(names, sess.run(names, feeds(2, 6))))
    logits, cache = run_with_cache(processed, ids)
    kept = {k: v.copy() for k, v in cache.items()}
    run_with_cache(processed, other)
    assert list(cache) == gpt2_points()
    assert close(logits, named["logits"], 1e-6)  # the two graphs may differ in onnxruntime's last bits
    for name, value in cache.items():
        assert close(value, named[name], 1e-6), name
        np.testing.assert_array_equal(value, kept[name], err_msg=name)
    inf = cache["blocks.0.attn.hook_attn_scores"]
    assert np.isneginf(inf[:, :, 0, 1:]).all() and np.isfinite(np.tril(inf[0, 0])[np.tril_indices(6)]).all()


def test_adding_hooks_again_replaces_them(models, tmp_path):
    _, _, hooked = models["dynamo"]
    model = LensModel.load(hooked)
    report = add_hooks(model, ["blocks.1.*", "ln_final.*"])
    assert report.removed == len(gpt2_points())
    named = [n for n in all_names(2) if n in gpt2_points() or n.endswith("hook_result")]  # a glob names it too
    assert hook_names(model) == [n for n in named if n.startswith(("blocks.1.", "ln_final."))]
    model.check(full=True)
    again = tmp_path / "again.onnx"
    model.save(again)
    assert verify(hooked, str(again)).ok


@pytest.mark.parametrize("family, architecture", [("gpt_neox", "GPTNeoXForCausalLM"), ("llama", "LlamaForCausalLM")])
def test_rotary_families_match_transformerlens_bridge(family_exports, family, architecture):
    """Every point a rotary family has (queries and keys before and after the rotation included), against
    TransformerLens's own run_with_cache on the same weights, processed as TransformerLens processes them."""
    ids = feeds(2, 6, seed=5)["input_ids"]
    path, _ = family_exports.processed(family, "torchscript17")
    _, tl_cache = bridge_cache(family_exports.model(family), architecture, ids)
    _, cache = run_with_cache(path, ids)
    wanted = ("attn.hook_q", "attn.hook_k", "attn.hook_v") + (("attn.hook_rot_q", "attn.hook_rot_k")
                                                              if family == "llama" else ())  # TL's NeoX has none
    for name in wanted:
        assert f"blocks.0.{name}" in cache and f"blocks.0.{name}" in tl_cache, name
    wrong = [name for name in cache if name in tl_cache and not close(cache[name], tl_cache[name], 1e-4)]
    assert not wrong, wrong
    assert len([n for n in cache if n in tl_cache]) >= len(cache) - 4  # all but what TL's bridge lacks
