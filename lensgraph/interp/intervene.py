"""Interventions at hook points: the one graph cut behind run_with_hooks, ablate/patch/add, the
patching sweeps, steer and generation under interventions.

A hook point's placement (graph/hookpoints.py) already says which tensor of the graph it is and
how that tensor becomes TransformerLens's layout. An intervention cuts the graph there: the
tensor is taken to that layout (x), changed as

    x' = Where(mask, values, x) + add

and taken back to the graph's layout for every node that read the tensor, so everything
downstream is computed from x' and nothing upstream changes. mask, values and add are either
graph inputs whose defaults (initializers of the same names) are neutral (False, 0, 0), so one
session serves every call and a call may feed them per row (a batch of different interventions
in one forward), or constants baked into the graph (steer). With the neutral values every
tensor keeps its bits: Where picks x, and x + 0 is x.

For hook functions (run_with_hooks) the compiled graph is split into pieces, one per hooked
point in graph order (see `segments`): piece i computes what the i-th hook function reads, with
the earlier points' replacements fed in as inputs, and every output as early as it can be.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_ir as ir

from ..errors import BadInputError
from ..graph.hookpoints import (
    AS_IS,
    BROADCAST,
    COLUMNS,
    HEADS,
    KEYS,
    NORMALIZED,
    PER_POSITION,
    RESULT,
    SCALE,
    SCORES,
    Placement,
    Point,
    all_names,
)
from ..graph.unfuse import SKIP_NORMS
from ..store.model import LensModel
from .hooks import HOOK_KEY, HOOKS_KEY, _Builder

INTERVENE_KEY = "lensgraph.intervene"  # on every node an intervention added
PARTS = ("mask", "values", "add")


def input_name(point: str, part: str) -> str:
    """The graph input (or constant) holding one part of a point's change."""
    return f"{point}:{part}"


def seen_name(point: str) -> str:
    """The graph output holding the value entering a point's change: what a hook function gets."""
    return f"{point}:seen"


@dataclass
class Site:
    """A point compiled into the graph."""

    point: str
    dims: tuple  # TransformerLens's shape of the point: None for batch, positions and unknown sizes
    dtype: np.dtype
    changed: str  # the name of x', the changed value in TransformerLens's layout
    seen: str | None = None  # the graph output of x, where asked for
    view: str | None = None  # the name of x, the point in TransformerLens's layout
    head_axis: int | None = None  # where the heads are in `dims`
    pos_axis: int | None = 1  # the position axis (the query axis of a pattern)

    @property
    def rank(self) -> int:
        return len(self.dims)


@dataclass
class Compiled:
    sites: dict[str, Site] = field(default_factory=dict)  # in graph order


def why_not(point: Point) -> str | None:
    """Why no intervention can be placed at this point (None: it can)."""
    if point.form == SCALE or (point.form == NORMALIZED):
        return (f"{point.name} is computed beside the graph from the norm's input for reading; the norm computes "
                "its own inside, so changing it would change nothing downstream")
    if point.form == KEYS and _rank_dim(point.value, 1) != len(point.indices):
        return (f"{point.name}: the rotated keys may be repeated per query head (grouped-query attention) before "
                "the product, and the graph does not say how many heads it holds; intervene on the key heads at "
                "attn.hook_k")
    producer = target(point).producer()
    if producer is not None and producer.op_type in SKIP_NORMS:
        return (f"{point.name} is the sum inside {producer.op_type} {producer.name}, which normalises it inside: "
                "split the fused norms first (graph/unfuse.py)")
    if point.form == BROADCAST:
        readers = [n for n, _ in point.value.uses() if HOOK_KEY not in n.metadata_props]
        if any(n.op_type not in ("Add", "Sum") for n in readers):
            return f"{point.name}: the position rows are read by more than the sum into the stream"
    return None


def _rank_dim(value: ir.Value, axis: int):
    if value.shape is None or len(value.shape) <= axis:
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) else None


def dims_of(point: Point) -> tuple[tuple, int | None, int | None]:
    """(TransformerLens's shape of the point with None for batch, positions and unknown sizes,
    the head axis, the position axis)."""
    v = point.value
    last = _rank_dim(v, len(v.shape) - 1) if v.shape is not None and len(v.shape) else None
    if point.form in (AS_IS, SCORES) and v.shape is not None and len(v.shape) == 4 and point.name.endswith(
            ("hook_pattern", "hook_attn_scores")):
        return (None, _rank_dim(v, 1), None, None), 1, 2
    if point.form == AS_IS:  # z, already [batch, pos, head, d_head]
        return (None, None, _rank_dim(v, 2), _rank_dim(v, 3)), 2, 1
    if point.form == HEADS:
        return (None, None, _rank_dim(v, 1), _rank_dim(v, 3)), 2, 1
    if point.form == COLUMNS:
        heads, d_head = point.indices.shape
        return (None, None, heads, d_head), 2, 1
    if point.form == KEYS:
        return (None, None, len(point.indices), _rank_dim(v, 2)), 2, 1
    if point.form == RESULT:
        w_o = point.indices[0]()
        return (None, None, w_o.shape[0], w_o.shape[2]), 2, 1
    return (None, None, last), None, 1  # PER_POSITION, BROADCAST, bare-normaliser NORMALIZED


class _Cut(_Builder):
    """Adds the change at each point and rewires the tensor's readers to it; also the points a
    cache reads, which then read the changed values (no private copies of stream sums, which
    would read around a change)."""

    prefix = "lensgraph.intervene"

    @staticmethod
    def _tag(node: ir.Node, point: str, doc: str) -> None:
        node.metadata_props[INTERVENE_KEY] = point
        node.doc_string = f"lensgraph intervention at {point}: {doc}"

    def private_copy(self, point: str, value: ir.Value) -> ir.Value:
        return value

    def _node(self, point: str, op: str, inputs, doc: str, out_name: str | None = None, **attrs) -> ir.Value:
        return super()._node(point, op, inputs, doc, out_name or f"{point}:cut/{op}_{self._count + 1}", **attrs)

    def _const(self, point: str, label: str, array: np.ndarray) -> ir.Value:
        self._count += 1
        return super()._const(f"{point}:cut", label, array)

    def part(self, point: str, part: str, default: np.ndarray, rank: int, baked: dict | None) -> ir.Value | None:
        """A graph input with a neutral default, or (baked) the given constant; None when baked without it."""
        name = input_name(point, part)
        if baked is not None:
            array = baked.get(part)
            return None if array is None else self._const(point, part, np.ascontiguousarray(array))
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(default.dtype)),
                         shape=ir.Shape([None] * rank), const_value=ir.tensor(default, name=name))
        self.graph.inputs.append(value)
        self.graph.register_initializer(value)
        return value

    def change(self, site: Site, base: ir.Value, baked: dict | None) -> ir.Value:
        """x' = Where(mask, values, x) + add (baked: only the parts given)."""
        p, rank = site.point, site.rank
        ones = (1,) * rank
        mask = self.part(p, "mask", np.zeros(ones, bool), rank, baked)
        values = self.part(p, "values", np.zeros(ones, site.dtype), rank, baked)
        add = self.part(p, "add", np.zeros(ones, site.dtype), rank, baked)
        out = base
        if mask is not None:
            out = self._node(p, "Where", [mask, values, out], "mask ? values : x",
                             out_name=None if add is not None else site.changed)
        if add is not None:
            out = self._node(p, "Add", [out, add], "+ add", out_name=site.changed)
        if out is base:  # baked with nothing to change
            out = self._node(p, "Identity", [base], "unchanged", out_name=site.changed)
        out.dtype, out.shape = base.dtype or self.float_type, ir.Shape([None] * rank)
        return out

    def back(self, point: Point, new: ir.Value, seen: ir.Value, cur: ir.Value) -> ir.Value:
        """The changed point in the graph's layout of `cur`, the tensor its readers read."""
        name, form = point.name, point.form
        if form in (AS_IS, SCORES, BROADCAST) or self.as_is(point, cur):
            return new
        if form == PER_POSITION:
            return self._node(name, "Reshape", [new, self._node(name, "Shape", [cur], "the graph's layout")],
                              "back to the graph's layout")
        if form == HEADS:
            return self._node(name, "Transpose", [new], "back to [batch, head, pos, d_head]", perm=[0, 2, 1, 3])
        if form == KEYS:
            return self._node(name, "Transpose", [new], "back to [batch, head, d_head, key]", perm=[0, 2, 3, 1])
        if form == COLUMNS:  # written back into the map's output at each head's columns
            cols = point.indices.reshape(-1).astype(np.int64)
            lead = self._node(name, "Slice", [self._node(name, "Shape", [cur], "the map's output shape"),
                                              self._const(name, "zero", np.array([0], np.int64)),
                                              self._const(name, "minus_one", np.array([-1], np.int64))],
                              "all but the columns")
            shape = self._node(name, "Concat", [lead, self._const(name, "width", np.array([len(cols)], np.int64))],
                               "[..., heads * d_head]", axis=0)
            flat = self._node(name, "Reshape", [new, shape], "heads merged")
            where = self._node(name, "Expand", [self._const(name, "columns", cols), shape], "each head's columns")
            return self._node(name, "ScatterElements", [cur, where, flat], "written back at each head's columns",
                              axis=-1)
        if form == RESULT:  # each head's change, summed, added to the output projection's output
            delta = self._node(name, "Sub", [new, seen], "each head's change")
            if self.opset >= 13:
                total = self._node(name, "ReduceSum", [delta, self._const(name, "heads", np.array([2], np.int64))],
                                   "summed over heads", keepdims=0)
            else:
                total = self._node(name, "ReduceSum", [delta], "summed over heads", axes=[2], keepdims=0)
            total = self._node(name, "Reshape", [total, self._node(name, "Shape", [cur], "the output's shape")],
                               "the output's layout")
            return self._node(name, "Add", [cur, total], "the output projection's output, changed")
        raise ValueError(form)


def rebind(placement: Placement, graph: ir.Graph) -> Placement:
    """The same placement over a clone of its graph: each point's tensors found by name."""
    values = {v.name: v for v in list(graph.inputs) + list(graph.initializers.values())}
    values.update({v.name: v for node in graph for v in node.outputs})
    points = {}
    for name, point in placement.points.items():
        indices = point.indices
        if point.form == RESULT:
            indices = (indices[0], indices[1], values[indices[2].name])
        points[name] = replace(point, value=values[point.value.name], indices=indices)
    return replace(placement, points=points)


def target(point: Point) -> ir.Value:
    """The tensor whose readers see a change at this point (hook_result: the output projection's output)."""
    return point.indices[2] if point.form == RESULT else point.value


def compile_points(model: LensModel, placement: Placement, names: list[str], baked: dict | None = None,
                   seen: tuple = (), cache: tuple = ()) -> Compiled:
    """Cut the graph of `model` at each named point (in place).

    `baked`: {point: {part: array}} puts those constants in the graph instead of inputs; `seen`
    names the points whose incoming value becomes a graph output (for hook functions); `cache`
    the points to output as the changed model computes them (named as the points)."""
    unknown = [n for n in names if n not in placement.points]
    if unknown:
        n = unknown[0]
        reason = placement.unplaced.get(n, "no such hook point")
        raise BadInputError(f"cannot intervene at {n}: {reason}")
    for n in names:
        reason = why_not(placement.points[n])
        if reason:
            raise BadInputError(f"cannot intervene at {n}: {reason}")
    graph = model.graph
    order = {id(node): i for i, node in enumerate(graph)}
    tl_order = {n: i for i, n in enumerate(all_names(placement.n_layers))}
    groups: dict[int, list[Point]] = {}
    for n in sorted(names, key=tl_order.__getitem__):
        groups.setdefault(id(target(placement.points[n])), []).append(placement.points[n])

    def position(points: list[Point]) -> int:
        producer = target(points[0]).producer()
        return order.get(id(producer), -1) if producer is not None else -1

    cut = _Cut(model, placement, copies=True)
    for n in cache:
        cut.add(placement.points[n])
    current: dict[int, ir.Value] = {}  # a cut tensor -> its changed value
    compiled = Compiled()
    for points in sorted(groups.values(), key=position):
        tensor = target(points[0])
        uses = list(tensor.uses())
        cur = tensor
        for point in points:
            dims, head_axis, pos_axis = dims_of(point)
            dtype = (tensor.dtype or cut.float_type).numpy()
            site = Site(point.name, dims, np.dtype(dtype), f"{point.name}:changed", head_axis=head_axis,
                        pos_axis=pos_axis)
            source = current.get(id(point.value), point.value) if point.form == RESULT else cur
            x = cut.layout(point, source)
            site.view = x.name
            if point.name in seen:
                site.seen = seen_name(point.name)
                out = cut._node(point.name, "Identity", [x], "the value entering the change", out_name=site.seen)
                out.dtype, out.shape = x.dtype or cut.float_type, ir.Shape([None] * site.rank)
                graph.outputs.append(out)
            new = cut.change(site, cur if point.form == SCORES else x, None if baked is None else baked.get(point.name, {}))
            cur = cut.back(point, new, x, cur)
            compiled.sites[point.name] = site
        for node, idx in uses:
            node.replace_input_with(idx, cur)
        current[id(tensor)] = cur
    graph.sort()
    for out, rank in cut.ranks:  # graph outputs need a shape, if only a rank
        if out.shape is None and rank is not None:
            out.shape = ir.Shape([None] * rank)
    props = model.ir.metadata_props
    props[INTERVENE_KEY] = ",".join(compiled.sites)
    props.pop(HOOKS_KEY, None)
    return compiled


def freeze(model: LensModel, values: dict[str, np.ndarray]) -> None:
    """Make the cut's inputs constants: `values` where given, the neutral defaults elsewhere (for an
    engine that feeds no inputs of ours, such as onnxruntime-genai's)."""
    graph = model.graph
    for v in [v for v in graph.inputs if v.name in graph.initializers and v.name.rpartition(":")[2] in PARTS]:
        graph.inputs.remove(v)
        if v.name in values:
            array = np.ascontiguousarray(values[v.name])
            v.const_value = ir.tensor(array, name=v.name)
            v.shape = ir.Shape(array.shape)
        else:
            v.shape = ir.Shape(v.const_value.shape)


# -- pieces for hook functions -----------------------------------------------------------
@dataclass
class Piece:
    """One piece of a cut graph: a model, what it outputs, and the replaced points it reads."""

    proto: onnx.ModelProto
    outputs: list[str]
    replaced: list[str] = field(default_factory=list)  # changed-value names fed in as inputs


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """Every value a node reads, those of its subgraphs included."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for g in list(attr.g.node and [attr.g] or []) + list(attr.graphs):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
            names += [n for sub in g.node for n in _node_inputs(sub) if n not in inner]
    return names


def segments(proto: onnx.ModelProto, hooked: list[Site]) -> list[Piece]:
    """The cut graph in len(hooked) + 1 pieces. Piece i outputs the value hooked[i] sees, with the
    changed values of hooked[:i] as inputs; each graph output comes out of the first piece that can
    compute it (the one after the last hooked point it depends on)."""
    g = proto.graph
    changed = {s.changed: i for i, s in enumerate(hooked)}
    latest: dict[str, int] = {}
    for node in g.node:
        level = max((latest.get(n, -1) for n in _node_inputs(node)), default=-1)
        for out in node.output:
            latest[out] = max(level, changed.get(out, -1))
    seen = {s.seen for s in hooked}
    finals = [o.name for o in g.output if o.name not in seen]
    if not hooked:  # one piece: the model itself (no copy of its weights)
        return [Piece(proto, finals)]
    pieces = []
    for i in range(len(hooked) + 1):
        outputs = ([hooked[i].seen] if i < len(hooked) else []) + [o for o in finals if latest.get(o, -1) + 1 == i]
        pieces.append(_piece(proto, outputs, {s.changed for s in hooked[:i]}))
    return pieces


def piece(proto: onnx.ModelProto, outputs: list[str], cut: set[str] = frozenset()) -> Piece:
    """The part of a model that computes `outputs`, the values named in `cut` fed in as inputs."""
    return _piece(proto, outputs, set(cut))


def _piece(proto: onnx.ModelProto, outputs: list[str], cut: set[str]) -> Piece:
    g = proto.graph
    producer = {o: k for k, node in enumerate(g.node) for o in node.output}
    need, stack, replaced = set(), list(outputs), []
    visited = set()
    while stack:
        name = stack.pop()
        if name in visited:
            continue
        visited.add(name)
        if name in cut:
            replaced.append(name)
            continue
        k = producer.get(name)
        if k is None or k in need:
            continue
        need.add(k)
        stack += _node_inputs(g.node[k])
    types = {v.name: v for v in list(g.value_info) + list(g.output) + list(g.input)}
    piece = onnx.ModelProto()
    piece.ir_version, piece.producer_name, piece.producer_version = proto.ir_version, proto.producer_name, proto.producer_version
    piece.opset_import.extend(proto.opset_import)
    piece.metadata_props.extend(proto.metadata_props)
    piece.functions.extend(proto.functions)
    pg = piece.graph
    pg.name = g.name
    pg.node.extend(g.node[k] for k in sorted(need))
    used = {n for k in need for n in _node_inputs(g.node[k])} | set(outputs)
    pg.initializer.extend(t for t in g.initializer if t.name in used)
    pg.sparse_initializer.extend(t for t in g.sparse_initializer if t.values.name in used)
    pg.input.extend(v for v in g.input if v.name in used)
    for name in replaced:
        pg.input.append(_typed(types.get(name), name))
    for name in outputs:
        pg.output.append(_typed(types.get(name), name))
    pg.value_info.extend(v for v in g.value_info if v.name in used)
    return Piece(piece, outputs, replaced)


def _typed(info: onnx.ValueInfoProto | None, name: str) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    if info is not None:
        out.CopyFrom(info)
    out.name = name
    return out
