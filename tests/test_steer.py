"""Steering baked into a model you deploy (`lensgraph steer`), and generation under interventions,
against HuggingFace with a torch forward hook adding the same vector at the same module.

Sources: a plain export and a KV-cache export of tiny LLaMA, and an onnxruntime-genai folder (its
greedy tokens read from onnxruntime-genai's own Generator). Vectors from .npy, safetensors and a
llama.cpp control-vector GGUF. Every bad input exits 2 and writes nothing.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers as tf

import lensgraph
from files import cli, one_error_line, snapshot
from genai_zoo import greedy
from hf_oracle import logits_under, relative_error
from lensgraph.export import export_model
from lensgraph.interp.steer import steering_vector
from lensgraph.verify import centred

PROMPT = [3, 5, 7, 9]


def hf_with_vectors(hf, vectors: dict[int, np.ndarray]):
    """Handles of forward hooks adding vectors[l] to decoder layer l's output."""
    layers = hf.model.layers

    def hook(vector):
        def add(module, args, output):
            v = torch.tensor(vector, dtype=torch.float32)
            return (output[0] + v,) + tuple(output[1:]) if isinstance(output, tuple) else output + v
        return add

    return [layers[l].register_forward_hook(hook(v)) for l, v in vectors.items()]


def hf_logits(hf, ids, vectors) -> np.ndarray:
    return logits_under(hf, ids, hf_with_vectors(hf, vectors))


def hf_greedy(hf, prompt, n, vectors) -> list[int]:
    handles = hf_with_vectors(hf, vectors)
    try:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                              eos_token_id=None, pad_token_id=0)
    finally:
        for h in handles:
            h.remove()
    return out[0].tolist()


def genai_greedy(folder: str, n: int) -> list[int]:
    return greedy(folder, PROMPT, n)


def write_control_vector(path, directions: dict[int, np.ndarray], arch: str = "controlvector") -> str:
    """A control-vector GGUF as llama.cpp (and repeng's export_gguf) writes it."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", "llama")
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer, v in directions.items():
        writer.add_tensor(f"direction.{layer}", np.asarray(v, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def llama(family_exports, tmp_path_factory):
    """(HF model, plain export, KV-cache export) of the zoo's tiny LLaMA."""
    hf = family_exports.model("llama")
    cache = str(tmp_path_factory.mktemp("steer") / "llama.cache.onnx")
    export_model(hf, cache, exporter="torchscript", cache=True)
    return hf, family_exports("llama", "torchscript17"), cache


def vector(width: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(0, 1, width) * scale).astype(np.float32)


def test_steer_a_plain_export_equals_huggingface_with_the_hook(llama, tmp_path, capsys):
    hf, plain, _ = llama
    v0, v1 = vector(32, 1), vector(32, 2)
    np.save(tmp_path / "v0.npy", v0)
    from safetensors.numpy import save_file

    save_file({"direction": v1}, str(tmp_path / "v1.safetensors"))
    out = tmp_path / "steered.onnx"
    code, stdout, err = cli(capsys, "steer", plain, "-o", out, "--add", f"blocks.0.hook_resid_post={tmp_path}/v0.npy*3.0",
                            "--add", f"blocks.1.hook_resid_post={tmp_path}/v1.safetensors")
    assert code == 0, err
    assert "verified: coefficient 0 equals the source" in stdout
    ids = np.random.default_rng(0).integers(0, 96, (2, 6))
    ours = lensgraph.run_with_cache(str(out), ids, points=[])[0]
    oracle = hf_logits(hf, ids, {0: 3.0 * v0, 1: v1})
    assert relative_error(centred(ours), centred(oracle)) <= 1e-4
    assert relative_error(centred(ours), centred(hf_logits(hf, ids, {}))) > 1e-2  # the vectors matter
    # coefficient 0: the source's logits
    zero = tmp_path / "zero.onnx"
    assert cli(capsys, "steer", plain, "-o", zero, "--add", f"blocks.0.hook_resid_post={tmp_path}/v0.npy*0")[0] == 0
    assert relative_error(lensgraph.run_with_cache(str(zero), ids, points=[])[0],
                          lensgraph.run_with_cache(plain, ids, points=[])[0]) <= 1e-6


def test_steer_a_kv_cache_export_generates_what_huggingface_does(llama, tmp_path):
    hf, _, cache = llama
    v = vector(32, 3, 2.0)
    out = tmp_path / "steered.cache.onnx"
    report = lensgraph.steer(cache, out, {"blocks.0.hook_resid_post": v})
    assert report["written"] and report["verification"]["coefficient_zero"]["ok"]
    gen = lensgraph.generate(str(out), np.array([PROMPT]), 8)
    expected = hf_greedy(hf, PROMPT, 8, {0: v})
    assert gen.tokens[0].tolist() == expected
    assert expected != hf_greedy(hf, PROMPT, 8, {})  # the vector changes what is generated
    ids = np.array([PROMPT, PROMPT[::-1]])  # the KV-cache graph's first step under the same intervention
    first = lensgraph.run_with_interventions(cache, ids, [lensgraph.add("blocks.0.hook_resid_post", v)])
    assert relative_error(centred(first), centred(hf_logits(hf, ids, {0: v}))) <= 1e-4
    # the same through generate(interventions=) on the unsteered graph
    live = lensgraph.generate(cache, np.array([PROMPT]), 8, interventions=[lensgraph.add("blocks.0.hook_resid_post", v)])
    assert live.tokens[0].tolist() == expected


def test_steer_a_genai_folder_with_a_control_vector(genai, tmp_path, capsys):
    """The steered folder's greedy tokens in onnxruntime-genai's own Generator are HuggingFace's with the hook."""
    src = genai("llama")
    hf = tf.AutoModelForCausalLM.from_pretrained(os.path.join(os.path.dirname(src), "llama-hf")).eval()
    directions = {1: vector(64, 4, 1.5)}
    gguf_file = write_control_vector(tmp_path / "cv.gguf", directions)
    out = tmp_path / "steered"
    code, _, err = cli(capsys, "steer", src, "-o", out, "--control-vector-scaled", gguf_file, "2.0",
                       "--control-vector-layer-range", "1", "1")
    assert code == 0, err
    assert sorted(os.listdir(out)) == sorted(os.listdir(src) + ["lensgraph.json"])
    expected = hf_greedy(hf, PROMPT, 10, {1: 2.0 * directions[1]})
    assert genai_greedy(str(out), 10) == expected
    assert expected != genai_greedy(src, 10)
    # generate with the vector on the unsteered folder: the same tokens, through onnxruntime-genai too
    gen = lensgraph.generate(src, np.array([PROMPT]), 10,
                             interventions=[lensgraph.add("blocks.1.hook_resid_post", 2.0 * directions[1])])
    assert gen.engine == "onnxruntime-genai" and gen.tokens[0].tolist() == expected
    ids = np.array([PROMPT, PROMPT[::-1]])  # and a research run on the folder, in onnxruntime
    ours = lensgraph.run_with_interventions(src, ids, [lensgraph.add("blocks.1.hook_resid_post", 2.0 * directions[1])])
    oracle = hf_logits(hf, ids, {1: 2.0 * directions[1]})
    assert relative_error(centred(ours), centred(oracle)) <= 1e-4
    by_hook = lensgraph.run_with_hooks(src, ids, [("blocks.1.hook_resid_post", lambda x, hook: x + 2.0 * directions[1])])
    assert relative_error(centred(by_hook), centred(oracle)) <= 1e-4
    code, stdout, err = cli(capsys, "generate", src, "--prompt-ids", ",".join(map(str, PROMPT)), "-n", "10",
                            "--control-vector-scaled", gguf_file, "2.0")
    assert code == 0, err
    assert stdout.strip() == ",".join(map(str, expected[len(PROMPT):]))


def test_steering_vector_is_the_contrastive_mean_difference(llama):
    hf, plain, _ = llama
    positive, negative = [[3, 5, 7], [9, 2, 4, 6]], [[8, 1, 5], [2, 2, 7, 7, 1]]

    def hf_mean(prompts):  # block 1's output at each prompt's last token, read with a forward hook
        rows = []
        h = hf.model.layers[1].register_forward_hook(
            lambda m, a, out: rows.append((out[0] if isinstance(out, tuple) else out)[0, -1].double().numpy()))
        try:
            for p in prompts:
                with torch.no_grad():
                    hf(torch.tensor([p]))
        finally:
            h.remove()
        return np.mean(rows, axis=0)

    ours = steering_vector(plain, positive, negative, "blocks.1.hook_resid_post")
    assert relative_error(ours, hf_mean(positive) - hf_mean(negative)) <= 1e-4


# -- bad input: exit 2, nothing written --------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda d: ["--add", f"blocks.7.hook_resid_post={d}/v.npy"], "blocks.7.hook_resid_post"),
    (lambda d: ["--add", f"blocks.0.hook_resid_post={d}/short.npy"], "is 5 wide, the point is 32"),
    (lambda d: ["--add", f"blocks.0.hook_resid_post={d}/nan.npy"], "non-finite"),
    (lambda d: ["--add", f"blocks.0.hook_resid_post={d}/missing.npy"], "no such vector file"),
    (lambda d: ["--add", "blocks.0.hook_resid_post"], "write POINT=FILE or POINT=FILE*COEFF"),
    (lambda d: ["--add", f"blocks.0.hook_resid_post={d}/v.npy*x"], "write POINT=FILE"),
    (lambda d: ["--control-vector", f"{d}/wrong.gguf"], "not 'controlvector'"),
    (lambda d: ["--control-vector", f"{d}/cv.gguf", "--control-vector-layer-range", "5", "6"], "nothing to add"),
    (lambda d: ["--add", f"blocks.0.attn.hook_z={d}/v.npy"], "blocks.0.attn.hook_z"),
])
def test_bad_steering_exits_2_and_writes_nothing(llama, tmp_path, capsys, make, message):
    _, plain, _ = llama
    np.save(tmp_path / "v.npy", vector(32, 5))
    np.save(tmp_path / "short.npy", vector(5, 5))
    np.save(tmp_path / "nan.npy", np.full(32, np.nan, np.float32))
    write_control_vector(tmp_path / "wrong.gguf", {1: vector(32, 6)}, arch="llama")
    write_control_vector(tmp_path / "cv.gguf", {1: vector(32, 6)})
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "steer", plain, "-o", tmp_path / "out.onnx", *make(tmp_path))
    assert code == 2, err
    assert message in one_error_line(err)
    assert snapshot(tmp_path) == before


def test_generation_refuses_interventions_that_are_not_the_same_at_every_step(llama):
    _, _, cache = llama
    with pytest.raises(lensgraph.BadInputError, match="every position of every step"):
        lensgraph.generate(cache, np.array([PROMPT]), 3,
                           interventions=[lensgraph.add("blocks.0.hook_resid_post", vector(32, 1), positions=[0])])


def test_steer_a_convert_folder_keeps_its_record(genai, tmp_path):
    src = genai("llama")
    checkpoint = os.path.join(os.path.dirname(src), "llama-hf")
    folder = tmp_path / "lens"
    lensgraph.from_pretrained(checkpoint, folder)
    v = vector(64, 8, 2.0)
    out = tmp_path / "steered"
    report = lensgraph.steer(folder, out, [("blocks.0.hook_resid_post", v, 1.5)])
    assert report["written"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(folder))
    record = json.load(open(out / "lensgraph.json"))
    assert record["steer"]["added"] == {"blocks.0.hook_resid_post": {"norm": pytest.approx(float(np.linalg.norm(1.5 * v)),
                                                                                            rel=1e-6)}}
    assert record["passes"] == json.load(open(folder / "lensgraph.json"))["passes"]  # the convert record kept
    hf = tf.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = np.array([PROMPT])
    ours = lensgraph.run_with_cache(str(out / "model.onnx"), ids, points=[])[0]
    assert relative_error(centred(ours), centred(hf_logits(hf, ids, {0: 1.5 * v}))) <= 1e-4
