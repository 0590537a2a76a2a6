"""run_with_cache: TransformerLens's view of a model, computed by onnxruntime.

    logits, cache = run_with_cache("gpt2.lens.onnx", input_ids)
    cache["blocks.0.attn.hook_pattern"]    # numpy, [batch, head, query, key]

Given a model file, the session is built with exactly the hook outputs asked for (any
earlier hook outputs of the file are replaced): onnxruntime's inference builds run every
node of a graph whatever is fetched, so an unrequested hook would still cost time, and
with no hooks requested the session runs the plain graph. Sessions are kept per file,
provider and choice of points, so repeated calls pay for loading once. Given an
InferenceSession, its own outputs are the hooks on offer.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import BadInputError
from ..graph import match
from ..graph.hookpoints import place
from ..store.model import LensModel
from ..store.runner import FLOAT_TYPES, Runner, cache_dims, empty_past
from .activation_cache import ActivationCache
from .hooks import add_hooks, remove_hooks, select

_FILES: dict[str, tuple] = {}  # path -> (file key, placeable points, id limits, KV-cache head sizes)
_SESSIONS: dict[tuple, object] = {}


def session(model: str | os.PathLike, provider: str = "CPUExecutionProvider", points=None):
    """The onnxruntime session for a model file with the chosen hook outputs (globs; None: all),
    each output named as its point."""
    return _session(model, provider, points, copies=True)[0]


def _session(model, provider: str, points, copies: bool) -> tuple:
    """(session, {point: graph output}); without `copies`, a point that is a tensor of the graph
    is fetched as that tensor (see hooks.add_hooks)."""
    path, key = file_key(model)
    names = select(_points(path, key), points)
    skey = key + (provider, tuple(names), copies)
    if skey not in _SESSIONS:
        for old in [k for k in _SESSIONS if k[0] == path and k[:len(key)] != key]:
            del _SESSIONS[old]  # the file changed since
        _SESSIONS[skey] = _open(path, provider, names, copies)
    return _SESSIONS[skey]


def file_key(model) -> tuple[str, tuple]:
    """(absolute path, a key that changes when the file does)."""
    if not isinstance(model, (str, os.PathLike)):
        raise BadInputError(f"model must be a file path or an onnxruntime InferenceSession, not {type(model).__name__}")
    path = os.path.abspath(os.fspath(model))
    if not os.path.isfile(path):
        raise BadInputError(f"{path}: no such file")
    stat = os.stat(path)
    return path, (path, stat.st_mtime_ns, stat.st_size)


def _points(path: str, key: tuple) -> list[str]:
    """Every hook point the anatomy can place in this file (worked out once per file)."""
    if path not in _FILES or _FILES[path][0] != key:
        model = LensModel.load(path)
        remove_hooks(model)
        placement = place(model.graph, model=model)
        _FILES[path] = (key, list(placement.points), id_limits(placement.anatomy), cache_dims(path))
    return _FILES[path][1]


def id_limits(anatomy) -> tuple[int | None, int | None]:
    """(vocabulary size, learned positions): the token ids and sequence lengths the model can take."""
    vocab = anatomy.unembed.d_out if anatomy.unembed is not None else None
    table = next((w for w in anatomy.writers if w.role == "pos_embed" and w.node is not None), None)
    shape = match.const_shape(match.back(table.node.inputs[0], {"Identity"})[0]) if table is not None else None
    return vocab, (shape[0] if shape else None)


def _open(path: str, provider: str, names: list[str], copies: bool) -> tuple:
    model = LensModel.load(path)
    report = add_hooks(model, names, copies=copies)
    return Runner(model, provider, label=path).session, report.outputs


def run_with_cache(model, input_ids, attention_mask=None, points=None, provider: str = "CPUExecutionProvider"):
    """Logits and an ActivationCache (a dict of hook-point activations, numpy, named as TransformerLens
    names them, with TransformerLens's cache helpers).

    `model` is a path or an onnxruntime InferenceSession; `input_ids` is [batch, pos] (or
    [pos]); `points` are globs over the hook names (None: every point; []: none). A graph
    with a KV cache runs its first step: the past is empty.
    """
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        sess, path = model, None
        limits, dims_known = (None, None), {}
        outputs = [o.name for o in sess.get_outputs()]
        held = {n: n for n in select([n for n in outputs if is_point(n)], points)}
    else:
        sess, held = _session(model, provider, points, copies=False)
        path = file_key(model)[0]
        _, _, limits, dims_known = _FILES[path]
        outputs = [o.name for o in sess.get_outputs()]
    logits = "logits" if "logits" in outputs else outputs[0]
    fetch = [logits] + [n for n in dict.fromkeys(held.values()) if n != logits]
    feeds = model_feeds(sess.get_inputs(), token_ids(input_ids, *limits), attention_mask, dims_known)
    values = dict(zip(fetch, _run(sess, fetch, feeds)))
    return values[logits], ActivationCache({point: values[out] for point, out in held.items()}, path)


def _run(sess, names: list[str], feeds: dict) -> list[np.ndarray]:
    """The outputs as numpy arrays over onnxruntime's own buffers (each array keeps its buffer
    alive), which saves copying every activation once more."""
    import onnxruntime as ort

    inputs = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
    return [v.numpy() for v in sess.run_with_ort_values(names, inputs)]


def is_point(name: str) -> bool:
    """Whether a graph output is a hook point (named as TransformerLens names them)."""
    return name.startswith(("hook_", "blocks.", "ln_final."))


def token_ids(input_ids, vocab: int | None, positions: int | None) -> np.ndarray:
    """The token ids as [batch, pos], refused where the model cannot take them (onnxruntime would
    read a wrapped-around row for a negative id, or fail somewhere inside)."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise BadInputError(f"input_ids must be integers shaped [batch, pos], got {ids.dtype} {list(ids.shape)}")
    if ids.size == 0:
        raise BadInputError(f"input_ids is empty ({list(ids.shape)}): give at least one token")
    if ids.min() < 0 or (vocab is not None and ids.max() >= vocab):
        raise BadInputError(f"input_ids must lie in 0..{vocab - 1 if vocab else 'vocab - 1'}, got "
                            f"{int(ids.min())}..{int(ids.max())}")
    if positions is not None and ids.shape[1] > positions:
        raise BadInputError(f"{ids.shape[1]} tokens are more than the model's {positions} learned positions")
    return ids


def model_feeds(inputs, ids: np.ndarray, attention_mask, dims_known: dict) -> dict:
    """Values for a transformer graph's onnxruntime inputs: the ids, a mask, positions, an empty past."""
    feeds = {}
    for inp in inputs:
        dtype = np.int32 if inp.type == "tensor(int32)" else np.int64
        if "past" in inp.name and inp.type in FLOAT_TYPES:  # a KV-cache graph at its first step: an empty past
            feeds[inp.name] = empty_past(inp, ids.shape[0], dims_known, "run_with_cache")
        elif "mask" in inp.name:
            mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
            feeds[inp.name] = mask.reshape(ids.shape).astype(dtype)
        elif "position" in inp.name:
            feeds[inp.name] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).astype(dtype)
        else:
            feeds[inp.name] = ids.astype(dtype)
    return feeds
