"""Shared by the bench_*.py scripts: a GPT-2-shaped model with random weights, and interleaved timing.

Timings are medians over rounds in which every variant runs once, so a slow moment on a
shared machine hits all variants alike; each script prints ratios against the baseline
measured beside it.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

SIZES = {
    "small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257),  # GPT-2 small's shape (124M)
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256),
}


def gpt2(folder: str, size: str, exporter: str = "torchscript", opset: int | None = 17) -> str:
    """Export a GPT-2 of the given shape with random weights (randomised norms) once; return its path."""
    from lensgraph.demo import tiny_gpt2
    from lensgraph.export import export_model

    path = os.path.join(folder, f"gpt2-{size}-{exporter}{opset or ''}.onnx")
    if not os.path.exists(path):
        export_model(tiny_gpt2(**SIZES[size]), path, exporter=exporter, opset=opset, check=False)
    return path


def parser(doc: str):
    """The options every in-process latency benchmark takes."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--dir", help="keep the models here (default: a temporary folder)")
    return p


def session(model, threads: int, provider: str = "CPUExecutionProvider"):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=[provider])


def inputs(batch: int, seq: int, vocab: int) -> dict:
    ids = np.random.default_rng(0).integers(0, vocab, (batch, seq)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def kernel_ms(model, feeds: dict, threads: int, runs: int, keep) -> float:
    """Milliseconds per run that onnxruntime's profiler books to the kernels `keep(op, node)` picks
    (each kernel's median over the runs, so the first, cold run does not count)."""
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.log_severity_level = 3
    sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(["logits"], feeds)
    profile = sess.end_profiling()
    with open(profile) as f:
        events = json.load(f)
    os.remove(profile)
    per_node: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"].removesuffix("_kernel_time")
            if keep(e.get("args", {}).get("op_name"), node):
                per_node.setdefault(node, []).append(e["dur"])
    return sum(statistics.median(d) for d in per_node.values()) / 1000  # median run of each kernel


def compare(variants: dict, rounds: int, warmup: int = 3) -> dict[str, float]:
    """variants: name -> zero-argument callable; returns name -> median milliseconds."""
    for run in variants.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def report(medians: dict[str, float], baseline: str) -> None:
    base = medians[baseline]
    for name, ms in medians.items():
        print(f"  {name:48s} {ms:8.2f} ms   x{ms / base:.3f}")
