"""The built-in demo: a tiny GPT-2 with random weights, exported, processed and verified.

Needs the [export] extra (torch, transformers); no network.
"""

from __future__ import annotations

import os


def randomise_1d(model, seed: int = 0, spread: float = 0.2) -> None:
    """Give every 1-D parameter a non-trivial value (HF initialises norms to 1 and biases to 0,
    which would make folding look right when it is not)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim != 1:
                continue
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * spread
            is_scale = name.endswith("weight")
            param.copy_((noise + 1.0 if is_scale else noise).to(param.dtype))


def tiny_gpt2(seed: int = 0, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, vocab_size: int = 256):
    """A small GPT-2 (pre-LN, learned positions, tied embeddings, fused c_attn)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                        n_positions=128, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = GPT2LMHeadModel(config).eval()
    randomise_1d(model, seed)
    return model


def tiny_lens_model(folder: str, seed: int = 0) -> str:
    """A tiny GPT-2, exported (TorchScript, opset 17: the quickest) and processed; returns the processed path."""
    from .export import export_model
    from .process import process

    os.makedirs(folder, exist_ok=True)
    original = os.path.join(folder, "tiny-gpt2.onnx")
    processed = os.path.join(folder, "tiny-gpt2.lens.onnx")
    export_model(tiny_gpt2(seed), original, exporter="torchscript", opset=17)
    process(original, processed)
    return processed


def run_demo(workdir: str, exporter: str = "dynamo", say=print) -> dict:
    from .export import export
    from .model import LensModel
    from .process import process, summary
    from .describe import as_text, describe

    os.makedirs(workdir, exist_ok=True)
    checkpoint = os.path.join(workdir, "tiny-gpt2")
    original = os.path.join(workdir, "tiny-gpt2.onnx")
    processed = os.path.join(workdir, "tiny-gpt2.lens.onnx")
    say(f"1. building a tiny GPT-2 with random weights and randomised norms -> {checkpoint}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tiny_gpt2().save_pretrained(checkpoint)
    say(f"2. exporting it with the {exporter} exporter -> {original}")
    info = export(checkpoint, original, exporter=exporter)
    say(f"   exported in {info['seconds']:.1f} s; onnxruntime vs torch max |diff| {info['max_abs_diff']:.1e}")
    say("3. what the anatomy finds in the exported graph:")
    say("   " + as_text(describe(LensModel.load(original))).replace("\n", "\n   "))
    say(f"4. processing (fold_ln, center_writing_weights, center_unembed, fold_value_biases) -> {processed}")
    report = process(original, processed)
    say(summary(report))
    say(f"   done in {report['seconds']:.2f} s")
    say(f"5. processing the output again changes nothing:")
    again = process(processed, os.path.join(workdir, "tiny-gpt2.lens2.onnx"))
    say(summary(again))
    return report
