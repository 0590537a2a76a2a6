#!/usr/bin/env python3
"""Direct logit attribution: how much each head, MLP and embedding writes the answer's logit.

Every term of the final residual stream (embedding, positions, each head's z @ W_O,
each attention output bias, each MLP output) is normalised with the final stream's
scale (ln_final.hook_scale) and read through the unembedding column of the answer
token; the parts add up to the model's logit. Runs on `--model`, or on a tiny random
GPT-2 built here when none is given (no network). With a folder `lensgraph convert` wrote, the
prompt is text (`--prompt`) and the tokens are printed as text.

    python scripts/direct_logit_attribution.py --model smollm2/ --prompt "The capital of France is"
    python scripts/direct_logit_attribution.py [--tokens ...] [--answer ID]
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np

import lensgraph
from lensgraph.interp.analysis import Readout, direct_logit_attribution
from lensgraph.tiny_models import tiny_lens_model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a folder `lensgraph convert` wrote, or an ONNX model (default: a tiny "
                        "random GPT-2 built here)")
    parser.add_argument("--prompt", help="the text to read, tokenized by the model folder's tokenizer with BOS "
                        "first (default: --tokens)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[5, 17, 3, 42, 8, 23, 61, 2],
                        help="token ids, where there is no prompt")
    parser.add_argument("--answer", type=int, help="answer token id (default: the model's prediction)")
    parser.add_argument("--pos", type=int, default=-1, help="position to explain (default: the last)")
    parser.add_argument("--top", type=int, default=10, help="components to list")
    parser.add_argument("--provider", default="CPUExecutionProvider")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tiny_lens_model(tmp)
        ids = lensgraph.to_tokens(path, args.prompt) if args.prompt is not None else np.array([args.tokens])
        logits, cache = lensgraph.run_with_cache(path, ids, provider=args.provider)
        readout = Readout.from_model(cache.model_path)
        words = show(path if args.prompt is not None else None)
    answer = int(logits[0, args.pos].argmax()) if args.answer is None else args.answer
    parts = {name: float(v[0]) for name, v in direct_logit_attribution(cache, readout, answer, args.pos).items()}
    logit = float(logits[0, args.pos, answer])
    print(f"tokens: {words(ids[0])}")
    said = f" ({words([answer])})" if args.prompt is not None else ""
    print(f"answer token {answer}{said} at position {args.pos}: logit {logit:.4f}")
    for name, value in sorted(parts.items(), key=lambda kv: -abs(kv[1]))[:args.top]:
        print(f"  {name:14s} {value:+.4f}")
    total = sum(parts.values())
    print(f"sum of all {len(parts)} parts {total:.4f} (difference from the logit {abs(total - logit):.1e})")
    return {"parts": parts, "logit": logit, "answer": answer}


def show(model):
    """Token ids as text where the model folder has a tokenizer (each token's repr, `|` between), else as ids."""
    if model is None:
        return lambda ids: " ".join(str(int(t)) for t in ids)
    return lambda ids: " | ".join(map(repr, lensgraph.to_str_tokens(model, np.asarray(ids))))


if __name__ == "__main__":
    main(sys.argv[1:])
