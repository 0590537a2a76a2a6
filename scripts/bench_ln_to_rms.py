#!/usr/bin/env python3
"""Latency of the optional ln_to_rms pass in onnxruntime, against the processed model.

For each exporter form, the model processed with the default pipeline (baseline) runs
beside the same with ln_to_rms: at opset < 23 its norms fuse into
SimplifiedLayerNormalization, at opset 23 they are RMSNormalization nodes.

    python scripts/bench_ln_to_rms.py [--size gpt2-small|tiny] [--seq 128] [--threads 2] [--rounds 20]
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

from lensgraph.pipeline import DEFAULT_PIPELINE  # noqa: E402
from lensgraph.process import process  # noqa: E402

NORM_OPS = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization", "RMSNormalization"}
FORMS = {"torchscript17": ("torchscript", 17), "torchscript14": ("torchscript", 14), "dynamo23": ("dynamo", 23)}


def main(argv=None) -> dict:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--forms", nargs="+", choices=sorted(FORMS), default=list(FORMS))
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or tmp
        os.makedirs(folder, exist_ok=True)
        feeds = benchlib.inputs(args.batch, args.seq, benchlib.SIZES[args.size]["vocab_size"])
        for form in args.forms:
            original = benchlib.gpt2(folder, args.size, *FORMS[form])
            lens, rms = original.replace(".onnx", ".lens.onnx"), original.replace(".onnx", ".rms.onnx")
            if not os.path.exists(rms):
                process(original, lens, verify=False)
                process(original, rms, passes=list(DEFAULT_PIPELINE) + ["ln_to_rms"])  # verified
            a, b = benchlib.session(lens, args.threads), benchlib.session(rms, args.threads)
            print(f"GPT-2 {args.size} ({form}), batch {args.batch} x {args.seq} tokens, {args.threads} threads, "
                  f"median of {args.rounds} interleaved rounds:")
            medians = benchlib.compare({"processed (baseline)": lambda: a.run(["logits"], feeds),
                                      "processed + ln_to_rms": lambda: b.run(["logits"], feeds)}, args.rounds)
            benchlib.report(medians, "processed (baseline)")
            norms = [benchlib.kernel_ms(m, feeds, args.threads, 10, lambda op, _: op in NORM_OPS) for m in (lens, rms)]
            print(f"  time in norm kernels per run (profiler): {norms[0]:.2f} ms -> {norms[1]:.2f} ms "
                  f"(x{norms[1] / max(norms[0], 1e-9):.2f})")
            results[form] = dict(medians, norm_ms=norms)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
