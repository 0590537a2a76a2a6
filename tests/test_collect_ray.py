"""collect on Ray Data, on a local Ray instance started here: the same windows and activations as
the local engine (compared by window index), the same folder layout, and each engine can finish a
run the other began."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import ray

import lensgraph
from hf_oracle import relative_error
from lensgraph.interp import shards
from lensgraph.interp.collect import collect

POINTS = ["blocks.*.hook_resid_post", "blocks.0.attn.hook_z"]
SETTINGS = dict(context=16, shard_mb=0.2, batch=4)


def read_all(folder) -> dict:
    parts = list(lensgraph.load_activations(folder, batch_size=1000))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(collect_models, collect_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-ref") / "local"
    collect(collect_models["llama"], collect_corpus, POINTS, out, **SETTINGS)
    return out


def same(a: dict, b: dict) -> None:
    assert a["window"].tolist() == b["window"].tolist() == list(range(len(b["window"])))
    assert np.array_equal(a["tokens"], b["tokens"])
    for point in [k for k in b if k not in ("tokens", "window")]:
        assert relative_error(a[point], b[point]) <= 1e-6, point


def test_ray_engine_writes_the_local_engines_activations(local_ray, local_run, collect_models, collect_corpus,
                                                          tmp_path):
    out = tmp_path / "ray"
    manifest = collect(collect_models["llama"], collect_corpus, POINTS, out, engine="ray", workers=2, **SETTINGS)
    with open(local_run / shards.MANIFEST) as f:
        local = json.load(f)
    assert manifest["state"]["engine"] == "ray" and manifest["state"]["complete"]
    assert {k: v for k, v in manifest.items() if k not in ("state", "notes")} == \
        {k: v for k, v in local.items() if k not in ("state", "notes")}
    assert manifest["state"]["windows"] == local["state"]["windows"] > 100
    assert "ray: 2 workers of 1 threads" in manifest["notes"][-1]
    same(read_all(out), read_all(local_run))
    assert sorted(os.listdir(out)) == sorted(os.listdir(local_run))


def test_each_engine_finishes_what_the_other_began(local_ray, local_run, collect_models, collect_corpus, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(local_run, out)
    names = sorted(n for n in os.listdir(out) if shards.SHARD.match(n))
    gone = [names[0], names[len(names) // 2], names[-1]]  # as a run killed with shards out of order would leave
    kept = {n: os.stat(out / n).st_mtime_ns for n in names if n not in gone}
    for name in gone:
        os.remove(out / name)
    collect(collect_models["llama"], collect_corpus, POINTS, out, engine="ray", workers=2, **SETTINGS)
    assert {n: os.stat(out / n).st_mtime_ns for n in kept} == kept  # only the missing shards were made
    same(read_all(out), read_all(local_run))
    # and a run that stops at --tokens stops the pipeline there
    part = collect(collect_models["llama"], collect_corpus, POINTS, tmp_path / "part", engine="ray", tokens=400,
                   **SETTINGS)
    assert part["state"]["tokens"] == 400
    rows, full = read_all(tmp_path / "part"), read_all(local_run)
    assert np.array_equal(rows["tokens"], full["tokens"][:25])
