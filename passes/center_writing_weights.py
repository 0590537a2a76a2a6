"""center_writing_weights: make every term written into the residual stream mean-zero.

Each writer W [in, d_model] loses its mean over d_model, as do its bias and the
embedding and position tables. Exact only when every reader of the stream is a
centring LayerNorm, which removes the mean anyway; the anatomy proves that or says why not.
"""

import numpy as np

from lensgraph.graph import match
from lensgraph.pipeline import Pass, PassResult, centred, check, register
from lensgraph.store.weights import LinearWeights


@register
class CenterWritingWeights(Pass):
    name = "center_writing_weights"
    formula = "W -= mean(W, axis=d_model); b -= mean(b)"

    def requires(self, model, anatomy):
        reason = super().requires(model, anatomy)
        if reason:
            return reason
        if not anatomy.stream:
            return "no residual stream read by a norm was found"
        return anatomy.stream_blocker

    def run(self, model, anatomy) -> PassResult:
        result = PassResult(self.name)
        store, linear = model.weights, LinearWeights(model.weights)
        for writer in anatomy.writers:
            result.matched += 1
            if writer.blocker:
                result.skip(writer.name, writer.blocker)
                continue
            if writer.kind == "linear":
                lin = writer.linear
                linear.set_weight(lin, linear.matrix(lin).centred(axis=1))
                if lin.bias is not None:
                    bias = linear.bias(lin)
                    linear.set_bias(lin, bias - bias.mean())
                model.tag(lin.node, self.name, self.formula)
            else:
                table, _ = match.back(writer.node.inputs[writer.idx], {"Identity"})
                if len(match.const_shape(table) or ()) == 2:
                    store.write(writer.node, writer.idx, store.matrix(table).centred(axis=1))
                else:
                    arr = store.read(table)
                    store.write(writer.node, writer.idx, arr - arr.mean(axis=-1, keepdims=True))
                model.tag(writer.node, self.name, "table -= mean(table, axis=d_model)")
            result.rewritten += 1
        result.modified = result.rewritten > 0
        return result

    def ensures(self, model, anatomy) -> None:
        linear = LinearWeights(model.weights)
        for writer in anatomy.writers:
            if writer.blocker:
                continue
            what = f"center_writing_weights: writer {writer.name}"
            if writer.kind == "linear":
                ok = linear.expect_centred(writer.linear, 1, what)
            else:
                value = writer.node.inputs[writer.idx]
                if len(match.const_shape(value) or ()) == 2:
                    ok = model.weights.expect_centred(value, 1, what)
                else:
                    arr = model.weights.stored(value)
                    ok = centred(arr, arr.mean(axis=-1, dtype=np.float64), model.weights.dtype(value))
            check(ok, f"writer {writer.name} is not centred")
