"""Patching real (tiny, random-init) timm ViTs: identity cases, token counts, sizes, errors."""

import tmerge
from tests.helpers import TINY_VARIANTS, tiny_vit
from tmerge import MergeConfig
from tmerge.errors import TmergeError
from tmerge.patch import MergingBlocks, merge_info, using_merge_form

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_none_and_r0_are_bit_identical(variant, tiny_images):
    model = tiny_vit(variant)
    with torch.no_grad():
        ref = model(tiny_images)
        for method in ("tome", "pitome"):
            tmerge.apply(model, MergeConfig.of(method, adapter=None, r=0))
            assert torch.equal(model(tiny_images), ref)
        tmerge.apply(model, MergeConfig.of("tome", r=4))
        assert not torch.equal(model(tiny_images), ref)
        tmerge.apply(model, MergeConfig.of("none"))
        assert torch.equal(model(tiny_images), ref)
    assert type(model.blocks) is torch.nn.Sequential and not hasattr(model, "tmerge_method")


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_token_counts_and_protected_prefix(variant, method, tiny_images):
    model = tiny_vit(variant)
    tmerge.apply(model, MergeConfig.of(method, adapter=None, r=3))
    with torch.no_grad(), model.blocks.recording_slots():
        model(tiny_images)
    p = model.num_prefix_tokens
    n = 16 + p
    assert tmerge.tokens_per_layer(model) == [n, n - 3, n - 6, n - 9]
    for slots in model.blocks.last_slots:
        for q in range(p):  # prefix tokens keep their slot and nothing merges into them
            assert (slots[:, q] == q).all() and ((slots == q).sum(1) == 1).all()


def test_state_dict_keys_unchanged():
    model = tiny_vit("layerscale")
    keys = list(model.state_dict())
    tmerge.apply(model, MergeConfig.of("tome", r=2))
    assert list(model.state_dict()) == keys


def test_layerscale_and_qk_norm_are_kept():
    """Blocks with r=0 must produce exactly what timm's own Block.forward does (LayerScale, q/k norm)."""
    model = tiny_vit("layerscale")
    x = torch.randn(2, 3, 32, 32)

    def input_of_last_block():
        seen = []
        handle = model.blocks[2].norm1.register_forward_hook(lambda m, i, o: seen.append(i[0]))
        with torch.no_grad():
            model.forward_features(x)
        handle.remove()
        return seen[0]

    plain = input_of_last_block()
    tmerge.apply(model, MergeConfig.of("tome", schedule=[0, 0, 2]))
    assert torch.equal(input_of_last_block(), plain)
    tmerge.apply(model, MergeConfig.of("tome", schedule=[2, 0, 0]))
    assert input_of_last_block().shape[1] == 15


def test_proportional_attention_mask_is_log_size():
    model = tiny_vit("plain")
    tmerge.apply(model, MergeConfig.of("tome", r=4, prop_attn=True))
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    assert seen[0] is None  # no merge yet: identical to timm
    assert seen[1].shape == (2, 1, 1, 13)
    size = model.blocks.final_size
    assert torch.allclose(size.sum(1), torch.full((2, 1), 17.0))
    assert merge_info(model)["prop_attn"] is True
    tmerge.apply(model, MergeConfig.of("pitome", r=4))
    assert merge_info(model)["prop_attn"] is False  # PiToMe's reference default


def test_avg_pool_is_size_weighted():
    model = tiny_vit("avgpool")
    tmerge.apply(model, MergeConfig.of("tome", r=4))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)
    size = model.blocks.final_size
    expected = model.fc_norm((tokens * size).sum(1) / size.sum(1))
    assert torch.allclose(pooled, expected, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(variant=st.sampled_from(sorted(TINY_VARIANTS)), method=st.sampled_from(["tome", "pitome"]),
       schedule=st.lists(st.integers(0, 8), min_size=3, max_size=3), form=st.sampled_from(["gather", "scatter", "onehot"]))
def test_any_schedule_runs_and_forms_agree(variant, method, schedule, form):
    model = tiny_vit(variant)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    try:
        tmerge.apply(model, MergeConfig.of(method, adapter=None, schedule=schedule))
    except TmergeError as e:  # an explicit entry the model cannot do is refused, never silently capped
        assert "is impossible at block" in str(e)
        return
    with torch.no_grad():
        out = model(x)
        info = merge_info(model)
        with using_merge_form(model, form):
            out_form = model(x)
    assert torch.allclose(out, out_form, atol=1e-5)
    assert tmerge.tokens_per_layer(model) == info["tokens"]
    assert all(info["tokens"][i] - info["r"][i] == info["tokens"][i + 1] for i in range(3))


def test_errors():
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=2)
    with pytest.raises(TmergeError, match="^tmerge supports timm VisionTransformer models .* got ResNet$"):
        tmerge.apply(resnet, MergeConfig.of("tome", r=2))
    model = tiny_vit("plain")
    with pytest.raises(TmergeError, match="^unknown method 'fast'; available: none, (.*, )?pitome, tome"):
        tmerge.apply(model, MergeConfig.of("fast", r=2))
    with pytest.raises(TmergeError, match=r"^unknown option\(s\) for method tome: margin \(known: none\)$"):
        tmerge.apply(model, MergeConfig.of("tome", r=2, margin=0.5))
    with pytest.raises(TmergeError, match="^r must be >= 0, got -3$"):
        tmerge.apply(model, MergeConfig.of("tome", r=-3))
    with pytest.raises(TmergeError, match="attention-pool heads"):
        tmerge.apply(tiny_vit("plain", global_pool="map"), MergeConfig.of("tome", r=2))
    assert not isinstance(model.blocks, MergingBlocks)  # failed applies leave the model untouched
    dynamic = tmerge.apply(tiny_vit("plain", dynamic_img_size=True), MergeConfig.of("tome", r=2))
    with pytest.raises(TmergeError, match="resolved for 17 tokens but the input has 65"):
        dynamic(torch.randn(1, 3, 64, 64))


def test_merge_step_strategy_is_scoped(tiny_images):
    from tmerge.patch import ReplayStep, eager_merge_step

    model = tmerge.apply(tiny_vit("plain"), MergeConfig.of("tome", r=3))
    with torch.no_grad(), model.blocks.recording_slots():
        reference = model(tiny_images)
        slots = list(model.blocks.last_slots)
    with torch.no_grad(), model.blocks.using(ReplayStep(slots)):
        assert torch.equal(model(tiny_images), reference)  # replaying its own choices changes nothing
    assert model.blocks.merge_step is eager_merge_step and model.blocks.record_slots is False
