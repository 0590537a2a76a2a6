"""Reference weight processing for GPT-2, computed by TransformerLens itself.

Tests compare lensgraph's ONNX-side processing against these arrays, so the
expected values come from TL's own code rather than a re-implementation.
"""

import numpy as np
import torch
from transformer_lens.config import TransformerLensConfig
from transformer_lens.weight_processing import ProcessWeights


def _f32(t):
    # A detached float32 copy, so TL can never write into the HF model.
    return t.detach().to(torch.float32).clone()


def _tl_config(cfg):
    """TL 4.3 takes a plain TransformerLensConfig (HookedTransformerConfig is gone)."""
    return TransformerLensConfig(
        d_model=cfg.n_embd,
        d_head=cfg.n_embd // cfg.n_head,
        n_layers=cfg.n_layer,
        n_ctx=cfg.n_positions,
        n_heads=cfg.n_head,
        d_mlp=cfg.n_inner or 4 * cfg.n_embd,
        d_vocab=cfg.vocab_size,
        act_fn=cfg.activation_function,
        eps=cfg.layer_norm_epsilon,
        normalization_type="LN",
        positional_embedding_type="standard",
        device="cpu",
    )


def gpt2_state_dict(hf_model):
    """HF GPT-2 weights as float32 tensors in TL's naming and shapes."""
    cfg = hf_model.config
    # These options change the attention maths; the TL layout would not describe them.
    if cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn:
        raise ValueError("GPT-2 attention variants are not supported by this reference")
    if not cfg.scale_attn_weights:
        raise ValueError("scale_attn_weights=False is not supported by this reference")
    tr = hf_model.transformer
    d_model, n_heads = cfg.n_embd, cfg.n_head
    d_head = d_model // n_heads

    sd = {
        "embed.W_E": _f32(tr.wte.weight),
        "pos_embed.W_pos": _f32(tr.wpe.weight),
    }
    for l, block in enumerate(tr.h):
        p = f"blocks.{l}."
        # Conv1D stores [in, out]; c_attn's out axis is q|k|v, each heads x d_head.
        W = _f32(block.attn.c_attn.weight).reshape(d_model, 3, n_heads, d_head)
        b = _f32(block.attn.c_attn.bias).reshape(3, n_heads, d_head)
        for i, name in enumerate("QKV"):
            sd[p + f"attn.W_{name}"] = W[:, i].permute(1, 0, 2).contiguous()
            sd[p + f"attn.b_{name}"] = b[i].contiguous()
        sd[p + "attn.W_O"] = _f32(block.attn.c_proj.weight).reshape(n_heads, d_head, d_model)
        sd[p + "attn.b_O"] = _f32(block.attn.c_proj.bias)
        sd[p + "ln1.w"] = _f32(block.ln_1.weight)
        sd[p + "ln1.b"] = _f32(block.ln_1.bias)
        sd[p + "ln2.w"] = _f32(block.ln_2.weight)
        sd[p + "ln2.b"] = _f32(block.ln_2.bias)
        sd[p + "mlp.W_in"] = _f32(block.mlp.c_fc.weight)
        sd[p + "mlp.b_in"] = _f32(block.mlp.c_fc.bias)
        sd[p + "mlp.W_out"] = _f32(block.mlp.c_proj.weight)
        sd[p + "mlp.b_out"] = _f32(block.mlp.c_proj.bias)
    sd["ln_final.w"] = _f32(tr.ln_f.weight)
    sd["ln_final.b"] = _f32(tr.ln_f.bias)
    W_U = _f32(hf_model.lm_head.weight).T.contiguous()
    sd["unembed.W_U"] = W_U
    # GPT-2's lm_head has no bias; TL expects one to fold ln_final.b into.
    sd["unembed.b_U"] = torch.zeros(W_U.shape[1], dtype=torch.float32)
    return sd


def _require(cond, msg):
    if not cond:
        raise AssertionError(f"TransformerLens skipped a step: {msg}")


def _near_zero(x, scale, what):
    _require(np.abs(x).max() <= 1e-5 * max(scale, 1.0), f"{what} is not zero (max {np.abs(x).max():.3g})")


def _check(before, out, n_layers, fold_ln, center_writing_weights, center_unembed, fold_value_biases):
    """Fail loudly if TL silently left out a step (e.g. a key name it did not find)."""
    _require(set(out) == set(before), f"key set changed: {sorted(set(out) ^ set(before))}")
    for k, v in out.items():
        _require(v.shape == tuple(before[k].shape), f"{k} changed shape to {v.shape}")
    layers = [f"blocks.{l}." for l in range(n_layers)]
    if fold_ln:
        # TL 4.3 keeps the LN entries after folding: weights become ones, biases zeros.
        for ln in [p + n for p in layers for n in ("ln1", "ln2")] + ["ln_final"]:
            _require(np.all(out[ln + ".w"] == 1.0), f"{ln}.w not reset to ones")
            _require(np.all(out[ln + ".b"] == 0.0), f"{ln}.b not reset to zeros")
    if center_writing_weights:
        for k in ["embed.W_E", "pos_embed.W_pos"] + [
            p + n for p in layers for n in ("attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out")
        ]:
            _near_zero(out[k].mean(-1), np.abs(out[k]).max(), f"{k} mean over d_model")
    if center_unembed:
        W_U = out["unembed.W_U"]
        _near_zero(W_U.mean(-1), np.abs(W_U).max(), "unembed.W_U mean over d_vocab")
    if fold_value_biases:
        for p in layers:
            _require(np.all(out[p + "attn.b_V"] == 0.0), f"{p}attn.b_V not folded")


def gpt2_tl_processed(
    hf_model,
    fold_ln=True,
    center_writing_weights=True,
    center_unembed=True,
    fold_value_biases=True,
):
    """TL-processed GPT-2 weights as float64 numpy arrays keyed by TL names.

    With fold_ln, TL 4.3 leaves ln1/ln2/ln_final ``.w`` in the dict as ones
    and ``.b`` as zeros (it does not delete them); the forward pass then uses
    LN as a bare normaliser. ``unembed.b_U`` is always present.
    """
    sd = gpt2_state_dict(hf_model)
    cfg = _tl_config(hf_model.config)
    # process_weights writes into the dict it is given, so hand it a copy.
    processed = ProcessWeights.process_weights(
        dict(sd),
        cfg,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
        refactor_factored_attn_matrices=False,
        adapter=None,
    )
    out = {k: v.detach().to(torch.float64).numpy() for k, v in processed.items()}
    _check(sd, out, cfg.n_layers, fold_ln, center_writing_weights, center_unembed, fold_value_biases)
    return out
