"""`tmerge check REPORT --baseline BASELINE`: the CI gate (exit 0 pass, 1 regression, 2 bad input)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..._io import writable_file
from ...errors import TmergeError, VerificationError
from ...profiling.gate import compare, parse_threshold
from ...profiling.report import load_report, save_report
from ..app import app, print_json
from ..options import JsonOpt
from ..render import render_gate


@app.command("check")
def check_command(
    report: Annotated[Path, typer.Argument(help="profile report JSON (tmerge profile --out / --json)")],
    baseline: Annotated[Path, typer.Option("--baseline", "-b", help="baseline report JSON")],
    max_latency_regression: Annotated[str, typer.Option(
        "--max-latency-regression", help="allowed growth of each latency ratio_p50: 10% (relative) or 0.05 (absolute, below 1)")] = "10%",
    max_flops_regression: Annotated[str, typer.Option(
        "--max-flops-regression", help="allowed growth of the FLOPs ratio")] = "1%",
    max_drift: Annotated[str, typer.Option(
        "--max-drift", help="allowed growth of each drift metric (KL, cosine distance, disagreement, accuracy lost)")] = "10%",
    update_baseline: Annotated[bool, typer.Option(
        "--update-baseline", help="write REPORT as the new baseline (atomically) and exit 0")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Gate a profile report against a baseline: compares merged/unmerged ratios, not absolute times."""
    if update_baseline:
        writable_file(baseline, "--baseline", (".json",))
    thresholds = dict(latency=parse_threshold(max_latency_regression, "--max-latency-regression"),
                      flops=parse_threshold(max_flops_regression, "--max-flops-regression"),
                      drift=parse_threshold(max_drift, "--max-drift"))
    new = load_report(report)
    if update_baseline:
        note = "created"
        if baseline.exists():
            note = "updated"
            try:
                result = compare(new, load_report(baseline, "--baseline"), **thresholds)
                if not as_json:
                    render_gate(result)
            except TmergeError as e:  # an unreadable or incomparable old baseline is simply replaced
                sys.stderr.write(f"note: previous baseline not compared ({e})\n")
        save_report(new, baseline)
        if as_json:
            print_json({"passed": True, "baseline": str(baseline), "baseline_action": note})
        else:
            sys.stderr.write(f"baseline {note}: {baseline}\n")
        return
    old = load_report(baseline, "--baseline")
    result = compare(new, old, **thresholds)
    for warning in result.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    if as_json:
        print_json(result.as_dict())
    else:
        render_gate(result)
    if not result.passed:
        for row in result.regressions:
            change = "" if row.change is None else f" ({row.change * 100:+.1f}%)"
            sys.stderr.write(f"regression: {row.metric}: {row.baseline:.5g} -> {row.report:.5g}{change}, "
                             f"limit {row.limit:.5g} (allowed {row.threshold})\n")
        raise VerificationError(f"check failed: {len(result.regressions)} regression(s) against {baseline}")
    if not as_json:
        sys.stderr.write("check passed\n")
