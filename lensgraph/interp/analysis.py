"""Reading cached activations back into the vocabulary: a logit lens and direct logit attribution.

Both need what lies after the residual stream: the final norm (its epsilon, scale and
bias) and the unembedding, plus each layer's attention output projection for per-head
attribution. `Readout` takes them from the model through the anatomy, so the analyses
run on any model whose hooks can be placed, processed or not.

    logit lens   resid_post[l] -> final norm -> unembedding: what layer l would predict
    attribution  logit[t] = sum over components c of  normalise(c) @ W_U[:, t]  +  constant,
                 using the final stream's scale, so the parts add up to the logit exactly
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import LensError
from ..graph.anatomy import analyse
from ..graph.hookpoints import writers_by_role
from ..store.model import LensModel
from ..store.resolve import resolve
from ..store.weights import LinearWeights


@dataclass
class Readout:
    eps: float
    centring: bool  # LayerNorm (removes the mean) or RMSNorm
    w: np.ndarray  # final norm scale [d_model]
    b: np.ndarray  # final norm bias [d_model]
    W_U: np.ndarray  # [d_model, vocab]
    b_U: np.ndarray  # [vocab]
    W_O: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [head * d_head, d_model]
    b_O: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [d_model]

    @classmethod
    def from_model(cls, model: str | os.PathLike | LensModel) -> "Readout":
        model = model if isinstance(model, LensModel) else LensModel.load(resolve(model).model)
        anatomy = analyse(model.graph)
        norm, unembed = anatomy.final_norm, anatomy.unembed
        if unembed is None or norm is None:
            raise LensError("no final norm and unembedding found: " + (anatomy.unembed_blocker or "no final norm"))
        store, linear = model.weights, LinearWeights(model.weights)

        def vector(ref, fill):
            return np.full(norm.d_model, fill) if ref is None else store.read(ref[0].inputs[ref[1]]).reshape(-1)

        out = cls(eps=float(norm.eps if norm.eps is not None else 1e-5), centring=norm.centring,
                  w=vector(norm.scale, 1.0), b=vector(norm.bias, 0.0),
                  W_U=linear.weight(unembed), b_U=linear.bias(unembed))
        for layer, writer in writers_by_role(anatomy).get("attn_out", {}).items():
            if writer.norm is None:  # through a sublayer-output norm the heads do not add up linearly
                out.W_O[layer], out.b_O[layer] = linear.weight(writer.linear), linear.bias(writer.linear)
        return out

    def scale(self, x: np.ndarray) -> np.ndarray:
        """The final norm's divisor for stream x: sqrt(var + eps) (RMSNorm: sqrt(mean x^2 + eps))."""
        x = np.asarray(x, np.float64)
        if self.centring:
            x = x - x.mean(-1, keepdims=True)
        return np.sqrt((x * x).mean(-1, keepdims=True) + self.eps)

    def normalise(self, x: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
        """The final norm applied to x; with `scale` given, a part of a stream normalised as the whole is."""
        x = np.asarray(x, np.float64)
        if self.centring:
            x = x - x.mean(-1, keepdims=True)
        return x / (self.scale(x) if scale is None else scale) * self.w + self.b

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.normalise(x) @ self.W_U + self.b_U


def logit_lens(cache: dict, readout: Readout) -> np.ndarray:
    """[layer, batch, pos, vocab]: each layer's resid_post through the final norm and the unembedding."""
    layers = sorted(int(k.split(".")[1]) for k in cache if k.startswith("blocks.") and k.endswith(".hook_resid_post"))
    if not layers:
        raise LensError("the cache has no blocks.*.hook_resid_post")
    return np.stack([readout.logits(cache[f"blocks.{l}.hook_resid_post"]) for l in layers])


def components(cache: dict, readout: Readout, heads: bool = True) -> dict[str, np.ndarray]:
    """The terms summed into the final residual stream, [batch, pos, d_model] each, in order.

    Attention splits into heads (z[:, :, h] @ W_O[h]) plus its output bias when the
    cache has hook_z and the projection's weight is known.
    """
    out = {}
    for name in ("hook_embed", "hook_pos_embed"):
        if name in cache:
            out[name.removeprefix("hook_")] = np.asarray(cache[name], np.float64)
    layers = sorted({int(k.split(".")[1]) for k in cache if k.startswith("blocks.")})
    for l in layers:
        z = cache.get(f"blocks.{l}.attn.hook_z")
        if heads and z is not None and l in readout.W_O:
            W_O = readout.W_O[l].reshape(z.shape[2], z.shape[3], -1)  # [head, d_head, d_model]
            for h in range(z.shape[2]):
                out[f"L{l}H{h}"] = np.asarray(z[:, :, h], np.float64) @ W_O[h]
            out[f"L{l} attn bias"] = np.broadcast_to(readout.b_O[l], z.shape[:2] + readout.b_O[l].shape)
        elif f"blocks.{l}.hook_attn_out" in cache:
            out[f"L{l} attn"] = np.asarray(cache[f"blocks.{l}.hook_attn_out"], np.float64)
        if f"blocks.{l}.hook_mlp_out" in cache:
            out[f"L{l} MLP"] = np.asarray(cache[f"blocks.{l}.hook_mlp_out"], np.float64)
    return out


def direct_logit_attribution(cache: dict, readout: Readout, answer: int, pos: int = -1,
                             heads: bool = True) -> dict[str, np.ndarray]:
    """Each component's direct contribution to the logit of `answer` at `pos`, [batch] each.

    Every part is normalised with the final stream's own scale (ln_final.hook_scale),
    as TransformerLens's apply_ln_to_stack does, so the contributions plus "constant"
    (the norm bias and unembedding bias) plus "other" (stream terms not in the cache, ~0
    when every writer is hooked) add up to the logit.
    """
    last = max(int(k.split(".")[1]) for k in cache if k.endswith(".hook_resid_post"))
    stream = np.asarray(cache[f"blocks.{last}.hook_resid_post"], np.float64)[:, pos]
    scale = np.asarray(cache["ln_final.hook_scale"], np.float64)[:, pos] if "ln_final.hook_scale" in cache \
        else readout.scale(stream)
    direction = readout.w * readout.W_U[:, answer]
    terms = {name: c[:, pos] for name, c in components(cache, readout, heads).items()}
    parts = {name: _centre(c, readout) / scale @ direction for name, c in terms.items()}
    rest = stream - sum(terms.values())
    parts["other"] = _centre(rest, readout) / scale @ direction
    parts["constant"] = np.full(stream.shape[0], readout.b @ readout.W_U[:, answer] + readout.b_U[answer])
    return parts


def _centre(x: np.ndarray, readout: Readout) -> np.ndarray:
    return x - x.mean(-1, keepdims=True) if readout.centring else x
