"""ToMe's choice of merges: a hand-checked case and the DESIGN.md algorithm written out independently."""

from tmerge.merging.base import BlockInput
from tmerge.merging.methods.tome import ToMe
from tmerge.merging.ops import merge_tokens

import torch
from hypothesis import given, settings
from hypothesis import strategies as st


def plan(keys, r, num_prefix):
    b, _, n, _ = keys.shape
    x = torch.randn(b, n, 4)
    block = BlockInput(layer=0, depth=1, r=r, num_prefix=num_prefix, keys=keys, attn_input=x, x=x,
                       size=torch.ones(b, n, 1))
    return ToMe(1).plan(block)


def hand_keys():
    # token: 0 = cls (A), 1 (B), 2 (A, identical to 1), 3 (B), 4 (A, close to 3)
    vecs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.1]])
    return vecs.view(1, 1, 5, 2)


def test_hand_checked_r1_merges_the_best_edge_only():
    p = plan(hand_keys(), r=1, num_prefix=1)
    # output: [cls, unmerged A (4), B (1+2), B (3)]
    assert p.slots.tolist() == [[0, 2, 2, 3, 1]] and p.num_out == 4


def test_hand_checked_r2():
    p = plan(hand_keys(), r=2, num_prefix=1)
    assert p.slots.tolist() == [[0, 1, 1, 2, 2]] and p.num_out == 3


def test_distillation_token_is_protected_and_second():
    # token 1 (in B) is the distillation token: token 2 would pick it, but its column is -inf
    p = plan(hand_keys(), r=1, num_prefix=2)
    assert p.slots[0, 0] == 0 and p.slots[0, 1] == 1
    assert (p.slots[0] == 1).sum() == 1 and (p.slots[0] == 0).sum() == 1


def reference_tome(metric_keys, x, size, r, num_prefix):
    """DESIGN.md ToMe, one image at a time with Python loops (independent of the code under test)."""
    metric = metric_keys.mean(0)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    n = metric.shape[0]
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    best = {}
    for a in a_pos:
        if a < num_prefix:
            continue
        cands = [(float(metric[a] @ metric[b]), b) for b in b_pos if b >= num_prefix]
        score, b = max(cands, key=lambda t: t[0])  # first b wins a tie
        best[a] = (score, b)
    ranked = sorted(best, key=lambda a: -best[a][0])
    merged = set(ranked[:r])
    groups = [[p] for p in range(num_prefix)]
    groups += [[a] for a in a_pos if a >= num_prefix and a not in merged]
    groups += [[b] + [a for a in merged if best[a][1] == b] for b in b_pos if b >= num_prefix]
    out = torch.stack([(size[g] * x[g]).sum(0) / size[g].sum() for g in groups])
    return out, torch.stack([size[g].sum(0) for g in groups])


@settings(max_examples=40, deadline=None)
@given(st.integers(4, 20), st.integers(0, 3), st.integers(0, 2**16), st.data())
def test_tome_matches_reference(n, num_prefix, seed, data):
    num_prefix = min(num_prefix, n - 2)
    r = data.draw(st.integers(0, (n - num_prefix) // 2))
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 3, n, 4, generator=g, dtype=torch.float64)
    x = torch.randn(2, n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (2, n, 1), generator=g).to(torch.float64)
    block = BlockInput(layer=0, depth=1, r=r, num_prefix=num_prefix, keys=keys, attn_input=x, x=x, size=size)
    p = ToMe(1).plan(block)
    out, new_size = merge_tokens(x, size, p)
    assert out.shape[1] == n - r
    for i in range(2):
        ref_x, ref_size = reference_tome(keys[i], x[i], size[i], r, num_prefix)
        assert torch.allclose(out[i], ref_x) and torch.allclose(new_size[i], ref_size)
    # protected tokens keep their own slot, in order, and nothing else joins them
    for q in range(num_prefix):
        assert (p.slots[:, q] == q).all() and ((p.slots == q).sum(1) == 1).all()
