"""The one merge configuration: built from flags, given back as flags, read back from files."""

from __future__ import annotations

import copy
import json

import tmerge
from tests.helpers import parse_merge_flags, tiny_vit
from tmerge.cli import main
from tmerge.config import MERGE_FLAGS, SHIPPED, SHIPPED_IF_ANY, MergeConfig, upgrade_adapter_keys
from tmerge.merging import registry
from tmerge.models.spec import ModelSpec
from tmerge.schedule import ScheduleSpec

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=8,depth=2,embed_dim=48,num_heads=3"]


def _option_values(method: str):
    """Valid values of each declared option of ``method`` (None where None is its default)."""
    out = {}
    for name, opt in registry.get(method).options.items():
        high = None if opt.high == "depth" else opt.high
        if opt.type is int:
            values = st.integers(int(opt.low if opt.low is not None else -5), int(min(high or 64, 64)))
        else:
            values = st.floats(opt.low, high, exclude_min=opt.low_open, allow_nan=False, allow_infinity=False)
        out[name] = values | st.none() if opt.default is None else values
    return out


@st.composite
def configs(draw):
    method = draw(st.sampled_from(["none", *sorted(registry.available())]))
    prop_attn = draw(st.sampled_from([None, True, False]))
    if method == "none":
        return MergeConfig("none")
    schedule = draw(st.one_of(
        st.none(),
        st.builds(ScheduleSpec, r=st.integers(0, 40)),
        st.builds(ScheduleSpec, r=st.integers(0, 40), inflection=st.floats(-1, 1)),
        st.builds(ScheduleSpec, keep_ratio=st.floats(0, 1, exclude_min=True)),
        st.builds(ScheduleSpec, per_layer=st.lists(st.integers(0, 16), min_size=1, max_size=12).map(tuple)),
    ))
    values = _option_values(method)
    names = draw(st.lists(st.sampled_from(sorted(values)), unique=True)) if values else []
    options = {name: draw(values[name]) for name in names}
    path = st.text("abc_/.-0123456789", min_size=1, max_size=12).map(lambda p: f"adapters/{p}.safetensors")
    adapter = draw(st.one_of(st.just(SHIPPED_IF_ANY), path)) if MergeConfig(method).learned else None
    return MergeConfig(method, schedule, prop_attn, options, adapter)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs())
def test_flags_and_dict_give_back_the_same_config(config):
    flags = config.as_flags()
    assert parse_merge_flags(flags) == config  # through the command line's own parser
    values = {}
    for flag, value in zip(flags, flags[1:] + [None]):
        if flag in ("--prop-attn", "--no-prop-attn"):
            values["prop_attn"] = flag == "--prop-attn"
        elif flag.startswith("--") and not flag.startswith("--no-"):
            param = next(f.param for f in MERGE_FLAGS if flag in f.names)
            values.setdefault(param, []).append(value)
    values = {k: v if k in ("prop_attn", "option") else v[0] for k, v in values.items()}
    typed = {"r": int, "inflection": float, "keep_ratio": float}
    assert MergeConfig.from_cli(**{k: typed[k](v) if k in typed else v for k, v in values.items()}) == config
    assert MergeConfig.from_manifest(json.loads(json.dumps(config.as_dict()))) == config
    assert hash(copy.deepcopy(config)) == hash(config)


def test_one_constructor_for_loose_values():
    c = MergeConfig.of("pitome", keep_ratio=0.9, margin="0.8", prop_attn=False)
    assert c == MergeConfig("pitome", ScheduleSpec(keep_ratio=0.9), False, {"margin": 0.8}, None)
    assert MergeConfig.of("tome", r=8, inflection=0.5).schedule == ScheduleSpec(r=8, inflection=0.5)
    assert MergeConfig.of("tome", schedule="8,4").schedule.per_layer == (8, 4)
    assert MergeConfig.of("tome").schedule is None  # chosen later; applying it without one is an error
    assert MergeConfig.of("dtem", r=2).adapter == SHIPPED and MergeConfig.of("tome", r=2).adapter is None
    assert MergeConfig.from_cli("dtem", r=2).adapter == SHIPPED_IF_ANY
    assert MergeConfig.of("none") == MergeConfig("none") == MergeConfig.from_cli("none")


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "nope", "r": 2}, "unknown method 'nope'; available: none, "),
    ({"method": "none", "r": 8}, "method 'none' merges nothing: drop r"),
    ({"method": "none", "option": ["margin=1"]}, "method 'none' takes no options (got margin)"),
    ({"method": "tome", "r": 2, "option": ["margin=0.5"]}, "unknown option(s) for method tome: margin (known: none)"),
    ({"method": "tome", "r": 2, "option": ["r=3"]}, "unknown option(s) for method tome: r (known: none)"),
    ({"method": "pitome", "r": 2, "option": ["margin=abc"]}, "pitome option margin must be a number, got 'abc'"),
    ({"method": "pitome", "r": 2, "option": ["margin=2"]}, "pitome option margin must be >= -1 and <= 1, got 2.0"),
    ({"method": "tome", "inflection": 0.5}, "--inflection needs --r"),
    ({"method": "tome", "r": 2, "keep_ratio": 0.5}, "give only one of r, schedule, keep_ratio (got r, keep_ratio)"),
    ({"method": "tome", "r": 2, "adapter": "a.safetensors"}, "method tome learns nothing: it takes no adapter"),
    ({"method": "tome", "option": ["margin"]}, "--option takes KEY=VALUE, got 'margin'"),
])
def test_from_cli_refuses_bad_values_with_one_line(kwargs, message):
    with pytest.raises(tmerge.TmergeError) as err:
        MergeConfig.from_cli(**kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_untrained_learned_method_has_no_flags_but_a_dict():
    c = MergeConfig.of("dtem", r=2, adapter=None)
    with pytest.raises(tmerge.TmergeError, match="no command-line flags"):
        c.as_flags()
    assert c.as_dict()["adapter"] == "untrained" and MergeConfig.from_manifest(c.as_dict()) == c
    assert MergeConfig.of("dtem", r=2).as_flags() == ["--method", "dtem", "--r", "2"]  # shipped: the CLI's default


def test_older_manifests_and_reports_name_the_adapter_adapter_used():
    record = {"path": "rel/a.safetensors", "sha256": "00", "shipped": False}
    old = {"method": "dtem", "options": {"feat_dim": None}, "prop_attn": True, "layers": [{"r": 2}, {"r": 2}],
           "adapter": "/abs/a.safetensors", "adapter_used": record}
    assert upgrade_adapter_keys(old)["adapter"] == {**record, "path": "/abs/a.safetensors"}
    assert MergeConfig.from_manifest(old) == MergeConfig("dtem", ScheduleSpec(per_layer=(2, 2)), True,
                                                         {"feat_dim": None}, "/abs/a.safetensors")
    shipped = {**old, "adapter_used": {**record, "shipped": True}}
    del shipped["adapter"]
    assert MergeConfig.from_manifest(shipped).adapter == SHIPPED
    report = {"method": "ltm", "method_options": {"topk": 2}, "prop_attn": False, "schedule": [3, 1],
              "adapter_used": "untrained"}
    assert MergeConfig.from_manifest(report) == MergeConfig("ltm", ScheduleSpec(per_layer=(3, 1)), False,
                                                            {"topk": 2}, None)
    assert MergeConfig.from_manifest({"method": "none", "layers": [{"r": 0}]}) == MergeConfig("none")


def test_apply_takes_the_config_and_keeps_the_adapter_rule():
    model = tiny_vit("plain")
    merged = tmerge.apply(copy.deepcopy(model), MergeConfig.of("dtem", r=2, adapter=None))
    assert tmerge.merge_info(merged)["adapter"] == "untrained"
    with pytest.raises(tmerge.TmergeError, match="ships no adapter"):  # the API refuses to run it untrained by accident
        tmerge.apply(copy.deepcopy(model), MergeConfig.of("ltm", r=2))
    # the CLI's rule: the shipped adapter where the model has one, else untrained
    assert tmerge.merge_info(tmerge.apply(copy.deepcopy(model), MergeConfig.from_cli("ltm", r=2)))["adapter"] == "untrained"
    assert "merge_form" not in tmerge.merge_info(merged)  # an export's choice, not the model's


def test_model_spec_from_flags_and_back():
    spec = ModelSpec.from_cli("vit_tiny_patch16_224", "img_size=32,global_pool=avg,qkv_bias=true", "w.pth")
    assert spec.kwargs == {"img_size": 32, "global_pool": "avg", "qkv_bias": True}
    assert spec.as_flags() == ["--model", "vit_tiny_patch16_224", "--model-kwargs",
                               "img_size=32,global_pool=avg,qkv_bias=true", "--checkpoint", "w.pth"]
    assert ModelSpec.from_cli(*spec.as_flags()[1::2]) == spec


def test_every_merge_flag_reaches_the_commands(capsys):
    """One option group: each merge command lists every merge flag with the same help."""
    from tmerge.cli.app import _register_commands, app

    import typer.main

    _register_commands()
    commands = typer.main.get_command(app).commands
    for name in ("export", "profile", "visualize"):
        opts = {o: p.help for p in commands[name].params for o in p.opts}
        for flag in MERGE_FLAGS:
            assert opts[flag.names[0].split("/")[0]] == flag.help, (name, flag.param)
    assert "--adapter" not in {o for p in commands["schedule"].params for o in p.opts}
    train = {p.name: p for p in commands["train"].params}
    assert train["method"].default == "dtem" and "--adapter" not in train


def test_profile_onnx_refuses_merge_flags(tmp_path, capsys):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"")
    assert main(["profile", *TINY, "--onnx", str(onnx), "--method", "pitome", "--r", "2", "--no-prop-attn",
                 "-o", "margin=0.5"]) == 2
    err = capsys.readouterr().err
    assert "--r, --prop-attn, --option: with --onnx the merge settings come from the export's manifest" in err
