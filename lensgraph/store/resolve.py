"""What a MODEL argument names: the folder `lensgraph convert` writes, an onnxruntime-genai folder, or
an ONNX file; resolved once into the files every command and function reads.

    files = resolve("smollm2/")
    files.model       # smollm2/model.onnx: the graph every analysis reads (a KV-cache graph when convert made one)
    files.folder      # where the tokenizer and the generation configs lie
    files.points      # smollm2/model.hooks.onnx: every hook point, placed once by convert (or None)

A path that names something else gets one line naming it as given and the command that makes a
model of it (`lensgraph convert ...`), so a user who came through `convert` is told about `convert`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..errors import BadInputError
from .folder import CONFIG, RECORD, model_file

MODEL = "model.onnx"  # the model file of a folder convert writes
POINTS = "model.hooks.onnx"  # beside it: the same graph with every hook point as an output (shares its weights)
EXPORT = "export"  # the unprocessed export, kept in the folder with `convert --keep-export`
GENERATION_CONFIG = "generation_config.json"
WHAT = "a folder `lensgraph convert` wrote, an onnxruntime-genai folder, or an .onnx file"


@dataclass(frozen=True)
class ModelFiles:
    given: str  # the argument as the user wrote it (for messages)
    model: str  # the ONNX file, absolute
    folder: str  # the folder holding it, its tokenizer and configs
    genai: bool = False  # an onnxruntime-genai folder (genai_config.json): its Generator can run it
    record: dict | None = field(default=None, compare=False)  # lensgraph.json, where convert wrote one

    @property
    def points(self) -> str | None:
        """The all-points graph convert wrote beside the model, if any (its record says of which model)."""
        path = os.path.join(self.folder, POINTS)
        return path if os.path.basename(self.model) == MODEL and os.path.isfile(path) else None

    @property
    def export(self) -> str | None:
        """The unprocessed export kept by `convert --keep-export`, if any."""
        path = os.path.join(self.folder, EXPORT, os.path.basename(self.model))
        return path if self.record is not None and os.path.isfile(path) else None

    def file(self, name: str) -> str | None:
        path = os.path.join(self.folder, name)
        return path if os.path.isfile(path) else None

    def config_end_ids(self) -> list[int]:
        """End-of-sequence ids the folder's generation_config.json and genai_config.json declare."""
        found: list[int] = []
        for name, keys in ((GENERATION_CONFIG, ("eos_token_id",)), (CONFIG, ("model", "eos_token_id"))):
            value = _read_json(self.file(name))
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            for i in value if isinstance(value, list) else [value]:
                if isinstance(i, int) and not isinstance(i, bool) and i >= 0 and i not in found:
                    found.append(i)
        return found


def resolve(model) -> ModelFiles:
    """The files behind a MODEL argument (see the module docstring); BadInputError naming the path as
    given, and the command that fixes it, when it is not a model."""
    if isinstance(model, ModelFiles):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise BadInputError(f"model must be a path ({WHAT}), not {type(model).__name__}")
    given = os.fspath(model)
    path = os.path.abspath(os.path.expanduser(given))
    stem = os.path.basename(path.rstrip(os.sep)) or "model"
    if not os.path.exists(path):
        raise BadInputError(f"{given}: no such file or folder (a model is {WHAT}; make one with "
                            f"`lensgraph convert CHECKPOINT -o {given}`)")
    if not os.path.isdir(path):  # a file (or something else, which the safety checks refuse by name)
        if path.lower().endswith(".gguf"):
            raise BadInputError(f"{given}: is a GGUF checkpoint, not a converted model; run `lensgraph convert {given} "
                                f"-o {os.path.splitext(stem)[0]}/` and give that folder")
        folder = os.path.dirname(path)
        return ModelFiles(given, path, folder, record=_record(folder) if os.path.basename(path) == MODEL else None)
    if os.path.isfile(os.path.join(path, CONFIG)):
        return ModelFiles(given, os.path.abspath(model_file(path)), path, genai=True, record=_record(path))
    if os.path.isfile(os.path.join(path, MODEL)):
        return ModelFiles(given, os.path.join(path, MODEL), path, record=_record(path))
    if os.path.isfile(os.path.join(path, "config.json")):
        raise BadInputError(f"{given}: is a HuggingFace checkpoint, not a converted model; run `lensgraph convert "
                            f"{given} -o {stem}-lens/` and give that folder")
    raise BadInputError(f"{given}: is a directory without a model ({MODEL} or {CONFIG}); make one with "
                        f"`lensgraph convert CHECKPOINT -o {given}`")


def _record(folder: str) -> dict | None:
    found = _read_json(os.path.join(folder, RECORD))
    return found if isinstance(found, dict) else None


def _read_json(path: str | None):
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
