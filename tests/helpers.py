"""Test helpers: run models in onnxruntime and read intermediate tensors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from lensgraph.pipeline import Pass, PassResult
from lensgraph.verify import centred
from lensgraph.store.weights import LinearWeights


def feeds(batch: int = 2, seq: int = 6, vocab: int = 96, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def run(path: str, inputs: dict, extra_outputs=()) -> dict:
    """Run the model, also returning the named intermediate tensors."""
    model = onnx.load(path)
    have = {o.name for o in model.graph.output}
    for name in extra_outputs:
        if name not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs)))


def relative_gap(original_logits: np.ndarray, rewritten_logits: np.ndarray) -> float:
    """Worst difference of centred logits, relative to the logit scale."""
    a, b = centred(original_logits), centred(rewritten_logits)
    return float(np.abs(a - b).max() / np.abs(a).max())


def logits_gap(original: str, rewritten: str, shapes=((1, 7), (2, 5), (3, 1))) -> float:
    gap = 0.0
    for i, (b, s) in enumerate(shapes):
        x = feeds(b, s, seed=i)
        gap = max(gap, relative_gap(run(original, x)["logits"], run(rewritten, x)["logits"]))
    return gap


class BreakUnembed(Pass):
    """A deliberately wrong rewrite: verification must catch it."""

    name = "break_unembed"

    def run(self, model, anatomy):
        linear = LinearWeights(model.weights)
        w = linear.weight(anatomy.unembed)
        linear.set_weight(anatomy.unembed, w + np.random.default_rng(0).normal(0, 0.1, w.shape))
        return PassResult(self.name, matched=1, rewritten=1, modified=True)
