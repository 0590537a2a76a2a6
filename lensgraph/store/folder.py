"""A model folder in, a model folder out: onnxruntime-genai's layout (genai_config.json naming the
decoder's file, beside the tokenizer), written complete or not at all.

The new folder is built in a hidden folder beside the target: every file of the input but the
model and its data copied unchanged, the processed model written into it, and lensgraph's record
of what it did. Only then is it renamed into place. An existing output folder is replaced only
when it holds that record (a previous lensgraph output): any other folder is refused, so nothing
a user made by hand is ever deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from ..errors import BadInputError, LensError

CONFIG = "genai_config.json"
RECORD = "lensgraph.json"  # what lensgraph did: marks a folder as its output


def is_model_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def model_file(folder: str) -> str:
    """The decoder's ONNX file named by the folder's genai_config.json."""
    config = os.path.join(folder, CONFIG)
    try:
        with open(config) as f:
            name = json.load(f)["model"]["decoder"]["filename"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"{config}: does not name the decoder's model file ({type(exc).__name__}: {exc})") from None
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
        raise BadInputError(f"{config}: the decoder's filename {name!r} is not a file name in the folder")
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise BadInputError(f"{path}: the model file {CONFIG} names does not exist")
    return path


class StagedFolder:
    """The output folder being built beside its target; `commit` puts it in place."""

    def __init__(self, target: str):
        self.target = os.path.abspath(target)
        parent = os.path.dirname(self.target)
        if os.path.islink(self.target):
            raise BadInputError(f"{self.target}: is a symbolic link; refusing to write through it")
        if os.path.exists(self.target):
            if not os.path.isdir(self.target):
                raise BadInputError(f"{self.target}: exists and is not a folder; give a folder for a folder input")
            if not os.path.isfile(os.path.join(self.target, RECORD)):
                raise BadInputError(f"{self.target}: exists and is not a previous lensgraph output (no {RECORD}); "
                                    "refusing to replace it")
        if not os.path.isdir(parent):
            raise BadInputError(f"{parent}: the output's folder does not exist")
        try:
            self.path = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(self.target)}.", suffix=".tmp")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.path, 0o777 & ~umask)  # a folder like any other, not mkdtemp's private one
        except OSError as exc:
            raise BadInputError(f"{parent}: cannot write into this folder ({exc.strerror or exc})") from exc

    def copy_from(self, folder: str, skip: set[str]) -> None:
        """Every file of `folder` but those in `skip` (real paths), unchanged; links are refused."""
        for entry in os.scandir(folder):
            if os.path.realpath(entry.path) in skip:
                continue
            if entry.is_symlink():
                raise BadInputError(f"{entry.path}: is a symbolic link; a model folder is copied as plain files")
            if entry.is_dir():
                shutil.copytree(entry.path, os.path.join(self.path, entry.name), symlinks=True)
            else:
                shutil.copy2(entry.path, os.path.join(self.path, entry.name))

    def commit(self, record: dict) -> str:
        """Write the record, then swap the folder into place (a previous output is removed after)."""
        with open(os.path.join(self.path, RECORD), "w") as f:
            json.dump(record, f, indent=2)
        old = None
        try:
            if os.path.exists(self.target):
                old = tempfile.mkdtemp(dir=os.path.dirname(self.target), prefix=f".{os.path.basename(self.target)}.",
                                       suffix=".old")
                os.rename(self.target, os.path.join(old, "previous"))
            os.rename(self.path, self.target)
        except OSError as exc:
            if old is not None and not os.path.exists(self.target):  # put the previous output back
                os.rename(os.path.join(old, "previous"), self.target)
            self.discard()
            raise LensError(f"{self.target}: cannot move the output folder into place ({exc.strerror or exc})") from exc
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
