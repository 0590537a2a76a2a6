"""center_unembed: make the unembedding mean-zero over the vocabulary.

W_U [d_model, vocab] -= W_U.mean(axis=1), b_U -= mean(b_U): every logit at a position
moves by the same constant, which softmax ignores.
"""

import numpy as np

from lensgraph.pipeline import Pass, PassResult, centred, check, register
from lensgraph.weights import LinearWeights


@register
class CenterUnembed(Pass):
    name = "center_unembed"
    summary = "centre the unembedding over the vocabulary"
    formula = "W_U -= mean(W_U, axis=vocab); b_U -= mean(b_U)"

    def requires(self, model, anatomy):
        reason = super().requires(model, anatomy)
        if reason:
            return reason
        if anatomy.unembed is None:
            return anatomy.unembed_blocker or "no unembedding found"
        return None

    def run(self, model, anatomy) -> PassResult:
        result = PassResult(self.name, matched=1)
        linear, lin = LinearWeights(model.weights), anatomy.unembed
        weight = linear.weight(lin)
        weight -= weight.mean(axis=1, keepdims=True)
        linear.set_weight(lin, weight)
        if lin.bias is not None:
            bias = linear.bias(lin)
            linear.set_bias(lin, bias - bias.mean())
        model.tag(lin.node, self.name, self.formula)
        result.rewritten = 1
        result.modified = True
        return result

    def ensures(self, model, anatomy) -> None:
        linear = LinearWeights(model.weights)
        weight = linear.weight(anatomy.unembed, stored=True)
        mean = weight.mean(axis=1, dtype=np.float64)
        check(centred(weight, mean, linear.dtype(anatomy.unembed)), "unembedding is not centred")
