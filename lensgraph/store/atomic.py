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

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
import time

import onnx
import onnx_ir as ir

from ..errors import BadInputError, LensError
from . import wire
from .safety import all_tensors
from .writer import write_model

ALTERNATES = 3  # NAME.data, NAME.1.data, NAME.2.data: enough for any model being replaced
ABANDONED_AFTER = 24 * 3600  # seconds before an unlocked staging folder counts as left by a killed run


class StagedModel:
    """A model written beside its target; `commit` renames it into place, `discard` drops it."""

    def __init__(self, path: str, tmpdir: str, data_name: str | None, protected=(), replace_input: bool = False,
                 created: list[str] = ()):
        self.path, self.tmpdir, self.data_name = path, tmpdir, data_name
        self.data_family: list[str] = []  # the data file names this output alternates between
        self.protected, self.replace_input = list(protected), replace_input
        self.created = list(created)  # folders made for the output, removed again if nothing is published
        self.staged_path = os.path.join(tmpdir, os.path.basename(path))
        self.placed: dict[str, tuple[str, int, int]] = {}  # streamed weights: (file name, offset, length)
        self._lock = _lock(tmpdir)  # held while staging: a cleaner never takes a live folder

    @property
    def data_path(self) -> str | None:
        return os.path.join(os.path.dirname(self.path), self.data_name) if self.data_name else None

    def commit(self) -> str:
        """Publish: data file first, model last, under a lock on the folder so that two runs
        writing one output publish one after the other; the data the replaced model read is
        then removed (never a file the published model reads, nor the input's)."""
        folder = os.path.dirname(self.path)
        self.created = []
        try:
            if self.data_name:
                _fsync(os.path.join(self.tmpdir, self.data_name))
            _fsync(self.staged_path)
            with _locked(folder):
                read_now = data_files_of(self.path) if os.path.isfile(self.path) else set()
                if self.data_name in read_now:
                    raise LensError(f"{self.path}: another run replaced it while this one was writing (its model "
                                    f"reads {self.data_name}); nothing was written")
                if self.data_name:
                    os.replace(os.path.join(self.tmpdir, self.data_name), self.data_path)
                os.replace(self.staged_path, self.path)
                _fsync(folder)  # make the renames themselves durable
                for name in sorted(read_now & set(self.data_family)):
                    old = os.path.join(folder, name)  # the replaced model read it; nothing reads it any more
                    if self.replace_input or not _same_as_any(old, self.protected):
                        if os.path.isfile(old) and not os.path.islink(old):
                            os.unlink(old)
        except OSError as exc:
            raise LensError(f"{self.path}: cannot move the output into place ({exc.strerror or exc}); "
                            "the previous file there is unchanged") from exc
        finally:
            self.discard()
        return self.path

    def write(self, model: ir.Model) -> None:
        """Write `model` (and its external data, if any) into the hidden folder."""
        try:
            self.placed = write_model(model, self.staged_path, self.data_name)
        except OSError as exc:  # disk full, permissions: nothing is published
            raise LensError(f"{self.path}: cannot write the output ({exc.strerror or exc}); "
                            "nothing was written") from exc

    def discard(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
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
    _regular_or_absent(path, "output")
    if os.path.exists(path) and _same_as_any(path, protected) and not replace_input:
        raise BadInputError(f"{path}: output would overwrite the input (use --in-place to replace it)")
    chosen = _data_name(folder, path, data_name, protected) if data_name is not None else None
    created, up = [], folder
    while not os.path.exists(up):
        created.append(up)
        up = os.path.dirname(up)
    try:
        os.makedirs(folder, exist_ok=True)
        _clean_abandoned(folder, os.path.basename(path))
        tmpdir = tempfile.mkdtemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as exc:
        raise BadInputError(f"{folder}: cannot write into this folder ({exc.strerror or exc})") from exc
    staged = StagedModel(path, tmpdir, chosen, protected, replace_input, created)
    staged.data_family = alternates(data_name) if data_name is not None else []
    return staged


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


def check_text_target(path: str, protected=()) -> str:
    """Refuse a path for a small text output (the JSON report) before anything is written: its
    folder must exist, and it must not be a link, a folder, a device or one of the model files."""
    path = os.path.abspath(path)
    if not os.path.isdir(os.path.dirname(path)):
        raise BadInputError(f"{path}: its folder does not exist")
    if os.path.islink(path) or os.path.isdir(path):
        raise BadInputError(f"{path}: is a symbolic link or a directory; refusing to write the report there")
    _regular_or_absent(path, "report")
    if _same_as_any(path, protected) or any(os.path.abspath(p) == path for p in protected):
        raise BadInputError(f"{path}: the report would overwrite a model file")
    return path


def write_text(path: str, text: str, protected=()) -> None:
    """Write a small text file (the JSON report) the same way: complete or not at all."""
    path = check_text_target(path, protected)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise LensError(f"{path}: cannot write the report ({exc.strerror or exc})") from exc
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def _data_name(folder: str, path: str, wanted: str, protected) -> str:
    """The data file's name: `wanted`, or an alternate when the model being replaced reads it."""
    if not wanted or os.path.basename(wanted) != wanted or wanted in (".", ".."):
        raise BadInputError(f"{wanted!r}: external data must be a plain file name in the output's folder")
    if wanted == os.path.basename(path):
        raise BadInputError(f"{wanted}: external data cannot have the output model's own name")
    read_now = data_files_of(path) if os.path.isfile(path) else set()
    for name in alternates(wanted):
        if name in read_now:
            continue
        target = os.path.join(folder, name)
        if os.path.islink(target):
            raise BadInputError(f"{target}: external data file is a symbolic link; refusing to write through it")
        _regular_or_absent(target, "external data file")
        if os.path.exists(target) and _same_as_any(target, protected):
            raise BadInputError(f"{target}: would overwrite the input's data file; choose another name")
        return name
    raise BadInputError(f"{path}: the model there reads every data file name lensgraph would use")


def alternates(name: str) -> list[str]:
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


def _regular_or_absent(path: str, what: str) -> None:
    """Only a regular file may be replaced: never a device node, a FIFO or a socket."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BadInputError(f"{path}: cannot check the {what} path ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(mode):
        raise BadInputError(f"{path}: exists and is not a regular file (a device, FIFO or socket); "
                            f"refusing to replace it with the {what}")


def _lock(path: str) -> int | None:
    """An exclusive advisory lock on a folder, held until its descriptor is closed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


@contextlib.contextmanager
def _locked(folder: str):
    fd = _lock(folder)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _clean_abandoned(folder: str, name: str) -> None:
    """Remove staging folders of this output left by killed runs: older than a day, and unlocked."""
    prefix = f".{name}."
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")) or entry.is_symlink():
            continue
        try:
            if not entry.is_dir() or time.time() - entry.stat().st_mtime < ABANDONED_AFTER:
                continue
            fd = os.open(entry.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a run is still writing there
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)
