"""Decoder graphs with a KV cache: processed exactly, step after step of generation.

Each graph is fed its own cache (the rewritten graph's value cache lacks the folded
value bias, which is expected); the centred logits must agree at every step.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lensgraph import tiny_models
from helpers import relative_gap
from lensgraph.export import cache_names, export_model
from lensgraph.process import process


def generate(path: str, prompt: np.ndarray, steps: int) -> list[np.ndarray]:
    """Greedy decoding with the graph's own cache; returns each step's logits."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
    batch = prompt.shape[0]
    past = {i.name: np.zeros([batch, i.shape[1], 0, i.shape[3]], np.float32) for i in past_inputs}
    ids, total, logits = prompt, prompt.shape[1], []
    for _ in range(steps):
        feeds = {"input_ids": ids, "attention_mask": np.ones((batch, total), np.int64), **past}
        out = session.run(None, feeds)
        names = [o.name for o in session.get_outputs()]
        logits.append(out[0][:, -1])
        past = {n.replace("present", "past_key_values"): v for n, v in zip(names[1:], out[1:])}
        ids = out[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        total += 1
    return logits


@pytest.mark.parametrize("family, value_folds", [("gpt2", 2), ("qwen2", 2), ("gpt_neox", 2)])
def test_generation_with_cache(tmp_path, family, value_folds):
    src = str(tmp_path / "kv.onnx")
    info = export_model(tiny_models.build(family, seed=5), src, exporter="torchscript", cache=True)
    assert info["cache"] and info["max_abs_diff"] < 1e-4
    graph = onnx.load(src).graph
    past, present = cache_names(2)
    assert [i.name for i in graph.input][2:] == past
    assert [o.name for o in graph.output][1:] == present

    out = str(tmp_path / "kv.lens.onnx")
    report = process(src, out)
    assert report["verification"]["ok"]
    assert {p["name"]: p["rewritten"] for p in report["passes"]}["fold_value_biases"] == value_folds
    prompt = np.random.default_rng(0).integers(0, tiny_models.VOCAB, (2, 4)).astype(np.int64)
    before, after = generate(src, prompt, 4), generate(out, prompt, 4)
    for step, (a, b) in enumerate(zip(before, after)):
        assert relative_gap(a, b) < 1e-5, step


def test_cache_export_needs_torchscript(tmp_path):
    from lensgraph.errors import BadInputError

    with pytest.raises(BadInputError, match="torchscript"):
        export_model(tiny_models.build("gpt2"), tmp_path / "x.onnx", exporter="dynamo", cache=True)
