#!/usr/bin/env python3
"""Logit lens: what each layer's residual stream would predict if it were the last.

Each layer's blocks.{l}.hook_resid_post goes through the final norm and the unembedding.
Runs on a model (`--model`: the folder `lensgraph convert` wrote, with `--prompt` text, whose
tokens are printed as text), or builds, exports and processes a tiny random GPT-2 when none is
given (no network; token ids). The last layer's lens equals the model's own logits.

    python scripts/logit_lens.py --model smollm2/ --prompt "The capital of France is"
    python scripts/logit_lens.py [--tokens 5 17 3 ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np

import lensgraph
from lensgraph.interp.analysis import Readout, logit_lens
from lensgraph.tiny_models import tiny_lens_model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a folder `lensgraph convert` wrote, or an ONNX model (default: a tiny "
                        "random GPT-2 built here)")
    parser.add_argument("--prompt", help="the text to read, tokenized by the model folder's tokenizer with BOS "
                        "first (default: --tokens)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[5, 17, 3, 42, 8, 23, 61, 2],
                        help="token ids, where there is no prompt")
    parser.add_argument("--provider", default="CPUExecutionProvider")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tiny_lens_model(tmp)
        ids = lensgraph.to_tokens(path, args.prompt) if args.prompt is not None else np.array([args.tokens])
        logits, cache = lensgraph.run_with_cache(path, ids, points=["blocks.*.hook_resid_post"], provider=args.provider)
        lens = logit_lens(cache, Readout.from_model(cache.model_path))  # [layer, batch, pos, vocab]
        words = show(path if args.prompt is not None else None)
    final = logits[0].argmax(-1)  # the model's prediction at each position
    probs = np.exp(lens - lens.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    print(f"tokens: {words(ids[0])}")
    print(f"model's predictions: {words(final)}")
    for l in range(lens.shape[0]):
        top = lens[l, 0].argmax(-1)
        p_final = probs[l, 0, np.arange(len(final)), final]
        print(f"layer {l:2d}: top {words(top)} || p(final) " + " ".join(f"{p:.2f}" for p in p_final))
    gap = float(np.abs(lens[-1] - logits).max())
    print(f"last layer's lens vs the model's logits: max difference {gap:.1e}")
    return {"lens": lens, "logits": logits, "gap": gap}


def show(model):
    """Token ids as text where the model folder has a tokenizer (each token's repr, `|` between), else as ids."""
    if model is None:
        return lambda ids: " ".join(f"{int(t):4d}" for t in ids)
    return lambda ids: " | ".join(map(repr, lensgraph.to_str_tokens(model, np.asarray(ids))))


if __name__ == "__main__":
    main(sys.argv[1:])
