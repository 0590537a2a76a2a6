"""Deferred matrices against plain numpy: every change, product and mean, both orientations.

The matrices are random and the vectors non-trivial, so a wrong axis or a term lost when
a scale follows a centring shows up as a difference far above float64 rounding.
"""

from __future__ import annotations

import io

import numpy as np
import onnx_ir as ir
import pytest

from lensgraph.store.deferred import BLOCK, Deferred, DeferredTensor, Source, is_centred
from lensgraph.errors import LensError
from lensgraph.process import process
from lensgraph.store.filetensor import file_tensor


def _chain(m, M, rng):
    """The same changes on a Deferred `m` and on its numpy value `M`."""
    w, v, b = rng.normal(size=M.shape[0]), rng.normal(size=M.shape[1]), rng.normal(size=M.shape[0])
    m = m.scaled(w, 0).centred(0).plus(v, 1).scaled(v, 1).centred(1).plus(b, 0).scaled(w, 0)
    M = w[:, None] * M
    M = M - M.mean(axis=0)
    M = (M + v[None, :]) * v[None, :]
    M = M - M.mean(axis=1, keepdims=True)
    M = (M + b[:, None]) * w[:, None]
    return m, M


# (rows, columns): one block, many blocks with a ragged last one, one very wide row
SHAPES = [(7, 5), (3 * BLOCK // (4 * 300) + 5, 300), (2, BLOCK // 4 + 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("flipped", [False, True])
def test_changes_products_and_means_match_numpy(shape, flipped):
    rng = np.random.default_rng(1)
    stored = rng.normal(size=shape).astype(np.float32)
    m, M = Deferred.of(ir.tensor(stored)), stored.astype(np.float64)
    if flipped:
        m, M = m.T, M.T
    m, M = _chain(m, M, rng)
    assert m.shape == M.shape
    np.testing.assert_allclose(np.asarray(m), M, rtol=0, atol=1e-10)
    x, y = rng.normal(size=M.shape[0]), rng.normal(size=M.shape[1])
    np.testing.assert_allclose(m.left(x), x @ M, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(m.right(y), M @ y, rtol=1e-12, atol=1e-9)
    for axis in (0, 1):
        np.testing.assert_allclose(m.mean(axis), M.mean(axis=axis), rtol=1e-12, atol=1e-12)
    assert m.absmax_bound() >= np.abs(M).max()


def test_centring_is_seen_on_its_own_axis_only():
    rng = np.random.default_rng(2)
    m = Deferred.of(ir.tensor(rng.normal(size=(40, 30)).astype(np.float32)))
    assert not is_centred(m, 0, np.float32) and not is_centred(m, 1, np.float32)
    assert is_centred(m.centred(0), 0, np.float32) and not is_centred(m.centred(0), 1, np.float32)
    assert is_centred(m.centred(1), 1, np.float32) and not is_centred(m.centred(1), 0, np.float32)


def test_a_read_is_shared_by_the_products_asked_together(monkeypatch):
    rng = np.random.default_rng(3)
    m = Deferred.of(ir.tensor(rng.normal(size=(50, 20)).astype(np.float32)))
    reads = []
    original = type(m.src).values
    monkeypatch.setattr(type(m.src), "values", lambda self: reads.append(1) or original(self))
    w, b = rng.normal(size=50), rng.normal(size=50)
    m.lefts([b, w])
    m.scaled(w, 0).centred(0).mean(0)  # w @ B was computed with b @ B
    m.centred(1)  # row sums come with every read
    assert len(reads) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_written_bytes_are_the_values_rounded_once(tmp_path, dtype):
    """copy_to streams from a file-backed tensor; the bytes equal float64 maths cast at the end."""
    rng = np.random.default_rng(4)
    stored = rng.normal(size=(BLOCK // 64 + 17, 64)).astype(dtype)
    path = tmp_path / "w.bin"
    with open(path, "wb") as f:
        f.write(b"\0" * 24)  # the tensor starts mid-file, off any page boundary
        f.write(stored.tobytes())
    tensor = file_tensor(str(path), 24, ir.DataType.from_numpy(np.dtype(dtype)), ir.Shape(stored.shape), "w")
    m, M = _chain(Deferred.of(tensor), stored.astype(np.float64), rng)
    out = io.BytesIO()
    DeferredTensor(m, dtype, "w").copy_to(out)
    np.testing.assert_array_equal(np.frombuffer(out.getvalue(), dtype).reshape(M.shape), M.astype(dtype))
    np.testing.assert_array_equal(DeferredTensor(m, dtype, "w").numpy(), M.astype(dtype))


def test_a_truncated_file_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"\0" * 100)
    tensor = file_tensor(str(path), 0, ir.DataType.FLOAT, ir.Shape((10, 10)), "w")
    with pytest.raises(OSError, match="file ended"):
        Deferred.of(tensor).mean(0)


def _centred_tensor(rng, corrupt: bool):
    stored = rng.normal(size=(300, 40)).astype(np.float32) + 3.0
    m = Deferred.of(ir.tensor(stored))
    if corrupt:  # a wrong cached product, as a bug in the bookkeeping would leave
        (sums,), _ = m.src.products(left=[None])
        m.src._products[("R", None)] = np.full(300, 7.0)
    tensor = DeferredTensor(m.T.centred(0).T, np.float32, "w")  # centred over stored axis 1
    tensor.expect_centred(tensor.matrix.T, 0, "w")
    return tensor


def test_a_promised_centring_is_checked_on_the_written_values():
    rng = np.random.default_rng(5)
    _centred_tensor(rng, corrupt=False).copy_to(io.BytesIO())  # holds: no error
    with pytest.raises(LensError, match="not centred"):
        _centred_tensor(rng, corrupt=True).copy_to(io.BytesIO())
    with pytest.raises(LensError, match="not centred"):
        _centred_tensor(rng, corrupt=True).numpy()


def test_a_wrong_centring_stops_the_write(tmp_path, gpt2_exports, monkeypatch):
    """With the row means it centres by made wrong, process() fails and writes nothing,
    even with verification off: the written values themselves are checked."""
    original = Source.products

    def wrong(self, left=(), right=()):
        lefts, rights = original(self, left, right)
        return lefts, [r * 1.5 for r in rights]

    monkeypatch.setattr(Source, "products", wrong)
    out = tmp_path / "out.onnx"
    with pytest.raises(LensError, match="not centred"):
        process(gpt2_exports["torchscript17"], out, verify=False)
    assert not out.exists() and not list(tmp_path.iterdir())
