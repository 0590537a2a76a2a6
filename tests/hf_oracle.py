"""TransformerLens's hook points computed from a HuggingFace model's own modules, read with torch
forward hooks: the oracle every hook point lensgraph places is compared with.

`processed` gives the values a model processed with TransformerLens's default pipeline shows:
on a LayerNorm model the stream and every term written into it lose their mean over d_model, and
hook_z loses the value bias (fold_value_biases); on an RMSNorm model nothing a hook sees changes.
"""

from __future__ import annotations

import numpy as np
import torch

# Where each family keeps what a hook point names. attn_out/mlp_out: the module whose output is
# added into the stream; resid_mid: the module whose input is the stream between the sublayers.
COMMON = dict(layers="model.layers", attn="self_attn", o="self_attn.o_proj", mlp="mlp", down="mlp.down_proj",
              ln1="input_layernorm", ln2="post_attention_layernorm", final="model.norm",
              attn_out="self_attn", mlp_out="mlp", mid="post_attention_layernorm", pos=None,
              pre="mlp.gate_proj", pre_linear="mlp.up_proj", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
GEMMA_SANDWICH = dict(COMMON, ln2="pre_feedforward_layernorm", mid="pre_feedforward_layernorm",
                      attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm")
FAMILIES = {
    "gpt2": dict(layers="transformer.h", attn="attn", o="attn.c_proj", mlp="mlp", down="mlp.c_proj", ln1="ln_1",
                 ln2="ln_2", final="transformer.ln_f", attn_out="attn", mlp_out="mlp", mid="ln_2",
                 pos="transformer.wpe", embed="transformer.wte", pre="mlp.c_fc", pre_linear=None,
                 qkv="attn.c_attn"),  # one map: q | k | v
    "gpt_neox": dict(layers="gpt_neox.layers", attn="attention", o="attention.dense", mlp="mlp",
                     down="mlp.dense_4h_to_h", ln1="input_layernorm", ln2="post_attention_layernorm",
                     final="gpt_neox.final_layer_norm", attn_out="attention", mlp_out="mlp", mid=None, pos=None,
                     pre="mlp.dense_h_to_4h", pre_linear=None,
                     qkv="attention.query_key_value"),  # one map, [head, q | k | v, d_head]
    "llama": COMMON, "qwen3": COMMON,
    "phi3": dict(COMMON, pre="mlp.gate_up_proj", pre_linear="mlp.gate_up_proj",  # one packed map: its halves
                 qkv="self_attn.qkv_proj"),  # one map: q | k | v
    "gemma2": GEMMA_SANDWICH, "gemma3_text": GEMMA_SANDWICH,
    "olmo2": dict(COMMON, ln1=None, ln2=None, mid="mlp", attn_out="post_attention_layernorm",
                  mlp_out="post_feedforward_layernorm"),
}


def family_of(hf) -> dict:
    return FAMILIES[hf.config.model_type]


def _get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _eps(norm) -> float:
    for name in ("eps", "variance_epsilon", "epsilon"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    return 1e-5


def hf_points(hf, input_ids: np.ndarray, processed: bool) -> dict[str, np.ndarray]:
    """{TransformerLens hook name: activation} for the points this family has."""
    fam = family_of(hf)
    layernorm = isinstance(_get(hf, fam["final"]), torch.nn.LayerNorm)
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def out_hook(key):
        def hook(module, args, output):
            seen[key] = _first(output).detach()
        return hook

    def in_hook(key):
        def hook(module, args, kwargs):
            seen[key] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def pattern_hook(key):
        def hook(module, args, output):
            seen[key] = output[1].detach()
        return hook

    for l, layer in enumerate(_get(hf, fam["layers"])):
        handles.append(layer.register_forward_pre_hook(in_hook(f"pre{l}"), with_kwargs=True))
        handles.append(layer.register_forward_hook(out_hook(f"post{l}")))
        handles.append(_get(layer, fam["attn"]).register_forward_hook(pattern_hook(f"pattern{l}")))
        handles.append(_get(layer, fam["o"]).register_forward_pre_hook(in_hook(f"z{l}"), with_kwargs=True))
        handles.append(_get(layer, fam["down"]).register_forward_pre_hook(in_hook(f"mlp_post{l}"), with_kwargs=True))
        handles.append(_get(layer, fam["attn_out"]).register_forward_hook(out_hook(f"attn_out{l}")))
        handles.append(_get(layer, fam["mlp_out"]).register_forward_hook(out_hook(f"mlp_out{l}")))
        maps = fam["qkv"] if isinstance(fam["qkv"], tuple) else (fam["qkv"],)
        for j, path in enumerate(maps):
            handles.append(_get(layer, path).register_forward_hook(out_hook(f"qkv{j}_{l}")))
        for key in ("pre", "pre_linear"):
            if fam[key]:
                handles.append(_get(layer, fam[key]).register_forward_hook(out_hook(f"mlp_{key}{l}")))
        for key in ("ln1", "ln2", "mid"):
            if fam[key]:
                handles.append(_get(layer, fam[key]).register_forward_pre_hook(in_hook(f"{key}{l}"), with_kwargs=True))
    handles.append(_get(hf, fam["final"]).register_forward_pre_hook(in_hook("final"), with_kwargs=True))
    if fam.get("pos"):
        handles.append(_get(hf, fam["embed"]).register_forward_hook(out_hook("embed")))
        handles.append(_get(hf, fam["pos"]).register_forward_hook(out_hook("pos")))
    try:
        with torch.no_grad():
            hf(torch.tensor(input_ids), output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    v = {k: t.double().numpy() for k, t in seen.items()}

    def centre(x):
        return x - x.mean(-1, keepdims=True) if processed and layernorm else x

    def scale(x, norm):
        x = x - x.mean(-1, keepdims=True) if layernorm else x
        return np.sqrt((x * x).mean(-1, keepdims=True) + _eps(norm))

    cfg = hf.config
    n_heads = cfg.num_attention_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    out = {}
    if fam.get("pos"):
        out["hook_embed"], out["hook_pos_embed"] = centre(v["embed"]), centre(np.broadcast_to(v["pos"], v["embed"].shape))
    else:
        out["hook_embed"] = centre(v["pre0"])  # the embedding as it enters the stream (scaled, where it is)
    layers = _get(hf, fam["layers"])
    for l, layer in enumerate(layers):
        p = f"blocks.{l}."
        out[p + "hook_resid_pre"] = centre(v[f"pre{l}"])
        out[p + "hook_resid_post"] = centre(v[f"post{l}"])
        out[p + "hook_attn_out"] = centre(v[f"attn_out{l}"])
        out[p + "hook_mlp_out"] = centre(v[f"mlp_out{l}"])
        if fam["mid"]:
            out[p + "hook_resid_mid"] = centre(v[f"mid{l}"])
        out[p + "attn.hook_pattern"] = v[f"pattern{l}"]
        z = v[f"z{l}"].reshape(*v[f"z{l}"].shape[:2], n_heads, d_head)
        out[p + "attn.hook_z"] = z - _value_bias(hf, layer, n_heads, d_head) if processed else z
        out[p + "mlp.hook_post"] = v[f"mlp_post{l}"]
        q, k, values = _qkv(cfg, fam, v, l, n_heads, d_head)
        if processed:  # fold_value_biases took the value bias out (fold_ln had moved the norm's bias into it)
            values = values - _value_bias(hf, layer, n_heads, d_head)[:: n_heads // values.shape[2]]
        out.update({p + "attn.hook_q": q, p + "attn.hook_k": k, p + "attn.hook_v": values})
        for key in ("ln1", "ln2"):
            if fam[key]:
                x, norm = v[f"{key}{l}"], _get(layer, fam[key])
                out[p + f"{key}.hook_scale"] = scale(x, norm)
                out[p + f"{key}.hook_normalized"] = (x - x.mean(-1, keepdims=True) if layernorm else x) / scale(x, norm)
        if fam["pre"]:
            pre = v[f"mlp_pre{l}"]
            if fam["pre"] == fam["pre_linear"]:  # Phi-3's gate_up_proj: the gate, then the linear branch
                half = pre.shape[-1] // 2
                out[p + "mlp.hook_pre"], out[p + "mlp.hook_pre_linear"] = pre[..., :half], pre[..., half:]
            else:
                out[p + "mlp.hook_pre"] = pre
                if fam["pre_linear"]:
                    out[p + "mlp.hook_pre_linear"] = v[f"mlp_pre_linear{l}"]
    final = _get(hf, fam["final"])
    x = v["final"]
    out["ln_final.hook_scale"] = scale(x, final)
    out["ln_final.hook_normalized"] = (x - x.mean(-1, keepdims=True) if layernorm else x) / scale(x, final)
    return out


def _qkv(cfg, fam, v, l, n_heads, d_head) -> list[np.ndarray]:
    """hook_q [b, pos, head, d_head], hook_k and hook_v [b, pos, kv_head, d_head] from the maps' outputs."""
    kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    if isinstance(fam["qkv"], tuple):
        return [v[f"qkv{j}_{l}"].reshape(*v[f"qkv{j}_{l}"].shape[:2], -1, d_head) for j in range(3)]
    out = v[f"qkv0_{l}"]
    b, s = out.shape[:2]
    if cfg.model_type == "gpt_neox":  # interleaved per head
        heads = out.reshape(b, s, n_heads, 3, d_head)
        return [heads[:, :, :, i] for i in range(3)]
    q, k, rest = np.split(out, [n_heads * d_head, (n_heads + kv) * d_head], axis=-1)
    return [x.reshape(b, s, -1, d_head) for x in (q, k, rest)]


def _value_bias(hf, layer, n_heads: int, d_head: int) -> np.ndarray:
    """Each value head's bias as the processed model had it before fold_value_biases, [head, d_head]:
    the map's own bias plus the norm bias fold_ln moved into it (b_ln @ W_V), repeated for
    grouped-query attention (zero where there is none)."""
    kind = hf.config.model_type
    if kind == "gpt2":
        d = n_heads * d_head
        w, b = layer.attn.c_attn.weight.detach().double().numpy(), layer.attn.c_attn.bias.detach().double().numpy()
        b_ln = layer.ln_1.bias.detach().double().numpy()
        return (b + b_ln @ w)[2 * d:].reshape(n_heads, d_head)
    if kind == "gpt_neox":
        qkv = layer.attention.query_key_value
        w, b = qkv.weight.detach().double().numpy(), qkv.bias.detach().double().numpy()
        b_ln = layer.input_layernorm.bias.detach().double().numpy()
        return (b + w @ b_ln).reshape(n_heads, 3, d_head)[:, 2]
    v = getattr(layer.self_attn, "v_proj", None)
    if v is None or v.bias is None:
        return np.zeros((n_heads, d_head))
    kv = v.bias.detach().double().numpy().reshape(-1, d_head)
    return np.repeat(kv, n_heads // kv.shape[0], axis=0)


def logits_under(hf, ids, handles) -> np.ndarray:
    """HF's logits (float64) with these torch hooks registered; they are removed after."""
    try:
        with torch.no_grad():
            return hf(torch.tensor(ids)).logits.double().numpy()
    finally:
        for h in handles:
            h.remove()


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))
