"""collect on Ray Data, for when one machine is not enough: the same windows, shards and manifest
as the local loop (collect.py), scheduled by Ray. The only module that imports ray.

    documents (ray.data from the corpus)
      -> map_batches(_tokenize)                  tasks: each document's token ids
      -> map_batches(_Cutter, concurrency=1)     one actor: the windows, numbered in order, cut into shards
      -> map_batches(_ShardWorker, concurrency=N) an actor pool, one onnxruntime session per actor: each
                                                 computes its shards and writes them into the shared folder
      -> the driver records each shard as it completes (state.json, the progress bar)

The order is kept (DataContext's preserve_order), so the one cutter sees the documents in the
corpus's order and makes exactly the local engine's windows. The model file and the output folder
must be at a path every node of the cluster sees (a shared file system).
"""

from __future__ import annotations

import logging
import os
import socket

import numpy as np

from .. import progress
from ..errors import LensError, lens_cause, missing_extra
from . import shards
from .collect_job import Job, ShardCutter, Step, finish, open_folder, run_step
from .corpus import TokenizerSpec, encode


def check_ray() -> None:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ModuleNotFoundError as exc:
        raise missing_extra(exc.name, "lensgraph collect --engine ray", extra="scale") from None


_TOKENIZERS: dict = {}


def _tokenize(batch: dict, column: str, spec: dict) -> dict:
    """Each document's token ids, as the bytes of an int32 array (one row a document)."""
    if spec["path"] not in _TOKENIZERS:
        _TOKENIZERS[spec["path"]] = TokenizerSpec(spec["path"], spec["bos_token_id"], spec["eos_token_id"],
                                                  spec["vocab_size"]).load()
    texts = [t if isinstance(t, str) else "" for t in batch[column]]
    ids = encode(_TOKENIZERS[spec["path"]], texts)
    return {"ids": np.array([d.tobytes() for d in ids], dtype=object)}


class _Cutter:
    """The one actor that numbers the windows: documents in order in, whole shards out."""

    def __init__(self, context: int, bos, eos, per_shard: int, max_windows, done, documents: int):
        self.cutter = ShardCutter(context, bos, eos, per_shard, max_windows, done)
        self.left, self.context = documents, context

    def __call__(self, batch: dict):
        if self.cutter.full:
            return
        docs = [np.frombuffer(b, np.int32) for b in batch["ids"]]
        self.left -= len(docs)
        out = self.cutter.feed(docs)
        if self.left <= 0 and not self.cutter.full:  # the corpus's last documents: the shorter last shard
            out += self.cutter.finish()
        for k, windows in out:
            yield {"shard": np.array([k]), "windows": np.array([len(windows)]),
                   "tokens": np.array([windows.tobytes()], dtype=object)}


class _ShardWorker:
    """One onnxruntime session; computes whole shards and writes them into the shared folder."""

    def __init__(self, plan: dict, threads: int, provider: str):
        self.plan = plan
        self.step = Step(plan["model"], plan["points"], plan["dtype"], threads, provider)
        self.features = shards.features(plan["shapes"], plan["context"], plan["dtype"])

    def __call__(self, batch: dict) -> dict:
        plan = self.plan
        for k, n, raw in zip(batch["shard"], batch["windows"], batch["tokens"]):
            windows = np.frombuffer(raw, np.int32).reshape(int(n), plan["context"])
            arrays = run_step([self.step], windows, plan["batch"], plan["shapes"], plan["dtype"])
            shards.write_shard(plan["folder"], int(k), arrays, windows, int(k) * plan["per_shard"], self.features)
        return {"shard": batch["shard"], "windows": batch["windows"],
                "worker": np.array([f"{socket.gethostname()}:{os.getpid()}"] * len(batch["shard"]))}


def _documents(job: Job):
    """The corpus as a Ray dataset, in its order: a local `datasets` table is handed over as Arrow
    (its shuffle applied), a hub dataset is streamed by Ray's own reader."""
    import datasets
    import ray.data

    ds = job.dataset
    if isinstance(ds, datasets.Dataset):
        blocks = max(1, min(len(ds) // 256, 1000))  # blocks of a few hundred documents: the stream flows
        return ray.data.from_arrow(ds.with_format("arrow")[:], override_num_blocks=blocks), len(ds)
    docs = ray.data.from_huggingface(ds)
    return docs, docs.count()


def run_ray(job: Job, workers: int | None, address: str | None, provider: str = "CPUExecutionProvider") -> dict:
    """Run the job on the Ray cluster at `address` (None: the one this process is connected to, or a
    new local instance)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        return _run(job, workers, provider)
    except Exception as exc:
        cause = lens_cause(exc) or lens_cause(getattr(exc, "cause", None))
        if cause is not None and cause is not exc:
            raise type(cause)(str(cause).splitlines()[0]) from None  # a worker's error, in its own words
        raise
    finally:
        if started:
            ray.shutdown()


def _run(job: Job, workers: int | None, provider: str) -> dict:
    import ray
    import ray.data

    done = open_folder(job, "ray")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = int(min(n["Resources"].get("CPU", 1) for n in nodes)) or 1
    total = int(sum(n["Resources"].get("CPU", 1) for n in nodes)) or 1
    workers = workers or len(nodes)
    threads = max(1, min(per_node, total // workers))
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the cutter must see the corpus in order
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    plan = {"model": job.model["path"], "points": job.points, "dtype": job.dtype, "shapes": job.shapes,
            "context": job.context, "batch": job.batch, "folder": job.folder, "per_shard": job.windows_per_shard}
    docs, count = _documents(job)
    spec = job.tokenizer
    results = (docs.map_batches(_tokenize, fn_kwargs={"column": job.corpus["column"], "spec": spec.to_dict()},
                                batch_format="numpy", num_cpus=0)
               .map_batches(_Cutter, fn_constructor_kwargs={
                   "context": job.context, "bos": spec.bos, "eos": spec.eos, "per_shard": job.windows_per_shard,
                   "max_windows": job.max_windows, "done": sorted(done), "documents": count},
                   batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)
               .map_batches(_ShardWorker, fn_constructor_kwargs={"plan": plan, "threads": threads,
                                                                 "provider": provider},
                            batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=threads))
    written, seen = dict(done), set()
    planned = job.shards_planned
    bar_total = None if job.max_windows is None else job.max_windows * job.context
    with progress.bar(bar_total, "collect (ray)", unit="tok") as bar:
        bar.update(sum(done.values()) * job.context)
        if planned is None or len(written) < planned:
            for row in results.iter_rows():
                written[int(row["shard"])] = int(row["windows"])
                seen.add(str(row["worker"]))
                shards.write_state(job.folder, written, job.model["path"])
                job.tick(int(row["windows"]))
                bar.update(int(row["windows"]) * job.context)
                if planned is not None and len(written) >= planned:
                    break  # every shard asked for is written: the rest of the corpus is not needed
    if planned is not None and len(written) > planned:
        raise LensError(f"{job.folder}: {len(written)} shards, more than the {planned} planned (a bug)")
    job.notes.append(f"ray: {workers} workers of {threads} threads; {len(seen)} wrote shards in this run")
    return finish(job, "ray", exhausted=planned is None or len(written) < planned)
