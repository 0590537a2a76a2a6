"""fold_value_biases: move each attention block's value bias into its output bias.

Attention rows sum to 1, so softmax(...) @ (x W_V + b_V) = softmax(...) @ x W_V + b_V;
through the output projection that constant becomes b_V @ W_O:
b_O' = b_O + b_V @ W_O (per head, value heads repeated for grouped attention), b_V' = 0.
"""

import numpy as np

from lensgraph.pipeline import Pass, PassResult, check, register
from lensgraph.weights import LinearWeights


@register
class FoldValueBiases(Pass):
    name = "fold_value_biases"
    after = ("fold_ln",)
    summary = "fold value biases into the attention output bias"
    formula = "b_O += b_V @ W_O; b_V = 0"

    def run(self, model, anatomy) -> PassResult:
        result = PassResult(self.name)
        linear = LinearWeights(model.weights)
        for att in anatomy.attention:
            result.matched += 1
            what = f"layer {att.layer} attention ({att.o.name})"
            if att.blocker:
                result.skip(what, att.blocker)
                continue
            start, stop = att.v_cols
            v_bias = linear.bias(att.v)
            b_v = v_bias[start:stop]
            if not np.any(b_v):
                result.skip(what, "value bias is already zero")
                continue
            o_bias = linear.bias(att.o) + b_v @ linear.weight(att.o)
            linear.set_bias(att.o, o_bias)
            v_bias[start:stop] = 0.0
            linear.set_bias(att.v, v_bias)
            model.tag(att.o.node, self.name, self.formula)
            model.tag(att.v.node, self.name, f"b_V = 0 (columns {start}:{stop})")
            result.rewritten += 1
        result.modified = result.rewritten > 0
        return result

    def ensures(self, model, anatomy) -> None:
        linear = LinearWeights(model.weights)
        for att in anatomy.attention:
            if att.blocker is None:
                start, stop = att.v_cols
                check(not np.any(linear.bias(att.v)[start:stop]), f"value bias left in {att.v.name}")
