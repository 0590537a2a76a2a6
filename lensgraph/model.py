"""LensModel: an ONNX model opened for rewriting, and its safe load and save.

The graph is held in onnx-ir, which keeps every node's name, doc_string and
metadata_props (dynamo's name scopes, our provenance tags) and reads external data
lazily through memory maps. Passes change it only through the WeightStore and the
helpers here; only this module writes files.
"""

from __future__ import annotations

import json
import os
import tempfile

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import CheckerPass, RemoveUnusedNodesPass, ShapeInferencePass

from . import __version__
from .errors import BadInputError, LensError
from .weights import WeightStore

APPLIED_KEY = "lensgraph.applied"
TWO_GB = 2**31


class LensModel:
    def __init__(self, model: ir.Model, path: str | None = None):
        self.ir = model
        self.path = path
        self.weights = WeightStore(model.graph)
        self._source_checks: bool | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LensModel":
        path = os.fspath(path)
        if not os.path.exists(path):
            raise BadInputError(f"{path}: no such file")
        if os.path.isdir(path):
            raise BadInputError(f"{path}: is a directory, not an ONNX file")
        if os.path.getsize(path) == 0:
            raise BadInputError(f"{path}: empty file")
        try:
            model = ir.load(path)
        except Exception as exc:  # protobuf and onnx raise many types for bad bytes
            raise BadInputError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from exc
        if len(model.graph) == 0:
            raise BadInputError(f"{path}: the ONNX graph has no nodes")
        _infer_shapes(model)
        return cls(model, path)

    @property
    def graph(self) -> ir.Graph:
        return self.ir.graph

    # -- what was applied, and provenance ---------------------------------------------
    @property
    def applied(self) -> list[str]:
        raw = self.ir.metadata_props.get(APPLIED_KEY)
        try:
            return list(json.loads(raw)) if raw else []
        except ValueError:
            return []

    def mark_applied(self, name: str) -> None:
        applied = self.applied
        if name not in applied:
            applied.append(name)
        props = self.ir.metadata_props
        props[APPLIED_KEY] = json.dumps(applied)
        props["lensgraph.pipeline"] = ",".join(applied)
        props["lensgraph.version"] = __version__
        if "lensgraph.source" not in props:
            source = os.path.basename(self.path) if self.path else "in-memory model"
            producer = " ".join(p for p in (self.ir.producer_name, self.ir.producer_version) if p)
            props["lensgraph.source"] = f"{source} ({producer})" if producer else source

    @staticmethod
    def tag(node: ir.Node, pass_name: str, formula: str) -> None:
        """Record on a rewritten node which pass changed it and how (shown by Netron)."""
        props = node.metadata_props
        passes = [p for p in props.get("lensgraph.pass", "").split(",") if p]
        if pass_name not in passes:
            passes.append(pass_name)
        props["lensgraph.pass"] = ",".join(passes)
        line = f"lensgraph {pass_name}: {formula}"
        doc = node.doc_string or ""
        if line not in doc:
            node.doc_string = f"{doc}\n{line}".strip()

    # -- structure -------------------------------------------------------------------
    def cleanup(self) -> None:
        """Drop nodes and initializers that no longer feed an output, then re-sort."""
        RemoveUnusedNodesPass()(self.ir)
        self.graph.sort()

    def check(self, full: bool = False) -> None:
        """Structural checks: every input defined, then the ONNX checker."""
        defined = {id(v) for v in self.graph.inputs} | {
            id(v) for v in self.graph.initializers.values()
        }
        for node in self.graph:
            for value in node.inputs:
                if value is not None and id(value) not in defined and value.producer() is None:
                    raise LensError(f"node {node.name} reads {value.name}, which nothing defines")
            defined.update(id(v) for v in node.outputs)
        try:
            CheckerPass(full_check=full)(self.ir)
        except Exception as exc:
            if not self._source_passes_checker():
                return  # e.g. onnxruntime's contrib ops in the default domain: judged by verification
            raise LensError(f"rewritten model fails the ONNX checker: {_first_line(exc)}") from exc

    def _source_passes_checker(self) -> bool:
        """Whether the file this model came from passes the ONNX checker (cached)."""
        if self._source_checks is None:
            try:
                onnx.checker.check_model(self.path) if self.path else None
                self._source_checks = bool(self.path)
            except Exception:
                self._source_checks = False
        return self._source_checks

    def to_proto(self) -> onnx.ModelProto:
        return ir.serde.serialize_model(self.ir)

    def nbytes(self) -> int:
        return sum(v.const_value.nbytes for v in self.graph.initializers.values() if v.const_value is not None)

    # -- writing ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike, external_data: str | bool | None = None) -> str:
        """Write atomically: a temporary file in the target folder, renamed when complete.

        External data is used when asked for or when the model is over 2 GB.
        """
        path = os.path.abspath(os.fspath(path))
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        if self.path and os.path.exists(path) and os.path.samefile(self.path, path):
            raise BadInputError(f"{path}: refusing to overwrite the input model")
        _infer_shapes(self.ir)
        if external_data is None and self.nbytes() > TWO_GB - 2**26:
            external_data = True
        data_name = None
        if external_data:
            data_name = external_data if isinstance(external_data, str) else os.path.basename(path) + ".data"
            if os.path.dirname(data_name) or data_name in (".", ".."):
                raise BadInputError(f"{data_name}: external data must be a plain file name in the output folder")
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        os.close(fd)
        try:
            if data_name:
                ir.save(self.ir, tmp, external_data=data_name)
            else:
                ir.save(self.ir, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path


def _infer_shapes(model: ir.Model) -> None:
    """Give intermediate tensors their shapes: ranks help matching, and Netron draws them."""
    try:
        ShapeInferencePass()(model)
    except Exception:  # a convenience, never a blocker
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
