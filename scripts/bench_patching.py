#!/usr/bin/env python3
"""A full activation-patching sweep, lensgraph against TransformerLens, on the same weights.

    python scripts/bench_patching.py [--size gpt2-small] [--tokens 20] [--batch 1] [--rounds 2]
                                     [--sweep resid_pre] [--tokens-per-forward 1024]

A GPT-2 of the given size with random weights (randomised norms) is saved and exported once
(.cache/bench/SIZE), and processed with lensgraph's default pipeline; TransformerLens 4.3's
TransformerBridge boots on the same checkpoint in compatibility mode (the same processing).
Each round runs the sweep (every layer x position for resid_pre) with both, interleaved: one
patched forward per cell in TransformerLens, many cells per forward in lensgraph. The metric is
a logit difference at the last position. Prints the medians, the ratio lensgraph/TransformerLens,
and the largest difference between the two results.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="gpt2-small", choices=list(benchlib.SIZES))
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sweep", default="resid_pre")
    p.add_argument("--tokens-per-forward", type=int, default=None)
    args = p.parse_args(argv)

    import torch
    import transformers as tf
    from transformer_lens import patching as tl_patching
    from transformer_lens.model_bridge import TransformerBridge

    import lensgraph
    from lensgraph.interp import patching

    torch.set_num_threads(args.threads)
    checkpoint, exported = benchlib.model_paths(args.size)
    processed = exported.replace(".onnx", ".lens.onnx")
    if not os.path.exists(processed):
        lensgraph.process(exported, processed)
    hf = tf.AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    sys.path.insert(0, os.path.join(os.path.dirname(benchlib.HERE), "tests"))
    from tl_bridge import tiny_tokenizer

    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=copy.deepcopy(hf),
                                                 tokenizer=tiny_tokenizer(hf.config.vocab_size))
    bridge.enable_compatibility_mode()

    rng = np.random.default_rng(0)
    clean = rng.integers(0, hf.config.vocab_size, (args.batch, args.tokens)).astype(np.int64)
    corrupted = clean.copy()
    corrupted[:, args.tokens // 2] = (clean[:, args.tokens // 2] + 1) % hf.config.vocab_size
    answer, other = 11, 12

    def metric(logits):
        return (logits[:, -1, answer] - logits[:, -1, other]).mean()

    template = patching.SWEEPS[args.sweep][0].format(l="*")
    _, clean_cache = lensgraph.run_with_cache(processed, clean, points=[template])
    with torch.no_grad():
        _, tl_cache = bridge.run_with_cache(torch.tensor(clean))
    options = {} if args.tokens_per_forward is None else {"tokens_per_forward": args.tokens_per_forward}
    ours_fn = getattr(patching, f"get_act_patch_{args.sweep}")
    tl_fn = getattr(tl_patching, f"get_act_patch_{args.sweep}")

    def ours():
        return ours_fn(processed, corrupted, clean_cache, metric, **options)

    def theirs():
        with torch.no_grad():
            return tl_fn(bridge, torch.tensor(corrupted), tl_cache, metric).numpy()

    ours()  # the compiled session is built once, outside the timing
    times = {"lensgraph": [], "TransformerLens": []}
    results = {}
    for _ in range(args.rounds):
        for name, run in (("lensgraph", ours), ("TransformerLens", theirs)):
            start = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    cells = results["lensgraph"].size
    diff = float(np.abs(results["lensgraph"] - results["TransformerLens"]).max()
                 / max(np.abs(results["TransformerLens"]).max(), 1e-12))
    print(f"# bench_patching: {args.sweep} sweep, {cells} cells, GPT-2 {args.size} shape, batch {args.batch} x "
          f"{args.tokens} tokens, {args.threads} threads, median of {args.rounds} interleaved rounds, {benchlib.now()}")
    for name, sec in medians.items():
        spread = f"{min(times[name]):.2f}-{max(times[name]):.2f} s"
        print(f"  {name:18s} {sec:8.2f} s  ({spread}; {cells / sec:7.1f} cells/s)")
    print(f"  lensgraph / TransformerLens: x{medians['lensgraph'] / medians['TransformerLens']:.3f}   "
          f"largest difference of the results: {diff:.1e} of their scale")
    return {"medians": medians, "ratio": medians["lensgraph"] / medians["TransformerLens"], "difference": diff}


if __name__ == "__main__":
    main(sys.argv[1:])
