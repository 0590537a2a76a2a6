"""lensgraph: TransformerLens-style weight processing on exported ONNX graphs.

The names below are imported on first use, so `import lensgraph` (and every CLI command)
pays only for the modules it needs: onnx, onnx-ir and onnxruntime take about a second.
"""

from __future__ import annotations

import importlib
import sys
import types

from . import sympy_on_use
from ._version import __version__
from .errors import BadInputError, LensError, VerificationError

sympy_on_use.install()

_WHERE = {
    "ActivationCache": ".interp.activation_cache", "run_with_cache": ".interp.cache",
    "Generation": ".interp.generate", "generate": ".interp.generate", "add_hooks": ".interp.hooks",
    "TLWeights": ".interp.tl_weights", "tl_weights": ".interp.tl_weights", "to_str_tokens": ".interp.tokens",
    "to_tokens": ".interp.tokens", "verify_folder": ".convert",
    "DEFAULT_PIPELINE": ".passes", "Pass": ".pipeline", "PassManager": ".pipeline", "PassResult": ".pipeline",
    "process": ".process", "LensModel": ".store.model", "verify": ".verify",
    "from_pretrained": ".convert", "from_pretrained_no_processing": ".convert",
    "run_with_hooks": ".interp.interventions", "run_with_interventions": ".interp.interventions",
    "ablate": ".interp.interventions", "patch": ".interp.interventions", "add": ".interp.interventions",
    "HookPoint": ".interp.interventions", "steer": ".interp.steer", "steering_vector": ".interp.steer",
    "collect": ".interp.collect", "load_activations": ".interp.shards",
}

__all__ = [
    "ActivationCache", "BadInputError", "DEFAULT_PIPELINE", "Generation", "HookPoint", "LensError", "LensModel", "Pass",
    "PassManager", "PassResult", "TLWeights", "VerificationError", "__version__", "ablate", "add", "add_hooks",
    "collect", "from_pretrained", "from_pretrained_no_processing", "generate", "load_activations", "patch", "process",
    "run_with_cache", "run_with_hooks", "run_with_interventions", "steer", "steering_vector", "tl_weights",
    "to_str_tokens", "to_tokens", "verify", "verify_folder",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'lensgraph' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    """Importing the submodule `lensgraph.process` (or `.verify`) would rebind `lensgraph.process`
    to the module; the package's name stays the function, as `from .process import process` left it."""

    def __setattr__(self, name: str, value) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
