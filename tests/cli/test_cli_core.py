"""`tmerge methods` and `tmerge schedule` through the real CLI entry point."""

import json

from tmerge.cli import main


def test_methods_json(capsys):
    assert main(["methods", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert {"tome", "pitome"} <= set(rows)
    assert rows["pitome"]["options"]["margin"]["default"] == 0.75
    assert rows["tome"]["prop_attn_default"] is True


def test_schedule_table_and_json(capsys):
    args = ["schedule", "--model", "vit_tiny_patch16_224", "--method", "tome", "--r", "16"]
    assert main(args + ["--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["r"][:11] == [16] * 11 and info["r"][11] == 10
    assert info["tokens"][0] == 197 and info["tokens"][-1] == 11
    assert info["capped"] == [{"layer": 11, "asked": 16, "applied": 10}]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "capped from 16" in out and "proportional attention: on" in out


def test_schedule_keep_ratio_with_options(capsys):
    args = ["schedule", "--model", "vit_tiny_patch16_224", "--method", "pitome", "--keep-ratio", "0.9",
            "-o", "margin=0.9", "--json"]
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["r"][0] == 19 and info["options"]["margin"] == 0.9 and info["prop_attn"] is False


def test_bad_input_is_one_line_and_exit_2(capsys):
    cases = [
        (["schedule", "--model", "vit_tiny_patch16_224", "--r", "-1"], "error: r must be >= 0, got -1\n"),
        (["schedule", "--model", "vit_tiny_patch16_224", "--method", "nope", "--r", "2"],
         "error: unknown method 'nope'; available: "),
        (["schedule", "--model", "vit_tiny_patch16_224", "--r", "2", "--keep-ratio", "0.5"],
         "error: give only one of r, schedule, keep_ratio (got r, keep_ratio)\n"),
        (["schedule", "--model", "vit_tiny_patch16_224", "-o", "margin"], "error: --option takes KEY=VALUE, got 'margin'\n"),
        (["schedule", "--bogus"], "error: No such option: --bogus"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(expected) and err.count("\n") == 1, (argv, err)


import pytest

TINY = ["--model", "vit_tiny_patch16_224", "--r", "2"]


@pytest.mark.parametrize("args, message", [
    (["--method", "pitome", "-o", "margin=abc"], "pitome option margin must be a number, got 'abc'"),
    (["--method", "pitome", "-o", "alpha=abc"], "pitome option alpha must be a number"),
    (["--method", "pitome", "-o", "bsm_layers=abc"], "pitome option bsm_layers must be an integer"),
    (["--method", "pitome", "-o", "margin=nan"], "pitome option margin must be a number, got 'nan'"),
    (["--method", "pitome", "-o", "bsm_layers=-3"], "pitome option bsm_layers must be >= 0 and <= 12"),
    (["--method", "pitome", "-o", "bsm_layers=100"], "pitome option bsm_layers must be >= 0 and <= 12"),
    (["--method", "pitome", "-o", "bsm_layers=1.5"], "pitome option bsm_layers must be an integer"),
    (["--method", "dtem", "-o", "feat_dim=abc"], "dtem option feat_dim must be an integer"),
    (["--method", "ltm", "-o", "mask_dim=-1"], "ltm option mask_dim must be >= 1"),
    (["--method", "ltm", "-o", "topk=0"], "ltm option topk must be >= 1"),
    (["--method", "pitome", "-o", "margin=1", "-o", "margin=2"], "--option margin is given twice"),
])
def test_method_options_are_validated(capsys, args, message):
    assert main(["schedule", *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}" + err[len("error: ") + len(message):] and err.count("\n") == 1, err


def test_method_option_values_are_typed(capsys):
    assert main(["schedule", *TINY, "--method", "pitome", "-o", "margin=0.5", "-o", "bsm_layers=3", "--json"]) == 0
    options = json.loads(capsys.readouterr().out)["options"]
    assert options == {"margin": 0.5, "bsm_layers": 3, "alpha": 1.0}


def test_learned_method_without_adapter_warns_once(tmp_path, capsys, monkeypatch):
    """export / profile of DTEM or LTM on a model with no shipped adapter and no --adapter say (one
    stderr line, once per method) that the method runs untrained; an explicit adapter=None does not."""
    import copy

    import tmerge
    from tmerge.models import merged

    monkeypatch.setattr(merged, "_warned_untrained", set())
    tiny = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=8,depth=2", "--r", "2"]
    assert main(["export", *tiny, "--method", "dtem", "--out", str(tmp_path / "m.onnx")]) == 0
    warning = ("warning: dtem: no trained adapter for this model, running untrained (merges like ToMe); "
               "train one with `tmerge train --method dtem` and pass it with --adapter\n")
    assert capsys.readouterr().err == warning
    assert main(["profile", *tiny, "--method", "ltm", "--iters", "1", "--warmup", "0", "--num-images", "2",
                 "--json"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: ltm: no trained adapter for this model, running untrained") == 1, err
    assert "dtem" not in err
    model = tmerge.models.load_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    monkeypatch.setattr(merged, "_warned_untrained", set())
    tmerge.apply(copy.deepcopy(model), tmerge.MergeConfig.of("dtem", r=2, adapter=None))
    assert "warning" not in capsys.readouterr().err
