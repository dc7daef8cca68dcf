"""`tmerge train`: learn a DTEM embedding or an LTM mask by distillation; writes an adapter."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import torch
import typer

from ..._io import writable_file
from ...config import MergeConfig
from ...data import load_images
from ...errors import TmergeError
from ...models.spec import ModelSpec
from ...training import check_training_options, checkpoint_path, train_adapter, trainable_methods
from ..app import app, print_json
from ..options import DataOpt, JsonOpt, NumImagesOpt, merge_options, model_options
from ..render import RichProgress


@app.command("train")
@merge_options(adapter=False, method=("dtem", "learned method to train: dtem or ltm"))
@model_options(pretrained=False)
def train_command(
    merge: MergeConfig,
    model: ModelSpec,
    r_range: Annotated[Optional[str], typer.Option("--r-range", help="LO:HI: draw a constant r from LO..HI every step, so one adapter serves that range (instead of --r/--schedule)")] = None,
    data: DataOpt = "samples",
    num_images: NumImagesOpt = None,
    heldout: Annotated[int, typer.Option("--heldout", help="images held out (from the same source unless --heldout-data) for the periodic drift; 0 = none")] = 32,
    heldout_data: Annotated[Optional[str], typer.Option("--heldout-data", help="a separate source for the held-out images")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="passes over the training images (default 1)")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="optimiser steps (instead of --epochs)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="images per step (per process under torchrun)")] = 16,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate (cosine decay to 0)")] = 1e-2,
    ib_weight: Annotated[float, typer.Option("--ib-weight", help="LTM: weight of the information-bottleneck cluster term")] = 0.1,
    seed: Annotated[int, typer.Option("--seed", help="seed of the data choice and order: the same seed, the same adapter")] = 0,
    eval_every: Annotated[int, typer.Option("--eval-every", help="held-out drift every N steps (0: only at start and end)")] = 25,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="write <out>.ckpt.pt every N steps")] = 50,
    resume: Annotated[bool, typer.Option("--resume", help="continue from <out>.ckpt.pt")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N")] = "auto",
    out: Annotated[str, typer.Option("--out", "-O", help="adapter file to write (.safetensors)")] = "adapter.safetensors",
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bar")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a DTEM embedding or an LTM mask (backbone frozen) to follow the unmerged model.

    Loss: KL to the unmerged model's logits, or 1 - cosine to its features for headless backbones
    (LTM adds the information-bottleneck cluster term). Load the result with --adapter in
    export / profile / sweep, with the same --method and schedule.
    """
    method = merge.method
    if method not in trainable_methods():
        raise TmergeError(f"only learned methods can be trained ({', '.join(trainable_methods())}); got {method!r}")
    writable_file(out, "--out", (".safetensors",))
    if heldout < 0:
        raise TmergeError("--heldout must be >= 0")
    if num_images is not None and num_images < 1:
        raise TmergeError(f"--num-images must be at least 1, got {num_images}")
    check_training_options(lr=lr, ib_weight=ib_weight, batch_size=batch_size, steps=steps, epochs=epochs,
                           eval_every=eval_every, checkpoint_every=checkpoint_every)
    if resume and not checkpoint_path(out).is_file():
        raise TmergeError(f"--resume: there is no checkpoint {checkpoint_path(out)} to continue from")
    r_bounds = None
    if r_range is not None:
        lo, sep, hi = r_range.partition(":")
        try:
            r_bounds = (int(lo), int(hi)) if sep else None
        except ValueError:
            r_bounds = None
        if r_bounds is None:
            raise TmergeError(f"--r-range takes LO:HI (e.g. 4:16), got {r_range!r}")
    net = model.load()
    n_train = num_images if num_images is not None else (256 if data == "samples" else None)
    if n_train is not None:
        _check_batch_size(batch_size, n_train)
    with RichProgress(enabled=not as_json) as bars:
        if heldout_data is None and heldout:
            want = None if n_train is None else n_train + heldout
            images, _labels, _names = load_images(data, net, n=want, seed=seed,
                                                  progress=bars.lazy_step("preparing images"))
            if images.shape[0] <= heldout:
                raise TmergeError(f"{data} gave {images.shape[0]} images: not enough for {heldout} held-out ones "
                                  "(lower --heldout or give --heldout-data)")
            order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
            held, images = images[order[:heldout]], images[order[heldout:].sort().values]
        else:
            images, _labels, _names = load_images(data, net, n=n_train, seed=seed,
                                                  progress=bars.lazy_step("preparing images"))
            held = load_images(heldout_data, net, n=heldout, seed=seed + 1,
                               progress=bars.lazy_step("preparing held-out images")).images if heldout else None
    _check_batch_size(batch_size, int(images.shape[0]))
    data_summary = {"source": data, "n_images": int(images.shape[0]), "seed": seed,
                    "heldout": heldout_data or (f"{heldout} images of {data}" if heldout else None)}
    summary = train_adapter(
        net, merge, images=images, heldout=held, out=out, r_range=r_bounds,
        steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, ib_weight=ib_weight,
        eval_every=eval_every, checkpoint_every=checkpoint_every, resume=resume, progress=not no_progress,
        model_name=model.label, data_summary=data_summary, device=device,
    )
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    if as_json:
        print_json({k: v for k, v in summary.items() if k != "loss_history"})
        return
    from rich.console import Console

    console = Console()
    drift0 = (summary.get("heldout_drift_at_init") or {}).get("cosine_distance_mean")
    drift1 = (summary.get("heldout_drift") or {}).get("cosine_distance_mean")
    console.print(f"trained {method} for {summary['steps']} steps ({summary['epochs']} epochs, "
                  f"{summary['train_seconds']} s): loss {summary['initial_loss']:.4g} -> {summary['final_loss']:.4g}")
    if drift0 is not None:
        console.print(f"held-out drift (cosine distance): {drift0:.4g} untrained -> {drift1:.4g} trained")
    console.print(f"adapter: {out} (load with --method {method} --adapter {out})")


def _check_batch_size(batch_size: int, n_images: int) -> None:
    if batch_size > n_images:
        raise TmergeError(f"--batch-size {batch_size} is larger than the {n_images} training images")
