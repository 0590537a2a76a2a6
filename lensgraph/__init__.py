"""lensgraph: TransformerLens-style weight processing on exported ONNX graphs."""

from ._version import __version__
from .errors import BadInputError, LensError, VerificationError
from .interp.activation_cache import ActivationCache
from .interp.cache import run_with_cache
from .interp.generate import Generation, generate
from .interp.hooks import add_hooks
from .interp.tl_weights import TLWeights, tl_weights
from .interp.tokens import to_str_tokens
from .pipeline import DEFAULT_PIPELINE, Pass, PassManager, PassResult
from .process import process
from .store.model import LensModel
from .verify import verify

__all__ = [
    "ActivationCache", "BadInputError", "DEFAULT_PIPELINE", "Generation", "LensError", "LensModel", "Pass", "PassManager",
    "PassResult", "TLWeights", "VerificationError", "add_hooks", "generate", "process", "run_with_cache", "tl_weights", "to_str_tokens", "verify", "__version__",
]
