"""The CI gate: compare a profile report with a baseline report.

Only quantities that are stable across machines are compared: latency *ratios* (merged/unmerged,
timed interleaved in the same run), the FLOPs ratio, and drift metrics. A threshold is a percent
string ("10%": relative to the baseline value) or a plain number ("0.02": absolute). Every metric
is oriented so that larger is worse:

- latency: ``ratio_p50`` per (backend, device, batch size) present in the baseline, judged by the
  report's confidence interval (``ratio_p50_ci``) when it has one: a regression only when the whole
  interval is above the limit, an improvement only when it is all below; an interval that straddles
  the limit passes as "uncertain" with a warning;
- FLOPs: ``flops.ratio``;
- drift: ``kl_mean``, ``cosine_distance_mean``, ``1 - agreement_top1``, ``1 - knn_agreement`` and
  ``-accuracy_top1_delta`` (accuracy lost), whichever both reports have.

A regression is ``report > baseline + allowed`` with ``allowed = pct * |baseline|`` (relative) or
the number itself (absolute), plus a tiny floor (1e-9) so identical values never fail; for drift
metrics that count images (top-1, k-NN, accuracy) the allowance is at least one image in n. A bare
number of 1 or more is refused as ambiguous ("10" meant as 10 % would switch the gate off).
Reports whose latencies were measured under other settings (threads, warm-up, iterations,
torch.compile, merge form, CPU/GPU model, runtime version) are refused too, and a comparison whose
timing noise (from the recorded std and iterations) is as large as the allowed change is warned about.
Reports for a different model, weights, method, schedule or drift data cannot be compared: that is
bad input (exit 2), not a regression.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import TmergeError

FLOOR = 1e-9
DEFAULTS = {"latency": "10%", "flops": "1%", "drift": "10%"}


@dataclass(frozen=True)
class Threshold:
    value: float
    relative: bool

    def allowed(self, baseline: float) -> float:
        return (self.value * abs(baseline) if self.relative else self.value) + FLOOR

    def __str__(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"


def parse_threshold(text: str | float | Threshold, what: str = "threshold") -> Threshold:
    """"10%" -> relative 0.10; "0.05" or 0.05 -> absolute 0.05. Negative or non-numbers: TmergeError."""
    if isinstance(text, Threshold):
        return text
    raw = str(text).strip()
    relative = raw.endswith("%")
    try:
        value = float(raw[:-1] if relative else raw)
    except ValueError:
        raise TmergeError(f"{what} must be a percentage like 10% or a number like 0.05, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise TmergeError(f"{what} must be a finite non-negative number, got {text!r}")
    if not relative and value >= 1:
        # ratios and drift metrics live below 1: "10" almost surely means 10 %, and as an absolute
        # limit it would switch the gate off
        raise TmergeError(f"{what} {raw} is ambiguous: write {raw}% for a relative limit, or an absolute "
                          "change below 1 (e.g. 0.05)")
    return Threshold(value / 100 if relative else value, relative)


@dataclass
class Row:
    metric: str
    baseline: float | None
    report: float | None
    limit: float | None
    threshold: str
    status: str  # "ok", "improved", "REGRESSION", "uncertain", "new", "skipped"
    interval: list[float] | None = None  # the report's confidence interval (latency ratios)

    @property
    def change(self) -> float | None:
        if self.baseline is None or self.report is None or self.baseline == 0:
            return None
        return (self.report - self.baseline) / abs(self.baseline)


@dataclass
class GateResult:
    rows: list[Row]
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not any(r.status == "REGRESSION" for r in self.rows)

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.status == "REGRESSION"]

    def as_dict(self) -> dict:
        return {"passed": self.passed, "warnings": list(self.warnings),
                "rows": [{**asdict(r), "change": r.change} for r in self.rows]}


def _identity(report: dict) -> dict[str, Any]:
    info = report.get("model_info") or {}
    return {
        "model": report["model"],
        "weights_sha256": info.get("weights_sha256"),
        "input_size": info.get("input_size"),
        "method": report["method"],
        "method_options": report.get("method_options"),
        "prop_attn": report.get("prop_attn"),
        "schedule": report["schedule"],
    }


def check_comparable(report: dict, baseline: dict) -> None:
    """TmergeError (exit 2) when the two reports do not measure the same thing."""
    a, b = _identity(report), _identity(baseline)
    for key in a:
        if a[key] is None or b[key] is None:  # older or partial reports: compare what both have
            continue
        if a[key] != b[key]:
            raise TmergeError(f"report and baseline differ in {key} ({_short(a[key])} vs baseline "
                              f"{_short(b[key])}); profile the same configuration or use --update-baseline")
    da, db = report.get("drift"), baseline.get("drift")
    if da and db:
        for key in ("source", "n", "seed", "outputs"):
            if da.get(key) is not None and db.get(key) is not None and da.get(key) != db.get(key):
                raise TmergeError(f"report and baseline measured drift differently ({key}: {da.get(key)!r} "
                                  f"vs baseline {db.get(key)!r})")
    if db and not da:
        raise TmergeError("the baseline has drift measurements but the report has none (was it run with --no-drift?)")
    check_same_settings(report, baseline)


# fields of each latency entry that change what a ratio means; a report that differs in one of them
# measured something else
LATENCY_SETTINGS = ("threads", "warmup", "iters", "compile")
# the runtime whose version each backend's timings depend on (env.versions key)
BACKEND_RUNTIME = {"torch": "torch", "torch.compile": "torch", "onnxruntime": "onnxruntime",
                   "openvino": "openvino", "tensorrt": "tensorrt"}


def check_same_settings(report: dict, baseline: dict) -> None:
    """TmergeError (exit 2) naming the first setting the two reports' latencies were measured under
    differently: threads, warm-up, iterations, torch.compile, merge form, precision, CUDA graphs, CPU/GPU
    model, runtime version."""
    new = {_latency_key(e): e for e in report["latency"]}
    shared = [key for key in (_latency_key(e) for e in baseline["latency"]) if key in new]
    if not shared:
        return

    def refuse(field: str, a: Any, b: Any, where: str = "") -> None:
        raise TmergeError(f"report and baseline were measured with different {field}{where} ({_short(a)} vs "
                          f"baseline {_short(b)}); profile with the baseline's settings or use --update-baseline")

    for setting, default in (("merge_form", None), ("precision", "fp32"), ("cuda_graphs", False)):
        a, b = ((r.get("config") or {}).get(setting, default) if setting != "merge_form" else r.get(setting)
                for r in (report, baseline))
        if a != b:
            refuse(setting, a, b)
    env_new, env_base = report.get("env") or {}, baseline.get("env") or {}
    devices = {key[1] for key in shared}
    machine = [("cpu", env_new.get("cpu"), env_base.get("cpu"))]
    if "cuda" in devices:
        machine.append(("gpu", (env_new.get("gpu") or {}).get("name"), (env_base.get("gpu") or {}).get("name")))
    for part, a, b in machine:
        if a != b:
            refuse(f"{part} model", a, b)
    base_entries = {_latency_key(e): e for e in baseline["latency"]}
    for key in shared:
        where = f" for {key[0]}/{key[1]}/b{key[2]}"
        for setting in LATENCY_SETTINGS:
            a, b = new[key].get(setting), base_entries[key].get(setting)
            if setting == "warmup":  # older reports keep it in config only
                a = a if a is not None else (report.get("config") or {}).get("warmup")
                b = b if b is not None else (baseline.get("config") or {}).get("warmup")
            if setting == "iters":
                a = a if a is not None else new[key]["merged"].get("iters")
                b = b if b is not None else base_entries[key]["merged"].get("iters")
            if a != b:
                refuse(setting, a, b, where)
        runtime = BACKEND_RUNTIME.get(key[0], key[0])
        a = (env_new.get("versions") or {}).get(runtime)
        b = (env_base.get("versions") or {}).get(runtime)
        if a != b:
            refuse(f"{runtime} version", a, b, where)


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:16] + "…"


def _row(metric: str, base: float | None, new: float | None, threshold: Threshold, resolution: float = 0.0) -> Row:
    """``resolution``: the smallest change the metric can show (one image of a top-1 count); the
    limit is never finer than that, so a baseline of zero still allows what one image moves."""
    if base is None and new is None:
        return Row(metric, None, None, None, str(threshold), "skipped")
    if base is None:
        return Row(metric, None, new, None, str(threshold), "new")
    if new is None:
        raise TmergeError(f"the report has no {metric}, which the baseline has")
    allowed = max(threshold.allowed(base), resolution + FLOOR)
    limit = base + allowed
    if new > limit:
        status = "REGRESSION"
    elif new < base - allowed:
        status = "improved"
    else:
        status = "ok"
    return Row(metric, base, new, limit, str(threshold), status)


def _latency_row(metric: str, base: dict, new: dict, threshold: Threshold) -> Row:
    """A latency ratio row; with an interval in the report, the status follows the interval."""
    row = _row(metric, float(base["ratio_p50"]), float(new["ratio_p50"]), threshold)
    interval = new.get("ratio_p50_ci")
    if interval is None:
        return row
    row.interval = [float(v) for v in interval]
    low, high = row.interval
    allowed = row.limit - row.baseline
    if low > row.limit:
        row.status = "REGRESSION"
    elif high < row.baseline - allowed:
        row.status = "improved"
    elif high > row.limit:
        row.status = "uncertain"
    else:
        row.status = "ok"
    return row


def _latency_key(entry: dict) -> tuple:
    return (entry["backend"], entry["device"], int(entry["batch_size"]))


# drift metrics that count images (their resolution is one image in n)
COUNTED_DRIFT = ("drift 1-agreement_top1", "drift 1-knn_agreement", "drift accuracy lost")


def ratio_uncertainty(entry: dict) -> float | None:
    """Relative standard error of an entry's merged/unmerged ratio, from the recorded spread (std /
    mean of each model) and the number of timed runs; None when the report lacks them."""
    try:
        n = int(entry.get("iters") or entry["merged"]["iters"])
        cvs = [float(entry[side]["std_ms"]) / float(entry[side]["mean_ms"]) for side in ("merged", "unmerged")]
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if n < 2:
        return math.inf
    return math.sqrt(sum(cv * cv for cv in cvs) / n)


def sample_warnings(report: dict, baseline: dict, threshold: Threshold) -> list[str]:
    """Latency comparisons whose noise (about two standard errors of the difference of the two
    ratios) is as large as the allowed change: with so few runs a pass or a fail is mostly chance."""
    warnings = []
    base_entries = {_latency_key(e): e for e in baseline["latency"]}
    for entry in report["latency"]:
        key = _latency_key(entry)
        if key not in base_entries:
            continue
        se_new, se_base = ratio_uncertainty(entry), ratio_uncertainty(base_entries[key])
        if se_new is None or se_base is None:
            continue
        base_ratio = float(base_entries[key]["ratio_p50"])
        noise = 2 * math.sqrt(se_new ** 2 + se_base ** 2)  # relative
        allowed = threshold.allowed(base_ratio) / abs(base_ratio) if base_ratio else math.inf
        if noise >= allowed:
            iters = f"{entry.get('iters')} and {base_entries[key].get('iters')} timed runs"
            known = ("the spread is unknown" if math.isinf(noise) else
                     f"the recorded spread puts the ratio within about ±{noise * 100:.1f}%")
            warnings.append(f"latency {key[0]}/{key[1]}/b{key[2]}: with {iters} {known}, not finer than the "
                            f"allowed {allowed * 100:.1f}%; profile with more --iters (and --warmup)")
    return warnings


def _drift_badness(drift: dict | None) -> dict[str, float | None]:
    if not drift:
        return {}

    def get(key):
        v = drift.get(key)
        return None if v is None else float(v)

    out = {"drift kl_mean": get("kl_mean"), "drift cosine_distance_mean": get("cosine_distance_mean")}
    agreement, knn, acc = get("agreement_top1"), get("knn_agreement"), get("accuracy_top1_delta")
    out["drift 1-agreement_top1"] = None if agreement is None else 1 - agreement
    out["drift 1-knn_agreement"] = None if knn is None else 1 - knn
    out["drift accuracy lost"] = None if acc is None else -acc
    return out


def compare(report: dict, baseline: dict, *, latency: str | float = DEFAULTS["latency"],
            flops: str | float = DEFAULTS["flops"], drift: str | float = DEFAULTS["drift"]) -> GateResult:
    """Compare ``report`` with ``baseline`` (both validated report dicts)."""
    t_lat = parse_threshold(latency, "--max-latency-regression")
    t_flops = parse_threshold(flops, "--max-flops-regression")
    t_drift = parse_threshold(drift, "--max-drift")
    check_comparable(report, baseline)
    rows: list[Row] = []
    new_entries = {_latency_key(e): e for e in report["latency"]}
    base_entries = {_latency_key(e): e for e in baseline["latency"]}
    for key, base in base_entries.items():
        name = f"latency ratio_p50 {key[0]}/{key[1]}/b{key[2]}"
        if key not in new_entries:
            raise TmergeError(f"the report has no latency for {key[0]}/{key[1]} batch {key[2]}, which the baseline has")
        rows.append(_latency_row(name, base, new_entries[key], t_lat))
    for key, entry in new_entries.items():
        if key not in base_entries:
            rows.append(_row(f"latency ratio_p50 {key[0]}/{key[1]}/b{key[2]}", None, float(entry["ratio_p50"]), t_lat))
    rows.append(_row("flops ratio", float(baseline["flops"]["ratio"]), float(report["flops"]["ratio"]), t_flops))
    base_drift, new_drift = _drift_badness(baseline.get("drift")), _drift_badness(report.get("drift"))
    n_images = int((baseline.get("drift") or {}).get("n") or 0)
    for metric in base_drift or new_drift:
        resolution = 1 / n_images if metric in COUNTED_DRIFT and n_images else 0.0
        row = _row(metric, base_drift.get(metric), new_drift.get(metric), t_drift, resolution)
        if row.status != "skipped":
            rows.append(row)
    warnings = [f"{row.metric}: interval {row.interval[0]:.4g}–{row.interval[1]:.4g} straddles the limit "
                f"{row.limit:.4g}; too noisy to call (rerun on a quieter machine or with more --iters)"
                for row in rows if row.status == "uncertain"]
    return GateResult(rows, warnings + sample_warnings(report, baseline, t_lat))
