"""Tiny checkpoints with a tokenizer, and onnxruntime-genai folders built from them by its own model
builder (the `genai` fixture in conftest.py builds each once per session)."""

from __future__ import annotations

import numpy as np
import torch
import transformers as tf

from lensgraph.tiny_models import randomise_1d

# onnxruntime's CPU GroupQueryAttention wants a head size that is a multiple of 16
SHAPE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             max_position_embeddings=128, vocab_size=96, bos_token_id=0, eos_token_id=0)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**SHAPE),
    "qwen2": lambda: tf.Qwen2Config(**SHAPE),  # value biases, through the packed q|k|v
    "mistral": lambda: tf.MistralConfig(sliding_window=None, **SHAPE),
    "gemma": lambda: tf.GemmaConfig(head_dim=16, **SHAPE),  # 1 + w, a tied table read through a Transpose
    "phi3": lambda: tf.Phi3Config(pad_token_id=0, original_max_position_embeddings=128, **SHAPE),  # packed maps
}


def checkpoint(folder, family: str) -> str:
    """A random checkpoint of `family` (1-D parameters randomised) with a small BPE tokenizer, saved to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    torch.manual_seed(3)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    randomise_1d(model, 3)
    model.save_pretrained(folder)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 8],
                            trainers.BpeTrainer(vocab_size=96, special_tokens=["<s>", "[UNK]"]))
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>", unk_token="[UNK]").save_pretrained(folder)
    return str(folder)


def build(root, family: str, precision: str = "fp32") -> str:
    """The genai folder of `family` under `root` (its checkpoint beside it, as ROOT/FAMILY-hf)."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    ckpt = root / f"{family}-hf"
    if not ckpt.exists():
        checkpoint(ckpt, family)
    out = root / f"{family}-{precision}"
    args = ("", str(ckpt), str(out), precision, "cpu", str(root / "cache"))
    create_model(*args, **parse_extra_options(*args, []))  # the builder's own two steps
    return str(out)


def greedy(folder: str, prompt: list[int], n: int) -> list[int]:
    """onnxruntime-genai's own Generator, greedy, `n` new tokens: the prompt and the new tokens."""
    import onnxruntime_genai as og

    model = og.Model(folder)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + n, min_length=len(prompt) + n)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)]
