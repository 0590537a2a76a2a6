"""An onnxruntime session over a checked model file, bytes, a ModelProto or a LensModel, and
the inputs a transformer graph needs (token ids, a mask, positions, an empty KV cache).

Verification, the value-bias probe and run_with_cache all run models through it.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import onnx

from ..errors import BadInputError
from ..progress import runtime_log_level
from .model import EXTERNAL_ABOVE, LensModel
from .safety import open_model
from .writer import write_model

FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class Runner:
    """An onnxruntime session over a path, bytes, a ModelProto or a LensModel.

    A path is opened through safety.py first: onnxruntime never sees a file that would
    read external data from outside its folder. A ModelProto whose weights are references (a
    graph made from a checked skeleton) reads them from `data_folder`, its model's folder.
    """

    def __init__(self, model, provider: str = "CPUExecutionProvider", label: str | None = None,
                 cache_dims: dict | None = None, few_runs: bool = False, data_folder: str | None = None,
                 optimization: str | None = None, threads: int | None = None):
        import onnxruntime as ort

        self._tmp = None
        self.label = label or (os.fspath(model) if isinstance(model, (str, os.PathLike)) else "rewritten model")
        self.cache_dims: dict[str, int] = {}  # KV-cache input -> head size, where only a fused op says it
        source = self._source(model)
        self.cache_dims.update(cache_dims or {})
        options = ort.SessionOptions()
        options.log_severity_level = runtime_log_level()
        if threads:  # several sessions side by side share the cores (collect's workers)
            options.intra_op_num_threads = threads
        if few_runs:  # a check runs a few small batches: re-laying the weights out for speed costs more (3x the load)
            options.add_session_config_entry("session.disable_prepacking", "1")
        if data_folder is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", data_folder)
        if optimization is not None:  # a member of onnxruntime.GraphOptimizationLevel (default: all)
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
        ort.set_default_logger_severity(runtime_log_level())
        available = ort.get_available_providers()
        if provider not in available:
            raise BadInputError(f"provider {provider} is not available (have: {', '.join(available)})")
        try:
            self.session = ort.InferenceSession(source, options, providers=[provider])
        except Exception as exc:
            raise BadInputError(f"{self.label}: onnxruntime cannot load it ({str(exc).splitlines()[0][:300]})") from exc
        self.inputs = self.session.get_inputs()
        self.given: dict = {}  # inputs with fixed values (weights held out of the graph), added to every run
        names = [o.name for o in self.session.get_outputs()]
        if not names:
            raise BadInputError(f"{self.label}: the graph has no outputs")
        self.output = "logits" if "logits" in names else names[0]

    def _source(self, model):
        if isinstance(model, (str, os.PathLike)):
            self.cache_dims = cache_dims(os.fspath(model))
            return os.fspath(model)
        if isinstance(model, LensModel):  # streamed to a private folder: no whole-model copy in memory
            self._tmp = tempfile.TemporaryDirectory()
            path = os.path.join(self._tmp.name, "model.onnx")
            write_model(model.ir, path, "model.onnx.data" if model.nbytes() > EXTERNAL_ABOVE else None)
            self.cache_dims = {**config_cache_dims(model.path), **fused_cache_dims(open_model(path)[0].graph)}
            return path
        if isinstance(model, onnx.ModelProto):
            self.cache_dims = fused_cache_dims(model.graph)
            if model.ByteSize() < 2**31 - 2**20:
                return model.SerializeToString()
            self._tmp = tempfile.TemporaryDirectory()
            path = os.path.join(self._tmp.name, "model.onnx")
            onnx.save(model, path, save_as_external_data=True)
            return path
        return model

    def feeds(self, batch: int, seq: int, vocab: int, rng: np.random.Generator) -> dict:
        """Values for the model's own inputs (token ids, mask, positions, an empty cache): the same
        feeds run any equivalent graph, whatever it holds out as `given`."""
        feeds = {}
        for inp in self.inputs:
            name = inp.name
            if name in self.given:
                continue
            if "past" in name and inp.type in FLOAT_TYPES:
                # an empty cache: each graph's own cache differs (a folded value bias is not in it)
                if inp.shape and isinstance(inp.shape[0], int):
                    raise BadInputError(f"{self.label}: cannot make an empty cache for input {name} {inp.shape}")
                feeds[name] = empty_past(inp, batch, self.cache_dims, self.label)
                continue
            if inp.type not in ("tensor(int64)", "tensor(int32)"):
                raise BadInputError(f"{self.label}: cannot make a value for input {name} ({inp.type})")
            dtype = np.int64 if inp.type == "tensor(int64)" else np.int32
            if "mask" in name:
                mask = np.ones((batch, seq), dtype)
                if batch > 1 and seq > 1:
                    mask[0, -1] = 0  # exercise the padding path
                feeds[name] = mask
            elif "position" in name:
                feeds[name] = np.tile(np.arange(seq, dtype=dtype), (batch, 1))
            elif "ids" in name:
                feeds[name] = rng.integers(0, vocab, (batch, seq)).astype(dtype)
            else:
                raise BadInputError(f"{self.label}: cannot make a value for input {name}")
        return feeds

    def vocab_size(self) -> int:
        rng = np.random.default_rng(0)
        logits = self.run(self.feeds(1, 1, 1, rng))
        if logits.ndim < 2 or logits.shape[-1] == 0:
            raise BadInputError(f"{self.label}: output {self.output} has shape {list(logits.shape)}, "
                                "not [batch, pos, vocab] logits")
        return int(logits.shape[-1])

    def run(self, feeds: dict) -> np.ndarray:
        return self.run_many([self.output], feeds)[0]

    def run_many(self, names: list[str], feeds: dict) -> list[np.ndarray]:
        try:
            if self.given:
                feeds = {**{i.name: self.given[i.name] for i in self.inputs if i.name in self.given}, **feeds}
            return self.session.run(names, feeds)
        except Exception as exc:
            raise BadInputError(f"{self.label}: onnxruntime failed to run it ({str(exc).splitlines()[0][:300]})") from exc


def empty_past(inp, batch: int, dims_known: dict, label: str) -> np.ndarray:
    """An empty KV cache for onnxruntime input `inp`, a graph's first step: [batch, ..., 0, head_size]
    (a head size declared symbolically is taken from `dims_known`)."""
    dims = [d if isinstance(d, int) else None for d in inp.shape]
    if len(dims) >= 2 and dims[-1] is None:
        dims[-1] = dims_known.get(inp.name)
    if len(dims) < 2 or any(d is None for d in dims[1:-2] + dims[-1:]):
        raise BadInputError(f"{label}: cannot make an empty cache for input {inp.name} {inp.shape}")
    return np.zeros([batch] + [0 if d is None else d for d in dims[1:]], FLOAT_TYPES[inp.type])


def cache_dims(path: str) -> dict[str, int]:
    """{KV-cache input: head size} for a model file: from genai_config.json beside it, or its fused attention."""
    return {**config_cache_dims(path), **fused_cache_dims(open_model(path)[0].graph)}


def config_cache_dims(model_path: str | None) -> dict[str, int]:
    """{past key/value input: head size} from the genai_config.json beside a model, if there is one
    (onnxruntime-genai declares the cache's head size symbolically in the graph)."""
    if not model_path:
        return {}
    config = os.path.join(os.path.dirname(os.path.abspath(model_path)), "genai_config.json")
    try:
        with open(config) as f:
            decoder = json.load(f)["model"]["decoder"]
        size, layers = int(decoder["head_size"]), int(decoder["num_hidden_layers"])
        names = [decoder["inputs"][k] for k in ("past_key_names", "past_value_names")]
        return {name % layer: size for name in names for layer in range(layers)}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def fused_cache_dims(graph: onnx.GraphProto) -> dict[str, int]:
    """{past key/value input: head size} for caches read by onnxruntime's fused attention ops
    (GroupQueryAttention, MultiHeadAttention), which declare the head size symbolically: it is
    the query projection's width over the number of query heads (a packed q|k|v map counts the
    key and value heads too)."""
    widths = {t.name: int(t.dims[1]) for t in graph.initializer if len(t.dims) == 2}
    for v in graph.input:  # weights held out of the graph as inputs (the value-bias probe)
        dims = v.type.tensor_type.shape.dim
        if len(dims) == 2 and dims[1].dim_value:
            widths[v.name] = int(dims[1].dim_value)
    producers = {out: node for node in graph.node for out in node.output}

    def width(name: str) -> int | None:
        for _ in range(4):  # through a bias Add, a Cast, a Reshape
            node = producers.get(name)
            if node is None:
                return None
            if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in widths:
                return widths[node.input[1]]
            name = node.input[0]
        return None

    found = {}
    for node in graph.node:
        if node.domain != "com.microsoft" or node.op_type not in ("GroupQueryAttention", "MultiHeadAttention"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        heads, kv_heads = attrs.get("num_heads"), attrs.get("kv_num_heads", attrs.get("num_heads"))
        q = width(node.input[0]) if node.input else None
        if not heads or not q:
            continue
        packed = len(node.input) < 3 or not node.input[1]
        size = q // (heads + 2 * kv_heads) if packed else q // heads
        for name in node.input[3:5]:
            if name:
                found[name] = size
    return found
