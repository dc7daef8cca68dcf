"""Errors the CLI turns into a one-line message and exit code 2 (bad input) or 1 (failed check)."""


class TmergeError(Exception):
    """Bad input or an unsupported request: the CLI prints the message and exits with code 2."""

    exit_code = 2


class VerificationError(TmergeError):
    """A produced artifact failed its check (e.g. ONNX parity): exit code 1, nothing written."""

    exit_code = 1


def first_line(e: BaseException) -> str:
    """``"TypeName: first line of the message"``: a foreign exception in a one-line error."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
