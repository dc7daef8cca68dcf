"""ONNX Runtime latency of exported merged ViT-S/16 vs the exported unmerged model (run by hand).

    python benchmarks/onnx_latency.py [--configs tome:8,tome:16,pitome:16,tome:16:onehot] [--batch 8]
                                      [--threads 2]
                                      [--iters 40] [--out benchmarks/results/onnx_latency.json]
                                      [--export-vit-b]

* Every model is exported with ``tmerge.export.export_onnx`` (portable ops, static batch, verified
  against PyTorch), random-init weights (weights do not change latency), 224 px.
* Timing: one process, one ORT session per model (intra-op threads = --threads, inter-op 1,
  sequential), warm-up, then rounds that run every model once in rotating order; per model
  median / p90, and the ratio merged / unmerged of the medians and the median of per-round ratios.
* Merge share: a separate profiling session per merged model (``enable_profiling``); every node
  whose export stack trace comes from the merge step (``merge_step(`` in ``patch.py``) counts as
  merge, ``size.log()`` as proportional attention. Nodes ORT fused and renamed count as "other".
* ``method:r:FORM`` picks the merge form (default ``gather``; ``scatter`` = ScatterElements, ``onehot``).
* ``--export-vit-b``: wall and CPU time of exporting ViT-B/16 (ToMe r=16, portable, verified).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import tmerge
from tmerge.export import export_onnx

import numpy as np
import timm
import torch


def export_model(arch: str, method: str, r: int | None, out: Path, batch: int, form: str = "gather") -> dict:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False).eval()
    if method != "none":
        tmerge.apply(model, tmerge.MergeConfig.of(method, r=r))
    t0, c0 = time.perf_counter(), time.process_time()
    result = export_onnx(model, out, batch_size=batch, dynamic_batch=False, graph="portable", model_name=arch,
                         merge_form=form if method != "none" else None)
    return {"path": out, "manifest": result.manifest, "export_wall_s": time.perf_counter() - t0,
            "export_cpu_s": time.process_time() - c0}


def session(path: Path, threads: int, profile_prefix: str | None = None):
    from tmerge.runtime.ort import session as ort_session

    return ort_session(path, threads=threads, spinning=False, profile_prefix=profile_prefix)


def node_categories(path: Path) -> dict[str, str]:
    import onnx

    cats = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        trace = meta.get("pkg.torch.onnx.stack_trace", "")
        if "merge_step(" in trace:
            cats[node.name] = "merge"
        elif "size.log()" in trace:
            cats[node.name] = "prop_attn"
        else:
            cats[node.name] = "other"
    return cats


def merge_share(path: Path, images: np.ndarray, threads: int, runs: int, tmpdir: str) -> dict:
    sess = session(path, threads, profile_prefix=os.path.join(tmpdir, path.stem))
    feed = {"images": images}
    for _ in range(3):
        sess.run(None, feed)
    for _ in range(runs):
        sess.run(None, feed)
    prof = sess.end_profiling()
    events = json.load(open(prof))
    cats = node_categories(path)
    totals: dict[str, float] = {}
    by_op: dict[str, float] = {}
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        name = ev["name"][: -len("_kernel_time")]
        cat = cats.get(name, "other")
        totals[cat] = totals.get(cat, 0.0) + ev["dur"]
        if cat == "merge":
            op = ev.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + ev["dur"]
    total = sum(totals.values())
    return {"share": {k: v / total for k, v in totals.items()},
            "merge_ops_us_per_run": {k: v / (runs + 3) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vit_small_patch16_224")
    ap.add_argument("--configs", default="tome:8,tome:16,pitome:16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--profile-runs", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--export-vit-b", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    configs = [("none", None, "gather")]
    for c in filter(None, args.configs.split(",")):
        parts = c.split(":")  # method:r[:scatter|onehot]
        configs.append((parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "gather"))
    tmpdir = tempfile.mkdtemp(prefix="tmerge-bench-")
    models = {}
    for method, r, form in configs:
        label = "unmerged" if method == "none" else f"{method} r={r}" + ("" if form == "gather" else f" {form}")
        info = export_model(args.arch, method, r, Path(tmpdir) / f"{method}_{r}_{form}.onnx", args.batch, form)
        models[label] = info
        print(f"exported {label}: {info['export_wall_s']:.1f} s wall, {info['export_cpu_s']:.1f} s CPU, "
              f"parity {info['manifest']['parity']['max_abs_diff']:.2e}", flush=True)

    images = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
    sessions = {k: session(v["path"], args.threads) for k, v in models.items()}
    labels = list(sessions)
    for _ in range(args.warmup):
        for k in labels:
            sessions[k].run(None, {"images": images})
    times = {k: [] for k in labels}
    for i in range(args.iters):
        order = labels[i % len(labels):] + labels[: i % len(labels)]
        for k in order:
            t0 = time.perf_counter()
            sessions[k].run(None, {"images": images})
            times[k].append(time.perf_counter() - t0)

    base = times["unmerged"]
    results = {"arch": args.arch, "batch": args.batch, "threads": args.threads, "iters": args.iters,
               "versions": models["unmerged"]["manifest"]["versions"], "models": {}}
    for k in labels:
        t = np.array(times[k])
        flops = models[k]["manifest"]["flops"]
        entry = {
            "median_ms": float(np.median(t) * 1e3), "p90_ms": float(np.percentile(t, 90) * 1e3),
            "latency_ratio_median": float(np.median(t) / np.median(base)),
            "latency_ratio_p90": float(np.percentile(t, 90) / np.percentile(base, 90)),
            "per_round_ratio_median": float(statistics.median(np.array(times[k]) / np.array(base))),
            "flops_ratio": flops["ratio"], "gflops_per_image": flops["merged_per_image"] / 1e9,
            "export_wall_s": models[k]["export_wall_s"], "export_cpu_s": models[k]["export_cpu_s"],
            "parity_max_abs_diff": models[k]["manifest"]["parity"]["max_abs_diff"],
        }
        if k != "unmerged":
            entry.update(merge_share(models[k]["path"], images, args.threads, args.profile_runs, tmpdir))
        results["models"][k] = entry

    print(f"\n{args.arch} · batch {args.batch} · {args.threads} threads · {args.iters} interleaved rounds")
    print(f"{'model':<20}{'median ms':>10}{'p90 ms':>9}{'lat.ratio':>10}{'p90 ratio':>10}{'FLOPs ratio':>12}"
          f"{'merge %':>9}{'propattn %':>11}")
    for k, e in results["models"].items():
        share = e.get("share", {})
        print(f"{k:<20}{e['median_ms']:>10.1f}{e['p90_ms']:>9.1f}{e['latency_ratio_median']:>10.3f}"
              f"{e['latency_ratio_p90']:>10.3f}{e['flops_ratio']:>12.3f}"
              f"{100 * share.get('merge', 0):>9.2f}{100 * share.get('prop_attn', 0):>11.2f}")
    for k, e in results["models"].items():
        if "merge_ops_us_per_run" in e:
            top = ", ".join(f"{op} {us:.0f}µs" for op, us in list(e["merge_ops_us_per_run"].items())[:6])
            print(f"  {k} merge ops per run: {top}")

    if args.export_vit_b:
        info = export_model("vit_base_patch16_224", "tome", 16, Path(tmpdir) / "vitb.onnx", 2)
        results["vit_b_export"] = {"wall_s": info["export_wall_s"], "cpu_s": info["export_cpu_s"],
                                   "graph_export_s": info["manifest"]["parity"]["export_seconds"]}
        print(f"\nViT-B/16 ToMe r=16 export (portable, verified, manifest): {info['export_wall_s']:.1f} s wall, "
              f"{info['export_cpu_s']:.1f} s CPU (graph export alone {info['manifest']['parity']['export_seconds']} s)")
    try:
        results["load_average"] = os.getloadavg()
    except OSError:
        pass
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
