"""A tiny GGUF checkpoint written from a tiny LLaMA checkpoint folder (tiny_models.text_checkpoint): the
llama architecture's keys, its float32 tensors under GGUF's names, and the folder's byte-level BPE as a
`gpt2` GGUF tokenizer, so transformers reads it back as it reads a real GGUF file."""

from __future__ import annotations

import json
import os

import numpy as np

NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_tiny_gguf(checkpoint: str, path: str) -> str:
    import gguf
    from safetensors.numpy import load_file

    config = json.load(open(os.path.join(checkpoint, "config.json")))
    tokenizer = json.load(open(os.path.join(checkpoint, "tokenizer.json")))
    special = json.load(open(os.path.join(checkpoint, "tokenizer_config.json")))
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"] for t in tokenizer["added_tokens"]}
    ids = {tok: i for tok, i in vocab}
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(len(vocab))
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([tok for tok, _ in vocab])
    writer.add_token_types([3 if i in added else 1 for _, i in vocab])
    merges = tokenizer["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(ids[special["bos_token"]])
    writer.add_eos_token_id(ids[special["eos_token"]])
    writer.add_add_bos_token(False)
    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
    for name, array in weights.items():
        if name in NAMES:
            target = NAMES[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            target = f"blk.{layer}.{LAYER[rest.removesuffix('.weight')]}.weight"
        writer.add_tensor(target, np.ascontiguousarray(array, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
