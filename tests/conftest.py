"""Shared fixtures: a tiny GPT-2 with randomised 1-D parameters, exported once per session
through each exporter path (TorchScript opset 17 and 14, dynamo)."""

from __future__ import annotations

import os

import pytest

from lensgraph.tiny_models import tiny_gpt2

EXPORT_FORMS = {
    "torchscript17": dict(exporter="torchscript", opset=17),
    "torchscript14": dict(exporter="torchscript", opset=14),
    "dynamo": dict(exporter="dynamo"),
}


@pytest.fixture(scope="session")
def gpt2_hf():
    return tiny_gpt2(seed=1, n_layer=2, n_embd=32, n_head=4, vocab_size=96)


@pytest.fixture(scope="session")
def gpt2_exports(gpt2_hf, tmp_path_factory):
    from lensgraph.export import export_model

    folder = tmp_path_factory.mktemp("gpt2")
    paths = {}
    for form, kwargs in EXPORT_FORMS.items():
        path = os.path.join(folder, f"gpt2-{form}.onnx")
        export_model(gpt2_hf, path, **kwargs)
        paths[form] = path
    return paths


@pytest.fixture(params=list(EXPORT_FORMS))
def gpt2_onnx(request, gpt2_exports):
    return gpt2_exports[request.param]
