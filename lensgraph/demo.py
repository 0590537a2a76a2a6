"""The built-in demo: a tiny GPT-2 with random weights, exported, processed and verified.

Needs the [export] extra (torch, transformers); no network.
"""

from __future__ import annotations

import os


def run_demo(workdir: str, exporter: str = "dynamo", say=print) -> dict:
    from transformers.utils import logging as hf_logging

    from .export import export
    from .graph.describe import as_text, describe
    from .process import process, summary
    from .store.model import LensModel
    from .tiny_models import tiny_gpt2

    os.makedirs(workdir, exist_ok=True)
    checkpoint = os.path.join(workdir, "tiny-gpt2")
    original = os.path.join(workdir, "tiny-gpt2.onnx")
    processed = os.path.join(workdir, "tiny-gpt2.lens.onnx")
    say(f"1. building a tiny GPT-2 with random weights and randomised norms -> {checkpoint}")
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
    say("5. processing the output again changes nothing:")
    again = process(processed, os.path.join(workdir, "tiny-gpt2.lens2.onnx"))
    say(summary(again))
    return report
