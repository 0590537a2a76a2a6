"""Benchmark: onnxruntime latency of the original and the processed model.

    python scripts/bench_inference.py [--size gpt2-small|gpt2-large] [--runs N] [--provider P]

Batch 1 x 128 tokens, all graph optimisations on, runs interleaved (original, processed,
original, ...) so machine noise hits both alike; reports medians and their ratio (target
processed / original <= 1.02), and which fused ops onnxruntime made in each graph, since a
rewrite that blocks a fusion (LayerNorm, SkipLayerNorm, SimplifiedLayerNorm) costs time.
Then each model is loaded and run once in a fresh process, for its peak resident memory
against its size on disk.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import measure, model_paths, now, size_mib, timed  # noqa: E402

FUSED = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
         "SkipSimplifiedLayerNormalization", "FastGelu", "BiasGelu", "Gelu", "FusedMatMul", "Attention",
         "MultiHeadAttention", "FusedGemm"}


def session(path: str, provider: str, dump: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = dump
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=[provider])


def fused_ops(path: str) -> dict:
    model = onnx.load(path, load_external_data=False)
    return dict(collections.Counter(n.op_type for n in model.graph.node if n.op_type in FUSED))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="gpt2-small", choices=["gpt2-small", "gpt2-large"])
    parser.add_argument("--model", help="an .onnx file instead of the cached benchmark model")
    parser.add_argument("--passes", default=None, help="pipeline to apply (default: TransformerLens's)")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--provider", default="CPUExecutionProvider")
    args = parser.parse_args()
    from lensgraph.process import process

    original = args.model or model_paths(args.size)[1]
    work = tempfile.mkdtemp(prefix="lensgraph-infer-")
    processed = os.path.join(work, "processed.onnx")
    process(original, processed, passes=args.passes, verify=False)
    dumps = {"original": os.path.join(work, "original.opt.onnx"), "processed": os.path.join(work, "processed.opt.onnx")}
    sessions = {"original": session(original, args.provider, dumps["original"]),
                "processed": session(processed, args.provider, dumps["processed"])}
    ids = np.random.default_rng(0).integers(0, 50000, (1, args.tokens)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    times = {k: [] for k in sessions}
    for name, s in sessions.items():  # warm up
        s.run(["logits"], feeds)
    for _ in range(args.runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(["logits"], feeds)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"# bench_inference: {os.path.basename(os.path.dirname(original)) if not args.model else original}, "
          f"batch 1 x {args.tokens}, {args.runs} interleaved runs, {args.provider}, "
          f"{os.cpu_count()} cores, {now()}")
    print("| model | median ms | fused ops after onnxruntime's optimiser |")
    print("|---|---|---|")
    for k in sessions:
        print(f"| {k} | {med[k]:.1f} | {fused_ops(dumps[k])} |")
    print(f"\nprocessed / original latency: {med['processed'] / med['original']:.3f} (target <= 1.02)")
    del sessions
    print("\n| model | size on disk MiB | peak RSS MiB (load and one run, fresh process) | peak RSS / size |")
    print("|---|---|---|---|")
    for name, path in (("original", original), ("processed", processed)):
        peak = measure(timed(
            "import numpy as np, onnxruntime as ort\n"
            f"ids = np.random.default_rng(0).integers(0, 50000, (1, {args.tokens})).astype(np.int64)\n#--\n"
            f"s = ort.InferenceSession({path!r}, providers=[{args.provider!r}])\n"
            "s.run(['logits'], {'input_ids': ids, 'attention_mask': np.ones_like(ids)})\n"
        ))["peak_rss_mib"]
        print(f"| {name} | {size_mib(path):.0f} | {peak:.0f} | {peak / size_mib(path):.2f} |")


if __name__ == "__main__":
    main()
