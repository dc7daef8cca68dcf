"""Train the DTEM and LTM adapters shipped for the embedded default model (DINOv2 ViT-S/14).

Reproducible bit for bit from ``--seed`` on a CPU with the same thread count (default 2): the
training images, their order, the r drawn at every step and the initialisations are functions of the
seed; the adapter files hold no wall-clock values; the merges use the summing form ("scatter":
``index_add`` in eager PyTorch). ``--check`` compares the sha256 of the files it wrote with the
shipped ones (tmerge/models/adapters/). Where a run cut short by ``--max-minutes`` stops depends on
the machine's speed (the learning-rate and temperature schedules follow the planned ``--steps``);
``--stop-after N`` stops at step N deterministically and so reproduces such a run. The shipped
adapters are this script's defaults (two crops per photo, the full planned 120 steps: about 4 minutes of
training per method on 2 cores after a 1-minute feature cache).

Training data: the *train* split of the photo corpus (``python -m tmerge.data.corpus build``; the
evaluation photos, benchmarks/heldout_drift.py, come from a package that training never reads),
``--views`` random crops per photo. One pass of the unmerged model gives the distillation targets
of both trainings (cached); each method then trains for ``--steps`` steps with r drawn uniformly from
``--r-min``..``--r-max`` per step and each step's loss divided by ToMe's at that r (so small r count as
much as large r); one adapter serves that whole range. DTEM trains through the paper's soft relaxation
(``relaxed=1``) with its temperature tau2 annealed from ``--tau2-start`` to ``--tau2-end``, unless
``--dtem-straight-through``.

Run:  python benchmarks/train_default_adapters.py                  # writes the shipped adapters
      python benchmarks/train_default_adapters.py --out /tmp/a --check   # reproduce and compare
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from tmerge import MergeConfig
from tmerge.data.corpus import corpus_entries, corpus_views
from tmerge.models import load_model
from tmerge.models.adapters import SHIPPED_DIR, shipped_adapter_name
from tmerge.training import teacher_outputs, train_adapter

import torch


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--views", type=int, default=2, help="random crops per training photo")
    ap.add_argument("--r-min", type=int, default=4)
    ap.add_argument("--r-max", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--lr-dtem", type=float, default=1e-3)
    ap.add_argument("--lr-ltm", type=float, default=1e-2)
    ap.add_argument("--tau2-start", type=float, default=1.0)
    ap.add_argument("--tau2-end", type=float, default=0.01)
    ap.add_argument("--dtem-straight-through", action="store_true")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop each training after this long")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop each training after this many of the --steps (reproduces a --max-minutes run)")
    ap.add_argument("--methods", nargs="+", default=["dtem", "ltm"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(SHIPPED_DIR), help="folder for the adapters")
    ap.add_argument("--summary", default="benchmarks/results/default_adapters.json")
    ap.add_argument("--check", action="store_true", help="compare the sha256 with the shipped adapters")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load = [os.getloadavg()[0]]

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    base = load_model(None)
    entries = corpus_entries("train")
    images = corpus_views(entries, base, views_per_photo=args.views, seed=args.seed)
    sources = sorted({e["source"] for e in entries})
    log(f"{len(images)} training views of {len(entries)} photos from {len(sources)} sources")
    teacher = teacher_outputs(base.eval(), images, 16, "cpu")
    log("teacher outputs cached")
    data = {"corpus_split": "train", "sources": sources, "photos": len(entries), "views": len(images),
            "photos_sha256": hashlib.sha256("".join(e["sha256"] for e in entries).encode()).hexdigest(),
            "seed": args.seed}
    lrs = {"dtem": args.lr_dtem, "ltm": args.lr_ltm}
    options = {"dtem": {} if args.dtem_straight_through else {"relaxed": 1}, "ltm": {}}
    extra = {"dtem": {} if args.dtem_straight_through else {"anneal": {"tau2": (args.tau2_start, args.tau2_end)}},
             "ltm": {}}
    report = {"args": vars(args), "adapters": {}}
    out_dir = Path(args.out)
    for method in args.methods:
        started = time.perf_counter()
        out = out_dir / shipped_adapter_name(method)
        model = load_model(None)
        summary = train_adapter(
            model, MergeConfig(method, options=options[method]), images=images, teacher_outputs=teacher, out=out,
            r_range=(args.r_min, args.r_max), steps=args.steps, batch_size=args.batch_size,
            lr=lrs[method], seed=args.seed, checkpoint_every=0, progress=False, eval_every=0,
            model_name="dinov2-s14", data_summary=data, merge_form="scatter",
            max_seconds=None if args.max_minutes is None else 60 * args.max_minutes, stop_after=args.stop_after,
            **extra[method],
        )
        seconds = time.perf_counter() - started
        out.with_name(out.name + ".ckpt.pt").unlink(missing_ok=True)  # the trainer's resume point
        load.append(os.getloadavg()[0])
        digest = sha256(out)
        entry = {"file": str(out), "sha256": digest, "steps": summary["steps"], "train_seconds": round(seconds, 1),
                 "initial_loss": summary["initial_loss"], "final_loss": summary["final_loss"],
                 "stopped_early": summary["stopped_early"], "tome_reference_loss": summary["tome_reference_loss"]}
        if args.check:
            shipped = SHIPPED_DIR / shipped_adapter_name(method)
            entry["identical_to_shipped"] = shipped.is_file() and sha256(shipped) == digest
        report["adapters"][method] = entry
        log(json.dumps(entry))
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    report["load_average_1min"] = load
    report["threads"] = torch.get_num_threads()
    log(f"done in {report['total_seconds']} s (1-min load average at start/after each: {load})")
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(report, indent=2) + "\n")
    if args.check and not all(e["identical_to_shipped"] for e in report["adapters"].values()):
        log("MISMATCH: the reproduced adapters differ from the shipped ones")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
