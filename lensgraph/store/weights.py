"""WeightStore: reading initializers and writing them back copy-on-write.

Exporters de-duplicate identical tensors, so one initializer may feed several nodes
(all LayerNorm scales, a tied embedding and unembedding). A rewrite that changes the
weight seen by one node must never change what the others see: a shared initializer
is copied for the node being rewritten, and only an exclusively used one is replaced.
Arithmetic is done in float64 and stored back in the tensor's own dtype. Matrices are
handed to passes as `Deferred` (see deferred.py): their changes are recorded, not applied,
and computed once, block by block, when the model is written.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..graph import match
from .deferred import Deferred, DeferredTensor, check_fits, is_centred
from .filetensor import FileTensor


class WeightStore:
    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self._names = {v.name for v in graph.initializers.values()}
        self.copies = 0  # shared initializers copied instead of edited
        self.written = 0

    def dtype(self, value: ir.Value) -> np.dtype:
        return _np_dtype(value)

    def read(self, value: ir.Value) -> np.ndarray:
        """A fresh float64 copy of the stored values: the caller may change it in place."""
        return np.array(self.stored(value), dtype=np.float64)

    def matrix(self, value: ir.Value) -> Deferred:
        """The 2-D constant behind `value` as a Deferred: nothing is read until a product is asked."""
        source = match.const_source(value)
        tensor = source.const_value if source is not None else None
        if tensor is None or not tensor.dtype.is_floating_point():
            tensor = ir.tensor(self.stored(value))
        if len(tensor.shape) != 2:
            raise ValueError(f"{value.name}: a matrix was expected, found shape {tuple(tensor.shape)}")
        return Deferred.of(tensor)

    def stored(self, value: ir.Value, populate: bool = True) -> np.ndarray:
        """The values as stored (read-only use: checks that need no float64 copy). A weight still in
        its file is its memory map (read-only, no copy; see FileTensor.mapped for `populate`): a
        caller that keeps it copies it."""
        source = match.const_source(value)
        if source is not None and isinstance(source.const_value, FileTensor):
            return source.const_value.mapped(populate)
        arr = match.const_value(value)
        if arr is None:
            raise ValueError(f"{value.name} is not a constant")
        return arr

    def expect_centred(self, value: ir.Value, axis: int, what: str, view: Deferred | None = None) -> bool:
        """Post-condition: the matrix behind `value` (seen as `view`, default as stored) has zero
        mean over `axis`. Stored values are checked now. A deferred matrix has no values yet:
        the check goes with it and is made on the values as they are written (see
        DeferredTensor.expect_centred), so True here means "checked when written"."""
        source = match.const_source(value)
        tensor = source.const_value if source is not None else None
        view = view if view is not None else self.matrix(value)
        if isinstance(tensor, DeferredTensor):
            tensor.expect_centred(view, axis, what)
            return True
        return is_centred(view, axis, self.dtype(value))

    def _unique(self, base: str) -> str:
        name, k = base, 1
        while name in self._names or self.graph.initializers.get(name) is not None:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def new_initializer(self, name: str, array: np.ndarray | Deferred, dtype=None) -> ir.Value:
        """A new initializer holding `array` in `dtype` (default: the array's own)."""
        name = self._unique(name)
        tensor = self._tensor(array, name, dtype)
        value = ir.Value(name=name, const_value=tensor)
        value.shape = ir.Shape(array.shape)
        value.dtype = tensor.dtype
        self.graph.register_initializer(value)
        return value

    def _tensor(self, array: np.ndarray | Deferred, name: str, dtype=None) -> ir.TensorProtocol:
        """The stored tensor for `array` in `dtype` (default: its own).

        A Deferred stays deferred: it is computed while it is written. Only one seen
        transposed (a weight given its own initializer in the reader's layout) is computed now.
        """
        if isinstance(array, Deferred):
            dtype = np.dtype(dtype or array.src.dtype)
            if not array.flipped:
                return DeferredTensor(array, dtype, name)
            array = np.asarray(array)
        dtype = np.dtype(dtype or array.dtype)
        exact = np.asarray(array)
        stored = exact.astype(dtype, order="C")
        check_fits(exact, stored, name)
        return ir.tensor(stored, name=name)

    def write(self, node: ir.Node, idx: int, array: np.ndarray | Deferred, dtype=None) -> ir.Value:
        """Give input `idx` of `node` the constant `array`, without touching other users.

        The initializer is replaced in place only when this node's input is its one use;
        otherwise (shared, or a Constant node) a new initializer is made for this input.
        """
        old = node.inputs[idx]
        dtype = np.dtype(dtype) if dtype is not None else _np_dtype(old)
        if not isinstance(array, Deferred):
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

    def matrix(self, lin) -> Deferred:
        """W as [in, out], deferred: what a pass changes is computed when the model is written."""
        m = self.store.matrix(lin.source)
        for node in reversed(lin.path):
            if node.op_type == "Transpose":
                m = m.T
        return m.T if lin.transposed else m

    def expect_centred(self, lin, axis: int, what: str) -> bool:
        """Post-condition on W as [in, out]: zero mean over `axis` (see WeightStore.expect_centred)."""
        return self.store.expect_centred(lin.source, axis, what, view=self.matrix(lin))

    def weight(self, lin, stored: bool = False, populate: bool = True) -> np.ndarray:
        """W as [in, out] in float64 (a fresh copy), or with `stored` as kept (read-only: checks, and
        copies that compute nothing; `populate` as in WeightStore.stored)."""
        arr = self.store.stored(lin.source, populate) if stored else self.store.read(lin.source)
        for node in reversed(lin.path):
            if node.op_type == "Transpose":
                arr = arr.T
        return arr.T if lin.transposed else arr

    def set_weight(self, lin, w: np.ndarray | Deferred) -> None:
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
            value = self.store.new_initializer(name, np.asarray(c, np.float64), dtype)
            lin.node.resize_inputs(3)
            lin.node.replace_input_with(2, value)
            lin.bias = (lin.node, 2)
        else:
            lin.bias = (self.add_after(lin.node, self.store.new_initializer(name, np.asarray(c, np.float64), dtype)), 1)
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
