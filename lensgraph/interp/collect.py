"""Activations of a few hook points over a corpus, written as shards a trainer reads as they are.

    lensgraph.collect("smollm2-lens/", "corpus.txt", ["blocks.8.hook_resid_post"], "acts/", context=128)
    for batch in lensgraph.load_activations("acts/"): batch["blocks.8.hook_resid_post"]  # [b, 128, 576]

One engine-independent step (collect_job.Step): windows of token ids in, each point's activations
out, from an onnxruntime session whose graph keeps only the requested points as outputs (and no
logits unless asked), so nothing past the last of them is computed. Two drivers schedule it: the
local loop below, and Ray Data (collect_ray.py). Both cut the same windows into the same shards
(collect_job.ShardCutter) and write them the same way (shards.py), so a run one engine started the
other can finish; what Ray does (scheduling, retries, placement), Ray does.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from .. import progress
from ..errors import BadInputError
from . import shards
from .collect_job import Job, ShardCutter, Step, default_threads, finish, open_folder, prepare, run_step
from .corpus import documents, encode

ENGINES = ("local", "ray")


def collect(model, data, points, out, context: int = 128, tokens: int | None = None, batch: int = 8,
            dtype: str = "float32", shard_mb: float = 512, column: str = "text", seed: int | None = None,
            tokenizer=None, split: str = "train", engine: str = "local", workers: int | None = None,
            ray_address: str | None = None, provider: str = "CPUExecutionProvider") -> dict:
    """Collect `points` (globs over hook names) of `model` over the corpus `data` into the folder
    `out`; returns the manifest. Rerunning it after an interruption continues where it stopped."""
    if engine not in ENGINES:
        raise BadInputError(f"unknown engine {engine!r}; choose {' or '.join(ENGINES)}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise BadInputError(f"--workers must be a positive whole number, got {workers!r}")
    if engine == "ray":
        from .collect_ray import check_ray

        check_ray()
    job, step = prepare(model, data, points, out, context, tokens, batch, dtype, shard_mb, column, seed,
                        tokenizer, split, provider)
    if job.previous is not None and job.previous["state"]["complete"] \
            and len(shards.complete(job.folder)) == job.previous["state"]["shards"]:
        return job.previous  # this very run is done: nothing to do
    if engine == "ray":
        from .collect_ray import run_ray

        del step  # the workers build their own
        return run_ray(job, workers, ray_address, provider)
    return run_local(job, step, workers or 1, provider)


def run_local(job: Job, step: Step, workers: int = 1, provider: str = "CPUExecutionProvider") -> dict:
    """The local driver: one process, `workers` sessions sharing the cores, one shard being
    written while the next is computed."""
    done = open_folder(job, "local")
    threads = max(1, default_threads() // workers)
    steps = [step] if workers == 1 else [Step(job.model["path"], job.points, job.dtype, threads, provider)
                                         for _ in range(workers)]
    del step
    cutter = ShardCutter(job.context, job.tokenizer.bos, job.tokenizer.eos, job.windows_per_shard,
                         job.max_windows, done)
    tokenizer, feats = job.tokenizer.load(), job.features()
    written = dict(done)

    def cut():
        for texts in documents(job.dataset, job.corpus["column"]):
            yield from cutter.feed(encode(tokenizer, texts))
            if cutter.full:
                return
        yield from cutter.finish()

    def write(k, arrays, windows):
        shards.write_shard(job.folder, k, arrays, windows, k * job.windows_per_shard, feats)
        written[k] = len(windows)
        shards.write_state(job.folder, written, job.model["path"])
        job.tick(len(windows))

    total = None if job.max_windows is None else job.max_windows * job.context
    with progress.bar(total, "collect", unit="tok") as bar, ThreadPoolExecutor(1) as writer, \
            ThreadPoolExecutor(workers) as pool:
        bar.update(sum(done.values()) * job.context)
        pending = None
        for k, windows in cut():
            arrays = run_step(steps, windows, job.batch, job.shapes, job.dtype, pool)
            if pending is not None:
                pending.result()  # at most one shard waits for the disk
            pending = writer.submit(write, k, arrays, windows)
            del arrays
            bar.update(windows.size)
        if pending is not None:
            pending.result()
    return finish(job, "local", exhausted=not cutter.full)
