"""lensgraph.tl_weights against TransformerLens 4.3's own processing of the same HF weights
(`ProcessWeights.process_weights`), name by name: every matrix TransformerLens has, on GPT-2 (a packed
q|k|v map), GPT-NeoX (q|k|v interleaved per head) and LLaMA (separate maps, grouped-query attention),
from both exporters."""

from __future__ import annotations

import numpy as np
import pytest

import lensgraph
from tl_reference import gpt2_tl_processed, llama_tl_processed, neox_tl_processed

ORACLES = {"gpt2": gpt2_tl_processed, "gpt_neox": neox_tl_processed, "llama": llama_tl_processed}


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


@pytest.mark.parametrize("form", ["torchscript17", "dynamo"])
@pytest.mark.parametrize("family", list(ORACLES))
def test_tl_weights_equal_transformerlens(family_exports, family, form):
    path, _ = family_exports.processed(family, form)
    ours = lensgraph.tl_weights(path)
    theirs = ORACLES[family](family_exports.model(family))
    # a folded norm is a bare normaliser: TransformerLens keeps it as ones and zeros, lensgraph leaves it out
    names = [k for k in theirs if not (".ln" in k or k.startswith("ln_final"))]
    assert set(names) <= set(ours), set(names) - set(ours)
    wrong = {k: relative_error(ours[k], theirs[k]) for k in names}
    assert all(e <= 1e-5 for e in wrong.values()), {k: e for k, e in wrong.items() if e > 1e-5}
    assert not ours.missing


def test_tl_weights_of_an_unprocessed_model_keep_the_norms(family_exports):
    ours = lensgraph.tl_weights(family_exports("gpt2", "torchscript17"))
    hf = family_exports.model("gpt2")
    np.testing.assert_allclose(ours["blocks.0.ln1.w"], hf.transformer.h[0].ln_1.weight.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours["blocks.0.attn.W_Q"][1], hf.transformer.h[0].attn.c_attn.weight.detach().numpy()
                               [:, 8:16], rtol=1e-6)  # head 1 of the packed map's query block
    assert ours["blocks.0.attn.W_O"].shape == (4, 8, 32) and ours["unembed.W_U"].shape == (32, 96)


def test_names_select_and_missing_say_why(family_exports):
    picked = lensgraph.tl_weights(family_exports("gpt2", "torchscript17"), names="blocks.0.attn.*")
    assert picked and all(k.startswith("blocks.0.attn.") for k in picked)
    qwen3 = lensgraph.tl_weights(family_exports("qwen3", "torchscript17"))
    assert "blocks.0.attn.*" in qwen3.missing and "blocks.0.attn.W_Q" not in qwen3  # q/k norms between
    assert "blocks.0.mlp.W_gate" in qwen3 and "unembed.W_U" in qwen3


def test_weights_command_lists_and_saves_exactly_that_dict(family_exports, tmp_path, capsys):
    from safetensors.numpy import load_file

    from files import cli

    path, _ = family_exports.processed("llama", "dynamo")
    code, out, err = cli(capsys, "weights", path, "--names", "blocks.1.*")
    assert code == 0, err
    assert "  blocks.1.attn._W_K: [2, 32, 8] float32" in out and "embed.W_E" not in out
    target = tmp_path / "w.safetensors"
    code, _, err = cli(capsys, "weights", path, "-o", target)
    assert code == 0, err
    saved, expected = load_file(str(target)), lensgraph.tl_weights(path)
    assert set(saved) == set(expected)
    for name in expected:
        assert saved[name].dtype == expected[name].dtype and np.array_equal(saved[name], expected[name]), name


def test_weights_are_arrays_of_their_own_unless_a_view_is_asked(family_exports):
    path = family_exports("gpt2", "torchscript17")  # weights kept in the file: read through its memory map
    owned, viewed = lensgraph.tl_weights(path), lensgraph.tl_weights(path, copy=False)
    assert set(owned) == set(viewed)
    for name, arr in owned.items():
        assert arr.flags.writeable and arr.flags.owndata, name  # free of the file: a user may change it
        assert arr.dtype == viewed[name].dtype and np.array_equal(arr, viewed[name]), name
    assert not viewed["embed.W_E"].flags.writeable  # as stored: the file's own bytes, not copied
    assert viewed["blocks.0.attn.W_Q"].base is not None  # heads strided over the stored map: nothing read


@pytest.mark.parametrize("axis", [0, 1])
def test_heads_are_taken_as_a_view_where_evenly_laid_out_and_copied_where_not(axis):
    from lensgraph.interp.tl_weights import _per_head

    w = np.arange(40 * 36, dtype=np.float32).reshape(40, 36)
    w = w if axis == 1 else w.T.copy().T  # a stored layout seen transposed, as a Transpose or transB gives
    blocks = 4 + np.arange(3)[:, None] * 10 + np.arange(5) * 2  # 3 heads of 5, every other column
    shuffled = np.random.default_rng(0).permutation(36)[:15].reshape(3, 5)
    for index, view in ((blocks, True), (shuffled, False)):
        got = _per_head(w, index, axis)
        want = np.stack([np.take(w, i, axis=axis) for i in index])
        assert got.shape == want.shape and np.array_equal(got, want)
        assert (got.base is not None and not got.flags.writeable) == view
