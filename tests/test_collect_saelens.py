"""SAELens 6.x trains a sparse autoencoder from collect's folder as it is (`use_cached_activations=True,
cached_activations_path=ACTS`), and the first row it reads is the shard's first row.

SAELens 6.x needs TransformerLens < 4 while the other tests use 4.x, so it lives in .venv/saelens
(`make test` and `make saelens` install it) and runs in a child process with that folder first on its path
(scripts/saelens_train.py). Where it is missing the test is skipped, unless LENSGRAPH_REQUIRE_SAELENS=1
(as in CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import lensgraph

OVERLAY = os.path.join(sys.prefix, "saelens")
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "saelens_train.py")


def test_saelens_trains_from_the_collected_folder(collect_models, collect_corpus, tmp_path):
    if not os.path.isdir(os.path.join(OVERLAY, "sae_lens")):
        if os.environ.get("LENSGRAPH_REQUIRE_SAELENS") == "1":
            pytest.fail(f"SAELens is not installed in {OVERLAY}: run `make saelens`")
        pytest.skip(f"SAELens is not installed in {OVERLAY} (`make saelens` installs it)")
    acts = tmp_path / "acts"
    point = "blocks.1.hook_resid_post"
    lensgraph.collect(collect_models["llama"], collect_corpus, [point, "blocks.0.hook_mlp_out"], acts, context=16,
                      shard_mb=0.05)
    env = {**os.environ, "PYTHONPATH": OVERLAY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, SCRIPT, str(acts), point, "--steps", "6"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    first = next(lensgraph.load_activations(acts, points=[point], batch_size=1))[point][0]
    assert np.array_equal(np.array(result["first_row"], np.float32), first)
    assert result["weights_changed"] and result["rows"] == json.load(open(acts / "collect.json"))["state"]["windows"]
