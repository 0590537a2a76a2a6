"""From a checkpoint to a processed model folder in one step, with TransformerLens's switches.

    lensgraph.from_pretrained("gpt2", "gpt2-lens/", center_unembed=False)
    lensgraph convert ./SmolLM2.Q4_1.gguf -o smollm2-lens/

The source (a hub id, a local HuggingFace folder or a `.gguf` file) is loaded, exported
with a traced exporter (TorchScript where it works, else dynamo: every hook point can be
placed on such a graph), processed and verified against the export, and written as one
folder: `model.onnx` (and `model.onnx.data` when large), the tokenizer files, and
`lensgraph.json`, the report of what was done. The folder is built beside its target
and renamed into place only when every step has succeeded (store/folder.py). With
`exporter="genai"` the folder is onnxruntime-genai's, written by its model builder
(fused attention: fewer hook points, the fastest deployment) and processed as a folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from .errors import BadInputError, LensError, missing_extra
from .passes import DEFAULT_PIPELINE, from_switches
from .store.folder import RECORD, StagedFolder

EXPORTERS = ("auto", "torchscript", "dynamo", "genai")
MODEL = "model.onnx"
# Above this the weights go to model.onnx.data: onnxruntime maps such a file as it loads (0.4 s for
# SmolLM2-135M against 1 to 3 s with the same 650 MB inside the graph file), and convert loads the model
# three times (the export's check, then verification's two sessions).
EXTERNAL_ABOVE = 64 * 2**20


def from_pretrained(source, out_dir, fold_ln: bool = True, center_writing_weights: bool = True,
                    center_unembed: bool = True, fold_value_biases: bool = True,
                    refactor_factored_attn_matrices: bool = False, **options) -> dict:
    """Export `source` and process it with TransformerLens's switches into the folder `out_dir`;
    returns the report `process` returns (plus the export's). Options: exporter ('auto',
    'torchscript', 'dynamo', 'genai'), with_cache, hooks (globs), verify, dtype, progress."""
    passes = from_switches(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                           center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                           refactor_factored_attn_matrices=refactor_factored_attn_matrices)
    return convert(source, out_dir, passes, **options)


def from_pretrained_no_processing(source, out_dir, **options) -> dict:
    """The export alone, written as `from_pretrained` writes its folder."""
    return convert(source, out_dir, [], **options)


def convert(source, out_dir, passes=DEFAULT_PIPELINE, exporter: str = "auto", with_cache: bool = False,
            hooks=None, verify: bool = True, dtype: str = "float32", progress=None, verbose=None) -> dict:
    """The one-step job behind `from_pretrained` and `lensgraph convert` (see the module docstring).
    The export is always written, processed or not."""
    if exporter not in EXPORTERS:
        raise BadInputError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if with_cache and exporter in ("dynamo", "genai"):
        raise BadInputError(f"--with-cache makes a TorchScript decoder step; it cannot go with the {exporter} exporter"
                            + (" (an onnxruntime-genai folder always has its KV cache)" if exporter == "genai" else ""))
    if not isinstance(out_dir, (str, os.PathLike)):
        raise BadInputError(f"out_dir must be a folder path, not {type(out_dir).__name__}")
    from .pipeline import PassManager

    manager = passes if isinstance(passes, PassManager) else PassManager(list(passes))
    step = progress or (lambda name: None)
    start = time.perf_counter()
    staged = StagedFolder(os.fspath(out_dir))
    try:
        if exporter == "genai":
            report = _genai(source, staged, manager, verify, step)
        else:
            report = _traced(source, staged, manager, exporter, with_cache, hooks, verify, dtype, step, verbose)
        report.pop("input_files", None)  # the export's place in the staging folder, gone once written
        report.update(source=str(source), input=str(source), folder=staged.target,
                      output=os.path.join(staged.target, MODEL), seconds=time.perf_counter() - start)
        if report.get("data_file"):
            report["data_file"] = os.path.join(staged.target, os.path.basename(report["data_file"]))
        step("write")
        staged.commit(report)
    except BaseException:
        staged.discard()
        raise
    return report


def _traced(source, staged: StagedFolder, manager, exporter: str, with_cache: bool, hooks, verify: bool,
            dtype: str, step, verbose) -> dict:
    try:
        from .export import ExportError, export_model, load_hf_model, load_tokenizer, weight_bytes
    except ModuleNotFoundError as exc:
        raise missing_extra(exc.name, "lensgraph convert") from None
    from .process import process

    step("load")
    model = load_hf_model(source, dtype=dtype, verbose=verbose)
    tokenizer = load_tokenizer(source)
    raw = os.path.join(staged.path, "export")
    os.mkdir(raw)
    step("export")
    notes = []
    chosen = "torchscript" if exporter == "auto" else exporter
    external = weight_bytes(model) > EXTERNAL_ABOVE or None  # None: export's own limit decides
    try:
        info = export_model(model, os.path.join(raw, MODEL), exporter=chosen, verbose=verbose, cache=with_cache,
                            external_data=external)
    except ExportError as exc:
        if exporter != "auto" or with_cache:
            raise
        notes.append(f"the TorchScript export failed ({exc}); exported with dynamo")
        info = export_model(model, os.path.join(raw, MODEL), exporter="dynamo", verbose=verbose,
                            external_data=external)
    del model  # processing and verification need the memory
    if tokenizer is not None:
        tokenizer.save_pretrained(staged.path)
    else:
        notes.append(f"{source}: no tokenizer found, so none was written")
    exported = os.path.join(raw, MODEL)
    report = process(exported, os.path.join(staged.path, MODEL), passes=manager, verify=verify,
                     progress=step) if manager.passes else _unprocessed(exported, manager)
    if not report["written"]:  # nothing to do or nothing changed: the export itself is the model
        _move_contents(raw, staged.path)
        report["data_file"] = info.get("data_file")
    shutil.rmtree(raw)  # the export, where processing wrote its own model
    if hooks:
        step("hooks")
        report["hooks"] = _add_hooks(os.path.join(staged.path, MODEL), hooks)
    report["export"] = {k: v for k, v in info.items() if k not in ("out_path", "data_file")}
    report["notes"] = notes + report.get("notes", [])
    return report


def _move_contents(folder: str, into: str) -> None:
    """Every entry of `folder` renamed into `into` (the same file system: the staging folder)."""
    for name in os.listdir(folder):
        os.replace(os.path.join(folder, name), os.path.join(into, name))


def _unprocessed(exported: str, manager) -> dict:
    return {"input": exported, "written": False, "changed": False, "pipeline": [], "applied": [], "passes": [],
            "notes": list(manager.notes), "verification": None, "nothing_to_rewrite": None, "data_file": None}


def _add_hooks(path: str, patterns) -> dict:
    """Hook outputs added to the folder's model, written beside it and moved over it."""
    from .interp.hooks import add_hooks
    from .store.model import LensModel

    model = LensModel.load(path)
    report = add_hooks(model, [patterns] if isinstance(patterns, str) else list(patterns))
    if not report.added:
        raise BadInputError(f"no hook point matching {patterns} can be placed: "
                            + "; ".join(f"{k}: {v}" for k, v in list(report.unplaced.items())[:3]))
    model.check(full=True)
    folder = os.path.dirname(path)
    hooked = os.path.join(folder, "hooked")
    os.mkdir(hooked)
    model.save(os.path.join(hooked, MODEL))
    del model
    for name in os.listdir(folder):  # the model without hooks and its data
        if name == MODEL or name.startswith(MODEL + ".data"):
            os.remove(os.path.join(folder, name))
    _move_contents(hooked, folder)
    os.rmdir(hooked)
    return report.to_dict()


def _genai(source, staged: StagedFolder, manager, verify: bool, step) -> dict:
    """onnxruntime-genai's model builder writes the folder; lensgraph processes it as a folder."""
    from .process import process

    try:
        import onnxruntime_genai  # noqa: F401
    except ModuleNotFoundError as exc:
        raise missing_extra(exc.name, "lensgraph convert --exporter genai", extra="genai") from None
    built = os.path.join(staged.path, "genai")
    step("export")
    where = ["-i", os.path.expanduser(str(source))] if os.path.exists(os.path.expanduser(str(source))) \
        else ["-m", str(source)]
    run = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", *where, "-o", built,
                          "-p", "fp32", "-e", "cpu", "-c", os.path.join(staged.path, "genai-cache")],
                         capture_output=True, text=True)
    shutil.rmtree(os.path.join(staged.path, "genai-cache"), ignore_errors=True)
    if run.returncode != 0:
        last = [ln for ln in (run.stderr or run.stdout).splitlines() if ln.strip()][-1:] or ["no message"]
        raise LensError(f"{source}: onnxruntime-genai's model builder failed ({last[0].strip()})")
    processed = os.path.join(staged.path, "processed")
    report = process(built, processed, passes=manager, verify=verify, progress=step) if manager.passes \
        else _unprocessed(built, manager)
    final = processed if report["written"] else built
    if os.path.exists(os.path.join(final, RECORD)):  # process's record of its part; convert writes the whole
        os.remove(os.path.join(final, RECORD))
    _move_contents(final, staged.path)
    shutil.rmtree(built, ignore_errors=True)
    shutil.rmtree(processed, ignore_errors=True)
    report["export"] = {"exporter": "genai", "builder": "onnxruntime_genai.models.builder -p fp32 -e cpu"}
    return report
