"""`tmerge check`: the CI gate on synthetic reports (pass, regression, bad input, --update-baseline)."""

from __future__ import annotations

import copy
import json

from tmerge.cli import main
from tmerge.errors import TmergeError
from tmerge.profiling.gate import compare, parse_threshold
from tmerge.profiling.report import SCHEMA_VERSION, load_report, save_report, validate_report

import pytest

SETTINGS = {"threads": 2, "warmup": 5, "iters": 50, "compile": False}


def synthetic_report(**over) -> dict:
    stats = lambda p50: {"p50_ms": p50, "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.2, "mean_ms": p50, "std_ms": 0.1,
                         "min_ms": p50 * 0.9, "max_ms": p50 * 1.3, "throughput_ips": 8 / p50 * 1e3, "iters": 50,
                         "peak_mem_mb": 10.0}
    report = {
        "schema_version": SCHEMA_VERSION,
        "kind": "tmerge.profile",
        "model": "vit_small_patch16_224",
        "model_info": {"weights_sha256": "ab" * 32, "input_size": [3, 224, 224]},
        "method": "tome",
        "method_options": {},
        "prop_attn": True,
        "schedule": [16] * 12,
        "tokens_per_layer": [197 - 16 * i for i in range(12)] + [5],
        "flops": {"merged": 2.3e9, "unmerged": 4.6e9, "ratio": 0.5},
        "latency": [
            {"backend": "torch", "device": "cpu", "batch_size": 8, "merged": stats(60.0), "unmerged": stats(100.0),
             "ratio_p50": 0.6, "ratio_mean": 0.6, **SETTINGS},
            {"backend": "onnxruntime", "device": "cpu", "batch_size": 8, "merged": stats(50.0),
             "unmerged": stats(100.0), "ratio_p50": 0.5, "ratio_mean": 0.5, **SETTINGS},
        ],
        "drift": {"source": "samples", "n": 16, "seed": 0, "outputs": "logits", "agreement_top1": 0.9,
                  "kl_mean": 0.05, "cosine_mean": 0.98, "cosine_distance_mean": 0.02, "knn_agreement": 1.0,
                  "accuracy_top1_delta": None},
        "merge_form": "scatter_nd",
        "env": {"versions": {"torch": "2.13", "onnxruntime": "1.23"}, "threads": {"torch": 2}, "cpu": "test",
                "gpu": None},
    }
    report.update(over)
    return report


@pytest.fixture
def files(tmp_path):
    def write(name: str, data) -> str:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return str(path)
    return write


def test_schema_round_trip(tmp_path):
    report = synthetic_report()
    path = save_report(report, tmp_path / "r.json")
    assert load_report(path) == report
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_threshold_parsing():
    assert parse_threshold("10%").relative and parse_threshold("10%").value == pytest.approx(0.1)
    assert not parse_threshold("0.05").relative and parse_threshold(0.05).value == 0.05
    for bad in ("abc", "-5%", "inf"):
        with pytest.raises(TmergeError):
            parse_threshold(bad)


def test_check_pass(files, capsys):
    base = files("base.json", synthetic_report())
    new = synthetic_report()
    new["latency"][0]["ratio_p50"] = 0.64  # +6.7 %: within 10 %
    assert main(["check", files("new.json", new), "--baseline", base]) == 0
    assert "ok" in capsys.readouterr().out


def test_check_latency_and_drift_regression(files, capsys):
    base = files("base.json", synthetic_report())
    new = synthetic_report()
    new["latency"][1]["ratio_p50"] = 0.6  # +20 %
    new["drift"]["agreement_top1"] = 0.8  # disagreement 0.1 -> 0.2
    assert main(["check", files("new.json", new), "--baseline", base]) == 1
    captured = capsys.readouterr()
    assert "REGRESSION" in captured.out
    assert "latency ratio_p50 onnxruntime/cpu/b8: 0.5 -> 0.6 (+20.0%)" in captured.err
    assert "drift 1-agreement_top1" in captured.err
    assert "torch/cpu/b8" not in captured.err
    # a looser absolute threshold lets the same numbers pass
    assert main(["check", files("new.json", new), "--baseline", base, "--max-latency-regression", "0.2",
                 "--max-drift", "0.2"]) == 0


def test_check_flops_regression_json(files, capsys):
    base = files("base.json", synthetic_report())
    new = synthetic_report(flops={"merged": 2.4e9, "unmerged": 4.6e9, "ratio": 0.52})
    assert main(["check", files("new.json", new), "--baseline", base, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] is False
    assert [r["metric"] for r in out["rows"] if r["status"] == "REGRESSION"] == ["flops ratio"]


def test_improvement_passes():
    new = synthetic_report()
    new["latency"][0]["ratio_p50"] = 0.3
    result = compare(new, synthetic_report())
    assert result.passed and result.rows[0].status == "improved"


@pytest.mark.parametrize("change", [
    {"model": "deit_small_patch16_224"},
    {"schedule": [8] * 12},
    {"method": "pitome"},
    {"model_info": {"weights_sha256": "cd" * 32}},
])
def test_check_mismatched_baseline_is_usage_error(files, capsys, change):
    base = files("base.json", synthetic_report())
    assert main(["check", files("new.json", synthetic_report(**change)), "--baseline", base]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: report and baseline differ in") and err.count("\n") == 1


def test_check_bad_inputs(files, tmp_path, capsys):
    base = files("base.json", synthetic_report())
    good = files("good.json", synthetic_report())
    incomplete = synthetic_report()
    del incomplete["flops"]
    cases = [
        [files("corrupt.json", "{not json"), "--baseline", base],
        [files("incomplete.json", incomplete), "--baseline", base],
        [files("future.json", synthetic_report(schema_version=99)), "--baseline", base],
        [files("list.json", [1, 2]), "--baseline", base],
        [good, "--baseline", str(tmp_path / "absent.json")],
        [good, "--baseline", base, "--max-drift", "lots"],
        [files("nolat.json", synthetic_report(latency=[])), "--baseline", base],
    ]
    for args in cases:
        assert main(["check", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_update_baseline(files, tmp_path, capsys):
    new = files("new.json", synthetic_report(schedule=[8] * 12))
    target = tmp_path / "baseline.json"
    assert main(["check", new, "--baseline", str(target), "--update-baseline"]) == 0  # creates it
    assert load_report(target)["schedule"] == [8] * 12
    other = synthetic_report()
    assert main(["check", files("other.json", other), "--baseline", str(target), "--update-baseline"]) == 0
    assert load_report(target)["schedule"] == [16] * 12  # replaced although the schedule differs
    assert main(["check", files("bad.json", "{"), "--baseline", str(target), "--update-baseline"]) == 2
    assert load_report(target)["schedule"] == [16] * 12  # a bad report never replaces the baseline


def test_validate_rejects_non_finite():
    report = synthetic_report()
    report["latency"][0]["ratio_p50"] = float("nan")
    with pytest.raises(TmergeError, match="ratio_p50"):
        validate_report(report)


def _set_latency(report, **fields):
    for entry in report["latency"]:
        entry.update(fields)
    return report


@pytest.mark.parametrize("change, field", [
    (lambda r: _set_latency(r, threads=1), "threads"),
    (lambda r: _set_latency(r, warmup=0), "warmup"),
    (lambda r: _set_latency(r, iters=3), "iters"),
    (lambda r: _set_latency(r, compile=True), "compile"),
    (lambda r: r.update(merge_form="onehot"), "merge_form"),
    (lambda r: r["env"].update(cpu="another CPU"), "cpu model"),
    (lambda r: r["env"]["versions"].update(onnxruntime="1.99"), "onnxruntime version"),
    (lambda r: r["env"]["versions"].update(torch="9.0"), "torch version"),
])
def test_check_refuses_reports_measured_differently(files, capsys, change, field):
    base = files("base.json", synthetic_report())
    new = synthetic_report()
    change(new)
    new["latency"][0]["ratio_p50"] = 0.5  # would read as "improved" if compared
    assert main(["check", files("new.json", new), "--baseline", base]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and f"different {field}" in err, err


def test_check_warns_when_the_sample_is_too_small_for_the_limit(files, capsys):
    noisy = synthetic_report()
    for entry in noisy["latency"]:
        entry["iters"] = 3
        for side in ("merged", "unmerged"):
            entry[side].update(iters=3, std_ms=entry[side]["mean_ms"] * 0.2)
    base = files("base.json", noisy)
    assert main(["check", files("new.json", noisy), "--baseline", base]) == 0
    err = capsys.readouterr().err
    assert "warning: latency torch/cpu/b8" in err and "more --iters" in err
    quiet = synthetic_report()  # 50 runs, std 0.1 ms on 60-100 ms: far below 10 %
    base = files("base2.json", quiet)
    assert main(["check", files("new2.json", quiet), "--baseline", base]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["10", "5", "1"])
def test_check_rejects_ambiguous_limits(files, capsys, limit):
    base = files("base.json", synthetic_report())
    assert main(["check", base, "--baseline", base, "--max-latency-regression", limit]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ambiguous" in err and f"{limit}%" in err


def test_zero_drift_baseline_allows_one_image(files, capsys):
    def with_agreement(value):
        r = synthetic_report()
        r["drift"].update(agreement_top1=value, knn_agreement=1.0)
        return r
    base = files("base.json", with_agreement(1.0))
    assert main(["check", files("one.json", with_agreement(15 / 16)), "--baseline", base]) == 0
    capsys.readouterr()
    assert main(["check", files("two.json", with_agreement(14 / 16)), "--baseline", base]) == 1
    assert "drift 1-agreement_top1" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(kind="tmerge.sweep"), "kind"),
    (lambda r: r["latency"][0].update(ratio_p50=-0.5), "ratio_p50"),
    (lambda r: r["flops"].update(ratio=-1.0), "flops.ratio"),
    (lambda r: r["latency"].append(copy.deepcopy(r["latency"][0])), "repeats torch/cpu/batch 8"),
])
def test_check_rejects_malformed_reports(files, capsys, change, message):
    bad = synthetic_report()
    change(bad)
    base = files("base.json", synthetic_report())
    assert main(["check", files("bad.json", bad), "--baseline", base]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
