"""TransformerLens's TransformerBridge booted offline on an in-memory HF model.

The bridge loads a tokenizer by name unless given one; a word-level tokenizer over
the model's vocabulary, built in memory, lets it boot with no network. Compatibility
mode applies TransformerLens's default weight processing (fold_ln,
center_writing_weights, center_unembed, fold_value_biases), as lensgraph process does.
"""

from __future__ import annotations

import copy

import numpy as np
import torch


def tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                  bos_token="t0", eos_token="t0", unk_token="t1", pad_token="t0")
    # TransformerLens reloads a tokenizer by name unless it already adds BOS.
    tok.init_kwargs["name_or_path"] = "in-memory"
    tok.init_kwargs["add_bos_token"] = True
    return tok


def bridge_cache(hf_model, architecture: str, input_ids: np.ndarray):
    """(logits, {hook name: array}) from TransformerLens's bridge in compatibility mode."""
    from transformer_lens.model_bridge import TransformerBridge

    model = copy.deepcopy(hf_model)  # the bridge processes the weights it is given in place
    bridge = TransformerBridge.boot_transformers(architecture, hf_model=model,
                                                 tokenizer=tiny_tokenizer(hf_model.config.vocab_size))
    bridge.enable_compatibility_mode()
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(torch.tensor(input_ids))
    return logits.numpy(), {k: v.detach().numpy() for k, v in cache.items()}
