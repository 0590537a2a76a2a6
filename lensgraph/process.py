"""The file-to-file job: load, run the pass pipeline, verify, then write.

Nothing is written unless the rewritten model passes the ONNX checker and (unless
turned off) the equivalence check against the untouched input file.
"""

from __future__ import annotations

import gc
import os
import re
import time

from .errors import BadInputError, VerificationError
from .graph.anatomy import analyse, nothing_to_rewrite
from .pipeline import Pass, PassManager, PassResult
from .store.atomic import data_files_of
from .store.folder import RECORD, StagedFolder, is_model_folder, model_file
from .store.model import LensModel
from .verify import check_tolerance
from .verify import verify as verify_models


def process(
    src: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    passes: str | list[str] | PassManager | None = None,
    verify: bool = True,
    external_data: str | bool | None = None,
    provider: str = "CPUExecutionProvider",
    tolerance: float | None = None,
    progress=None,
    in_place: bool = False,
    reference=None,
) -> dict:
    """Rewrite `src` into `dst` with `passes` (default: TransformerLens's pipeline); return the report.

    The output appears complete or not at all (see store/atomic.py); `src` and its data are never
    modified, unless `in_place` asks to replace them. A graph that is not a transformer is
    left alone: the report says "nothing to rewrite" and nothing is written. `reference`: the
    original's logits on verification's inputs, already computed from `src` (verify.reference).
    """
    start = time.perf_counter()
    _check_arguments(src, dst, verify, tolerance, provider)
    src = os.fspath(src)
    if os.path.isdir(src) and not is_model_folder(src) and os.path.isfile(os.path.join(src, RECORD)):
        raise BadInputError(f"{src}: is a folder `lensgraph convert` wrote; convert again with the switches you want "
                            f"(lensgraph convert SOURCE -o {src} --no-...), or process its model file: "
                            f"lensgraph process {os.path.join(src, 'model.onnx')} -o OUT.onnx")
    if is_model_folder(src):
        return _process_folder(src, dst, in_place, passes=passes, verify=verify, external_data=external_data,
                               provider=provider, tolerance=tolerance, progress=progress)
    if in_place:
        if dst is not None and os.path.abspath(os.fspath(dst)) != os.path.abspath(src):
            raise BadInputError("give an output path or in_place, not both")
        dst = src
    elif dst is None:
        raise BadInputError("no output path given (pass one, or replace the input with in_place)")
    dst = os.fspath(dst)
    manager = _manager(passes)
    if os.path.isdir(dst):
        raise BadInputError(f"{dst}: is a directory; give the output file's path")
    if not in_place and os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        raise BadInputError(f"{dst}: output would overwrite the input (use --in-place to replace it)")
    return process_loaded([LensModel.load(src)], src, dst, manager, verify=verify, external_data=external_data,
                          provider=provider, tolerance=tolerance, progress=progress, in_place=in_place,
                          reference=reference, start=start)


def process_loaded(holder: list, src: str, dst: str, manager: PassManager, verify: bool = True,
                   external_data: str | bool | None = None, provider: str = "CPUExecutionProvider",
                   tolerance: float | None = None, progress=None, in_place: bool = False, reference=None,
                   start: float | None = None, written=None) -> dict:
    """`process` on a model already open: `holder`'s one item, the LensModel, and its only reference
    (convert's export, held in memory). It is dropped once the rewrite is written, before
    verification loads that; where nothing is written it stays in `holder`, unchanged. `src` names
    the model in the report and in messages; `reference` as for `process`. `written(model, staged)`
    is called once the rewrite is written and before it is verified, with the model in memory
    reading its weights from the written files (LensModel.read_written) and the StagedModel."""
    start = time.perf_counter() if start is None else start
    model = holder[0]
    report = {
        "input": src,
        "input_files": model.input_files,
        "output": os.path.abspath(dst),
        "data_file": None,
        "written": False,
        "nothing_to_rewrite": nothing_to_rewrite(analyse(model.graph)),
        "pipeline": manager.names,
        "notes": list(manager.notes),
        "applied_before": model.applied,
        "applied": model.applied,
        "changed": False,
        "passes": [],
        "verification": None,
    }
    if report["nothing_to_rewrite"]:
        report["seconds"] = time.perf_counter() - start
        return report
    results = manager.run(model, progress=progress, final_check=False)  # checked in full below
    changed = any(r.modified for r in results)
    report.update(applied=model.applied, changed=changed, passes=[r.to_dict() for r in results])
    if not changed:  # no output at all: an unchanged copy would pass for a processed model
        report["seconds"] = time.perf_counter() - start
        return report
    model.check(full=True)
    staged = model.stage(dst, external_data=external_data, replace_input=in_place)
    if written is not None:
        try:
            model.read_written(staged)
            written(model, staged)
        except BaseException:
            staged.discard()
            raise
    del model  # the rewritten weights are on disk now; verification needs the memory
    holder.clear()
    gc.collect()  # the graph's reference cycles hold its weights (in memory, for convert's export)
    with staged:
        if verify and changed:  # check the very files that will be published, one model at a time
            original = src if reference is None else reference
            result = verify_models(original, staged.staged_path, provider=provider, tolerance=tolerance,
                                   label_b=f"{dst} (as written)", progress=progress)
            report["verification"] = result.to_dict()
            if not result.ok:
                why = result.nonfinite or (f"worst difference {result.max_rel_diff:.2e} of the logit scale "
                                           f"exceeds {result.tolerance:.0e}")
                raise VerificationError(
                    f"{src}: rewritten model is not equivalent (passes "
                    f"{','.join(r.name for r in results if r.modified)}): {why}; nothing was written"
                )
    report.update(written=True, data_file=staged.data_path)
    report["seconds"] = time.perf_counter() - start
    return report


def _process_folder(src: str, dst, in_place: bool, **options) -> dict:
    """An onnxruntime-genai folder: its model processed, every other file copied unchanged, the
    whole written beside the target and renamed into place (see store/folder.py)."""
    if in_place or dst is None:
        raise BadInputError(f"{src}: give the output folder with -o (a model folder is not replaced in place)")
    dst = os.path.abspath(os.fspath(dst))
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise BadInputError(f"{dst}: the output folder is the input folder")
    model = model_file(src)
    staged = StagedFolder(dst)
    try:
        staged.copy_from(src, {os.path.realpath(model)} | {os.path.realpath(f) for f in _data_files(model)})
        inner = os.path.join(staged.path, os.path.basename(model))
        report = process(model, inner, **options)
        if not report["written"]:
            staged.discard()
            report["output"] = dst
            return report
        report.update(folder_input=src, output=os.path.join(dst, os.path.basename(model)),
                      data_file=os.path.join(dst, os.path.basename(report["data_file"])) if report["data_file"] else None)
        staged.commit(report)
    except BaseException:
        staged.discard()
        raise
    return report


def _data_files(model: str) -> list[str]:
    return [os.path.join(os.path.dirname(model), name) for name in data_files_of(model)]


def _manager(passes) -> PassManager:
    if isinstance(passes, PassManager):
        return passes
    if isinstance(passes, str):
        return PassManager.parse(passes)
    if passes is not None and (not isinstance(passes, (list, tuple)) or not all(isinstance(p, (str, Pass)) for p in passes)):
        raise BadInputError(f"passes must be a pipeline string, a list of pass names or a PassManager, not {passes!r}")
    return PassManager(passes)


def _check_arguments(src, dst, verify, tolerance, provider) -> None:
    """Wrong argument types from Python get the same clear error as bad input on the command line."""
    if not isinstance(src, (str, os.PathLike)):
        raise BadInputError(f"src must be a path to an ONNX file, not {type(src).__name__}")
    if dst is not None and not isinstance(dst, (str, os.PathLike)):
        raise BadInputError(f"dst must be a path, not {type(dst).__name__}")
    if not isinstance(verify, bool):
        raise BadInputError(f"verify must be True or False, not {verify!r}")
    check_tolerance(tolerance)
    if not isinstance(provider, str):
        raise BadInputError(f"provider must be an onnxruntime provider name, not {provider!r}")


def summary(report: dict) -> str:
    """A few human lines: per pass what matched, was rewritten or skipped and why; one line
    when nothing changed."""
    notes = [f"  note: {n}" for n in report.get("notes", [])]
    if report.get("nothing_to_rewrite"):
        return "\n".join(notes + [f"  nothing to rewrite: {report['nothing_to_rewrite']}; the model was left alone "
                                   "and nothing was written"])
    if not report["changed"]:
        return "\n".join(notes + [f"  nothing changed, so nothing was written: {_why_unchanged(report['passes'])}"])
    lines = notes
    for d in report["passes"]:
        r = PassResult(d["name"], d["matched"], d["rewritten"], [(s["what"], s["reason"]) for s in d["skipped"]],
                       d["modified"], d["already_applied"], d["seconds"])
        lines.append("  " + r.summary())
        lines += [f"    skipped {line}" for line in grouped_skips(r.skipped)]
    v = report.get("verification")
    if v:
        lines.append(f"  verification: worst centred-logit difference {v['max_rel_diff']:.2e} of the logit "
                     f"scale (tolerance {v['tolerance']:.0e})")
    else:
        lines.append("  verification: skipped (--no-verify)")
    return "\n".join(lines)


def grouped_skips(skipped: list[tuple[str, str]]) -> list[str]:
    """One line per reason: 'layers 0-11 attention (12): value bias is already zero' rather than
    twelve identical lines; a reason given once keeps its own line."""
    by_reason: dict[str, list[str]] = {}
    for what, reason in skipped:
        by_reason.setdefault(reason, []).append(what)
    lines = []
    for reason, whats in by_reason.items():
        if len(whats) == 1:
            lines.append(f"{whats[0]}: {reason}")
            continue
        kinds = {re.sub(r"^layer \d+ | \(.*\)$", "", w) for w in whats}
        layers = [int(m.group(1)) for w in whats if (m := re.match(r"layer (\d+) ", w))]
        if len(kinds) == 1 and len(layers) == len(whats):
            span = f"{min(layers)}-{max(layers)}" if layers == list(range(min(layers), max(layers) + 1)) else \
                ",".join(map(str, layers))
            lines.append(f"layers {span} {kinds.pop()} ({len(whats)}): {reason}")
        else:
            lines.append(f"{len(whats)} places ({', '.join(whats[:3])}{', ...' if len(whats) > 3 else ''}): {reason}")
    return lines


def _why_unchanged(passes: list[dict]) -> str:
    if not passes:
        return "the pipeline is empty"
    if all(d["already_applied"] for d in passes):
        return "every pass was already applied"
    parts = []
    for d in passes:
        if d["already_applied"]:
            parts.append(f"{d['name']} already applied")
        elif d["skipped"]:
            parts.append(f"{d['name']}: {d['skipped'][0]['reason']}")
        else:
            parts.append(f"{d['name']}: found nothing to rewrite")
    return "no pass changed anything (" + "; ".join(parts) + ")"
