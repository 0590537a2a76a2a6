#!/usr/bin/env python3
"""Latency of hook outputs in onnxruntime, against the processed model without hooks.

Variants: the processed model (baseline); the same with every hook point as a graph
output, fetching only the logits and fetching everything; run_with_cache asking for no
hooks and for all. onnxruntime's inference builds run every node whatever is fetched,
so a file with hook outputs pays for them on every run; run_with_cache builds its
session with only the points asked for.

    python scripts/bench_hooks.py [--size gpt2-small|tiny] [--seq 128] [--threads 2] [--rounds 20]
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

from lensgraph import run_with_cache  # noqa: E402
from lensgraph.interp.cache import session as cached_session  # noqa: E402
from lensgraph.interp.hooks import add_hooks  # noqa: E402
from lensgraph.store.model import LensModel  # noqa: E402
from lensgraph.process import process  # noqa: E402


def main(argv=None) -> dict:
    parser = benchlib.parser(__doc__)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or tmp
        os.makedirs(folder, exist_ok=True)
        original = benchlib.gpt2(folder, args.size)
        processed = original.replace(".onnx", ".lens.onnx")
        hooked = original.replace(".onnx", ".hooks.onnx")
        if not os.path.exists(hooked):
            process(original, processed, verify=False)
            model = LensModel.load(processed)
            add_hooks(model)
            model.save(hooked)
        feeds = benchlib.inputs(args.batch, args.seq, benchlib.SIZES[args.size]["vocab_size"])
        plain, hooks = benchlib.session(processed, args.threads), benchlib.session(hooked, args.threads)
        names = [o.name for o in hooks.get_outputs()]
        for points in ([], None):  # make run_with_cache's sessions now, with the same threads
            cached_session(processed, points=points)
        variants = {
            "processed, no hooks (baseline)": lambda: plain.run(["logits"], feeds),
            f"with {len(names) - 1} hook outputs, fetching logits only": lambda: hooks.run(["logits"], feeds),
            f"with {len(names) - 1} hook outputs, fetching all": lambda: hooks.run(names, feeds),
            "run_with_cache(points=[])": lambda: run_with_cache(processed, feeds["input_ids"], points=[]),
            "run_with_cache(points=None): every hook": lambda: run_with_cache(processed, feeds["input_ids"]),
        }
        print(f"GPT-2 {args.size}, batch {args.batch} x {args.seq} tokens, {args.threads} threads, "
              f"median of {args.rounds} interleaved rounds:")
        medians = benchlib.compare(variants, args.rounds)
        benchlib.report(medians, "processed, no hooks (baseline)")
        hook_nodes = {n.name for n in LensModel.load(hooked).graph if "lensgraph.hook" in n.metadata_props}
        total = benchlib.kernel_ms(hooked, feeds, args.threads, 10, lambda op, node: True)
        spent = benchlib.kernel_ms(hooked, feeds, args.threads, 10, lambda op, node: node in hook_nodes)
        print(f"  time in hook kernels per run, fetching logits only (profiler): {spent:.2f} ms "
              f"of {total:.2f} ms in all kernels ({100 * spent / total:.1f}%)")
        medians["hook_kernel_ms"], medians["all_kernel_ms"] = spent, total
    return medians


if __name__ == "__main__":
    main(sys.argv[1:])
