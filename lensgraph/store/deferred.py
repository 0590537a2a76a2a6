"""Deferred matrices: a weight kept as its stored values plus the affine changes passes make.

Every rewrite of the weight processing is affine in a matrix B: scaling rows or columns
(fold_ln), adding a bias-like vector along an axis (centring), and reading vector products
(b @ W for a bias fold, means for centring). So a rewritten matrix is always

    final = r[:, None] * c[None, :] * B + a[:, None] + b[None, :] + sum_k p_k[:, None] * q_k[None, :]

with B as stored. Keeping that form instead of the numbers means a pass costs one read of B
per product it asks for, nothing is held at full size, and each matrix is computed once,
in float64 row blocks that fit in the processor's cache, while the writer streams it out.

`Deferred` is that form, immutable (every change returns a new one), seen in the
orientation the caller asked for (`.T` flips it at no cost). `Source` reads B in row
blocks and remembers the products asked of it, so a mean taken again is not a second read.
`DeferredTensor` is the onnx-ir tensor the model holds until it is written.
"""

from __future__ import annotations

import functools
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir

from ..errors import LensError
from .filetensor import FileTensor, write_in_pieces

BLOCK = 1 << 20  # bytes of stored values per row block: small enough to stay in cache


class Source:
    """A stored 2-D tensor, read in row blocks; remembers the products computed from it."""

    def __init__(self, tensor: ir.TensorProtocol):
        self.tensor = tensor
        self.shape = tuple(int(d) for d in tensor.shape.numpy())
        self.dtype = np.dtype(tensor.dtype.numpy())
        self._products: dict = {}
        self._absmax: float | None = None

    @classmethod
    def of(cls, tensor: ir.TensorProtocol) -> "Source":
        """The Source of `tensor`: one per file-backed tensor, so every matrix derived from
        it (a table and its untied unembedding, say) shares the products already read."""
        if not isinstance(tensor, FileTensor):
            return cls(tensor)
        if tensor.source_of_products is None:
            tensor.source_of_products = cls(tensor)
        return tensor.source_of_products

    def values(self) -> np.ndarray:
        """The stored values as a 2-D array: a memory map of the file for a FileTensor."""
        if isinstance(self.tensor, FileTensor):
            return self.tensor.mapped().reshape(self.shape)
        return np.asarray(self.tensor.numpy()).reshape(self.shape)

    def rows_per_block(self) -> int:
        return max(1, BLOCK // max(1, self.shape[1] * self.dtype.itemsize))

    def blocks(self, stored: np.ndarray):
        """Yield (first row, float64 block) over all rows of `stored`, in one reused buffer."""
        step = self.rows_per_block()
        out = np.empty((min(step, self.shape[0]), self.shape[1]), np.float64)
        for first in range(0, self.shape[0], step):
            k = min(step, self.shape[0] - first)
            np.copyto(out[:k], stored[first:first + k])
            yield first, out[:k]

    def products(self, left=(), right=()) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """x @ B for each x in `left` and B @ y for each y in `right` (None: all ones), in one read.

        Every read also takes the column and row sums and max |B|: centring asks for them,
        and on a block already in cache they cost little next to a second read.
        """
        keys_l = [("L", _key(x)) for x in left]
        keys_r = [("R", _key(y)) for y in right]
        todo_l = [(k, x) for k, x in zip(keys_l, left) if k not in self._products]
        todo_r = [(k, y) for k, y in zip(keys_r, right) if k not in self._products]
        if todo_l or todo_r or self._absmax is None:
            for side, todo in (("L", todo_l), ("R", todo_r)):
                if (side, None) not in self._products and all(k != (side, None) for k, _ in todo):
                    todo.append(((side, None), None))
            n_rows, n_cols = self.shape
            xs, ys = np.ones((len(todo_l), n_rows)), np.ones((n_cols, len(todo_r)))
            for i, (_, x) in enumerate(todo_l):
                if x is not None:
                    xs[i] = x
            for i, (_, y) in enumerate(todo_r):
                if y is not None:
                    ys[:, i] = y
            outs = np.empty((n_rows, len(todo_r)))
            acc, absmax = np.zeros((len(todo_l), n_cols)), 0.0
            for start, block in self.blocks(self.values()):
                stop = start + len(block)
                acc += xs[:, start:stop] @ block
                outs[start:stop] = block @ ys
                absmax = max(absmax, float(block.max()), -float(block.min()))
            self._absmax = absmax
            for i, (k, _) in enumerate(todo_l):
                self._products[k] = _frozen(acc[i].copy())
            for i, (k, _) in enumerate(todo_r):
                self._products[k] = _frozen(outs[:, i].copy())
        return [self._products[k] for k in keys_l], [self._products[k] for k in keys_r]

    def absmax(self) -> float:
        if self._absmax is None:
            self.products()
        return self._absmax


def _frozen(v: np.ndarray) -> np.ndarray:
    v.flags.writeable = False  # handed out as is: a caller must not change the cache
    return v


def _key(v: np.ndarray | None):
    return None if v is None else (v.shape, v.tobytes())


def _mul(u, v):
    """Elementwise product where None stands for all ones."""
    if u is None:
        return v
    if v is None:
        return u
    return u * v


def _add(u, v):
    if u is None:
        return v
    if v is None:
        return u
    return u + v


def _sum(v, n: int) -> float:
    return float(n) if v is None else float(v.sum())


def _dot(u, v, n: int) -> float:
    if u is None and v is None:
        return float(n)
    if u is None:
        return float(v.sum())
    if v is None:
        return float(u.sum())
    return float(u @ v)


class Deferred:
    """A matrix as `Source` values plus affine changes; see the module docstring.

    The public methods speak in the caller's orientation (axis 0 = rows as the caller sees
    them); internally everything is in the stored orientation, `flipped` says whether the
    caller sees the transpose.
    """

    __slots__ = ("src", "r", "c", "a", "b", "terms", "flipped")

    def __init__(self, src: Source, r=None, c=None, a=None, b=None, terms=(), flipped=False):
        self.src, self.r, self.c, self.a, self.b = src, r, c, a, b
        self.terms, self.flipped = tuple(terms), flipped

    @classmethod
    def of(cls, tensor: ir.TensorProtocol) -> "Deferred":
        if isinstance(tensor, DeferredTensor):
            return tensor.matrix
        return cls(Source.of(tensor))

    def _with(self, **changes) -> "Deferred":
        state = {k: getattr(self, k) for k in self.__slots__}
        state.update(changes)
        return Deferred(**state)

    # -- shape ------------------------------------------------------------------------
    @property
    def stored_shape(self) -> tuple[int, int]:
        return self.src.shape

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.src.shape
        return (cols, rows) if self.flipped else (rows, cols)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def T(self) -> "Deferred":
        return self._with(flipped=not self.flipped)

    def _axis(self, axis: int) -> int:
        """The stored axis behind the caller's `axis`."""
        axis = axis % 2
        return 1 - axis if self.flipped else axis

    # -- changes (each returns a new Deferred) -------------------------------------------
    def scaled(self, v: np.ndarray, axis: int) -> "Deferred":
        """Multiply along `axis`: rows by v (axis 0) or columns by v (axis 1)."""
        v = np.asarray(v, np.float64).reshape(-1)
        if self._axis(axis) == 0:
            terms = [(p * v, q) for p, q in self.terms]
            if self.b is not None:  # a column term times a row scale is a general product
                terms.append((v, self.b))
            return self._with(r=_mul(self.r, v), a=_mul(self.a, v) if self.a is not None else None,
                              b=None, terms=terms)
        terms = [(p, q * v) for p, q in self.terms]
        if self.a is not None:
            terms.append((self.a, v))
        return self._with(c=_mul(self.c, v), b=_mul(self.b, v) if self.b is not None else None,
                          a=None, terms=terms)

    def plus(self, v: np.ndarray, axis: int) -> "Deferred":
        """Add v[i] along `axis`: to every row i (axis 0, v over rows) or column (axis 1)."""
        v = np.asarray(v, np.float64).reshape(-1)
        if self._axis(axis) == 0:
            return self._with(a=_add(self.a, v))
        return self._with(b=_add(self.b, v))

    def centred(self, axis: int) -> "Deferred":
        """Subtract the mean over `axis` (axis 1: each row's mean; axis 0: each column's)."""
        mean = self.mean(axis)
        return self.plus(-mean, 1 - axis % 2)

    # -- products and means (float64) -------------------------------------------------------
    def left(self, x: np.ndarray) -> np.ndarray:
        """x @ M for x over the caller's rows."""
        return self.lefts([x])[0]

    def lefts(self, xs) -> list[np.ndarray]:
        """x @ M for each x, from one read of the stored values (None stands for all ones)."""
        xs = [None if x is None else np.asarray(x, np.float64).reshape(-1) for x in xs]
        return self._products(xs, stored_axis=self._axis(0))

    def right(self, y: np.ndarray) -> np.ndarray:
        """M @ y for y over the caller's columns."""
        y = None if y is None else np.asarray(y, np.float64).reshape(-1)
        return self._products([y], stored_axis=self._axis(1))[0]

    def mean(self, axis: int) -> np.ndarray:
        """The mean over `axis` (axis 1: one value per row; axis 0: one per column)."""
        n = self.shape[axis % 2]
        return (self.left(None) if axis % 2 == 0 else self.right(None)) / max(n, 1)

    def _products(self, vs, stored_axis: int) -> list[np.ndarray]:
        """v @ M over stored rows (stored_axis 0) or M @ v over stored columns (1)."""
        n_rows, n_cols = self.src.shape
        if stored_axis == 0:
            base, _ = self.src.products(left=[_mul(v, self.r) for v in vs])
            outer, inner, length = self.c, self.a, n_rows
        else:
            _, base = self.src.products(right=[_mul(self.c, v) for v in vs])
            outer, inner, length = self.r, self.b, n_cols
        along = self.b if stored_axis == 0 else self.a  # the vector term that survives the product
        results = []
        for v, out in zip(vs, base):
            out = out if outer is None else outer * out
            if inner is not None:
                out = out + _dot(v, inner, length)
            if along is not None:
                out = out + _sum(v, length) * along
            for p, q in self.terms:
                p, q = (p, q) if stored_axis == 0 else (q, p)
                out = out + _dot(v, p, length) * q
            results.append(out)
        return results

    def absmax_bound(self) -> float:
        """An upper bound of max |M| without computing M (a scale for tolerances)."""
        bound = self.src.absmax()
        for v in (self.r, self.c):
            if v is not None and v.size:
                bound *= float(np.abs(v).max())
        for v in (self.a, self.b):
            if v is not None and v.size:
                bound += float(np.abs(v).max())
        for p, q in self.terms:
            if p.size and q.size:
                bound += float(np.abs(p).max()) * float(np.abs(q).max())
        return bound

    # -- values ---------------------------------------------------------------------------
    def blocks(self):
        """Yield (first stored row, float64 block of the final values), in stored orientation.

        The block is one buffer, reused for the next: copy what must be kept.
        """
        for first, block in self.src.blocks(self.src.values()):
            last = first + len(block)
            if self.r is not None:
                block *= self.r[first:last, None]
            if self.c is not None:
                block *= self.c
            if self.a is not None:
                block += self.a[first:last, None]
            if self.b is not None:
                block += self.b
            for p, q in self.terms:
                block += p[first:last, None] * q
            yield first, block

    def stored_values(self, dtype=np.float64, name: str | None = None) -> np.ndarray:
        """The whole matrix in stored orientation as `dtype` (full size: for small uses)."""
        out = np.empty(self.src.shape, dtype)
        for first, block in self.blocks():
            np.copyto(out[first:first + len(block)], block, casting="unsafe")
            check_fits(block, out[first:first + len(block)], name)
        return out

    def __array__(self, dtype=None, copy=None):
        arr = self.stored_values()
        arr = arr.T if self.flipped else arr
        return arr if dtype is None else arr.astype(dtype)


def check_fits(exact: np.ndarray, stored: np.ndarray, name: str | None) -> None:
    """Refuse a rewritten value that its tensor's dtype cannot hold (float16 stops at 65504):
    stored as infinity it would turn the model's logits to NaN."""
    if stored.dtype.kind != "f" or stored.dtype.itemsize >= 8 or np.isfinite(stored).all():
        return
    bad = ~np.isfinite(stored) & np.isfinite(exact)
    if bad.any():
        value = float(exact[bad].reshape(-1)[0])
        raise LensError(f"tensor {name or '(unnamed)'}: the rewritten value {value:.6g} does not fit {stored.dtype} "
                        f"(largest {float(np.finfo(stored.dtype).max):.6g}); nothing was written")


def centring_tolerance(dtype) -> float:
    """How far from zero a mean may be, relative to max |values|, after rounding to `dtype`."""
    dtype = np.dtype(dtype)
    eps = np.finfo(dtype).eps if np.issubdtype(dtype, np.floating) else 0.0
    return max(1e-5, 8 * eps)


def is_centred(m: Deferred, axis: int, dtype) -> bool:
    """Whether M's mean over `axis` is zero to within the rounding of `dtype`.

    Computed from M's form: a real check of stored values (a matrix with no changes), but
    for a changed one it repeats the algebra that centred it. The written values of a
    DeferredTensor are checked with `DeferredTensor.expect_centred` instead.
    """
    scale = max(m.absmax_bound(), 1e-30)
    return float(np.abs(m.mean(axis)).max(initial=0.0)) <= centring_tolerance(dtype) * scale


class _Tally:
    """The written values' means over the axes a pass promised to be centred, block by block."""

    def __init__(self, expected: list, shape: tuple[int, int], dtype: np.dtype):
        self.expected, self.shape, self.dtype = expected, shape, dtype
        self.col_sums = np.zeros(shape[1]) if any(axis == 0 for axis, _ in expected) else None
        self.rows = any(axis == 1 for axis, _ in expected)
        self.worst_row_mean = self.absmax = 0.0

    def add(self, values: np.ndarray) -> None:
        """`values`: the next stored rows, exactly as written (the tensor's dtype)."""
        if not values.size:
            return
        self.absmax = max(self.absmax, float(values.max()), -float(values.min()))
        if self.rows:
            self.worst_row_mean = max(self.worst_row_mean,
                                      float(np.abs(values.mean(axis=1, dtype=np.float64)).max()))
        if self.col_sums is not None:
            self.col_sums += values.sum(axis=0, dtype=np.float64)

    def verify(self) -> None:
        limit = centring_tolerance(self.dtype) * max(self.absmax, 1e-30)
        for axis, what in self.expected:
            worst = self.worst_row_mean if axis == 1 else float(
                np.abs(self.col_sums / max(self.shape[0], 1)).max(initial=0.0))
            if not worst <= limit:
                raise LensError(f"{what}: the written values are not centred (a mean of {worst:.3g} "
                                f"where at most {limit:.3g} is rounding)")


class DeferredTensor(ir.LazyTensor):
    """The tensor a model holds for a `Deferred` matrix, in stored orientation and dtype.

    `copy_to` computes it block by block straight into a file (the writer's path);
    `numpy()` computes the whole of it, for the few uses that need every value at once.
    """

    def __init__(self, matrix: Deferred, dtype: np.dtype, name: str | None = None):
        if matrix.flipped:
            raise ValueError("a DeferredTensor holds a matrix in its stored orientation")
        self.matrix = matrix
        self.np_dtype = np.dtype(dtype)
        self.expected: list[tuple[int, str]] = []  # (stored axis, what): means that must come out zero
        # through a weak reference: a bound method would hold the tensor in a cycle, and with it the
        # weights it is computed from, until a garbage collection
        this = weakref.ref(self)
        super().__init__(lambda: this()._full(), ir.DataType.from_numpy(self.np_dtype), ir.Shape(matrix.stored_shape),
                         name=name)

    def __repr__(self) -> str:  # LazyTensor's would recurse through the bound method it holds
        return f"DeferredTensor(name={self.name!r}, shape={self.matrix.stored_shape}, dtype={self.np_dtype})"

    def expect_centred(self, view: Deferred, axis: int, what: str) -> None:
        """A pass's post-condition on values that do not exist yet: `view` (this tensor's matrix,
        as a pass sees it) has zero mean over `axis`. Checked on the values as they are computed
        for writing (or for `numpy()`); a failure raises LensError, so nothing is published."""
        if view.src is not self.matrix.src:
            raise ValueError("the view is not of this tensor's matrix")
        self.expected.append((view._axis(axis), what))

    def _tally(self) -> "_Tally | None":
        return _Tally(self.expected, self.matrix.src.shape, self.np_dtype) if self.expected else None

    def _full(self) -> ir.Tensor:
        values = self.matrix.stored_values(self.np_dtype, self.name)
        tally = self._tally()
        if tally is not None:
            tally.add(values)
            tally.verify()
        return ir.Tensor(values, name=self.name)

    def copy_to(self, f) -> None:
        """Write the values to `f`: each block is written by a helper thread while the next
        one is computed (the write releases the interpreter), through two alternating buffers."""
        step = self.matrix.src.rows_per_block()
        rows = min(step, self.matrix.src.shape[0])
        buffers = [np.empty((rows, self.matrix.src.shape[1]), self.np_dtype.newbyteorder("<")) for _ in range(2)]
        pending, tally = None, self._tally()
        try:
            for i, (_, block) in enumerate(self.matrix.blocks()):
                out = buffers[i % 2][:len(block)]
                np.copyto(out, block, casting="unsafe")
                check_fits(block, out, self.name)
                if tally is not None:
                    tally.add(out)
                if pending is not None:
                    pending.result()  # the other buffer is free again
                pending = _writer().submit(write_in_pieces, f, memoryview(out.reshape(-1).view(np.uint8)))
        finally:
            if pending is not None:  # never leave a write running after a failure
                pending.result()
        if tally is not None:
            tally.verify()


@functools.cache
def _writer() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="lensgraph-writer")
