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


def remove_leftovers(folder: str) -> None:
    """Hidden shards a killed run was writing: never complete, so never kept."""
    for name in os.listdir(folder):
        if name.startswith(".data-") and name.endswith(".tmp"):
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
        if os.listdir(folder):
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
    """The activations `collect` wrote, streamed back as dicts of numpy arrays: one key per point
    ([batch, context, d]), `tokens` ([batch, context] int32) and `window` (each row's window index)."""
    from .corpus import _datasets

    datasets = _datasets()
    folder = os.fspath(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise BadInputError(f"{folder}: no activations here (no {MANIFEST})")
    wanted = manifest["points"] if points is None else [points] if isinstance(points, str) else list(points)
    unknown = [p for p in wanted if p not in manifest["points"]]
    if unknown:
        raise BadInputError(f"{folder}: holds no {', '.join(unknown)} (points: {', '.join(manifest['points'])})")
    if not complete(folder):
        return iter(())
    ds = datasets.load_from_disk(folder).select_columns(wanted + [TOKENS, WINDOW]).with_format("numpy")
    return _batches(ds, wanted, batch_size)


def _batches(ds, wanted: list[str], batch_size: int):
    for batch in ds.iter(batch_size=batch_size):
        out = {p: batch[p] for p in wanted}
        out["tokens"] = batch[TOKENS].astype(np.int32)
        out[WINDOW] = batch[WINDOW]
        yield out
