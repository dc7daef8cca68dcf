"""Merged vs unmerged latency on every CPU runtime tmerge deploys to, and what the merge steps cost.

    nice -n 0 python benchmarks/runtimes.py [--iters 8] [--out benchmarks/results/runtimes.json]

Models: the default DINOv2 ViT-S/14 (real weights, embedded) and ViT-S/16 (random init: cost does
not depend on the values). Methods: ToMe r=16, PiToMe keep 0.9. Batch 1 and 8, 2 threads, runtimes
torch (eager), torch.compile, ONNX Runtime and OpenVINO (f32), each through :mod:`tmerge.runtime`.
Per (model, method, batch, runtime) the merged and unmerged models are timed in one process,
interleaved run by run with the order flipped each round (``tmerge.profiling.latency``); the table
reports medians (p50), the merged/unmerged ratio beside the FLOPs ratio, and each merged model
against ONNX Runtime's unmerged one. The machine is shared: the load average is recorded, and only
ratios of interleaved runs are meaningful.

Also measured: the share of each merged ONNX model's time spent in the merge steps (every node that
the exporter attributes to ``MergingBlocks`` outside the timm blocks: matching + merge + the
proportional-attention bias), from ONNX Runtime's node profiler and OpenVINO's per-node counters;
and a determinism check: the default export (ToMe r=16) run 40 times at batch 8 on one
session with 2 threads in ONNX Runtime and OpenVINO, bit-identical and within 1e-4 of PyTorch.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import tmerge
from tmerge import MergeConfig, runtime
from tmerge.export import export_onnx
from tmerge.models import load_model
from tmerge.models.flops import count_flops
from tmerge.models.forward import input_shape
from tmerge.profiling.latency import measure_pair

import numpy as np
import onnx
import torch

MODELS = {"dinov2-s14": None, "vit_small_patch16_224": "vit_small_patch16_224"}
METHODS = {"tome r=16": ("tome", {"r": 16}), "pitome keep=0.9": ("pitome", {"keep_ratio": 0.9})}
RUNTIMES = ("torch", "torch.compile", "onnxruntime", "openvino")
THREADS = 2


def merge_nodes(path: Path) -> set[str]:
    """Names (and output names) of the nodes the exporter attributes to MergingBlocks itself."""
    names = set()
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        hierarchy = meta.get("pkg.torch.onnx.class_hierarchy")
        if hierarchy and ast.literal_eval(hierarchy)[-2:-1] == ["tmerge.patch.MergingBlocks"]:
            names.add(node.name)
            names.update(node.output)
    return names


def ort_merge_share(path: Path, x: torch.Tensor, runs: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        runner = runtime.create("onnxruntime", path, threads=THREADS, profile_prefix=str(Path(tmp) / "p"))
        run = runner.prepare(x)
        for _ in range(runs):
            run()
        events = json.loads(Path(runner.end_profiling()).read_text())
    merge, total = merge_nodes(path), 0.0
    in_merge = 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total += e["dur"]
            if e["name"][: -len("_kernel_time")] in merge:
                in_merge += e["dur"]
    return {"merge_ms": in_merge / runs / 1e3, "total_ms": total / runs / 1e3, "share": in_merge / total}


def ov_merge_share(path: Path, x: torch.Tensor, runs: int = 3) -> dict:
    runner = runtime.create("openvino", path, threads=THREADS, perf_counts=True)
    run = runner.prepare(x)
    merge = merge_nodes(path)
    in_merge = total = 0.0
    for _ in range(runs):
        run()
        for info in runner.profiling_info():
            us = info.real_time.total_seconds() * 1e6
            total += us
            if info.node_name in merge:
                in_merge += us
    return {"merge_ms": in_merge / runs / 1e3, "total_ms": total / runs / 1e3, "share": in_merge / total}


def determinism(path: Path, model, x: torch.Tensor, runs: int = 40) -> list[dict]:
    with torch.no_grad():
        ref = model(x).numpy()
    out = []
    for name in ("onnxruntime", "openvino"):
        runner = runtime.create(name, path, threads=THREADS)
        run = runner.prepare(x)
        outs = [runner.outputs(run())[0] for _ in range(runs)]
        out.append({"runtime": name, "threads": THREADS, "runs": runs, "batch": int(x.shape[0]),
                    "distinct_outputs": len({o.tobytes() for o in outs}),
                    "max_abs_diff": float(max(np.abs(o - ref).max() for o in outs))})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default="benchmarks/results/runtimes.json")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(THREADS)
    started = time.time()
    results = {"threads": THREADS, "iters": args.iters, "warmup": args.warmup, "load_start": os.getloadavg(),
               "versions": {k: runtime.package_version(k) for k in ("torch", "onnxruntime", "openvino")},
               "rows": [], "merge_share": [], "determinism": []}
    workdir = Path(tempfile.mkdtemp(prefix="tmerge-bench-"))
    for model_label in args.models.split(","):
        name = MODELS[model_label]
        torch.manual_seed(0)
        unmerged = load_model(name).eval()
        shape = input_shape(unmerged, 1)
        flops_unmerged = count_flops(unmerged, shape)["per_image"]
        u_path = workdir / f"{model_label}-unmerged.onnx"
        export_onnx(unmerged, u_path, batch_size=2, dynamic_batch=True, verify=False)
        for method_label, (method, kwargs) in METHODS.items():
            merged = tmerge.apply(copy.deepcopy(unmerged), MergeConfig.of(method, **kwargs))
            flops_ratio = count_flops(merged, shape)["per_image"] / flops_unmerged
            m_path = workdir / f"{model_label}-{method}.onnx"
            export_onnx(merged, m_path, batch_size=2, dynamic_batch=True, verify=False)
            for batch in batches:
                x = torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(batch))
                row = {"model": model_label, "method": method_label, "batch": batch, "flops_ratio": flops_ratio,
                       "load": os.getloadavg()[0]}
                for rt in RUNTIMES:
                    onnx_based = runtime.find_backend(rt).takes == "onnx"
                    m = runtime.create(rt, m_path if onnx_based else merged, threads=THREADS, timing=True)
                    u = runtime.create(rt, u_path if onnx_based else unmerged, threads=THREADS, timing=True)
                    r = measure_pair(m.prepare(x), u.prepare(x), batch, device="cpu", backend=rt,
                                     warmup=args.warmup, iters=args.iters, memory=False)
                    row[rt] = {"merged_p50_ms": r["merged"]["p50_ms"], "unmerged_p50_ms": r["unmerged"]["p50_ms"],
                               "ratio_p50": r["ratio_p50"]}
                    print(model_label, method_label, batch, rt, f"{r['ratio_p50']:.3f}", flush=True)
                ort_unmerged = row["onnxruntime"]["unmerged_p50_ms"]
                for rt in RUNTIMES:
                    row[rt]["vs_ort_unmerged"] = row[rt]["merged_p50_ms"] / ort_unmerged
                results["rows"].append(row)
                results["merge_share"].append({"model": model_label, "method": method_label, "batch": batch,
                                               "onnxruntime": ort_merge_share(m_path, x),
                                               "openvino": ov_merge_share(m_path, x)})
                if model_label == "dinov2-s14" and method == "tome" and batch == 8:
                    results["determinism"] = determinism(m_path, merged, x)
                save(results, out, started)  # partial results survive an interrupted run
    save(results, out, started)
    print(table(results))


def save(results: dict, out: Path, started: float) -> None:
    results["load_end"] = os.getloadavg()
    results["seconds"] = round(time.time() - started)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(results))


def table(results: dict) -> str:
    lines = ["| model | method | batch | FLOPs ratio | " + " | ".join(
        f"{rt} merged / unmerged ms (ratio)" for rt in RUNTIMES) + " | merged vs ORT unmerged (torch / compile / ORT / OV) |",
        "|" + " --- |" * (5 + len(RUNTIMES))]
    for row in results["rows"]:
        cells = [f"{row[rt]['merged_p50_ms']:.1f} / {row[rt]['unmerged_p50_ms']:.1f} (**{row[rt]['ratio_p50']:.3f}**)"
                 for rt in RUNTIMES]
        vs = " / ".join(f"{row[rt]['vs_ort_unmerged']:.2f}" for rt in RUNTIMES)
        lines.append(f"| {row['model']} | {row['method']} | {row['batch']} | {row['flops_ratio']:.3f} | "
                     + " | ".join(cells) + f" | {vs} |")
    lines += ["", "| model | method | batch | merge steps, ONNX Runtime | merge steps, OpenVINO |", "| --- | --- | --- | --- | --- |"]
    for s in results["merge_share"]:
        o, v = s["onnxruntime"], s["openvino"]
        lines.append(f"| {s['model']} | {s['method']} | {s['batch']} | {o['share'] * 100:.1f} % ({o['merge_ms']:.1f} of "
                     f"{o['total_ms']:.0f} ms) | {v['share'] * 100:.1f} % ({v['merge_ms']:.1f} of {v['total_ms']:.0f} ms) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
