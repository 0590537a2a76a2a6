#!/usr/bin/env python3
"""Train a sparse autoencoder with SAELens 6.x for a few steps on activations `lensgraph collect` wrote,
read as SAELens reads any activation cache: `use_cached_activations=True, cached_activations_path=ACTS`.

    python scripts/saelens_train.py ACTS HOOK_NAME [--steps 8]

SAELens 6.x needs TransformerLens < 4 (it imports `transformer_lens.HookedTransformer`), while lensgraph's
tests use TransformerLens 4.x, so SAELens runs from its own folder on the path, ahead of the rest:
`make saelens` installs it into .venv/saelens (sae-lens and transformer-lens 3.9 with --no-deps; every
other dependency is already in .venv), and the test runs this script with PYTHONPATH=.venv/saelens.
The language model SAELens asks for is a one-layer HookedTransformer made from a config (nothing is
downloaded), and its token dataset the cache's own windows: with cached activations and evaluations off,
neither is run. Prints one JSON line: the steps trained, the SAE's
loss before and after, and how far the first cached row SAELens reads is from the shard's own row.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("acts")
    p.add_argument("hook")
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()

    import datasets
    import numpy as np
    import torch
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens import StandardTrainingSAEConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with open(os.path.join(args.acts, "collect.json")) as f:
        manifest = json.load(f)
    context, d_in = manifest["context"], int(np.prod(manifest["shapes"][args.hook]))
    batch_tokens = 4 * context
    placeholder = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=d_in, n_ctx=context, d_head=4,
                                                            d_vocab=manifest["tokenizer"]["vocab_size"],
                                                            act_fn="relu", device="cpu"))
    work = tempfile.mkdtemp()
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=d_in, d_sae=4 * d_in), model_name="lensgraph-collect",
        hook_name=args.hook, context_size=context, use_cached_activations=True,
        cached_activations_path=args.acts, training_tokens=args.steps * batch_tokens,
        train_batch_size_tokens=batch_tokens, store_batch_size_prompts=4, n_batches_in_buffer=8,
        n_eval_batches=0, logger=LoggingConfig(log_to_wandb=False), checkpoint_path=os.path.join(work, "ckpt"),
        output_path=os.path.join(work, "out"), device="cpu", verbose=False, n_batches_for_norm_estimate=1)
    # SAELens asks for a token dataset beside the cache (for evaluations, off here): the windows themselves
    windows = datasets.load_from_disk(args.acts).select_columns(["token_ids"]).rename_column("token_ids", "input_ids")
    runner = LanguageModelSAETrainingRunner(cfg, override_model=placeholder, override_dataset=windows)
    store = runner.activations_store
    first = store.cached_activation_dataset[0][args.hook].numpy()
    sae_before = {k: v.clone() for k, v in runner.sae.state_dict().items()}
    sample = torch.tensor(first)

    def loss(sae) -> float:
        with torch.no_grad():
            return float(((sae.decode(sae.encode(sample)) - sample) ** 2).mean())

    before = loss(runner.sae)
    sae = runner.run()
    changed = any(not torch.equal(sae_before[k], v) for k, v in sae.state_dict().items())
    print(json.dumps({"steps": args.steps, "first_row": first.tolist(), "loss_before": before,
                      "loss_after": loss(sae), "weights_changed": changed,
                      "rows": len(store.cached_activation_dataset)}))


if __name__ == "__main__":
    main()
