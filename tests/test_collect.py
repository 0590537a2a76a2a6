"""lensgraph collect on one machine: the windows are packed as SAELens packs them, the shards hold
exactly what run_with_cache gives on those windows (and what the HuggingFace modules give, read with
torch hooks), the model computes only what is asked, a run killed with SIGKILL resumes without
losing or repeating a token, and bad input is refused with nothing written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import lensgraph
from conftest import write_corpus
from hf_oracle import hf_points, relative_error
from lensgraph.cli import main
from lensgraph.errors import BadInputError, LensError
from lensgraph.interp import shards
from lensgraph.interp.collect import collect
from lensgraph.interp.collect_job import Step
from lensgraph.interp.corpus import Packer

POINTS = ["blocks.*.hook_resid_post", "blocks.0.attn.hook_z", "blocks.1.mlp.hook_post"]
CONTEXT = 16


def read_all(folder) -> dict:
    """Every row of a folder, through load_activations, as one dict of arrays."""
    parts = list(lensgraph.load_activations(folder, batch_size=1000))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(scope="module")
def collected(collect_models, collect_corpus, tmp_path_factory):
    """{family: (folder, manifest)}: one run through the command line for each tiny model."""
    out = {}
    for family, model in collect_models.items():
        acts = tmp_path_factory.mktemp("acts") / family
        code = main(["collect", model, "--data", collect_corpus, "--points", *POINTS, "-o", str(acts),
                     "--context", str(CONTEXT), "--shard-mb", "0.05", "--batch", "4", "--quiet"])
        assert code == 0
        with open(acts / shards.MANIFEST) as f:
            out[family] = (acts, json.load(f))
    return out


def test_packing_follows_saelens():
    """BOS opens each window (unless the text already starts with it), EOS joins a document to the
    one before it in the same window, a long document carries on after a fresh BOS, the tail is dropped."""
    packer = Packer(context=5, bos=1, eos=2)
    windows = packer.add(np.array([10, 11, 12])) + packer.add(np.array([20, 21, 22, 23, 24, 25, 26])) \
        + packer.add(np.array([1, 30, 31])) + packer.add(np.array([40, 41]))
    assert [w.tolist() for w in windows] == [[1, 10, 11, 12, 2], [1, 20, 21, 22, 23], [1, 24, 25, 26, 2],
                                             [1, 30, 31, 2, 40]]  # the text's own BOS opens the last one
    assert packer.pos == 2  # [1, 41] waits for more text, and is dropped if none comes
    gpt2_like = Packer(context=4, bos=0, eos=0)  # BOS = EOS: text that starts with it gets no second one
    assert [w.tolist() for w in gpt2_like.add(np.array([5, 6])) + gpt2_like.add(np.array([0, 7, 8]))] == \
        [[0, 5, 6, 0]]
    assert packer.add(np.array([], np.int32)) == [] and packer.pos == 2  # an empty document adds nothing
    none = Packer(context=3, bos=None, eos=None)
    assert [w.tolist() for w in none.add(np.array([1, 2])) + none.add(np.array([3, 4]))] == [[1, 2, 3]]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_shards_are_run_with_cache_and_hf_activations(collected, collect_models, collect_corpus, family_exports,
                                                      family):
    import datasets

    acts, manifest = collected[family]
    model = os.path.join(collect_models[family], "model.onnx")
    rows = read_all(acts)
    n = len(rows["window"])
    assert rows["window"].tolist() == list(range(n)) and n == manifest["state"]["windows"] > 100
    assert manifest["state"]["complete"] and manifest["state"]["shards"] > 3
    assert manifest["model"]["processing"] == lensgraph.LensModel.load(model).applied != []
    # the windows are the corpus, tokenized and packed
    tokenizer = lensgraph.interp.corpus.tokenizer_spec(collect_models[family])
    packer = Packer(CONTEXT, tokenizer.bos, tokenizer.eos)
    with open(collect_corpus) as f:
        expected = [w for line in f.read().split("\n")[:-1]
                    for w in packer.add(np.array(tokenizer.load().encode(line, add_special_tokens=False).ids))]
    assert np.array_equal(rows["tokens"], np.stack(expected))
    assert rows["tokens"][:, 0].tolist() == [tokenizer.bos] * n
    # equal to run_with_cache on the same windows
    _, cache = lensgraph.run_with_cache(model, rows["tokens"].astype(np.int64), points=manifest["points"])
    for point in manifest["points"]:
        got = rows[point]
        assert got.shape == (n, CONTEXT, int(np.prod(manifest["shapes"][point])))
        assert relative_error(got, cache[point].reshape(got.shape)) <= 1e-6, point
    # and a sample equals HuggingFace's own modules, read with torch hooks
    sample = rows["tokens"][[0, n // 2, n - 1]].astype(np.int64)
    oracle = hf_points(family_exports.model(family), sample, processed=True)
    picked = {k: v[[0, n // 2, n - 1]] for k, v in rows.items()}
    for point in manifest["points"]:
        assert relative_error(picked[point], oracle[point].reshape(picked[point].shape)) <= 1e-4, point
    # a datasets folder as it is, with the SAELens columns
    ds = datasets.load_from_disk(str(acts))
    assert ds.num_rows == n and set(ds.column_names) == set(manifest["points"]) | {"token_ids", "window"}
    assert ds.features["blocks.0.hook_resid_post"].shape == (CONTEXT, 32)


def test_only_the_requested_points_are_computed(collect_models):
    model = os.path.join(collect_models["llama"], "model.onnx")
    early = Step(model, ["blocks.0.hook_resid_post"], "float32")
    late = Step(model, ["blocks.1.hook_resid_post"], "float32")
    with_logits = Step(model, ["blocks.0.hook_resid_post", "logits"], "float32")
    assert [o.name for o in early.session.get_outputs()] == [early.outputs["blocks.0.hook_resid_post"]]
    assert early.nodes < late.nodes < with_logits.nodes  # nothing after the last point is run, no logits
    ids = np.random.default_rng(0).integers(0, 80, (2, 8))
    logits, cache = lensgraph.run_with_cache(model, ids, points=["blocks.0.hook_resid_post"])
    got = with_logits(ids)
    assert relative_error(got["logits"], logits) <= 1e-6
    assert relative_error(early(ids)["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_post"]) <= 1e-6


def test_corpus_formats_give_the_same_windows(collect_models, tmp_path):
    """A text file, JSONL, parquet and a save_to_disk folder of the same documents."""
    import datasets

    docs = write_corpus(str(tmp_path / "c.txt"), 60, seed=5)
    ds = datasets.Dataset.from_dict({"body": docs})
    ds.to_json(str(tmp_path / "c.jsonl"))
    ds.to_parquet(str(tmp_path / "c.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    model = collect_models["gpt2"]
    runs = {}
    for name, column in [("c.txt", "text"), ("c.jsonl", "body"), ("c.parquet", "body"), ("saved", "body")]:
        out = tmp_path / f"acts-{name}"
        collect(model, tmp_path / name, ["blocks.0.hook_resid_post"], out, context=CONTEXT, column=column)
        runs[name] = read_all(out)
    first = runs.pop("c.txt")
    assert len(first["window"]) > 20
    for rows in runs.values():
        assert np.array_equal(rows["tokens"], first["tokens"])
        assert np.array_equal(rows["blocks.0.hook_resid_post"], first["blocks.0.hook_resid_post"])
    # a seed shuffles the documents, the same way each time
    shuffled = []
    for i in range(2):
        collect(model, tmp_path / "c.txt", ["hook_embed"], tmp_path / f"s{i}", context=CONTEXT, seed=3)
        shuffled.append(read_all(tmp_path / f"s{i}"))
    assert np.array_equal(shuffled[0]["tokens"], shuffled[1]["tokens"])
    assert not np.array_equal(shuffled[0]["tokens"], first["tokens"][:len(shuffled[0]["tokens"])])


def test_tokens_float16_and_a_finished_run(collected, collect_models, collect_corpus, tmp_path):
    model = collect_models["gpt2"]
    out = tmp_path / "half"
    manifest = collect(model, collect_corpus, POINTS, out, context=CONTEXT, tokens=1000, dtype="float16",
                       shard_mb=0.05, batch=4)
    assert manifest["state"]["tokens"] == 1008  # 1000 tokens, in whole windows of 16
    half, full = read_all(out), read_all(collected["gpt2"][0])
    assert half["blocks.1.hook_resid_post"].dtype == np.float16
    assert np.array_equal(half["tokens"], full["tokens"][:63])
    assert np.array_equal(half["blocks.1.hook_resid_post"], full["blocks.1.hook_resid_post"][:63].astype(np.float16))
    before = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}
    again = collect(model, collect_corpus, POINTS, out, context=CONTEXT, tokens=1000, dtype="float16", shard_mb=0.05,
                    batch=4)
    assert again == manifest and {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)} == before
    step = Step(os.path.join(model, "model.onnx"), ["hook_embed"], "float16")
    with pytest.raises(LensError, match="do not fit float16"):
        step._cast("hook_embed", np.array([1.0, 7e4], np.float32))


def _folder_state(path) -> dict | None:
    if not os.path.exists(path):
        return None
    return {n: os.path.getsize(os.path.join(path, n)) for n in sorted(os.listdir(path))}


@pytest.mark.parametrize("case, args, message", [
    ("missing corpus", ["--data", "{tmp}/nope.txt"], "no such file or folder"),
    ("empty corpus", ["--data", "{tmp}/empty.txt"], "the corpus is empty"),
    ("no such column", ["--data", "{tmp}/c.jsonl", "--column", "text"], "has no column 'text'"),
    ("no such point", ["--points", "blocks.9.hook_resid_post"], "no hook point matches"),
    ("not per position", ["--points", "blocks.0.attn.hook_pattern"], "no row per position"),
    ("context too long", ["--context", "100"], "longer than the model's 64 learned positions"),
    ("bfloat16", ["--dtype", "bfloat16"], "no bfloat16 type"),
    ("folder with other files", ["-o", "{tmp}/other"], "holds other files"),
    ("another run's folder", ["--context", "8", "-o", "{acts}"], "was collected with context 16, not 8"),
])
def test_bad_input_is_refused_and_nothing_is_written(collected, collect_models, collect_corpus, tmp_path, capsys,
                                                     case, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "c.jsonl").write_text('{"body": "w1 w2"}\n')
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    acts = collected["gpt2"][0]
    base = {"--data": collect_corpus, "--points": "blocks.0.hook_resid_post", "-o": str(tmp_path / "acts"),
            "--context": "16"}
    given = [a.format(tmp=tmp_path, acts=acts) for a in args]
    for flag in [a for a in given if a.startswith("-")]:
        base.pop(flag, None)
    argv = ["collect", collect_models["gpt2"]] + [x for k, v in base.items() for x in (k, v)] + given
    watched = [tmp_path / "acts", tmp_path / "other", acts]
    before = [_folder_state(p) for p in watched]
    assert main(argv) == 2, case
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert [_folder_state(p) for p in watched] == before


def _shard_count(folder) -> tuple[int, bool]:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0, False
    return sum(1 for n in names if shards.SHARD.match(n)), any(n.endswith(".tmp") for n in names)


def test_sigkill_at_several_points_then_rerun_gives_exactly_the_uninterrupted_run(collect_models, collect_corpus,
                                                                                  collected, tmp_path):
    acts = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lensgraph", "collect", collect_models["llama"], "--data", collect_corpus,
           "--points", *POINTS, "-o", str(acts), "--context", str(CONTEXT), "--shard-mb", "0.05", "--batch", "1",
           "--quiet"]
    kills = []
    # kill the first moment a file is being written, then once 5 more shards are complete, then 25 more
    for when in ("writing", 5, 25):
        start = _shard_count(acts)[0]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            count, writing = _shard_count(acts)
            if writing if when == "writing" else count >= start + when:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills.append((when, _shard_count(acts)[0]))
                break
            time.sleep(0.002)
        proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read()
    print("kills (when, complete shards then):", kills)
    assert len(kills) >= 2, kills  # the run was interrupted for real
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed, clean = read_all(acts), read_all(collected["llama"][0])
    assert resumed["window"].tolist() == clean["window"].tolist() == list(range(len(clean["window"])))
    for key in clean:
        assert np.array_equal(resumed[key], clean[key]), key
    assert not [n for n in os.listdir(acts) if n.endswith(".tmp")], kills


def test_disk_full_keeps_the_complete_shards(collect_models, collect_corpus, collected, tmp_path, monkeypatch):
    out = tmp_path / "full"
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        if ".data-" in os.readlink(f"/proc/self/fd/{fd}"):
            calls.append(fd)
            if len(calls) == 4:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(LensError, match="No space left on device.*the 3 complete shards are kept: free some space"):
        collect(collect_models["gpt2"], collect_corpus, POINTS, out, context=CONTEXT, shard_mb=0.05, batch=4)
    assert sorted(os.listdir(out)) == ["collect.json", "data-00000.arrow", "data-00001.arrow", "data-00002.arrow",
                                       "dataset_info.json", "state.json"]
    assert len(read_all(out)["window"]) == 3 * json.load(open(out / "collect.json"))["windows_per_shard"]
    monkeypatch.setattr(os, "fsync", real_fsync)
    collect(collect_models["gpt2"], collect_corpus, POINTS, out, context=CONTEXT, shard_mb=0.05, batch=4)
    clean = read_all(collected["gpt2"][0])
    assert all(np.array_equal(read_all(out)[k], clean[k]) for k in clean)


def test_python_errors_name_the_problem(collect_models, collect_corpus, tmp_path):
    with pytest.raises(BadInputError, match="give the hook points"):
        collect(collect_models["gpt2"], collect_corpus, [], tmp_path / "a", context=CONTEXT)
    with pytest.raises(BadInputError, match="--tokens must be a positive"):
        collect(collect_models["gpt2"], collect_corpus, ["hook_embed"], tmp_path / "a", tokens=0)
    shutil.copy(os.path.join(collect_models["gpt2"], "model.onnx"), tmp_path / "alone.onnx")
    with pytest.raises(BadInputError, match="no tokenizer.json beside the model"):
        collect(tmp_path / "alone.onnx", collect_corpus, ["hook_embed"], tmp_path / "a", context=CONTEXT)
    assert not os.path.exists(tmp_path / "a")
