"""Writing a model so that it appears complete or not at all.

The model and its external data file are written into a fresh hidden folder beside the
target (same filesystem, so a rename is atomic), checked, then renamed into place: the
data file first, the model last. A run killed at any point leaves the previous output
(or nothing) under the final names, never a half-written file; at worst a hidden
`.NAME.*.tmp` folder remains, which can be deleted.

The data file of a model being replaced is still read by that model until the last
rename, so the new data goes under a second name (`NAME.data` <-> `NAME.1.data`); the
old one is removed after the switch. Symbolic links are never written through, and the
input's files are never overwritten unless replacing the input was asked for.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import onnx
import onnx_ir as ir

from ..errors import BadInputError, LensError
from . import wire
from .safety import all_tensors
from .writer import write_model

ALTERNATES = 3  # NAME.data, NAME.1.data, NAME.2.data: enough for any model being replaced


class StagedModel:
    """A model written beside its target; `commit` renames it into place, `discard` drops it."""

    def __init__(self, path: str, tmpdir: str, data_name: str | None, stale: list[str],
                 created: list[str] = ()):
        self.path, self.tmpdir, self.data_name, self.stale = path, tmpdir, data_name, stale
        self.created = list(created)  # folders made for the output, removed again if nothing is published
        self.staged_path = os.path.join(tmpdir, os.path.basename(path))

    @property
    def data_path(self) -> str | None:
        return os.path.join(os.path.dirname(self.path), self.data_name) if self.data_name else None

    def commit(self) -> str:
        folder = os.path.dirname(self.path)
        self.created = []
        try:
            if self.data_name:
                _fsync(os.path.join(self.tmpdir, self.data_name))
                os.replace(os.path.join(self.tmpdir, self.data_name), self.data_path)
            _fsync(self.staged_path)
            os.replace(self.staged_path, self.path)
        except OSError as exc:
            raise LensError(f"{self.path}: cannot move the output into place ({exc.strerror or exc}); "
                            "the previous file there is unchanged") from exc
        finally:
            self.discard()
        _fsync(folder)  # make the renames themselves durable
        for name in self.stale:  # data the replaced model read; nothing reads it any more
            old = os.path.join(folder, name)
            if os.path.isfile(old) and not os.path.islink(old):
                os.unlink(old)
        return self.path

    def write(self, model: ir.Model) -> None:
        """Write `model` (and its external data, if any) into the hidden folder."""
        try:
            write_model(model, self.staged_path, self.data_name)
        except OSError as exc:  # disk full, permissions: nothing is published
            raise LensError(f"{self.path}: cannot write the output ({exc.strerror or exc}); "
                            "nothing was written") from exc

    def discard(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        for folder in self.created:  # deepest first; only if still empty
            try:
                os.rmdir(folder)
            except OSError:
                break

    def __enter__(self) -> "StagedModel":
        return self

    def __exit__(self, exc_type, *rest) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
        return False


def prepare(path: str, data_name: str | None = None, protected: list[str] = (),
            replace_input: bool = False) -> StagedModel:
    """Check `path` as an output and make the hidden folder beside it; nothing is written yet.

    The caller (or `stage`) writes the model to `staged_path` and its data, when
    `data_name` is given, to the name the StagedModel chose (`data_name` or an alternate).
    `protected` are the input's files (model and data): refused as targets unless
    `replace_input` is set, in which case the input model itself may be replaced.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if os.path.islink(path):
        raise BadInputError(f"{path}: is a symbolic link; refusing to write through it")
    if os.path.isdir(path):
        raise BadInputError(f"{path}: is a directory; give the output file's path")
    if os.path.exists(path) and _same_as_any(path, protected) and not replace_input:
        raise BadInputError(f"{path}: output would overwrite the input (use --in-place to replace it)")
    stale: list[str] = []
    if data_name:
        data_name, stale = _data_name(folder, path, data_name, protected)
        stale = [n for n in stale if replace_input or not _same_as_any(os.path.join(folder, n), protected)]
    created, up = [], folder
    while not os.path.exists(up):
        created.append(up)
        up = os.path.dirname(up)
    try:
        os.makedirs(folder, exist_ok=True)
        tmpdir = tempfile.mkdtemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as exc:
        raise BadInputError(f"{folder}: cannot write into this folder ({exc.strerror or exc})") from exc
    return StagedModel(path, tmpdir, data_name, stale, created)


def stage(model: ir.Model, path: str, data_name: str | None, protected: list[str] = (),
          replace_input: bool = False) -> StagedModel:
    """Write `model` (and, when `data_name` is given, its external data) beside `path`."""
    staged = prepare(path, data_name, protected, replace_input)
    try:
        staged.write(model)
    except BaseException:
        staged.discard()
        raise
    return staged


def write_text(path: str, text: str, protected=()) -> None:
    """Write a small text file (the JSON report) the same way: complete or not at all."""
    path = os.path.abspath(path)
    if os.path.islink(path) or os.path.isdir(path):
        raise BadInputError(f"{path}: is a symbolic link or a directory; refusing to write the report there")
    if os.path.exists(path) and _same_as_any(path, protected):
        raise BadInputError(f"{path}: the report would overwrite a model file")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise LensError(f"{path}: cannot write the report ({exc.strerror or exc})") from exc
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def _data_name(folder: str, path: str, wanted: str, protected) -> tuple[str, list[str]]:
    """The data file's name: `wanted`, or an alternate when the model being replaced reads it."""
    if os.path.basename(wanted) != wanted or wanted in ("", ".", ".."):
        raise BadInputError(f"{wanted}: external data must be a plain file name in the output's folder")
    if wanted == os.path.basename(path):
        raise BadInputError(f"{wanted}: external data cannot have the output model's own name")
    family = _alternates(wanted)
    read_now = data_files_of(path) if os.path.isfile(path) else set()
    for name in family:
        if name in read_now:
            continue
        target = os.path.join(folder, name)
        if os.path.islink(target):
            raise BadInputError(f"{target}: external data file is a symbolic link; refusing to write through it")
        if os.path.exists(target) and _same_as_any(target, protected):
            raise BadInputError(f"{target}: would overwrite the input's data file; choose another name")
        return name, [n for n in family if n in read_now]
    raise BadInputError(f"{path}: the model there reads every data file name lensgraph would use")


def _alternates(name: str) -> list[str]:
    root, ext = os.path.splitext(name)
    return [name] + [f"{root}.{k}{ext}" for k in range(1, ALTERNATES)]


def data_files_of(path: str) -> set[str]:
    """The external data locations an existing model file reads (empty if it is not a model)."""
    try:
        proto = onnx.ModelProto.FromString(wire.skeleton(path)[0])  # the weights are not parsed
    except Exception:
        return set()
    return {
        e.value for t in all_tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data if e.key == "location"
    }


def _same_as_any(path: str, others) -> bool:
    for other in others:
        try:
            if os.path.exists(other) and os.path.samefile(path, other):
                return True
        except OSError:
            continue
    return False


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
