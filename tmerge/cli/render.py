"""How the commands show results: rich tables on stdout (wide when not a terminal) and progress on
stderr. The library returns plain values (report dicts, results); only the CLI renders them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..export import ExportResult
from ..profiling.gate import GateResult
from ..profiling.profile import ProgressReporter


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _interval(interval: list[float] | None) -> str:
    return "n/a" if interval is None else f"{interval[0]:.2f}–{interval[1]:.2f}"


def human_flops(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def wide_console(stderr: bool = False):
    """A rich console; when output is not a terminal (CI logs, pipes), 140 columns instead of 80."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=140)
    return console


def render_report(report: dict, console=None) -> None:
    """A profile report as rich tables (summary, latency, drift)."""
    console = console or wide_console()
    flops = report["flops"]
    summary = Table(title=f"{report['model']} · {report['method']} · {report.get('schedule_spec') or report['schedule']}",
                    show_header=False)
    summary.add_column("", style="bold")
    summary.add_column("")
    summary.add_row("schedule (r per block)", ",".join(map(str, report["schedule"])))
    summary.add_row("tokens per block", " → ".join(map(str, report["tokens_per_layer"])))
    summary.add_row("prop. attention", _fmt(report.get("prop_attn")))
    summary.add_row("FLOPs / image", f"{human_flops(flops['merged'])} merged · {human_flops(flops['unmerged'])} "
                    f"unmerged · ratio {flops['ratio']:.3f}")
    params = report.get("params") or {}
    if params:
        summary.add_row("parameters", f"{params.get('merged'):,} merged · {params.get('unmerged'):,} unmerged")
    env = report["env"]
    summary.add_row("env", f"{env.get('cpu')} · {env.get('cpu_count')} cpus · torch {env['versions'].get('torch')} · "
                    f"ort {env['versions'].get('onnxruntime')} · threads "
                    + ", ".join(f"{k}={v}" for k, v in (env.get("threads") or {}).items() if v is not None))
    console.print(summary)

    if report["latency"]:
        lat = Table(title="latency (merged vs unmerged, interleaved)")
        for col in ("backend", "device", "batch", "threads", "model", "p50 ms", "p90 ms", "mean±std ms",
                    "img/s", "peak MiB", "ratio p50", "95% CI", "ratio mean"):
            lat.add_column(col, justify="right")
        for e in report["latency"]:
            for side in ("unmerged", "merged"):
                s = e[side]
                first = side == "unmerged"
                lat.add_row(
                    e["backend"] if first else "", e["device"] if first else "",
                    str(e["batch_size"]) if first else "", _fmt(e.get("threads")) if first else "", side,
                    _fmt(s["p50_ms"], ".2f"), _fmt(s.get("p90_ms"), ".2f"),
                    f"{s['mean_ms']:.2f}±" + ("n/a" if s.get("std_ms") is None else f"{s['std_ms']:.2f}"), _fmt(s.get("throughput_ips"), ".1f"),
                    "n/a" if s.get("peak_mem_mb") is None else _fmt(s["peak_mem_mb"], ".0f"),
                    _fmt(e["ratio_p50"]) if side == "merged" else "",
                    _interval(e.get("ratio_p50_ci")) if side == "merged" else "",
                    _fmt(e.get("ratio_mean")) if side == "merged" else "",
                )
        console.print(lat)

    drift = report["drift"]
    if drift:
        table = Table(title=f"drift vs unmerged ({drift.get('outputs')}, {drift.get('n')} images from {drift.get('source')})")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in ("agreement_top1", "kl_mean", "cosine_mean", "cosine_min", "cosine_distance_mean",
                    "max_abs_diff", "knn_agreement", "accuracy_top1_reference", "accuracy_top1_merged",
                    "accuracy_top1_delta"):
            if drift.get(key) is not None:
                table.add_row(key, _fmt(drift[key], ".5g"))
        console.print(table)


def render_gate(result: GateResult, console=None) -> None:
    """The CI gate's comparison as a rich table."""
    console = console or wide_console()
    table = Table(title="tmerge check: report vs baseline (larger is worse)")
    for col in ("metric", "baseline", "report", "change", "limit", "allowed", "status"):
        table.add_column(col, justify="left" if col in ("metric", "status") else "right")
    styles = {"REGRESSION": "bold red", "improved": "green", "ok": "", "new": "yellow", "uncertain": "yellow"}
    for r in result.rows:
        fmt = (lambda v: "–" if v is None else f"{v:.5g}")
        change = "–" if r.change is None else f"{r.change * 100:+.1f}%"
        table.add_row(r.metric, fmt(r.baseline), fmt(r.report), change, fmt(r.limit), r.threshold,
                      f"[{styles.get(r.status, '')}]{r.status}[/]" if styles.get(r.status) else r.status)
    console.print(table)


def render_sweep(summary: dict, console=None) -> None:
    """A sweep summary as a rich table, and where its Pareto plot is."""
    console = console or wide_console()
    table = Table(title=f"sweep: {summary['model']} (drift = {summary['drift_metric']})")
    for col in ("method", "point", "final tokens", "FLOPs ratio", "latency ratio p50", "drift", "top-1 agree",
                "cosine"):
        table.add_column(col, justify="left" if col in ("method", "point") else "right")

    def f(v, spec=".3f"):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    for r in summary["points"]:
        table.add_row(r["method"], r["point"], str(r["final_tokens"]), f(r["flops_ratio"]),
                      f(r["latency_ratio_p50"]), f(r["drift"], ".4g"), f(r["agreement_top1"]), f(r["cosine_mean"], ".5f"))
    console.print(table)
    console.print(f"Pareto plot: {summary['png']}")


def render_export(result: ExportResult) -> None:
    """What an export wrote and how well it matched PyTorch."""
    m = result.manifest
    parity = m.get("onnx_parity", m["parity"]) if m["format"] != "onnx" else m["parity"]
    table = Table(title=f"tmerge export · {m['model']}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("file", str(result.path))
    table.add_row("manifest", str(result.manifest_path))
    table.add_row("format", f"{m['format']} · graph {m['graph']} · opset {m['opset']} · "
                            f"batch {'dynamic' if m['dynamic_batch'] else m['export_batch']}")
    table.add_row("method", f"{m['method']} {m.get('options') or ''} · schedule {m.get('schedule') or '-'} · "
                            f"prop. attn {'on' if m.get('prop_attn') else 'off'}")
    if m.get("tokens"):
        table.add_row("tokens", " → ".join(str(t) for t in m["tokens"]))
    if m.get("capped"):
        table.add_row("capped", ", ".join(f"block {c['layer']}: {c['asked']}→{c['applied']}" for c in m["capped"]))
    f = m["flops"]
    table.add_row("GFLOPs/img", f"{f['merged_per_image'] / 1e9:.3f} merged vs {f['unmerged_per_image'] / 1e9:.3f} "
                                f"unmerged (ratio {f['ratio']:.3f})")
    if parity.get("verified"):
        ties = len(parity.get("near_ties", []))
        runtimes = ", ".join(f"{r['runtime']}/{r['device']}" for r in parity["runtimes"])
        threads = sorted({str(r["threads"]) for r in parity["repeats"]})
        identical = all(r["bit_identical"] for r in parity["repeats"])
        table.add_row("ONNX parity", f"max abs diff {parity['max_abs_diff']:.2e} ≤ {parity['atol']:g} "
                                     f"({runtimes}; batches {parity['batches']}; near-ties {ties})")
        table.add_row("determinism", f"{parity['runs_per_session']} runs per session, threads {'/'.join(threads)}: "
                                     f"{'bit-identical' if identical else 'NOT bit-identical'}")
    else:
        table.add_row("ONNX parity", "not verified")
    if m["format"] == "openvino":
        ir = m["parity"]
        table.add_row("IR parity", f"OpenVINO {m['openvino']['precision_hint']}: max abs diff {ir['max_abs_diff']:.2e}, "
                                   f"{ir['runs_per_session']} runs per session, bit-identical")
    if m["format"] == "trt":
        checks = m["parity"]["checks"]
        table.add_row("TensorRT parity", "; ".join(
            f"batch {c['batch']}: diff {c['max_abs_diff']:.2e}, cos {c['cosine_min']:.5f}" for c in checks))
    if m.get("plugin_nodes"):
        ops = sorted({n["op_type"] for n in m["plugin_nodes"]})
        table.add_row("plugin nodes", f"{len(m['plugin_nodes'])} × tmerge::{'/'.join(ops)} "
                                      f"(plugin_namespace=tmerge, plugin_version=1)")
    table.add_row("export time", f"{parity.get('export_seconds', '?')} s")
    Console().print(table)


class RichProgress(ProgressReporter):
    """Progress on stderr with rich: a bar per timed (backend, batch) step, a line per phase."""

    def __init__(self, enabled: bool = True):
        self.console = Console(stderr=True)
        self.enabled = enabled
        self._progress = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False

    def step(self, description: str, total: int | None = None):
        if not self.enabled:
            return lambda done: None
        if self._progress is None:  # started on first use: an early error prints nothing but itself
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=self.console, transient=False)
            self._progress.__enter__()
        task = self._progress.add_task(description, total=total)
        return lambda done: self._progress.update(task, completed=done)

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[dim]· {message}[/dim]")


def calibration_drift(candidate: dict) -> float | None:
    """A tune candidate's drift on the calibration split (else on the screen subset)."""
    d = candidate.get("drift") or {}
    return d.get("calibration", d.get("screen"))


def render_tune(result: dict, console=None) -> None:
    console = console or wide_console()
    budget = result["budget"]
    goal = (f"max drift {budget['max_drift']:g} ({budget['drift_metric']})" if result["mode"] == "max_drift"
            else f"latency ≤ {budget['latency_ms']:g} ms p50")
    cfg = result["config"]
    table = Table(title=f"tmerge tune · {result['model']} · {cfg['runtime']} batch {cfg['batch']} · {goal}")
    for col in ("", "method", "schedule", "prop. attn", "final tokens", "FLOPs ratio", "latency ratio p50", "p50 ms",
                "drift (calib.)", "drift (held-out)", "stage"):
        table.add_column(col, justify="left" if col in ("", "method", "schedule", "prop. attn", "stage") else "right")
    front = set(result["pareto_latency"]) | set(result["pareto_flops"])
    chosen = (result.get("chosen") or {}).get("label")
    ref = (result.get("reference") or {}).get("label")
    rows = [c for c in result["candidates"] if c["label"] in front or c["timed_rounds"] or c["label"] in (chosen, ref)]
    rows.sort(key=lambda c: (c["latency_ratio_p50"] is None, c["latency_ratio_p50"] or c["flops_ratio"]))
    for c in rows:
        mark = "★" if c["label"] == chosen else ("ref" if c["label"] == ref else ("·" if c["label"] in front else ""))
        method = c["method"] + (f" ({Path(c['adapter']).name})" if c.get("adapter") else "")
        schedule = c["label"].split(" ")[1].replace("schedule=", "")
        table.add_row(mark, method, schedule, "on" if c["prop_attn"] else "off", _fmt(c["final_tokens"]), _fmt(c["flops_ratio"]),
                      _fmt(c["latency_ratio_p50"]), _fmt(c["p50_ms"], ".1f"), _fmt(calibration_drift(c), ".4g"),
                      _fmt(c["drift"].get("held_out"), ".4g"), c["stage"])
    console.print(table)
    console.print(f"★ chosen · ref = constant-r ToMe at the budget · '·' = on a Pareto front "
                  f"({len(result['candidates'])} of {result['search_space_size']} candidates measured, "
                  f"{result['elapsed_s']} s; unmerged p50 {_fmt(result.get('unmerged_ms'), '.1f')} ms)")
    if result["met"]:
        c, r = result["chosen"], result.get("reference")
        if r and r.get("latency_ratio_p50") and c.get("latency_ratio_p50"):
            console.print(f"chosen vs constant-r ToMe ({r['label']}): latency ratio {c['latency_ratio_p50']:.3f} vs "
                          f"{r['latency_ratio_p50']:.3f} (same rounds); drift calibration {_fmt(calibration_drift(c), '.4g')} vs "
                          f"{_fmt(calibration_drift(r), '.4g')}, held-out {_fmt(c['drift'].get('held_out'), '.4g')} vs "
                          f"{_fmt(r['drift'].get('held_out'), '.4g')}")
        console.print(f"export: {result['export_command']}")
        if result.get("export"):
            console.print(f"exported: {result['export']['path']} (manifest {result['export']['manifest']})")
    if "png" in result:  # a search that missed its budget writes no files
        console.print(f"Pareto plot: {result['png']} · JSON: {result['json']}")
