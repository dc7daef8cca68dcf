"""What the merge step costs, counted and shared out (run by hand; results in benchmarks/results/).

    python benchmarks/lean_counts.py [--part ops,onnx,share,compile] [--out benchmarks/results/lean_counts.json]

* ``ops``: top-level PyTorch ops the merging adds per merging block (eager, CPU profiler,
  ``tmerge.profiling.counts``), ToMe and PiToMe r=16 (ViT-L/16: r=8) on ViT-S/16, ViT-B/16, ViT-L/16 and
  the embedded default model (DINOv2 ViT-S/14). Every op is a kernel launch on a GPU.
* ``onnx``: nodes the merging adds per merging block to the portable ONNX graph (ViT-S/16, r=16).
* ``share``: the merge step's share of the merged model's run time in ONNX Runtime (node profiler) and
  OpenVINO (per-node performance counters), ViT-S/16 ToMe r=16, batch 1 and 8, 2 threads. A node is
  "merge" when its export stack trace comes from the merge step, "prop_attn" for the log-size bias;
  nodes a runtime fused under another name count as "other", so the shares are lower bounds.
* ``compile``: torch.compile (inductor, CPU) time of the merged vs the unmerged ViT-S/16, each in a fresh
  process with an empty inductor cache, interleaved over ``--compile-rounds``.
Random-init weights throughout (counts and shares do not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tmerge
from tmerge import MergeConfig
from tmerge.export import export_onnx
from tmerge.export.instrument import build_graph
from tmerge.profiling.counts import merging_layers, onnx_nodes_per_merging_block, ops_per_merging_block

import numpy as np
import timm
import torch

ARCHS = [("vit_small_patch16_224", 16), ("vit_base_patch16_224", 16), ("vit_large_patch16_224", 8),
         ("dinov2-s14", 16)]


def build(arch: str, method: str | None, r: int | None):
    torch.manual_seed(0)
    if arch == "dinov2-s14":
        from tmerge.models import load_model

        model = load_model(arch).eval()
    else:
        model = timm.create_model(arch, pretrained=False).eval()
    if method:
        tmerge.apply(model, MergeConfig.of(method, r=r))
    return model


def ops_part() -> list[dict]:
    rows = []
    for arch, r in ARCHS:
        for method in ("tome", "pitome"):
            model = build(arch, method, r)
            size = model.patch_embed.img_size
            counts = ops_per_merging_block(model, torch.randn(1, 3, *size))
            rows.append({"arch": arch, "method": method, "r": r, **counts})
            print(f"ops   {arch:<24}{method:<8} r={r:<3} {counts['per_block']:6.2f} ops per merging block "
                  f"({counts['merged']} vs {counts['unmerged']} unmerged)", flush=True)
    return rows


def onnx_part() -> list[dict]:
    rows = []
    base, _ = build_graph(build("vit_small_patch16_224", None, None), with_slots=False)
    for method in ("tome", "pitome"):
        model = build("vit_small_patch16_224", method, 16)
        merged, _ = build_graph(model, with_slots=False)
        counts = onnx_nodes_per_merging_block(merged, base, len(merging_layers(model)))
        rows.append({"arch": "vit_small_patch16_224", "method": method, "r": 16, **counts})
        print(f"onnx  vit_small_patch16_224  {method:<8} {counts['per_block']:6.2f} nodes per merging block", flush=True)
    return rows


def node_categories(path: Path) -> dict[str, str]:
    """ONNX node name (and output names) -> merge / prop_attn / other, from the export stack traces."""
    import onnx

    cats = {}
    for node in onnx.load(str(path)).graph.node:
        trace = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.stack_trace", "")
        cat = "merge" if "merge_step(" in trace else "prop_attn" if "size.log()" in trace else "other"
        for name in (node.name, *node.output):
            cats[name] = cat
    return cats


def ort_share(path: Path, images: np.ndarray, threads: int, runs: int, tmpdir: str) -> dict:
    from tmerge.runtime.ort import session

    sess = session(path, threads=threads, spinning=False, profile_prefix=os.path.join(tmpdir, path.stem))
    for _ in range(runs):
        sess.run(None, {"images": images})
    events = json.load(open(sess.end_profiling()))
    cats, totals = node_categories(path), {}
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            cat = cats.get(ev["name"][: -len("_kernel_time")], "other")
            totals[cat] = totals.get(cat, 0.0) + ev["dur"]
    total = sum(totals.values())
    return {k: v / total for k, v in totals.items()}


def openvino_share(path: Path, images: np.ndarray, threads: int, runs: int) -> dict:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {"PERF_COUNT": "YES", "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    cats, totals = node_categories(path), {}
    for _ in range(runs):
        request.infer({0: images})
        for info in request.get_profiling_info():
            cat = cats.get(info.node_name, "other")
            totals[cat] = totals.get(cat, 0.0) + info.real_time.total_seconds()
    total = sum(totals.values())
    return {k: v / total for k, v in totals.items()}


def share_part(threads: int, runs: int) -> list[dict]:
    rows = []
    tmpdir = tempfile.mkdtemp(prefix="tmerge-share-")
    model = build("vit_small_patch16_224", "tome", 16)
    for batch in (1, 8):
        path = Path(tmpdir) / f"tome16_b{batch}.onnx"
        export_onnx(model, path, batch_size=batch, dynamic_batch=False, model_name="vit_small_patch16_224")
        images = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        for runtime_name, share in (("onnxruntime", lambda: ort_share(path, images, threads, runs, tmpdir)),
                                    ("openvino", lambda: openvino_share(path, images, threads, runs))):
            s = share()
            rows.append({"runtime": runtime_name, "batch": batch, "threads": threads, "runs": runs, "share": s})
            print(f"share {runtime_name:<12} batch {batch}: merge {100 * s.get('merge', 0):.2f} %, prop-attn "
                  f"{100 * s.get('prop_attn', 0):.2f} %", flush=True)
    return rows


COMPILE_CHILD = """
import json, os, sys, time
import tmerge, timm, torch
torch.manual_seed(0)
model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
if sys.argv[1] != "none":
    tmerge.apply(model, tmerge.MergeConfig.of(sys.argv[1], r=16))
compiled = torch.compile(model, fullgraph=True)
x = torch.randn(2, 3, 224, 224)
start = time.perf_counter()
with torch.no_grad():
    out = compiled(x)
seconds = time.perf_counter() - start
with torch.no_grad():
    err = (out - model(x)).abs().max().item()
print(json.dumps({"seconds": seconds, "max_abs_diff": err}))
"""


def compile_part(rounds: int) -> dict:
    times: dict[str, list[float]] = {"none": [], "tome": [], "pitome": []}
    for i in range(rounds):
        for label in (list(times) if i % 2 == 0 else list(reversed(times))):
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}
                done = subprocess.run([sys.executable, "-c", COMPILE_CHILD, label], capture_output=True, text=True,
                                      env=env, check=True)
            times[label].append(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
            print(f"compile {label:<7} round {i}: {times[label][-1]:.1f} s", flush=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"seconds": times, "median_s": med,
            "ratio_to_unmerged": {k: med[k] / med["none"] for k in ("tome", "pitome")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="ops,onnx,share,compile")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--share-runs", type=int, default=20)
    ap.add_argument("--compile-rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = set(args.part.split(","))
    results: dict = {"torch": torch.__version__, "timm": timm.__version__, "started": time.strftime("%Y-%m-%d %H:%M")}
    if "ops" in parts:
        results["ops_per_merging_block"] = ops_part()
    if "onnx" in parts:
        results["onnx_nodes_per_merging_block"] = onnx_part()
    if "share" in parts:
        results["merge_share"] = share_part(args.threads, args.share_runs)
    if "compile" in parts:
        results["compile"] = compile_part(args.compile_rounds)
        print("compile ratio to unmerged:", results["compile"]["ratio_to_unmerged"], flush=True)
    results["load_average"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
