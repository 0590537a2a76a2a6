"""LensModel: an ONNX model opened for rewriting, and its safe load and save.

The graph is held in onnx-ir, which keeps every node's name, doc_string and
metadata_props (dynamo's name scopes, our provenance tags). Large weights are not
parsed with it: each is a FileTensor reading its bytes from the model file (or its
external data) when a pass needs them; rewritten matrices are Deferred (deferred.py),
computed block by block while writer.py streams them out. Passes change the model only through the WeightStore and
the helpers here; only this module (through atomic.py) writes files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import CheckerPass, RemoveUnusedNodesPass, ShapeInferencePass

from .._version import __version__
from ..errors import BadInputError, LensError, unwrapped
from . import wire
from .atomic import StagedModel, stage
from .filetensor import file_tensor, readable_in_place
from .safety import SMALL_TENSOR, open_model, runtime_contrib_op
from .weights import WeightStore

APPLIED_KEY = "lensgraph.applied"
TWO_GB = 2**31
EXTERNAL_ABOVE = TWO_GB - 2**26  # weights over this many bytes always go to external data (protobuf's limit)
SHAPE_CONSTANT = 1 << 12  # bytes: constants up to this size take part in shape inference with their values


class LensModel:
    def __init__(self, model: ir.Model, path: str | None = None):
        self.ir = model
        self.path = path
        self.input_files: list[str] = []  # the input model and its data files: never overwritten
        self.external_input = False  # the input kept its weights in external data
        self.weights = WeightStore(model.graph)

    @classmethod
    def load(cls, path: str | os.PathLike, runtime: bool = True) -> "LensModel":
        """Open `path` after the checks in safety.py; weights stay in the file until used.
        `runtime` off: a graph only read, never run (onnxruntime's support is not asked)."""
        path = os.fspath(path)
        proto, data_files = open_model(path, runtime)
        try:
            model = ir.serde.deserialize_model(proto)
            ir.serde.serialize_model(model)  # what cannot be written back (text that is not UTF-8) is refused now
        except Exception as exc:
            cause = _innermost(exc)
            what = "a name or text that is not valid UTF-8" if isinstance(cause, UnicodeError) else _first_line(cause)
            raise BadInputError(f"{path}: not a readable ONNX model ({what})") from exc
        raw = model.metadata_props.get(APPLIED_KEY)
        if _applied(raw) is None:
            raise BadInputError(f"{path}: metadata {APPLIED_KEY} is not a list of pass names ({raw[:60]!r})")
        _read_in_place(model, path)
        lens = cls(model, path)
        lens.input_files = [os.path.realpath(path), *sorted(data_files)]
        lens.external_input = bool(data_files)
        infer_shapes(model)
        return lens

    @property
    def graph(self) -> ir.Graph:
        return self.ir.graph

    # -- what was applied, and provenance ---------------------------------------------
    @property
    def applied(self) -> list[str]:
        return _applied(self.ir.metadata_props.get(APPLIED_KEY)) or []

    def mark_applied(self, name: str) -> None:
        applied = self.applied
        if name not in applied:
            applied.append(name)
        props = self.ir.metadata_props
        props[APPLIED_KEY] = json.dumps(applied)
        props["lensgraph.pipeline"] = ",".join(applied)
        props["lensgraph.version"] = __version__
        if "lensgraph.source" not in props:
            source = os.path.basename(self.path) if self.path else "in-memory model"
            producer = " ".join(p for p in (self.ir.producer_name, self.ir.producer_version) if p)
            props["lensgraph.source"] = f"{source} ({producer})" if producer else source

    @staticmethod
    def tag(node: ir.Node, pass_name: str, formula: str) -> None:
        """Record on a rewritten node which pass changed it and how (shown by Netron)."""
        props = node.metadata_props
        passes = [p for p in props.get("lensgraph.pass", "").split(",") if p]
        if pass_name not in passes:
            passes.append(pass_name)
        props["lensgraph.pass"] = ",".join(passes)
        line = f"lensgraph {pass_name}: {formula}"
        doc = node.doc_string or ""
        if line not in doc:
            node.doc_string = f"{doc}\n{line}".strip()

    # -- structure -------------------------------------------------------------------
    def cleanup(self, nodes_before: list | None = None) -> None:
        """Drop nodes and initializers that no longer feed an output, then re-sort. Given the nodes
        of a graph that was clean and sorted before a rewrite, a rewrite that left every node in
        its place and none unread (a change of weights) only needs the initializers it stopped
        reading dropped: the whole clean-up and sort cost 0.1-0.3 s on a graph of 7,500 nodes."""
        graph = self.graph
        if nodes_before is not None and len(nodes_before) == len(graph) and \
                all(a is b for a, b in zip(nodes_before, graph)) and _clean_and_sorted(graph):
            for name in [n for n, v in graph.initializers.items()
                         if not v.uses() and not v.is_graph_output() and not v.is_graph_input()]:
                del graph.initializers[name]
            return
        RemoveUnusedNodesPass()(self.ir)
        graph.sort()

    def check(self, full: bool = False, checker: bool = True) -> None:
        """Structural checks: every input defined, then (unless `checker` is off) the ONNX checker.

        The checker sees the graph without its large initializers (onnx-ir strips them), so
        its cost is the graph's size, not the weights'.
        """
        defined = {id(v) for v in self.graph.inputs} | {
            id(v) for v in self.graph.initializers.values()
        }
        for node in self.graph:
            for value in node.inputs:
                if value is not None and id(value) not in defined and value.producer() is None:
                    raise LensError(f"node {node.name} reads {value.name}, which nothing defines")
            defined.update(id(v) for v in node.outputs)
        if not checker:
            return
        try:
            with unwrapped():
                CheckerPass(full_check=full)(self.ir)
        except LensError:
            raise
        except Exception as exc:
            if runtime_contrib_op(str(exc)):
                return  # onnxruntime's ops in the default domain: judged by running it
            raise LensError(f"rewritten model fails the ONNX checker: {_first_line(exc)}") from exc

    def to_proto(self) -> onnx.ModelProto:
        return ir.serde.serialize_model(self.ir)

    @contextlib.contextmanager
    def skeleton(self, keep=frozenset(), limit: int = 4096):
        """The model as a small ModelProto: initializers over `limit` bytes (except those in
        `keep`) become graph inputs with no data, so running it costs no serialisation of
        the weights. Yields (proto, {input name: (shape, numpy dtype)}); the model is restored
        afterwards."""
        graph = self.graph
        moved = []
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if tensor is None or tensor.nbytes <= limit or value.name in keep or value in graph.inputs:
                continue
            moved.append((value, tensor))
            value.shape, value.dtype = ir.Shape(tensor.shape), tensor.dtype
            graph.initializers.pop(value.name)
            value.const_value = None
            graph.inputs.append(value)
        try:
            with unwrapped():
                proto = ir.serde.serialize_model(self.ir)
            yield proto, {v.name: (tuple(t.shape), t.dtype.numpy()) for v, t in moved}
        finally:
            for value, tensor in moved:
                graph.inputs.remove(value)
                value.const_value = tensor
                graph.register_initializer(value)

    def nbytes(self) -> int:
        return sum(v.const_value.nbytes for v in self.graph.initializers.values() if v.const_value is not None)

    def read_written(self, staged: StagedModel) -> None:
        """Point every weight `staged` streamed at its bytes in the written files (still in its
        hidden folder): the model in memory then reads what was written, as one loaded from those
        files would (safety.open_model: the small ones read into memory), and holds none of what the
        streamed weights were computed from (initializers of 1 KiB or less are not streamed: they
        stay as they are)."""
        own = os.path.basename(staged.path)
        for value in self.graph.initializers.values():
            if value.name not in staged.placed:
                continue
            location, offset, length = staged.placed[value.name]
            tensor = value.const_value
            if length <= (wire.KEPT if location == own else SMALL_TENSOR) and tensor.dtype.bitwidth % 8 == 0:
                written = file_tensor(os.path.join(staged.tmpdir, location), offset, tensor.dtype, tensor.shape,
                                      value.name)
                value.const_value = ir.Tensor(written.numpy(), name=value.name, doc_string=tensor.doc_string,
                                              metadata_props=dict(tensor.metadata_props))
                continue
            value.const_value = ir.ExternalTensor(
                location, offset, length, tensor.dtype, shape=ir.Shape(tensor.shape), name=value.name,
                doc_string=tensor.doc_string, metadata_props=dict(tensor.metadata_props), base_dir=staged.tmpdir)

    # -- writing ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike, external_data: str | bool | None = None,
             replace_input: bool = False) -> str:
        """Write atomically (see atomic.py): complete under the final names, or not at all."""
        with self.stage(path, external_data, replace_input) as staged:
            pass
        return staged.path

    def stage(self, path: str | os.PathLike, external_data: str | bool | None = None,
              replace_input: bool = False) -> StagedModel:
        """Write beside `path` without publishing; the caller commits or discards.

        External data is used when asked for, when the input had it, or when the model is
        over 2 GB; its file is a plain name in the output's folder (default: OUTPUT.data).
        """
        path = os.path.abspath(os.fspath(path))
        infer_shapes(self.ir)  # for nodes a pass added: Netron draws every edge with its shape
        if external_data is None and (self.external_input or self.nbytes() > EXTERNAL_ABOVE):
            external_data = True
        data_name = None
        if isinstance(external_data, str):  # a name, checked by stage (an empty one is refused)
            data_name = external_data
        elif external_data:
            data_name = os.path.basename(path) + ".data"
        return stage(self.ir, path, data_name, protected=self.input_files, replace_input=replace_input)


def _applied(raw: str | None) -> list[str] | None:
    """The pass names in the model's record of what was applied; None if it is not such a list."""
    if not raw:
        return []
    try:
        names = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        return None
    return names


def _read_in_place(model: ir.Model, path: str) -> None:
    """Make every large initializer a tensor read from its file only when used.

    safety.py has checked every reference; the model's own initializers point at their
    bytes inside the model file (see safety.open_model), the others into data files in
    the model's folder.
    """
    folder = os.path.dirname(os.path.abspath(path))
    ir.external_data.set_base_dir(model.graph, folder)
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor):
                continue
            if not readable_in_place(tensor):
                continue  # packed sub-byte types: onnx-ir's own memory map
            where = os.path.join(folder, tensor.location)
            if tensor.location == os.path.basename(path):
                where = os.path.abspath(path)
            value.const_value = file_tensor(where, tensor.offset or 0, tensor.dtype, tensor.shape, tensor.name)


def _clean_and_sorted(graph: ir.Graph) -> bool:
    """Every node feeds something, and reads only what comes before it."""
    return all(any(o.uses() or o.is_graph_output() for o in node.outputs) for node in graph) and is_sorted(graph)


def is_sorted(graph: ir.Graph) -> bool:
    """Whether every node reads only the graph's inputs and initializers and what nodes before it make."""
    made = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    for node in graph:
        if any(v is not None and id(v) not in made for v in node.inputs):
            return False
        made.update(id(o) for o in node.outputs)
    return True


def infer_shapes(model: ir.Model, always: bool = False) -> None:
    """Give intermediate tensors their shapes: ranks help matching, and Netron draws them.

    Skipped when every node output already has a type and shape (dynamo's exports carry
    them all), unless `always` (nodes were just added). A convenience, never a blocker: onnx-ir logs a failure with its traceback,
    which would break the one-line error promise, so its logger is quietened for the call.
    """
    if not always and all(v.dtype is not None and v.shape is not None for node in model.graph for v in node.outputs):
        return
    logger = logging.getLogger("onnx_ir.passes.common.shape_inference")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        ShapeInferencePass()(model)
    except Exception:
        pass
    finally:
        logger.setLevel(level)


def infer_shapes_of(model: ir.Model, nodes: list[ir.Node]) -> None:
    """Shapes for the outputs of `nodes` only (nodes just added to a graph whose other tensors all
    have theirs): ONNX's inference over those nodes alone, their inputs given as typed values (small
    constants with their values, for shape arithmetic). A whole-graph pass costs about 1 s at 30
    layers; this costs the new nodes' share. Falls back to the whole graph where the rest is not
    fully typed."""
    new, made = {id(n) for n in nodes}, {id(v) for n in nodes for v in n.outputs}
    reads = {id(v): v for n in nodes for v in n.inputs if v is not None and id(v) not in made}
    rest_typed = all(v.dtype is not None and v.shape is not None
                     for node in model.graph if id(node) not in new for v in node.outputs)
    named = all(v.name and v.dtype is not None for v in reads.values()) and \
        all(v.name for n in nodes for v in n.outputs)
    if not (nodes and rest_typed and named):
        infer_shapes(model, always=True)
        return
    typed = [ir.serde.serialize_value(v) for v in reads.values()]
    small = [ir.serde.serialize_tensor(v.const_value) for v in reads.values()
             if v.const_value is not None and v.const_value.nbytes <= SHAPE_CONSTANT]
    graph = onnx.helper.make_graph([ir.serde.serialize_node(n) for n in nodes], "new", typed,
                                   [ir.serde.serialize_value(o) for n in nodes for o in n.outputs], small)
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    try:
        inferred = onnx.shape_inference.infer_shapes(onnx.helper.make_model(graph, opset_imports=opsets,
                                                                              ir_version=model.ir_version),
                                                     data_prop=True)
    except Exception:
        return  # a convenience, as infer_shapes is
    found = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.output)}
    for node in nodes:
        for out in node.outputs:
            info = found.get(out.name)
            if info is None or not info.type.HasField("tensor_type"):
                continue
            value = ir.serde.deserialize_value_info_proto(info, None)
            out.dtype = out.dtype or value.dtype
            if value.shape is not None:
                out.shape = value.shape


def _innermost(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
