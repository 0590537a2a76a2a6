"""run_with_cache: TransformerLens's view of a model, computed by onnxruntime.

    logits, cache = run_with_cache("smollm2/", "The capital of France is")
    cache["blocks.0.attn.hook_pattern"]    # numpy, [batch, head, query, key]

Every hook point of a model is placed once, into one graph that lists each point as an output
(the points graph: the model's weights stay where they are, read by reference). `lensgraph convert`
writes it into its folder (model.hooks.onnx), so a folder's first call only opens it; for any other
file it is built on the first call and kept in memory. A call's session is that graph cut down to
the points asked for: onnxruntime runs every node of a graph whatever is fetched, so an unrequested
hook would still cost time, and with no points the session runs the plain graph. Sessions are kept
per file, provider and choice of points. Given an InferenceSession, its own outputs are the hooks
on offer.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx

from ..errors import BadInputError
from ..graph import match
from ..graph.heads import layout_record
from ..graph.hookpoints import place
from ..store.model import LensModel, infer_shapes
from ..store.resolve import ModelFiles, resolve
from ..store.runner import FLOAT_TYPES, Runner, config_cache_dims, empty_past, fused_cache_dims
from .activation_cache import ActivationCache
from .hooks import add_hooks, remove_hooks, select
from .points_record import ABOUT_KEY, LAYOUTS_KEY, POINTS_KEY, made_from, sha256_of
from .tokens import prompt

# onnxruntime's basic graph optimisations for run_with_cache's sessions: on SmolLM2-135M a session builds in
# 1.9 s rather than 2.6 s (all optimisations), and runs 128 tokens in the same time (docs/benchmarks.md)
OPTIMIZATION = "ORT_ENABLE_BASIC"
_GRAPHS: dict[str, tuple] = {}  # model path -> (file key, points graph, {point: output}, about)
_SESSIONS: dict[tuple, tuple] = {}


# -- the points graph ---------------------------------------------------------------------------------
def points_graph(path: str, on_request: bool = True) -> tuple[onnx.ModelProto, dict[str, str], dict]:
    """The model at `path` with every placeable hook point as a graph output (without `on_request`, not
    the points added only when named), its weights referenced where they lie (the model's own bytes or
    its data file, in its folder); {point: output}; and `about`: the model's own outputs, the points
    left out, vocabulary, learned positions and KV-cache head sizes."""
    import onnx_ir as ir

    from ..store.safety import open_model

    proto, _ = open_model(path)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, os.path.dirname(os.path.abspath(path)))
    infer_shapes(model)
    lens = LensModel(model, path)
    remove_hooks(lens)  # a file from `lensgraph hooks`: its named copies give way to the points graph's
    return _points_graph(lens, path, sha256_of(path), on_request)


def _points_graph(lens: LensModel, path: str, sha256: str, on_request: bool) -> tuple:
    """`points_graph` of `lens`, the model file `path` (whose contents hash to `sha256`) in memory,
    its weights referencing the file's; `lens` becomes the points graph."""
    import onnx_ir as ir

    model = lens.ir
    own = [v.name for v in model.graph.outputs]
    placement = place(model.graph, model=lens)
    names = list(placement.points) if on_request else select(list(placement.points), None)
    outputs = add_hooks(lens, names, copies=False, placement=placement).outputs if names else {}
    out = ir.serde.serialize_model(model)
    about = {"model": os.path.basename(path), "sha256": sha256, "outputs": own,
             "left_out": [n for n in placement.points if n not in outputs],
             "limits": list(id_limits(placement.anatomy)) if placement.anatomy else [None, None],
             "cache_dims": {**config_cache_dims(path), **fused_cache_dims(out.graph)},  # cache_dims(path), unread
             "placement": {"points": {n: p.found for n, p in placement.points.items()},
                           "unplaced": placement.unplaced}}
    layouts = layout_record(placement.anatomy.attention, placement.layouts) if placement.anatomy else {}
    for key, value in ((POINTS_KEY, outputs), (ABOUT_KEY, about), (LAYOUTS_KEY, layouts)):
        entry = next((p for p in out.metadata_props if p.key == key), None) or out.metadata_props.add(key=key)
        entry.value = json.dumps(value)
    return out, outputs, about


def file_key(model) -> tuple[str, tuple]:
    """(absolute path, a key that changes when the file does)."""
    if not isinstance(model, (str, os.PathLike)):
        raise BadInputError(f"model must be a file path or an onnxruntime InferenceSession, not {type(model).__name__}")
    return _file_key(os.fspath(model))


def save_points(model_path: str, out_path: str, model: LensModel | None = None, written: str | None = None) -> int:
    """Write the points graph of `model_path` beside it (same folder: its weight references stay
    valid), without the points added only when named; returns the number of points. With `model`,
    the model still in memory whose weights read the files it was just written to
    (LensModel.read_written; `written` is that model file, to be published as `model_path`): the
    points are placed on that graph, the one that was written, and `model` becomes the points graph.
    Reading the file back would cost a parse and a deserialisation (about 1 s at 30 layers)."""
    if os.path.dirname(os.path.abspath(out_path)) != os.path.dirname(os.path.abspath(model_path)):
        raise ValueError("a points graph lives beside its model")
    proto, outputs, _ = points_graph(model_path, on_request=False) if model is None else \
        _points_graph(model, model_path, sha256_of(written), on_request=False)
    with open(out_path, "wb") as f:
        f.write(proto.SerializeToString())
    return len(outputs)


def id_limits(anatomy) -> tuple[int | None, int | None]:
    """(vocabulary size, learned positions): the token ids and sequence lengths the model can take."""
    vocab = anatomy.unembed.d_out if anatomy.unembed is not None else None
    table = next((w for w in anatomy.writers if w.role == "pos_embed" and w.node is not None), None)
    shape = match.const_shape(match.back(table.node.inputs[0], {"Identity"})[0]) if table is not None else None
    return vocab, (shape[0] if shape else None)


def _graph(files: ModelFiles, full: bool = False) -> tuple:
    """(points graph, {point: output}, about) for a model: the folder's points graph when it was made
    from this very model file (and holds what is asked for), else one built now, kept per version of
    the file. `full`: also the points added only when named."""
    path, key = _file_key(files.model)
    if path in _GRAPHS and _GRAPHS[path][0] != key:
        for old in [k for k in _SESSIONS if k[0] == path]:
            del _SESSIONS[old]  # the file changed since
        del _GRAPHS[path]
    built = _GRAPHS.setdefault(path, (key, {}))[1]
    if full not in built:
        found = _saved(files, path) if not full else None
        built[full] = found or points_graph(path, on_request=full)
    return built[full]


def _saved(files: ModelFiles, path: str) -> tuple | None:
    """The folder's points graph, if it was made from this model file."""
    if not files.points:
        return None
    from ..store.safety import open_model

    proto, _ = open_model(files.points)  # checked like any model before onnxruntime reads its references
    meta = {p.key: p.value for p in proto.metadata_props}
    try:
        outputs, about = json.loads(meta[POINTS_KEY]), json.loads(meta[ABOUT_KEY])
    except (KeyError, ValueError):
        return None
    return (proto, outputs, about) if made_from(about, path) else None


def _file_key(model: str) -> tuple[str, tuple]:
    path = os.path.abspath(model)
    if not os.path.isfile(path):
        raise BadInputError(f"{model}: no such file")
    stat = os.stat(path)
    return path, (path, stat.st_mtime_ns, stat.st_size)


# -- sessions -------------------------------------------------------------------------------------
def points_session(model, provider: str, points, named: bool = False) -> tuple:
    """(session, {point: graph output}, about) for the chosen points (globs; None: all but those added
    only when named). With `named`, each point's output carries the point's name."""
    files = resolve(model)
    proto, outputs, about = _graph(files)
    names = select(list(outputs) + about["left_out"], points)
    if any(n not in outputs for n in names):
        proto, outputs, about = _graph(files, full=True)
    key = (os.path.abspath(files.model), provider, tuple(names), named)
    if key not in _SESSIONS:
        if named or len(names) < len(outputs):
            proto, held = _cut(proto, about["outputs"], {n: outputs[n] for n in names}, named)
        else:
            held = dict(outputs)
        runner = Runner(proto, provider, label=files.given, cache_dims=about["cache_dims"], data_folder=files.folder,
                        optimization=OPTIMIZATION)
        _SESSIONS[key] = (runner.session, held, about)
    return _SESSIONS[key]


def session(model, provider: str = "CPUExecutionProvider", points=None):
    """The onnxruntime session for a model with the chosen hook outputs (globs; None: all), each
    output named as its point."""
    return points_session(model, provider, points, named=True)[0]


def _cut(proto: onnx.ModelProto, own: list[str], held: dict[str, str], named: bool) -> tuple:
    """The points graph with only the model's own outputs and the held points': every node that feeds
    neither is dropped. With `named`, a point held in a tensor of another name gets an Identity
    output under its own name."""
    cut = onnx.ModelProto()
    cut.CopyFrom(proto)
    graph = cut.graph
    types = {v.name: v for v in graph.output}
    if named:
        for point, out in held.items():
            if out != point:
                graph.node.append(onnx.helper.make_node("Identity", [out], [point], name=point))
                types[point] = onnx.ValueInfoProto()
                types[point].CopyFrom(types[out])
                types[point].name = point
        held = {p: p for p in held}
    keep = list(own) + [o for o in dict.fromkeys(held.values()) if o not in own]
    del graph.output[:]
    graph.output.extend(types[o] for o in keep)
    producers = {out: node for node in graph.node for out in node.output}
    needed, stack, live = set(), list(keep), set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producers.get(name)
        if node is not None and id(node) not in live:
            live.add(id(node))
            stack.extend(i for i in node.input if i)
            for attr in node.attribute:  # a subgraph reads names of the outer graph
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    stack.extend(i for n in sub.node for i in n.input if i)
    order = [n for n in graph.node if id(n) in live]
    del graph.node[:]
    graph.node.extend(order)
    kept = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return cut, held


# -- run_with_cache ---------------------------------------------------------------------------------
def run_with_cache(model, tokens, attention_mask=None, points=None, provider: str = "CPUExecutionProvider",
                   prepend_bos: bool | None = None, padding_side: str = "right"):
    """Logits and an ActivationCache (a dict of hook-point activations, numpy, named as TransformerLens
    names them, with TransformerLens's cache helpers).

    `model` is a folder `lensgraph convert` wrote, an onnxruntime-genai folder, an ONNX file or an
    onnxruntime InferenceSession. `tokens` is text (a string, or a list of strings padded on the right
    as TransformerLens pads them, with the mask zeroing the pads; BOS prepended unless `prepend_bos`
    is False) or token ids, [batch, pos] or [pos]. `points` are globs over the hook names (None: every
    point; []: none). A graph with a KV cache runs its first step: the past is empty.
    """
    import onnxruntime as ort

    if padding_side != "right":
        raise BadInputError("run_with_cache pads on the right: the exported graph takes each position from its "
                            "place in the sequence, not from the mask, so left padding would shift them")
    if isinstance(model, ort.InferenceSession):
        if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)):
            raise BadInputError("text needs a model folder's tokenizer: give the folder, not a session")
        sess, limits, dims_known, ids, mask = model, (None, None), {}, tokens, attention_mask
        outputs = [o.name for o in sess.get_outputs()]
        held = {n: n for n in select([n for n in outputs if is_point(n)], points)}
    else:
        given = prompt(model, tokens, prepend_bos)
        ids, mask = given.ids, attention_mask if attention_mask is not None else given.attention_mask
        sess, held, about = points_session(model, provider, points)
        limits, dims_known = tuple(about["limits"]), about["cache_dims"]
        outputs = [o.name for o in sess.get_outputs()]
    logits = "logits" if "logits" in outputs else outputs[0]
    fetch = [logits] + [n for n in dict.fromkeys(held.values()) if n != logits]
    feeds = model_feeds(sess.get_inputs(), token_ids(ids, *limits), mask, dims_known)
    values = dict(zip(fetch, _run(sess, fetch, feeds)))
    return values[logits], ActivationCache({point: values[out] for point, out in held.items()},
                                           None if isinstance(model, ort.InferenceSession) else resolve(model).model)


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
