"""The ``tmerge`` command line. Thin: parse, call the library, render with rich or print JSON.

Each command lives in its own module under ``tmerge/cli/commands`` and registers itself on ``app``.
"""

from __future__ import annotations

import sys
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: errors become one line on stderr and an exit code (2 bad input, 1 failed check)."""
    _register_commands()
    try:
        code = app(args=list(argv) if argv is not None else None, standalone_mode=False)
        return code if isinstance(code, int) else 0  # click returns typer.Exit's code here
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


def entry() -> None:
    sys.exit(main())
