"""Errors that lensgraph reports to users, each with the exit code the CLI uses."""


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
