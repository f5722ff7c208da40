"""Errors meant for the person at the terminal: the CLI prints `error: <message>` and exits non-zero."""


class AnchorError(Exception):
    """A failure with a one-line explanation a studio engineer can act on."""

    exit_code = 1


class ParamsError(AnchorError):
    exit_code = 2


class InputError(AnchorError):
    """Bad user input (video, identity name, path): nothing was started."""

    exit_code = 2


class StageError(AnchorError):
    """A stage could not produce its artifact from valid-looking inputs (e.g. no person in the video)."""
