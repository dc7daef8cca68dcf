"""The training loop: distillation training of learned merges: the DTEM embedding and the LTM mask module.

Label-free: the teacher is the unmerged model on the same images; only the merge method's
parameters learn (the backbone is frozen and stays in eval mode; the method runs in training mode,
which for DTEM selects its continuous relaxation). Loss:

* classifiers: KL(teacher softmax || student softmax) of the logits ("batchmean");
* headless backbones (``num_classes == 0``): 1 - cosine(student features, teacher features);
* plus the method's own ``extra_loss`` (LTM: ``ib_weight`` x its information-bottleneck cluster term).

The trainer knows nothing about a method beyond its training hooks (:class:`tmerge.merging.MergeMethod`):
``trainable_layers`` (the learned module of each block), ``prepare_training`` / ``extra_loss`` and
``plan`` in training mode (a relaxed merge where the method needs one, as DTEM's).

``r_range=(lo, hi)`` trains one adapter for a range of constant r: every step draws r uniformly from
lo..hi (a function of seed and step only), so the adapter serves any r in the range. Merging more
tokens costs more drift, so a plain sum of losses lets the large r decide every gradient; with
``balance_r=True`` (default with ``r_range``) each step's distillation loss is divided by the loss of
the untrained method (= ToMe) at that step's r, measured once before training on a fixed subset of the
images: every r then weighs by how much it improves on ToMe, which is what the adapter is judged by.

``anneal={"tau2": (1.0, 0.01)}`` sets a method option (one of its training-only ones, such as
DTEM's relaxation temperatures) from the training loop: geometric from the first value at step 0 to
the second at the last step, so a soft relaxation is annealed towards the hard merge it stands for.
Training-only options (their help starts with "training:") are not part of the adapter's identity:
the adapter records them under ``training_options`` and loads with any value of them. The teacher's
outputs are computed once per image and reused in every epoch. ``images`` is a tensor (N, 3, H, W)
or any object with ``len()`` whose ``[index_tensor]`` returns such a batch (images decoded lazily).

Optimiser AdamW (no weight decay), cosine learning-rate decay to 0 over the run. The data order is a
function of (seed, epoch) only and the step counter, so a run resumed from its checkpoint
(``resume=True``) continues exactly as the uninterrupted run, and the same seed gives the same adapter.

Distributed: when launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group
is initialised (NCCL on CUDA, gloo on CPU), the student is wrapped in DistributedDataParallel and
each process takes every ``world``-th image of the epoch's permutation; ``batch_size`` is per process.
Rank 0 shows progress, measures held-out drift and writes checkpoints and the adapter.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..config import MergeConfig
from ..errors import TmergeError
from ..metrics import merged_drift
from ..models import backbone_sha256
from ..models.adapters import save_adapter, training_only_options
from ..models.forward import forward_with_features
from ..patch import merge_info, merge_method, patch_model, using_merge_form
from ..schedule import ScheduleSpec
from . import targets
from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .distributed import Dist
from .options import check_training_options, trainable_methods
from .progress import TrainingProgress
from .steps import annealed, batches_per_epoch, cosine_lr, epoch_order, sampled_r, set_constant_r
from .targets import distill_loss, tome_reference_loss


class _Student(nn.Module):
    """model -> (output, pooled pre-logits features); what DDP wraps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return forward_with_features(self.model, x)


def train_adapter(
    model: nn.Module,
    merge: MergeConfig,
    *,
    images: Tensor,
    out: str | Path,
    heldout: Tensor | None = None,
    r_range: tuple[int, int] | None = None,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    ib_weight: float = 0.1,
    eval_every: int = 25,
    checkpoint_every: int = 50,
    resume: bool = False,
    progress: bool = True,
    model_name: str | None = None,
    data_summary: dict | None = None,
    device: str | None = None,
    max_seconds: float | None = None,
    stop_after: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    teacher_outputs: tuple[Tensor, Tensor] | None = None,
    merge_form: str | None = None,
    balance_r: bool | None = None,
    anneal: dict[str, tuple[float, float]] | None = None,
    balance_images: int = 16,
) -> dict:
    """Train ``merge.method`` (dtem | ltm; its schedule, proportional attention and options as
    ``merge`` says) on ``model`` (UNMERGED, any timm ViT tmerge supports) by distillation from the
    unmerged model; write the adapter to ``out``; return a summary dict. Training starts from the
    untrained method: ``merge.adapter`` is not loaded (an adapter file there is an error).

    ``model`` is patched in place (it ends merged, method in eval mode, trained parameters loaded).
    Give ``steps`` or ``epochs`` (default 1 epoch); ``r_range=(lo, hi)`` instead of a schedule in
    ``merge`` samples a constant r per step (the model ends with r = hi). A checkpoint ``<out>.ckpt.pt`` is written every
    ``checkpoint_every`` steps and at the end; ``resume=True`` continues from it. ``max_seconds``
    stops early once the training loop has run that long (the summary says so; not deterministic);
    ``stop_after`` stops after that many steps of the planned ``steps`` (deterministic: it reproduces a
    run that ``max_seconds`` stopped there).
    ``teacher_outputs`` (outputs, pooled features) of the unmerged model on ``images``, when already
    computed (e.g. shared by several trainings on the same images), skip that pass. ``merge_form``
    (default: the eager default, "gather") fixes the merge ops while training, hence the float
    rounding of a reproduction.
    ``balance_r`` (default: on with ``r_range``) divides each step's loss by ToMe's at that r (on the
    first ``balance_images`` images); ``anneal`` sets training-only method options per step (module docstring).
    """
    method = merge.method
    if method not in trainable_methods():
        raise TmergeError(f"only learned methods can be trained ({', '.join(trainable_methods())}); got {method!r}")
    if merge.adapter_path is not None:
        raise TmergeError(f"training starts from the untrained {method}: drop the adapter {merge.adapter_path}")
    if r_range is not None:
        r_range = (int(r_range[0]), int(r_range[1]))
    anneal = {k: (float(v[0]), float(v[1])) for k, v in (anneal or {}).items()}
    check_training_options(lr=lr, ib_weight=ib_weight, batch_size=batch_size, steps=steps, epochs=epochs,
                           eval_every=eval_every, checkpoint_every=checkpoint_every, r_range=r_range,
                           balance_r=balance_r, anneal=anneal, stop_after=stop_after, max_seconds=max_seconds)
    if len(images) < 1 or (isinstance(images, Tensor) and images.ndim != 4):
        raise TmergeError("training needs at least one image (a (N, 3, H, W) batch)")
    if r_range is not None:
        if merge.schedule is not None:
            raise TmergeError("give r_range or a schedule (r, schedule, keep_ratio), not both")
        merge = dataclasses.replace(merge, schedule=ScheduleSpec(r=r_range[1]))
    balance_r = r_range is not None if balance_r is None else bool(balance_r)
    out = Path(out)
    ckpt_path = checkpoint_path(out)
    if resume and not ckpt_path.is_file():
        raise TmergeError(f"--resume: there is no checkpoint {ckpt_path} to continue from")
    dist = Dist(device)
    started = time.perf_counter()
    merge_ops = contextlib.ExitStack()  # the merge form, from the patch to the end
    try:
        torch.manual_seed(seed)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        model.to(dist.device)
        teacher = copy.deepcopy(model).eval()
        weights_sha = backbone_sha256(model)
        patch_model(model, merge)
        merge_ops.enter_context(using_merge_form(model, merge_form))
        merger = merge_method(model)
        not_training = sorted(set(anneal) - training_only_options(merger))
        if not_training:
            raise TmergeError(f"only training-only options of {method} can be annealed "
                              f"({', '.join(sorted(training_only_options(merger))) or 'none'}); got {', '.join(not_training)}")
        model.eval()
        merger.train()
        info = merge_info(model)
        if not any(info["r"]):
            raise TmergeError("the schedule merges no tokens: nothing to train (give --r or --schedule)")
        for layer_module, r_l in zip(merger.trainable_layers(), info["r"]):
            layer_module.requires_grad_(r_l > 0)
        params = [p for p in merger.parameters() if p.requires_grad]
        if not params:
            raise TmergeError(f"method {method} has no trainable parameters")
        headless = getattr(model, "num_classes", 0) == 0

        n = len(images)
        per_epoch = batches_per_epoch(n, batch_size, dist)
        total = steps if steps is not None else per_epoch * (epochs or 1)

        if teacher_outputs is not None:
            t_out, t_feat = (t.float().cpu() for t in teacher_outputs)
            if len(t_out) != n:
                raise TmergeError(f"teacher_outputs cover {len(t_out)} images, the training set has {n}")
        else:
            t_out, t_feat = targets.teacher_outputs(teacher, images, batch_size, dist.device)
        h_out = None
        if heldout is not None and len(heldout) and dist.main:
            h_out, _ = targets.teacher_outputs(teacher, heldout, batch_size, dist.device)
        del teacher
        merger.prepare_training(t_out, t_feat, headless=headless, seed=seed, extra_loss_weight=ib_weight)
        reference = None
        if balance_r:
            reference = tome_reference_loss(model, images, t_out, range(r_range[0], r_range[1] + 1), headless,
                                            balance_images, batch_size, dist.device)
        configured = dict(merger.config)

        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        identity = {
            "method": method, "options": info["options"], "r": info["r"], "r_range": r_range,
            "prop_attn": info["prop_attn"],
            "weights_sha256": weights_sha, "n_images": n, "batch_size": batch_size, "lr": lr, "seed": seed,
            "ib_weight": ib_weight, "world": dist.world, "balance_r": balance_r, "anneal": anneal,
        }
        step, history, drift_history = 0, [], []
        if resume:
            state = load_checkpoint(ckpt_path, identity)
            merger.load_state_dict(state["method"])
            optimizer.load_state_dict(state["optimizer"])
            step, history, drift_history = state["step"], state["history"], state["drift"]
            if step >= total:
                raise TmergeError(f"checkpoint {ckpt_path} is already at step {step} >= {total}; ask for more steps")

        student = _Student(model)
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            device_ids = [dist.device.index] if dist.device.type == "cuda" else None
            student = DDP(student, device_ids=device_ids, broadcast_buffers=False)

        def checkpoint() -> None:
            if dist.main:
                save_checkpoint(ckpt_path, identity, step=step, method=merger.state_dict(),
                                optimizer=optimizer.state_dict(), history=history, drift=drift_history)

        def measure() -> dict | None:
            if h_out is None:
                return None
            if r_range is not None:
                set_constant_r(model, r_range[1])
            d = merged_drift(model, heldout, h_out, logits=not headless, batch_size=batch_size, device=dist.device)
            drift_history.append({"step": step, **d})
            return d

        bar = TrainingProgress(progress and dist.main, total, step)
        try:
            if dist.main and h_out is not None and not drift_history:
                bar.set_drift(measure())
            order_epoch, order = -1, None
            loop_start = time.perf_counter()
            stopped_early = False
            while step < total:
                if stop_after is not None and step >= stop_after:
                    stopped_early = True
                    break
                if max_seconds is not None and dist.agree(time.perf_counter() - loop_start > max_seconds):
                    stopped_early = True
                    break
                epoch, index = divmod(step, per_epoch)
                if epoch != order_epoch:
                    order, order_epoch = epoch_order(n, seed, epoch, dist), epoch
                idx = order[index * batch_size:(index + 1) * batch_size]
                if len(idx) == 0:  # tiny shards: wrap around
                    idx = order[:batch_size]
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(lr, step, total)
                for name, values in anneal.items():
                    merger.config[name] = annealed(values, step, total)
                step_r = None
                if r_range is not None:
                    step_r = sampled_r(r_range, seed, step)
                    set_constant_r(model, step_r)
                x = images[idx].to(dist.device)
                s_out, s_feat = student(x)
                loss = distill_loss(s_out, t_out[idx].to(dist.device), headless)
                if reference is not None:
                    loss = loss / reference[step_r]
                extra = merger.extra_loss(s_feat, idx)
                if extra is not None:
                    loss = loss + extra
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TmergeError(f"training diverged at step {step} (loss {value}); lower --lr")
                history.append(value)
                bar.advance(value)
                if dist.main and eval_every and step % eval_every == 0 and step < total:
                    bar.set_drift(measure())
                if checkpoint_every and step % checkpoint_every == 0:
                    checkpoint()
                if on_step is not None:
                    on_step(step, value)
            if r_range is not None:
                set_constant_r(model, r_range[1])
            final_drift = measure() if dist.main else None
            bar.set_drift(final_drift)
        finally:
            bar.close()
        checkpoint()

        merger.config.update(configured)  # annealed options back to their configured values
        training_options = {k: merger.config[k] for k in sorted(training_only_options(merger))}
        merger.eval()
        window = history[-min(len(history), max(1, per_epoch)):]
        summary = {
            "method": method,
            "model": model_name,
            "steps": step,
            "planned_steps": total,
            "stopped_early": stopped_early,
            "epochs": round(step / per_epoch, 3),
            "batch_size": batch_size,
            "world_size": dist.world,
            "lr": lr,
            "seed": seed,
            "ib_weight": ib_weight,
            "r_range": list(r_range) if r_range is not None else None,
            "balance_r": balance_r,
            "tome_reference_loss": {str(k): v for k, v in reference.items()} if reference else None,
            "anneal": {k: list(v) for k, v in anneal.items()} or None,
            "training_options": training_options,
            "loss": "kl_logits" if not headless else "cosine_features",
            "initial_loss": history[0] if history else None,
            "final_loss": sum(window) / len(window) if window else None,
            "heldout_drift": final_drift,
            "heldout_drift_at_init": drift_history[0] if drift_history else None,
            "data": data_summary or {"n_images": n},
            "train_seconds": round(time.perf_counter() - started, 1),
            "adapter": str(out),
        }
        if dist.main:  # wall-clock and path stay out of the file: the same seed gives the same bytes
            saved = {k: v for k, v in summary.items() if k not in ("train_seconds", "adapter")}
            save_adapter(model, out, saved, weights_sha256=weights_sha)
            ckpt_path.unlink(missing_ok=True)  # the adapter holds the result; the checkpoint was only for resuming
        dist.barrier()
        summary["loss_history"] = history
        summary["drift_history"] = drift_history
        return summary
    finally:
        merge_ops.close()
        dist.close()
