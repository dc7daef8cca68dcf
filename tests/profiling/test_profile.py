"""`tmerge profile`: statistics, interleaving, report schema, a real run on a tiny model
(torch and onnxruntime), and one-line errors for bad inputs."""

from __future__ import annotations

import json

from tests.helpers import tiny_vit
from tmerge import MergeConfig, apply, runtime
from tmerge.cli import main
from tmerge.errors import TmergeError
from tmerge.profiling import latency as lat
from tmerge.profiling.profile import ProfileConfig, drift_between, profile_pair
from tmerge.profiling.report import load_report, save_report, validate_report

import pytest
import torch

TINY_KWARGS = "img_size=32,patch_size=8,depth=3,embed_dim=48,num_heads=3,num_classes=10"
TINY_CLI = ["--model", "vit_tiny_patch16_224", "--model-kwargs", TINY_KWARGS]


def test_summarize_percentiles():
    s = lat.summarize([0.001 * i for i in range(1, 101)], batch_size=4)  # 1..100 ms
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p90_ms"] == pytest.approx(90.1)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["min_ms"] == pytest.approx(1) and s["max_ms"] == pytest.approx(100)
    assert s["throughput_ips"] == pytest.approx(4 / 0.0505)
    assert s["iters"] == 100


def test_interleaving_alternates_and_flips():
    calls = []
    times = lat.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                 warmup=1, iters=4)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(t) for t in times.values()] == [4, 4]


def test_backend_checks():
    with pytest.raises(TmergeError, match="unknown backend"):
        runtime.check_backend("tvm", "cpu")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(TmergeError, match=r"tensorrt is not installed: pip install 'tmerge\[trt\]'"):
            runtime.check_backend("tensorrt", "cuda")


def _pair(method="tome", r=4):
    unmerged = tiny_vit()
    merged = apply(tiny_vit(), MergeConfig.of(method, r=r))
    return merged, unmerged


def test_profile_pair_torch_report_round_trip(tmp_path):
    merged, unmerged = _pair()
    config = ProfileConfig(backends=["torch"], batch_sizes=[1, 3], warmup=1, iters=5, threads=1, num_images=6)
    report = profile_pair(merged, unmerged, config, model_name="tiny")
    validate_report(report)
    assert report["schedule"] == [4, 4, 4] and report["tokens_per_layer"] == [17, 13, 9, 5]
    assert 0 < report["flops"]["ratio"] < 1
    assert report["flops"]["merged"] < report["flops"]["unmerged"]
    assert [e["tokens_in"] for e in report["flops"]["per_layer"]] == [17, 13, 9]
    assert [e["batch_size"] for e in report["latency"]] == [1, 3]
    for entry in report["latency"]:
        assert entry["merged"]["iters"] == 5
        assert entry["ratio_p50"] == pytest.approx(entry["merged"]["p50_ms"] / entry["unmerged"]["p50_ms"])
    d = report["drift"]
    assert d["outputs"] == "logits" and d["n"] == 6 and 0 <= d["agreement_top1"] <= 1 and d["kl_mean"] >= 0
    assert report["env"]["threads"]["torch"] == 1
    path = save_report(report, tmp_path / "report.json")
    assert load_report(path) == json.loads(json.dumps(report))


def test_drift_headless_uses_features():
    unmerged = tiny_vit(num_classes=0)
    merged = apply(tiny_vit(num_classes=0), MergeConfig.of("tome", r=4))
    images = torch.randn(5, 3, 32, 32)
    d = drift_between(merged, unmerged, images, labels=torch.zeros(5, dtype=torch.long), class_names=["a"])
    assert d["outputs"] == "features" and d["agreement_top1"] is None and d["kl_mean"] is None
    assert d["accuracy_top1_delta"] is None and 0 <= d["knn_agreement"] <= 1
    same = drift_between(unmerged, unmerged, images)
    assert same["cosine_mean"] == pytest.approx(1.0, abs=1e-6) and same["knn_agreement"] == 1.0


def test_drift_accuracy_when_labels_match_head():
    merged, unmerged = _pair()
    images = torch.randn(6, 3, 32, 32)
    labels = torch.arange(6) % 10
    d = drift_between(merged, unmerged, images, labels, [str(i) for i in range(10)])
    assert d["labels"] == "used"
    assert d["accuracy_top1_delta"] == pytest.approx(d["accuracy_top1_merged"] - d["accuracy_top1_reference"])


def test_cli_profile_torch_and_onnxruntime(tmp_path, capsys):
    """A real run: tiny model, both backends (the ORT one exports and verifies both graphs)."""
    pytest.importorskip("onnxruntime")
    out = tmp_path / "report.json"
    rc = main(["profile", *TINY_CLI, "--method", "tome", "--r", "4", "--backends", "torch,onnxruntime",
               "--batch-sizes", "2", "--warmup", "1", "--iters", "4", "--threads", "1", "--num-images", "4",
               "--json", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    assert load_report(out)["schedule"] == report["schedule"] == [4, 4, 4]
    assert [(e["backend"], e["batch_size"]) for e in report["latency"]] == [("torch", 2), ("onnxruntime", 2)]
    ort = report["latency"][1]
    assert ort["threads"] == 1 and ort["artifacts"]["merged"]["exported"]
    assert ort["artifacts"]["merged"]["parity"]["verified"] is True
    assert report["env"]["threads"]["onnxruntime"] == 1
    assert report["drift"]["source"] == "samples"


def test_cli_profile_table(capsys):
    rc = main(["profile", *TINY_CLI, "--r", "2", "--iters", "2", "--warmup", "0", "--threads", "1",
               "--num-images", "2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "ratio p50" in captured.out and "agreement_top1" in captured.out


@pytest.mark.parametrize("args, message", [
    (["--backends", "tvm"], "unknown backend"),
    (["--backends", "tensorrt", "--device", "cuda"], None),
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--model-kwargs", "img_size"], "--model-kwargs"),
    (["--onnx", "/nonexistent.onnx", "--backends", "onnxruntime"], "does not exist"),
])
def test_cli_profile_bad_inputs(args, message, capsys):
    if args[:2] == ["--backends", "tensorrt"]:
        try:
            import tensorrt  # noqa: F401
            pytest.skip("TensorRT is installed")
        except ImportError:
            message = "tensorrt is not installed"
    schedule = [] if "--onnx" in args else ["--r", "2"]  # with --onnx the schedule is the manifest's
    rc = main(["profile", *TINY_CLI, *schedule, "--iters", "1", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_cli_profile_empty_or_unreadable_data(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken" / "cls"
    broken.mkdir(parents=True)
    (broken / "x.jpg").write_bytes(b"not a jpeg")
    for folder in (empty, broken.parent, tmp_path / "absent"):
        rc = main(["profile", *TINY_CLI, "--r", "2", "--iters", "1", "--threads", "1", "--data", str(folder)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_cli_profile_records_threads_and_no_fake_cpu_memory(capsys):
    """Without --threads the report names the thread count used; CPU peak memory is n/a, not 0.0;
    both table rows say which model they are."""
    args = ["profile", *TINY_CLI, "--r", "2", "--iters", "2", "--warmup", "0", "--no-drift"]
    assert main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    entry = report["latency"][0]
    assert entry["threads"] == torch.get_num_threads() and report["config"]["threads"] == entry["threads"]
    assert entry["merged"]["peak_mem_mb"] is None and entry["unmerged"]["peak_mem_mb"] is None
    assert entry["memory_method"] == "n/a on cpu"
    assert main(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "n/a" in line]
    assert sum(" unmerged │" in row for row in rows) == 1 and sum(" merged │" in row for row in rows) == 1
    assert len(rows) == 2, rows
