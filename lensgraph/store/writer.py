"""Writing a model file with its weights streamed from their tensors, one at a time.

Serialising a whole ModelProto builds the complete message in memory (the model's size
again) before a byte reaches the disk. Here the graph without its large initializers
goes through onnx-ir (it is small); each large initializer is then written as its own
protobuf field with its bytes copied straight from the tensor, whose length is known up
front. Protobuf lets a message's fields come in any order, so the initializers simply
follow the rest of the graph inside the one `graph` field.

With external data the same TensorProto headers point into the data file, where each
tensor's bytes start on a 4 KiB boundary (onnxruntime can then map them directly).
"""

from __future__ import annotations

import contextlib
import os
import threading

import numpy as np
import onnx
import onnx_ir as ir

from .. import progress
from ..errors import unwrapped
from . import wire
from .deferred import DeferredTensor
from .filetensor import FileTensor

LIMIT = 1024  # initializers over this many bytes are streamed (or go to external data)
ALIGN = 4096


def write_model(model: ir.Model, path: str, data_name: str | None = None,
                limit: int = LIMIT) -> dict[str, tuple[str, int, int]]:
    """Write `model` to `path`; with `data_name`, large weights go to that file in `path`'s folder.
    Returns where each streamed weight's bytes now lie: {name: (file name, offset, length)}, the
    file named as the model's own file or its data file."""
    graph = model.graph
    large = [v for v in graph.initializers.values() if _streamable(v.const_value, limit)]
    with _detached(graph, large), unwrapped():
        proto = ir.serde.serialize_model(model)
    graph_bytes = proto.graph.SerializeToString()
    proto.ClearField("graph")
    head = proto.SerializeToString()
    total = sum(v.const_value.nbytes for v in large)
    placed = {}
    with open(path, "wb") as out, progress.bar(total, "writing", "B") as bar, Writeback(out) as sync:
        if data_name is None:
            headers = [_header(v) for v in large]
            sizes = [len(h) + len(wire.key(wire.TENSOR_RAW_DATA)) + len(wire.varint(v.const_value.nbytes))
                     + v.const_value.nbytes for h, v in zip(headers, large)]
            body = len(graph_bytes) + sum(_field_size(s) for s in sizes)
            out.write(head + wire.key(wire.MODEL_GRAPH) + wire.varint(body) + graph_bytes)
            for h, v, size in zip(headers, large, sizes):
                tensor = v.const_value
                out.write(wire.key(wire.GRAPH_INITIALIZER) + wire.varint(size) + h
                          + wire.key(wire.TENSOR_RAW_DATA) + wire.varint(tensor.nbytes))
                placed[v.name] = (os.path.basename(path), out.tell(), tensor.nbytes)
                _write_bytes(out, tensor)
                bar.update(tensor.nbytes)
                sync.written(tensor.nbytes)
            return placed
        data_path = os.path.join(os.path.dirname(path), data_name)
        headers = []
        with open(data_path, "wb") as data, Writeback(data) as data_sync:
            for v in large:
                offset = -data.tell() % ALIGN
                if offset:
                    data.write(b"\0" * offset)
                start = data.tell()
                _write_bytes(data, v.const_value)
                headers.append(_header(v, (data_name, start, v.const_value.nbytes)))
                placed[v.name] = (data_name, start, v.const_value.nbytes)
                bar.update(v.const_value.nbytes)
                data_sync.written(v.const_value.nbytes)
        chunk = b"".join(wire.key(wire.GRAPH_INITIALIZER) + wire.varint(len(h)) + h for h in headers)
        out.write(head + wire.key(wire.MODEL_GRAPH) + wire.varint(len(graph_bytes) + len(chunk))
                  + graph_bytes + chunk)
    return placed


class Writeback:
    """Flush a file being written to disk in the background, a batch at a time.

    The output is fsynced before it is published (atomic.py); started while later tensors
    are still being computed, that writeback overlaps the work instead of following it.
    """

    BATCH = 64 << 20  # bytes written between two background flushes

    def __init__(self, f):
        self.f, self.pending, self.thread = f, 0, None

    def written(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.BATCH and (self.thread is None or not self.thread.is_alive()):
            self.pending = 0
            self.f.flush()
            self.thread = threading.Thread(target=self._sync, daemon=True)
            self.thread.start()

    def _sync(self) -> None:
        try:
            os.fdatasync(self.f.fileno())
        except OSError:
            pass  # only a head start: the fsync before publishing reports any error

    def __enter__(self) -> "Writeback":
        return self

    def __exit__(self, *exc) -> None:
        if self.thread is not None:
            self.thread.join()  # the file must not close under a running flush


def _streamable(tensor, limit: int) -> bool:
    return (tensor is not None and tensor.nbytes > limit and not tensor.dtype.is_string())


def _field_size(size: int) -> int:
    return len(wire.key(wire.GRAPH_INITIALIZER)) + len(wire.varint(size)) + size


@contextlib.contextmanager
def _detached(graph: ir.Graph, values: list[ir.Value]):
    """Take `values` out of the graph's initializers while the rest is serialised."""
    for v in values:
        graph.initializers.pop(v.name)
    try:
        yield
    finally:
        for v in values:
            graph.register_initializer(v)


def _header(value: ir.Value, external: tuple[str, int, int] | None = None) -> bytes:
    """The TensorProto of `value` without its data (or pointing at it in the data file)."""
    tensor = value.const_value
    proto = onnx.TensorProto(name=value.name, dims=list(tensor.shape.numpy()), data_type=tensor.dtype.value)
    if tensor.doc_string:
        proto.doc_string = tensor.doc_string
    for k, v in tensor.metadata_props.items():
        proto.metadata_props.add(key=k, value=v)
    if external is not None:
        proto.data_location = onnx.TensorProto.EXTERNAL
        for k, v in zip(("location", "offset", "length"), external):
            proto.external_data.add(key=k, value=str(v))
    return proto.SerializeToString()


def _write_bytes(f, tensor) -> None:
    """Copy a tensor's bytes to `f` without building a second copy where the layout allows."""
    if isinstance(tensor, (FileTensor, DeferredTensor)):  # a piece at a time, never whole in memory
        tensor.copy_to(f)
        return
    if tensor.dtype.bitwidth % 8 == 0:
        arr = tensor.numpy()
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if not arr.flags.c_contiguous and arr.ndim > 1 and arr.size:
            _write_rows(f, arr, tensor)
            return
        data = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    else:
        data = memoryview(tensor.tobytes())
    if len(data) != tensor.nbytes:
        raise ValueError(f"tensor {tensor.name!r}: {len(data)} bytes, expected {tensor.nbytes}")
    f.write(data)


ROWS_BYTES = 1 << 22  # a view is laid out this many bytes at a time


def _write_rows(f, arr: np.ndarray, tensor) -> None:
    """A view that is not laid out in order (an exporter's transposed weight, whose transpose
    shares the model's memory) written a few rows at a time: never a whole second copy."""
    rows = max(1, ROWS_BYTES // max(1, arr[0].nbytes))
    written = 0
    for start in range(0, arr.shape[0], rows):
        piece = np.ascontiguousarray(arr[start:start + rows])
        f.write(memoryview(piece.reshape(-1).view(np.uint8)))
        written += piece.nbytes
    if written != tensor.nbytes:
        raise ValueError(f"tensor {tensor.name!r}: {written} bytes, expected {tensor.nbytes}")
