"""Merged vs unmerged ViTs on a GPU: eager, CUDA graphs and torch.compile, fp16 and fp32 (run by hand on
any machine with a CUDA GPU; nothing here runs in the test suite).

    python benchmarks/gpu.py [--models vit_small_patch16_224,vit_base_patch16_224,vit_large_patch16_224,dinov2-s14]
                             [--batches 1,64,256] [--precisions fp16,fp32] [--modes eager,graphs,compile]
                             [--reference-dir DIR] [--iters 50] [--out benchmarks/results/gpu.json]

* Models: random-init timm weights (latency does not depend on their values), the same weights for
  every variant of one model; ToMe r=16 (ViT-L/16: r=8) through ``tmerge.apply``.
* ``--reference-dir``: a checkout of the public reference ToMe (facebookresearch/ToMe, fetched by the
  user at run time, never vendored); its ``tome.patch.timm`` patch of the same weights is timed as the
  anchor row. Without it, the anchor is skipped.
* Timing: ``tmerge.runtime``'s torch runners (fp16/bf16 = autocast; ``graphs`` = each batch captured once
  as a CUDA graph and replayed; ``compile`` = torch.compile, ``reduce-overhead`` mode, its compile time
  recorded), merged, unmerged and reference interleaved run by run with the order flipped every round,
  each run timed with CUDA events. Reported: median ms per variant, merged / unmerged ratio of the
  medians with a 95 % bootstrap interval over the paired rounds, and kernel launches per forward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import tmerge
from tmerge import MergeConfig, runtime
from tmerge.profiling.latency import ratio_interval

import numpy as np
import timm
import torch

R = {"vit_large_patch16_224": 8}


def build(arch: str, state: dict | None):
    if arch == "dinov2-s14":
        from tmerge.models import load_model

        model = load_model(arch)
    else:
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def variants(arch: str, reference: bool) -> dict:
    base = build(arch, None)
    state = base.state_dict()
    out = {"unmerged": base, "tmerge": tmerge.apply(build(arch, state), MergeConfig.of("tome", r=R.get(arch, 16)))}
    if reference:
        import tome

        ref = build(arch, state)
        tome.patch.timm(ref)
        ref.r = R.get(arch, 16)
        out["reference"] = ref
    return out


def cuda_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def kernel_launches(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
    return sum(e.count for e in prof.key_averages() if e.key in names)


def measure(models: dict, mode: str, precision: str, batch: int, warmup: int, iters: int) -> dict:
    backend = "torch.compile" if mode == "compile" else "torch"
    x = torch.randn(batch, 3, *models["unmerged"].patch_embed.img_size)
    runs, compile_s, launches = {}, {}, {}
    for name, model in models.items():
        start = time.perf_counter()
        runner = runtime.create(backend, model, device="cuda", precision=precision, cuda_graphs=mode != "eager")
        runs[name] = runner.prepare(x)
        runs[name]()  # compiles (torch.compile) on the first call
        compile_s[name] = time.perf_counter() - start
        launches[name] = kernel_launches(runs[name])
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times = {name: [] for name in names}
    for i in range(iters):
        for name in (names if i % 2 == 0 else names[::-1]):
            times[name].append(cuda_ms(runs[name]))
    med = {name: float(np.median(t)) for name, t in times.items()}
    row = {"mode": mode, "precision": precision, "batch": batch, "iters": iters, "median_ms": med,
           "kernel_launches": launches, "ratio": {}, "ratio_ci95": {}}
    if mode == "compile":
        row["compile_s"] = compile_s
    for name in names:
        if name != "unmerged":
            row["ratio"][name] = med[name] / med["unmerged"]
            row["ratio_ci95"][name] = ratio_interval(times[name], times["unmerged"])
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224,vit_large_patch16_224,dinov2-s14")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--precisions", default="fp16,fp32")
    ap.add_argument("--modes", default="eager,graphs,compile")
    ap.add_argument("--reference-dir", default=None, help="checkout of facebookresearch/ToMe (the anchor)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: benchmarks/gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.reference_dir:
        sys.path.insert(0, args.reference_dir)
    rows = []
    header = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "timm": timm.__version__,
              "tmerge": tmerge.__version__, "cuda": torch.version.cuda}
    print(json.dumps(header), flush=True)
    for arch in args.models.split(","):
        models = variants(arch, bool(args.reference_dir))
        for precision in args.precisions.split(","):
            for mode in args.modes.split(","):
                for batch in map(int, args.batches.split(",")):
                    try:
                        row = {"model": arch, "r": R.get(arch, 16),
                               **measure(models, mode, precision, batch, args.warmup, args.iters)}
                    except torch.cuda.OutOfMemoryError:
                        row = {"model": arch, "mode": mode, "precision": precision, "batch": batch, "error": "out of memory"}
                        torch.cuda.empty_cache()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**header, "load_average": os.getloadavg(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
