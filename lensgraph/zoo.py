"""Tiny models of every supported family, built from configs with random weights (needs the
[export] extra).

Every 1-D parameter is randomised (HF initialises norms to 1 and biases to 0, which
would hide folding mistakes). Sizes are tiny so the whole matrix exports in seconds.
"""

from __future__ import annotations

import torch
import transformers as tf

from .demo import randomise_1d

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)


def _configs() -> dict:
    return {
        "gpt2": lambda: tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, **SMALL),
        "gpt_neox": lambda: tf.GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                             intermediate_size=64, max_position_embeddings=64,
                                             rotary_pct=0.5, use_parallel_residual=True, **SMALL),
        "gptj": lambda: tf.GPTJConfig(n_layer=2, n_embd=32, n_head=4, rotary_dim=4, n_positions=64, **SMALL),
        "gpt_neo": lambda: tf.GPTNeoConfig(num_layers=2, hidden_size=32, num_heads=4, attention_types=[[["global", "local"], 1]],
                                           window_size=4, max_position_embeddings=64, **SMALL),
        "opt": lambda: tf.OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                                    word_embed_proj_dim=32, max_position_embeddings=64,
                                    do_layer_norm_before=True, **SMALL),
        "phi": lambda: tf.PhiConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                    partial_rotary_factor=0.5, max_position_embeddings=64, **SMALL),
        "llama": lambda: tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=64, max_position_embeddings=64, **SMALL),
        "mistral": lambda: tf.MistralConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                            sliding_window=None, **SMALL),
        "qwen2": lambda: tf.Qwen2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True,
                                        **SMALL),
        "gemma": lambda: tf.GemmaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=1,
                                        head_dim=8, intermediate_size=64, max_position_embeddings=64, **SMALL),
        "bert": lambda: tf.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                      max_position_embeddings=64, is_decoder=True, **SMALL),
    }


FAMILIES = list(_configs())


def build(family: str, seed: int = 0):
    """A tiny randomly initialised causal LM of `family`, eval mode, eager attention."""
    config = _configs()[family]()
    config._attn_implementation = "eager"
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, key, None) is not None and getattr(config, key) >= VOCAB:
            setattr(config, key, 0)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomise_1d(model, seed)
    return model
