"""The ``tmerge`` command line: a typer app (``app.py``), shared options (``options.py``), one module
per command (``commands/``)."""

from .app import app, entry, main

__all__ = ["app", "entry", "main"]
