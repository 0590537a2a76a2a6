"""refactor_factored_attn_matrices against TransformerLens 4.3's own option on the same HF weights:
per head the QK product (bias row included) and the OV product are TL's, the factors are even (W_Q's
column norms are W_K's) and W_O's rows orthonormal; the model stays equivalent; rotary models refuse."""

from __future__ import annotations

import numpy as np
import pytest
from transformer_lens.weight_processing import ProcessWeights

import lensgraph
from tl_reference import _tl_config, gpt2_state_dict

PIPELINE = "fold_ln,center_writing_weights,center_unembed,fold_value_biases,refactor_factored_attn_matrices"


def tl_refactored(hf) -> dict:
    sd = ProcessWeights.process_weights(dict(gpt2_state_dict(hf)), _tl_config(hf.config), fold_ln=True,
                                        center_writing_weights=True, center_unembed=True, fold_value_biases=True,
                                        refactor_factored_attn_matrices=True, adapter=None)
    return {k: v.detach().double().numpy() for k, v in sd.items()}


def relative_error(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(float(np.abs(b).max()), 1e-12))


@pytest.mark.parametrize("form", ["torchscript17", "dynamo"])
def test_refactored_gpt2_matches_transformerlens(family_exports, tmp_path, form):
    out = tmp_path / "refactored.onnx"
    report = lensgraph.process(family_exports("gpt2", form), out, passes=PIPELINE)
    assert report["verification"]["ok"]
    refactor = next(p for p in report["passes"] if p["name"] == "refactor_factored_attn_matrices")
    assert refactor["rewritten"] == 2 and not refactor["skipped"]
    ours, theirs = lensgraph.tl_weights(out), tl_refactored(family_exports.model("gpt2"))
    for l in range(2):
        p = f"blocks.{l}.attn."
        o = {k: np.asarray(ours[p + k], np.float64) for k in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "W_O", "b_O")}
        t = {k: theirs[p + k] for k in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "W_O", "b_O")}
        for h in range(4):
            qk = lambda w: np.vstack([w["W_Q"][h], w["b_Q"][h][None]]) @ np.vstack([w["W_K"][h], w["b_K"][h][None]]).T  # noqa: E731
            assert relative_error(qk(o), qk(t)) <= 1e-5
            assert relative_error(o["W_V"][h] @ o["W_O"][h], t["W_V"][h] @ t["W_O"][h]) <= 1e-5
            q_aug = np.vstack([o["W_Q"][h], o["b_Q"][h][None]])
            k_aug = np.vstack([o["W_K"][h], o["b_K"][h][None]])
            np.testing.assert_allclose(np.linalg.norm(q_aug, axis=0), np.linalg.norm(k_aug, axis=0), rtol=1e-4)
            np.testing.assert_allclose(o["W_O"][h] @ o["W_O"][h].T, np.eye(8), atol=1e-5)
        assert relative_error(o["b_O"], t["b_O"]) <= 1e-5
        assert not np.any(np.asarray(ours[p + "b_V"]))


def test_rotary_models_refuse_with_the_reason(family_exports, tmp_path):
    report = lensgraph.process(family_exports("llama", "torchscript17"), tmp_path / "r.onnx", passes=PIPELINE)
    refactor = next(p for p in report["passes"] if p["name"] == "refactor_factored_attn_matrices")
    assert refactor["rewritten"] == 0 and all("rotary" in s["reason"] for s in refactor["skipped"])
