"""Opening an untrusted ONNX file: every check that runs before anything reads its weights.

A model may come from a stranger. Before onnx-ir memory-maps its external data or
onnxruntime runs it, `open_model` makes sure that it is a regular, parseable ONNX file;
that every external-data reference stays inside the model's folder and within its file;
that inline tensor data fits its shape; that it passes the full ONNX checker (types and
shapes); and that onnxruntime can evaluate every op it uses. Each failure is a
BadInputError naming the file and what is wrong with it.
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Iterator

import onnx
import onnx_ir as ir

from ..errors import BadInputError, LensError
from ..progress import runtime_log_level
from . import wire

SMALL_TENSOR = 1 << 16  # external tensors up to this size are read into memory on open
STANDARD_DOMAINS = {"": "", "ai.onnx": ""}  # the default domain has two spellings


def open_model(path: str, runtime: bool = True) -> tuple[onnx.ModelProto, set[str]]:
    """Parse `path` after checking it is safe and usable, without reading its large weights
    (without `runtime`, for reading a graph that is never run: onnxruntime's support unchecked).

    The model is parsed as its skeleton (wire.py): each large initializer stored in the
    file itself becomes external data pointing at its own bytes in the model file, so
    every check below runs on a message of a few megabytes, whatever the model's size.
    Small external tensors are read into the message (after their references are checked),
    since shape inference needs constant shapes. Returns the parsed skeleton and the real
    paths of the separate external data files it reads.
    """
    _check_file(path)
    try:
        data, cut = wire.skeleton(path)
        proto = onnx.ModelProto.FromString(data)
    except Exception as exc:  # protobuf and onnx raise many types for bad bytes
        raise BadInputError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from exc
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise BadInputError(f"{path}: not an ONNX model, or its graph has no nodes (truncated or not ONNX?)")
    data_files = check_external_data(proto, path)
    _inline_small_external(proto, path)
    _point_at_own_bytes(proto, path, cut)
    check_inline_data(proto, path)
    try:  # full: types and shapes too
        onnx.checker.check_model(_without_external(proto), full_check=True)
    except Exception as exc:
        if not runtime_contrib_op(str(exc)):
            raise BadInputError(f"{path}: fails the ONNX checker ({_first_line(exc)})") from exc
    if runtime:
        check_runtime_support(proto, path)
    return proto, data_files


def _without_external(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for the checker where external initializers are typed graph inputs instead.

    The checker would look for external files relative to the working folder; their
    references are checked above, and their types and shapes still take part here.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    graph = copy.graph
    keep = [t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    moved = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if moved:
        names = {i.name for i in graph.input}
        graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                           for t in moved if t.name not in names)
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return copy


def _point_at_own_bytes(proto: onnx.ModelProto, path: str, cut: list) -> None:
    initializers = proto.graph.initializer
    for piece in cut:
        tensor = initializers[piece.index]
        needed = _nbytes(tensor)
        if needed is not None and needed != piece.length:
            raise BadInputError(f"{path}: tensor {tensor.name!r} of shape {list(tensor.dims)} holds "
                                f"{piece.length} bytes, not {needed}")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", os.path.basename(path)), ("offset", piece.offset),
                     ("length", piece.length)):
            tensor.external_data.add(key=k, value=str(v))


def _inline_small_external(proto: onnx.ModelProto, path: str) -> None:
    """Read external tensors up to SMALL_TENSOR bytes into the message (references already checked)."""
    folder = os.path.dirname(os.path.abspath(path))
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        length = int(info["length"]) if "length" in info else _nbytes(tensor)
        if length is None or length > SMALL_TENSOR:
            continue
        with open(os.path.join(folder, info["location"]), "rb") as f:
            f.seek(int(info.get("offset", 0)))
            tensor.raw_data = f.read(length)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise BadInputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise BadInputError(f"{path}: is a directory, not an ONNX file")
    if not os.path.isfile(path):
        raise BadInputError(f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise BadInputError(f"{path}: empty file")


# -- external data ------------------------------------------------------------------------
def all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in the model: initializers, sparse ones, attributes, subgraphs, functions."""

    def in_graph(graph: onnx.GraphProto):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        yield from in_nodes(graph.node)

    def in_nodes(nodes):
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices
                if attr.HasField("g"):
                    yield from in_graph(attr.g)
                for g in attr.graphs:
                    yield from in_graph(g)

    yield from in_graph(proto.graph)
    for function in proto.functions:
        yield from in_nodes(function.node)


def check_external_data(proto: onnx.ModelProto, model_path: str) -> set[str]:
    """Refuse any external-data reference that could read outside the model's folder.

    Absolute locations, `..` escapes and symlinks that lead out of the folder are refused
    (a downloaded model must not read, say, ~/.ssh through its weights), and so are files
    too short for the offset and length they are read at (a memory map past the end).
    Returns the real paths of the data files it reads.
    """
    folder = os.path.realpath(os.path.dirname(os.path.abspath(model_path)))
    files = set()
    for tensor in all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        where = f"{model_path}: tensor {tensor.name!r}"
        location = info.get("location", "")
        if not location:
            raise BadInputError(f"{where}: external data has no location")
        if location.endswith(("/", "\\")):
            raise BadInputError(f"{where}: external data location {location!r} names a folder, not a file")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
            raise BadInputError(f"{where}: external data location {location!r} is absolute; "
                                "only files inside the model's folder are read")
        try:
            target = os.path.realpath(os.path.join(folder, location))
        except (ValueError, OSError) as exc:
            raise BadInputError(f"{where}: external data location {location!r} is unusable ({exc})") from exc
        if os.path.commonpath([folder, target]) != folder:
            raise BadInputError(f"{where}: external data location {location!r} leads outside the model's "
                                f"folder {folder} (through '..' or a symlink)")
        if not os.path.isfile(target):
            raise BadInputError(f"{where}: external data file {location!r} does not exist or is not a regular file")
        if os.stat(target).st_nlink > 1:  # a hard link can share the bytes of any file on the machine
            raise BadInputError(f"{where}: external data file {location!r} has {os.stat(target).st_nlink} hard "
                                "links; refusing it, as it may be a file from outside the model's folder")
        offset, length = _int_entry(info, "offset", where), _int_entry(info, "length", where)
        needed = _nbytes(tensor)
        if length is not None and needed is not None and length != needed:
            raise BadInputError(f"{where}: external data length {length} does not match its shape "
                                f"({needed} bytes)")
        end = (offset or 0) + (length if length is not None else needed or 0)
        size = os.path.getsize(target)
        if end > size:
            raise BadInputError(f"{where}: external data file {location!r} has {size} bytes, "
                                f"too short for offset {offset or 0} + length {end - (offset or 0)}")
        files.add(target)
    return files


def check_inline_data(proto: onnx.ModelProto, path: str) -> None:
    """Refuse tensors whose stored data does not fit their type and shape.

    The ONNX checker does not compare them; a mismatch would surface much later, as a
    failed reshape in the middle of a rewrite.
    """
    for tensor in all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        try:
            dtype = ir.DataType(tensor.data_type)
        except ValueError:
            raise BadInputError(f"{path}: tensor {tensor.name!r} has unknown data type {tensor.data_type}") from None
        count = math.prod(tensor.dims)
        if tensor.HasField("raw_data"):
            have, want = len(tensor.raw_data), _nbytes(tensor)
        elif dtype.is_string() or dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128) or dtype.bitwidth < 8:
            continue  # rare layouts: left to onnx and onnxruntime
        else:
            have, want = len(getattr(tensor, onnx.helper.tensor_dtype_to_field(tensor.data_type))), count
        if want is not None and have != want:
            raise BadInputError(f"{path}: tensor {tensor.name!r} of shape {list(tensor.dims)} holds {have} "
                                f"{'bytes' if tensor.HasField('raw_data') else 'values'}, not {want}")


def _int_entry(info: dict, key: str, where: str) -> int | None:
    if key not in info:
        return None
    try:
        value = int(info[key])
    except ValueError:
        raise BadInputError(f"{where}: external data {key} {info[key]!r} is not an integer") from None
    if value < 0:
        raise BadInputError(f"{where}: external data {key} {value} is negative")
    return value


def _nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's shape and type need, or None where that is not fixed (strings)."""
    try:
        bits = ir.DataType(tensor.data_type).bitwidth
    except (ValueError, TypeError):
        return None
    return math.ceil(math.prod(tensor.dims) * bits / 8)


# -- what onnxruntime can evaluate --------------------------------------------------------
def check_runtime_support(proto: onnx.ModelProto, path: str) -> None:
    """Refuse opsets and ops onnxruntime cannot evaluate: such a model cannot be verified.

    Custom-domain ops pass the ONNX checker unchecked, and so does an opset newer than any
    runtime knows; both would only fail later, in the middle of a run.
    """
    import onnxruntime as ort

    versions = {STANDARD_DOMAINS.get(o.domain, o.domain): o.version for o in proto.opset_import}
    reason = _runtime_refuses(proto.ir_version, "", 17)
    if reason:
        raise BadInputError(f"{path}: IR version {proto.ir_version} is not supported by onnxruntime "
                            f"{ort.__version__} ({reason})")
    for domain, version in versions.items():
        reason = _runtime_refuses(8, domain, version)
        if reason:
            raise BadInputError(f"{path}: opset {domain or 'ai.onnx'} version {version} is not supported by "
                                f"onnxruntime {ort.__version__} ({reason})")
    for function in proto.functions:  # a function's body may import opsets of its own
        for o in function.opset_import:
            versions.setdefault(STANDARD_DOMAINS.get(o.domain, o.domain), o.version)
    known = runtime_ops()
    local = {(f.domain, f.name) for f in proto.functions}
    for node in _all_nodes(proto):
        domain = STANDARD_DOMAINS.get(node.domain, node.domain)
        if (node.domain, node.op_type) in local:
            continue
        since = known.get((domain, node.op_type))
        if since is None or since > versions.get(domain, 0):
            what = f"{domain}::{node.op_type}" if domain else node.op_type
            label = node.name or ",".join(node.output) or node.op_type
            raise BadInputError(f"{path}: node {label!r} uses op {what}, which onnxruntime "
                                f"cannot evaluate at {domain or 'ai.onnx'} opset {versions.get(domain, 'none')}")


def _all_nodes(proto: onnx.ModelProto):
    def walk(nodes):
        for node in nodes:
            yield node
            for attr in node.attribute:
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from walk(g.node)

    yield from walk(proto.graph.node)
    for function in proto.functions:
        yield from walk(function.node)


def runtime_contrib_op(message: str) -> bool:
    """Whether the checker only objects to an op that onnxruntime registers in the default
    domain (its optimiser writes SimplifiedLayerNormalization there); the ops are still
    checked against onnxruntime below, and every rewrite is verified by running it."""
    unknown = re.match(r"No Op registered for (\w+) with domain_version", message.strip())
    return bool(unknown) and ("", unknown.group(1)) in runtime_ops()


@functools.lru_cache(maxsize=None)
def runtime_ops() -> dict[tuple[str, str], int]:
    """(domain, op) -> the earliest opset at which onnxruntime has it.

    The list comes from onnxruntime's private `capi._pybind_state` module: onnxruntime
    (1.32) has no public equivalent, and `onnx.defs` lacks its com.microsoft ops. This is
    the one place lensgraph reads it; tests/test_layout.py fails the day it moves.
    """
    import onnxruntime as ort

    try:
        from onnxruntime.capi._pybind_state import get_all_operator_schema
    except ImportError as exc:
        raise LensError(f"onnxruntime {ort.__version__} no longer lists its operators "
                        f"(capi._pybind_state.get_all_operator_schema); lensgraph needs an update") from exc
    ops: dict[tuple[str, str], int] = {}
    for schema in get_all_operator_schema():
        key = (schema.domain, schema.name)
        ops[key] = min(ops.get(key, schema.since_version), schema.since_version)
    return ops


@functools.lru_cache(maxsize=None)
def _runtime_refuses(ir_version: int, domain: str, version: int) -> str | None:
    """Ask onnxruntime itself: load a one-Identity model with this IR version and opset."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    imports = [helper.make_opsetid(domain, version)] + ([helper.make_opsetid("", 17)] if domain else [])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    probe = helper.make_model(graph, opset_imports=imports, ir_version=ir_version)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    ort.set_default_logger_severity(runtime_log_level())
    try:
        ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        found = re.search(r"(Current official support[^\n]*|Unsupported model IR version[^\n]*)", str(exc))
        return found.group(1).strip() if found else _first_line(exc)[:200]
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
