"""Hook points as graph outputs, named as TransformerLens names them.

Each placed point (see graph/hookpoints.py) becomes a graph output through a node named
after the point: an Identity for a tensor already in TransformerLens's layout, else the
Reshape, Expand or Transpose that gives it that layout, or a small subgraph for a norm's
scale. Nothing existing is renamed or rewired, so the original outputs are unchanged, and
onnxruntime's fusions are kept (see `_Builder.private_copy`). onnxruntime's inference
builds run every node whatever is fetched, so each hook costs its copy on every run:
add only the points you need, or let run_with_cache choose per call.

Hook nodes carry `lensgraph.hook` metadata; adding hooks first removes earlier ones, so
it can be repeated with other points. For a session that lives only in memory
(run_with_cache), `copies=False` lists a point that is already a tensor of the graph as
that tensor, saving its copy; `HookReport.outputs` then says which output is which point.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.convenience import convert_attributes
from onnx_ir.passes.common import RemoveUnusedNodesPass

from .._version import __version__
from ..errors import BadInputError
from ..graph import match
from ..graph.hookpoints import (
    AS_IS,
    BROADCAST,
    COLUMNS,
    HEADS,
    KEYS,
    NORMALIZED,
    ON_REQUEST,
    PER_POSITION,
    RESULT,
    SCALE,
    SCORES,
    Placement,
    Point,
    place,
    template,
)
from ..store.model import LensModel, infer_shapes_of, is_sorted

HOOK_KEY = "lensgraph.hook"
HOOKS_KEY = "lensgraph.hooks"


@dataclass
class HookReport:
    added: list[str] = field(default_factory=list)
    unplaced: dict[str, str] = field(default_factory=dict)  # wanted but not placeable, with the reason
    removed: int = 0  # hook outputs from an earlier run that were replaced
    outputs: dict[str, str] = field(default_factory=dict)  # point -> the graph output holding it
    placement: Placement | None = field(default=None, repr=False, compare=False)  # where every point was found

    def to_dict(self) -> dict:
        return {"added": self.added, "unplaced": self.unplaced, "removed": self.removed}


def select(names: list[str], patterns: list[str] | None) -> list[str]:
    """Names matching any glob in `patterns` (all names when None); a glob matching nothing is an error."""
    if patterns is None:  # every point but the large ones, which are added only when named
        return [n for n in names if not n.endswith(ON_REQUEST)]
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise BadInputError(f"points must be a list of glob strings over hook names, got {patterns!r}")
    chosen, known = set(), set(names)
    for pattern in patterns:
        if not any(c in pattern for c in "*?["):  # a plain name (convert's points graph asks for 600 of them)
            hits = [pattern] if pattern in known else []
        else:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise BadInputError(f"no hook point matches '{pattern}' (points: {_summarise(names)})")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def hook_names(model: LensModel) -> list[str]:
    """Hook outputs this model already has, in order."""
    return [v.name for v in model.graph.outputs if _is_hook(v.producer())]


def remove_hooks(model: LensModel) -> int:
    graph = model.graph
    hooks = [v for v in graph.outputs if _is_hook(v.producer())]
    for v in hooks:
        graph.outputs.remove(v)
    if hooks:
        RemoveUnusedNodesPass()(model.ir)  # the hook nodes now feed nothing
    model.ir.metadata_props.pop(HOOKS_KEY, None)
    return len(hooks)


def add_hooks(model: LensModel, points: list[str] | None = None, copies: bool = True,
              placement: Placement | None = None) -> HookReport:
    """Add graph outputs at the chosen hook points (globs; default: every point placeable).

    With `copies=False` (a model that is run, never saved) a point that is a tensor of the
    graph as it stands is that tensor's own output rather than a named copy. `placement` is
    the model's, when the caller has already placed the points on it (without hooks)."""
    report = HookReport(removed=remove_hooks(model))
    placement = placement if placement is not None and not report.removed else place(model.graph, model=model)
    report.placement = placement
    wanted = select(placement.names, points)
    builder = _Builder(model, placement, copies)
    before = {id(n) for n in model.graph}
    for name in wanted:
        if name in placement.points:
            report.outputs[name] = builder.add(placement.points[name]).name
            report.added.append(name)
        else:
            report.unplaced[name] = placement.unplaced[name]
    if not is_sorted(model.graph):  # the hooks are appended after what they read: sorting (0.1-0.15 s at 30
        model.graph.sort()  # layers) is needed only where the graph was not sorted before
    infer_shapes_of(model.ir, [n for n in model.graph if id(n) not in before])
    for out, rank in builder.ranks:  # graph outputs need a shape, if only a rank
        if out.shape is None and rank is not None:
            out.shape = ir.Shape([None] * rank)
    props = model.ir.metadata_props
    props[HOOKS_KEY] = json.dumps(report.added)
    props["lensgraph.version"] = __version__
    return report


def _is_hook(node: ir.Node | None) -> bool:
    return node is not None and HOOK_KEY in node.metadata_props


def _summarise(names: list[str]) -> str:
    seen = []
    for n in names:
        t = template(n)
        if t not in seen:
            seen.append(t)
    return ", ".join(seen)


class _Builder:
    """Appends hook nodes; shared helpers (the ids' shape) are made once."""

    prefix = "lensgraph.hooks"  # names the shared helpers

    def __init__(self, model: LensModel, placement: Placement, copies: bool = True):
        self.model = model
        self.copies = copies
        self.graph = model.graph
        anatomy = placement.anatomy
        self.norm_of = {id(n): norm for norm in (anatomy.norms if anatomy else []) for n in norm.nodes}
        self._copies: dict[int, ir.Value] = {}
        self.opset = model.graph.opset_imports.get("", 17)
        self._ids_shape = None
        self._count = 0
        self.ranks: list[tuple[ir.Value, int | None]] = []
        logits = next((v for v in self.graph.outputs if v.dtype is not None and v.dtype.is_floating_point()), None)
        self.float_type = logits.dtype if logits is not None else ir.DataType.FLOAT

    # -- small helpers ----------------------------------------------------------------
    def _const(self, point: str, label: str, array: np.ndarray) -> ir.Value:
        self._count += 1
        name = f"{point}/{label}_{self._count}"
        node = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", ir.tensor(array))], name=name)
        node.outputs[0].name = name
        node.outputs[0].dtype = ir.DataType.from_numpy(array.dtype)
        node.outputs[0].shape = ir.Shape(array.shape)
        self._tag(node, point, f"constant {label}")
        self.graph.append(node)
        return node.outputs[0]

    def _node(self, point: str, op: str, inputs, doc: str, out_name: str | None = None, **attrs) -> ir.Value:
        self._count += 1
        name = out_name or f"{point}/{op}_{self._count}"
        node = ir.Node("", op, inputs, attributes=convert_attributes(attrs), name=name)
        node.outputs[0].name = name
        self._tag(node, point, doc)
        self.graph.append(node)
        return node.outputs[0]

    @staticmethod
    def _tag(node: ir.Node, point: str, doc: str) -> None:
        node.metadata_props[HOOK_KEY] = point
        node.doc_string = f"lensgraph hook {point}: {doc}"

    def _ids(self) -> ir.Value:
        ids = next((v for v in self.graph.inputs if v.name == "input_ids"), None)
        ids = ids or next((v for v in self.graph.inputs if v.dtype in (ir.DataType.INT64, ir.DataType.INT32)), None)
        if ids is None:
            raise BadInputError("the graph has no integer token-id input to take [batch, pos] from")
        return ids

    def ids_shape(self) -> ir.Value:
        if self._ids_shape is None:
            self._ids_shape = self._node(self.prefix, "Shape", [self._ids()], "[batch, pos] of the token ids",
                                         out_name=f"{self.prefix}/batch_pos")
        return self._ids_shape

    def _dtype_const(self, value: ir.Value, x: float) -> np.ndarray:
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        return np.array(x, dtype=dtype)

    def private_copy(self, point: str, value: ir.Value) -> ir.Value:
        """The stream tensor for hooks to read, recomputed when a norm is its only reader.

        onnxruntime fuses a residual Add into the norm that alone reads it
        (SkipLayerNormalization); one more reader would block that. A Sum of the same two
        operands gives the same bits without touching the Add, and a Sum is never merged
        with an Add by common-subexpression elimination.
        """
        node = value.producer()
        if node is None or node.op_type != "Add" or node.domain != "" or len(node.inputs) != 2:
            return value
        readers = [n for n, _ in match.value_uses(value) if not _is_hook(n)]
        norms = {id(self.norm_of.get(id(n))) for n in readers}
        if not readers or value.is_graph_output() or len(norms) != 1 or id(None) in norms:
            return value
        if id(value) not in self._copies:
            copy = self._node(point, "Sum", list(node.inputs), f"a copy of {value.name} for hooks, so that "
                              f"{node.name} can still fuse into the norm that reads it",
                              out_name=f"lensgraph.hooks/{value.name}")
            copy.dtype, copy.shape = value.dtype, value.shape
            self._copies[id(value)] = copy
        return self._copies[id(value)]

    # -- one point --------------------------------------------------------------------
    def add(self, point: Point) -> ir.Value:
        """The graph output that holds the point."""
        name, v = point.name, point.value
        if point.form in (PER_POSITION, SCALE, NORMALIZED):
            v = self.private_copy(name, v)
        rank = None if v.shape is None else len(v.shape)
        if self.as_is(point, v) and not self.copies and v.producer() is not None and v.name:
            if not v.is_graph_output():
                v.dtype = v.dtype or self.float_type
                self.ranks.append((v, rank or 4))
                self.graph.outputs.append(v)
            return v
        out = self.layout(point, v, out_name=name)
        self.graph.outputs.append(out)
        return out

    @staticmethod
    def as_is(point: Point, v: ir.Value) -> bool:
        """Whether the tensor already is in TransformerLens's layout."""
        return point.form == AS_IS or (point.form == PER_POSITION and v.shape is not None and len(v.shape) == 3)

    def layout(self, point: Point, v: ir.Value, out_name: str | None = None) -> ir.Value:
        """The point in TransformerLens's layout, computed from `v` (the point's tensor, or what
        replaces it); named `out_name` when given, else `v` itself where it already is that layout."""
        name = point.name
        rank = None if v.shape is None else len(v.shape)
        if self.as_is(point, v):
            if out_name is None:
                return v
            out = self._node(name, "Identity", [v], f"{point.found}", out_name=out_name)
        elif point.form == PER_POSITION:
            shape = self._node(name, "Concat", [self.ids_shape(), self._const(name, "rest", np.array([-1], np.int64))],
                               "[batch, pos, -1]", axis=0)
            out = self._node(name, "Reshape", [v, shape], f"{point.found}, as [batch, pos, -1]", out_name=out_name)
        elif point.form == BROADCAST:
            shape = self._node(name, "Concat", [self.ids_shape(), self._const(name, "one", np.array([1], np.int64))],
                               "[batch, pos, 1]", axis=0)
            out = self._node(name, "Expand", [v, shape], f"{point.found}, repeated over the batch", out_name=out_name)
        elif point.form == HEADS:
            out = self._node(name, "Transpose", [v], f"{point.found}, as [batch, pos, head, d_head]",
                             out_name=out_name, perm=[0, 2, 1, 3])
        elif point.form == SCALE:
            out = self._scale(point, v, out_name)
        elif point.form == NORMALIZED:
            out = self._scale(point, v, out_name, normalized=True)
        elif point.form == COLUMNS:
            heads, d_head = point.indices.shape
            picked = self._columns(name, v, point.indices.reshape(-1).astype(np.int64))
            shape = self._node(name, "Concat", [self.ids_shape(), self._const(name, "heads", np.array([heads, d_head],
                                                                                                      np.int64))],
                               "[batch, pos, head, d_head]", axis=0)
            out = self._node(name, "Reshape", [picked, shape], f"{point.found}, as [batch, pos, head, d_head]",
                             out_name=out_name)
        elif point.form == KEYS:
            keys = self._node(name, "Transpose", [v], "[batch, key, head, d_head]", perm=[0, 3, 1, 2])
            out = self._node(name, "Gather", [keys, self._const(name, "heads", np.asarray(point.indices, np.int64))],
                             f"{point.found}, each key head once", out_name=out_name, axis=2)
        elif point.form == RESULT:
            per_head, z_form, _ = point.indices
            w_o = per_head()
            z = v if z_form == AS_IS else self._node(name, "Transpose", [v], "[batch, pos, head, d_head]",
                                                     perm=[0, 2, 1, 3])
            out = self._node(name, "Einsum", [z, self._const(name, "W_O", w_o)], f"{point.found}",
                             out_name=out_name, equation="bphd,hdm->bphm")
        elif point.form == SCORES:
            # x4 then /4: exact (powers of two) for every score below a quarter of the float range,
            # and the additive mask's large negatives overflow to -inf; two scalar products cost
            # half what a comparison and a select over every score do
            dtype = v.dtype.numpy() if v.dtype is not None else np.float32
            up = self._node(name, "Mul", [v, self._const(name, "four", np.array(4, dtype))],
                            "x4: the additive mask's large negatives overflow to -inf")
            out = self._node(name, "Mul", [up, self._const(name, "quarter", np.array(0.25, dtype))],
                             f"{point.found}, masked positions -inf", out_name=out_name)
        else:
            raise ValueError(point.form)
        out.dtype = v.dtype or self.float_type  # a graph output needs a type, if inference found none
        self.ranks.append((out, 4 if point.form in (HEADS, COLUMNS, KEYS, RESULT) else 3 if point.form not in (AS_IS, SCORES)
                            else rank or 4))  # AS_IS: pattern or z
        return out

    def _columns(self, name: str, v: ir.Value, columns: np.ndarray) -> ir.Value:
        """The chosen last-axis columns of v: a Slice where they are one run in order (as in
        most exports), which copies far faster than a Gather."""
        start = int(columns[0])
        if self.opset < 10 or not np.array_equal(columns, np.arange(start, start + len(columns))):
            return self._node(name, "Gather", [v, self._const(name, "columns", columns)], "each head's columns", axis=-1)
        return self._node(name, "Slice", [v, self._const(name, "start", np.array([start], np.int64)),
                                          self._const(name, "end", np.array([start + len(columns)], np.int64)),
                                          self._const(name, "axis", np.array([-1], np.int64))],
                          "the heads' columns, in order")

    def _scale(self, point: Point, x: ir.Value, out_name: str | None, normalized: bool = False) -> ir.Value:
        """sqrt(mean((x - mean x)^2) + eps), or sqrt(mean(x^2) + eps) for an RMSNorm; with
        `normalized`, the (centred) input divided by it.

        Built from ReduceSum and Mul rather than the norm's own ReduceMean/Sub/Pow chain, so
        onnxruntime's common-subexpression step cannot merge it into a decomposed norm and
        block that norm's fusion.
        """
        name, norm = point.name, point.norm
        inv_d = self._const(name, "inv_d", self._dtype_const(x, 1.0 / norm.d_model))
        eps = self._const(name, "eps", self._dtype_const(x, norm.eps if norm.eps is not None else 1e-5))

        def mean(v):
            if self.opset >= 13:
                axes = self._const(name, "axes", np.array([-1], np.int64))
                total = self._node(name, "ReduceSum", [v, axes], "sum over d_model", keepdims=1)
            else:
                total = self._node(name, "ReduceSum", [v], "sum over d_model", axes=[-1], keepdims=1)
            return self._node(name, "Mul", [total, inv_d], "mean over d_model")

        centred = x
        if norm.centring:
            centred = self._node(name, "Sub", [x, mean(x)], "x - mean(x)")
        square = self._node(name, "Mul", [centred, centred], "squared")
        var = self._node(name, "Add", [mean(square), eps], "variance + eps")
        if normalized:
            scale = self._node(name, "Sqrt", [var], "sqrt(variance + eps)")
            return self._node(name, "Div", [centred, scale], f"{point.found}: x / sqrt(variance + eps)",
                              out_name=out_name)
        return self._node(name, "Sqrt", [var], f"{point.found}: sqrt(variance + eps)", out_name=out_name)
