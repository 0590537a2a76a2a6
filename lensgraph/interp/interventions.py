"""Changing what flows through a model at its hook points, the way TransformerLens does it.

    logits = run_with_hooks("gpt2.lens.onnx", ids, fwd_hooks=[("blocks.0.attn.hook_z", zero_head_3)])
    logits = run_with_interventions("gpt2.lens.onnx", ids, [ablate("blocks.0.attn.hook_z", heads=[3]),
                                                            add("blocks.6.hook_resid_post", vector, coeff=4.0)])

A hook function gets the point's value (numpy, TransformerLens's shape) and a `HookPoint` with
its name, and returns the replacement (or None to keep it, changed in place or not).
Declarative interventions (`ablate`, `patch`, `add`) are arrays fed to the inputs the cut
compiled at their points (interp/intervene.py), so a loop that changes them reuses one session,
and `rows=` gives different rows of one batch different interventions. Sessions are kept per
file, provider and choice of points (the MAX_ENGINES most recently used choices).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..errors import BadInputError
from ..graph.hookpoints import place
from ..graph.unfuse import unfuse_skip_norms
from ..store.resolve import resolve
from ..store.model import LensModel
from ..store.runner import Runner, cache_dims
from .activation_cache import ActivationCache
from .cache import OPTIMIZATION, file_key, id_limits, model_feeds, token_ids
from .hooks import remove_hooks, select
from .tokens import prompt
from .intervene import Site, compile_points, freeze, input_name, piece, rebind, segments

_BASES: dict[str, tuple] = {}  # path -> (file key, the model without hooks, its placement)
_ENGINES: OrderedDict[tuple, "_Engine"] = OrderedDict()  # most recently used last
MAX_ENGINES = 8  # each holds sessions over the model's weights: older ones are dropped
_CACHE_DIMS: dict[str, tuple] = {}  # path -> (file key, KV-cache head sizes)
_DIMS: dict[tuple, tuple] = {}  # (file key, point) -> its measured shape


class HookPoint:
    """What a hook function gets beside the activation: the point's name (TransformerLens's HookPoint)."""

    def __init__(self, name: str):
        self.name = name

    def layer(self) -> int:
        m = re.match(r"blocks\.(\d+)\.", self.name)
        if m is None:
            raise ValueError(f"{self.name} is not in a block")
        return int(m.group(1))

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r})"


# -- declarative interventions ---------------------------------------------------------------
@dataclass
class Intervention:
    """A change at one point (or every point a glob matches): replace where `mask` holds, then add."""

    point: str
    kind: str  # "ablate" | "patch" | "add"
    heads: object = None
    neurons: object = None
    positions: object = None
    rows: object = None
    value: object = "zero"  # ablate: "zero" | "mean" | an array
    values: object = None  # patch: the replacement
    vector: object = None  # add: the vector
    coeff: float = 1.0
    over: object = None  # ablate "mean": token ids to average over (default: the call's own)

    def needs_mean(self) -> bool:
        return self.kind == "ablate" and isinstance(self.value, str) and self.value == "mean"


def ablate(point: str, heads=None, neurons=None, value="zero", positions=None, rows=None, over=None) -> Intervention:
    """Replace the point (only `heads` of a head point, `neurons` of an MLP point; `positions`, `rows`
    of the batch) with zero, its mean over the batch and positions (of `over`, default the same
    input, without interventions), or the given array."""
    if not (isinstance(value, str) and value in ("zero", "mean")) and not isinstance(value, (np.ndarray, list, tuple,
                                                                                            float, int)):
        raise BadInputError(f"ablate {point}: value must be 'zero', 'mean' or an array, not {value!r}")
    return Intervention(point, "ablate", heads=heads, neurons=neurons, positions=positions, rows=rows, value=value,
                        over=over)


def patch(point: str, values, positions=None, heads=None, rows=None) -> Intervention:
    """Replace the point with `values` (TransformerLens's shape, or broadcastable to it: another
    run's activation) at `positions` (default all) and `heads` (default all) of `rows`."""
    if values is None:
        raise BadInputError(f"patch {point}: give the values to patch in")
    return Intervention(point, "patch", heads=heads, positions=positions, rows=rows, values=values)


def add(point: str, vector, coeff: float = 1.0, positions="all", rows=None) -> Intervention:
    """Add `coeff * vector` (a steering vector, [d]) at `positions` (default every one) of `rows`."""
    if isinstance(coeff, bool) or not isinstance(coeff, (int, float, np.floating, np.integer)) or not np.isfinite(coeff):
        raise BadInputError(f"add {point}: coeff must be a finite number, not {coeff!r}")
    return Intervention(point, "add", positions=positions, rows=rows, vector=vector, coeff=float(coeff))


def _index(what: str, point: str, given, size: int | None, allow_negative: bool = False) -> np.ndarray | None:
    """A boolean vector over an axis of `size`, True at the given indices (None: every one)."""
    if given is None or (isinstance(given, str) and given == "all"):
        return None
    if size is None:
        raise BadInputError(f"{point}: the size of its {what} axis is not known from the graph")
    items = [given] if isinstance(given, (int, np.integer)) else given
    if isinstance(items, slice):
        items = range(size)[items]
    try:
        idx = np.asarray(list(items))
    except TypeError:
        raise BadInputError(f"{point}: {what} must be an index or a list of indices, not {given!r}") from None
    if idx.size == 0:  # none chosen: the change applies nowhere
        return np.zeros(size, bool)
    if not np.issubdtype(idx.dtype, np.integer) or idx.dtype == bool:
        raise BadInputError(f"{point}: {what} must be whole-number indices, not {given!r}")
    low = -size if allow_negative else 0
    bad = idx[(idx < low) | (idx >= size)]
    if bad.size:
        raise BadInputError(f"{point}: {what} {int(bad[0])} is out of range (the point has {size})")
    out = np.zeros(size, bool)
    out[idx % size] = True
    return out


def _full_shape(site: Site, batch: int, pos: int) -> tuple:
    """The point's shape in this call: batch and positions filled in (a pattern's query and key too)."""
    shape = list(site.dims)
    shape[0] = batch
    for axis in (2, 3) if site.pos_axis == 2 else (1,):
        shape[axis] = pos
    return tuple(shape)


def arrays(iv: Intervention, site: Site, batch: int, pos: int, mean: np.ndarray | None) -> tuple:
    """(mask, values, add) for one intervention at one site, each broadcastable to the point."""
    point, shape = site.point, _full_shape(site, batch, pos)
    axes = [np.ones(1, bool)] * site.rank
    for what, given, axis, negative in (("row", iv.rows, 0, False), ("position", iv.positions, site.pos_axis, True),
                                        ("head", iv.heads, site.head_axis, False),
                                        ("neuron", iv.neurons, site.rank - 1 if iv.neurons is not None else None,
                                         False)):
        if given is None or (isinstance(given, str) and given == "all"):
            continue
        if axis is None:
            raise BadInputError(f"{point}: has no {what} axis to choose {what}s on")
        if what == "neuron" and site.head_axis is not None:
            raise BadInputError(f"{point}: neurons are chosen on MLP and stream points, not head points")
        found = _index(what + "s" if what != "neuron" else "neuron", point, given, shape[axis], negative)
        axes[axis] = found
    mask = np.ones((1,) * site.rank, bool)
    for axis, vec in enumerate(axes):
        mask = mask & vec.reshape([-1 if a == axis else 1 for a in range(site.rank)])
    dtype = site.dtype
    if iv.kind == "add":
        vector = _finite(point, "the vector", iv.vector, dtype)
        width = shape[-1]
        if vector.ndim != 1 or (width is not None and vector.shape[0] != width):
            raise BadInputError(f"{point}: the vector is {list(vector.shape)}, the point is {width} wide")
        return None, None, np.where(mask, vector * dtype.type(iv.coeff), dtype.type(0))
    if iv.kind == "ablate":
        if isinstance(iv.value, str):
            values = np.zeros((1,) * site.rank, dtype) if iv.value == "zero" else mean
        else:
            values = _finite(point, "the ablation value", iv.value, dtype)
    else:
        values = np.asarray(iv.values)
        if not np.issubdtype(values.dtype, np.floating) or np.isnan(values).any():
            raise BadInputError(f"{point}: the patch values must be floats without NaN")
        values = values.astype(dtype, copy=False)
    try:
        np.broadcast_shapes(values.shape, tuple(1 if d is None else d for d in shape))
    except ValueError:
        raise BadInputError(f"{point}: values shaped {list(values.shape)} do not fit the point's "
                            f"{['?' if d is None else d for d in shape]}") from None
    return mask, values, None


def _finite(point: str, what: str, array, dtype) -> np.ndarray:
    a = np.asarray(array)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)) or a.dtype == bool:
        raise BadInputError(f"{point}: {what} must be numbers, not {a.dtype}")
    if not np.isfinite(a).all():
        raise BadInputError(f"{point}: {what} has non-finite entries")
    return a.astype(dtype)


def combine(parts: list[tuple], rank: int, dtype) -> dict[str, np.ndarray]:
    """Several changes at one point, in order, as one (mask, values, add): a replacement after an
    add undoes the add where it replaces."""
    mask = np.zeros((1,) * rank, bool)
    values = np.zeros((1,) * rank, dtype)
    total = np.zeros((1,) * rank, dtype)
    for m, v, a in parts:
        if m is not None:
            values = np.where(m, v, values)
            total = np.where(m, dtype.type(0), total)
            mask = mask | m
        if a is not None:
            total = total + a
    out = {"mask": mask, "values": values.astype(dtype, copy=False), "add": total.astype(dtype, copy=False)}
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# -- engines: the compiled model's pieces and their sessions -----------------------------------
class _Engine:
    def __init__(self, path: str, key: tuple, provider: str, sites: tuple, hooked: tuple, cache: tuple):
        model, placement = _fresh(path, key)
        compiled = compile_points(model, placement, list(sites), seen=hooked, cache=cache)
        self.sites = compiled.sites
        self.hooked = [s for name, s in compiled.sites.items() if name in hooked]
        proto = ir.serde.serialize_model(model.ir)
        _measure_dims(path, key, provider, self.sites, proto)
        del model
        outputs = [o.name for o in proto.graph.output]
        self.logits = "logits" if "logits" in outputs else outputs[0]
        self.cache = list(cache)
        self.pieces = []
        for piece in segments(proto, self.hooked):
            session = Runner(piece.proto, provider, label=path, optimization=OPTIMIZATION).session
            overridable = {o.name for o in session.get_overridable_initializers()}
            inputs = [i for i in session.get_inputs() if i.name not in piece.replaced]
            self.pieces.append((session, piece, inputs, overridable))

    def run(self, ids, attention_mask, dims_known, parts: dict, hooks: dict) -> tuple[np.ndarray, dict]:
        replaced, values = {}, {}
        for i, (session, piece, inputs, overridable) in enumerate(self.pieces):
            feeds = model_feeds(inputs, ids, attention_mask, dims_known)
            feeds.update({name: replaced[name] for name in piece.replaced})
            feeds.update({k: v for k, v in parts.items() if k in overridable})
            values.update(zip(piece.outputs, session.run(piece.outputs, feeds)))
            if i < len(self.hooked):
                site = self.hooked[i]
                replaced[site.changed] = _call_hooks(site, values.pop(site.seen), hooks[site.point])
        return values[self.logits], {p: values[p] for p in self.cache}


def _base(path: str, key: tuple):
    """(the model without hooks and with its fused norms split, its placement), once per file."""
    if path not in _BASES or _BASES[path][0] != key:
        model = LensModel.load(path)
        remove_hooks(model)
        unfuse_skip_norms(model.graph)  # the stream a fused norm sums inside becomes a tensor to change
        _BASES[path] = (key, model, place(model.graph, model=model))
    return _BASES[path][1:]


def _fresh(path: str, key: tuple) -> tuple[LensModel, object]:
    """A copy of the model (tensors shared) and its placement, to cut."""
    base, placement = _base(path, key)
    model = LensModel(base.ir.clone(deep_copy=True), path)
    return model, rebind(placement, model.graph)


def _facts(model):
    """(path, file key, every point's name, the placed points, id limits, KV-cache head sizes)."""
    path, key = file_key(resolve(model).model)
    base, placement = _base(path, key)
    if path not in _CACHE_DIMS or _CACHE_DIMS[path][0] != key:
        _CACHE_DIMS[path] = (key, cache_dims(path))
    return path, key, placement.names, list(placement.points), id_limits(placement.anatomy), _CACHE_DIMS[path][1]


def _measure_dims(path: str, key: tuple, provider: str, sites: dict[str, Site], proto) -> None:
    """Fill in the sizes the graph declares only symbolically (heads in most exports), read off one
    two-token run of the part of the cut graph that computes those points (once per file and point)."""
    unknown = [s for s in sites.values() if any(d is None for a, d in enumerate(s.dims) if a not in _free_axes(s))]
    todo = [s for s in unknown if (key, s.point) not in _DIMS]
    if todo:
        part = piece(proto, list(dict.fromkeys(s.view for s in todo)))
        session = Runner(part.proto, provider, label=path, optimization=OPTIMIZATION).session
        ids = np.zeros((1, 2), np.int64)
        values = dict(zip(part.outputs, session.run(part.outputs, model_feeds(session.get_inputs(), ids, None,
                                                                               _facts(path)[5]))))
        for s in todo:
            _DIMS[(key, s.point)] = values[s.view].shape
    for site in unknown:
        shape = _DIMS[(key, site.point)]
        site.dims = tuple(None if a in _free_axes(site) else int(d) for a, d in enumerate(shape))


def _free_axes(site: Site) -> tuple:
    """The axes whose size each call chooses: batch and positions (a pattern's query and key)."""
    return (0, 2, 3) if site.pos_axis == 2 else (0, 1)


def _call_hooks(site: Site, x: np.ndarray, fns: list) -> np.ndarray:
    hook = HookPoint(site.point)
    for fn in fns:
        out = fn(x, hook=hook)
        if out is None:
            continue
        if not isinstance(out, np.ndarray):
            out = np.asarray(out) if not hasattr(out, "numpy") else out.numpy()
        if out.shape != x.shape:
            raise BadInputError(f"the hook function {_fn_name(fn)} at {site.point} returned shape {list(out.shape)}, "
                                f"the point is {list(x.shape)}")
        if out.dtype != x.dtype:
            raise BadInputError(f"the hook function {_fn_name(fn)} at {site.point} returned {out.dtype}, the point is "
                                f"{x.dtype} (cast with .astype(np.{x.dtype}))")
        x = out
    return np.ascontiguousarray(x)


def _fn_name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _engine(path: str, key: tuple, provider: str, sites: list[str], hooked: list[str], cache: list[str]) -> _Engine:
    ekey = key + (provider, tuple(sites), tuple(hooked), tuple(cache))
    if ekey in _ENGINES:
        _ENGINES.move_to_end(ekey)
        return _ENGINES[ekey]
    for old in [k for k in _ENGINES if k[0] == path and k[:len(key)] != key]:
        del _ENGINES[old]  # the file changed since
    while len(_ENGINES) >= MAX_ENGINES:
        _ENGINES.popitem(last=False)
    _ENGINES[ekey] = _Engine(path, key, provider, tuple(sites), tuple(hooked), tuple(cache))
    return _ENGINES[ekey]


def _match(names: list[str], what, kind: str) -> list[str]:
    """The points `what` names: a point, a glob, or (as TransformerLens takes) a function of the name."""
    if callable(what):
        hits = [n for n in names if what(n)]
        if not hits:
            raise BadInputError(f"the {kind} filter {_fn_name(what)} matches no hook point")
        return hits
    if not isinstance(what, str):
        raise BadInputError(f"a {kind} names its point by a string or a function of the name, not {what!r}")
    hits = [n for n in names if fnmatch.fnmatchcase(n, what)]
    if not hits:
        raise BadInputError(f"no hook point matches '{what}' for a {kind}")
    return hits


def _prepare(model, input_ids, fwd_hooks, interventions, points, prepend_bos=None):
    path, key, names, placed, limits, dims_known = _facts(model)
    given = prompt(model, input_ids, prepend_bos)
    ids = token_ids(given.ids, *limits)
    hooks: dict[str, list] = {}
    for entry in fwd_hooks or []:
        if not isinstance(entry, (tuple, list)) or len(entry) != 2 or not callable(entry[1]):
            raise BadInputError(f"fwd_hooks takes (name or glob, function) pairs, not {entry!r}")
        for n in _match(names, entry[0], "hook"):
            hooks.setdefault(n, []).append(entry[1])
    changes = _prepare_changes(names, interventions)
    both = sorted(set(hooks) & set(changes))
    if both:
        raise BadInputError(f"{both[0]}: give a point a hook function or interventions, not both")
    cache = [] if points is None else select(placed, points)
    return path, key, names, ids, given.attention_mask, dims_known, hooks, changes, cache


def _parts(engine: _Engine, changes: dict, ids: np.ndarray, means: dict) -> dict[str, np.ndarray]:
    feeds = {}
    batch, pos = ids.shape
    for name, ivs in changes.items():
        site = engine.sites[name]
        parts = [arrays(iv, site, batch, pos, means.get((name, id(iv)))) for iv in ivs]
        for part, array in combine(parts, site.rank, site.dtype).items():
            feeds[input_name(name, part)] = array
    return feeds


def _means(model, provider, changes: dict, ids, attention_mask) -> dict:
    """The mean of each point a mean ablation needs: over batch and positions (a pattern: over the
    batch) of the run without interventions, on the intervention's `over` ids or the call's own."""
    out = {}
    for name, ivs in changes.items():
        for iv in ivs:
            if not iv.needs_mean():
                continue
            path, key, _, _, limits, dims_known = _facts(model)
            over = ids if iv.over is None else token_ids(iv.over, *limits)
            _, values = _engine(path, key, provider, [], [], [name]).run(
                over, attention_mask if iv.over is None else None, dims_known, {}, {})
            act = values[name].astype(np.float64)
            axes = (0,) if name.endswith(("hook_pattern", "hook_attn_scores")) else (0, 1)
            out[(name, id(iv))] = act.mean(axis=axes, keepdims=True).astype(values[name].dtype)
    return out


def changes_for(model, interventions) -> dict[str, list[Intervention]]:
    """{point: its interventions} for the points each intervention's name or glob matches."""
    return _prepare_changes(_facts(model)[2], interventions)


def _prepare_changes(names: list[str], interventions) -> dict[str, list[Intervention]]:
    changes: dict[str, list[Intervention]] = {}
    for iv in interventions or []:
        if not isinstance(iv, Intervention):
            raise BadInputError(f"interventions are made by ablate, patch or add, not {iv!r}")
        for n in _match(names, iv.point, iv.kind):
            changes.setdefault(n, []).append(iv)
    return changes


def engine_for(model, points: list[str], provider: str = "CPUExecutionProvider", cache=()):
    """(the compiled engine for `points`, the token ids' limits, the KV-cache head sizes): for loops
    that feed the cut's inputs themselves (the patching sweeps, generation)."""
    if not isinstance(model, (str, os.PathLike)):
        raise BadInputError(f"model must be a path to an ONNX file, not {type(model).__name__}")
    path, key, _, placed, limits, dims_known = _facts(model)
    missing = [p for p in list(points) + list(cache) if p not in placed]
    if missing:
        raise BadInputError(f"{path}: has no hook point {missing[0]}")
    return _engine(path, key, provider, sorted(points), [], list(cache)), limits, dims_known


def frozen_model(model, changes: dict, cache: list[str], provider: str, prompt_ids) -> LensModel:
    """A copy of the model with step-independent interventions as constants and the cache points as
    outputs, for an engine that takes no inputs of ours (onnxruntime-genai)."""
    path, key, *_ = _facts(model)
    for name, ivs in changes.items():
        if any(iv.rows is not None for iv in ivs):
            raise BadInputError(f"{name}: onnxruntime-genai runs each sequence on its own, so rows= cannot be given")
    engine = _engine(path, key, provider, sorted(changes), [], [])  # the points' sizes, measured
    parts = _parts(engine, changes, np.zeros((1, 1), np.int64), means_for(path, provider, changes, prompt_ids))
    copy, placement = _fresh(path, key)
    compile_points(copy, placement, sorted(changes), cache=tuple(cache))
    freeze(copy, parts)
    return copy


def placed_points(model) -> list[str]:
    """The points an intervention can be placed at in this model (fused norms split)."""
    return _facts(model)[3]


def parts_for(engine, changes: dict, ids: np.ndarray, means: dict) -> dict[str, np.ndarray]:
    """The cut's input values for these interventions on ids shaped [batch, pos]."""
    return _parts(engine, changes, ids, means)


def means_for(model, provider: str, changes: dict, ids) -> dict:
    return _means(model, provider, changes, ids, None)


def run_with_hooks(model, input_ids, fwd_hooks=(), points=None, attention_mask=None, interventions=None,
                   provider: str = "CPUExecutionProvider", sites=None, prepend_bos: bool | None = None):
    """The logits with hook functions changing the points they name (TransformerLens's run_with_hooks),
    and with `points` (globs), an ActivationCache of those points as the changed model computed them.

    `model` is a folder `lensgraph convert` wrote, an onnxruntime-genai folder or an ONNX file;
    `input_ids` is token ids or text (as run_with_cache takes them). `interventions` (ablate, patch,
    add) may change other points in the same run; `sites` (globs) names more points to compile
    than these change, so that calls changing different ones of them share one session."""
    path, key, names, ids, mask, dims_known, hooks, changes, cache = _prepare(model, input_ids, fwd_hooks,
                                                                              interventions, points, prepend_bos)
    attention_mask = mask if attention_mask is None else attention_mask
    extra = [] if sites is None else select(names, sites)
    means = _means(path, provider, changes, ids, attention_mask)
    engine = _engine(path, key, provider, sorted(set(hooks) | set(changes) | set(extra)), sorted(hooks), cache)
    logits, values = engine.run(ids, attention_mask, dims_known, _parts(engine, changes, ids, means), hooks)
    return logits if points is None else (logits, ActivationCache(values, path))


def run_with_interventions(model, input_ids, interventions, points=None, attention_mask=None,
                           provider: str = "CPUExecutionProvider", sites=None, prepend_bos: bool | None = None):
    """The logits under declarative interventions (ablate, patch, add), in one forward; with `points`,
    also an ActivationCache of those points (see run_with_hooks for `sites` and the inputs)."""
    return run_with_hooks(model, input_ids, (), points, attention_mask, interventions, provider, sites, prepend_bos)
