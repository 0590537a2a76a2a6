"""From `convert` to an experiment: the folder convert writes is what every command and function takes,
text goes in and out through its tokenizer in TransformerLens's conventions, generation stops at the
folder's end tokens, and the folder can be verified again. The oracles: HuggingFace's own generate,
tokenizer and chat template, and TransformerLens 4.x's to_tokens and attention mask."""

from __future__ import annotations

import json
import os
import shutil
from types import MethodType, SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
import transformers as tf

import lensgraph
from files import cli, one_error_line, snapshot
from hf_oracle import relative_error
from lensgraph.interp.tokens import end_ids, prompt, to_tokens
from test_hook_oracle import check_points

TEXT = "The capital of France is"
TEXTS = ["The capital of France is", "A fox", "The quick brown fox jumps over"]


def hf_generate(hf, ids: np.ndarray, n: int, eos) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long), do_sample=False,
                          max_new_tokens=n, eos_token_id=eos, pad_token_id=eos[0] if eos else 0)
    return out[0].tolist()


def tl_tokenizer(folder: str):
    """TransformerLens's tokenizer set-up and to_tokens, run on the folder's tokenizer as HF reads it."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources._bridge_builder import configure_tokenizer

    cfg = SimpleNamespace(default_prepend_bos=True, n_ctx=64, device="cpu", default_padding_side=None)
    tok = configure_tokenizer(tf.AutoTokenizer.from_pretrained(folder), cfg)
    bridge = SimpleNamespace(cfg=cfg, tokenizer=tok)
    bridge.to_tokens = MethodType(TransformerBridge.to_tokens, bridge)
    return bridge


# -- 1 and 4: the folder generates, from text, and stops at its end tokens -------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_convert_writes_a_kv_cache_graph_that_generates_what_huggingface_does(folders, family):
    ckpt, folder, hf = folders(family)
    graph = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False).graph
    assert any(i.name.startswith("past_key_values.") for i in graph.input)  # the default: a KV cache
    ids = tl_tokenizer(folder).to_tokens(TEXT).numpy()
    eos = [tf.GenerationConfig.from_pretrained(ckpt).eos_token_id, tf.AutoTokenizer.from_pretrained(ckpt).eos_token_id]
    assert end_ids(folder) == eos  # generation_config.json's, then the tokenizer's
    gen = lensgraph.generate(folder, TEXT, 12)
    assert gen.tokens[0].tolist() == hf_generate(hf, ids, 12, eos)
    assert gen.text == [tf.AutoTokenizer.from_pretrained(ckpt).decode(gen.new_tokens[0])]


@pytest.mark.parametrize("source", ["generation_config", "tokenizer"])
def test_generation_stops_at_the_end_token_of_each_config(folders, tmp_path, source):
    """A copy of the folder whose end token is the fourth token greedy decoding makes: in
    generation_config.json, or as the tokenizer's EOS."""
    ckpt, folder, hf = folders("gpt2")
    ids = tl_tokenizer(folder).to_tokens(TEXT).numpy()
    free = hf_generate(hf, ids, 10, [])[ids.shape[1]:]
    stop = free[3]
    copy = shutil.copytree(folder, tmp_path / "copy")
    config = json.loads((copy / "generation_config.json").read_text())
    if source == "generation_config":
        config["eos_token_id"] = stop
    else:
        del config["eos_token_id"]
        tok = json.loads((copy / "tokenizer_config.json").read_text())
        vocab = json.loads((copy / "tokenizer.json").read_text())["model"]["vocab"]
        tok["eos_token"] = next(t for t, i in vocab.items() if i == stop)
        (copy / "tokenizer_config.json").write_text(json.dumps(tok))
    (copy / "generation_config.json").write_text(json.dumps(config))
    gen = lensgraph.generate(copy, TEXT, 10)
    assert gen.new_tokens[0].tolist() == free[:free.index(stop) + 1]  # up to and with the end token
    assert gen.tokens[0].tolist() == hf_generate(hf, ids, 10, [stop])
    assert len(lensgraph.generate(copy, TEXT, 10, eos_token_id=[]).new_tokens[0]) == 10  # [] never stops


def test_generate_cli_takes_text_and_chat_from_the_folder(folders, capsys):
    ckpt, folder, hf = folders("llama")
    tok = tf.AutoTokenizer.from_pretrained(ckpt)
    code, out, err = cli(capsys, "generate", folder, "--prompt", TEXT, "-n", "6")
    assert code == 0, err
    ids = tl_tokenizer(folder).to_tokens(TEXT).numpy()
    new = hf_generate(hf, ids, 6, end_ids(folder))[ids.shape[1]:]
    assert out.splitlines() == [",".join(map(str, new)), tok.decode(new)]
    code, out, err = cli(capsys, "generate", folder, "--prompt", "Hi there", "--chat", "-n", "6")
    assert code == 0, err
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                   return_dict=False)
    assert prompt(folder, "Hi there", chat=True).ids[0].tolist() == chat
    new = hf_generate(hf, np.array([chat]), 6, end_ids(folder))[len(chat):]
    assert out.splitlines()[0] == ",".join(map(str, new))


def test_a_folder_without_a_cache_generates_the_same_by_running_the_whole_sequence(folders, tmp_path):
    ckpt, folder, hf = folders("gpt2")
    report = lensgraph.from_pretrained(ckpt, tmp_path / "nocache", with_cache=False)
    assert not report["export"]["cache"]
    ids = tl_tokenizer(folder).to_tokens(TEXT).numpy()
    gen = lensgraph.generate(tmp_path / "nocache", TEXT, 8, points=["blocks.1.hook_resid_post"])
    assert gen.tokens[0].tolist() == hf_generate(hf, ids, 8, end_ids(folder))
    cached = lensgraph.generate(folder, TEXT, 8, points=["blocks.1.hook_resid_post"])
    for a, b in zip(gen.steps, cached.steps):  # the same activations, step by step
        assert relative_error(a["blocks.1.hook_resid_post"], b["blocks.1.hook_resid_post"]) < 1e-5


def test_where_the_cache_cannot_be_exported_exactly_convert_says_so_and_generates_without(tmp_path):
    """Gemma 2's sliding-window cache does not trace into an exact KV-cache graph (the export check
    against torch fails): the folder has a plain graph, a note says why, and generation still
    matches HuggingFace's."""
    from lensgraph import tiny_models

    hf = tiny_models.build("gemma2", seed=3)
    hf.save_pretrained(tmp_path / "ckpt")
    report = lensgraph.from_pretrained(tmp_path / "ckpt", tmp_path / "out", verify=False)
    assert not report["export"]["cache"]
    assert any(n.startswith("no KV cache: its export failed") for n in report["notes"]), report["notes"]
    prompt_ids = np.array([[3, 5, 7, 9]])
    gen = lensgraph.generate(tmp_path / "out", prompt_ids, 6, eos_token_id=[])
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt_ids), attention_mask=torch.ones(1, 4, dtype=torch.long),
                          do_sample=False, max_new_tokens=6, min_new_tokens=6, eos_token_id=None, pad_token_id=0)
    assert gen.tokens.tolist() == ref.tolist()


# -- 3: the folder is the MODEL of every command ----------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_run_with_cache_on_the_folder_gives_huggingfaces_activations(folders, family, monkeypatch):
    """Every point through the folder's points graph (placed once by convert: nothing is placed now)
    of its KV-cache graph equals the HF modules' activations."""
    from lensgraph.interp import cache as cache_module

    _, folder, hf = folders(family)
    monkeypatch.setattr(cache_module, "points_graph", lambda *a, **k: pytest.fail("placed the points again"))
    for given in (folder, os.path.join(folder, "model.onnx")):
        check_points(os.path.join(folder, "model.onnx"), hf, family, processed=True)
        logits, cache = lensgraph.run_with_cache(given, TEXT)
        assert len(cache) > 30 and logits.shape[:2] == to_tokens(folder, TEXT).shape


def test_every_command_takes_the_folder(folders, tmp_path, capsys, monkeypatch):
    _, folder, _ = folders("gpt2")
    capsys.readouterr()  # what making the folder printed, where this test is the first to need it
    for argv in (["inspect", folder], ["hooks", folder, "--list"], ["weights", folder],
                 ["hooks", folder, "-o", tmp_path / "h.onnx", "--points", "blocks.*.hook_resid_post"]):
        code, out, err = cli(capsys, *argv)
        assert code == 0 and err == "", (argv, err)
    assert (tmp_path / "h.onnx").exists()
    assert set(lensgraph.tl_weights(folder)) >= {"embed.W_E", "unembed.W_U"}
    assert lensgraph.to_str_tokens(folder, [5, 9]) == lensgraph.to_str_tokens(os.path.join(folder, "model.onnx"), [5, 9])
    import netron

    served = []
    monkeypatch.setattr(netron, "serve", lambda path, **k: served.append(path) or ("127.0.0.1", 1))
    monkeypatch.setattr(netron, "wait", lambda: None)
    assert cli(capsys, "view", folder)[0] == 0 and served == [os.path.join(folder, "model.onnx")]


def _model_files_alone(folder, tmp_path):
    """The folder's model and its data in a folder of their own, without model.hooks.onnx."""
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in os.listdir(folder):
        if name.startswith("model.onnx"):
            shutil.copy(os.path.join(folder, name), alone / name)
    return alone


def _edited_copy(folder, tmp_path):
    """A copy of the folder whose model.onnx is no longer the file its points graph was made from."""
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    model = onnx.load(str(changed / "model.onnx"), load_external_data=False)
    model.doc_string = "edited after convert"
    onnx.save(model, str(changed / "model.onnx"))
    return changed


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hooks_list_on_a_folder_reads_the_placement_convert_recorded(folders, family, tmp_path, capsys, monkeypatch):
    """`hooks --list` on a converted folder lists the points graph's record (what run_with_cache uses),
    the same listing as placing the points afresh on the model file alone; where the model file is not
    the one the record was made from, the points are placed again."""
    from lensgraph.graph import hookpoints

    _, folder, _ = folders(family)
    capsys.readouterr()  # what making the folder printed
    alone = _model_files_alone(folder, tmp_path)
    code, fresh, err = cli(capsys, "hooks", alone / "model.onnx", "--list")
    assert code == 0 and err == "" and "hook_resid_post" in fresh
    placed = []
    real_place = hookpoints.place
    monkeypatch.setattr(hookpoints, "place", lambda *a, **k: placed.append(1) or real_place(*a, **k))
    assert cli(capsys, "hooks", folder, "--list")[1:] == (fresh, "") and not placed
    changed = _edited_copy(folder, tmp_path)
    assert cli(capsys, "hooks", changed, "--list")[1:] == (fresh, "") and placed


def assert_points_as_the_written_file_gives_them(folder) -> None:
    """The folder's points graph is the one placed afresh on its model file: the same nodes, outputs,
    record (points, placement, head layouts) and weights, each read from the same bytes."""
    from lensgraph.interp.cache import points_graph

    saved = onnx.load(os.path.join(folder, "model.hooks.onnx"), load_external_data=False)
    fresh, _, _ = points_graph(os.path.join(folder, "model.onnx"), on_request=False)
    for field in ("node", "input", "output", "value_info"):
        assert list(getattr(saved.graph, field)) == list(getattr(fresh.graph, field)), field
    assert {p.key: p.value for p in saved.metadata_props} == {p.key: p.value for p in fresh.metadata_props}

    def weights(proto):
        return {t.name: (tuple(t.dims), t.data_type, tuple((e.key, e.value) for e in t.external_data),
                         onnx.numpy_helper.to_array(t).tobytes() if not t.external_data else None)
                for t in proto.graph.initializer}

    assert weights(saved) == weights(fresh)


def test_convert_places_the_points_on_the_model_in_memory_as_the_written_file_gives_them(folders):
    """convert makes the points graph from the processed model still in memory, its weights pointed at
    the files just written (the GPT-2 folder keeps no export, so its model was processed in memory),
    rather than reading those files back: the same points graph as the written file gives."""
    _, folder, _ = folders("gpt2")
    assert not os.path.exists(os.path.join(folder, "export"))
    assert_points_as_the_written_file_gives_them(folder)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tl_weights_of_a_folder_use_the_head_layouts_convert_recorded(folders, family, tmp_path, monkeypatch):
    """tl_weights on a converted folder rebuilds the head layouts its points graph records rather than
    measuring them again, gives TransformerLens's processed weights of the same HF model, and exactly
    the weights measured afresh on the model file alone; a model file changed since is measured again."""
    from lensgraph.interp import tl_weights as tl_module
    from tl_reference import gpt2_tl_processed, llama_tl_processed

    _, folder, hf = folders(family)
    alone = _model_files_alone(folder, tmp_path)
    fresh = lensgraph.tl_weights(alone / "model.onnx")
    measured = []
    real = tl_module.head_layout
    monkeypatch.setattr(tl_module, "head_layout", lambda *a, **k: measured.append(1) or real(*a, **k))
    got = lensgraph.tl_weights(folder)
    assert not measured and set(got) == set(fresh) and got.missing == fresh.missing
    assert any(".attn.W_Q" in k for k in got)
    theirs = {"gpt2": gpt2_tl_processed, "llama": llama_tl_processed}[family](hf)
    names = [k for k in theirs if not (".ln" in k or k.startswith("ln_final"))]  # folded norms: left out here
    assert set(names) <= set(got), set(names) - set(got)
    for name in names:
        want = np.asarray(theirs[name], np.float64)
        gap = np.abs(np.asarray(got[name], np.float64) - want).max() / max(np.abs(want).max(), 1e-12)
        assert gap <= 1e-5, (name, gap)
    for name in fresh:
        assert got[name].dtype == fresh[name].dtype and np.array_equal(got[name], fresh[name]), name
    changed = _edited_copy(folder, tmp_path)
    assert set(lensgraph.tl_weights(changed)) == set(fresh) and measured


def test_a_path_that_is_not_a_model_names_itself_and_the_command_that_makes_one(folders, tmp_path, capsys):
    ckpt, folder, _ = folders("gpt2")
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    cases = {ckpt: f"run `lensgraph convert {ckpt} -o", str(tmp_path / "m.gguf"): "is a GGUF checkpoint",
             str(tmp_path / "nope"): "no such file or folder", str(empty): "is a directory without a model"}
    before = snapshot(tmp_path)
    for path, message in cases.items():
        for argv in (["inspect", path], ["hooks", path, "--list"], ["weights", path], ["verify", path],
                     ["generate", path, "--prompt", "hi"], ["view", path]):
            code, _, err = cli(capsys, *argv)
            line = one_error_line(err)
            assert code == 2 and path in line and message in line and "lensgraph convert" in line, (argv, line)
        with pytest.raises(lensgraph.BadInputError, match="lensgraph convert"):
            lensgraph.run_with_cache(path, [1, 2])
    assert snapshot(tmp_path) == before
    code, _, err = cli(capsys, "process", folder, "-o", tmp_path / "x")
    assert code == 2 and "lensgraph convert SOURCE" in err
    code, _, err = cli(capsys, "generate", ckpt + "-lens-nope", "--prompt", "hi")
    assert code == 2


def test_a_folder_without_a_tokenizer_asks_for_ids(folders, tmp_path, capsys):
    _, folder, _ = folders("gpt2")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(folder, "model.onnx"), bare / "model.onnx")
    code, _, err = cli(capsys, "generate", bare, "--prompt", "hi")
    assert code == 2 and "tokenizer.json" in err and "lensgraph convert" in err
    assert cli(capsys, "generate", bare, "--prompt-ids", "1,2,3", "-n", "2")[0] == 0


# -- 5: text in, TransformerLens's way --------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_to_tokens_and_padding_are_transformerlens(folders, family):
    """GPT-2's tokenizer leaves BOS to TransformerLens (which prepends its text); LLaMA's prepends it
    itself (which TransformerLens strips for prepend_bos=False)."""
    from transformer_lens.utilities.tokenize_utils import get_attention_mask

    _, folder, _ = folders(family)
    tl = tl_tokenizer(folder)
    for text in (TEXT, TEXTS):
        for bos in (True, False):
            assert to_tokens(folder, text, prepend_bos=bos).tolist() == tl.to_tokens(text, prepend_bos=bos).tolist()
    ids = tl.to_tokens(TEXTS)
    mask = get_attention_mask(tl.tokenizer, ids, True, padding_side="right").numpy()
    assert prompt(folder, TEXTS).attention_mask.tolist() == mask.tolist()
    assert lensgraph.to_str_tokens(folder, TEXT) == [tl.tokenizer.decode([t]) for t in ids[0][:len(to_tokens(folder, TEXT)[0])]]


def test_run_with_cache_takes_a_list_of_strings_padded_with_a_mask(folders):
    ckpt, folder, hf = folders("llama")
    logits, cache = lensgraph.run_with_cache(folder, TEXTS)
    mask = prompt(folder, TEXTS).attention_mask
    for row, text in enumerate(TEXTS):
        n = int(mask[row].sum())
        single_logits, single = lensgraph.run_with_cache(folder, text)
        assert single_logits.shape[1] == n
        for name in ("blocks.1.hook_resid_post", "blocks.0.attn.hook_z"):
            assert relative_error(cache[name][row, :n], single[name][0]) < 1e-5, name
        with torch.no_grad():
            ref = hf(torch.tensor(to_tokens(folder, text))).logits.numpy()[0]
        centred = logits[row, :n] - logits[row, :n].mean(-1, keepdims=True)
        assert relative_error(centred, ref - ref.mean(-1, keepdims=True)) < 1e-4
        pattern = cache["blocks.0.attn.hook_pattern"][row]
        assert np.all(pattern[:, :, n:] < 1e-6)  # no attention to the pads


@pytest.mark.parametrize("script", ["logit_lens", "direct_logit_attribution"])
def test_the_analysis_scripts_take_a_prompt_and_print_tokens_as_text(folders, script, capsys):
    import importlib
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    ckpt, folder, _ = folders("gpt2")
    importlib.import_module(script).main(["--model", folder, "--prompt", TEXT])
    out = capsys.readouterr().out
    words = [tf.AutoTokenizer.from_pretrained(ckpt).decode([t]) for t in to_tokens(folder, TEXT)[0]]
    assert "tokens: " + " | ".join(map(repr, words)) in out


# -- 6: a converted folder is verified again ---------------------------------------------------------------
def test_verify_a_folder_against_its_kept_export_or_its_source_exported_again(folders, capsys):
    _, kept, _ = folders("llama")
    assert os.path.isfile(os.path.join(kept, "export", "model.onnx"))
    code, out, err = cli(capsys, "verify", kept)
    assert code == 0 and out.startswith(f"equivalent to the unprocessed export kept in {kept}"), (out, err)
    ckpt, folder, _ = folders("gpt2")
    code, out, err = cli(capsys, "verify", folder)
    assert code == 0 and out.startswith(f"equivalent to {os.path.abspath(ckpt)}, exported again (torchscript with "
                                        "its KV cache)"), (out, err)


def test_verify_a_folder_finds_a_changed_model_and_a_lost_source(folders, tmp_path, capsys):
    _, folder, _ = folders("gpt2")
    changed = shutil.copytree(folder, tmp_path / "changed")
    model = onnx.load(str(changed / "model.onnx"))
    table = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    array = onnx.numpy_helper.to_array(table) + np.random.default_rng(0).normal(0, 0.5, table.dims).astype(np.float32)
    table.CopyFrom(onnx.numpy_helper.from_array(array, table.name))
    onnx.save(model, str(changed / "model.onnx"))
    code, out, _ = cli(capsys, "verify", changed)
    assert code == 1 and out.startswith("NOT equivalent to ")
    lost = shutil.copytree(folder, tmp_path / "lost")
    record = json.loads((lost / "lensgraph.json").read_text())
    record["source_path"] = str(tmp_path / "gone")
    (lost / "lensgraph.json").write_text(json.dumps(record))
    code, _, err = cli(capsys, "verify", lost)
    assert code == 2 and "is gone" in err and "--keep-export" in err and str(lost) in err


# -- 7: the first call opens what convert placed; a changed model is placed again ------------------------
def test_a_points_graph_of_another_model_is_not_used(folders, tmp_path, monkeypatch):
    from lensgraph.interp import cache as cache_module

    _, folder, _ = folders("gpt2")
    copy = shutil.copytree(folder, tmp_path / "copy")
    shutil.copy(os.path.join(folders("llama")[1], "model.hooks.onnx"), copy / "model.hooks.onnx")  # another model's
    calls, real = [], cache_module.points_graph
    monkeypatch.setattr(cache_module, "points_graph", lambda *a, **k: calls.append(a) or real(*a, **k))
    _, ours = lensgraph.run_with_cache(copy, TEXT)
    _, theirs = lensgraph.run_with_cache(folder, TEXT)
    assert len(calls) == 1 and set(ours) == set(theirs)  # placed again for the copy only
    for name in theirs:  # scores hold -inf where masked: equal infinities count as equal here
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-6, err_msg=name)


# -- 8: the smaller edges ---------------------------------------------------------------------------------
def test_convert_of_a_missing_gguf_file_says_no_such_file(tmp_path, capsys):
    code, _, err = cli(capsys, "convert", tmp_path / "nope.gguf", "-o", tmp_path / "out")
    assert code == 2 and "nope.gguf: no such file" in one_error_line(err)
    assert os.listdir(tmp_path) == []


def test_import_lensgraph_finds_the_package_beside_a_folder_of_its_name(tmp_path):
    """From the folder that holds a clone named lensgraph, `import lensgraph` must not find the clone
    itself as an empty namespace package (the editable install is made in strict mode: see Makefile)."""
    import subprocess
    import sys

    (tmp_path / "lensgraph").mkdir()  # the clone, as seen from the folder above it
    done = subprocess.run([sys.executable, "-c", "import lensgraph; print(lensgraph.__file__); lensgraph.to_str_tokens"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(os.path.join("lensgraph", "__init__.py"))


def test_readme_worked_examples_start_from_convert_with_text_and_the_folder():
    import re

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    section = readme[readme.index("## From `convert` to an experiment"):readme.index("## Command line")]
    shell, python = re.findall(r"```(?:sh|python)\n(.*?)```", section, re.S)[:2]
    commands = [line for line in shell.splitlines() if line.strip()]
    assert commands[0].startswith("lensgraph convert ") and " -o smollm2/" in commands[0]
    assert all("smollm2/" in line for line in commands[1:]), commands
    calls = [line for line in python.splitlines() if "lensgraph." in line and "(" in line]
    assert calls and all('"smollm2/"' in line for line in calls if "from_pretrained" not in line), calls
    examples = section + readme[readme.index("## Looking inside"):readme.index("## Passes")]
    for block in re.findall(r"```(?:sh|python)\n(.*?)```", examples, re.S):
        for ids in ("np.array", "prompt_ids", "input_ids", "--prompt-ids", ".onnx\""):
            assert ids not in block, (ids, block)
        assert not re.search(r"--tokens( \d+){2,}", block), block  # token ids, not collect's token count
