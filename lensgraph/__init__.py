"""lensgraph: TransformerLens-style weight processing on exported ONNX graphs."""

__version__ = "0.1.0"

from .cache import run_with_cache  # noqa: E402
from .errors import BadInputError, LensError, VerificationError  # noqa: E402
from .hooks import add_hooks  # noqa: E402
from .model import LensModel  # noqa: E402
from .pipeline import DEFAULT_PIPELINE, Pass, PassManager, PassResult  # noqa: E402
from .process import process  # noqa: E402
from .verify import verify  # noqa: E402

__all__ = [
    "BadInputError", "DEFAULT_PIPELINE", "LensError", "LensModel", "Pass", "PassManager",
    "PassResult", "VerificationError", "add_hooks", "process", "run_with_cache", "verify", "__version__",
]
