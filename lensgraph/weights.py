"""WeightStore: reading initializers as float64 and writing them back copy-on-write.

Exporters de-duplicate identical tensors, so one initializer may feed several nodes
(all LayerNorm scales, a tied embedding and unembedding). A rewrite that changes the
weight seen by one node must never change what the others see: a shared initializer
is copied for the node being rewritten, and only an exclusively used one is replaced.
Arithmetic is done in float64 and stored back in the tensor's own dtype.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx_ir as ir

from . import match
from .errors import LensError


CHUNK = 1 << 24  # bytes per read or write when a tensor is converted or copied in pieces


class FileTensor(ir.LazyTensor):
    """A tensor whose bytes stay in a file at `offset` and are read each time they are used.

    `source` is a path or an open binary file. Plain reads, not a memory map: the bytes
    land in a buffer that is freed after use, so resident memory holds the tensors being
    rewritten, never the whole model. `float64` and `copy_to` work in pieces, so neither
    holds a second full-size copy. Little-endian byte order, as ONNX stores it.
    """

    def __init__(self, source, offset: int, dtype: ir.DataType, shape: ir.Shape, name: str | None):
        super().__init__(self._read, dtype, shape, name=name)
        self.source, self.offset = source, offset

    def _pieces(self, fn) -> None:
        """Call fn(fd, file offset, byte count) for each piece of the tensor's bytes."""
        def run(fd):
            for start in range(0, self.nbytes, CHUNK):
                fn(fd, self.offset + start, min(CHUNK, self.nbytes - start))

        if isinstance(self.source, (str, os.PathLike)):
            with open(self.source, "rb", buffering=0) as f:
                run(f.fileno())
        else:
            run(self.source.fileno())

    def _read(self) -> ir.Tensor:
        arr = np.empty(self.size, self.dtype.numpy())
        flat = memoryview(arr.view(np.uint8))
        self._pieces(lambda fd, at, n: _read_into(fd, flat[at - self.offset:at - self.offset + n], at, self.name))
        return ir.Tensor(arr.reshape(self.shape.numpy()), name=self.name)

    def float64(self) -> np.ndarray:
        out = np.empty(self.size, np.float64)
        dtype = np.dtype(self.dtype.numpy())
        item = dtype.itemsize
        buf = np.empty(min(CHUNK, self.nbytes), np.uint8)

        def convert(fd, at, n):
            _read_into(fd, memoryview(buf[:n]), at, self.name)
            first = (at - self.offset) // item
            out[first:first + n // item] = buf[:n].view(dtype)

        self._pieces(convert)
        return out.reshape(self.shape.numpy())

    def copy_to(self, f) -> None:
        buf = np.empty(min(CHUNK, self.nbytes), np.uint8)

        def copy(fd, at, n):
            _read_into(fd, memoryview(buf[:n]), at, self.name)
            f.write(memoryview(buf[:n]))

        self._pieces(copy)


def file_tensor(source, offset: int, dtype: ir.DataType, shape: ir.Shape, name: str | None) -> FileTensor:
    return FileTensor(source, offset, dtype, shape, name)


def _read_into(fd: int, view: memoryview, offset: int, name) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if not n:
            raise OSError(f"file ended before tensor {name!r} was read")
        done += n


class Spill:
    """A scratch file for rewritten tensors: once final, their bytes wait here, not in memory.

    Nearly every matrix of a model changes; kept in memory they would add up to the model's
    size. The file is unlinked from the start (the system removes it when it is closed)
    and lives in the output's folder when that exists, else in the temporary folder.
    """

    THRESHOLD = 1 << 20  # smaller tensors stay in memory

    def __init__(self, folder: str | None = None):
        folder = folder if folder and os.path.isdir(folder) else None
        self.file = tempfile.TemporaryFile(dir=folder, prefix=".lensgraph-spill-")

    def keep(self, array: np.ndarray, dtype: np.dtype, name: str) -> ir.TensorProtocol:
        """Store `array` (float64, any layout) as `dtype`, casting row blocks on the way out."""
        dtype = np.dtype(dtype)
        if array.size * dtype.itemsize < self.THRESHOLD or dtype.byteorder == ">" or array.ndim == 0:
            return ir.tensor(array.astype(dtype, order="C"), name=name)
        rows = max(1, CHUNK // max(1, (array.size // max(1, array.shape[0])) * 8))
        try:
            offset = self.file.seek(0, os.SEEK_END)
            for start in range(0, array.shape[0], rows):
                block = array[start:start + rows].astype(dtype, order="C")
                self.file.write(memoryview(block.reshape(-1).view(np.uint8)))
            self.file.flush()
        except OSError as exc:
            raise LensError(f"cannot write rewritten weights to a scratch file ({exc.strerror or exc})") from exc
        return file_tensor(self.file, offset, ir.DataType.from_numpy(dtype), ir.Shape(array.shape), name)


def readable_in_place(tensor) -> bool:
    """Whether `file_tensor` can stand for this external tensor (whole-byte types only)."""
    return isinstance(tensor, ir.ExternalTensor) and tensor.dtype.bitwidth % 8 == 0 and not tensor.dtype.is_string()


class WeightStore:
    def __init__(self, graph: ir.Graph, spill: Spill | None = None):
        self.graph = graph
        self.spill = spill  # where final rewritten tensors wait for the writer (None: in memory)
        self._names = {v.name for v in graph.initializers.values()}
        self.copies = 0  # shared initializers copied instead of edited
        self.written = 0

    def dtype(self, value: ir.Value) -> np.dtype:
        return _np_dtype(value)

    def read(self, value: ir.Value) -> np.ndarray:
        """A fresh float64 copy: the caller may change it in place."""
        source = match.const_source(value)
        tensor = source.const_value if source is not None else None
        if isinstance(tensor, FileTensor) and tensor.dtype.is_floating_point():
            return tensor.float64()  # converted piece by piece: no full-size copy in the file's dtype
        return np.array(self.stored(value), dtype=np.float64)

    def stored(self, value: ir.Value) -> np.ndarray:
        """The values as stored (read-only use: checks that need no float64 copy)."""
        arr = match.const_value(value)
        if arr is None:
            raise ValueError(f"{value.name} is not a constant")
        return arr

    def _unique(self, base: str) -> str:
        name, k = base, 1
        while name in self._names or self.graph.initializers.get(name) is not None:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def new_initializer(self, name: str, array: np.ndarray, dtype=None) -> ir.Value:
        """A new initializer holding `array` in `dtype` (default: the array's own)."""
        name = self._unique(name)
        tensor = self._tensor(array, name, dtype)
        value = ir.Value(name=name, const_value=tensor)
        value.shape = ir.Shape(array.shape)
        value.dtype = tensor.dtype
        self.graph.register_initializer(value)
        return value

    def _tensor(self, array: np.ndarray, name: str, dtype=None) -> ir.TensorProtocol:
        """The stored tensor for `array` in `dtype` (default: its own), spilled when large."""
        dtype = np.dtype(dtype or array.dtype)
        if self.spill is not None:
            return self.spill.keep(array, dtype, name)
        return ir.tensor(np.asarray(array).astype(dtype, order="C"), name=name)

    def write(self, node: ir.Node, idx: int, array: np.ndarray, dtype=None) -> ir.Value:
        """Give input `idx` of `node` the constant `array`, without touching other users.

        The initializer is replaced in place only when this node's input is its one use;
        otherwise (shared, or a Constant node) a new initializer is made for this input.
        """
        old = node.inputs[idx]
        dtype = np.dtype(dtype) if dtype is not None else _np_dtype(old)
        array = np.asarray(array, dtype=np.float64)
        self.written += 1
        uses = old.uses() if old is not None else []
        exclusive = (
            old is not None
            and old.is_initializer()
            and not old.is_graph_input()
            and not old.is_graph_output()
            and len(uses) == 1
        )
        if exclusive:
            old.const_value = self._tensor(array, old.name, dtype)
            old.shape = ir.Shape(array.shape)
            return old
        if old is not None and old.is_initializer():
            self.copies += 1
        base = old.name if old is not None and old.name else f"{node.name}_input{idx}"
        new = self.new_initializer(base, array, dtype)
        node.replace_input_with(idx, new)
        return new


def _np_dtype(value: ir.Value | None) -> np.dtype:
    if value is None or value.dtype is None:
        arr = match.const_value(value)
        return arr.dtype if arr is not None else np.dtype(np.float32)
    return value.dtype.numpy()


class LinearWeights:
    """Read and write a linear map's W (as [in, out]) and bias, whatever the node stores."""

    def __init__(self, store: WeightStore):
        self.store = store

    def dtype(self, lin) -> np.dtype:
        return _np_dtype(lin.node.inputs[1])

    def weight(self, lin, stored: bool = False) -> np.ndarray:
        """W as [in, out] in float64 (a fresh copy), or with `stored` as kept (for checks)."""
        arr = self.store.stored(lin.source) if stored else self.store.read(lin.source)
        for node in reversed(lin.path):
            if node.op_type == "Transpose":
                arr = arr.T
        return arr.T if lin.transposed else arr

    def set_weight(self, lin, w: np.ndarray) -> None:
        arr = w.T if lin.transposed else w
        target = lin.node.inputs[1]
        if lin.path and all(p.op_type == "Transpose" and len(p.outputs[0].uses()) == 1 for p in lin.path):
            # seen through Transposes read only by this map: keep them and store the source's
            # layout, so the weight is written as it was read (no transposing copy) and the
            # graph onnxruntime optimises is the one it had
            for _ in lin.path:
                arr = arr.T
            lin.source = self.store.write(lin.path[-1], 0, arr)
            return
        if lin.path:  # seen through Transpose/Cast: give this node its own initializer
            new = self.store.new_initializer(lin.source.name or target.name, arr, _np_dtype(target))
            lin.node.replace_input_with(1, new)
            self.store.written += 1
            lin.source, lin.path = new, []
        else:
            lin.source = self.store.write(lin.node, 1, arr)

    def bias(self, lin) -> np.ndarray:
        if lin.bias is None:
            return np.zeros(lin.d_out)
        node, idx = lin.bias
        return np.broadcast_to(self.store.read(node.inputs[idx]).reshape(-1), (lin.d_out,)).copy()

    def set_bias(self, lin, c: np.ndarray) -> None:
        """Write the bias, creating it (a Gemm C input or an Add after a MatMul) if missing."""
        dtype = _np_dtype(lin.node.inputs[1])
        if lin.bias is not None:
            node, idx = lin.bias
            old = match.const_value(node.inputs[idx])
            shape = old.shape if old is not None and old.size == lin.d_out else (lin.d_out,)
            self.store.write(node, idx, c.reshape(shape))
            return
        name = f"{lin.source.name or lin.name}.bias"
        if lin.node.op_type == "Gemm":
            value = self.store.new_initializer(name, c.astype(dtype))
            lin.node.resize_inputs(3)
            lin.node.replace_input_with(2, value)
            lin.bias = (lin.node, 2)
        else:
            lin.bias = (self.add_after(lin.node, self.store.new_initializer(name, c.astype(dtype))), 1)
        self.store.written += 1

    def add_after(self, node: ir.Node, bias: ir.Value) -> ir.Node:
        """Insert `out = node_out + bias` so every reader of the node's output sees the bias."""
        out = node.outputs[0]
        uses = list(out.uses())
        add = ir.Node("", "Add", [out, bias], name=f"{node.name}_bias")
        biased = add.outputs[0]
        biased.dtype, biased.shape = out.dtype, out.shape
        for use in uses:
            use.node.replace_input_with(use.idx, biased)
        graph = self.store.graph
        for i, v in enumerate(graph.outputs):
            if v is out:
                graph.outputs[i] = biased
        name = out.name
        out.name = f"{name}_before_bias"
        biased.name = name
        graph.insert_after(node, add)
        return add
