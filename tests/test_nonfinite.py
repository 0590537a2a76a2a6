"""Non-finite numbers: verification fails on NaN or infinity it cannot match, and a rewrite whose
value does not fit its tensor's dtype (float16 stops at 65504) is refused before anything is written."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from files import cli, snapshot
from lensgraph.export import export_model
from lensgraph.tiny_models import tiny_gpt2
from lensgraph.verify import _nonfinite_difference


def _with_nan_scale(src, dst) -> None:
    """The same model with ln_f's scale NaN: every logit is NaN."""
    model = onnx.load(src)
    for t in model.graph.initializer:
        if "ln_f.weight" in t.name:
            arr = onnx.numpy_helper.to_array(t).copy()
            arr[:] = np.nan
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
            break
    else:
        raise AssertionError("no ln_f weight")
    onnx.save(model, dst)


def test_verify_fails_when_every_logit_is_nan(capsys, tmp_path, gpt2_exports):
    src = gpt2_exports["torchscript17"]
    bad = str(tmp_path / "nan.onnx")
    _with_nan_scale(src, bad)
    code, out, _ = cli(capsys, "verify", src, bad)
    assert code == 1 and out.startswith("NOT equivalent") and "NaN logits differ" in out
    code, out, _ = cli(capsys, "verify", bad, bad)  # NaN everywhere in both: nothing left to compare
    assert code == 1 and "no position has finite logits" in out


def test_nonfinite_logits_match_only_in_kind_and_place():
    a = np.array([[1.0, np.nan, 3.0], [np.inf, 1.0, 2.0]])
    assert _nonfinite_difference(a, a.copy()) is None
    moved = a.copy()
    moved[0] = [np.nan, 1.0, 3.0]
    assert "NaN logits differ" in _nonfinite_difference(a, moved)
    flipped = a.copy()
    flipped[1, 0] = -np.inf
    assert "+inf logits differ" in _nonfinite_difference(a, flipped)


@pytest.fixture(scope="module")
def fp16_overflowing(tmp_path_factory):
    """A valid float16 GPT-2 whose first position row is [65000, -3000, ...]: finite as stored,
    but centring it (minus its mean, about -875) would give 65867 (65000 is 64992 in float16), past 65504."""
    model = tiny_gpt2(seed=2, n_layer=2, n_embd=32, n_head=4, vocab_size=64).half()
    with torch.no_grad():
        model.transformer.wpe.weight[0] = -3000.0
        model.transformer.wpe.weight[0, 0] = 65000.0
    path = tmp_path_factory.mktemp("fp16") / "big.onnx"
    export_model(model, path, exporter="torchscript", check=False)
    return path


def test_a_value_float16_cannot_hold_is_refused_and_nothing_written(capsys, tmp_path, fp16_overflowing):
    out = tmp_path / "out" / "lens.onnx"
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "process", fp16_overflowing, "-o", out)
    assert code == 3, err
    assert "wpe" in err and "does not fit float16" in err and "65867" in err and "nothing was written" in err
    assert snapshot(tmp_path) == before  # not even the output's folder


def test_a_reference_is_compared_only_on_the_inputs_it_was_computed_on(gpt2_exports):
    """verify takes the original's logits computed before (convert's export check) in place of the
    original; given other shapes, provider or seed it refuses rather than compare other inputs."""
    from lensgraph.errors import BadInputError
    from lensgraph.verify import reference, verify

    src = gpt2_exports["torchscript17"]
    ref = reference(src)
    assert verify(ref, src).ok and verify(ref, src).max_abs_diff == 0.0
    for other in ({"seed": 1}, {"shapes": [(1, 4)]}):
        with pytest.raises(BadInputError, match="the reference was computed on other shapes"):
            verify(ref, src, **other)
