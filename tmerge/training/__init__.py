"""Distillation training of learned merges: the DTEM embedding and the LTM mask module.

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
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._io import atomic_paths
from ..config import MergeConfig
from ..errors import TmergeError
from ..merging import MergeMethod, available
from ..models import backbone_sha256
from ..models.adapters import save_adapter, training_only_options
from ..models.forward import forward_with_features
from ..patch import apply, merge_info, merge_method, set_schedule, using_merge_form
from ..profiling.drift import output_drift
from ..schedule import ScheduleSpec


def trainable_methods() -> tuple[str, ...]:
    """Registered methods with learned modules (those overriding ``trainable_layers``)."""
    return tuple(name for name, cls in available().items()
                 if cls.trainable_layers is not MergeMethod.trainable_layers)


# ----------------------------------------------------------------------------------------------
# distributed helpers


class Dist:
    """Rank/world of this process; initialised from torchrun's environment variables."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if device in (None, "auto"):
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend)
            self.owns_group = True
        if self.world > 1:
            self.world, self.rank = dist.get_world_size(), dist.get_rank()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def agree(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (so all ranks stop together)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


class _Student(nn.Module):
    """model -> (output, pooled pre-logits features); what DDP wraps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return forward_with_features(self.model, x)


# ----------------------------------------------------------------------------------------------
# losses


def distill_loss(student: Tensor, teacher: Tensor, headless: bool) -> Tensor:
    if headless:
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    return F.kl_div(student.float().log_softmax(-1), teacher.float().log_softmax(-1), log_target=True,
                    reduction="batchmean")


# ----------------------------------------------------------------------------------------------
# training


def _epoch_order(n: int, seed: int, epoch: int, dist: Dist) -> Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    per_rank = max(1, n // dist.world)
    if dist.world > 1:
        perm = perm[: per_rank * dist.world][dist.rank::dist.world] if n >= dist.world else perm[:1]
    return perm


def _batches_per_epoch(n: int, batch_size: int, dist: Dist) -> int:
    return math.ceil(max(1, n // dist.world) / batch_size)


@torch.no_grad()
def _teacher_outputs(teacher: nn.Module, images, batch_size: int, device) -> tuple[Tensor, Tensor]:
    outs, feats = [], []
    for index in torch.arange(len(images)).split(batch_size):
        o, f = forward_with_features(teacher, images[index].to(device))
        outs.append(o.float().cpu())
        feats.append(f.float().cpu())
    return torch.cat(outs), torch.cat(feats)


@torch.no_grad()
def heldout_drift(model: nn.Module, images: Tensor, reference: Tensor, headless: bool, batch_size: int,
                  device) -> dict:
    method = merge_method(model)
    was_training = method.training
    method.eval()
    try:
        merged = torch.cat([forward_with_features(model, images[i].to(device))[0].float().cpu()
                            for i in torch.arange(len(images)).split(batch_size)])
    finally:
        method.train(was_training)
    return output_drift(reference, merged, logits=not headless)


def set_constant_r(model: nn.Module, r: int) -> None:
    """Switch a patched model to a constant-r schedule in place (the method keeps its parameters)."""
    set_schedule(model, ScheduleSpec(r=r))


def _sampled_r(r_range: tuple[int, int], seed: int, step: int) -> int:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * step + 1)
    return int(torch.randint(r_range[0], r_range[1] + 1, (1,), generator=gen))


def _annealed(values: tuple[float, float], step: int, total: int) -> float:
    start, end = float(values[0]), float(values[1])
    t = step / max(1, total - 1)
    return start * (end / start) ** t


@torch.no_grad()
def tome_reference_loss(model: nn.Module, images, t_out: Tensor, r_values: range, headless: bool, n: int,
                        batch_size: int, device) -> dict[int, float]:
    """Distillation loss of the untrained method (ToMe's merge) at each r on the first ``n`` images."""
    merger = merge_method(model)
    was_training = merger.training
    merger.eval()
    index = torch.arange(min(n, len(images)))
    reference = {}
    try:
        for r in r_values:
            set_constant_r(model, r)
            losses = [distill_loss(forward_with_features(model, images[i].to(device))[0], t_out[i].to(device),
                                   headless) * len(i) for i in index.split(batch_size)]
            reference[r] = max(float(sum(losses)) / len(index), 1e-12)
    finally:
        merger.train(was_training)
    return reference


def _fingerprint(info: dict) -> str:
    return json.dumps(info, sort_keys=True, default=str)


def checkpoint_path(out: str | Path) -> Path:
    """Where training on ``out`` keeps its resumable checkpoint (removed once the adapter is written)."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt.pt")


def check_training_options(*, lr: float, ib_weight: float = 0.0, batch_size: int = 1, steps: int | None = None,
                           epochs: int | None = None, eval_every: int = 0, checkpoint_every: int = 0) -> None:
    """One-line errors for training settings that cannot work, before any data or model is loaded."""
    if steps is not None and epochs is not None:
        raise TmergeError("give --steps or --epochs, not both")
    if not (math.isfinite(lr) and lr > 0):
        raise TmergeError(f"--lr must be a finite number > 0, got {lr}")
    if not (math.isfinite(ib_weight) and ib_weight >= 0):
        raise TmergeError(f"--ib-weight must be a finite number >= 0, got {ib_weight}")
    if batch_size < 1:
        raise TmergeError(f"--batch-size must be at least 1, got {batch_size}")
    if (steps is not None and steps < 1) or (epochs is not None and epochs < 1):
        raise TmergeError("--steps/--epochs must be >= 1")
    if eval_every < 0 or checkpoint_every < 0:
        raise TmergeError("--eval-every and --checkpoint-every must be >= 0")


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
    check_training_options(lr=lr, ib_weight=ib_weight, batch_size=batch_size, steps=steps, epochs=epochs,
                           eval_every=eval_every, checkpoint_every=checkpoint_every)
    if len(images) < 1 or (isinstance(images, Tensor) and images.ndim != 4):
        raise TmergeError("training needs at least one image (a (N, 3, H, W) batch)")
    if r_range is not None:
        if merge.schedule is not None:
            raise TmergeError("give r_range or a schedule (r, schedule, keep_ratio), not both")
        r_range = (int(r_range[0]), int(r_range[1]))
        if not 0 < r_range[0] <= r_range[1]:
            raise TmergeError(f"r_range must be 0 < lo <= hi, got {r_range}")
        merge = dataclasses.replace(merge, schedule=ScheduleSpec(r=r_range[1]))
    balance_r = r_range is not None if balance_r is None else bool(balance_r)
    if balance_r and r_range is None:
        raise TmergeError("balance_r needs r_range (it balances the r drawn per step)")
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
        apply(model, merge)
        merge_ops.enter_context(using_merge_form(model, merge_form))
        merger = merge_method(model)
        anneal = {k: (float(v[0]), float(v[1])) for k, v in (anneal or {}).items()}
        not_training = sorted(set(anneal) - training_only_options(merger))
        if not_training:
            raise TmergeError(f"only training-only options of {method} can be annealed "
                              f"({', '.join(sorted(training_only_options(merger))) or 'none'}); got {', '.join(not_training)}")
        if any(not (v > 0 and math.isfinite(v)) for pair in anneal.values() for v in pair):
            raise TmergeError(f"annealed option values must be finite and > 0, got {anneal}")
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
        per_epoch = _batches_per_epoch(n, batch_size, dist)
        total = steps if steps is not None else per_epoch * (epochs or 1)

        if teacher_outputs is not None:
            t_out, t_feat = (t.float().cpu() for t in teacher_outputs)
            if len(t_out) != n:
                raise TmergeError(f"teacher_outputs cover {len(t_out)} images, the training set has {n}")
        else:
            t_out, t_feat = _teacher_outputs(teacher, images, batch_size, dist.device)
        h_out = None
        if heldout is not None and len(heldout) and dist.main:
            h_out, _ = _teacher_outputs(teacher, heldout, batch_size, dist.device)
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
            try:
                state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            except Exception as e:  # truncated or not a checkpoint: torch raises many kinds
                raise TmergeError(f"checkpoint {ckpt_path} cannot be read ({type(e).__name__}); "
                                  "remove it or drop --resume") from e
            if not isinstance(state, dict) or state.get("identity") != _fingerprint(identity):
                raise TmergeError(
                    f"checkpoint {ckpt_path} belongs to a different run (method, schedule, model, data size, "
                    "batch size, lr, seed or world size differ); remove it or drop --resume"
                )
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

        def save_checkpoint() -> None:
            if not dist.main:
                return
            with atomic_paths([ckpt_path], mkdir=True) as (tmp,):
                torch.save({"identity": _fingerprint(identity), "step": step, "method": merger.state_dict(),
                            "optimizer": optimizer.state_dict(), "history": history, "drift": drift_history}, tmp)

        def measure() -> dict | None:
            if h_out is None:
                return None
            if r_range is not None:
                set_constant_r(model, r_range[1])
            d = heldout_drift(model, heldout, h_out, headless, batch_size, dist.device)
            drift_history.append({"step": step, **d})
            return d

        bar = _Progress(progress and dist.main, total, step)
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
                    order, order_epoch = _epoch_order(n, seed, epoch, dist), epoch
                idx = order[index * batch_size:(index + 1) * batch_size]
                if len(idx) == 0:  # tiny shards: wrap around
                    idx = order[:batch_size]
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                for name, values in anneal.items():
                    merger.config[name] = _annealed(values, step, total)
                step_r = None
                if r_range is not None:
                    step_r = _sampled_r(r_range, seed, step)
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
                    save_checkpoint()
                if on_step is not None:
                    on_step(step, value)
            if r_range is not None:
                set_constant_r(model, r_range[1])
            final_drift = measure() if dist.main else None
            bar.set_drift(final_drift)
        finally:
            bar.close()
        save_checkpoint()

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


class _Progress:
    """A rich progress bar on stderr with the running loss and the latest held-out drift."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.enabled = enabled
        self.progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("training"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("held-out drift {task.fields[drift]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(file=sys.stderr),
        )
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-", drift="-")
        self.progress.start()
        self.ema: float | None = None

    def advance(self, loss: float) -> None:
        if self.progress is None:
            return
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        self.progress.update(self.task, advance=1, loss=f"{self.ema:.4g}")

    def set_drift(self, drift: dict | None) -> None:
        if self.progress is None or drift is None:
            return
        self.progress.update(self.task, drift=f"{drift['cosine_distance_mean']:.4g} (cos dist)")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
