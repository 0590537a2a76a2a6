"""Equivalence check in onnxruntime.

Both models run on several batch/sequence shapes with token ids drawn from the
vocabulary. Logits are compared after subtracting each position's mean over the
vocabulary (TransformerLens equivalence: one constant per position is free), and the
worst difference is reported relative to the logit scale.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .errors import BadInputError

DEFAULT_SHAPES = ((1, 7), (2, 5), (3, 1))
FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
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

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = "equivalent" if self.ok else "NOT equivalent"
        return (
            f"{verdict}: worst centred-logit difference {self.max_rel_diff:.2e} of the logit scale "
            f"(tolerance {self.tolerance:.0e}; {self.max_abs_diff:.2e} absolute; "
            f"shapes {', '.join(f'{b}x{s}' for b, s in self.shapes)}; {self.provider})"
        )


class Runner:
    """An onnxruntime session over a path, bytes, a ModelProto or a LensModel.

    A path is opened through safety.py first: onnxruntime never sees a file that would
    read external data from outside its folder.
    """

    def __init__(self, model, provider: str = "CPUExecutionProvider", label: str | None = None):
        import onnxruntime as ort

        self._tmp = None
        self.label = label or (os.fspath(model) if isinstance(model, (str, os.PathLike)) else "rewritten model")
        source = self._source(model)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        ort.set_default_logger_severity(3)
        available = ort.get_available_providers()
        if provider not in available:
            raise BadInputError(f"provider {provider} is not available (have: {', '.join(available)})")
        try:
            self.session = ort.InferenceSession(source, options, providers=[provider])
        except Exception as exc:
            raise BadInputError(f"{self.label}: onnxruntime cannot load it ({str(exc).splitlines()[0][:300]})") from exc
        self.inputs = self.session.get_inputs()
        self.given: dict = {}  # inputs with fixed values (weights held out of the graph)
        names = [o.name for o in self.session.get_outputs()]
        self.output = "logits" if "logits" in names else names[0]

    def _source(self, model):
        from .model import LensModel
        from .safety import open_model

        if isinstance(model, (str, os.PathLike)):
            open_model(os.fspath(model))
            return os.fspath(model)
        if isinstance(model, LensModel):  # streamed to a private folder: no whole-model copy in memory
            from .model import EXTERNAL_ABOVE
            from .writer import write_model

            self._tmp = tempfile.TemporaryDirectory()
            path = os.path.join(self._tmp.name, "model.onnx")
            write_model(model.ir, path, "model.onnx.data" if model.nbytes() > EXTERNAL_ABOVE else None)
            return path
        if isinstance(model, onnx.ModelProto):
            if model.ByteSize() < 2**31 - 2**20:
                return model.SerializeToString()
            self._tmp = tempfile.TemporaryDirectory()
            path = os.path.join(self._tmp.name, "model.onnx")
            onnx.save(model, path, save_as_external_data=True)
            return path
        return model

    def feeds(self, batch: int, seq: int, vocab: int, rng: np.random.Generator) -> dict:
        feeds = {}
        for inp in self.inputs:
            name = inp.name
            if name in self.given:
                feeds[name] = self.given[name]
                continue
            if "past" in name and inp.type in FLOAT_TYPES:
                # an empty cache: each graph's own cache differs (a folded value bias is not in it)
                dims = [d if isinstance(d, int) else None for d in inp.shape]
                if len(dims) < 2 or dims[0] is not None or any(d is None for d in dims[1:-2]):
                    raise BadInputError(f"{self.label}: cannot make an empty cache for input {name} {inp.shape}")
                shape = [batch] + [0 if d is None else d for d in dims[1:]]
                feeds[name] = np.zeros(shape, FLOAT_TYPES[inp.type])
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
        return int(self.run(self.feeds(1, 1, 1, rng)).shape[-1])

    def run(self, feeds: dict) -> np.ndarray:
        return self.run_many([self.output], feeds)[0]

    def run_many(self, names: list[str], feeds: dict) -> list[np.ndarray]:
        try:
            return self.session.run(names, feeds)
        except Exception as exc:
            raise BadInputError(f"{self.label}: onnxruntime failed to run it ({str(exc).splitlines()[0][:300]})") from exc


def centred(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    return x - x.mean(axis=-1, keepdims=True)


def verify(
    original,
    rewritten,
    shapes=DEFAULT_SHAPES,
    tolerance: float | None = None,
    provider: str = "CPUExecutionProvider",
    seed: int = 0,
    label_b: str | None = None,
) -> VerifyResult:
    """Compare centred logits of two models; ok when the worst relative gap is within tolerance.

    The models run one after the other: the original's logits are kept (they are small)
    and its session released before the rewritten model is loaded, so memory holds one
    model at a time, whatever its size.
    """
    a = original if isinstance(original, Runner) else Runner(original, provider)
    label_a, output = a.label, a.output
    vocab = a.vocab_size()
    rng = np.random.default_rng(seed)
    runs = []
    for batch, seq in shapes:
        feeds = a.feeds(batch, seq, vocab, rng)
        runs.append((feeds, a.run(feeds)))
    del a
    b = rewritten if isinstance(rewritten, Runner) else Runner(rewritten, provider, label=label_b)
    worst_abs, scale, dtype = 0.0, 0.0, None
    for feeds, la in runs:
        lb = b.run(feeds)
        if la.shape != lb.shape:
            raise BadInputError(f"{label_a} and {b.label}: logits shapes differ: {la.shape} vs {lb.shape}")
        dtype = la.dtype
        ca, cb = centred(la), centred(lb)
        worst_abs = max(worst_abs, float(np.abs(ca - cb).max()))
        scale = max(scale, float(np.abs(ca).max()))
    rel = worst_abs / max(scale, 1e-30)
    tol = tolerance if tolerance is not None else TOLERANCE.get(np.dtype(dtype), 1e-4)
    ok = bool(np.isfinite(rel) and rel <= tol)
    return VerifyResult(ok, rel, worst_abs, tol, scale, [list(s) for s in shapes], provider, output)
