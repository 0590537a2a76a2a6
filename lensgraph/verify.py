"""Equivalence check in onnxruntime.

Both models run on several batch/sequence shapes with token ids drawn from the
vocabulary. Logits are compared after subtracting each position's mean over the
vocabulary (TransformerLens equivalence: one constant per position is free), and the
worst difference is reported relative to the logit scale.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import BadInputError
from .store.resolve import resolve
from .store.runner import Runner

DEFAULT_SHAPES = ((1, 7), (2, 5), (3, 1))
VERIFY_STEPS = ("verify: original", "verify: rewritten")  # what `progress` is told, in order
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 2e-2, np.dtype(np.float64): 1e-9}


@dataclass
class VerifyResult:
    ok: bool
    max_rel_diff: float
    max_abs_diff: float
    tolerance: float
    logit_scale: float
    shapes: list = field(default_factory=list)
    provider: str = "CPUExecutionProvider"
    output: str = "logits"
    nonfinite: str | None = None  # why non-finite logits make the models not equivalent
    against: str | None = None  # what a converted folder was checked against (convert.verify_folder)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = "equivalent" if self.ok else "NOT equivalent"
        if self.against:
            verdict += f" to {self.against}"
        if self.nonfinite:
            return f"{verdict}: {self.nonfinite} ({self.provider})"
        return (
            f"{verdict}: worst centred-logit difference {self.max_rel_diff:.2e} of the logit scale "
            f"(tolerance {self.tolerance:.0e}; {self.max_abs_diff:.2e} absolute; "
            f"shapes {', '.join(f'{b}x{s}' for b, s in self.shapes)}; {self.provider})"
        )


def check_tolerance(tolerance) -> None:
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not tolerance > 0):
        raise BadInputError(f"tolerance must be a positive number, not {tolerance!r}")


def centred(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    return x - x.mean(axis=-1, keepdims=True)


@dataclass
class Reference:
    """The original model's logits on verification's inputs: computed once, from a model file or
    from a Runner already open on it (convert's export check), and compared later."""
    label: str
    output: str
    runs: list  # (feeds, logits) per shape
    shapes: tuple
    provider: str
    seed: int


def reference(original, shapes=DEFAULT_SHAPES, provider: str = "CPUExecutionProvider", seed: int = 0) -> Reference:
    """`original`'s logits on `shapes` with token ids drawn from its vocabulary (see `verify`)."""
    a = original if isinstance(original, Runner) else Runner(original, provider, few_runs=True)
    vocab = a.vocab_size()
    rng = np.random.default_rng(seed)
    runs = []
    for batch, seq in shapes:
        feeds = a.feeds(batch, seq, vocab, rng)
        runs.append((feeds, a.run(feeds)))
    return Reference(a.label, a.output, runs, tuple(tuple(s) for s in shapes), provider, seed)


def verify(
    original,
    rewritten,
    shapes=DEFAULT_SHAPES,
    tolerance: float | None = None,
    provider: str = "CPUExecutionProvider",
    seed: int = 0,
    label_b: str | None = None,
    progress=None,
) -> VerifyResult:
    """Compare centred logits of two models (files, or folders holding them); ok when the worst
    relative gap is within tolerance. `original` may also be a Reference computed before.

    The models run one after the other: the original's logits are kept (they are small)
    and its session released before the rewritten model is loaded, so memory holds one
    model at a time, whatever its size.
    """
    check_tolerance(tolerance)
    original, rewritten = (resolve(m).model if isinstance(m, (str, os.PathLike)) else m for m in (original, rewritten))
    step = progress or (lambda name: None)
    step(VERIFY_STEPS[0])
    if isinstance(original, Reference):
        if (original.shapes, original.provider, original.seed) != (tuple(tuple(s) for s in shapes), provider, seed):
            raise BadInputError("the reference was computed on other shapes, with another provider or seed")
        ref = original
    else:
        ref = reference(original, shapes, provider, seed)
    label_a, runs = ref.label, ref.runs
    step(VERIFY_STEPS[1])
    b = rewritten if isinstance(rewritten, Runner) else Runner(rewritten, provider, label=label_b, few_runs=True)
    worst_abs, scale, dtype, nonfinite, compared = 0.0, 0.0, None, None, 0
    for feeds, la in runs:
        lb = b.run(feeds)
        if la.shape != lb.shape:
            raise BadInputError(f"{label_a} and {b.label}: logits shapes differ: {la.shape} vs {lb.shape}")
        dtype = la.dtype
        nonfinite = nonfinite or _nonfinite_difference(la, lb)
        rows = np.isfinite(la).all(axis=-1) & np.isfinite(lb).all(axis=-1)  # positions to compare
        if rows.any():
            ca, cb = centred(la[rows]), centred(lb[rows])
            worst_abs = max(worst_abs, float(np.abs(ca - cb).max()))
            scale = max(scale, float(np.abs(ca).max()))
            compared += int(rows.sum())
    if nonfinite is None and not compared:
        nonfinite = "no position has finite logits in both models, so nothing could be compared"
    rel = worst_abs / max(scale, 1e-30)
    tol = tolerance if tolerance is not None else TOLERANCE.get(np.dtype(dtype), 1e-4)
    ok = bool(nonfinite is None and np.isfinite(rel) and rel <= tol)
    return VerifyResult(ok, rel, worst_abs, tol, scale, [list(s) for s in shapes], provider, ref.output, nonfinite)


def _nonfinite_difference(a: np.ndarray, b: np.ndarray) -> str | None:
    """Why the non-finite logits of two runs differ (NaN, +inf, -inf in other places), or None."""
    for kind, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        in_a, in_b = test(a), test(b)
        if not np.array_equal(in_a, in_b):
            return (f"{kind} logits differ: {int(in_a.sum())} in the original, {int(in_b.sum())} "
                    f"in the rewritten model")
    return None
