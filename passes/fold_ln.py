"""fold_ln: fold each norm's scale and bias into the linear maps that read it.

For a LayerNorm (scale w, bias b) read by x @ W + c:  c' = c + b @ W,  W' = w[:, None] * W,
then W' -= W'.mean(axis=0) (exact: the normalised input has zero mean over d_model),
and the norm becomes the bare normaliser (w = 1, b = 0). RMSNorm folds only the scale.
"""

import numpy as np

from lensgraph.graph.anatomy import FOLDABLE_ROLES
from lensgraph.pipeline import Pass, PassResult, check, register
from lensgraph.store.weights import LinearWeights


@register
class FoldLayerNorm(Pass):
    name = "fold_ln"
    formula = "c' = c + b @ W; W' = w[:, None] * W; W' -= mean(W', axis=in)"

    def run(self, model, anatomy) -> PassResult:
        result = PassResult(self.name)
        store, linear = model.weights, LinearWeights(model.weights)
        kept: dict[str, list] = {}  # norms that do not read the stream, by the reason they stay
        for norm in anatomy.norms:
            if norm.role not in FOLDABLE_ROLES:
                kept.setdefault(norm.blocker, []).append(norm)
                continue
            result.matched += 1
            if norm.blocker:
                result.skip(norm.name, norm.blocker)
                continue
            w = _vector(store, norm.scale, np.ones(norm.d_model))
            b = _vector(store, norm.bias, np.zeros(norm.d_model))
            for lin in norm.readers:
                weight, bias = linear.matrix(lin), linear.bias(lin)
                if norm.centring:  # b @ W, and w @ W for the centring below: one read for both
                    bias = bias + weight.lefts([b, w])[0]
                weight = weight.scaled(w, axis=0)
                if norm.centring:
                    weight = weight.centred(axis=0)
                linear.set_weight(lin, weight)
                if lin.bias is not None or np.any(bias != 0):
                    linear.set_bias(lin, bias)
                model.tag(lin.node, self.name, f"{self.formula} (from {norm.name})")
            for ref, fill in ((norm.scale, 1.0), (norm.bias, 0.0)):
                if ref is not None:
                    node, idx = ref
                    store.write(node, idx, np.full(store.read(node.inputs[idx]).shape, fill))
                    model.tag(node, self.name, "bare normaliser: scale 1, bias 0")
            result.rewritten += 1
        for reason, norms in kept.items():
            result.skip(norms[0].name if len(norms) == 1 else f"{len(norms)} norms ({norms[0].name}, ...)", reason)
        result.modified = result.rewritten > 0
        return result

    def ensures(self, model, anatomy) -> None:
        for norm in anatomy.stream_readers:
            if norm.blocker is None:
                w = _vector(model.weights, norm.scale, np.ones(1))
                b = _vector(model.weights, norm.bias, np.zeros(1))
                check(np.all(w == 1) and np.all(b == 0), f"fold_ln left {norm.name} with a scale or bias")


def _vector(store, ref, default):
    if ref is None:
        return default
    node, idx = ref
    return store.read(node.inputs[idx]).reshape(-1)
