"""PiToMe's choice of merges against DESIGN.md written out independently."""

import math

from tmerge.merging.base import BlockInput
from tmerge.merging.methods.pitome import PiToMe
from tmerge.merging.ops import merge_tokens

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st


def reference_pitome(keys, x, size, r, num_prefix, margin, bsm):
    metric = keys.mean(0)[num_prefix:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    t = metric.shape[0]
    sim = metric @ metric.T
    energy = [float(torch.nn.functional.elu(sim[i] - margin).mean()) for i in range(t)]
    order = sorted(range(t), key=lambda i: -energy[i])  # stable: lower index first on ties
    xs, ss = x[num_prefix:], size[num_prefix:]
    groups = [[("p", p)] for p in range(num_prefix)]
    if bsm:
        a_list, b_list = order[0::2], order[1::2]
        best = {a: max(((float(sim[a, b]), b) for b in b_list), key=lambda v: v[0]) for a in a_list}
        merged = set(sorted(a_list, key=lambda a: -best[a][0])[:r])
        groups += [[("t", a)] for a in a_list if a not in merged]
        groups += [[("t", b)] + [("t", a) for a in merged if best[a][1] == b] for b in b_list]
    else:
        cand, protected = order[: 2 * r], order[2 * r:]
        a_list, b_list = cand[0::2], cand[1::2]
        dst = {a: max(((float(sim[a, b]), b) for b in b_list), key=lambda v: v[0])[1] for a in a_list}
        groups += [[("t", p)] for p in protected]
        groups += [[("t", b)] + [("t", a) for a in a_list if dst[a] == b] for b in b_list]

    def pick(kind, i):
        return (x[i], size[i]) if kind == "p" else (xs[i], ss[i])

    outs, sizes = [], []
    for grp in groups:
        members = [pick(k, i) for k, i in grp]
        s = torch.stack([m[1] for m in members])
        v = torch.stack([m[0] for m in members])
        outs.append((s * v).sum(0) / s.sum())
        sizes.append(s.sum(0))
    return torch.stack(outs), torch.stack(sizes)


@pytest.mark.parametrize("bsm", [True, False])
@settings(max_examples=25, deadline=None)
@given(n=st.integers(5, 20), num_prefix=st.integers(0, 2), seed=st.integers(0, 2**16), data=st.data())
def test_pitome_matches_reference(bsm, n, num_prefix, seed, data):
    r = data.draw(st.integers(0, (n - num_prefix) // 2))
    depth, layer = 4, data.draw(st.integers(0, 3))
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 2, n, 4, generator=g, dtype=torch.float64)
    x = torch.randn(2, n, 3, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (2, n, 1), generator=g).to(torch.float64)
    method = PiToMe(depth, bsm_layers=depth if bsm else 0)
    block = BlockInput(layer=layer, depth=depth, r=r, num_prefix=num_prefix, keys=keys, attn_input=x, x=x, size=size)
    p = method.plan(block)
    out, new_size = merge_tokens(x, size, p)
    margin = 0.75 - 0.75 * layer / depth
    for i in range(2):
        ref_x, ref_size = reference_pitome(keys[i], x[i], size[i], r, num_prefix, margin, bsm)
        assert torch.allclose(out[i], ref_x) and torch.allclose(new_size[i], ref_size)


def test_reference_defaults_margin_and_variant_split():
    m = PiToMe(12)
    assert [m.uses_bsm(layer) for layer in range(12)] == [True] * 6 + [False] * 6
    assert m.margin(0) == 0.75 and math.isclose(m.margin(6), 0.375)
    assert PiToMe(7).uses_bsm(3) and not PiToMe(7).uses_bsm(4)  # ceil(7/2) = 4 blocks of bsm
    assert PiToMe.prop_attn_default is False
    assert PiToMe(12, margin=0.9).margin(0) == 0.9
