"""refactor_factored_attn_matrices: each head's QK and OV products re-factored evenly, as
TransformerLens 4.x's option of that name does (optional).

Per head, with the query and key biases as an extra row, W_Q' W_K'^T = W_Q W_K^T through an SVD
with the singular values split evenly (W_Q' = U sqrt(S), W_K' = V sqrt(S)); W_V' W_O' = W_V W_O with
W_V' = U S and W_O' = V^T (orthonormal rows), the value bias folded into b_O first. The products,
hence the attention scores and each head's output, are unchanged. Which columns are each head's
is measured (graph/heads.py). Refused on rotary models: the QK product then depends on the
positions, as TransformerLens refuses it too.
"""

import numpy as np

from lensgraph.graph.heads import head_layout
from lensgraph.pipeline import Pass, PassResult, register
from lensgraph.store.weights import LinearWeights


@register
class RefactorFactoredAttnMatrices(Pass):
    name = "refactor_factored_attn_matrices"
    formula = "W_Q W_K^T = (U sqrt S)(V sqrt S)^T with the bias row; W_V W_O = (U S) V^T; b_O += b_V W_O"

    def run(self, model, anatomy) -> PassResult:
        result = PassResult(self.name)
        linear = LinearWeights(model.weights)
        layouts = head_layout(model, anatomy.attention)
        weights, biases = {}, {}  # map node -> its matrix / bias as rewritten so far (q, k, v may share one)

        def get(lin):
            key = id(lin.node)
            if key not in weights:
                weights[key], biases[key] = (lin, linear.weight(lin).copy()), linear.bias(lin).copy()
            return weights[key][1], biases[key]

        for att, layout in zip(anatomy.attention, layouts):
            result.matched += 1
            what = f"layer {att.layer} attention ({att.o.name})"
            if isinstance(layout, str):
                result.skip(what, layout)
                continue
            if layout.rotary:
                result.skip(what, "rotary embeddings: the QK product depends on the positions, so it has no "
                                  "one factorisation (TransformerLens refuses it too)")
                continue
            if layout.n_kv_heads != layout.n_heads:
                result.skip(what, "grouped-query attention: a key head serves several query heads")
                continue
            wq, bq = get(layout.q)
            wk, bk = get(layout.k)
            wv, bv = get(layout.v)
            wo, bo = get(layout.o)
            for h in range(layout.n_heads):
                qc, kc, vc, orow = layout.q_cols[h], layout.k_cols[h], layout.v_cols[h], layout.o_rows[h]
                a = np.vstack([wq[:, qc], bq[qc][None]])  # [d_model + 1, d_head]
                b = np.vstack([wk[:, kc], bk[kc][None]])
                u, s, v = _svd(a, b)
                a2, b2 = u * np.sqrt(s), v * np.sqrt(s)
                wq[:, qc], bq[qc], wk[:, kc], bk[kc] = a2[:-1], a2[-1], b2[:-1], b2[-1]
                bo += bv[vc] @ wo[orow]  # the value bias, exact because attention rows sum to 1
                bv[vc] = 0.0
                u, s, v = _svd(wv[:, vc], wo[orow].T)
                wv[:, vc], wo[orow] = u * s, v.T
            result.rewritten += 1
        for key, (lin, w) in weights.items():
            linear.set_weight(lin, w)
            if lin.bias is not None or np.any(biases[key]):
                linear.set_bias(lin, biases[key])
            model.tag(lin.node, self.name, self.formula)
        result.modified = result.rewritten > 0
        return result


def _svd(a: np.ndarray, b: np.ndarray):
    """The thin SVD of a @ b.T (both [n, r]): U [n, r], S [r], V [n, r] with a @ b.T = U diag(S) V^T."""
    qa, ra = np.linalg.qr(a)
    qb, rb = np.linalg.qr(b)
    uc, s, vct = np.linalg.svd(ra @ rb.T)
    return qa @ uc, s, qb @ vct.T
