"""Shared fixtures: a tiny GPT-2 with randomised 1-D parameters, and a tiny model of every
family, each exported once per session through each exporter path (TorchScript opset 17 and
14, dynamo) on first use, and processed once."""

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


class FamilyZoo:
    """Tiny models of every family (tiny_models.build, seed 7), exported and processed on first
    use and shared by every test of the session; calling it gives an export's path."""

    def __init__(self, folder):
        self.folder, self.models, self.exports, self.reports = folder, {}, {}, {}

    def model(self, family: str):
        from lensgraph import tiny_models

        if family not in self.models:
            self.models[family] = tiny_models.build(family, seed=7)
        return self.models[family]

    def __call__(self, family: str, form: str) -> str:
        from lensgraph.export import export_model

        key = (family, form)
        if key not in self.exports:
            path = os.path.join(self.folder, f"{family}-{form}.onnx")
            export_model(self.model(family), path, **EXPORT_FORMS[form])
            self.exports[key] = path
        return self.exports[key]

    def processed(self, family: str, form: str) -> tuple[str, dict]:
        """(path, report) of the export processed with the default pipeline."""
        from lensgraph.process import process

        key = (family, form)
        if key not in self.reports:
            path = os.path.join(self.folder, f"{family}-{form}.lens.onnx")
            self.reports[key] = (path, process(self(family, form), path))
        return self.reports[key]


@pytest.fixture(scope="session")
def family_exports(tmp_path_factory):
    return FamilyZoo(str(tmp_path_factory.mktemp("families")))


@pytest.fixture(scope="session")
def genai(tmp_path_factory):
    """(family, precision) -> an onnxruntime-genai folder (genai_zoo.build), built on first use; its
    HF checkpoint lies beside it as FAMILY-hf."""
    from genai_zoo import build

    root = tmp_path_factory.mktemp("genai")
    built = {}

    def get(family: str, precision: str = "fp32") -> str:
        if (family, precision) not in built:
            built[family, precision] = build(root, family, precision)
        return built[family, precision]

    return get


# -- collect: tiny model folders (a processed export, a word-level tokenizer) and a corpus ---------
COLLECT_SPECIALS = {"gpt2": (["<|endoftext|>", "<unk>"], "<|endoftext|>", "<|endoftext|>"),  # BOS = EOS, as GPT-2's
                    "llama": (["<unk>", "<s>", "</s>"], "<s>", "</s>")}
CORPUS_WORDS = 80


def _word_tokenizer(folder: str, family: str) -> None:
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    specials, bos, eos = COLLECT_SPECIALS[family]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(CORPUS_WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": bos, "eos_token": eos}, f)


@pytest.fixture(scope="session")
def collect_models(family_exports, tmp_path_factory):
    """{family: folder}: the session's processed tiny GPT-2 and LLaMA as `convert` lays a folder out."""
    import shutil

    root = tmp_path_factory.mktemp("collect-models")
    folders = {}
    for family in COLLECT_SPECIALS:
        folder = os.path.join(root, family)
        os.makedirs(folder)
        shutil.copy(family_exports.processed(family, "torchscript17")[0], os.path.join(folder, "model.onnx"))
        _word_tokenizer(folder, family)
        folders[family] = folder
    return folders


def write_corpus(path: str, documents: int, seed: int = 0) -> list[str]:
    """Documents of 1 to 40 words (some empty), one a line; returns them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    docs = [" ".join(f"w{i}" for i in rng.integers(0, CORPUS_WORDS, rng.integers(0, 40))) for _ in range(documents)]
    with open(path, "w") as f:
        f.write("\n".join(docs) + "\n")
    return docs


@pytest.fixture(scope="session")
def collect_corpus(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("corpus") / "corpus.txt")
    write_corpus(path, 300)
    return path


class TextFolders:
    """family ('gpt2' or 'llama') -> (checkpoint with a tokenizer and end tokens, the folder `convert` made of
    it, the HF model), made once per session on first use. The LLaMA folder keeps its export
    (--keep-export); the GPT-2 one does not."""

    def __init__(self, root):
        self.root, self.made = root, {}

    def __call__(self, family: str):
        import lensgraph
        import transformers as tf
        from lensgraph.tiny_models import text_checkpoint

        if family not in self.made:
            ckpt = text_checkpoint(str(self.root / family), family, seed=4)
            folder = str(self.root / f"{family}-lens")
            lensgraph.from_pretrained(ckpt, folder, keep_export=family == "llama")
            hf = tf.AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
            self.made[family] = ckpt, folder, hf
        return self.made[family]


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    return TextFolders(tmp_path_factory.mktemp("text-folders"))
