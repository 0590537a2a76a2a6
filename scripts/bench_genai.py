#!/usr/bin/env python3
"""Generation speed of a processed onnxruntime-genai model against the original.

A LLaMA-shaped checkpoint of about 124M parameters (GPT-2 small's size; the builder has no
GPT-2) with random weights is built by onnxruntime-genai's model builder (fp32, CPU), processed
by lensgraph folder to folder, and both folders generate the same greedy tokens in interleaved
rounds. Reports each one's median tokens per second and processed / original (target >= 0.98).

    python scripts/bench_genai.py [--size gpt2-small|tiny] [--tokens 64] [--rounds 5] [--dir FOLDER]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

LLAMA = {
    # about 124M parameters: GPT-2 small's width, depth and vocabulary, in LLaMA's shape
    "gpt2-small": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                       intermediate_size=2048, vocab_size=50257, max_position_embeddings=1024),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=256, max_position_embeddings=256),
}


def build(folder: str, size: str) -> str:
    """The original onnxruntime-genai folder, built once under `folder`."""
    import torch
    import transformers as tf
    from onnxruntime_genai.models.builder import create_model, parse_extra_options
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from lensgraph.tiny_models import randomise_1d

    out = os.path.join(folder, f"llama-{size}-genai")
    if os.path.exists(os.path.join(out, "genai_config.json")):
        return out
    ckpt = os.path.join(folder, f"llama-{size}-hf")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(bos_token_id=0, eos_token_id=0, **LLAMA[size])).eval()
    randomise_1d(model, 0)
    model.save_pretrained(ckpt)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"],
                            trainers.BpeTrainer(vocab_size=64, special_tokens=["<s>", "[UNK]"]))
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>", unk_token="[UNK]").save_pretrained(ckpt)
    args = ("", ckpt, out, "fp32", "cpu", os.path.join(folder, "cache"))
    create_model(*args, **parse_extra_options(*args, []))
    return out


def tokens_per_second(model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + n, min_length=len(prompt) + n)
    gen = og.Generator(model, params)
    start = time.perf_counter()
    gen.append_tokens(np.array([prompt], np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    seconds = time.perf_counter() - start
    return n / seconds, [int(t) for t in gen.get_sequence(0)]


def main(argv=None) -> dict:
    import onnxruntime_genai as og

    from lensgraph.process import process

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(LLAMA), default="gpt2-small")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", help="keep the folders here (default: a temporary folder)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or tmp
        os.makedirs(folder, exist_ok=True)
        original = build(folder, args.size)
        processed = os.path.join(folder, f"llama-{args.size}-genai.lens")
        if not os.path.exists(processed):
            process(original, processed)
        models = {"original (baseline)": og.Model(original), "processed": og.Model(processed)}
        prompt = [3, 5, 7, 9, 11, 13, 15, 17]
        rates = {name: [] for name in models}
        sequences = {}
        for name, model in models.items():  # warm-up
            _, sequences[name] = tokens_per_second(model, prompt, 8)
        for _ in range(args.rounds):
            for name, model in models.items():
                rate, sequences[name] = tokens_per_second(model, prompt, args.tokens)
                rates[name].append(rate)
        same = sequences["original (baseline)"] == sequences["processed"]
        med = {name: statistics.median(r) for name, r in rates.items()}
        print(f"# bench_genai: LLaMA {args.size}, fp32 CPU, {args.tokens} greedy tokens, median of {args.rounds} "
              f"interleaved rounds, {benchlib.now()}")
        for name, rate in med.items():
            print(f"  {name:24s} {rate:8.1f} tokens/s   x{rate / med['original (baseline)']:.3f}")
        print(f"  same greedy tokens: {same}")
        ratio = med["processed"] / med["original (baseline)"]
        print(f"processed / original tokens/s: {ratio:.3f} (target >= 0.98)")
    return {"ratio": ratio, "same": same, **med}


if __name__ == "__main__":
    main(sys.argv[1:])
