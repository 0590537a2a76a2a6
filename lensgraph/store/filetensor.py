"""FileTensor: a weight whose bytes stay in the model file (or its external data) and are read
through a memory map only while used, and written out in pieces: nothing holds the whole model.
"""

from __future__ import annotations

import contextlib
import mmap
import os

import numpy as np
import onnx_ir as ir

WRITE = 1 << 18  # bytes per write call: large writes can stall in the kernel's page cache


class FileTensor(ir.LazyTensor):
    """A tensor whose bytes stay in a file at `offset` and are read each time they are used.

    `source` is a path or an open binary file. `mapped` gives the values over a memory map
    that lasts as long as the array (no copy, and resident only while in use); `copy_to`
    copies in pieces. Nothing holds the whole model. Little-endian, as ONNX stores it.
    """

    def __init__(self, source, offset: int, dtype: ir.DataType, shape: ir.Shape, name: str | None):
        super().__init__(self._read, dtype, shape, name=name)
        self.source, self.offset = source, offset
        self.source_of_products = None  # deferred.Source, made on first use

    def __repr__(self) -> str:  # LazyTensor's would recurse through the bound method it holds
        return f"FileTensor(name={self.name!r}, shape={tuple(self.shape)}, offset={self.offset})"

    def _read(self) -> ir.Tensor:
        return ir.Tensor(np.array(self.mapped()), name=self.name)  # a copy: the map goes with the view

    def mapped(self, populate: bool = True) -> np.ndarray:
        """The stored values, read-only, over a memory map that is unmapped with the array. With
        `populate` every page is mapped at once (for a reader of all of it); without, only the pages
        read become resident (a listing of shapes reads none)."""
        shape, dtype = self.shape.numpy(), np.dtype(self.dtype.numpy()).newbyteorder("<")
        if self.nbytes == 0:
            return np.empty(shape, dtype)
        with contextlib.ExitStack() as stack:
            if isinstance(self.source, (str, os.PathLike)):
                fd = stack.enter_context(open(self.source, "rb", buffering=0)).fileno()
            else:
                fd = self.source.fileno()
            if os.fstat(fd).st_size < self.offset + self.nbytes:  # a map past the end would crash
                raise OSError(f"file ended before tensor {self.name!r} was read")
            start = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY
            flags = mmap.MAP_SHARED | (_POPULATE if populate else 0)
            view = mmap.mmap(fd, self.offset + self.nbytes - start, flags=flags, prot=mmap.PROT_READ, offset=start)
        return np.frombuffer(view, dtype, count=self.size, offset=self.offset - start).reshape(shape)

    def copy_to(self, f) -> None:
        write_in_pieces(f, memoryview(self.mapped().reshape(-1).view(np.uint8)))


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # map every page at once, not one fault at a time


def file_tensor(source, offset: int, dtype: ir.DataType, shape: ir.Shape, name: str | None) -> FileTensor:
    return FileTensor(source, offset, dtype, shape, name)


def readable_in_place(tensor) -> bool:
    """Whether `file_tensor` can stand for this external tensor (whole-byte types only)."""
    return isinstance(tensor, ir.ExternalTensor) and tensor.dtype.bitwidth % 8 == 0 and not tensor.dtype.is_string()


def write_in_pieces(f, data: memoryview) -> None:
    """Write `data` to `f` in WRITE-sized calls."""
    for start in range(0, len(data), WRITE):
        f.write(data[start:start + WRITE])
