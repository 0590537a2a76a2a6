"""The file-to-file job: load, run the pass pipeline, verify, then write.

Nothing is written unless the rewritten model passes the ONNX checker and (unless
turned off) the equivalence check against the untouched input file.
"""

from __future__ import annotations

import os
import time

from .errors import BadInputError, VerificationError
from .model import LensModel
from .pipeline import PassManager
from .verify import verify as verify_models


def process(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    passes: str | list[str] | PassManager | None = None,
    verify: bool = True,
    external_data: str | bool | None = None,
    provider: str = "CPUExecutionProvider",
    tolerance: float | None = None,
    progress=None,
) -> dict:
    """Rewrite `src` into `dst` with `passes` (default: TransformerLens's pipeline); return the report."""
    start = time.perf_counter()
    src, dst = os.fspath(src), os.fspath(dst)
    manager = _manager(passes)
    if os.path.exists(dst) and os.path.isdir(dst):
        raise BadInputError(f"{dst}: is a directory; give the output file's path")
    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        raise BadInputError(f"{dst}: output would overwrite the input")
    model = LensModel.load(src)
    applied_before = model.applied
    results = manager.run(model, progress=progress)
    changed = any(r.modified for r in results)
    report = {
        "input": src,
        "output": os.path.abspath(dst),
        "pipeline": manager.names,
        "applied_before": applied_before,
        "applied": model.applied,
        "changed": changed,
        "passes": [r.to_dict() for r in results],
        "verification": None,
    }
    model.check(full=True)
    if verify and changed:
        result = verify_models(src, model, provider=provider, tolerance=tolerance)
        report["verification"] = result.to_dict()
        if not result.ok:
            raise VerificationError(
                f"rewritten model is not equivalent (passes {','.join(r.name for r in results if r.modified)}): "
                f"worst difference {result.max_rel_diff:.2e} of the logit scale exceeds {result.tolerance:.0e}; "
                "nothing was written"
            )
    model.save(dst, external_data=external_data)
    report["seconds"] = time.perf_counter() - start
    return report


def _manager(passes) -> PassManager:
    if isinstance(passes, PassManager):
        return passes
    if isinstance(passes, str):
        return PassManager.parse(passes)
    return PassManager(passes)


def summary(report: dict) -> str:
    """A few human lines: per pass what matched, was rewritten or skipped and why."""
    from .pipeline import PassResult

    lines = []
    for d in report["passes"]:
        r = PassResult(d["name"], d["matched"], d["rewritten"], [(s["what"], s["reason"]) for s in d["skipped"]],
                       d["modified"], d["already_applied"], d["seconds"])
        lines.append("  " + r.summary())
        for what, reason in r.skipped:
            lines.append(f"    skipped {what}: {reason}")
    if not report["changed"]:
        lines.append("  nothing changed: " + (
            "every pass was already applied" if all(d["already_applied"] for d in report["passes"])
            else "no pass found anything to rewrite"))
    v = report.get("verification")
    if v:
        lines.append(f"  verification: worst centred-logit difference {v['max_rel_diff']:.2e} of the logit "
                     f"scale (tolerance {v['tolerance']:.0e})")
    elif report["changed"]:
        lines.append("  verification: skipped (--no-verify)")
    return "\n".join(lines)
