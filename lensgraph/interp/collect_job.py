"""What both collect drivers share: the job (every input checked before anything is written), the
step (windows of token ids in, activations out), and the cutter that numbers the windows and cuts them
into shards. collect.py is the front door and the local driver, collect_ray.py the Ray Data driver.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .._version import __version__
from ..errors import BadInputError, LensError
from . import shards
from .corpus import Packer, TokenizerSpec, open_corpus, tokenizer_spec

DTYPES = ("float32", "float16")
LOGITS = "logits"
NOT_PER_POSITION = ("attn.hook_pattern", "attn.hook_attn_scores")  # [batch, head, query, key]
MAX_SHARD_MB = 2048


@dataclass
class Job:
    """Everything a run is, checked before anything is written; the manifest is its record."""

    folder: str
    model: dict  # path, bytes, processing, source
    tokenizer: TokenizerSpec
    corpus: dict  # path, column, split
    seed: int | None
    context: int
    points: list[str]
    shapes: dict[str, list[int]]  # each point's per-position shape
    dtype: str
    tokens_requested: int | None
    windows_per_shard: int
    batch: int
    notes: list[str] = field(default_factory=list)
    clock: list[tuple[float, int]] = field(default_factory=list, repr=False)  # (time, tokens) at each shard
    dataset: object = field(default=None, repr=False)  # the opened corpus
    previous: dict | None = field(default=None, repr=False)  # the manifest of the run being resumed

    @property
    def max_windows(self) -> int | None:
        return None if self.tokens_requested is None else math.ceil(self.tokens_requested / self.context)

    @property
    def shards_planned(self) -> int | None:
        return None if self.max_windows is None else math.ceil(self.max_windows / self.windows_per_shard)

    def identity(self) -> dict:
        """What a resumed run must match: everything that decides the windows and their values."""
        return {"model": self.model, "tokenizer": self.tokenizer.to_dict(), "corpus": self.corpus,
                "seed": self.seed, "context": self.context, "points": self.points, "shapes": self.shapes,
                "dtype": self.dtype, "tokens_requested": self.tokens_requested,
                "windows_per_shard": self.windows_per_shard}

    def manifest(self, done: dict[int, int], engine: str, finished: bool) -> dict:
        windows = sum(done.values())
        timing = {}
        if len(self.clock) > 1:  # this run's pace from its first shard on (start-up left out)
            (t0, n0), (t1, n1) = self.clock[0], self.clock[-1]
            timing = {"seconds": round(t1 - t0, 3), "tokens_per_s": round((n1 - n0) / max(t1 - t0, 1e-9), 1)}
        return {"format": shards.FORMAT, "lensgraph": __version__, **self.identity(),
                "columns": {"token_ids": "the window's token ids [context] int32",
                            "window": "the window's index in the run: its tokens are the run's tokens "
                                      "window*context .. window*context + context - 1"},
                "state": {"complete": finished, "shards": len(done), "windows": windows,
                          "tokens": windows * self.context, "engine": engine, **timing},
                "notes": self.notes}

    def tick(self, windows: int) -> None:
        """A shard is done: note the time and the tokens so far, for the manifest's pace."""
        done = (self.clock[-1][1] if self.clock else 0) + windows * self.context
        self.clock.append((time.perf_counter(), done))

    def features(self):
        return shards.features(self.shapes, self.context, self.dtype)


def resolve_model(model, tokenizer=None) -> tuple[str, TokenizerSpec]:
    """(the ONNX file, its tokenizer): a `convert` folder (model.onnx and the tokenizer beside it),
    an onnxruntime-genai folder, or an ONNX file with `tokenizer` (default: the files beside it)."""
    from ..store.folder import is_model_folder, model_file

    path = os.path.abspath(os.path.expanduser(os.fspath(model)))
    if os.path.isdir(path):
        onnx_path = model_file(path) if is_model_folder(path) else os.path.join(path, "model.onnx")
        if not os.path.isfile(onnx_path):
            raise BadInputError(f"{path}: has no model.onnx; give a folder `lensgraph convert` wrote, or an ONNX file")
    elif os.path.isfile(path):
        onnx_path = path
    else:
        raise BadInputError(f"{path}: no such model file or folder")
    where = tokenizer if tokenizer is not None else os.path.dirname(onnx_path)
    if tokenizer is None and not os.path.isfile(os.path.join(where, "tokenizer.json")):
        raise BadInputError(f"{path}: no tokenizer.json beside the model; give one with --tokenizer")
    return onnx_path, tokenizer_spec(where)


def choose_points(names: list[str], unplaced: dict[str, str], patterns) -> list[str]:
    """The points the globs name, refused where a point cannot be placed or is not per position."""
    from .hooks import select

    if not patterns:
        raise BadInputError("give the hook points to collect with --points, e.g. 'blocks.8.hook_resid_post'")
    chosen = select(names + list(unplaced) + [LOGITS], patterns)
    absent = [f"{p} ({unplaced[p]})" for p in chosen if p in unplaced]
    if absent:
        raise BadInputError(f"cannot collect {', '.join(absent[:3])}: not placeable in this model")
    whole = [p for p in chosen if p.endswith(NOT_PER_POSITION)]
    if whole:
        raise BadInputError(f"cannot collect {', '.join(whole[:3])}: a [head, query, key] point has no row per "
                            "position; name per-position points (the stream, sublayer outputs, hook_z, ...)")
    return chosen


class Step:
    """Windows of token ids in, {point: [n, context, *shape]} out in the run's dtype, from one
    onnxruntime session whose graph computes only the requested points."""

    def __init__(self, model_path: str, points: list[str], dtype: str, threads: int | None = None,
                 provider: str = "CPUExecutionProvider"):
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        from ..store.model import LensModel
        from ..store.runner import Runner
        from .hooks import add_hooks

        lens = LensModel.load(model_path)
        outputs = [v.name for v in lens.graph.outputs]
        logits = LOGITS if LOGITS in outputs else outputs[0]
        report = add_hooks(lens, [p for p in points if p != LOGITS], copies=False)
        self.outputs = {p: logits if p == LOGITS else report.outputs[p] for p in points}
        keep = set(self.outputs.values())
        for value in list(lens.graph.outputs):
            if value.name not in keep:
                lens.graph.outputs.remove(value)
        RemoveUnusedNodesPass()(lens.ir)  # what feeds no kept output is never run
        self.nodes = len(list(lens.graph))
        runner = Runner(lens, provider, label=model_path, threads=threads)
        self.session, self.dims, self.dtype, self.label = runner.session, runner.cache_dims, np.dtype(dtype), model_path

    def __call__(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        from .cache import _run, model_feeds

        feeds = model_feeds(self.session.get_inputs(), np.asarray(tokens, np.int64), None, self.dims)
        names = list(dict.fromkeys(self.outputs.values()))
        values = dict(zip(names, _run(self.session, names, feeds)))
        return {p: self._cast(p, values[out]) for p, out in self.outputs.items()}

    def _cast(self, point: str, x: np.ndarray) -> np.ndarray:
        if x.dtype == self.dtype:
            return x
        with np.errstate(over="ignore"):  # found and refused below
            y = x.astype(self.dtype)
        if self.dtype == np.float16:
            lost = np.isinf(y) & np.isfinite(x)
            if lost.any():
                raise LensError(f"{point}: values up to {float(np.abs(x[lost]).max()):.4g} do not fit float16 "
                                "(largest 65504); collect it with --dtype float32")
        return y


def run_step(steps: list[Step], tokens: np.ndarray, batch: int, shapes: dict, dtype: str, pool=None) -> dict:
    """The activations of a shard's windows, `batch` windows a run, spread over the steps (one
    thread each, each session with its share of the cores)."""
    n, context = tokens.shape
    out = {p: np.empty((n, context, *s), dtype) for p, s in shapes.items()}
    starts = list(range(0, n, batch))

    def work(w: int) -> None:
        for start in starts[w::len(steps)]:
            for p, v in steps[w](tokens[start:start + batch]).items():
                out[p][start:start + batch] = v

    if len(steps) == 1 or pool is None:
        work(0)
    else:
        for f in [pool.submit(work, w) for w in range(len(steps))]:
            f.result()
    return out


class ShardCutter:
    """Documents' token ids in, shards out: the windows numbered in order and cut into shards of
    `per_shard` windows (the last one may be shorter), each shard once; shards in `done` are
    skipped (their windows are still counted, so every later window keeps its number)."""

    def __init__(self, context: int, bos, eos, per_shard: int, max_windows: int | None, done=()):
        self.packer = Packer(context, bos, eos)
        self.per_shard, self.max_windows, self.done = per_shard, max_windows, set(done)
        self.pending: list[np.ndarray] = []
        self.count = 0
        self.full = False  # every window asked for is made

    def feed(self, docs) -> list[tuple[int, np.ndarray]]:
        out = []
        for doc in docs:
            for window in self.packer.add(doc):
                self.pending.append(window)
                self.count += 1
                if len(self.pending) == self.per_shard or self.count == self.max_windows:
                    out += self._cut()
                if self.count == self.max_windows:
                    self.full = True
                    return out
        return out

    def finish(self) -> list[tuple[int, np.ndarray]]:
        """The last, shorter shard, once the corpus has ended."""
        return self._cut() if self.pending else []

    def _cut(self) -> list[tuple[int, np.ndarray]]:
        k = (self.count - 1) // self.per_shard
        windows, self.pending = self.pending, []
        return [] if k in self.done else [(k, np.stack(windows))]


def prepare(model, data, points, out, context: int = 128, tokens: int | None = None, batch: int = 8,
            dtype: str = "float32", shard_mb: float = 512, column: str = "text", seed: int | None = None,
            tokenizer=None, split: str = "train", provider: str = "CPUExecutionProvider") -> tuple[Job, Step]:
    """The job and a step over its model, every input checked; nothing is written."""
    from ..graph.hookpoints import place
    from ..store.model import LensModel
    from .cache import id_limits
    from .hooks import remove_hooks

    _check_numbers(context, tokens, batch, shard_mb)
    if dtype not in DTYPES:
        why = (": Arrow and datasets have no bfloat16 type, so a trainer could not read the shards as they are; "
               "float16 takes the same space" if dtype == "bfloat16" else "")
        raise BadInputError(f"--dtype {dtype} is not offered{why} (choose {' or '.join(DTYPES)})")
    onnx_path, spec = resolve_model(model, tokenizer)
    folder = os.path.abspath(os.fspath(out))
    previous = shards.read_manifest(folder)
    lens = LensModel.load(onnx_path)
    remove_hooks(lens)
    placement = place(lens.graph, model=lens)
    vocab, positions = id_limits(placement.anatomy)
    if positions is not None and context > positions:
        raise BadInputError(f"--context {context} is longer than the model's {positions} learned positions")
    if vocab is not None and spec.vocab > vocab:
        raise BadInputError(f"{spec.path}: its {spec.vocab} tokens are more than the model's vocabulary of {vocab}; "
                            "give the model's own tokenizer")
    chosen = choose_points(list(placement.points), dict(placement.unplaced), points)
    applied, source = lens.applied, lens.ir.metadata_props.get("lensgraph.source")
    del lens, placement
    corpus = open_corpus(data, column, seed, split)
    step = Step(onnx_path, chosen, dtype, provider=provider)
    probe = step(np.full((1, context), spec.bos if spec.bos is not None else 0, np.int64))
    shapes = {p: list(v.shape[2:]) for p, v in probe.items()}
    per_window = context * (sum(int(np.prod(s)) for s in shapes.values()) * np.dtype(dtype).itemsize + 12)
    limit = min(shards.MAX_VALUES // (context * max(int(np.prod(s)), 1)) for s in shapes.values())
    stat = os.stat(onnx_path)
    data_file = onnx_path + ".data"
    job = Job(folder=folder,
              model={"path": onnx_path, "bytes": stat.st_size + (os.path.getsize(data_file)
                                                                 if os.path.isfile(data_file) else 0),
                     "processing": applied, "source": source},
              tokenizer=spec, corpus={"path": _corpus_name(data), "column": column, "split": split},
              seed=seed, context=context, points=chosen, shapes=shapes, dtype=dtype, tokens_requested=tokens,
              windows_per_shard=max(1, min(int(shard_mb * 2**20 // per_window), limit)), batch=batch)
    if previous is not None:
        _check_same(folder, previous, job.identity())
    job.dataset, job.previous = corpus, previous
    return job, step


def _corpus_name(data) -> str:
    path = os.path.expanduser(os.fspath(data))
    return os.path.abspath(path) if os.path.exists(path) else path


def _check_numbers(context, tokens, batch, shard_mb) -> None:
    for name, value, low in (("--context", context, 2), ("--batch", batch, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise BadInputError(f"{name} must be a whole number of at least {low}, got {value!r}")
    if tokens is not None and (not isinstance(tokens, (int, np.integer)) or isinstance(tokens, bool) or tokens < 1):
        raise BadInputError(f"--tokens must be a positive whole number, got {tokens!r}")
    if not isinstance(shard_mb, (int, float)) or isinstance(shard_mb, bool) or not 0 < shard_mb <= MAX_SHARD_MB:
        raise BadInputError(f"--shard-mb must lie in (0, {MAX_SHARD_MB}], got {shard_mb!r}")


def _check_same(folder: str, previous: dict, identity: dict) -> None:
    """A resumed run must be the run that began here."""
    for key, value in identity.items():
        if previous.get(key) != value:
            raise BadInputError(f"{folder}: was collected with {key} {previous.get(key)!r}, not {value!r} "
                                f"({shards.MANIFEST}); rerun with its settings to resume, or give another folder")


def open_folder(job: Job, engine: str) -> dict[int, int]:
    """Create the folder (or take up a previous run's), and return the shards already complete."""
    os.makedirs(job.folder, exist_ok=True)
    shards.remove_leftovers(job.folder)
    done = shards.complete(job.folder)
    shards.write_json(os.path.join(job.folder, shards.MANIFEST), job.manifest(done, engine, finished=False))
    shards.write_info(job.folder, job.features())
    shards.write_state(job.folder, done, job.model["path"])
    return done


def finish(job: Job, engine: str, exhausted: bool) -> dict:
    done = shards.complete(job.folder)
    if exhausted and job.max_windows is not None and sum(done.values()) < job.max_windows:
        job.notes.append(f"the corpus ended after {sum(done.values()) * job.context} tokens, before the "
                         f"{job.tokens_requested} asked for")
    manifest = job.manifest(done, engine, finished=True)
    shards.write_state(job.folder, done, job.model["path"])
    shards.write_json(os.path.join(job.folder, shards.MANIFEST), manifest)
    return manifest


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
