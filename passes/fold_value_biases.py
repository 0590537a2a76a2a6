"""fold_value_biases: move each attention block's value bias into its output bias.

Attention rows sum to 1, so softmax(...) @ (x W_V + b_V) = softmax(...) @ x W_V + b_V;
through the output projection that constant becomes b_V @ W_O:
b_O' = b_O + b_V @ W_O (per head, value heads repeated for grouped attention), b_V' = 0.
Which value column feeds which row of W_O is measured by `lensgraph.graph.probe`.
"""

import numpy as np

from lensgraph.graph.anatomy import QUANTIZED
from lensgraph.graph.probe import value_index
from lensgraph.pipeline import Pass, PassResult, check, register
from lensgraph.store.weights import LinearWeights


@register
class FoldValueBiases(Pass):
    name = "fold_value_biases"
    formula = "b_O += b_V @ W_O; b_V = 0"

    def run(self, model, anatomy) -> PassResult:
        result = PassResult(self.name)
        linear = LinearWeights(model.weights)
        todo = []
        if not anatomy.attention:
            found = [w.name for w in anatomy.writers if w.role == "attn_out"]
            quantized = [w for w in anatomy.writers if w.node is not None and w.node.op_type in QUANTIZED]
            result.skip("model", "no attention block's V->O path was traced"
                        + (f" ({'; '.join(anatomy.notes)})" if anatomy.notes else "" if found else
                           f": the maps writing into the stream are quantized ({quantized[0].node.op_type})"
                           if quantized else ": no stream term is fed by softmax(...) @ V"))
        for att in anatomy.attention:
            result.matched += 1
            what = f"layer {att.layer} attention ({att.o.name})"
            if att.blocker:
                result.skip(what, att.blocker)
            elif att.v.bias is None or not np.any(linear.bias(att.v)):
                result.skip(what, "value bias is already zero")
            else:
                todo.append((what, att))
        indices = value_index(model, [att for _, att in todo]) if todo else []
        for (what, att), index in zip(todo, indices):
            if isinstance(index, str):
                result.skip(what, index)
                continue
            v_bias = linear.bias(att.v)
            b_v = v_bias[index]  # the value bias as the output projection sees it
            linear.set_bias(att.o, linear.bias(att.o) + linear.matrix(att.o).left(b_v))
            columns = np.unique(index)
            v_bias[columns] = 0.0
            linear.set_bias(att.v, v_bias)
            check(not np.any(linear.bias(att.v)[columns]), f"value bias left in {att.v.name}")
            model.tag(att.o.node, self.name, self.formula)
            model.tag(att.v.node, self.name, f"b_V = 0 ({columns.size} value columns)")
            result.rewritten += 1
        result.modified = result.rewritten > 0
        return result
