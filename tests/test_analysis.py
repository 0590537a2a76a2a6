"""The two analyses built on the cache (logit lens, direct logit attribution) and their scripts."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import feeds
from lensgraph import run_with_cache
from lensgraph.interp.analysis import Readout, components, direct_logit_attribution, logit_lens
from lensgraph.process import process

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


@pytest.fixture(scope="module")
def processed(gpt2_exports, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "gpt2.lens.onnx"
    process(gpt2_exports["dynamo"], out)
    return str(out)


@pytest.mark.parametrize("which", ["original", "processed"])
def test_logit_lens_of_the_last_layer_is_the_logits(gpt2_exports, processed, which):
    path = processed if which == "processed" else gpt2_exports["dynamo"]
    logits, cache = run_with_cache(path, feeds(2, 6)["input_ids"])
    lens = logit_lens(cache, Readout.from_model(path))
    assert lens.shape == (2, 2, 6, 96)
    np.testing.assert_allclose(lens[-1], logits, atol=1e-5)
    assert np.abs(lens[0] - logits).max() > 1e-2  # an earlier layer predicts something else


@pytest.mark.parametrize("which", ["original", "processed"])
def test_attributions_add_up_to_the_logit(gpt2_exports, processed, which):
    path = processed if which == "processed" else gpt2_exports["dynamo"]
    logits, cache = run_with_cache(path, feeds(2, 6)["input_ids"])
    readout = Readout.from_model(path)
    parts = direct_logit_attribution(cache, readout, answer=7, pos=-1)
    assert {"embed", "pos_embed", "L0H0", "L1H3", "L0 attn bias", "L1 MLP", "constant", "other"} <= set(parts)
    np.testing.assert_allclose(sum(parts.values()), logits[:, -1, 7], atol=1e-5)
    assert np.abs(parts["other"]).max() < 1e-5  # every stream term is in the cache
    # the heads and the output bias make up the attention output
    terms = components(cache, readout)
    heads = sum(terms[f"L1H{h}"] for h in range(4)) + terms["L1 attn bias"]
    np.testing.assert_allclose(heads, cache["blocks.1.hook_attn_out"], atol=1e-5)


def test_attribution_of_a_logit_difference_survives_processing(gpt2_exports, processed):
    """Processing changes weights, not what the embeddings and MLPs say about answer 7 versus 3."""
    ids = feeds(2, 6, seed=2)["input_ids"]

    def diff(path):
        _, cache = run_with_cache(path, ids)
        readout = Readout.from_model(path)
        a, b = (direct_logit_attribution(cache, readout, t) for t in (7, 3))
        return {k: a[k] - b[k] for k in ("embed", "pos_embed", "L0 MLP", "L1 MLP")}

    before, after = diff(gpt2_exports["dynamo"]), diff(processed)
    for key in before:
        np.testing.assert_allclose(after[key], before[key], atol=1e-5, err_msg=key)


def script(name, *args):
    done = subprocess.run([sys.executable, os.path.join(SCRIPTS, name), *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_logit_lens_script(processed):
    out = script("logit_lens.py", "--model", processed, "--tokens", 1, 2, 3, 4)
    assert "layer  0: top" in out and "layer  1: top" in out
    gap = float(re.search(r"max difference (\S+)", out).group(1))
    assert gap < 1e-4


def test_direct_logit_attribution_script_on_its_own_tiny_model():
    out = script("direct_logit_attribution.py", "--answer", 11)
    assert "answer token 11 at position -1" in out
    assert re.search(r"^  L\dH\d ", out, re.M)
    assert float(re.search(r"difference from the logit (\S+)\)", out).group(1)) < 1e-4


def test_logit_lens_script_on_its_own_tiny_model():
    out = script("logit_lens.py")
    assert float(re.search(r"max difference (\S+)", out).group(1)) < 1e-4


def test_attributions_on_sublayer_output_norms_use_what_is_added(family_exports):
    """Gemma 3 normalises each sublayer's output before the stream: its heads are not summed through
    W_O (they would not add up); the sublayers' own outputs are, and the parts still add up."""
    path, _ = family_exports.processed("gemma3", "torchscript17")
    logits, cache = run_with_cache(path, feeds(2, 6)["input_ids"])
    readout = Readout.from_model(path)
    assert readout.W_O == {}
    parts = direct_logit_attribution(cache, readout, answer=7, pos=-1)
    assert {"embed", "L0 attn", "L1 attn", "L0 MLP", "L1 MLP"} <= set(parts) and "L0H0" not in parts
    np.testing.assert_allclose(sum(parts.values()), logits[:, -1, 7], atol=1e-5)
    assert np.abs(parts["other"]).max() < 1e-5


def test_scripts_take_a_kv_cache_graph(family_exports, tmp_path):
    """A graph with past_key_values.* inputs runs its first step, with an empty past."""
    from lensgraph.export import export_model

    path = tmp_path / "cache.onnx"
    export_model(family_exports.model("llama"), path, exporter="torchscript", cache=True)
    for script in ("logit_lens.py", "direct_logit_attribution.py"):
        done = subprocess.run([sys.executable, os.path.join(SCRIPTS, script), "--model", str(path)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
