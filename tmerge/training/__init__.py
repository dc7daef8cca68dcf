"""Distillation training of learned merges: the DTEM embedding and the LTM mask module.

Label-free: the teacher is the unmerged model on the same images; only the merge method's
parameters learn (the backbone is frozen and stays in eval mode; the method runs in training mode,
which for DTEM selects its continuous relaxation). Loss:

* classifiers: KL(teacher softmax || student softmax) of the logits ("batchmean");
* headless backbones (``num_classes == 0``): 1 - cosine(student features, teacher features);
* LTM adds ``ib_weight`` x the information-bottleneck cluster term (see :mod:`tmerge.merging.methods.ltm`).

Optimiser AdamW (no weight decay), cosine learning-rate decay to 0 over the run. The data order is a
function of (seed, epoch) only and the step counter, so a run resumed from its checkpoint
(``resume=True``) continues exactly as the uninterrupted run, and the same seed gives the same adapter.

Distributed: when launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group
is initialised (NCCL on CUDA, gloo on CPU), the student is wrapped in DistributedDataParallel and
each process takes every ``world``-th image of the epoch's permutation; ``batch_size`` is per process.
Rank 0 shows progress, measures held-out drift and writes checkpoints and the adapter.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._io import atomic_paths
from ..errors import TmergeError
from ..models import backbone_sha256
from ..models.adapters import save_adapter
from ..models.forward import forward_with_features
from ..patch import apply, merge_info
from ..profiling.drift import output_drift

TRAINABLE_METHODS = ("dtem", "ltm")
IB_CLUSTERS = 16
IB_TEMPERATURE = 0.1


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


def kmeans(features: Tensor, k: int, seed: int = 0, iters: int = 25) -> Tensor:
    """Plain Lloyd k-means (k-means++ init, seeded) on L2-normalised features; returns (k, D)."""
    x = F.normalize(features.float(), dim=-1)
    k = min(k, x.shape[0])
    gen = torch.Generator().manual_seed(seed)
    centroids = [x[torch.randint(x.shape[0], (1,), generator=gen)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centroids)).pow(2).min(1).values
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        centroids.append(x[torch.multinomial(probs, 1, generator=gen)].squeeze(0))
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(0)
    return c


def cluster_assign(features: Tensor, centroids: Tensor, temperature: float = IB_TEMPERATURE) -> Tensor:
    """phi(f) = softmax(-||f_hat - c_k||^2 / t) (N, K) on L2-normalised features."""
    d2 = torch.cdist(F.normalize(features.float(), dim=-1), centroids).pow(2)
    return torch.softmax(-d2 / temperature, dim=-1)


def ib_loss(features: Tensor, labels: Tensor, centroids: Tensor, num_labels: int) -> Tensor:
    """Cluster-level cross-entropy: -mean_i sum_k phi_ik log Q[k, y_i], Q[:, y] = mean phi over label y."""
    phi = cluster_assign(features, centroids)  # (B, K)
    onehot = F.one_hot(labels, num_labels).to(phi.dtype)  # (B, L)
    q = (phi.T @ onehot) / onehot.sum(0).clamp_min(1)  # (K, L)
    return -(phi * torch.log(q[:, labels].T + 1e-8)).sum(-1).mean()


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
def _teacher_outputs(teacher: nn.Module, images: Tensor, batch_size: int, device) -> tuple[Tensor, Tensor]:
    outs, feats = [], []
    for batch in images.split(batch_size):
        o, f = forward_with_features(teacher, batch.to(device))
        outs.append(o.float().cpu())
        feats.append(f.float().cpu())
    return torch.cat(outs), torch.cat(feats)


@torch.no_grad()
def heldout_drift(model: nn.Module, images: Tensor, reference: Tensor, headless: bool, batch_size: int,
                  device) -> dict:
    method = model.tmerge_method
    was_training = method.training
    method.eval()
    try:
        merged = torch.cat([forward_with_features(model, b.to(device))[0].float().cpu()
                            for b in images.split(batch_size)])
    finally:
        method.train(was_training)
    return output_drift(reference, merged, logits=not headless)


def _layer_modules(method: nn.Module) -> nn.ModuleList | None:
    for attr in ("embed", "masks"):
        mods = getattr(method, attr, None)
        if isinstance(mods, nn.ModuleList):
            return mods
    return None


def _fingerprint(info: dict) -> str:
    return json.dumps(info, sort_keys=True, default=str)


def train_adapter(
    model: nn.Module,
    method: str,
    *,
    images: Tensor,
    out: str | Path,
    heldout: Tensor | None = None,
    r: Any = None,
    schedule: Any = None,
    keep_ratio: float | None = None,
    prop_attn: bool | None = None,
    options: dict | None = None,
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
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Train ``method`` (dtem | ltm) on ``model`` (UNMERGED, any timm ViT tmerge supports) by
    distillation from the unmerged model; write the adapter to ``out``; return a summary dict.

    ``model`` is patched in place (it ends merged, method in eval mode, trained parameters loaded).
    Give ``steps`` or ``epochs`` (default 1 epoch). A checkpoint ``<out>.ckpt.pt`` is written every
    ``checkpoint_every`` steps and at the end; ``resume=True`` continues from it. ``max_seconds``
    stops early once the training loop has run that long (the summary says so; not deterministic).
    """
    if method not in TRAINABLE_METHODS:
        raise TmergeError(f"only learned methods can be trained ({', '.join(TRAINABLE_METHODS)}); got {method!r}")
    if steps is not None and epochs is not None:
        raise TmergeError("give --steps or --epochs, not both")
    if batch_size < 1 or lr <= 0:
        raise TmergeError("batch size must be >= 1 and the learning rate > 0")
    if images.ndim != 4 or images.shape[0] < 1:
        raise TmergeError("training needs at least one image (a (N, 3, H, W) batch)")
    if (steps is not None and steps < 1) or (epochs is not None and epochs < 1):
        raise TmergeError("steps/epochs must be >= 1")
    out = Path(out)
    ckpt_path = out.with_name(out.name + ".ckpt.pt")
    dist = Dist(device)
    started = time.perf_counter()
    try:
        torch.manual_seed(seed)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        model.to(dist.device)
        teacher = copy.deepcopy(model).eval()
        weights_sha = backbone_sha256(model)
        apply(model, method, r=r, schedule=schedule, keep_ratio=keep_ratio, prop_attn=prop_attn, **(options or {}))
        merger = model.tmerge_method
        model.eval()
        merger.train()
        info = merge_info(model)
        if not any(info["r"]):
            raise TmergeError("the schedule merges no tokens: nothing to train (give --r or --schedule)")
        layers = _layer_modules(merger)
        for layer, r_l in enumerate(info["r"]):
            trainable = r_l > 0
            for p in (layers[layer].parameters() if layers is not None else []):
                p.requires_grad_(trainable)
        params = [p for p in merger.parameters() if p.requires_grad]
        if not params:
            raise TmergeError(f"method {method} has no trainable parameters")
        headless = getattr(model, "num_classes", 0) == 0

        n = images.shape[0]
        per_epoch = _batches_per_epoch(n, batch_size, dist)
        total = steps if steps is not None else per_epoch * (epochs or 1)

        t_out, t_feat = _teacher_outputs(teacher, images, batch_size, dist.device)
        h_out = None
        if heldout is not None and len(heldout) and dist.main:
            h_out, _ = _teacher_outputs(teacher, heldout, batch_size, dist.device)
        del teacher
        centroids = labels = None
        num_labels = 0
        if method == "ltm" and ib_weight > 0:
            centroids = kmeans(t_feat, IB_CLUSTERS, seed=seed).to(dist.device)
            if headless:
                labels = torch.cdist(F.normalize(t_feat, dim=-1), centroids.cpu()).argmin(1)
                num_labels = centroids.shape[0]
            else:
                labels = t_out.argmax(-1)
                num_labels = t_out.shape[-1]

        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        identity = {
            "method": method, "options": info["options"], "r": info["r"], "prop_attn": info["prop_attn"],
            "weights_sha256": weights_sha, "n_images": n, "batch_size": batch_size, "lr": lr, "seed": seed,
            "ib_weight": ib_weight if method == "ltm" else None, "world": dist.world,
        }
        step, history, drift_history = 0, [], []
        if resume and ckpt_path.is_file():
            state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            if state.get("identity") != _fingerprint(identity):
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
                x = images[idx].to(dist.device)
                s_out, s_feat = student(x)
                loss = distill_loss(s_out, t_out[idx].to(dist.device), headless)
                if centroids is not None:
                    loss = loss + ib_weight * ib_loss(s_feat, labels[idx].to(dist.device), centroids, num_labels)
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
            final_drift = measure() if dist.main else None
            bar.set_drift(final_drift)
        finally:
            bar.close()
        save_checkpoint()

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
            "ib_weight": ib_weight if method == "ltm" else None,
            "loss": "kl_logits" if not headless else "cosine_features",
            "initial_loss": history[0] if history else None,
            "final_loss": sum(window) / len(window) if window else None,
            "heldout_drift": final_drift,
            "heldout_drift_at_init": drift_history[0] if drift_history else None,
            "data": data_summary or {"n_images": n},
            "train_seconds": round(time.perf_counter() - started, 1),
            "adapter": str(out),
        }
        if dist.main:
            save_adapter(model, out, summary, weights_sha256=weights_sha)
        dist.barrier()
        summary["loss_history"] = history
        summary["drift_history"] = drift_history
        return summary
    finally:
        dist.close()


class _Progress:
    """A rich progress bar on stderr with the running loss and the latest held-out drift."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.enabled = enabled
        self.progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
