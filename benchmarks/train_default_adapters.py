"""Train the DTEM and LTM adapters shipped for the embedded default model (DINOv2 ViT-S/14).

Reproducible bit for bit from ``--seed`` on a CPU with the same thread count (default 2): the
training images, their order, the r drawn at every step and the initialisations are functions of the
seed; the adapter files hold no wall-clock values; the merges use the summing form ("scatter":
``index_add`` in eager PyTorch), the one the shipped adapters were trained with. ``--check`` compares the sha256 of the files it
wrote with the shipped ones (tmerge/models/adapters/).

Training data (none of it is used by the held-out evaluation, benchmarks/learned_methods.py):

* Fashion-MNIST *train* images: the last ``--fmnist`` of a seed-0 permutation of the 60k (the probe
  of the evaluation is fit on the first ones);
* random crops of scikit-image pictures: the 5 training colour photos (astronaut, chelsea, coffee,
  rocket, hubble_deep_field) and 12 more bundled pictures (``tmerge.data.EXTRA_PHOTOS``); the 3
  held-out photos (immunohistochemistry, retina, stereo_motorcycle) are never used.

One pass of the unmerged model gives the distillation targets of both trainings (cached); each
method then trains for one epoch with r drawn uniformly from ``--r-min``..``--r-max`` per step, so
one adapter serves that whole range.

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

from tmerge.data import EXTRA_PHOTOS, fashion_mnist, model_transform, sample_views
from tmerge.models import load_model
from tmerge.models.adapters import SHIPPED_DIR, shipped_adapter_name
from tmerge.training import _teacher_outputs, train_adapter

import numpy as np
import torch

TRAIN_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")
HELDOUT_PHOTOS = ("immunohistochemistry", "retina", "stereo_motorcycle")


def fmnist_images(model, indices):
    from PIL import Image

    pixels, _labels = fashion_mnist("train")
    transform = model_transform(model)
    return torch.stack([transform(Image.fromarray(pixels[i])) for i in indices])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fmnist", type=int, default=80, help="Fashion-MNIST train images")
    ap.add_argument("--photos", type=int, default=80, help="random crops of the training pictures")
    ap.add_argument("--r-min", type=int, default=4)
    ap.add_argument("--r-max", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr-dtem", type=float, default=1e-3)
    ap.add_argument("--lr-ltm", type=float, default=1e-2)
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
    perm = np.random.default_rng(0).permutation(60000)
    fm_idx = np.sort(perm[len(perm) - args.fmnist:]) if args.fmnist else np.array([], dtype=int)
    parts = [sample_views(args.photos, base, seed=args.seed, photos=(*TRAIN_PHOTOS, *EXTRA_PHOTOS))]
    if args.fmnist:
        parts.append(fmnist_images(base, fm_idx))
    images = torch.cat(parts)
    log(f"{len(images)} training images ({args.photos} picture crops, {args.fmnist} Fashion-MNIST train)")
    teacher = _teacher_outputs(base.eval(), images, 16, "cpu")
    log("teacher outputs cached")
    data = {"pictures": [*TRAIN_PHOTOS, *EXTRA_PHOTOS], "picture_crops": args.photos,
            "fashion_mnist_train": args.fmnist, "seed": args.seed}
    lrs = {"dtem": args.lr_dtem, "ltm": args.lr_ltm}
    report = {"args": vars(args), "adapters": {}}
    out_dir = Path(args.out)
    for method in args.methods:
        started = time.perf_counter()
        out = out_dir / shipped_adapter_name(method)
        model = load_model(None)
        summary = train_adapter(
            model, method, images=images, teacher_outputs=teacher, out=out,
            r_range=(args.r_min, args.r_max), epochs=args.epochs, batch_size=args.batch_size,
            lr=lrs[method], seed=args.seed, checkpoint_every=0, progress=False, eval_every=0,
            model_name="dinov2-s14", data_summary=data, merge_form="scatter",
        )
        seconds = time.perf_counter() - started
        out.with_name(out.name + ".ckpt.pt").unlink(missing_ok=True)  # the trainer's resume point
        load.append(os.getloadavg()[0])
        digest = sha256(out)
        entry = {"file": str(out), "sha256": digest, "steps": summary["steps"], "train_seconds": round(seconds, 1),
                 "initial_loss": summary["initial_loss"], "final_loss": summary["final_loss"]}
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
