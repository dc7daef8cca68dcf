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
