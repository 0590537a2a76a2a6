"""Errors that lensgraph reports to users, each with the exit code the CLI uses."""

import contextlib


class LensError(Exception):
    """A failure with a one-line message meant for the user."""

    exit_code = 3


class VerificationError(LensError):
    """The rewritten model is not equivalent to the original; nothing was written."""

    exit_code = 1


class BadInputError(LensError):
    """The input file, a path or an argument is unusable."""

    exit_code = 2


class PipelineError(BadInputError):
    """An unknown pass name or an invalid pass order."""


MADE_BY_DEMO = ("export", "view")  # the extras `make demo` installs into .venv


def missing_extra(module: str, what: str, extra: str = "export") -> BadInputError:
    """A usage error naming the extra that brings `module`, in a form that works from a clone too."""
    demo = ", or `make demo`, which installs it into .venv" if extra in MADE_BY_DEMO else ""
    return BadInputError(f"{what} needs {module}, which is not installed: pip install 'lensgraph[{extra}]' "
                         f"(from a clone: pip install -e '.[{extra}]'{demo})")


def lens_cause(exc: BaseException | None) -> "LensError | None":
    """The LensError behind `exc`, when a library wrapped one in its own error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LensError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def unwrapped():
    """Let a LensError raised inside a library call (onnx-ir's serialiser computes deferred
    weights, whose checks raise one) reach the user as itself, not as the library's error."""
    try:
        yield
    except Exception as exc:
        found = lens_cause(exc)
        if found is not None and found is not exc:
            raise found from None
        raise
