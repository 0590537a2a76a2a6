"""The activations folder `collect` writes, and reading it back.

It is the layout of SAELens's activation cache, a `datasets` folder, so `datasets.load_from_disk`
opens it and SAELens trains from it with `cached_activations_path`:

    ACTS/
      data-00000.arrow ...   one shard each, Arrow IPC streams as `datasets` writes them: a column per
                             hook point of [context, d] rows (Array2D), `token_ids` [context] int32,
                             and `window`, each row's window index in the run
      dataset_info.json      the columns' types
      state.json             the shards complete so far, in order (rewritten after each shard)
      collect.json           the manifest: model, processing, tokenizer, corpus, points, dtype,
                             context, shard size, and how far the run got

A shard is written under a hidden name, flushed to disk and renamed: a file under its final name
is complete, whatever killed the run. That is the whole resume state: a rerun of the same
command skips the shards that exist and makes the others.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import tempfile

import numpy as np

from ..errors import BadInputError, LensError

MANIFEST = "collect.json"
STATE, INFO = "state.json", "dataset_info.json"
TOKENS, WINDOW = "token_ids", "window"
FORMAT = "lensgraph.collect/1"
SHARD = re.compile(r"^data-(\d{5,})\.arrow$")
MAX_VALUES = 2**31 - 1  # Arrow's 32-bit list offsets bound the values of one column in one shard


def shard_name(k: int) -> str:
    return f"data-{k:05d}.arrow"


def features(shapes: dict[str, list[int]], context: int, dtype: str):
    """The columns: each point's [context, d] rows (its per-position shape flattened, as SAELens
    stores hook_z), the token ids and the window index."""
    from datasets import Array2D, Features, Sequence, Value

    cols = {p: Array2D(shape=(context, int(np.prod(s))), dtype=dtype) for p, s in shapes.items()}
    cols[TOKENS] = Sequence(Value("int32"), length=context)
    cols[WINDOW] = Value("int64")
    return Features(cols)


def _rows2d(values: np.ndarray, arrow_type):
    """[n, context, d] as datasets' Array2D column, over the array's own memory."""
    import pyarrow as pa

    n, context, d = values.shape
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, n * context * d + 1, d, dtype=np.int32)), flat)
    outer = pa.ListArray.from_arrays(pa.array(np.arange(0, n * context + 1, context, dtype=np.int32)), inner)
    return pa.ExtensionArray.from_storage(arrow_type, outer)


def write_shard(folder: str, k: int, arrays: dict[str, np.ndarray], tokens: np.ndarray, first: int, feats) -> str:
    """Shard k, complete or not at all: written under a hidden name, flushed, then renamed."""
    import pyarrow as pa

    schema = feats.arrow_schema
    n, context = tokens.shape
    columns = [_rows2d(arrays[name].reshape(n, context, -1), schema.field(name).type) for name in arrays]
    columns.append(pa.FixedSizeListArray.from_arrays(pa.array(tokens.astype(np.int32).reshape(-1)), context))
    columns.append(pa.array(np.arange(first, first + n, dtype=np.int64)))
    batch = pa.record_batch(columns, schema=schema)
    final = os.path.join(folder, shard_name(k))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{shard_name(k)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            with pa.ipc.new_stream(f, schema) as writer:
                writer.write_batch(batch)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as exc:
        _unlink(tmp)
        done = len(complete(folder))
        hint = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "fix the cause"
        raise LensError(f"{folder}: cannot write shard {k} ({exc.strerror or exc}); the {done} complete shards are "
                        f"kept: {hint} and rerun the same command to continue") from exc
    except BaseException:
        _unlink(tmp)
        raise
    return final


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def complete(folder: str) -> dict[int, int]:
    """{shard index: rows} of the shards under their final names (each is complete)."""
    import pyarrow as pa

    found = {}
    for name in os.listdir(folder):
        m = SHARD.match(name)
        if m:
            with pa.memory_map(os.path.join(folder, name)) as source:
                found[int(m.group(1))] = sum(b.num_rows for b in pa.ipc.open_stream(source))
    return dict(sorted(found.items()))


def _leftover(name: str) -> bool:
    """A hidden file a killed run was writing (a shard, state.json, ...): never complete."""
    return name.startswith((".data-", f".{STATE}.", f".{INFO}.", f".{MANIFEST}.")) and name.endswith(".tmp")


def remove_leftovers(folder: str) -> None:
    for name in os.listdir(folder):
        if _leftover(name):
            _unlink(os.path.join(folder, name))


def write_json(path: str, obj: dict) -> None:
    write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_bytes(path: str, data: bytes) -> None:
    """A small file, complete or not at all."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _unlink(tmp)
        raise LensError(f"{path}: cannot write it ({exc.strerror or exc}); the complete shards are kept") from exc


def write_info(folder: str, feats) -> None:
    from datasets import DatasetInfo

    buf = io.BytesIO()
    DatasetInfo(features=feats)._dump_info(buf)
    write_bytes(os.path.join(folder, INFO), buf.getvalue())


def write_state(folder: str, shards, identity: str) -> None:
    """state.json: the complete shards in order, so that load_from_disk opens them at any moment."""
    names = [shard_name(k) for k in sorted(shards)]
    fingerprint = hashlib.sha256(json.dumps([identity, names]).encode()).hexdigest()[:16]
    write_json(os.path.join(folder, STATE), {
        "_data_files": [{"filename": n} for n in names], "_fingerprint": fingerprint, "_format_columns": None,
        "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None})


def read_manifest(folder: str) -> dict | None:
    """The manifest of a previous run into `folder`, None for an empty or new folder; any other
    content is refused (nothing of it is touched)."""
    folder = os.path.abspath(folder)
    if os.path.islink(folder):
        raise BadInputError(f"{folder}: is a symbolic link; refusing to write through it")
    if not os.path.exists(folder):
        return None
    if not os.path.isdir(folder):
        raise BadInputError(f"{folder}: exists and is not a folder; give a folder for the activations")
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        if [n for n in os.listdir(folder) if not _leftover(n)]:  # a run killed before its manifest: a new folder
            raise BadInputError(f"{folder}: holds other files and no {MANIFEST}; give an empty or new folder")
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: unreadable ({exc}); give another folder") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadInputError(f"{path}: not a manifest lensgraph collect wrote; give another folder")
    return manifest


def load_activations(folder, points=None, batch_size: int = 64):
    """The activations `collect` wrote, streamed back shard by shard in the run's order as dicts of
    numpy arrays in their stored dtype: one key per point ([rows, context, d]), `tokens` ([rows,
    context] int32) and `window` (each row's window index); at most `batch_size` rows a dict."""
    folder = os.fspath(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise BadInputError(f"{folder}: no activations here (no {MANIFEST})")
    wanted = manifest["points"] if points is None else [points] if isinstance(points, str) else list(points)
    unknown = [p for p in wanted if p not in manifest["points"]]
    if unknown:
        raise BadInputError(f"{folder}: holds no {', '.join(unknown)} (points: {', '.join(manifest['points'])})")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise BadInputError(f"batch_size must be a positive whole number, got {batch_size!r}")
    return _batches(folder, sorted(complete(folder)), wanted, manifest["context"], batch_size)


def _batches(folder: str, order: list[int], wanted: list[str], context: int, batch_size: int):
    import pyarrow as pa

    for k in order:
        with pa.memory_map(os.path.join(folder, shard_name(k))) as source:
            table = pa.ipc.open_stream(source).read_all()
        columns = {p: _values(table.column(p), context) for p in wanted}
        columns["tokens"] = table.column(TOKENS).combine_chunks().flatten().to_numpy().reshape(-1, context)
        columns[WINDOW] = table.column(WINDOW).to_numpy()
        for start in range(0, table.num_rows, batch_size):
            yield {key: value[start:start + batch_size] for key, value in columns.items()}


def _values(column, context: int) -> np.ndarray:
    """An Array2D column as [rows, context, d], over the file's memory."""
    storage = column.combine_chunks().storage
    flat = storage.flatten().flatten().to_numpy()
    return flat.reshape(len(storage), context, -1)
