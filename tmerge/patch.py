"""Patch a timm VisionTransformer in place so that its blocks merge tokens.

The blocks themselves are kept (same modules, same state-dict keys); ``model.blocks`` becomes a
:class:`MergingBlocks` that runs each block's own submodules — norm1, attention (with its q/k norm and
fused SDPA), LayerScale, drop-path, norm2, MLP — with the merge between attention and MLP. Keys are
read from the block's ``attn.k_norm`` output by a forward hook, so the attention forward is never
copied. Proportional attention is an additive float ``attn_mask`` (log size) passed to the block's
own attention.

The merge step itself is a *strategy* held by :class:`MergingBlocks` (``blocks.merge_step``):
:func:`eager_merge_step` (the method chooses, the shared primitive merges) unless a caller swaps it
for the duration of a ``with blocks.using(step):`` block — the exporter's instrumented step, or
:class:`ReplayStep`, which merges with given per-layer slots instead of choosing. The ops of the
merge (the merge form, :data:`tmerge.merging.ops.MERGE_FORMS`) are an export's choice, not the
model's: the default form unless an export runs the model ``with using_merge_form(model, form):``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from typing import Iterator, Protocol

import torch
from torch import Tensor, nn

from .config import MergeConfig
from .errors import TmergeError
from .merging import BlockInput, MergeMethod, MergePlan, merge_slots, merge_tokens, opaque, registry
from .merging.ops import DEFAULT_FORM
from .schedule import ResolvedSchedule, ScheduleSpec, resolve

SUPPORTED_POOLS = ("token", "avg", "max", "avgmax", "")


class MergeStep(Protocol):
    """One block's merge: ``(method, block, merge_form) -> (x, size, chosen)``; ``chosen`` is the
    :class:`MergePlan` (or the (B, N) slots) the merge followed, read only when slots are recorded."""

    def __call__(self, method: MergeMethod, block: BlockInput, form: str) -> tuple[Tensor, Tensor, MergePlan | Tensor]: ...


def eager_merge_step(method: MergeMethod, block: BlockInput, form: str = DEFAULT_FORM
                     ) -> tuple[Tensor, Tensor, MergePlan]:
    """The default step: the method chooses, the shared primitive merges. Returns (x, size, plan)."""
    plan = method.plan(block)
    x, size = merge_tokens(block.x, block.size, plan, form=form)
    return x, size, plan


def chosen_slots(chosen: MergePlan | Tensor) -> Tensor:
    """The (B, N) slots of what a merge step chose."""
    return chosen.slots if isinstance(chosen, MergePlan) else chosen


class ReplayStep:
    """Merge with given per-layer slots (B, N) instead of the method's choice (parity checks: replay
    another runtime's choices in PyTorch). ``slots_by_layer[l]`` is None for layers that do not merge."""

    def __init__(self, slots_by_layer: list[Tensor | None]) -> None:
        self.slots_by_layer = slots_by_layer

    def __call__(self, method: MergeMethod, block: BlockInput, form: str) -> tuple[Tensor, Tensor, Tensor]:
        slots = self.slots_by_layer[block.layer]
        x, size = merge_slots(block.x, block.size, slots, block.x.shape[1] - block.r, form=form)
        return x, size, slots


def _timm_vit_classes():
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    return VisionTransformer, Block, Attention


class MergingBlocks(nn.Sequential):
    """Drop-in replacement for ``model.blocks`` that merges ``schedule.r[l]`` tokens in block l."""

    def __init__(self, blocks: nn.Sequential, method: MergeMethod, schedule: ResolvedSchedule,
                 num_prefix: int, prop_attn: bool) -> None:
        super().__init__(*blocks)
        # Not a submodule of the sequence (nn.Sequential runs every child): the model owns it (see
        # METHOD_ATTR) so learned methods' parameters live in the model's state dict.
        object.__setattr__(self, "method", method)
        self.num_prefix = num_prefix
        self._const_keys: dict[int, tuple] = {}
        self._const_names: dict[int, dict[str, str]] = {}
        self._opaque_args = opaque.opaque_args(method)
        self.schedule = schedule
        self.prop_attn = prop_attn
        self.merge_form = DEFAULT_FORM  # an export's choice, set only for its duration (using_merge_form)
        self.merge_step: MergeStep = eager_merge_step
        self.record_slots = False
        self.last_tokens: list[int] = []
        self.last_slots: list[Tensor | None] = []
        self.final_size: Tensor | None = None
        self._keys: dict[int, Tensor] = {}
        self._hooks = [
            blk.attn.k_norm.register_forward_hook(self._capture_keys(i)) for i, blk in enumerate(blocks)
        ]

    @property
    def schedule(self) -> ResolvedSchedule:
        return self._schedule

    @schedule.setter
    def schedule(self, schedule: ResolvedSchedule) -> None:
        self._schedule = schedule
        self._build_constants()

    def _build_constants(self) -> None:
        """The method's index constants of every merging block, built once per schedule (not per
        forward) and kept as non-persistent buffers, so they follow ``model.to`` and stay out of the
        state dict. Blocks that stop merging keep theirs (``unmerged()`` rebuilds nothing)."""
        param = next(self.parameters(), None)
        device, dtype = (param.device, param.dtype) if param is not None else (None, None)
        dtype = dtype if dtype is not None and dtype.is_floating_point else None
        for layer, (tokens, r) in enumerate(zip(self._schedule.tokens, self._schedule.r)):
            key = (tokens, r, self.num_prefix)
            if r == 0 or self._const_keys.get(layer) == key:
                continue
            consts = self.method.constants(layer, tokens, r, self.num_prefix, device=device,
                                           **({"dtype": dtype} if dtype is not None else {}))
            for name in self._const_names.pop(layer, {}).values():
                del self._buffers[name]
            self._const_names[layer] = {name: f"merge_const_{layer}_{name}" for name in consts}
            for name, value in consts.items():
                self.register_buffer(self._const_names[layer][name], value, persistent=False)
            self._const_keys[layer] = key

    def constants(self, layer: int) -> dict[str, Tensor]:
        """Block ``layer``'s index constants (see :meth:`MergeMethod.constants`)."""
        return {name: getattr(self, buffer) for name, buffer in self._const_names.get(layer, {}).items()}

    def _compiling_opaque(self) -> bool:
        """Under torch.compile (not export), with the default step and nothing recorded: the merge is
        one opaque op (:mod:`tmerge.merging.opaque`)."""
        return (self._opaque_args is not None and not self.method.training and self.merge_step is eager_merge_step
                and not self.record_slots and torch.compiler.is_compiling() and not torch.compiler.is_exporting())

    def _capture_keys(self, layer: int):
        def hook(_module, _inputs, output):
            self._keys[layer] = output
        return hook

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()

    @contextlib.contextmanager
    def using(self, step: MergeStep) -> Iterator[MergingBlocks]:
        """Run the merges with ``step`` instead of the current strategy inside the ``with`` block."""
        saved = self.merge_step
        self.merge_step = step
        try:
            yield self
        finally:
            self.merge_step = saved
            self._keys.clear()  # a failed forward may leave captured keys behind

    @contextlib.contextmanager
    def using_merge_form(self, form: str) -> Iterator[MergingBlocks]:
        """Merge with ``form``'s ops (an export's merge form) inside the ``with`` block."""
        saved, self.merge_form = self.merge_form, form
        try:
            yield self
        finally:
            self.merge_form = saved

    @contextlib.contextmanager
    def recording_slots(self) -> Iterator[MergingBlocks]:
        """Keep every merging block's slots in ``last_slots`` during the ``with`` block."""
        saved, self.record_slots = self.record_slots, True
        try:
            yield self
        finally:
            self.record_slots = saved

    @contextlib.contextmanager
    def unmerged(self) -> Iterator[MergingBlocks]:
        """Run without merging (r = 0 in every block) inside the ``with`` block."""
        saved = self.schedule
        n = saved.tokens[0]
        self.schedule = dataclasses.replace(saved, r=[0] * len(saved.r), tokens=[n] * len(saved.tokens), capped=[])
        try:
            yield self
        finally:
            self.schedule = saved

    def forward(self, x: Tensor) -> Tensor:
        expected = self.schedule.tokens[0]
        if x.shape[1] != expected:
            raise TmergeError(
                f"the merge schedule was resolved for {expected} tokens but the input has {x.shape[1]}; "
                "a fixed schedule needs the model's configured image size"
            )
        size: Tensor | None = None  # all ones until the first merge: keeps r=0 blocks bit-identical
        tokens, recorded = [], []
        for layer, blk in enumerate(self):
            tokens.append(x.shape[1])
            mask = None
            if self.prop_attn and size is not None:
                mask = size.log().view(-1, 1, 1, size.shape[1])  # (B, 1, 1, N): + log s_j on every key j
            attn_input = blk.norm1(x)
            x = x + blk.drop_path1(blk.ls1(blk.attn(attn_input, attn_mask=mask)))
            keys = self._keys.pop(layer)
            r = self.schedule.r[layer]
            chosen = None
            if r > 0 and self._compiling_opaque():
                if size is None:
                    size = x.new_ones(x.shape[0], x.shape[1], 1)
                name, options = self._opaque_args
                x, size = opaque.merge_step(x, size, self.method.merge_keys(layer, keys, attn_input), name, options,
                                            layer, len(self), r, self.num_prefix, self.merge_form)
            elif r > 0:
                keys = self.method.merge_keys(layer, keys, attn_input)
                block_input = BlockInput(layer=layer, depth=len(self), r=r, num_prefix=self.num_prefix,
                                         keys=keys, attn_input=attn_input, x=x, size=size,
                                         consts=self.constants(layer))
                x, size, chosen = self.merge_step(self.method, block_input, self.merge_form)
            recorded.append(chosen_slots(chosen) if self.record_slots and chosen is not None else None)
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        tokens.append(x.shape[1])
        self.last_tokens, self.last_slots, self.final_size = tokens, recorded, size
        return x


# The attribute under which a patched model owns its merge method: a submodule, so a learned
# method's parameters are in the model's state dict (keys "<METHOD_ATTR>.*"). Read it with merge_method().
METHOD_ATTR = "tmerge_method"


def merge_method(model: nn.Module) -> MergeMethod | None:
    """The merge method patched into ``model``, else None."""
    return getattr(model, METHOD_ATTR, None)


def merging_blocks(model: nn.Module) -> MergingBlocks | None:
    """``model.blocks`` when the model is patched, else None."""
    blocks = getattr(model, "blocks", None)
    return blocks if isinstance(blocks, MergingBlocks) else None


@contextlib.contextmanager
def unmerged(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily run a (possibly) patched model without merging."""
    blocks = merging_blocks(model)
    if blocks is None:
        yield model
        return
    with blocks.unmerged():
        yield model


@contextlib.contextmanager
def using_merge_form(model: nn.Module, form: str | None) -> Iterator[nn.Module]:
    """Run a patched model's merges with ``form``'s ops inside the ``with`` block (what an export
    traces, and what its parity checks compare with); None, or an unpatched model: as it is."""
    blocks = merging_blocks(model)
    if blocks is None or form is None:
        yield model
        return
    with blocks.using_merge_form(form):
        yield model


def _size_weighted_pool(model: nn.Module, original_pool):
    """``model.pool`` replacement: average pools weight each token by its size (max pools need not)."""

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        size = self.blocks.final_size
        if size is None or pool_type not in ("avg", "avgmax"):
            return original_pool(x, pool_type)
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        tokens, weights = x[:, start:], size[:, start:]
        avg = (tokens * weights).sum(1) / weights.sum(1)
        return avg if pool_type == "avg" else 0.5 * (tokens.amax(1) + avg)

    return types.MethodType(pool, model)


def _is_mae_style(model: nn.Module) -> bool:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return any("mae" in str(cfg.get(k, "")).lower() for k in ("architecture", "tag", "hf_hub_id"))


def _check_supported(model: nn.Module) -> None:
    VisionTransformer, Block, Attention = _timm_vit_classes()
    if not isinstance(model, VisionTransformer):
        raise TmergeError(
            f"tmerge supports timm VisionTransformer models (vit_*, deit_*, DINOv2, registers, distilled); "
            f"got {type(model).__name__}"
        )
    if len(model.blocks) == 0:
        raise TmergeError("the model has no transformer blocks: nothing to merge")
    for i, blk in enumerate(model.blocks):
        if type(blk).forward is not Block.forward or not isinstance(blk.attn, Attention):
            raise TmergeError(
                f"block {i} is a {type(blk).__name__} with {type(blk.attn).__name__}; tmerge supports "
                "timm's pre-norm Block with its standard Attention"
            )
    if model.attn_pool is not None:
        raise TmergeError("attention-pool heads (global_pool='map') are not supported with token merging")
    if model.global_pool not in SUPPORTED_POOLS:
        raise TmergeError(f"global_pool={model.global_pool!r} is not supported; use one of {SUPPORTED_POOLS}")


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the original ``nn.Sequential`` of the same blocks and timm's own pool."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, MergingBlocks):
        blocks.remove_hooks()
        model.blocks = nn.Sequential(*blocks)
        model.__dict__.pop("pool", None)
        delattr(model, METHOD_ATTR)
    return model


def apply(model: nn.Module, merge: MergeConfig) -> nn.Module:
    """Patch a timm VisionTransformer in place to merge tokens as ``merge`` says; returns the same model.

    Method, schedule, proportional attention (None: the method's default, always off for MAE-style
    weights) and options come from ``merge``; its adapter is not loaded here (see
    :func:`tmerge.apply`: learned methods stay untrained). Method ``"none"`` restores the
    unmodified model.
    """
    unpatch(model)
    if merge.method == "none":
        return model
    if merge.schedule is None:
        raise TmergeError(f"method {merge.method!r} needs a schedule: give r, schedule or keep_ratio (r=0 merges nothing)")
    _check_supported(model)
    depth = len(model.blocks)
    merger = registry.get(merge.method)(depth, **merge.options)
    num_prefix = model.num_prefix_tokens
    num_tokens = model.patch_embed.num_patches + num_prefix
    resolved = resolve(merge.schedule, depth, num_tokens, num_prefix, merger.max_r)
    prop_attn = merge.prop_attn
    if prop_attn is None:
        prop_attn = merger.prop_attn_default and not _is_mae_style(model)
    original_pool = model.pool
    model.blocks = MergingBlocks(model.blocks, merger, resolved, num_prefix, bool(prop_attn))
    setattr(model, METHOD_ATTR, merger)
    model.pool = _size_weighted_pool(model, original_pool)
    merger.train(model.training)
    merger.bind(model)
    return model


def set_schedule(model: nn.Module, spec: ScheduleSpec) -> None:
    """Resolve ``spec`` against a patched model and merge with it from now on, in place: the method
    (and what it learned) stays, bound again to the new schedule in its current mode."""
    blocks = merging_blocks(model)
    if blocks is None:
        raise TmergeError("set_schedule needs a merged model (tmerge.apply first)")
    method = blocks.method
    blocks.schedule = resolve(spec, len(blocks), blocks.schedule.tokens[0], blocks.num_prefix, method.max_r)
    training = method.training
    method.bind(model)  # re-reads the schedule (DTEM: live tokens); bind follows the model's mode
    method.train(training)


def merge_info(model: nn.Module) -> dict:
    """Method, options, proportional attention and the resolved schedule of a patched model."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, MergingBlocks):
        depth = len(blocks) if blocks is not None else 0
        return {"method": "none", "options": {}, "prop_attn": False, "schedule": None,
                "r": [0] * depth, "tokens": None}
    return {
        **blocks.method.describe(),
        "prop_attn": blocks.prop_attn,
        "schedule": blocks.schedule.spec.describe(),
        "r": list(blocks.schedule.r),
        "tokens": list(blocks.schedule.tokens),
        "capped": blocks.schedule.as_dict()["capped"],
    }


def tokens_per_layer(model: nn.Module) -> list[int]:
    """Token counts entering each block and leaving the last, as used by the latest forward.

    Before any forward, the counts the schedule implies.
    """
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, MergingBlocks):
        return list(blocks.last_tokens) if blocks.last_tokens else list(blocks.schedule.tokens)
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    return [n] * (len(blocks) + 1)
