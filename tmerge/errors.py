"""Errors the CLI turns into a one-line message and exit code 2 (bad input) or 1 (failed check)."""


class TmergeError(Exception):
    """Bad input or an unsupported request: the CLI prints the message and exits with code 2."""

    exit_code = 2


class VerificationError(TmergeError):
    """A produced artifact failed its check (e.g. ONNX parity): exit code 1, nothing written."""

    exit_code = 1


def missing_extra(module: str, extra: str) -> TmergeError:
    """The error for an optional dependency that is not installed."""
    return TmergeError(f"{module} is not installed: pip install 'tmerge[{extra}]'")
