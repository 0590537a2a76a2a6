"""Passes and the pass manager.

A pass is a small class: `requires` says why it cannot run on this model (or None),
`run` rewrites through the anatomy and returns statistics, `ensures` checks its
post-condition. Ordering constraints are data (`after`, `needs`; the built-in passes'
are in passes/__init__.py). The manager puts a pipeline in a valid order (saying so in
`notes`), re-analyses the graph before each pass, checks the structure after each one,
and records what was applied in the model's metadata so a second run is a no-op.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, ClassVar, Sequence

import numpy as np

from .errors import LensError, PipelineError
from .graph.anatomy import Anatomy, analyse, nothing_to_rewrite
from .passes import CATALOG, DEFAULT_PIPELINE, load
from .store.deferred import centring_tolerance
from .store.model import LensModel

__all__ = ["DEFAULT_PIPELINE", "Pass", "PassManager", "PassResult", "register"]


@dataclass
class PassResult:
    name: str
    matched: int = 0
    rewritten: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    modified: bool = False
    already_applied: bool = False
    seconds: float = 0.0

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append((what, reason))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skipped"] = [{"what": w, "reason": r} for w, r in self.skipped]
        return d

    def summary(self) -> str:
        if self.already_applied:
            return f"{self.name}: already applied, nothing to do"
        text = f"{self.name}: matched {self.matched}, rewrote {self.rewritten}"
        if self.skipped:
            text += f", skipped {len(self.skipped)}"
        return text + f" ({self.seconds * 1000:.0f} ms)"


class Pass:
    name: ClassVar[str]
    after: ClassVar[tuple[str, ...]] = ()  # must run after these when both are in a pipeline
    needs: ClassVar[tuple[str, ...]] = ()  # must have run first: in the pipeline or already applied
    summary: ClassVar[str] = ""

    def requires(self, model: LensModel, anatomy: Anatomy) -> str | None:
        """Why this pass cannot run on this model at all, or None."""
        if anatomy.post_norm:
            return ("post-norm model: norm outputs are terms of the residual stream, "
                    "which TransformerLens's weight processing does not cover")
        return None

    def run(self, model: LensModel, anatomy: Anatomy) -> PassResult:
        raise NotImplementedError

    def ensures(self, model: LensModel, anatomy: Anatomy) -> None:
        """Raise LensError when the post-condition does not hold. A condition on deferred
        matrices (store/deferred.py) is attached to them and checked as they are written."""


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Make a pass known by its name; a built-in one takes its summary and order from the catalog."""
    if cls.name in CATALOG:
        cls.summary, cls.after, cls.needs = CATALOG[cls.name]
    REGISTRY[cls.name] = cls
    return cls


def _load_builtin_passes() -> None:
    load()


class PassManager:
    def __init__(self, passes: Sequence[str | Pass] | None = None, check_each: bool = True):
        _load_builtin_passes()
        self.passes: list[Pass] = []
        for p in DEFAULT_PIPELINE if passes is None else passes:
            if isinstance(p, str):
                if p not in REGISTRY:
                    known = ", ".join(sorted(REGISTRY))
                    raise PipelineError(f"unknown pass '{p}' (known: {known})")
                p = REGISTRY[p]()
            self.passes.append(p)
        self.check_each = check_each
        self._validate()

    @classmethod
    def parse(cls, spec: str, **kwargs) -> "PassManager":
        names = [s.strip() for s in spec.split(",") if s.strip()]
        return cls(names, **kwargs)  # an empty pipeline changes nothing, so nothing is written

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def _validate(self) -> None:
        """Refuse a pass named twice; put the pipeline in an order every `after` allows,
        keeping the given order where it is free, and note the change."""
        names = self.names
        for name in names:
            if names.count(name) > 1:
                raise PipelineError(f"pass '{name}' appears twice in the pipeline")
        self.notes: list[str] = []
        todo, ordered = list(self.passes), []
        while todo:  # the first pass whose predecessors in the pipeline have all been placed
            placed = {p.name for p in ordered}
            ready = next(p for p in todo if all(d in placed or d not in names for d in p.after))
            ordered.append(ready)
            todo.remove(ready)
        if ordered != self.passes:
            moved = next(p for i, p in enumerate(self.passes) if any(
                d in names and names.index(d) > i for d in p.after))
            dep = next(d for d in moved.after if d in names and names.index(d) > names.index(moved.name))
            self.passes = ordered
            self.notes.append(f"reordered to {','.join(self.names)}: '{moved.name}' must run after '{dep}'")

    def check_needs(self, model: LensModel) -> None:
        """A pass whose prerequisite is neither earlier in the pipeline nor already applied is
        a usage error (PipelineError): it could only be skipped."""
        for i, p in enumerate(self.passes):
            missing = [n for n in p.needs if n not in self.names[:i] and n not in model.applied]
            if missing:
                raise PipelineError(f"'{p.name}' needs {' and '.join(missing)} first (not in the pipeline and not "
                                    f"applied to this model); try: {','.join(dict.fromkeys([*missing, *self.names]))}")

    def run(self, model: LensModel, progress: Callable[[str], None] | None = None,
            final_check: bool = True) -> list[PassResult]:
        """Run the pipeline; `final_check` off leaves the closing ONNX checker run to the caller."""
        self.check_needs(model)
        reason = nothing_to_rewrite(analyse(model.graph))
        if reason is not None:  # not a transformer: never alter it
            return [PassResult(p.name, skipped=[("model", f"nothing to rewrite: {reason}")]) for p in self.passes]
        results, anatomy = [], None  # the anatomy after a pass is the next one's: nothing changes between
        clean = None  # the nodes after the last clean-up (None: the graph as loaded, not cleaned yet)
        for p in self.passes:
            if progress:
                progress(p.name)
            if p.name in model.applied:
                results.append(PassResult(p.name, already_applied=True))
                continue
            start = time.perf_counter()
            anatomy = anatomy or analyse(model.graph)
            reason = p.requires(model, anatomy)
            if reason is not None:
                result = PassResult(p.name)
                result.skip("model", reason)
            else:
                result = p.run(model, anatomy)
                model.cleanup(clean)
                clean = list(model.graph)
                if self.check_each:  # cheap per pass; the ONNX checker runs once the pipeline is done
                    model.check(checker=False)
                anatomy = analyse(model.graph)
                p.ensures(model, anatomy)
                model.mark_applied(p.name)
            result.seconds = time.perf_counter() - start
            results.append(result)
        if final_check and self.check_each and any(r.modified for r in results):
            model.check()
        return results


def centred(arr, mean, dtype) -> bool:
    """Whether `mean` is zero to within the rounding of the tensor's own dtype."""
    scale = max(float(arr.max()), -float(arr.min()), 1e-30)
    return float(np.abs(mean).max()) <= centring_tolerance(dtype) * scale


def check(condition: bool, message: str) -> None:
    """A pass's post-condition: fail loudly rather than hand back a wrong graph."""
    if not condition:
        raise LensError(message)
