"""Half precision: float64 arithmetic, stored back as float16, equivalent within float16's error."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from lensgraph import tiny_models
from helpers import feeds, relative_gap, run
from lensgraph.export import export_model
from lensgraph.process import process
from test_tl_oracle import llama_onnx_as_tl, onnx_as_tl
from tl_reference import gpt2_tl_processed, llama_tl_processed


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_float16_model(tmp_path, family):
    model = tiny_models.build(family, seed=11)
    fp32, fp16 = str(tmp_path / "fp32.onnx"), str(tmp_path / "fp16.onnx")
    export_model(model, fp32, exporter="torchscript")
    export_model(tiny_models.build(family, seed=11).half(), fp16, exporter="torchscript")
    out = str(tmp_path / "fp16.lens.onnx")
    report = process(fp16, out)
    assert report["verification"]["ok"] and report["verification"]["tolerance"] == 2e-2
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx.load(out).graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(t.dims) == 2)

    x = feeds(2, 6, vocab=tiny_models.VOCAB)
    reference = run(fp32, x)["logits"]
    against_fp16 = relative_gap(run(fp16, x)["logits"], run(out, x)["logits"])
    against_fp32 = relative_gap(reference, run(out, x)["logits"])
    print(f"{family} float16: vs float16 original {against_fp16:.2e}, vs float32 original {against_fp32:.2e}")
    assert against_fp16 < 1e-2 and against_fp32 < 1e-2

    if family == "gpt2":
        ours, theirs = onnx_as_tl(out, 4), gpt2_tl_processed(model)
    else:
        ours, theirs = llama_onnx_as_tl(out, 4, 2), llama_tl_processed(model)
    worst = max(float(np.abs(ours[k] - theirs[k]).max() / (np.abs(theirs[k]).max() or 1.0))
                for k in ours if k in theirs)
    print(f"{family} float16: worst matrix difference vs TransformerLens float32 {worst:.2e}")
    assert worst < 2e-3
