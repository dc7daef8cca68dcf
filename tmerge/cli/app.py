"""The ``tmerge`` command line. Thin: parse, call the library, render with rich or print JSON.

Each command lives in its own module under ``tmerge/cli/commands`` and registers itself on ``app``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Sequence

import typer

try:  # typer >= 0.17 vendors click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exceptions

from .._io import json_bytes
from ..errors import TmergeError

app = typer.Typer(
    name="tmerge",
    help="Token merging for timm ViTs: merge, export (ONNX / TensorRT), profile, gate in CI.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def print_json(data) -> None:
    sys.stdout.write(json_bytes(data).decode())


def _register_commands() -> None:
    import importlib
    import pkgutil

    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        importlib.import_module(f"{commands.__name__}.{info.name}")


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwinds like KeyboardInterrupt (every ``finally`` removes its temp
    files and folders), and click does not turn it into its own abort."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame) -> None:
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: errors become one line on stderr and an exit code (2 bad input, 1 failed check,
    130 / 143 interrupted by SIGINT / SIGTERM)."""
    _register_commands()
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        previous = {sig: signal.signal(sig, _interrupt) for sig in handled}
    try:
        code = app(args=list(argv) if argv is not None else None, standalone_mode=False)
        return code if isinstance(code, int) else 0  # click returns typer.Exit's code here
    except Interrupted as exc:
        sys.stderr.write("error: interrupted\n")
        return 128 + exc.signum
    except TmergeError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except click_exceptions.NoArgsIsHelpError as exc:
        sys.stdout.write(exc.ctx.get_help() + "\n" if exc.ctx else str(exc))
        return 0
    except typer.Abort:
        sys.stderr.write("aborted\n")
        return 130
    except click_exceptions.ClickException as exc:
        sys.stderr.write(f"error: {exc.format_message()}\n")
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# commands that time models: OpenMP reads its wait policy once, when torch loads, so these restart
# with passive waiting (idle worker threads sleep instead of spinning on cores the timed runs need)
TIMING_COMMANDS = ("profile", "sweep", "tune")


def entry() -> None:
    if sys.argv[1:2] and sys.argv[1] in TIMING_COMMANDS and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "tmerge", *sys.argv[1:]])
    sys.exit(main())
