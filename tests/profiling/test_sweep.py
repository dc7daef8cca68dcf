"""`tmerge sweep` on a tiny model: one report per point, summary JSON, a Pareto PNG."""

from __future__ import annotations

import json

from tmerge.cli import main
from tmerge.profiling.report import load_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_cli_sweep_tiny(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["sweep", "--model", "vit_tiny_patch16_224", "--model-kwargs",
               "img_size=32,patch_size=8,depth=3,embed_dim=48,num_heads=3,num_classes=10",
               "--methods", "tome,pitome", "--r", "2,4", "--batch-sizes", "2", "--warmup", "0", "--iters", "2",
               "--threads", "1", "--num-images", "4", "--out-dir", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert [(p["method"], p["r"]) for p in summary["points"]] == [("tome", 2), ("tome", 4), ("pitome", 2), ("pitome", 4)]
    assert (out / "pareto.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "sweep.json").read_text())["png"] == str(out / "pareto.png")
    for path in summary["reports"]:
        report = load_report(path)
        assert report["flops"]["ratio"] < 1 and report["latency"][0]["batch_size"] == 2
    tome = [p for p in summary["points"] if p["method"] == "tome"]
    assert tome[1]["flops_ratio"] < tome[0]["flops_ratio"]


def test_cli_sweep_bad_method(tmp_path, capsys):
    rc = main(["sweep", "--methods", "nope", "--r", "2", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: unknown method 'nope'")
