"""onnxruntime-genai folders: built from tiny random checkpoints by onnxruntime-genai's own model
builder, processed folder to folder, and generating exactly what the original folder generates;
an int4 build is never changed inexactly; and lensgraph.generate against HuggingFace."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
import transformers as tf

import lensgraph
from files import cli, snapshot
from lensgraph.export import export_model
from lensgraph.graph.anatomy import analyse
from lensgraph.store.model import LensModel
from lensgraph.store.weights import LinearWeights

import onnxruntime_genai as og  # the genai extra, part of the test extra
from genai_zoo import CONFIGS
from genai_zoo import greedy as genai_greedy

PROMPT = [3, 5, 7, 9]


def greedy(folder: str, n: int = 30) -> list[int]:
    return genai_greedy(folder, PROMPT, n)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_genai_folder_processed_generates_the_same(genai, tmp_path, family):
    src = genai(family)
    out = tmp_path / "out"
    report = lensgraph.process(src, out)
    assert report["written"] and report["verification"]["ok"]
    passes = {p["name"]: p for p in report["passes"]}
    assert passes["fold_ln"]["rewritten"] == 5 and passes["center_unembed"]["rewritten"] == 1
    assert passes["fold_value_biases"]["rewritten"] == (2 if family == "qwen2" else 0)
    # a complete folder: every other file unchanged, lensgraph's record beside them
    assert sorted(os.listdir(out)) == sorted(os.listdir(src) + ["lensgraph.json"])
    for name in os.listdir(src):
        if not name.startswith("model.onnx"):
            assert open(os.path.join(src, name), "rb").read() == open(out / name, "rb").read(), name
    assert greedy(str(out)) == greedy(src)
    model = LensModel.load(str(out / "model.onnx"))
    anatomy = analyse(model.graph)
    assert len(anatomy.layers) == 2 and len(anatomy.attention) == 2
    for norm in anatomy.stream_readers:  # every norm scale folded
        node, idx = norm.scale
        assert np.all(model.weights.read(node.inputs[idx]) == 1.0), norm.name
    w_u = LinearWeights(model.weights).weight(anatomy.unembed)
    assert np.abs(w_u.mean(axis=1)).max() <= 1e-5 * np.abs(w_u).max()  # the unembedding centred


def test_genai_output_folder_is_replaced_only_when_it_is_lensgraphs(genai, tmp_path, capsys):
    src = genai("llama")
    capsys.readouterr()
    mine, other = tmp_path / "mine", tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    code, _, err = cli(capsys, "process", src, "-o", other)
    assert code == 2 and "not a previous lensgraph output" in err
    assert (other / "notes.txt").read_text() == "keep me"
    for _ in range(2):  # the second run replaces the first one's folder
        code, _, err = cli(capsys, "process", src, "-o", mine)
        assert code == 0, err
    assert json.loads((mine / "lensgraph.json").read_text())["written"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging left behind


def test_convert_exporter_genai_writes_a_processed_genai_folder(genai, tmp_path):
    """`convert --exporter genai`: the builder's folder from the checkpoint, processed and verified in
    the same run; it generates what the builder's own unprocessed folder generates."""
    src = genai("llama")
    ckpt = os.path.join(os.path.dirname(src), "llama-hf")
    report = lensgraph.from_pretrained(ckpt, tmp_path / "out", exporter="genai")
    assert report["written"] and report["verification"]["ok"] and report["export"]["exporter"] == "genai"
    assert {"genai_config.json", "model.onnx", "lensgraph.json"} <= set(os.listdir(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "lensgraph.json").read_text())["applied"] == report["applied"]
    assert greedy(str(tmp_path / "out")) == greedy(src)
    plain = lensgraph.from_pretrained_no_processing(ckpt, tmp_path / "plain", exporter="genai")
    assert not plain["written"] and greedy(str(tmp_path / "plain")) == greedy(src)
    assert sorted(os.listdir(tmp_path)) == ["out", "plain"]


def test_int4_build_is_never_changed_inexactly(genai, tmp_path, capsys):
    src = genai("llama", "int4")
    capsys.readouterr()  # the builder's own messages
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(os.path.join(src, "model.onnx"),
                                                               load_external_data=False).graph.node)
    before = snapshot(tmp_path)
    code, out, err = cli(capsys, "process", src, "-o", tmp_path / "out")
    assert code == 0, err
    assert out.strip().startswith("nothing changed, so nothing was written") and "MatMulNBits" in out
    assert len(out.strip().splitlines()) == 1 and snapshot(tmp_path) == before


def test_generate_through_onnxruntime_genai_and_its_hooks(genai):
    src = genai("llama")
    plain = lensgraph.generate(src, np.array([PROMPT]), 12)
    assert plain.engine == "onnxruntime-genai" and plain.tokens[0].tolist() == greedy(src, 12)
    hooked = lensgraph.generate(src, np.array([PROMPT]), 12, points=["blocks.0.hook_resid_post"])
    direct = lensgraph.generate(os.path.join(src, "model.onnx"), np.array([PROMPT]), 12,
                                points=["blocks.0.hook_resid_post"])
    assert hooked.engine == "onnxruntime-genai" and direct.engine == "onnxruntime"
    assert np.array_equal(hooked.tokens, plain.tokens) and np.array_equal(direct.tokens, plain.tokens)
    for a, b in zip(hooked.steps, direct.steps):  # Generator.get_output gives the same activations
        np.testing.assert_allclose(a["blocks.0.hook_resid_post"], b["blocks.0.hook_resid_post"], atol=1e-5)


# -- lensgraph.generate on KV-cache exports, against HuggingFace -----------------------------------
@pytest.mark.parametrize("processed", [False, True], ids=["export", "processed"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_matches_huggingface(family_exports, tmp_path, family, processed):
    hf = family_exports.model(family)
    path = str(tmp_path / "cache.onnx")
    export_model(hf, path, exporter="torchscript", cache=True)
    if processed:
        lensgraph.process(path, str(tmp_path / "cache.lens.onnx"))
        path = str(tmp_path / "cache.lens.onnx")
    prompt, n = np.array([[3, 5, 7, 9], [1, 8, 2, 6]]), 10
    gen = lensgraph.generate(path, prompt, n, points=["blocks.*.hook_resid_post"])
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                          eos_token_id=None, pad_token_id=0)
    assert np.array_equal(gen.tokens, ref.numpy()) and len(gen.steps) == n
    # each step's resid_post is the HF decoder layer's output at the position that chose the token
    layers = hf.transformer.h if family == "gpt2" else hf.model.layers
    seen: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda m, a, out, l=l: seen.__setitem__(l, out[0] if isinstance(out, tuple)
                                                                                    else out))
               for l, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            hf(torch.tensor(gen.tokens[:, :-1]))
    finally:
        for h in handles:
            h.remove()
    for k, step in enumerate(gen.steps):
        pos = prompt.shape[1] - 1 + k
        for l in range(len(layers)):
            expected = seen[l][:, pos:pos + 1].double().numpy()
            if processed and family == "gpt2":  # a processed LayerNorm model's stream has no mean
                expected = expected - expected.mean(-1, keepdims=True)
            np.testing.assert_allclose(step[f"blocks.{l}.hook_resid_post"], expected, rtol=1e-4,
                                       atol=1e-4 * np.abs(expected).max())


def test_generate_samples_reproducibly_and_stops_at_eos(family_exports, tmp_path):
    path = str(tmp_path / "cache.onnx")
    export_model(family_exports.model("llama"), path, exporter="torchscript", cache=True)
    a = lensgraph.generate(path, np.array([[3, 5]]), 8, do_sample=True, seed=1)
    b = lensgraph.generate(path, np.array([[3, 5]]), 8, do_sample=True, seed=1)
    assert np.array_equal(a.tokens, b.tokens)
    greedy_tokens = lensgraph.generate(path, np.array([[3, 5]]), 8).new_tokens[0]
    stop = int(greedy_tokens[2])
    short = lensgraph.generate(path, np.array([[3, 5]]), 8, eos_token_id=stop)
    assert short.new_tokens[0].tolist() == greedy_tokens[:list(greedy_tokens).index(stop) + 1].tolist()


def test_generate_cli(genai, capsys):
    src = genai("llama")
    capsys.readouterr()
    code, out, err = cli(capsys, "generate", src, "--prompt-ids", ",".join(map(str, PROMPT)), "-n", "6")
    assert code == 0, err
    assert out.strip() == ",".join(str(t) for t in greedy(src, 6)[len(PROMPT):])
    code, out, _ = cli(capsys, "generate", src, "--prompt", "the quick brown", "-n", "3")
    assert code == 0 and len(out.splitlines()) == 2  # the ids, then the text (empty where the random model's
    # tokens lie beyond this tiny tokenizer's vocabulary)


def test_to_str_tokens_matches_transformerlens(genai, tmp_path):
    from transformer_lens.model_bridge import TransformerBridge

    src = genai("llama")
    ckpt = os.path.join(os.path.dirname(src), "llama-hf")
    tokenizer = tf.PreTrainedTokenizerFast.from_pretrained(ckpt)
    hf = tf.AutoModelForCausalLM.from_pretrained(ckpt)
    tokenizer.init_kwargs["add_bos_token"] = True  # as TransformerLens wants it, to boot offline
    bridge = TransformerBridge.boot_transformers("LlamaForCausalLM", hf_model=hf, tokenizer=tokenizer)
    ids = np.array([[5, 17, 30, 2], [9, 9, 41, 3]])
    assert lensgraph.to_str_tokens(src, ids) == [bridge.to_str_tokens(torch.tensor(row)) for row in ids]
    assert lensgraph.to_str_tokens(tokenizer, ids[0]) == bridge.to_str_tokens(torch.tensor(ids[0]))
