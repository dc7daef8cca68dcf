"""`tmerge methods`: the registered merging methods and their options."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ...merging import available
from ..app import app, print_json
from ..options import JsonOpt


@app.command("methods")
def methods_command(as_json: JsonOpt = False) -> None:
    """List the merging methods and their options."""
    rows = []
    for name, cls in sorted(available().items()):
        rows.append({
            "name": name,
            "summary": cls.summary,
            "prop_attn_default": cls.prop_attn_default,
            "options": {k: {"default": o.default, "help": o.help} for k, o in cls.options.items()},
        })
    if as_json:
        print_json(rows)
        return
    table = Table(title="merging methods")
    for col in ("method", "what it does", "prop. attn", "options (-o KEY=VALUE)"):
        table.add_column(col)
    for row in rows:
        opts = "\n".join(f"{k}={v['default']}: {v['help']}" for k, v in row["options"].items()) or "-"
        table.add_row(row["name"], row["summary"], "on" if row["prop_attn_default"] else "off", opts)
    Console().print(table)
