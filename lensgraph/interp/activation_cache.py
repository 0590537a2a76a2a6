"""TransformerLens's ActivationCache helpers on the cache run_with_cache returns, in numpy.

    logits, cache = lensgraph.run_with_cache("gpt2.lens.onnx", ids)
    resid, labels = cache.accumulated_resid(apply_ln=True, pos_slice=-1, return_labels=True)
    cache.logit_attrs(resid, tokens=answer_ids)          # each component's direct logit attribution

The cache is still a plain mapping of hook names to arrays. The helpers follow TransformerLens
4.x's `ActivationCache` (same arguments, labels and conventions): `apply_ln_to_stack` divides by
the cached norm scale and uses no norm weights (centring first for a LayerNorm), except that
`accumulated_resid` at the final layer applies the final norm to each component, as TL's does;
the unembedding, W_O and the final norm's parameters are read through `tl_weights`.
"""

from __future__ import annotations

import functools

import numpy as np

from ..errors import LensError
from ..graph.anatomy import analyse
from ..store.model import LensModel
from .tl_weights import tl_weights


class ActivationCache(dict):
    def __init__(self, values: dict, model_path: str | None = None):
        super().__init__(values)
        self.model_path = model_path

    # -- what the helpers need of the model ------------------------------------------------
    @functools.cached_property
    def _model(self) -> dict:
        if self.model_path is None:
            raise LensError("this cache came from an onnxruntime session: its helpers need the model file "
                            "(run_with_cache with a path)")
        model = LensModel.load(self.model_path)
        anatomy = analyse(model.graph)
        final = anatomy.final_norm
        return {"weights": tl_weights(model), "n_layers": len(anatomy.layers),
                "centring": bool(final is not None and final.centring),
                "eps": float(final.eps) if final is not None and final.eps is not None else 1e-5}

    @property
    def n_layers(self) -> int:
        return self._model["n_layers"]

    def _get(self, name: str) -> np.ndarray:
        if name not in self:
            raise LensError(f"the cache has no {name} (run_with_cache with that point)")
        return np.asarray(self[name], np.float64)

    # -- TransformerLens's helpers ---------------------------------------------------------
    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice=None, mlp_input: bool = False, return_labels: bool = False):
        """The residual stream at the start of each block up to `layer` (all: the final stream too)."""
        layer = self.n_layers if layer is None or layer == -1 else layer
        parts, labels = [], []
        for l in range(layer + 1):
            if l == self.n_layers:
                parts.append(self._get(f"blocks.{l - 1}.hook_resid_post"))
                labels.append("final_post")
                continue
            parts.append(self._get(f"blocks.{l}.hook_resid_pre"))
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                parts.append(self._get(f"blocks.{l}.hook_resid_mid"))
                labels.append(f"{l}_mid")
        stack = np.stack([_pos(p, pos_slice) for p in parts])
        if apply_ln:
            if layer == self.n_layers:  # the final norm applied to each component, as TL recomputes it
                stack = np.stack([self._final_norm(c) for c in stack])
            else:
                stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice=None, incl_embeds: bool = True, return_labels: bool = False):
        """The terms added into the stream before `layer`: embeddings, then each block's attention and MLP."""
        if mode not in ("all", "mlp", "attn"):
            raise LensError(f"mode must be 'all', 'mlp' or 'attn', not {mode!r}")
        layer = self.n_layers if layer is None or layer == -1 else layer
        parts, labels = [], []
        if incl_embeds:
            for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
                if name in self:
                    parts.append(self._get(name))
                    labels.append(label)
        for l in range(layer):
            if mode != "mlp":
                parts.append(self._get(f"blocks.{l}.hook_attn_out"))
                labels.append(f"{l}_attn_out")
            if mode != "attn":
                parts.append(self._get(f"blocks.{l}.hook_mlp_out"))
                labels.append(f"{l}_mlp_out")
        if mlp_input and mode != "mlp":
            parts.append(self._get(f"blocks.{layer}.hook_attn_out"))
            labels.append(f"{layer}_attn_out")
        stack = np.stack([_pos(p, pos_slice) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice=None, apply_ln: bool = False):
        """Each head's output through its slice of W_O, [heads of the blocks before `layer`, ..., d_model]."""
        layer = self.n_layers if layer is None or layer == -1 else layer
        parts, labels = [], []
        for l in range(layer):
            w_o = self._model["weights"].get(f"blocks.{l}.attn.W_O")
            if w_o is None:
                raise LensError(f"blocks.{l}.attn.W_O is not readable: "
                                f"{self._model['weights'].missing.get(f'blocks.{l}.attn.*', 'unknown')}")
            result = np.einsum("...hd,hdm->...hm", _pos(self._get(f"blocks.{l}.attn.hook_z"), pos_slice, -3),
                               np.asarray(w_o, np.float64))
            parts += [result[..., h, :] for h in range(result.shape[-2])]
            labels += [f"L{l}H{h}" for h in range(result.shape[-2])]
        if incl_remainder:
            rest = _pos(self._get(f"blocks.{layer - 1}.hook_resid_post"), pos_slice) - sum(parts, 0)
            parts.append(rest)
            labels.append("remainder")
        stack = np.stack(parts) if parts else np.zeros((0,) + _pos(self._get("hook_embed"), pos_slice).shape)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(self, residual_stack, layer: int | None = None, mlp_input: bool = False,
                          pos_slice=None, batch_slice=None, has_batch_dim: bool = True):
        """Each component divided by the cached scale of the norm that reads the stream there (centred
        first for a LayerNorm), as if it were the whole stream: no norm weights are applied."""
        layer = self.n_layers if layer is None or layer == -1 else layer
        stack = np.asarray(residual_stack, np.float64)
        if has_batch_dim and batch_slice is not None:
            stack = stack[:, batch_slice]
        if self._model["centring"]:
            stack = stack - stack.mean(-1, keepdims=True)
        key = "ln_final.hook_scale" if layer == self.n_layers else f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
        scale = _pos(self._get(key), pos_slice)
        if has_batch_dim and batch_slice is not None:
            scale = scale[batch_slice]
        return stack / scale

    def logit_attrs(self, residual_stack, tokens, incorrect_tokens=None, pos_slice=None, batch_slice=None,
                    has_batch_dim: bool = True) -> np.ndarray:
        """Each component's direct attribution to the logit of `tokens` (minus `incorrect_tokens`'):
        the component through the final norm's cached scale, dotted with the unembedding's columns."""
        w_u = np.asarray(self._model["weights"]["unembed.W_U"], np.float64)
        directions = w_u[:, np.asarray(tokens)].T if np.ndim(tokens) <= 1 else np.moveaxis(w_u[:, np.asarray(tokens)], 0, -1)
        if incorrect_tokens is not None:
            if np.shape(tokens) != np.shape(incorrect_tokens):
                raise LensError(f"tokens and incorrect_tokens must have the same shape ({np.shape(tokens)} vs "
                                f"{np.shape(incorrect_tokens)})")
            wrong = np.asarray(incorrect_tokens)
            directions = directions - (w_u[:, wrong].T if wrong.ndim <= 1 else np.moveaxis(w_u[:, wrong], 0, -1))
        scaled = self.apply_ln_to_stack(residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        if has_batch_dim and scaled.ndim == 4 and directions.ndim == 2 and directions.shape[0] == scaled.shape[1]:
            directions = directions[:, None, :]
        return (scaled * directions).sum(-1)

    def _final_norm(self, x: np.ndarray) -> np.ndarray:
        """The final norm itself (its own statistics, and its weights where it keeps them)."""
        if self._model["centring"]:
            x = x - x.mean(-1, keepdims=True)
        x = x / np.sqrt((x * x).mean(-1, keepdims=True) + self._model["eps"])
        weights = self._model["weights"]
        if "ln_final.w" in weights:
            x = x * weights["ln_final.w"] + weights.get("ln_final.b", 0.0)
        return x


def _pos(x: np.ndarray, pos_slice, axis: int = -2) -> np.ndarray:
    """TransformerLens's pos_slice: None keeps every position, an int picks one (its axis goes)."""
    if pos_slice is None:
        return x
    index = [slice(None)] * x.ndim
    index[axis] = pos_slice
    return x[tuple(index)]
