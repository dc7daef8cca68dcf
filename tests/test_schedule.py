"""Reduction schedules resolved against concrete token counts."""

from tmerge.errors import TmergeError
from tmerge.schedule import ScheduleSpec, make_spec, resolve

import pytest


def tome_cap(layer, tokens, num_prefix):
    return (tokens - num_prefix) // 2


def test_constant_r_and_capping_is_reported():
    res = resolve(make_spec(r=16), depth=12, num_tokens=197, num_prefix=1, max_r=tome_cap)
    assert res.tokens[:3] == [197, 181, 165]
    assert res.tokens[-1] == 11  # 21 tokens can lose at most (21 - 1) // 2 = 10
    assert res.r[-1] == 10 and res.capped == [(11, 16, 10)]


def test_tome_linear_ramp_matches_the_formula():
    r, inflect, depth = 8, 0.5, 12
    res = resolve(make_spec(r=r, inflection=inflect), depth, 197, 1, tome_cap)
    lo = int(r * (1 - inflect))
    hi = 2 * r - lo
    assert res.r == [int(lo + (hi - lo) * layer / (depth - 1)) for layer in range(depth)]
    assert res.r[0] == 4 and res.r[-1] == 12


def test_keep_ratio_recomputes_r_from_current_non_prefix_tokens():
    res = resolve(make_spec(keep_ratio=0.9), 4, 197, 1, tome_cap)
    expected, n = [], 197
    for _ in range(4):
        t = n - 1
        expected.append(int(t - t * 0.9))  # floor of the same float expression
        n -= expected[-1]
    assert res.r == expected == [19, 17, 16, 14]


def test_explicit_list_is_padded_with_zeros():
    res = resolve(make_spec(schedule="8, 4"), 3, 50, 1, tome_cap)
    assert res.r == [8, 4, 0] and res.tokens == [50, 42, 38, 38]
    assert make_spec(schedule=[1, 2]).per_layer == (1, 2) == ScheduleSpec(per_layer=[1, 2]).per_layer


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": -1}, "r must be >= 0, got -1"),
        ({"r": 2.5}, "r must be an integer, got 2.5"),
        ({"keep_ratio": 0.0}, "keep_ratio must be in (0, 1], got 0.0"),
        ({"keep_ratio": 1.5}, "keep_ratio must be in (0, 1], got 1.5"),
        ({"schedule": "8,x"}, "schedule must be a comma-separated list of integers, got '8,x'"),
        ({"schedule": [4, -2]}, "schedule entries must be >= 0, got -2"),
        ({"r": 4, "keep_ratio": 0.5}, "give only one of r, schedule, keep_ratio (got r, keep_ratio)"),
        ({"r": 4, "inflection": 2.0}, "inflection must be in [-1, 1], got 2.0"),
        ({"inflection": 0.5}, "--inflection needs --r"),
        ({"r": [1, 2]}, "r must be an integer, got [1, 2]"),
        ({"r": (4, 0.5)}, "r must be an integer, got (4, 0.5)"),
    ],
)
def test_bad_schedules_have_exact_messages(kwargs, message):
    with pytest.raises(TmergeError) as err:
        make_spec(**kwargs)
    assert str(err.value) == message


def test_specs_are_checked_however_they_are_made():
    assert make_spec() is None  # nothing asked for
    with pytest.raises(TmergeError, match=r"^keep_ratio must be in \(0, 1\], got 0$"):
        ScheduleSpec(keep_ratio=0)
    with pytest.raises(TmergeError, match="^give only one of r, schedule, keep_ratio"):
        ScheduleSpec(r=2, per_layer=(1,))
    with pytest.raises(TmergeError, match="^a schedule needs one of r, schedule or keep_ratio$"):
        ScheduleSpec()
    assert ScheduleSpec(r=2, inflection=0) == make_spec(r=2, inflection=0.0)


def test_list_longer_than_depth():
    with pytest.raises(TmergeError, match="^schedule has 4 entries but the model has only 3 blocks$"):
        resolve(make_spec(schedule=[1, 1, 1, 1]), 3, 50, 1, tome_cap)
