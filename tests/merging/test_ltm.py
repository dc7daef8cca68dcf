"""LTM: untrained == ToMe; a learned mask spreads merged tokens softly; ONNX Runtime parity."""

from __future__ import annotations

import copy

import tmerge
from tests.helpers import tiny_vit
from tmerge import MergeConfig
from tmerge.merging.methods.ltm import cluster_assign, ib_loss, kmeans

import pytest
import torch


def _perturb(model, seed=3):
    """A "trained" mask: open gates, random scorers."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for mask in model.tmerge_method.masks:
            mask.gate.fill_(0.6)
            mask.query.weight.normal_()
            mask.key.weight.normal_()
    return model


@pytest.mark.parametrize("variant", ["plain", "distilled", "registers", "avgpool", "layerscale"])
def test_untrained_ltm_equals_tome(variant, tiny_images):
    base = tiny_vit(variant)
    tome = tmerge.apply(copy.deepcopy(base), MergeConfig.of("tome", r=3))
    ltm = tmerge.apply(copy.deepcopy(base), MergeConfig.of("ltm", adapter=None, r=3))
    with torch.no_grad():
        torch.testing.assert_close(ltm(tiny_images), tome(tiny_images), rtol=0, atol=1e-6)
    assert ltm.blocks.last_tokens == tome.blocks.last_tokens


def test_learned_mask_spreads_and_conserves_size(tiny_images):
    base = tiny_vit("plain")
    tome = tmerge.apply(copy.deepcopy(base), MergeConfig.of("tome", r=3))
    ltm = _perturb(tmerge.apply(copy.deepcopy(base), MergeConfig.of("ltm", adapter=None, r=3, topk=3)))
    with torch.no_grad(), ltm.blocks.recording_slots(), tome.blocks.recording_slots():
        out = ltm(tiny_images)
        ref = tome(tiny_images)
    # the recorded slots are each token's main destination: ToMe's, in the first block (same input)
    assert torch.equal(ltm.blocks.last_slots[0], tome.blocks.last_slots[0])
    assert ltm.blocks.last_tokens == tome.blocks.last_tokens  # same static shapes as ToMe
    n = ltm.blocks.schedule.tokens[0]
    torch.testing.assert_close(ltm.blocks.final_size.sum(1).squeeze(-1), torch.full((4,), float(n)))
    assert not torch.allclose(out, ref, atol=1e-5)


def test_gradients_reach_the_mask_even_with_closed_gates(tiny_images):
    model = tmerge.apply(tiny_vit("plain", num_classes=0, global_pool="avg"), MergeConfig.of("ltm", adapter=None, r=3))
    model.tmerge_method.train()
    model(tiny_images).square().sum().backward()
    mask = model.tmerge_method.masks[0]
    assert mask.gate.grad is not None and mask.gate.grad.abs() > 0
    assert mask.query.weight.grad.abs().sum() > 0  # the scorer learns while the gate is still 0


def test_a_gate_pushed_below_zero_can_reopen(tiny_images):
    """In training the clamp of the gate passes its gradient (a plain clamp would freeze a negative
    gate for good); the value, and everything at inference, stays clamped: a negative gate is ToMe."""
    base = tiny_vit("plain", num_classes=0, global_pool="avg")
    model = tmerge.apply(copy.deepcopy(base), MergeConfig.of("ltm", adapter=None, r=3))
    with torch.no_grad():
        for mask in model.tmerge_method.masks:
            mask.gate.fill_(-0.2)
    tome = tmerge.apply(copy.deepcopy(base), MergeConfig.of("tome", r=3))
    with torch.no_grad():
        torch.testing.assert_close(model(tiny_images), tome(tiny_images), rtol=0, atol=1e-6)
    model.tmerge_method.train()
    model(tiny_images).square().sum().backward()
    assert all(mask.gate.grad.abs() > 0 for mask in model.tmerge_method.masks)


def test_onnx_runtime_parity(tmp_path, tiny_images):
    ort = pytest.importorskip("onnxruntime")
    from tmerge.export import export_onnx

    model = _perturb(tmerge.apply(tiny_vit("distilled"), MergeConfig.of("ltm", adapter=None, r=3))).eval()
    result = export_onnx(model, tmp_path / "ltm.onnx", graph="portable", batch_size=2)
    assert result.parity["max_abs_diff"] <= 1e-4
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    got = sess.run(None, {name: tiny_images.numpy()})[0]  # batch 4: the batch dimension is dynamic
    with torch.no_grad():
        ref = model(tiny_images)
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=0, atol=1e-4)


def test_ib_term_prefers_consistent_clusters():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.arange(4).repeat_interleave(8)
    feats = centres[labels] + 0.01 * torch.randn(32, 8)
    c = kmeans(feats, 4, seed=0)
    assert cluster_assign(feats, c).shape == (32, 4)
    tight = ib_loss(feats, labels, c, 4)
    shuffled = ib_loss(feats[torch.randperm(32)], labels, c, 4)
    assert tight < shuffled
