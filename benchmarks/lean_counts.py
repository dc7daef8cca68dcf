"""What the merge step costs, counted and shared out (run by hand; results in benchmarks/results/).

    python benchmarks/lean_counts.py [--part ops,onnx,share,wall,compile,export] [--out benchmarks/results/lean_counts.json]

* ``ops``: top-level PyTorch ops the merging adds per merging block (eager, CPU profiler,
  ``tmerge.profiling.counts``), ToMe and PiToMe r=16 (ViT-L/16: r=8) on ViT-S/16, ViT-B/16, ViT-L/16 and
  the embedded default model (DINOv2 ViT-S/14). Every op is a kernel launch on a GPU.
* ``onnx``: nodes the merging adds per merging block to the portable ONNX graph (ViT-S/16, r=16).
* ``share``: the merge step's share of the merged model's run time in ONNX Runtime (node profiler) and
  OpenVINO (per-node performance counters), ViT-S/16 ToMe and PiToMe (``--share-methods``) r=16, batch 1
  and 8, 2 threads. A node is "merge" when its export stack trace comes from the merge step,
  "prop_attn" for the log-size bias. Nodes are categorised on the graph each runtime really runs (ORT's
  optimised model, OpenVINO's runtime model): a fused or created node keeps the category of the outputs
  it carries, or of its neighbours when they all agree, else counts as "other". Reported: the share of
  the summed node times and of the summed per-node medians (less moved by load spikes), and the merge
  time per op type.
* ``wall``: the same share without a profiler: the merged graph against a *twin* exported from the same
  model whose merge step only keeps the first N - r tokens (one Slice, same shapes downstream), timed
  interleaved run by run in ONNX Runtime and OpenVINO (2 threads, each runtime's default thread
  spinning, batch 1 and 8): ``--wall-pairs`` timings of each graph, alternating, each after a 10 ms pause
  (the idle graph's pool stops spinning) and one untimed run, over ``--wall-iters`` runs. Share =
  1 - median(t_twin) / median(t_merged), with a bootstrap 95 % interval; also from the 10th percentiles
  (``share_p10``: on a shared machine other jobs only ever add time, and the fastest timings carry
  the least of it). ``--wall-compare DIR`` times a third graph per method and batch in the same
  rounds: the merged graph another version of tmerge exported (``--part export --export-dir DIR`` run
  with ``PYTHONPATH`` at that checkout), so a change to the merge step is judged against the same twin
  in one process rather than across runs, which differ by more than most changes. A node profiler adds a
  fixed cost to every node it times, which counts many small merge nodes heavily; the twin measures
  what the merge step costs when nothing is watching. The profiler's own cost per node is reported too.
* ``export``: writes the merged graphs ``wall`` times (``--share-methods`` x ``--wall-batches``) to
  ``--export-dir``, exported by whichever tmerge this script imports.
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
    """ONNX node name (and output names) -> merge / prop_attn / other, from the export stack traces.

    Nodes the exporter's optimiser rebuilt carry no trace (e.g. the Split of a folded ``split``): they
    take the category their producers agree on."""
    import onnx

    graph = onnx.load(str(path)).graph
    known = {}
    for node in graph.node:
        trace = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.stack_trace", "")
        if trace:
            known[node.name] = "merge" if "merge_step(" in trace else "prop_attn" if "size.log()" in trace else "other"
    edges = _onnx_edges(graph)
    cats = propagate({name: (producers, []) for name, (producers, _) in edges.items()}, known)
    for node in graph.node:
        cats.setdefault(node.name, "other")
        for name in node.output:
            cats[name] = cats[node.name]
    return cats


def _onnx_edges(graph) -> dict[str, tuple[list[str], list[str]]]:
    """node name -> (producer node names, consumer node names), constants left out."""
    producer = {out: n.name for n in graph.node if n.op_type != "Constant" for out in n.output}
    consumers: dict[str, list[str]] = {}
    for n in graph.node:
        for i in n.input:
            if i in producer:
                consumers.setdefault(producer[i], []).append(n.name)
    return {n.name: ([producer[i] for i in n.input if i in producer], consumers.get(n.name, []))
            for n in graph.node if n.op_type != "Constant"}


def propagate(edges: dict[str, tuple[list[str], list[str]]], known: dict[str, str]) -> dict[str, str]:
    """Categories for every node of ``edges``: ``known`` ones as given; a node a runtime (or the
    exporter) created or renamed takes the category of its neighbours when all of them, producers and
    consumers, have one and agree (a LayerNorm fed by a merge and feeding an MLP stays "other");
    anything left is "other"."""
    cats = dict(known)
    changed = True
    while changed:
        changed = False
        for name, (producers, consumers) in edges.items():
            neighbours = producers + consumers
            if name in cats or not neighbours or not all(n in cats for n in neighbours):
                continue
            seen = {cats[n] for n in neighbours}
            if len(seen) == 1:
                cats[name] = seen.pop()
                changed = True
    return {name: cats.get(name, "other") for name in edges} | cats


def _shares(durations: dict[str, list[float]], cats: dict[str, str], types: dict[str, str]) -> dict:
    """Shares of the profiled time per category (sum over runs; and sum of per-node medians, which
    a load spike moves less), and the merge time per op type as a share of the total."""
    totals: dict[str, float] = {}
    medians: dict[str, float] = {}
    merge_ops: dict[str, float] = {}
    for name, times in durations.items():
        cat = cats.get(name, "other")
        totals[cat] = totals.get(cat, 0.0) + float(np.sum(times))
        medians[cat] = medians.get(cat, 0.0) + float(np.median(times))
        if cat == "merge":
            merge_ops[types.get(name, "?")] = merge_ops.get(types.get(name, "?"), 0.0) + float(np.sum(times))
    total, total_med = sum(totals.values()), sum(medians.values())
    return {"share": {k: v / total for k, v in totals.items()},
            "share_of_medians": {k: v / total_med for k, v in medians.items()},
            "merge_by_op": {k: v / total for k, v in sorted(merge_ops.items(), key=lambda kv: -kv[1])}}


def ort_share(path: Path, images: np.ndarray, threads: int, runs: int, tmpdir: str) -> dict:
    """ONNX Runtime's node profiler, nodes categorised on the graph ORT actually runs (its optimised
    model: fused nodes such as FusedMatMul carry the outputs, or sit between the nodes, they replace)."""
    from tmerge.runtime.ort import session

    import onnx
    import onnxruntime as ort

    optimized = os.path.join(tmpdir, path.stem + ".ort.onnx")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = optimized
    ort.InferenceSession(str(path), options)  # writes the optimised graph
    graph = onnx.load(optimized).graph
    source = node_categories(path)
    known = {}
    for node in graph.node:
        cat = source.get(node.name) or next((source[o] for o in node.output if o in source), None)
        if cat:
            known[node.name] = cat
    cats = propagate(_onnx_edges(graph), known)
    types = {node.name: node.op_type for node in graph.node}

    sess = session(path, threads=threads, spinning=False, profile_prefix=os.path.join(tmpdir, path.stem))
    for _ in range(runs):
        sess.run(None, {"images": images})
    durations: dict[str, list[float]] = {}
    for ev in json.load(open(sess.end_profiling())):
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            durations.setdefault(ev["name"][: -len("_kernel_time")], []).append(ev["dur"])
    return _shares(durations, cats, types)


def openvino_share(path: Path, images: np.ndarray, threads: int, runs: int) -> dict:
    """OpenVINO's per-node performance counters, nodes categorised on its runtime graph (nodes it
    created, e.g. the TopK an ArgMax becomes, take their neighbours' category)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {"PERF_COUNT": "YES", "INFERENCE_NUM_THREADS": threads})
    source = node_categories(path)
    edges, types = {}, {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        name = op.get_friendly_name()
        types[name] = str(op.get_rt_info()["layerType"].astype(str)) if "layerType" in op.get_rt_info() else op.get_type_name()
        if types[name] == "Const":
            continue
        producers = [i.get_source_output().get_node() for i in op.inputs()]
        consumers = [t.get_node() for o in op.outputs() for t in o.get_target_inputs()]
        edges[name] = ([p.get_friendly_name() for p in producers if p.get_type_name() != "Constant"
                        and str(p.get_rt_info()["layerType"].astype(str) if "layerType" in p.get_rt_info() else "") != "Const"],
                       [c.get_friendly_name() for c in consumers])
    cats = propagate(edges, {name: source[name] for name in edges if name in source})
    request = compiled.create_infer_request()
    durations: dict[str, list[float]] = {}
    for _ in range(runs):
        request.infer({0: images})
        for info in request.get_profiling_info():
            durations.setdefault(info.node_name, []).append(info.real_time.total_seconds() * 1e6)
    return _shares(durations, cats, types)


class TruncateStep:
    """A merge step that keeps the first N - r tokens and their sizes: the twin's stand-in for merging.
    Its sizes are computed from the input (all ones), not a constant, so the exporter cannot fold away
    the proportional-attention bias that follows: twin and merged graph both pay for it."""

    def __call__(self, method, block, form):
        keep = block.x.shape[1] - block.r
        size = block.size if block.size is not None else block.x[..., :1] * 0 + 1
        return block.x[:, :keep], size[:, :keep], None


def export_twin(model, path: Path, batch: int) -> None:
    """``model`` exported with :class:`TruncateStep` in place of its merge step."""
    from tmerge.export.graph import strip_wrapper_prefix, torch_onnx_export
    from tmerge.patch import merging_blocks

    import onnx

    example = torch.randn(batch, 3, 224, 224)
    with torch.no_grad(), merging_blocks(model).using(TruncateStep()):
        proto = torch_onnx_export(model, (example,), dynamic_batch=False, opset=18, input_names=["images"],
                                  output_names=["output"])
    strip_wrapper_prefix(proto)
    onnx.save(proto, str(path))


def _runners(path: Path, images: np.ndarray, threads: int, runtime: str):
    if runtime == "onnxruntime":
        from tmerge.runtime.ort import session

        sess = session(path, threads=threads)  # ORT's default: pool threads spin between nodes
        return lambda: sess.run(None, {"images": images})
    import openvino as ov

    core = ov.Core()
    request = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": threads}).create_infer_request()
    return lambda: request.infer({0: images})


def _time(run, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        run()
    return (time.perf_counter() - start) / iters


def profiler_cost_per_node(path: Path, images: np.ndarray, threads: int, tmpdir: str, rounds: int = 5,
                           iters: int = 10) -> float:
    """Seconds ONNX Runtime's node profiler adds per node it runs (profiled vs plain session, interleaved)."""
    from tmerge.runtime.ort import session

    plain = session(path, threads=threads, spinning=False)
    profiled = session(path, threads=threads, spinning=False, profile_prefix=os.path.join(tmpdir, "cost"))
    feed = {"images": images}
    gaps = [_time(lambda: profiled.run(None, feed), iters) - _time(lambda: plain.run(None, feed), iters)
            for _ in range(rounds)]
    events = json.load(open(profiled.end_profiling()))
    nodes_timed = sum(1 for ev in events if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"))
    return float(np.median(gaps)) / (nodes_timed / (rounds * iters))


def _share(merged: np.ndarray, twin: np.ndarray, quantile: float = 50.0, axis=None):
    """1 - q(twin) / q(merged) for the ``quantile`` q of the timings."""
    return 1 - np.percentile(twin, quantile, axis=axis) / np.percentile(merged, quantile, axis=axis)


def _bootstrap_share(merged: np.ndarray, twin: np.ndarray, quantile: float = 50.0, samples: int = 2000
                     ) -> tuple[float, float]:
    """95 % interval of :func:`_share`, resampling the interleaved pairs together."""
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(merged), size=(samples, len(merged)))
    shares = _share(merged[picks], twin[picks], quantile, axis=1)
    return float(np.percentile(shares, 2.5)), float(np.percentile(shares, 97.5))


def _interleaved(runs: list, pairs: int, iters: int) -> list[np.ndarray]:
    """``pairs`` timings of ``iters`` runs of each runner, in an order that flips every round, each
    after a 10 ms pause (the other graphs' pool threads stop spinning) and one untimed run (it wakes
    the pool and refills the caches)."""
    for run in runs:
        _time(run, 5)
    times: list[list[float]] = [[] for _ in runs]
    order = list(range(len(runs)))
    for i in range(pairs):
        for j in (order if i % 2 == 0 else order[::-1]):
            time.sleep(0.01)
            runs[j]()
            times[j].append(_time(runs[j], iters))
    return [np.array(t) for t in times]


def _share_fields(merged: np.ndarray, twin: np.ndarray, prefix: str = "") -> dict:
    return {f"{prefix}share": float(_share(merged, twin)), f"{prefix}share_ci95": list(_bootstrap_share(merged, twin)),
            f"{prefix}share_p10": float(_share(merged, twin, 10)),
            f"{prefix}share_p10_ci95": list(_bootstrap_share(merged, twin, 10)),
            f"{prefix}merged_ms_median": 1e3 * float(np.median(merged))}


def merged_graph_name(method: str, batch: int) -> str:
    return f"{method}_b{batch}.onnx"


def export_merged(model, path: Path, batch: int) -> None:
    """``model`` (ViT-S/16, merged) as the static-batch portable ONNX graph the shares are timed on."""
    export_onnx(model, path, batch_size=batch, dynamic_batch=False, model_name="vit_small_patch16_224")


def export_part(out_dir: Path, methods: list[str], batches: list[int]) -> None:
    """The merged graphs ``--part wall`` times, written to ``out_dir`` by the tmerge this script
    imports: run it with ``PYTHONPATH`` at another checkout to time that version's merge step against
    this one's (``--wall-compare``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for method, batch in [(m, b) for m in methods for b in batches]:
        path = out_dir / merged_graph_name(method, batch)
        export_merged(build("vit_small_patch16_224", method, 16), path, batch)
        print(f"export {path} (tmerge from {Path(tmerge.__file__).parent})", flush=True)


def wall_part(threads: int, pairs: int, iters: int, methods: list[str], batches: list[int],
              compare: Path | None = None) -> list[dict]:
    rows = []
    tmpdir = tempfile.mkdtemp(prefix="tmerge-wall-")
    for method, batch in [(m, b) for m in methods for b in batches]:
        model = build("vit_small_patch16_224", method, 16)
        merged, twin = Path(tmpdir) / merged_graph_name(method, batch), Path(tmpdir) / f"{method}_b{batch}_twin.onnx"
        export_merged(model, merged, batch)
        export_twin(model, twin, batch)
        graphs = [merged, twin]
        if compare is not None and (compare / merged.name).exists():
            graphs.append(compare / merged.name)
        elif compare is not None:
            print(f"wall  {method} batch {batch}: no {merged.name} in {compare}, nothing to compare", flush=True)
        images = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        for runtime in ("onnxruntime", "openvino"):
            times = _interleaved([_runners(g, images, threads, runtime) for g in graphs], pairs, iters)
            row = {"method": method, "runtime": runtime, "batch": batch, "threads": threads, "pairs": pairs, "iters": iters,
                   **_share_fields(times[0], times[1]), "twin_ms_median": 1e3 * float(np.median(times[1])),
                   "load_average": os.getloadavg()}
            line = ""
            if len(graphs) > 2:
                row.update(_share_fields(times[2], times[1], prefix="compare_"), compare_graph=str(graphs[2]))
                line = f"; compared graph {100 * row['compare_share']:.2f} %"
            if runtime == "onnxruntime":
                row["profiler_us_per_node"] = 1e6 * profiler_cost_per_node(merged, images, threads, tmpdir)
                line += f", profiler {row['profiler_us_per_node']:.1f} us/node"
            rows.append(row)
            low, high = row["share_ci95"]
            print(f"wall  {method:<7}{runtime:<12} batch {batch}: merge {100 * row['share']:.2f} % "
                  f"(95 % CI {100 * low:.2f}-{100 * high:.2f}; of the fastest tenths {100 * row['share_p10']:.2f} %), "
                  f"merged {row['merged_ms_median']:.2f} ms, twin {row['twin_ms_median']:.2f} ms{line}", flush=True)
    return rows


def share_part(threads: int, runs: int, methods: list[str]) -> list[dict]:
    rows = []
    tmpdir = tempfile.mkdtemp(prefix="tmerge-share-")
    for method, batch in [(m, b) for m in methods for b in (1, 8)]:
        model = build("vit_small_patch16_224", method, 16)
        path = Path(tmpdir) / f"{method}16_b{batch}.onnx"
        export_merged(model, path, batch)
        images = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        for runtime_name, share in (("onnxruntime", lambda: ort_share(path, images, threads, runs, tmpdir)),
                                    ("openvino", lambda: openvino_share(path, images, threads, runs))):
            s = share()
            rows.append({"method": method, "runtime": runtime_name, "batch": batch, "threads": threads, "runs": runs,
                         "load_average": os.getloadavg(), **s})
            print(f"share {method:<7}{runtime_name:<12} batch {batch}: merge {100 * s['share'].get('merge', 0):.2f} % "
                  f"(of medians {100 * s['share_of_medians'].get('merge', 0):.2f} %), prop-attn "
                  f"{100 * s['share'].get('prop_attn', 0):.2f} %; merge by op "
                  + ", ".join(f"{k} {100 * v:.2f}" for k, v in list(s["merge_by_op"].items())[:6]), flush=True)
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
    ap.add_argument("--share-methods", default="tome,pitome")
    ap.add_argument("--wall-pairs", type=int, default=60, help="interleaved timings of each graph")
    ap.add_argument("--wall-iters", type=int, default=5, help="runs per timing (after one untimed run)")
    ap.add_argument("--wall-batches", default="1,8")
    ap.add_argument("--wall-compare", default=None,
                    help="folder of merged graphs from --part export run against another tmerge, timed alongside")
    ap.add_argument("--export-dir", default=None, help="where --part export writes its graphs")
    ap.add_argument("--compile-rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = set(args.part.split(","))
    if "export" in parts and not args.export_dir:
        ap.error("--part export needs --export-dir")
    if args.wall_compare and not Path(args.wall_compare).is_dir():
        ap.error(f"--wall-compare: no folder {args.wall_compare}")
    results: dict = {"torch": torch.__version__, "timm": timm.__version__, "started": time.strftime("%Y-%m-%d %H:%M")}
    if "ops" in parts:
        results["ops_per_merging_block"] = ops_part()
    if "onnx" in parts:
        results["onnx_nodes_per_merging_block"] = onnx_part()
    if "share" in parts:
        results["merge_share"] = share_part(args.threads, args.share_runs, args.share_methods.split(","))
    if "wall" in parts:
        results["merge_share_wall"] = wall_part(args.threads, args.wall_pairs, args.wall_iters,
                                                args.share_methods.split(","),
                                                [int(b) for b in args.wall_batches.split(",")],
                                                Path(args.wall_compare) if args.wall_compare else None)
    if "export" in parts:
        export_part(Path(args.export_dir), args.share_methods.split(","), [int(b) for b in args.wall_batches.split(",")])
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
