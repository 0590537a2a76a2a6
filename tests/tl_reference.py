"""Reference weight processing for GPT-2, GPT-NeoX and LLaMA, computed by TransformerLens itself.

Tests compare lensgraph's ONNX-side processing against these arrays, so the
expected values come from TL's own code rather than a re-implementation.
Each ``*_state_dict`` only renames and reshapes HF weights into TL's layout;
every change of value is left to ``ProcessWeights.process_weights``. The
checks after it only confirm that TL did each requested step, because TL
skips a step without a word when it does not find a key it looks for.
"""

import numpy as np
import torch
from transformer_lens.config import TransformerLensConfig
from transformer_lens.weight_processing import ProcessWeights


def _f32(t):
    # A detached float32 copy, so TL can never write into the HF model.
    return t.detach().to(torch.float32).clone()


def _bias(linear):
    """A float32 copy of a Linear's bias, or zeros when it has none.

    With LayerNorm, TL folds the norm's bias into the readers' biases and makes
    zero biases for readers without one; giving them up front keeps the key
    set the same before and after processing.
    """
    if linear.bias is not None:
        return _f32(linear.bias)
    return torch.zeros(linear.weight.shape[0], dtype=torch.float32)


def _rope(cfg):
    """(rope_theta, partial_rotary_factor) from a transformers 5 config."""
    rope = cfg.rope_parameters or {}
    return rope["rope_theta"], rope.get("partial_rotary_factor", 1.0)


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


def _neox_config(cfg):
    """TL config for GPT-NeoX: LayerNorm, rotary positions (no W_pos), plain MLP.

    TransformerLensConfig has no field for parallel_attn_mlp or the rotary
    settings; process_weights reads parallel_attn_mlp with getattr, so it is
    set as an attribute (the rotary ones only describe the model).
    """
    d_head = cfg.hidden_size // cfg.num_attention_heads
    theta, partial = _rope(cfg)
    tl = TransformerLensConfig(
        d_model=cfg.hidden_size,
        d_head=d_head,
        n_layers=cfg.num_hidden_layers,
        n_ctx=cfg.max_position_embeddings,
        n_heads=cfg.num_attention_heads,
        d_mlp=cfg.intermediate_size,
        d_vocab=cfg.vocab_size,
        act_fn=cfg.hidden_act,
        eps=cfg.layer_norm_eps,
        normalization_type="LN",
        positional_embedding_type="rotary",
        device="cpu",
    )
    tl.parallel_attn_mlp = cfg.use_parallel_residual
    tl.rotary_dim = int(d_head * partial)
    tl.rotary_base = theta
    tl.rotary_adjacent_pairs = False
    return tl


def _gqa(cfg):
    """True when LLaMA shares key/value heads (TL then names them _W_K/_W_V)."""
    return cfg.num_key_value_heads < cfg.num_attention_heads


def _llama_config(cfg):
    """TL config for LLaMA: RMSNorm (final norm too), rotary, gated SiLU MLP.

    n_key_value_heads is set only for grouped-query attention: TL then looks
    for the key/value weights under ``_W_K``/``_W_V``, and for the plain names
    when it is None.
    """
    theta, partial = _rope(cfg)
    tl = TransformerLensConfig(
        d_model=cfg.hidden_size,
        d_head=cfg.head_dim,
        n_layers=cfg.num_hidden_layers,
        n_ctx=cfg.max_position_embeddings,
        n_heads=cfg.num_attention_heads,
        d_mlp=cfg.intermediate_size,
        d_vocab=cfg.vocab_size,
        act_fn=cfg.hidden_act,
        eps=cfg.rms_norm_eps,
        normalization_type="RMS",
        uses_rms_norm=True,
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        n_key_value_heads=cfg.num_key_value_heads if _gqa(cfg) else None,
        device="cpu",
    )
    tl.rotary_dim = int(cfg.head_dim * partial)
    tl.rotary_base = theta
    tl.rotary_adjacent_pairs = False
    return tl


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


def neox_state_dict(hf_model):
    """HF GPT-NeoX weights as float32 tensors in TL's naming and shapes.

    The fused query_key_value Linear is interleaved per head: its output axis
    is [n_heads, 3, d_head], so head h's q rows are h*3*d_head + [0, d_head),
    its k rows follow and then its v rows (not q|k|v blocks as in GPT-2).
    """
    cfg = hf_model.config
    d_model, n_heads = cfg.hidden_size, cfg.num_attention_heads
    d_head = d_model // n_heads
    tr = hf_model.gpt_neox

    sd = {"embed.W_E": _f32(tr.embed_in.weight)}
    for l, layer in enumerate(tr.layers):
        p = f"blocks.{l}."
        att = layer.attention
        W = _f32(att.query_key_value.weight).reshape(n_heads, 3, d_head, d_model)
        b = _bias(att.query_key_value).reshape(n_heads, 3, d_head)
        for i, name in enumerate("QKV"):
            sd[p + f"attn.W_{name}"] = W[:, i].permute(0, 2, 1).contiguous()
            sd[p + f"attn.b_{name}"] = b[:, i].contiguous()
        # dense is [d_model, n_heads * d_head]; TL wants [n_heads, d_head, d_model].
        sd[p + "attn.W_O"] = _f32(att.dense.weight).T.reshape(n_heads, d_head, d_model).contiguous()
        sd[p + "attn.b_O"] = _bias(att.dense)
        sd[p + "ln1.w"] = _f32(layer.input_layernorm.weight)
        sd[p + "ln1.b"] = _f32(layer.input_layernorm.bias)
        # With the parallel residual the MLP still has its own norm, which TL calls ln2.
        sd[p + "ln2.w"] = _f32(layer.post_attention_layernorm.weight)
        sd[p + "ln2.b"] = _f32(layer.post_attention_layernorm.bias)
        sd[p + "mlp.W_in"] = _f32(layer.mlp.dense_h_to_4h.weight).T.contiguous()
        sd[p + "mlp.b_in"] = _bias(layer.mlp.dense_h_to_4h)
        sd[p + "mlp.W_out"] = _f32(layer.mlp.dense_4h_to_h.weight).T.contiguous()
        sd[p + "mlp.b_out"] = _bias(layer.mlp.dense_4h_to_h)
    sd["ln_final.w"] = _f32(tr.final_layer_norm.weight)
    sd["ln_final.b"] = _f32(tr.final_layer_norm.bias)
    W_U = _f32(hf_model.lm_head.weight).T.contiguous()
    sd["unembed.W_U"] = W_U
    # No lm_head bias either; without a b_U, TL leaves ln_final.b unfolded.
    sd["unembed.b_U"] = torch.zeros(W_U.shape[1], dtype=torch.float32)
    return sd


def llama_state_dict(hf_model):
    """HF LLaMA weights as float32 tensors in TL's naming and shapes.

    With grouped-query attention the key/value weights are ``attn._W_K`` /
    ``attn._W_V`` of shape [n_key_value_heads, d_model, d_head] (biases
    ``_b_K``/``_b_V``); query head h reads key/value head h // (n_heads //
    n_key_value_heads). Biases are only present when the HF model has them,
    as in TL's own LLaMA adapter: RMSNorm has none, so nothing needs them.
    """
    cfg = hf_model.config
    d_model, n_heads, n_kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    d_head = cfg.head_dim
    kv = "_" if _gqa(cfg) else ""
    tr = hf_model.model

    def heads(linear, n):
        # Linear stores [n * d_head, d_model]; TL wants [n, d_model, d_head].
        return _f32(linear.weight).reshape(n, d_head, d_model).permute(0, 2, 1).contiguous()

    sd = {"embed.W_E": _f32(tr.embed_tokens.weight)}
    for l, layer in enumerate(tr.layers):
        p = f"blocks.{l}."
        att, mlp = layer.self_attn, layer.mlp
        sd[p + "attn.W_Q"] = heads(att.q_proj, n_heads)
        sd[p + f"attn.{kv}W_K"] = heads(att.k_proj, n_kv)
        sd[p + f"attn.{kv}W_V"] = heads(att.v_proj, n_kv)
        sd[p + "attn.W_O"] = _f32(att.o_proj.weight).T.reshape(n_heads, d_head, d_model).contiguous()
        if att.q_proj.bias is not None:
            sd[p + "attn.b_Q"] = _f32(att.q_proj.bias).reshape(n_heads, d_head)
            sd[p + f"attn.{kv}b_K"] = _f32(att.k_proj.bias).reshape(n_kv, d_head)
            sd[p + f"attn.{kv}b_V"] = _f32(att.v_proj.bias).reshape(n_kv, d_head)
        if att.o_proj.bias is not None:
            sd[p + "attn.b_O"] = _f32(att.o_proj.bias)
        sd[p + "ln1.w"] = _f32(layer.input_layernorm.weight)
        sd[p + "ln2.w"] = _f32(layer.post_attention_layernorm.weight)
        # out = down(silu(gate(x)) * up(x)): TL's W_gate goes through the activation, W_in does not.
        sd[p + "mlp.W_gate"] = _f32(mlp.gate_proj.weight).T.contiguous()
        sd[p + "mlp.W_in"] = _f32(mlp.up_proj.weight).T.contiguous()
        sd[p + "mlp.W_out"] = _f32(mlp.down_proj.weight).T.contiguous()
        if mlp.up_proj.bias is not None:
            sd[p + "mlp.b_gate"] = _f32(mlp.gate_proj.bias)
            sd[p + "mlp.b_in"] = _f32(mlp.up_proj.bias)
            sd[p + "mlp.b_out"] = _f32(mlp.down_proj.bias)
    sd["ln_final.w"] = _f32(tr.norm.weight)
    sd["unembed.W_U"] = _f32(hf_model.lm_head.weight).T.contiguous()
    if hf_model.lm_head.bias is not None:
        sd["unembed.b_U"] = _f32(hf_model.lm_head.bias)
    return sd


def _require(cond, msg):
    if not cond:
        raise AssertionError(f"TransformerLens skipped a step: {msg}")


def _near_zero(x, scale, what):
    _require(np.abs(x).max() <= 1e-5 * max(scale, 1.0), f"{what} is not zero (max {np.abs(x).max():.3g})")


def _close(x, y, what):
    _require(np.abs(x - y).max() <= 1e-5 * max(np.abs(y).max(), 1.0), f"{what} (max diff {np.abs(x - y).max():.3g})")


def _check_keys(before, out):
    _require(set(out) == set(before), f"key set changed: {sorted(set(out) ^ set(before))}")
    for k, v in out.items():
        _require(v.shape == tuple(before[k].shape), f"{k} changed shape to {v.shape}")


def _check_norms_reset(out, norms):
    """TL 4.3 keeps norm entries after folding: weights become ones, biases (if any) zeros."""
    for ln in norms:
        _require(np.all(out[ln + ".w"] == 1.0), f"{ln}.w not reset to ones")
        if ln + ".b" in out:
            _require(np.all(out[ln + ".b"] == 0.0), f"{ln}.b not reset to zeros")


def _check_scaled(before, out, readers, centre, centre_vocab=False):
    """Each reader must be its norm's scale times the original, along d_model.

    Setting a norm's weight to ones does not prove its readers took the scale:
    TL resets ln2.w even when it leaves W_gate out (cfg.gated_mlp unset), and
    it picks the d_model axis of W_in and W_U by shape, which is ambiguous when
    d_mlp or d_vocab equals d_model. With LayerNorm TL also centres readers
    over d_model; centre_vocab is for W_U after center_unembed.
    """
    for key, norm, axis in readers:
        w = before[norm + ".w"].double().numpy()
        shape = [1] * before[key].dim()
        shape[axis] = -1
        want = before[key].double().numpy() * w.reshape(shape)
        if centre:
            want = want - want.mean(axis, keepdims=True)
        if centre_vocab:
            want = want - want.mean(-1, keepdims=True)
        _close(out[key], want, f"{key} is not {norm}.w folded in")


def _readers(layers, kv=""):
    """(reader, norm, d_model axis) for the attention and MLP inputs."""
    readers = [(p + f"attn.{pre}W_{n}", p + "ln1", 1) for p in layers for pre, n in
               (("", "Q"), (kv, "K"), (kv, "V"))]
    return readers + [(p + "mlp.W_in", p + "ln2", 0) for p in layers]


def _check_centred(out, keys):
    for k in keys:
        _near_zero(out[k].mean(-1), np.abs(out[k]).max(), f"{k} mean over d_model")


def _check_unembed_centred(out):
    W_U = out["unembed.W_U"]
    _near_zero(W_U.mean(-1), np.abs(W_U).max(), "unembed.W_U mean over d_vocab")


def _check_values_folded(out, layers, key):
    for p in layers:
        if p + key in out:
            _require(np.all(out[p + key] == 0.0), f"{p}{key} not folded")


def _check(before, out, n_layers, fold_ln, center_writing_weights, center_unembed, fold_value_biases):
    """Fail loudly if TL silently left out a step on GPT-2 (e.g. a key name it did not find)."""
    _check_keys(before, out)
    layers = [f"blocks.{l}." for l in range(n_layers)]
    if fold_ln:
        _check_norms_reset(out, [p + n for p in layers for n in ("ln1", "ln2")] + ["ln_final"])
        _check_scaled(before, out, _readers(layers), centre=True)
        _check_scaled(before, out, [("unembed.W_U", "ln_final", 0)], centre=True, centre_vocab=center_unembed)
    if center_writing_weights:
        _check_centred(out, ["embed.W_E", "pos_embed.W_pos"] + [
            p + n for p in layers for n in ("attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out")
        ])
    if center_unembed:
        _check_unembed_centred(out)
    if fold_value_biases:
        _check_values_folded(out, layers, "attn.b_V")


def _check_neox(before, out, n_layers, fold_ln, center_writing_weights, center_unembed, fold_value_biases):
    """Fail loudly if TL silently left out a step on GPT-NeoX."""
    _check_keys(before, out)
    layers = [f"blocks.{l}." for l in range(n_layers)]
    if fold_ln:
        _check_norms_reset(out, [p + n for p in layers for n in ("ln1", "ln2")] + ["ln_final"])
        _check_scaled(before, out, _readers(layers), centre=True)
        _check_scaled(before, out, [("unembed.W_U", "ln_final", 0)], centre=True, centre_vocab=center_unembed)
    if center_writing_weights:
        # Rotary positions: there is no W_pos to centre.
        _check_centred(out, ["embed.W_E"] + [
            p + n for p in layers for n in ("attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out")
        ])
    if center_unembed:
        _check_unembed_centred(out)
    if fold_value_biases:
        _check_values_folded(out, layers, "attn.b_V")


def _check_llama(before, out, n_layers, fold_ln, center_unembed, fold_value_biases):
    """Fail loudly if TL silently left out a step on LLaMA, or centred what it must not.

    RMSNorm does not remove the mean, so TL 4.3 folds only the norm scales
    (no bias folding, no centring of readers) and skips centre_writing_weights
    without a warning; the writers must come back exactly as they went in.
    """
    _check_keys(before, out)
    layers = [f"blocks.{l}." for l in range(n_layers)]
    kv = "_" if any(p.endswith("._W_K") for p in before) else ""
    if fold_ln:
        _check_norms_reset(out, [p + n for p in layers for n in ("ln1", "ln2")] + ["ln_final"])
        readers = _readers(layers, kv) + [(p + "mlp.W_gate", p + "ln2", 0) for p in layers]
        _check_scaled(before, out, readers, centre=False)
        _check_scaled(before, out, [("unembed.W_U", "ln_final", 0)], centre=False, centre_vocab=center_unembed)
    for k in ["embed.W_E"] + [p + n for p in layers for n in ("attn.W_O", "mlp.W_out", "mlp.b_out")]:
        if k in before:
            _require(np.array_equal(out[k], before[k].double().numpy()), f"{k} changed on an RMS model")
    if center_unembed:
        _check_unembed_centred(out)
    if fold_value_biases:
        _check_values_folded(out, layers, f"attn.{kv}b_V")


def _process(sd, cfg, fold_ln, center_writing_weights, center_unembed, fold_value_biases):
    """Run TL's process_weights and return float64 numpy arrays."""
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
    return {k: v.detach().to(torch.float64).numpy() for k, v in processed.items()}


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
    flags = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                 center_unembed=center_unembed, fold_value_biases=fold_value_biases)
    sd = gpt2_state_dict(hf_model)
    cfg = _tl_config(hf_model.config)
    out = _process(sd, cfg, **flags)
    _check(sd, out, cfg.n_layers, **flags)
    return out


def neox_tl_processed(
    hf_model,
    fold_ln=True,
    center_writing_weights=True,
    center_unembed=True,
    fold_value_biases=True,
):
    """TL-processed GPT-NeoX weights as float64 numpy arrays keyed by TL names.

    Same conventions as GPT-2 (norm entries kept as ones/zeros, ``unembed.b_U``
    always present) but no ``pos_embed.W_pos``: positions are rotary and act
    inside attention, so there is nothing to centre for them. ln2 is the MLP's
    own norm whether or not the residual is parallel.
    """
    flags = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                 center_unembed=center_unembed, fold_value_biases=fold_value_biases)
    sd = neox_state_dict(hf_model)
    cfg = _neox_config(hf_model.config)
    out = _process(sd, cfg, **flags)
    _check_neox(sd, out, cfg.n_layers, **flags)
    return out


def llama_tl_processed(
    hf_model,
    fold_ln=True,
    center_writing_weights=True,
    center_unembed=True,
    fold_value_biases=True,
):
    """TL-processed LLaMA weights as float64 numpy arrays keyed by TL names.

    What TL 4.3 does here, and the result reflects:
    - fold_ln multiplies the RMSNorm scales into the readers (W_Q, _W_K, _W_V,
      W_in, W_gate, W_U) and sets ln1/ln2/ln_final ``.w`` to ones; it neither
      centres the readers nor adds biases.
    - center_writing_weights is accepted and skipped without a warning
      (centring is only done for LayerNorm models), so writers are unchanged.
    - center_unembed still centres W_U over the vocabulary (softmax does not
      care), and b_U too when the model has one.
    - fold_value_biases does nothing when the model has no value bias, and
      adds no b_O.
    """
    flags = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                 center_unembed=center_unembed, fold_value_biases=fold_value_biases)
    sd = llama_state_dict(hf_model)
    cfg = _llama_config(hf_model.config)
    out = _process(sd, cfg, **flags)
    _check_llama(sd, out, cfg.n_layers, fold_ln, center_unembed, fold_value_biases)
    return out
