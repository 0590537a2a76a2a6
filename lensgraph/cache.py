"""run_with_cache: TransformerLens's view of a model, computed by onnxruntime.

    logits, cache = run_with_cache("gpt2.lens.onnx", input_ids)
    cache["blocks.0.attn.hook_pattern"]    # numpy, [batch, head, query, key]

A model file without hook outputs gets them in memory (every point the anatomy can
place); one that has them (`lensgraph hooks`) is run as it is. Sessions are kept per
file and provider, so repeated calls pay for loading once. Only the outputs asked for
are computed: runs set `only_execute_path_to_fetches`.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import BadInputError
from .hooks import select

_SESSIONS: dict[tuple, object] = {}


def session(model: str | os.PathLike, provider: str = "CPUExecutionProvider"):
    """The onnxruntime session for a model file, with hook outputs, made once per file and provider."""
    path = os.path.abspath(os.fspath(model))
    if not os.path.isfile(path):
        raise BadInputError(f"{path}: no such file")
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size, provider)
    if key not in _SESSIONS:
        for old in [k for k in _SESSIONS if k[0] == path and k[3] == provider]:
            del _SESSIONS[old]  # the file changed
        _SESSIONS[key] = _open(path, provider)
    return _SESSIONS[key]


def _open(path: str, provider: str):
    from .hooks import add_hooks, hook_names
    from .model import LensModel
    from .verify import Runner

    model = LensModel.load(path)
    if hook_names(model):
        return Runner(path, provider, label=path).session
    add_hooks(model)
    return Runner(model, provider, label=path).session


def run_with_cache(model, input_ids, attention_mask=None, points=None, provider: str = "CPUExecutionProvider"):
    """Logits and a dict of hook-point activations (numpy), as TransformerLens names them.

    `model` is a path or an onnxruntime InferenceSession; `input_ids` is [batch, pos] (or
    [pos]); `points` are globs over the hook names (default: all the model has).
    """
    import onnxruntime as ort

    sess = model if isinstance(model, ort.InferenceSession) else session(model, provider)
    outputs = [o.name for o in sess.get_outputs()]
    logits = "logits" if "logits" in outputs else outputs[0]
    hooks = [n for n in outputs if n != logits]
    wanted = select(hooks, points) if hooks else []
    if points and not hooks:
        raise BadInputError("the model has no hook outputs; give its path, or add them with `lensgraph hooks`")
    feeds = _feeds(sess, input_ids, attention_mask)
    options = ort.RunOptions()
    options.only_execute_path_to_fetches = True
    values = sess.run([logits] + wanted, feeds, options)
    return values[0], dict(zip(wanted, values[1:]))


def _feeds(sess, input_ids, attention_mask) -> dict:
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise BadInputError(f"input_ids must be integers shaped [batch, pos], got {ids.dtype} {list(ids.shape)}")
    feeds = {}
    for inp in sess.get_inputs():
        dtype = np.int32 if inp.type == "tensor(int32)" else np.int64
        if "mask" in inp.name:
            mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
            feeds[inp.name] = mask.reshape(ids.shape).astype(dtype)
        elif "position" in inp.name:
            feeds[inp.name] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).astype(dtype)
        else:
            feeds[inp.name] = ids.astype(dtype)
    return feeds
