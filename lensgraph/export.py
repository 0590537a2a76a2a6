"""Turn a HuggingFace causal LM into an ONNX graph with logits as its only output.

The graph has inputs ``input_ids`` and ``attention_mask`` (int64, [batch, sequence])
and output ``logits`` ([batch, sequence, vocab]); batch and sequence are dynamic.
"""

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

EXPORTERS = ("dynamo", "torchscript")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
TORCHSCRIPT_DEFAULT_OPSET = 17
VERBOSE_ENV = "LENSGRAPH_VERBOSE"

# Protobuf caps one file at 2 GB, graph included, and torch's dynamo saver
# already switches to external data above 1.5 GiB; use its limit for both exporters.
SINGLE_FILE_LIMIT = 1536 * 1024 * 1024

# Largest logit difference allowed, as a fraction of the largest |logit|.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}

# Loggers that chatter during load and export.
_NOISY_LOGGERS = ("torch", "transformers", "onnxscript", "onnx_ir", "onnxruntime")


class ExportError(Exception):
    """An expected failure, with a one-line message fit to show a user."""


class LogitsOnly(torch.nn.Module):
    """Fixes the call signature and drops the cache object transformers 5 returns."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).logits


def _verbose(verbose):
    """An explicit argument wins; otherwise the environment decides."""
    if verbose is not None:
        return bool(verbose)
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def _quiet(verbose):
    """Hide warnings, logging and stray prints from torch, transformers and onnx."""
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
                contextlib.redirect_stderr(sink):
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
    return (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or source.count("/") > 1
        or os.path.exists(source)
    )


def load_hf_model(source, dtype="float32", verbose=None):
    """Load a causal LM with eager attention, the only kind that exports cleanly."""
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    source = str(source)
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ExportError(f"{source}: folder has no config.json (not a saved HuggingFace model)")
        source = path
    elif _looks_like_path(source):
        raise ExportError(f"{source}: no such model folder")

    from transformers import AutoModelForCausalLM

    try:
        with _quiet(_verbose(verbose)):
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=DTYPES[dtype], attn_implementation="eager"
            )
    except Exception as exc:
        if os.path.isdir(source):
            raise ExportError(f"{source}: could not load model ({_reason(exc)})") from None
        raise ExportError(
            f"{source}: not a local folder and could not be loaded from the HuggingFace hub "
            f"({_reason(exc)})"
        ) from None
    model.to(DTYPES[dtype])
    model.eval()
    return model


def _weight_bytes(model):
    """Bytes of parameters and buffers, counting tied weights once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


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


def _export_dynamo(wrapper, args, dest, opset, external, verbose):
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
    # Saving here rather than through f= lets us choose single file vs external data.
    program.save(str(dest), external_data=external)


def _export_torchscript(wrapper, args, dest, opset, external, verbose):
    """Tracing based; above 2 GB torch writes one file per tensor, so gather them into one."""
    axes = {0: "batch", 1: "sequence"}
    target = dest
    if external:
        raw = dest.parent / "raw"
        raw.mkdir()
        target = raw / dest.name
    torch.onnx.export(
        wrapper,
        args,
        str(target),
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": axes},
        opset_version=opset or TORCHSCRIPT_DEFAULT_OPSET,
        dynamo=False,
        verbose=verbose,
    )
    if external:
        import onnx

        proto = onnx.load(str(target))
        onnx.save_model(
            proto,
            str(dest),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=dest.name + ".data",
        )


def _check_inputs(vocab):
    """A shape unlike the tracing one, with right padding in one row, to catch baked-in shapes."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 5), generator=gen, dtype=torch.int64)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    return ids, mask


def _compare(wrapper, onnx_path, vocab):
    """Run onnxruntime and torch on the same fresh input; return (max abs diff, logit scale)."""
    import onnxruntime as ort

    ids, mask = _check_inputs(vocab)
    with torch.no_grad():
        expected = wrapper(ids, mask).float().numpy()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(onnx_path), options, providers=["CPUExecutionProvider"]
    )
    (got,) = session.run(
        ["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )
    got = got.astype(np.float32)
    if got.shape != expected.shape:
        raise ExportError(
            f"onnx logits have shape {got.shape}, torch gives {expected.shape}"
        )
    diff = np.abs(got - expected)
    max_diff = float(np.nanmax(diff)) if np.isfinite(diff).all() else float("inf")
    scale = float(np.abs(expected).max()) or 1.0
    return max_diff, scale


def _written_opset(path):
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def export_model(model, out_path, exporter="dynamo", opset=None, check=True, verbose=None):
    """Export a loaded causal LM to out_path and, if check, compare it with torch.

    The file appears only once everything has succeeded: it is written in a
    temporary folder beside out_path and moved into place at the end.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if opset is not None:
        opset = int(opset)
    verbose = _verbose(verbose)
    name = getattr(model, "name_or_path", "") or type(model).__name__
    dtype = _model_dtype(model)
    dtype_name = {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))
    vocab = _vocab_size(model)
    external = _weight_bytes(model) > SINGLE_FILE_LIMIT

    out_path = Path(out_path).expanduser()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    dest = work / out_path.name
    try:
        wrapper = LogitsOnly(model).eval()
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (2, 8), generator=gen, dtype=torch.int64)
        args = (ids, torch.ones_like(ids))
        run = _export_dynamo if exporter == "dynamo" else _export_torchscript

        start = time.perf_counter()
        try:
            with _quiet(verbose), torch.no_grad():
                run(wrapper, args, dest, opset, external, verbose)
        except Exception as exc:
            hint = ""
            if dtype == torch.float16:
                hint = (f"; float16 export on CPU is not supported for this model with the "
                        f"{exporter} exporter on torch {torch.__version__}, use float32")
            raise ExportError(f"{name}: {exporter} export failed ({_reason(exc)}){hint}") from None
        seconds = time.perf_counter() - start

        max_diff = None
        if check:
            try:
                with _quiet(verbose):
                    max_diff, scale = _compare(wrapper, dest, vocab)
            except ExportError as exc:
                raise ExportError(f"{name}: {exc}") from None
            except Exception as exc:
                hint = ""
                if dtype == torch.float16:
                    hint = (f"; float16 graphs from the {exporter} exporter do not run on "
                            f"onnxruntime CPU for this model, use float32")
                raise ExportError(
                    f"{name}: onnxruntime could not run the exported graph ({_reason(exc)}){hint}"
                ) from None
            limit = TOLERANCE.get(dtype, TOLERANCE[torch.float16]) * scale
            if not max_diff <= limit:
                raise ExportError(
                    f"{name}: onnx logits differ from torch by {max_diff:.3g} "
                    f"(allowed {limit:.3g} for {dtype_name}, logit scale {scale:.3g})"
                )

        written_opset = _written_opset(dest)
        # Data first, so a graph never sits beside a missing data file.
        if external:
            os.replace(work / (out_path.name + ".data"), str(out_path) + ".data")
        os.replace(dest, out_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    return {
        "exporter": exporter,
        "opset": written_opset,
        "dtype": dtype_name,
        "seconds": round(seconds, 3),
        "max_abs_diff": max_diff,
        "external_data": external,
        "out_path": str(out_path),
    }


def export(source, out_path, exporter="dynamo", opset=None, dtype="float32", check=True,
           verbose=None):
    """Load source (hub id or local folder) and export it; see export_model."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    model = load_hf_model(source, dtype=dtype, verbose=verbose)
    result = export_model(model, out_path, exporter=exporter, opset=opset, check=check,
                          verbose=verbose)
    result["source"] = str(source)
    return result
