#!/usr/bin/env python3
"""Write the optimum exports the tests read: tiny GPT-2 and LLaMA with random weights (every
1-D parameter randomised), each as tests/data/optimum/FAMILY/{model.onnx, checkpoint/}.

optimum's `text-generation-with-past` export is the form of most ONNX LLMs on the hub (the
KV cache as inputs and outputs, positions computed from the attention mask or given as
`position_ids`). optimum-onnx 0.1.0 needs transformers < 4.58, older than lensgraph's, so this
runs in a venv of its own, and its output is committed:

    python3 -m venv /tmp/optimum-venv
    /tmp/optimum-venv/bin/pip install torch==2.13.0 'transformers<4.58' optimum-onnx onnxruntime
    /tmp/optimum-venv/bin/python scripts/make_optimum_fixtures.py

The checkpoint beside each graph holds the same weights, so tests compare the graph with
the HuggingFace modules' own activations.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import torch
import transformers as tf
from optimum.exporters.onnx import main_export

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "optimum")
SMALL = dict(vocab_size=96, bos_token_id=0, eos_token_id=0, pad_token_id=0)
CONFIGS = {
    "gpt2": lambda: tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, **SMALL),
    "llama": lambda: tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=64, max_position_embeddings=64, **SMALL),
}


def randomise_1d(model, seed: int, spread: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                noise = torch.randn(param.shape, generator=gen) * spread
                param.copy_(noise + 1.0 if name.endswith("weight") else noise)


def main(families) -> None:
    for family in families:
        torch.manual_seed(5)
        model = tf.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
        randomise_1d(model, 5)
        folder = os.path.join(OUT, family)
        shutil.rmtree(folder, ignore_errors=True)
        checkpoint = os.path.join(folder, "checkpoint")
        model.save_pretrained(checkpoint)
        with tempfile.TemporaryDirectory() as tmp:
            main_export(checkpoint, tmp, task="text-generation-with-past", do_validation=True)
            shutil.copy(os.path.join(tmp, "model.onnx"), os.path.join(folder, "model.onnx"))
        print(f"{family}: {folder} ({os.path.getsize(os.path.join(folder, 'model.onnx')) // 1024} KiB)")


if __name__ == "__main__":
    main(sys.argv[1:] or list(CONFIGS))
