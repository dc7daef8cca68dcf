"""DTEM: an untrained DTEM is ToMe; the training relaxation keeps every token; export."""

from __future__ import annotations

import copy

import tmerge
from tests.helpers import tiny_vit
from tmerge import MergeConfig
from tmerge.merging.methods.dtem import DTEM, soft_top_r
from tmerge.patch import set_schedule
from tmerge.schedule import ScheduleSpec

import pytest
import torch


def _run(model, x):
    with torch.no_grad(), model.blocks.recording_slots():
        out = model(x)
    return out, list(model.blocks.last_slots)


@pytest.mark.parametrize("variant", ["plain", "distilled", "registers", "avgpool"])
def test_untrained_dtem_equals_tome(variant, tiny_images):
    base = tiny_vit(variant)
    tome = tmerge.apply(copy.deepcopy(base), MergeConfig.of("tome", r=3))
    dtem = tmerge.apply(copy.deepcopy(base), MergeConfig.of("dtem", adapter=None, r=3))
    assert not dtem.tmerge_method.training  # follows the eval-mode model
    out_t, plans_t = _run(tome, tiny_images)
    out_d, plans_d = _run(dtem, tiny_images)
    for a, b in zip(plans_t, plans_d):
        assert torch.equal(a, b)
    torch.testing.assert_close(out_d, out_t, rtol=0, atol=1e-6)
    assert dtem.tmerge_method.exact_init


def test_wide_embedding_equals_tome(tiny_images):
    base = tiny_vit("plain")
    head_dim = base.blocks[0].attn.head_dim
    tome = tmerge.apply(copy.deepcopy(base), MergeConfig.of("tome", r=3))
    dtem = tmerge.apply(copy.deepcopy(base), MergeConfig.of("dtem", adapter=None, r=3, feat_dim=2 * head_dim))
    assert dtem.tmerge_method.embed[0].out_features == 2 * head_dim
    _, plans_t = _run(tome, tiny_images)
    _, plans_d = _run(dtem, tiny_images)
    assert all(torch.equal(a, b) for a, b in zip(plans_t, plans_d))


def test_qk_norm_is_documented_as_inexact():
    model = tmerge.apply(tiny_vit("layerscale"), MergeConfig.of("dtem", adapter=None, r=2))
    assert not model.tmerge_method.exact_init


def test_parameters_in_state_dict_and_rebind_keeps_them():
    model = tmerge.apply(tiny_vit("plain"), MergeConfig.of("dtem", adapter=None, r=2))
    keys = [k for k in model.state_dict() if k.startswith("tmerge_method.")]
    assert keys and all(".embed." in k for k in keys)
    method = model.tmerge_method
    with torch.no_grad():
        method.embed[0].weight.add_(1.0)
    saved = method.embed[0].weight.clone()
    set_schedule(model, ScheduleSpec(r=2))  # binding a trained instance again keeps what it learned
    assert model.tmerge_method is method and torch.equal(model.tmerge_method.embed[0].weight, saved)
    with pytest.raises(tmerge.TmergeError, match="feat_dim"):
        tmerge.apply(tiny_vit("plain"), MergeConfig.of("dtem", adapter=None, r=2, feat_dim=4))


@pytest.mark.parametrize("variant", ["plain", "distilled", "avgpool"])
def test_soft_training_merge_keeps_all_tokens(variant, tiny_images):
    model = tmerge.apply(tiny_vit(variant), MergeConfig.of("dtem", adapter=None, r=3, relaxed=1))
    for p in model.parameters():
        p.requires_grad_(False)
    method = model.tmerge_method
    for p in method.parameters():
        p.requires_grad_(True)
    method.train()
    out = model(tiny_images)
    n = model.blocks.schedule.tokens[0]
    assert model.blocks.last_tokens == [n] * 4  # nothing dropped during training
    size = model.blocks.final_size
    torch.testing.assert_close(size.sum(1).squeeze(-1), torch.full((4,), float(n)), rtol=1e-5, atol=1e-4)
    assert size.min() > 0
    out.square().sum().backward()
    grads = [p.grad for p in method.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("variant", ["plain", "distilled", "registers", "avgpool"])
def test_straight_through_training_forward_is_the_hard_merge(variant, tiny_images):
    """Default training merge: ToMe's forward on the learned metric, gradients from the relaxation."""
    model = tmerge.apply(tiny_vit(variant), MergeConfig.of("dtem", adapter=None, r=3))
    model.requires_grad_(False)
    method = model.tmerge_method
    method.requires_grad_(True)
    with torch.no_grad():
        hard = model(tiny_images)
    method.train()
    out = model(tiny_images)
    torch.testing.assert_close(out, hard, rtol=0, atol=1e-5)
    assert model.blocks.last_tokens == model.blocks.schedule.tokens  # ToMe's token counts
    out.square().sum().backward()
    grads = [p.grad for p in method.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_soft_top_r_picks_about_r_rows():
    torch.manual_seed(0)
    logits = torch.randn(2, 10, 3) / 0.1
    p = soft_top_r(logits, 4, 0.1)
    assert p.shape == logits.shape
    assert (p.sum(-1) <= 1).all()
    torch.testing.assert_close(p.sum((1, 2)), torch.full((2,), 4.0), rtol=0, atol=0.05)
    # the picks go to the rows with the highest best score
    top_rows = logits.amax(-1).topk(4, dim=-1).indices
    assert torch.equal(p.sum(-1).topk(4, dim=-1).indices.sort().values, top_rows.sort().values)


def test_unbound_method_errors():
    method = DTEM(3)
    with pytest.raises(tmerge.TmergeError, match="not bound"):
        method.merge_keys(0, torch.zeros(1, 3, 4, 16), torch.zeros(1, 4, 48))


@pytest.mark.parametrize("form", ["portable", "plugin"])
def test_export_both_forms(form, tmp_path):
    pytest.importorskip("onnxruntime")
    from tmerge.export import export_onnx
    from tmerge.plugins import spec

    if form == "plugin" and "dtem" not in spec.OP_TYPES:
        pytest.skip("the plugin spec does not map dtem to tmerge::BipartiteMerge yet")
    model = tmerge.apply(tiny_vit("plain"), MergeConfig.of("dtem", adapter=None, r=3)).eval()
    torch.manual_seed(3)
    with torch.no_grad():  # a "trained" embedding: not the key projection any more
        for lin in model.tmerge_method.embed:
            lin.weight.add_(0.1 * torch.randn_like(lin.weight))
    result = export_onnx(model, tmp_path / f"dtem_{form}.onnx", graph=form, batch_size=2)
    assert result.path.is_file()
    assert result.parity["max_abs_diff"] <= 1e-4
