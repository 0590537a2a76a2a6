"""center_unembed: make the unembedding mean-zero over the vocabulary.

W_U [d_model, vocab] -= W_U.mean(axis=1), b_U -= mean(b_U): every logit at a position
moves by the same constant, which softmax ignores.
"""

from lensgraph.pipeline import Pass, PassResult, check, register
from lensgraph.store.weights import LinearWeights


@register
class CenterUnembed(Pass):
    name = "center_unembed"
    formula = "W_U -= mean(W_U, axis=vocab); b_U -= mean(b_U)"

    def requires(self, model, anatomy):
        reason = super().requires(model, anatomy)
        if reason:
            return reason
        if anatomy.unembed is None:
            return anatomy.unembed_blocker or "no unembedding found"
        return anatomy.unembed_nonlinear

    def run(self, model, anatomy) -> PassResult:
        result = PassResult(self.name, matched=1)
        linear, lin = LinearWeights(model.weights), anatomy.unembed
        linear.set_weight(lin, linear.matrix(lin).centred(axis=1))
        if lin.bias is not None:
            bias = linear.bias(lin)
            linear.set_bias(lin, bias - bias.mean())
        model.tag(lin.node, self.name, self.formula)
        result.rewritten = 1
        result.modified = True
        return result

    def ensures(self, model, anatomy) -> None:
        linear = LinearWeights(model.weights)
        ok = linear.expect_centred(anatomy.unembed, 1, "center_unembed: the unembedding")
        check(ok, "unembedding is not centred")
