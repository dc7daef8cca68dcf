"""The shared size-weighted merge: hand-checked cases and properties."""

from tmerge.merging.ops import merge_slots

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st


def test_hand_checked_weighted_merge():
    x = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]]])
    size = torch.tensor([[[1.0], [3.0], [2.0]]])
    slots = torch.tensor([[0, 1, 0]])  # tokens 0 and 2 merge into slot 0, token 1 alone in slot 1
    for form in ("gather", "scatter", "onehot"):
        out, new_size = merge_slots(x, size, slots, 2, form=form)
        assert torch.allclose(out, torch.tensor([[[(1 * 1 + 2 * 5) / 3, (0 + 2 * 4) / 3], [3.0, 2.0]]]))
        assert torch.equal(new_size, torch.tensor([[[3.0], [3.0]]]))


def test_soft_weights_split_a_token_between_slots():
    x = torch.tensor([[[2.0], [4.0], [10.0]]])
    size = torch.ones(1, 3, 1)
    slots = torch.tensor([[[0, 1], [0, 0], [1, 1]]])
    weights = torch.tensor([[[0.25, 0.75], [1.0, 0.0], [1.0, 0.0]]])
    out, new_size = merge_slots(x, size, slots, 2, weights)
    out_1h, size_1h = merge_slots(x, size, slots, 2, weights, form="onehot")
    assert torch.allclose(out, out_1h) and torch.allclose(new_size, size_1h)
    assert torch.allclose(new_size.flatten(), torch.tensor([1.25, 1.75]))
    assert torch.allclose(out.flatten(), torch.tensor([(0.25 * 2 + 4) / 1.25, (0.75 * 2 + 10) / 1.75]))


@st.composite
def merge_problems(draw):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(2, 12))
    c = draw(st.integers(1, 5))
    n_out = draw(st.integers(1, n))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    # every output slot gets at least one token: a permutation covers slots 0..n_out-1 first
    base = torch.cat([torch.arange(n_out), torch.randint(0, n_out, (n - n_out,), generator=g)])
    slots = torch.stack([base[torch.randperm(n, generator=g)] for _ in range(b)])
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (b, n, 1), generator=g).to(torch.float64)
    return x, size, slots, n_out


@settings(max_examples=60, deadline=None)
@given(merge_problems())
def test_merge_preserves_total_size_and_mass_and_forms_agree(problem):
    x, size, slots, n_out = problem
    out, new_size = merge_slots(x, size, slots, n_out)
    assert out.shape == (x.shape[0], n_out, x.shape[2])
    assert torch.allclose(new_size.sum(1), size.sum(1))
    assert torch.allclose((out * new_size).sum(1), (x * size).sum(1))
    for form in ("gather", "scatter", "onehot"):
        out_f, size_f = merge_slots(x, size, slots, n_out, form=form)
        assert torch.allclose(out, out_f) and torch.allclose(new_size, size_f)
    # each slot is exactly the size-weighted mean of its group
    for bi in range(x.shape[0]):
        for j in range(n_out):
            members = slots[bi] == j
            s = size[bi][members]
            assert torch.allclose(out[bi, j], (s * x[bi][members]).sum(0) / s.sum())


@pytest.mark.parametrize("form", ["gather", "scatter", "onehot"])
@pytest.mark.parametrize("soft", [False, True])
def test_no_size_yet_is_all_ones(form, soft):
    """Before the first merge the sizes are None (all ones): every form gives the bits it gives with
    explicit ones (the gather form then skips the products and sums the route for the sizes)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 4, generator=g)
    slots = torch.stack([torch.randperm(9, generator=g) % 5 for _ in range(2)])
    weights = None
    if soft:
        slots = torch.stack([slots, torch.roll(slots, 1, dims=1)], dim=-1)
        weights = torch.rand(2, 9, 2, generator=g)
        weights = weights / weights.sum(-1, keepdim=True)
    out, size = merge_slots(x, None, slots, 5, weights, form=form)
    out_1, size_1 = merge_slots(x, torch.ones(2, 9, 1), slots, 5, weights, form=form)
    assert torch.equal(size, size_1) if not soft else torch.allclose(size, size_1, rtol=1e-6, atol=0)
    torch.testing.assert_close(out, out_1, rtol=1e-6, atol=0)
    if not soft:
        assert torch.equal(out, out_1)
