"""From a checkpoint to a processed model folder in one step, with TransformerLens's switches.

    lensgraph.from_pretrained("gpt2", "gpt2-lens/", center_unembed=False)
    lensgraph convert ./SmolLM2.Q4_1.gguf -o smollm2-lens/

The source (a hub id, a local HuggingFace folder or a `.gguf` file) is loaded, exported
with a traced exporter (TorchScript where it works, else dynamo: every hook point can be
placed on such a graph), processed and verified against the export, and written as one
folder: `model.onnx` (and `model.onnx.data` when large), the tokenizer files and
generation_config.json, `model.hooks.onnx` (the same graph with every hook point as an
output, reading model.onnx's weights: run_with_cache's first call only opens it), and
`lensgraph.json`, the report of what was done. The folder is built beside its target
and renamed into place only when every step has succeeded (store/folder.py). With
`exporter="genai"` the folder is onnxruntime-genai's, written by its model builder
(fused attention: fewer hook points, the fastest deployment) and processed as a folder.

By default the model is a decoder step with a KV cache (`past_key_values.*` in, `present.*`
out), which also serves every analysis with an empty past: one graph for generation and
read-out, one copy of the weights (measured against two graphs in docs/benchmarks.md). Where
the cache cannot be exported exactly (the export check against torch fails), the graph
has none, with a note, and `generate` runs the whole sequence for each new token.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time

from .errors import BadInputError, LensError, missing_extra
from .passes import DEFAULT_PIPELINE, from_switches
from .store.folder import RECORD, StagedFolder
from .store.resolve import EXPORT, GENERATION_CONFIG, MODEL, POINTS

EXPORTERS = ("auto", "torchscript", "dynamo", "genai")
# Above this the weights go to model.onnx.data: onnxruntime maps such a file as it loads (0.4 s for
# SmolLM2-135M against 1 to 3 s with the same 650 MB inside the graph file), and every session over the
# folder's model (verification's, run_with_cache's, a deployment's) loads it.
EXTERNAL_ABOVE = 64 * 2**20


def from_pretrained(source, out_dir, fold_ln: bool = True, center_writing_weights: bool = True,
                    center_unembed: bool = True, fold_value_biases: bool = True,
                    refactor_factored_attn_matrices: bool = False, **options) -> dict:
    """Export `source` and process it with TransformerLens's switches into the folder `out_dir`;
    returns the report `process` returns (plus the export's). Options: exporter ('auto',
    'torchscript', 'dynamo', 'genai'), with_cache (None: where it exports exactly), hooks (globs),
    verify, dtype, keep_export, progress."""
    passes = from_switches(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                           center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                           refactor_factored_attn_matrices=refactor_factored_attn_matrices)
    return convert(source, out_dir, passes, **options)


def from_pretrained_no_processing(source, out_dir, **options) -> dict:
    """The export alone, written as `from_pretrained` writes its folder."""
    return convert(source, out_dir, [], **options)


def convert(source, out_dir, passes=DEFAULT_PIPELINE, exporter: str = "auto", with_cache: bool | None = None,
            hooks=None, verify: bool = True, dtype: str = "float32", keep_export: bool = False, progress=None,
            verbose=None) -> dict:
    """The one-step job behind `from_pretrained` and `lensgraph convert` (see the module docstring).
    The export is always written, processed or not; with `keep_export` the unprocessed export stays
    in the folder's export/ too, for `lensgraph verify FOLDER`."""
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
            report = _genai(source, staged, manager, verify, keep_export, step)
        else:
            report = _traced(source, staged, manager, exporter, with_cache, hooks, verify, dtype, keep_export, step,
                             verbose)
        if "points" not in report:  # made from the model in memory where it was processed there
            step("points")
            report["points"] = _points(staged.path, report["notes"])
        report.pop("input_files", None)  # the export's place in the staging folder, gone once written
        local = os.path.expanduser(str(source))
        report.update(source=str(source), source_path=os.path.abspath(local) if os.path.exists(local) else None,
                      input=str(source), folder=staged.target, output=os.path.join(staged.target, MODEL),
                      kept_export=os.path.isdir(os.path.join(staged.path, EXPORT)), dtype=dtype,
                      seconds=time.perf_counter() - start)
        if report.get("data_file"):
            report["data_file"] = os.path.join(staged.target, os.path.basename(report["data_file"]))
        step("write")
        staged.commit(report)
    except BaseException:
        staged.discard()
        raise
    return report


def _traced(source, staged: StagedFolder, manager, exporter: str, with_cache: bool | None, hooks, verify: bool,
            dtype: str, keep_export: bool, step, verbose) -> dict:
    try:
        from .export import load_hf_model, load_tokenizer
    except ModuleNotFoundError as exc:
        raise missing_extra(exc.name, "lensgraph convert") from None
    from .process import process, process_loaded

    step("load")
    notes = []
    tokenizer = load_tokenizer(source)  # written and released first: its memory is reused by what follows
    if tokenizer is not None:
        tokenizer.save_pretrained(staged.path)
    else:
        notes.append(f"{source}: no tokenizer found, so none was written")
    del tokenizer
    loaded = [load_hf_model(source, dtype=dtype, verbose=verbose)]  # the one reference: released after the export
    generation = getattr(loaded[0], "generation_config", None)
    raw = os.path.join(staged.path, EXPORT)
    os.mkdir(raw)
    step("export")
    exported = os.path.join(raw, MODEL)
    # processed models are verified as written, so the export they come from need not be written:
    # it is checked and gives verification's reference where it lies, in memory
    in_memory = bool(manager.passes) and not keep_export and exporter in ("auto", "torchscript")
    info, reference, memory = _export_checked(source, loaded, exported, exporter, with_cache, dtype,
                                              verify and bool(manager.passes), notes, verbose, in_memory)
    if generation is not None:  # the end tokens generate stops at
        generation.to_json_file(os.path.join(staged.path, GENERATION_CONFIG))
    if memory is not None:
        holder, check = memory
        points = {}

        def place_points(model, written) -> None:  # on the model in memory, before verification
            step("points")
            points["points"] = _points(staged.path, notes, (model, written))

        report = process_loaded(holder, exported, os.path.join(staged.path, MODEL), manager, verify=verify,
                                progress=step, reference=reference, written=None if hooks else place_points)
        report.update(points)
        if not report["written"]:  # nothing to rewrite or nothing changed: the export itself is the model
            report["data_file"] = _write_checked(holder, check, os.path.join(staged.path, MODEL))
    else:
        report = process(exported, os.path.join(staged.path, MODEL), passes=manager, verify=verify,
                         progress=step, reference=reference) if manager.passes else _unprocessed(exported, manager)
        if not report["written"]:  # nothing to do or nothing changed: the export itself is the model
            _move_contents(raw, staged.path)
            report["data_file"] = info.get("data_file")
    if not keep_export or not report["written"]:
        shutil.rmtree(raw)  # the export, where processing wrote its own model
    if hooks:
        step("hooks")
        report["hooks"] = _add_hooks(os.path.join(staged.path, MODEL), hooks)
    report["export"] = {k: v for k, v in info.items() if k not in ("out_path", "data_file")}
    report["notes"] = notes + report.get("notes", [])
    return report


def _export_checked(source, holder: list, path: str, exporter: str, with_cache: bool | None, dtype: str, verify: bool,
                    notes: list, verbose, in_memory: bool = False):
    """Export the torch model, `holder`'s one item and its only reference, to `path` (a KV-cache
    graph where it exports exactly, else a plain one, and with dynamo where TorchScript fails and
    the choice was ours) and check it against torch.

    The check's torch half runs first; then the torch model is released and the export loaded
    once in onnxruntime, for the check's other half and for verification's reference (the
    unprocessed export's logits): one copy of the weights in memory at a time (with `in_memory`,
    the torch model's own). A graph that fails
    the check is followed by the next kind, from the source loaded again. With `in_memory` a
    TorchScript export is not written: onnxruntime runs torch's graph over the torch model's
    own weights, which then stay the export's (export.Traced). Returns the export's info, the
    reference (None where nothing will be verified) and, in memory, ([the export as a LensModel,
    its only reference], its pending check) (else None)."""
    from .export import (RETRACED, ExportError, ExportInputError, export_in_memory, export_model, load_hf_model,
                         short_traced, weight_bytes)
    from .store.model import LensModel
    from .store.runner import Runner
    from .verify import reference

    chosen = "torchscript" if exporter == "auto" else exporter
    cache = with_cache if with_cache is not None else chosen == "torchscript"
    if not cache and with_cache is None:
        notes.append(f"no KV cache: the {chosen} exporter cannot trace one; generate runs the whole sequence for "
                     "each token")
    attempts = ([(chosen, True, True)] if cache else []) + [(chosen, False, True)] + \
        ([("dynamo", False, True)] if exporter == "auto" and chosen != "dynamo" else [])
    external = weight_bytes(holder[0]) > EXTERNAL_ABOVE or None  # None: export's own limit decides
    while attempts:
        kind, kv, short = attempts.pop(0)
        traced = runner = None
        info = {}
        try:
            if not holder:  # released by the attempt before: load the source again
                holder.append(load_hf_model(source, dtype=dtype, verbose=verbose))
            if in_memory and kind == "torchscript":
                traced = export_in_memory(holder[0], verbose=verbose, cache=kv, short=short)
                info, check = {**traced.info, "external_data": bool(external)}, traced.check
            else:
                info = export_model(holder[0], path, exporter=kind, verbose=verbose, cache=kv, external_data=external,
                                    check="later", short=short)
                check = info.pop("check")
            if not short and "layers" in info:
                info["layers"]["why"] = RETRACED
            holder.clear()
            if traced is None:  # the model's reference cycles (transformers', the trace's) hold its weights; in
                gc.collect()  # memory the export views them, and a collection (0.2 s) would free none of them
            try:
                runner = traced.runner(f"{path} (in memory)") if traced else Runner(path, few_runs=True)
            except LensError as exc:
                raise ExportError(f"onnxruntime could not load the exported graph ({exc})") from None
            info["max_abs_diff"] = check.run(runner)
            ref = reference(runner) if verify else None
            if traced is None:
                return info, ref, None
            model = LensModel(traced.model, path)
            model.external_input = bool(external)
            return info, ref, ([model], check)
        except ExportError as exc:
            traced = runner = None  # the torch weights, released before the source is loaded again
            for name in os.listdir(os.path.dirname(path)):  # the failed export and its data
                os.remove(os.path.join(os.path.dirname(path), name))
            if short_traced(info) and not isinstance(exc, ExportInputError):  # the same export, traced whole
                notes.append(f"the export: {RETRACED} ({exc})")
                attempts.insert(0, (kind, kv, False))
                continue
            if isinstance(exc, ExportInputError) or (kv and with_cache) or (not kv and exporter != "auto") \
                    or kind == "dynamo":
                raise
            if kv:
                notes.append(f"no KV cache: its export failed ({exc}); generate runs the whole sequence for each token")
            else:
                notes.append(f"the TorchScript export failed ({exc}); exported with dynamo")
    raise AssertionError("unreachable: the last attempt raises")


def _write_checked(holder: list, check, path: str) -> str | None:
    """The in-memory export, `holder`'s one item, written to `path` as the folder's model and then
    checked against torch as written (the file is published only by the caller's commit).
    Returns its data file, if any."""
    model = holder.pop()
    for key in [k for k in model.ir.metadata_props if k.startswith("lensgraph.")]:
        del model.ir.metadata_props[key]  # a pass that changed nothing still recorded itself as applied
    staged = model.stage(path)
    del model
    gc.collect()  # the torch weights the model viewed: the check's session maps the written copy
    with staged:
        check.run(staged.staged_path)
    return staged.data_path


def _points(folder: str, notes: list, in_memory=None) -> int:
    """model.hooks.onnx beside the folder's model: every hook point, placed now so that
    run_with_cache's first call only opens it. Returns how many points it holds. `in_memory`:
    (the processed model still in memory, the StagedModel that has just written it): the points are
    placed on that model, its weights reading the written files, rather than on the file read back,
    before verification, which then has the memory to itself."""
    from .interp.cache import save_points

    model_path, out = os.path.join(folder, MODEL), os.path.join(folder, POINTS)
    model, written = in_memory or (None, None)
    try:
        count = save_points(model_path, out, model, written.staged_path if written else None)
    except LensError as exc:
        notes.append(f"no {POINTS}: {exc}; run_with_cache places the points on its first call")
        return 0
    if not count:
        os.remove(out)
    return count


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


def _genai(source, staged: StagedFolder, manager, verify: bool, keep_export: bool, step) -> dict:
    """onnxruntime-genai's model builder writes the folder; lensgraph processes it as a folder."""
    from .process import process

    try:
        import onnxruntime_genai  # noqa: F401
    except ModuleNotFoundError as exc:
        raise missing_extra(exc.name, "lensgraph convert --exporter genai", extra="genai") from None
    built = os.path.join(staged.path, "genai")
    step("export")
    _build_genai(source, built)
    processed = os.path.join(staged.path, "processed")
    report = process(built, processed, passes=manager, verify=verify, progress=step) if manager.passes \
        else _unprocessed(built, manager)
    final = processed if report["written"] else built
    if os.path.exists(os.path.join(final, RECORD)):  # process's record of its part; convert writes the whole
        os.remove(os.path.join(final, RECORD))
    _move_contents(final, staged.path)
    if keep_export and report["written"]:
        os.rename(built, os.path.join(staged.path, EXPORT))
    shutil.rmtree(built, ignore_errors=True)
    shutil.rmtree(processed, ignore_errors=True)
    report["export"] = {"exporter": "genai", "builder": "onnxruntime_genai.models.builder -p fp32 -e cpu"}
    return report


def _build_genai(source, out: str) -> None:
    """onnxruntime-genai's model builder (fp32, CPU) from a local checkpoint or a hub id into `out`."""
    where = ["-i", os.path.expanduser(str(source))] if os.path.exists(os.path.expanduser(str(source))) \
        else ["-m", str(source)]
    work = out + ".cache"
    run = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", *where, "-o", out,
                          "-p", "fp32", "-e", "cpu", "-c", work], capture_output=True, text=True)
    shutil.rmtree(work, ignore_errors=True)
    if run.returncode != 0:
        last = [ln for ln in (run.stderr or run.stdout).splitlines() if ln.strip()][-1:] or ["no message"]
        raise LensError(f"{source}: onnxruntime-genai's model builder failed ({last[0].strip()})")


def verify_folder(folder, tolerance: float | None = None, provider: str = "CPUExecutionProvider", progress=None):
    """Re-check a folder convert wrote against its source: the unprocessed export kept in the folder
    (`keep_export`), else the source recorded in lensgraph.json, exported again as convert exported
    it. The result's `against` says which."""
    from .store.resolve import resolve
    from .verify import verify

    files = resolve(folder)
    record = files.record
    if record is None or "export" not in record:
        raise BadInputError(f"{files.given}: has no lensgraph.json from `lensgraph convert` saying what it was made "
                            f"from; give the original as well: lensgraph verify ORIGINAL.onnx {files.given}")
    if "steer" in record:
        raise BadInputError(f"{files.given}: was steered (lensgraph.json's steer entry), so by design it is not "
                            f"equivalent to its source; `lensgraph steer` checked it before writing. Verify the folder "
                            f"it was steered from: {record['steer'].get('source', 'the source')}")
    if files.export:
        result = verify(files.export, files.model, tolerance=tolerance, provider=provider, progress=progress)
        result.against = f"the unprocessed export kept in {os.path.join(files.given, EXPORT)}"
        return result
    source = record.get("source_path") or record.get("source")
    if record.get("source_path") and not os.path.exists(record["source_path"]):
        raise BadInputError(f"{files.given}: its source {source} (recorded in lensgraph.json) is gone, so it cannot "
                            f"be exported again; convert with --keep-export to keep the export in the folder: "
                            f"lensgraph convert SOURCE -o {files.given} --keep-export")
    exporter, cache = record["export"].get("exporter"), bool(record["export"].get("cache"))
    with tempfile.TemporaryDirectory(prefix="lensgraph-verify-") as tmp:
        if exporter == "genai":
            try:
                import onnxruntime_genai  # noqa: F401
            except ModuleNotFoundError as exc:
                raise missing_extra(exc.name, "lensgraph verify on an onnxruntime-genai folder", extra="genai") from None
            _build_genai(source, os.path.join(tmp, "genai"))
            fresh = os.path.join(tmp, "genai", os.path.basename(files.model))
        else:
            try:
                from .export import export
            except ModuleNotFoundError as exc:
                raise missing_extra(exc.name, "lensgraph verify FOLDER (it exports the source again)") from None
            fresh = os.path.join(tmp, MODEL)
            export(source, fresh, exporter=exporter, dtype=record.get("dtype", "float32"), cache=cache)
        result = verify(fresh, files.model, tolerance=tolerance, provider=provider, progress=progress)
    result.against = f"{source}, exported again ({exporter}{' with its KV cache' if cache else ''})"
    return result
