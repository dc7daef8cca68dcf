"""FLOPs ratio and eager-PyTorch latency ratio, merged vs unmerged, on this CPU.

    python benchmarks/eager_cpu.py [--models vit_small_patch16_224,vit_base_patch16_224] [--batch 8]

Random-init weights (latency and FLOPs do not depend on the values). Merged and unmerged models are
timed in the same process, interleaved iteration by iteration after a warm-up, and the table reports
medians and the merged/unmerged ratio of medians: absolute times on a shared machine are noise.
"""

from __future__ import annotations

import argparse
import statistics
import time

import tmerge  # noqa: F401  (before timm)
from tmerge import MergeConfig
from tmerge.models.flops import count_flops

import timm
import torch

CONFIGS = [("tome", {"r": 8}), ("tome", {"r": 16}), ("pitome", {"r": 8}), ("pitome", {"r": 16})]


def interleaved_medians(fns, x, warmup: int, iters: int) -> list[float]:
    times = [[] for _ in fns]
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns:
                fn(x)
        for _ in range(iters):
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn(x)
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, timm {timm.__version__}, threads {args.threads}, batch {args.batch}")
    print("| model | method | r | FLOPs ratio | latency ratio (p50) | merged p50 ms | unmerged p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        base = timm.create_model(name, pretrained=False).eval()
        shape = (args.batch, 3, *base.patch_embed.img_size)
        x = torch.randn(shape)
        base_flops = count_flops(base, (1, *shape[1:]), per_layer=False)["total"]
        merged = [timm.create_model(name, pretrained=False).eval() for _ in CONFIGS]
        for net, (method, kw) in zip(merged, CONFIGS):
            tmerge.apply(net, MergeConfig.of(method, **kw))
        medians = interleaved_medians([base, *merged], x, args.warmup, args.iters)
        for net, (method, kw), ms in zip(merged, CONFIGS, medians[1:]):
            ratio = count_flops(net, (1, *shape[1:]), per_layer=False)["total"] / base_flops
            print(f"| {name} | {method} | {kw['r']} | {ratio:.3f} | {ms / medians[0]:.3f} | {ms:.1f} | {medians[0]:.1f} |")


if __name__ == "__main__":
    main()
