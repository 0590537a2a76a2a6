"""Tiny models with random weights, built from configs, for the demo, the tests and the
benchmarks (needs the [export] extra; no network): a GPT-2 of any shape, and one model of
every supported family.

Every 1-D parameter is randomised (HF initialises norms to 1 and biases to 0, which
would hide folding mistakes). Sizes are tiny so the whole matrix exports in seconds.
"""

from __future__ import annotations

import os

import torch
import transformers as tf


def randomise_1d(model, seed: int = 0, spread: float = 0.2) -> None:
    """Give every 1-D parameter a non-trivial value (HF initialises norms to 1 and biases to 0,
    which would make folding look right when it is not)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim != 1:
                continue
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * spread
            is_scale = name.endswith("weight")
            param.copy_((noise + 1.0 if is_scale else noise).to(param.dtype))


def tiny_gpt2(seed: int = 0, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, vocab_size: int = 256,
              n_positions: int = 128):
    """A GPT-2 of the given shape (pre-LN, learned positions, tied embeddings, fused c_attn)."""
    torch.manual_seed(seed)
    config = tf.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                           n_positions=n_positions, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = tf.GPT2LMHeadModel(config).eval()
    randomise_1d(model, seed)
    return model


def tiny_lens_model(folder: str, seed: int = 0) -> str:
    """A tiny GPT-2, exported (TorchScript, opset 17: the quickest) and processed; returns the processed path."""
    from .export import export_model
    from .process import process

    os.makedirs(folder, exist_ok=True)
    original = os.path.join(folder, "tiny-gpt2.onnx")
    processed = os.path.join(folder, "tiny-gpt2.lens.onnx")
    export_model(tiny_gpt2(seed), original, exporter="torchscript", opset=17)
    process(original, processed)
    return processed


# -- one tiny model of each family ------------------------------------------------------
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
        # norms around each sublayer, query/key norms, Gemma 2's soft-capped logits and attention
        "gemma2": lambda: tf.Gemma2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                          max_position_embeddings=64, query_pre_attn_scalar=8, sliding_window=4,
                                          final_logit_softcapping=30.0, attn_logit_softcapping=50.0, **SMALL),
        "gemma3": lambda: tf.Gemma3TextConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                              num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                              max_position_embeddings=64, query_pre_attn_scalar=8, sliding_window=4,
                                              **SMALL),
        "qwen3": lambda: tf.Qwen3Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=8, intermediate_size=64, max_position_embeddings=64, **SMALL),
        "olmo2": lambda: tf.Olmo2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0, **SMALL),
        "phi3": lambda: tf.Phi3Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, original_max_position_embeddings=64,
                                      pad_token_id=0, **SMALL),
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
    model.config.architectures = [type(model).__name__]  # as a saved checkpoint names it
    randomise_1d(model, seed)
    return model


# -- a tiny checkpoint with text: tokenizer, chat template, end tokens -------------------------------
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ("The capital of France is Paris. The quick brown fox jumps over the lazy dog. "
          "A model reads the text as tokens, and writes its answer one token at a time. ") * 4


def text_checkpoint(folder: str, family: str = "gpt2", seed: int = 0) -> str:
    """A tiny random causal LM saved as a HuggingFace checkpoint with what a real one has for text: a
    trained byte-level BPE tokenizer with special tokens and a ChatML chat template, and a generation
    config whose end token is `<|im_end|>`. GPT-2's tokenizer leaves BOS to the caller (BOS = EOS =
    `<|endoftext|>`, no pad token); LLaMA's prepends `<s>` itself (EOS `</s>`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if family == "gpt2" else \
        ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if family == "gpt2":
        names = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        names = dict(bos_token="<s>", eos_token="</s>")
    vocab = tok.get_vocab_size()
    end, bos, eos = tok.token_to_id("<|im_end|>"), tok.token_to_id(names["bos_token"]), tok.token_to_id(names["eos_token"])
    if family == "gpt2":
        config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=vocab, bos_token_id=bos,
                               eos_token_id=eos)
    else:
        config = tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=64, max_position_embeddings=64, vocab_size=vocab, bos_token_id=bos,
                                eos_token_id=eos)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomise_1d(model, seed)
    model.generation_config.eos_token_id = end
    model.save_pretrained(folder)
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHATML, **names).save_pretrained(folder)
    return folder
