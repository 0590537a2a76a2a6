"""Turn a HuggingFace causal LM into an ONNX graph with logits as its only output.

The graph has inputs ``input_ids`` and ``attention_mask`` (int64, [batch, sequence])
and output ``logits`` ([batch, sequence, vocab]); batch and sequence are dynamic.
"""

import contextlib
import functools
import io
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import BadInputError, LensError, missing_extra
from .store.atomic import StagedModel, prepare

EXPORTERS = ("dynamo", "torchscript")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
TORCHSCRIPT_DEFAULT_OPSET = 17
# Below this the dynamo exporter's version conversion either fails (and quietly
# keeps 18) or writes graphs onnxruntime rejects (Split in gpt2/neox).
DYNAMO_MIN_OPSET = 18
VERBOSE_ENV = "LENSGRAPH_VERBOSE"

# Protobuf caps one file at 2 GB, graph included, and torch's dynamo saver
# already switches to external data above 1.5 GiB; use its limit for both exporters.
SINGLE_FILE_LIMIT = 1536 * 1024 * 1024

# Largest logit difference allowed, as a fraction of the largest |logit|.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}

# Loggers that chatter during load and export.
_NOISY_LOGGERS = (
    "torch", "transformers", "huggingface_hub", "onnxscript", "onnx_ir", "onnxruntime",
)


def _dtype_name(dtype) -> str:
    """The name a torch dtype has on the command line (float32, float16)."""
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype))


class ExportError(LensError):
    """An expected failure, with a one-line message; a LensError so the CLI shows it plainly."""


class ExportInputError(ExportError, BadInputError):
    """The source, an option or the output path is unusable (the CLI exits with 2)."""


class LogitsOnly(torch.nn.Module):
    """Fixes the call signature and drops the cache object transformers 5 returns."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).logits


class LogitsAndCache(torch.nn.Module):
    """A decoder step for generation: ids, mask and the past keys/values (flattened per layer)
    in; logits and the present keys/values out."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                         use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names of the cache, as optimum names them."""
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return past, present


def _empty_cache(model, batch: int, length: int, dtype) -> list:
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(batch, heads, length, head_dim, generator=gen).to(dtype)
            for _ in range(2 * config.num_hidden_layers)]


def _verbose(verbose):
    """An explicit argument wins; otherwise the environment decides."""
    if verbose is not None:
        return bool(verbose)
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def _silence_fds():
    """C++ code (TorchScript graph dumps on failure, onnxruntime) writes to fds 1 and 2 directly."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = []
    with open(os.devnull, "w") as null:
        try:
            for fd in (1, 2):
                with contextlib.suppress(OSError):
                    copy = os.dup(fd)
                    os.dup2(null.fileno(), fd)
                    saved.append((fd, copy))
            yield
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)


@contextlib.contextmanager
def _quiet(verbose):
    """Hide warnings, logging and prints from torch, transformers and onnx."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink), _silence_fds():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _reason(exc):
    """First line of the innermost cause: torch wraps real errors in long banners."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}"


def _looks_like_path(source):
    """Hub ids are 'name' or 'org/name'; anything else that is missing is a bad path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if source.startswith((".", "/", "~")) or source.endswith("/"):
        return True
    try:
        validate_repo_id(source)
    except HFValidationError:
        return True
    return False


def gguf_file(source) -> tuple[str, str] | None:
    """(folder, file name) when `source` is a GGUF file, which transformers reads de-quantized."""
    path = os.path.expanduser(str(source))
    if not (path.lower().endswith(".gguf") and os.path.isfile(path)):
        return None
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise missing_extra("gguf", f"reading {source}", extra="gguf")
    return os.path.dirname(os.path.abspath(path)), os.path.basename(path)


def load_tokenizer(source):
    """The source's tokenizer, or None where it has none (a bare checkpoint folder)."""
    from transformers import AutoTokenizer

    gguf = gguf_file(source)
    where, extra = (gguf[0], {"gguf_file": gguf[1]}) if gguf else (os.path.expanduser(str(source)), {})
    try:
        with _quiet(None):
            return AutoTokenizer.from_pretrained(where, **extra)
    except Exception:  # no tokenizer files, or none transformers can read: said in the report
        return None


def load_hf_model(source, dtype="float32", verbose=None):
    """Load a causal LM with eager attention, the only kind that exports cleanly; a GGUF file is
    de-quantized by transformers to `dtype`."""
    if dtype not in DTYPES:
        raise ExportInputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    source = str(source)
    path = os.path.expanduser(source)
    if path.lower().endswith(".gguf") and not os.path.exists(path):
        raise ExportInputError(f"{source}: no such file (a GGUF checkpoint is read from a local .gguf file)")
    gguf = gguf_file(source)
    if gguf:
        from transformers import AutoModelForCausalLM

        try:
            with _quiet(_verbose(verbose)):
                model = AutoModelForCausalLM.from_pretrained(gguf[0], gguf_file=gguf[1], dtype=DTYPES[dtype],
                                                             attn_implementation="eager")
        except Exception as exc:
            raise ExportInputError(f"{source}: could not load the GGUF file ({_reason(exc)})") from None
        return model.eval()
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ExportInputError(
                f"{source}: folder has no config.json (not a saved HuggingFace model)"
            )
        source = path
    elif os.path.exists(path):
        raise ExportInputError(f"{source}: not a folder or a .gguf file (expected a saved HuggingFace model)")
    elif _looks_like_path(source):
        raise ExportInputError(f"{source}: no such model folder")

    from transformers import AutoModelForCausalLM

    def load(**kwargs):
        with _quiet(_verbose(verbose)):
            return AutoModelForCausalLM.from_pretrained(
                source, dtype=DTYPES[dtype], attn_implementation="eager", **kwargs
            )

    if os.path.isdir(source):
        try:
            model = load()
        except Exception as exc:
            raise ExportInputError(f"{source}: could not load model ({_reason(exc)})") from None
    else:
        # The local cache first: it needs no network and avoids the hub client's
        # retries (about 20 s) when offline.
        try:
            model = load(local_files_only=True)
        except OSError:
            model = None
        except Exception as exc:
            raise ExportInputError(f"{source}: could not load model ({_reason(exc)})") from None
        if model is None:
            from huggingface_hub import constants

            if constants.HF_HUB_OFFLINE:
                raise ExportInputError(
                    f"{source}: no such local folder, and not in the HuggingFace cache "
                    f"(offline mode is on, HF_HUB_OFFLINE)"
                )
            try:
                model = load()
            except Exception as exc:
                raise ExportInputError(
                    f"{source}: no such local folder, and could not load it from the "
                    f"HuggingFace hub ({_reason(exc)})"
                ) from None
    model.eval()
    return model


def weight_bytes(model):
    """Bytes of parameters and buffers as an exporter may write them: a tied weight counts once
    per name (TorchScript can write the embedding and the unembedding as two tensors), so a model
    near the protobuf limit goes to external data rather than failing."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _model_dtype(model):
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _vocab_size(model):
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        vocab = model.get_output_embeddings().weight.shape[0]
    return int(vocab)


def _export_dynamo(wrapper, args, staged: StagedModel, opset, verbose):
    """torch.export based; Dim objects tie both inputs' axes and name them in the graph."""
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence")
    axes = {0: batch, 1: sequence}
    program = torch.onnx.export(
        wrapper,
        args,
        None,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": axes, "attention_mask": axes},
        opset_version=opset,
        dynamo=True,
        verbose=verbose,
    )
    # lensgraph's streaming writer, not program.save: the weights go out one at a time, under
    # the data file name the staging area chose.
    staged.write(program.model)
    return program.model.opset_imports.get("", None)


def _export_torchscript(wrapper, args, staged: StagedModel, opset, cache_layers=0, short: bool = True):
    """Tracing based, written with lensgraph's streaming writer (see `_trace_torchscript`). Returns
    the opset written and what `Traced.layers` says."""
    traced = _trace_torchscript(wrapper, args, opset, cache_layers, short)
    staged.write(traced.model)
    return traced.model.opset_imports.get("", None), traced.layers


class Traced:
    """A TorchScript export held in memory: `model`, the onnx-ir graph whose initializers view the
    torch tensors themselves (no copy), and `graph`, torch's own serialised graph with those
    weights as inputs (`weights`, contiguous arrays over the same memory). onnxruntime runs `graph`
    fed `weights` (`runner`) without a copy of the weights or a file; the check and verification's
    reference run there, and `model` is what lensgraph processes and writes."""

    def __init__(self, model, graph: bytes, weights: dict, layers: dict | None = None):
        self.model, self.graph, self.weights = model, graph, weights
        self.layers = layers or {}  # how many decoder layers were traced (graph/repeat.py), and why all where all were
        self.info: dict = {}
        self.check: PendingCheck | None = None

    def runner(self, label: str):
        from .store.runner import Runner

        runner = Runner(self.graph, label=label, few_runs=True)
        runner.given = self.weights
        return runner


def _trace_torchscript(wrapper, args, opset, cache_layers=0, short: bool = True) -> Traced:
    """Tracing based, with the weights left out of torch's ONNX file: the traced graph takes them
    as inputs, and lensgraph makes them initializers over the torch tensors themselves (no
    copy). torch would otherwise build the whole file in memory, weights included, once in C++
    and once as Python bytes: about twice the time and three times the model's size at the peak.
    A decoder whose layers are alike is traced through its first four layers and the others are
    written from those (graph/repeat.py), unless `short` is off (an export that will not be checked
    against torch, or one traced again after its short trace failed the check); any other model is
    traced whole."""
    import onnx_ir as ir

    inputs = ["input_ids", "attention_mask"] + (cache_names(cache_layers)[0] if cache_layers else [])
    count = getattr(wrapper.model.config, "num_hidden_layers", None)
    model, layers = _short_trace(wrapper, opset, bool(cache_layers)) if short else (None, {"traced": count, "of": count})
    if model is not None:
        graph = ir.serde.serialize_model(model).SerializeToString()
    else:
        proto = _torchscript_proto(wrapper, args, opset, cache_layers)
        graph = proto.SerializeToString()
        model = ir.serde.deserialize_model(proto)
        del proto
    tensors = dict(wrapper.named_parameters(remove_duplicate=False))
    tensors.update(wrapper.named_buffers(remove_duplicate=False))
    weights = _weights_as_initializers(model.graph, tensors, set(inputs))
    return Traced(model, graph, weights, layers)


RETRACED = "written from four traced layers, it failed the export check; traced whole"  # export.layers.why


def short_traced(info: dict) -> bool:
    """Whether an export's info says it was written from a trace of fewer layers than it has."""
    layers = info.get("layers") or {}
    return bool(layers) and layers.get("traced") != layers.get("of")


def _short_trace(wrapper, opset, cache: bool):
    """(the export written from a trace of the first layers, {"traced": 4, "of": N}) where the
    layers are alike and the trace shows it (graph/repeat.py), else (None, {"traced": N, "of": N,
    "why": ...}) and the caller traces the whole model."""
    import onnx_ir as ir

    from .graph import repeat

    count = getattr(wrapper.model.config, "num_hidden_layers", None)
    layers, why = _alike_layers(wrapper)
    if layers is None:
        return None, {"traced": count, "of": count, "why": why}
    try:
        with _first_layers(wrapper, layers):
            short, args = _wrapped(wrapper.model, cache)
            proto = _torchscript_proto(short, args, opset, short.layers if cache else 0)
        model = ir.serde.deserialize_model(proto)
        del proto
        own = {"input_ids", "attention_mask", *(cache_names(short.layers)[0] if cache else [])}
        repeat.stamp(model, layers, own)
    except Exception as exc:  # Refused, or a short model torch would not trace: the whole model is traced
        return None, {"traced": count, "of": count, "why": str(exc) if isinstance(exc, repeat.Refused)
                      else _reason(exc)}
    return model, {"traced": repeat.TRACED, "of": count}


def _alike_layers(wrapper):
    """The decoder layers of `wrapper` (its `model` the HuggingFace model) as graph/repeat.py names
    them, where layers 1 to N-1 are one module repeated and a trace of four may stand for them all;
    else (None, why not). What a trace of four could not show must be equal between the layers:
    their classes, parameters, settings (numbers, flags, strings, and what other objects they hold),
    no hooks and no forward of their own, and the config's per-layer lists (`layer_types` and the
    like: one entry per layer)."""
    from .graph.repeat import TRACED, Layers

    config = wrapper.model.config
    count = getattr(config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in wrapper.named_modules()
             if isinstance(m, torch.nn.ModuleList) and count and len(m) == count]
    if len(lists) != 1:
        return None, "no one list of the config's layers"
    if count <= TRACED + 1:
        return None, f"{count} layers"
    for key, entries in _per_layer(config, count).items():
        kinds = {repr(e) for e in entries}
        if len(kinds) > 1:
            return None, f"the config's {key} names layers of {len(kinds)} kinds"
    path, layers = lists[0]
    signatures = [_signature(layer) for layer in layers]
    for i in range(1, count):
        if signatures[i] is None:
            return None, f"layer {i} has a hook or a forward of its own"
        if signatures[i] != signatures[1]:
            return None, f"layer {i} differs from layer 1"
    return Layers(path, count), ""


def _per_layer(config, count: int) -> dict:
    """The config's lists of one entry per layer (layer_types, no_rope_layers, ...)."""
    return {key: value for key, value in vars(config).items()
            if isinstance(value, (list, tuple)) and len(value) == count and not key.startswith("_")}


LAYER_INDEX = re.compile(r"layer_?(idx|id|index|num|number)")  # a layer's own index: the setting allowed to differ


def _signature(layer) -> list | None:
    """What must be equal for two layers to trace alike: classes, settings, parameters; None for a
    layer with hooks or a forward of its own (what they do is seen only by running them)."""
    parts: list = []
    for name, module in layer.named_modules():
        held = vars(module)
        if "forward" in held or any(k.endswith("hooks") and isinstance(v, dict) and v for k, v in held.items()
                                    if "state_dict" not in k):
            return None
        settings = sorted((k, _described(v)) for k, v in held.items()
                          if k not in ("_parameters", "_buffers", "_modules") and not LAYER_INDEX.fullmatch(k))
        parts.append((name, type(module).__qualname__, settings))
    for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
        parts.append((name, tuple(t.shape), t.dtype))
    return parts


def _described(value, depth: int = 0):
    """A value as two layers must share it: plain values and containers by content, a partial by what
    it calls with what, a tensor by its values, a module by its class and signature, anything else (the
    config, a function) by identity."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if depth > 4:
        return ("object", id(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_described(v, depth + 1) for v in value))
    if isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted(repr(_described(v, depth + 1)) for v in value)))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(k), repr(_described(v, depth + 1))) for k, v in value.items())))
    if isinstance(value, functools.partial):
        return ("partial", _described(value.func, depth + 1), _described(value.args, depth + 1),
                _described(value.keywords, depth + 1))
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), value.detach().cpu().numpy().tobytes())
    if isinstance(value, torch.nn.Module):  # held outside the module tree (the kernels hub's per-layer wrappers)
        signature = _signature(value)
        return ("module", id(type(value)), repr(signature) if signature is not None else ("hooked", id(value)))
    return ("object", id(value))


@contextlib.contextmanager
def _first_layers(wrapper, layers):
    """The model with its first graph/repeat.TRACED layers only, as its config says too (its count
    and its per-layer lists); restored on leaving."""
    from .graph.repeat import TRACED

    owner_path, _, attr = layers.path.rpartition(".")
    owner = wrapper.get_submodule(owner_path)
    full = getattr(owner, attr)
    config = wrapper.model.config
    saved = {"num_hidden_layers": config.num_hidden_layers, **_per_layer(config, config.num_hidden_layers)}
    try:
        setattr(owner, attr, torch.nn.ModuleList(list(full)[:TRACED]))
        config.num_hidden_layers = TRACED
        for key, value in saved.items():  # the per-layer lists, as long as the layers (all alike)
            if key != "num_hidden_layers":
                setattr(config, key, type(value)(value[:TRACED]))
        yield
    finally:
        setattr(owner, attr, full)
        for key, value in saved.items():
            setattr(config, key, value)


def _torchscript_proto(wrapper, args, opset, cache_layers=0):
    """torch's TorchScript export of `wrapper` as a ModelProto, its weights as graph inputs, with
    ONNX's shape inference run over it."""
    import onnx

    axes = {0: "batch", 1: "sequence"}
    inputs, outputs = ["input_ids", "attention_mask"], ["logits"]
    dynamic = {"input_ids": axes, "attention_mask": axes, "logits": axes}
    if cache_layers:
        past, present = cache_names(cache_layers)
        inputs, outputs = inputs + past, outputs + present
        dynamic["attention_mask"] = {0: "batch", 1: "total_sequence"}
        dynamic.update({n: {0: "batch", 2: "past_sequence"} for n in past})
        dynamic.update({n: {0: "batch", 2: "total_sequence"} for n in present})
    buffer = io.BytesIO()
    with _type_inference_without_weight_values():
        torch.onnx.export(
            wrapper,
            args,
            buffer,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=opset or TORCHSCRIPT_DEFAULT_OPSET,
            dynamo=False,
            export_params=False,
            do_constant_folding=False,  # torch would fold the weights' transposes into tensors it then leaves out
            verbose=False,  # True dumps the whole traced graph, too much even when verbose
        )
    proto = onnx.load_from_string(buffer.getvalue())
    del buffer
    # torch writes no intermediate types; its graph holds no weight values yet, so ONNX's inference
    # is cheapest here, and the written export carries every shape (its loads then skip inference)
    with contextlib.suppress(Exception):  # a convenience, as store.model.infer_shapes is
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    return proto


@contextlib.contextmanager
def _type_inference_without_weight_values():
    """torch's graph-wide shape and type inference, given the graph's weights as typed inputs but
    not their values. With the values it copies every weight into an ONNX message for ONNX's
    shape inference, twice per export: about 4 s and 0.5 GB at 124M parameters, for the types
    of intermediate values only (the written graph is the same file either way, checked on
    GPT-2 and SmolLM2; the export check and verification run every graph). Where torch has no
    such pass (another version), nothing changes."""
    name = "_jit_pass_onnx_graph_shape_type_inference"
    original = getattr(torch._C, name, None)
    if original is None:
        yield
        return

    def without_values(graph, params_dict, opset):
        return original(graph, {}, opset)

    setattr(torch._C, name, without_values)
    try:
        yield
    finally:
        setattr(torch._C, name, original)


def _weights_as_initializers(graph, tensors: dict, inputs: set) -> dict:
    """Every graph input that is a weight becomes an initializer viewing the torch tensor; a
    Transpose of a matrix (torch's nn.Linear) becomes the transposed view, as torch's constant
    folding would have written it, and is computed only as it is written. Returns the weights
    by input name, as onnxruntime's feeds. The initializers' views are read-only, as weights read
    from a model file are: a tied embedding's table and its transposed view share their memory, so
    a rewrite must never edit one in place."""
    weights = {}
    for value in [v for v in graph.inputs if v.name not in inputs]:
        if value.name not in tensors:
            raise ExportError(f"the traced graph takes {value.name!r}, which is not a weight of the model")
        weights[value.name] = tensors[value.name].detach().cpu().contiguous().numpy()
        array = weights[value.name].view()
        array.flags.writeable = False
        graph.inputs.remove(value)  # a new value is the initializer: onnx-ir's input bookkeeping keeps the old
        _as_initializer(graph, value, array)
    for node in list(graph):
        source = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if source is None or source.const_value is None or len(source.shape or ()) != 2:
            continue
        perm = node.attributes.get("perm")
        if perm is not None and list(perm.as_ints()) != [1, 0]:
            continue
        _as_initializer(graph, node.outputs[0], source.const_value.numpy().T)
        graph.remove(node, safe=True)
    _fold_small_weight_ops(graph)
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        del graph.initializers[name]  # weights read only through what was folded
    return weights


def _as_initializer(graph, out, array):
    """Replace `out` (a node output, or a value just taken out of the graph inputs) by an initializer
    holding `array` (which may be a view)."""
    import onnx_ir as ir

    tensor = ir.Tensor(array, name=out.name)
    folded = ir.Value(name=out.name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype),
                      const_value=tensor)
    out.name = None
    out.replace_all_uses_with(folded, replace_graph_outputs=out.is_graph_output())
    graph.register_initializer(folded)
    return folded


FOLD_LIMIT = 1 << 20  # elements: a norm weight's `1 + w` or a cast, never a matrix


def _fold_small_weight_ops(graph) -> None:
    """Nodes computing only from weights and constants (Gemma's `1 + w.float()`), evaluated
    once into initializers, as torch's constant folding would have left them."""
    import onnx
    import onnx_ir as ir
    from onnx.reference import ReferenceEvaluator

    from .graph import match

    derived = {id(v) for v in graph.initializers.values()}  # weights and what is computed from them alone
    for node in list(graph):
        if node.domain != "" or node.op_type in ("Constant", "Shape") or not node.inputs or \
                not any(v is not None and id(v) in derived for v in node.inputs):
            continue
        arrays = [match.const_value(v) if v is not None else None for v in node.inputs]
        if any(a is None for v, a in zip(node.inputs, arrays) if v is not None) or \
                sum(a.size for a in arrays if a is not None) > FOLD_LIMIT:
            continue
        names = [f"x{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
        proto = ir.serde.serialize_node(node)
        proto.ClearField("input")
        proto.input.extend(names)
        proto.ClearField("output")
        proto.output.extend(f"y{i}" for i in range(len(node.outputs)))
        model = onnx.helper.make_model(onnx.helper.make_graph(
            [proto], "fold", [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in names if n],
            [onnx.helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.UNDEFINED, None)
             for i in range(len(node.outputs))]), opset_imports=[onnx.helper.make_opsetid("", graph.opset_imports[""])])
        results = ReferenceEvaluator(model).run(None, {n: a for n, a in zip(names, arrays) if n})
        for out, array in zip(node.outputs, results):
            derived.add(id(_as_initializer(graph, out, np.asarray(array))))
        graph.remove(node, safe=True)


def _check_inputs(vocab):
    """A shape unlike the tracing one, with right padding in one row, to catch baked-in shapes."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 5), generator=gen, dtype=torch.int64)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    return ids, mask


class PendingCheck:
    """The export check in two halves: torch's logits on the check's inputs are computed at once,
    while the torch model is loaded; `run` compares onnxruntime's on the same inputs, possibly
    later. convert runs it after releasing the torch model (one copy of the weights in memory
    at a time) on the session that then computes verification's reference."""

    def __init__(self, wrapper, vocab: int, name: str, exporter: str, dtype, cache: bool, verbose: bool):
        self.name, self.exporter, self.dtype, self.verbose = name, exporter, dtype, verbose
        ids, mask = _check_inputs(vocab)
        self.feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        with _quiet(verbose), torch.no_grad():
            if not cache:  # a KV-cache graph gets an empty cache, as at the first step of generation
                self.expected = wrapper(ids, mask).float().numpy()
            else:
                past = _empty_cache(wrapper.model, ids.shape[0], 0, dtype)
                self.expected = wrapper(ids, mask, *past)[0].float().numpy()
                names, _ = cache_names(wrapper.layers)
                self.feeds.update({n: t.numpy() for n, t in zip(names, past)})

    def run(self, model) -> float:
        """The worst logit difference of `model` (the exported file's path, or a Runner over it)
        from torch; an ExportError beyond the dtype's tolerance or where onnxruntime fails."""
        try:
            with _quiet(self.verbose):
                got = _onnx_logits(model, self.feeds)
        except Exception as exc:
            hint = ""
            if self.dtype == torch.float16:
                hint = (f"; onnxruntime on CPU cannot run this float16 graph from the "
                        f"{self.exporter} exporter, use float32")
            raise ExportError(f"{self.name}: onnxruntime could not run the exported graph ({_reason(exc)}){hint}"
                              ) from None
        expected = self.expected
        if got.shape != expected.shape:
            raise ExportError(f"{self.name}: onnx logits have shape {got.shape}, torch gives {expected.shape}")
        diff = np.abs(got - expected)
        max_diff = float(diff.max()) if np.isfinite(diff).all() else float("inf")
        scale = float(np.abs(expected).max()) or 1.0
        limit = TOLERANCE.get(self.dtype, TOLERANCE[torch.float16]) * scale
        if not max_diff <= limit:
            raise ExportError(f"{self.name}: onnx logits differ from torch by {max_diff:.3g} "
                              f"(allowed {limit:.3g} for {_dtype_name(self.dtype)}, logit scale {scale:.3g})")
        return max_diff


def _onnx_logits(model, feeds: dict) -> np.ndarray:
    """onnxruntime's logits for `feeds`, from a Runner or a new session over a file (loaded without
    prepacking: one small run)."""
    if not isinstance(model, (str, os.PathLike)):
        return model.run_many(["logits"], feeds)[0].astype(np.float32)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], feeds)[0].astype(np.float32)


def _check_choices(exporter, opset):
    """Reject bad exporter/opset pairs up front; returns opset as an int or None."""
    if exporter not in EXPORTERS:
        raise ExportInputError(
            f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}"
        )
    if opset is None:
        return None
    try:
        opset = int(opset)
    except (TypeError, ValueError):
        raise ExportInputError(f"opset must be a whole number, got {opset!r}") from None
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise ExportInputError(
            f"the dynamo exporter cannot target opset {opset} (lowest is "
            f"{DYNAMO_MIN_OPSET}); use the torchscript exporter for it"
        )
    return opset


def export_model(model, out_path, exporter="dynamo", opset=None, check=True, verbose=None,
                 cache=False, external_data=None, short: bool = True):
    """Export a loaded causal LM to out_path and, if check, compare it with torch. With
    check="later" the result's "check" is the PendingCheck to run (the file is then in place
    before it is checked: the caller's staging folder keeps it from being published).

    With cache, the graph is a generation step with past_key_values.* inputs and
    present.* outputs (TorchScript exporter only). The file appears only once
    everything has succeeded: it is written in a temporary folder beside out_path
    and moved into place at the end. A TorchScript export is written from a trace of
    four layers where the layers are alike (graph/repeat.py), never where it is not
    checked, and is traced whole where that export fails the check (`short` off: at once).
    """
    opset = _check_choices(exporter, opset)
    if cache and exporter != "torchscript":
        raise ExportInputError("a KV-cache graph needs the torchscript exporter (--exporter torchscript)")
    verbose = _verbose(verbose)
    name = getattr(model, "name_or_path", "") or type(model).__name__
    dtype = _model_dtype(model)
    vocab = _vocab_size(model)
    external = weight_bytes(model) > SINGLE_FILE_LIMIT if external_data is None else bool(external_data)

    out_path = Path(out_path).expanduser()
    if out_path.is_dir():
        raise ExportInputError(f"{out_path}: is a folder; give a file path such as model.onnx")
    # written in a hidden folder beside out_path and moved into place once checked (store/atomic.py)
    staged = prepare(str(out_path), out_path.name + ".data" if external else None)
    dest = staged.staged_path
    with staged:
        wrapper, _, info = _trace(model, exporter, opset, cache, verbose, staged, short=short and bool(check))
        if exporter == "torchscript" and not check:
            info["layers"]["why"] = "not checked against torch, so traced whole"
        pending = PendingCheck(wrapper, vocab, name, exporter, dtype, cache, verbose) if check else None
        try:
            max_diff = pending.run(dest) if check and check != "later" else None
        except ExportError as exc:
            if not short_traced(info):
                raise
            wrapper, _, info = _trace(model, exporter, opset, cache, verbose, staged, short=False)
            info["layers"] = {**info.get("layers", {}), "why": f"{RETRACED} ({exc})"}
            max_diff = pending.run(dest)

    return {
        **info,
        "max_abs_diff": max_diff,
        "external_data": external,
        "data_file": staged.data_path,
        "out_path": str(out_path),
        **({"check": pending} if check == "later" else {}),
    }


def export_in_memory(model, opset=None, verbose=None, cache=False, short: bool = True) -> Traced:
    """A TorchScript export of a loaded causal LM held in memory, not written (see Traced), with its
    check's torch half computed (`check`: run it on `runner()`, or on the file once written). The
    weights stay the torch model's own memory: release every other reference to the model and
    this is the one copy."""
    opset = _check_choices("torchscript", opset)
    verbose = _verbose(verbose)
    name = getattr(model, "name_or_path", "") or type(model).__name__
    wrapper, traced, info = _trace(model, "torchscript", opset, cache, verbose, None, short=short)
    traced.info = {**info, "max_abs_diff": None}
    traced.check = PendingCheck(wrapper, _vocab_size(model), name, "torchscript", _model_dtype(model), cache, verbose)
    return traced


def _info(exporter: str, opset, dtype, seconds: float, cache: bool, layers: dict | None) -> dict:
    info = {"exporter": exporter, "opset": opset, "dtype": _dtype_name(dtype), "seconds": round(seconds, 3),
            "cache": bool(cache)}
    if layers:
        info["layers"] = layers
    return info


def _wrapped(model, cache: bool):
    """The module the exporters trace (logits only, or a decoder step with its cache) and the
    arguments it is traced with."""
    wrapper = (LogitsAndCache(model) if cache else LogitsOnly(model)).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, _vocab_size(model), (2, 8), generator=gen, dtype=torch.int64)
    args = (ids, torch.ones_like(ids))
    if cache:  # traced with a non-empty past so its length stays dynamic
        args = (ids, torch.ones(2, 11, dtype=torch.int64), *_empty_cache(model, 2, 3, _model_dtype(model)))
    return wrapper, args


def _trace(model, exporter: str, opset, cache: bool, verbose, staged: StagedModel | None, short: bool = True):
    """Trace `model` (wrapped for its call signature) with `exporter` and write the graph to `staged`,
    or with no `staged` (TorchScript only) keep it in memory. Returns (wrapper, the Traced export
    or None where written, the export's info: exporter, opset written, seconds, ...)."""
    name = getattr(model, "name_or_path", "") or type(model).__name__
    dtype = _model_dtype(model)
    wrapper, args = _wrapped(model, cache)

    start = time.perf_counter()
    traced, layers = None, None
    try:
        with _quiet(verbose), torch.no_grad():
            if exporter == "dynamo":
                written_opset = _export_dynamo(wrapper, args, staged, opset, verbose)
            elif staged is not None:
                written_opset, layers = _export_torchscript(wrapper, args, staged, opset,
                                                            cache_layers=wrapper.layers if cache else 0, short=short)
            else:
                traced = _trace_torchscript(wrapper, args, opset, cache_layers=wrapper.layers if cache else 0,
                                            short=short)
                written_opset, layers = traced.model.opset_imports.get("", None), traced.layers
    except LensError:
        raise
    except Exception as exc:
        hint = ""
        if dtype == torch.float16:
            hint = (f"; float16 export on CPU with the {exporter} exporter does not work "
                    f"for this model on torch {torch.__version__}, use float32")
        raise ExportError(f"{name}: {exporter} export failed ({_reason(exc)}){hint}") from None
    seconds = time.perf_counter() - start

    if opset is not None and written_opset != opset:
        # Guard: the dynamo exporter keeps its own opset when conversion fails.
        raise ExportError(
            f"{name}: {exporter} exporter could not target opset {opset} "
            f"(wrote {written_opset})"
        )
    return wrapper, traced, _info(exporter, written_opset, dtype, seconds, cache, layers)


def export(source, out_path, exporter="dynamo", opset=None, dtype="float32", check=True,
           verbose=None, cache=False):
    """Load source (hub id or local folder) and export it; see export_model."""
    _check_choices(exporter, opset)  # before the slow load
    if cache and exporter != "torchscript":
        raise ExportInputError("a KV-cache graph needs the torchscript exporter (--exporter torchscript)")
    model = load_hf_model(source, dtype=dtype, verbose=verbose)
    result = export_model(model, out_path, exporter=exporter, opset=opset, check=check,
                          verbose=verbose, cache=cache)
    result["source"] = str(source)
    return result
