"""Bad or unusual input on every command: one `error:` line and exit 2 before any work, nothing
written; options named alike everywhere; nothing accepted and then ignored."""

from __future__ import annotations

import json
import os
import time

from tmerge.cli import main

import pytest

KWARGS = "img_size=32,patch_size=8,depth=2,embed_dim=48,num_heads=3,num_classes=10"
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", KWARGS]
FAST_PROFILE = ["--iters", "1", "--warmup", "0", "--no-drift"]


def refused(capsys, argv, message, folder=None):
    before = sorted(folder.rglob("*")) if folder is not None else None
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
    assert message in err, (argv, err)
    if folder is not None:
        assert sorted(folder.rglob("*")) == before, argv
    return err


@pytest.fixture
def readonly(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o555)
    yield folder
    os.chmod(folder, 0o755)


def test_output_paths_are_checked_before_the_work(tmp_path, readonly, capsys):
    """Finding 4 and 13: a folder or read-only folder as output, or a missing folder, is refused
    up front by every command (nothing is created)."""
    (tmp_path / "afile").write_text("x")
    report = tmp_path / "r.json"
    assert main(["profile", *TINY, "--r", "2", *FAST_PROFILE, "--out", str(report)]) == 0
    capsys.readouterr()
    cases = [
        (["profile", *TINY, "--r", "2", *FAST_PROFILE, "--out", str(tmp_path)], "is a directory"),
        (["profile", *TINY, "--r", "2", *FAST_PROFILE, "--out", str(readonly / "r.json")], "not writable"),
        (["profile", *TINY, "--r", "2", *FAST_PROFILE, "--out", str(tmp_path / "new" / "r.json")],
         "directory " + str(tmp_path / "new") + " does not exist"),
        (["check", str(report), "--baseline", str(tmp_path), "--update-baseline"], "is a directory"),
        (["check", str(report), "--baseline", str(readonly / "b.json"), "--update-baseline"], "not writable"),
        (["check", str(report), "--baseline", str(tmp_path / "new" / "b.json"), "--update-baseline"],
         "does not exist"),
        (["visualize", *TINY, "--r", "2", "--image", "astronaut", "--out", str(readonly / "v.png")], "not writable"),
        (["visualize", *TINY, "--r", "2", "--image", "astronaut", "--out", str(tmp_path / "new" / "v.png")],
         "does not exist"),
        (["sweep", *TINY, "--r", "2", *FAST_PROFILE, "--out-dir", str(tmp_path / "afile")], "is a file, not a folder"),
        (["sweep", *TINY, "--r", "2", *FAST_PROFILE, "--out-dir", str(readonly)], "not writable"),
        (["train", *TINY, "--r", "2", "--steps", "1", "--out", str(readonly / "a.safetensors")], "not writable"),
        (["export", *TINY, "--r", "2", "--out", str(readonly / "m.onnx")], "not writable"),
    ]
    for argv, message in cases:
        if message == "not writable" and os.geteuid() == 0:  # root writes into read-only folders
            continue
        refused(capsys, argv, message, tmp_path)


@pytest.mark.parametrize("argv, message", [
    # finding 6: sizes that cannot fit are refused before anything is allocated
    (["profile", *TINY, "--r", "2", *FAST_PROFILE, "--batch-sizes", "100000000000"], "GiB of memory is available"),
    (["export", *TINY, "--r", "2", "--out", "m.onnx", "--batch-size", "100000000000"], "GiB of memory is available"),
    (["profile", *TINY, "--r", "2", "--iters", "1", "--num-images", "100000000000"], "GiB of memory is available"),
    # finding 10: no silent capping where export refuses
    (["schedule", *TINY, "--r", "1000"], "r=1000 is impossible at block 0"),
    (["profile", *TINY, "--r", "1000", *FAST_PROFILE], "r=1000 is impossible at block 0"),
    (["schedule", *TINY, "--schedule", "2,100"], "r=100 is impossible at block 1"),
    # finding 11: nothing accepted and ignored
    (["schedule", *TINY, "--method", "none", "--r", "8"], "method 'none' merges nothing: drop r"),
    (["profile", *TINY, "--r", "2", *FAST_PROFILE, "--onnx-dir", "kept"], "--onnx-dir keeps the ONNX files"),
    (["profile", *TINY, "--r", "2", "--iters", "1", "--no-drift", "--num-images", "4"], "--num-images is for drift"),
    (["schedule", *TINY], "method 'tome' needs a schedule"),
    (["export", *TINY, "--out", "m.onnx"], "method 'tome' needs a schedule"),
    (["schedule", *TINY, "--schedule", ""], "schedule must be a comma-separated list of integers"),
    (["schedule", *TINY, "--schedule", "8,,8"], "schedule must be a comma-separated list of integers"),
    (["profile", *TINY, "--r", "2", *FAST_PROFILE, "--batch-sizes", "1,,8"], "--batch-sizes takes a comma list"),
    (["profile", *TINY, "--method", "none", "--merge-form", "onehot", *FAST_PROFILE], "--merge-form applies to merged"),
    # finding 13: messages that say what is wrong
    (["profile", *TINY, "--r", "2", *FAST_PROFILE, "--checkpoint", "."], "checkpoint . is a directory, not a file"),
    (["visualize", *TINY, "--r", "2", "--image", ".", "--out", "v.png"], "image . is a directory, not a file"),
    (["profile", *TINY, "--r", "2", "--iters", "1", "--data", "./no/such/folder"],
     "image folder ./no/such/folder does not exist"),
    (["profile", *TINY, "--r", "2", *FAST_PROFILE, "--model-kwargs", "img_size=-1"], "cannot be built"),
])
def test_refused_before_work(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    refused(capsys, argv, message, tmp_path)


def test_sweep_validates_every_point_first_and_keeps_only_its_own_files(tmp_path, capsys):
    """Finding 7: a bad keep ratio fails before any point runs; --r is not defaulted when only
    --keep-ratios is given; point files of an earlier sweep do not survive into this one."""
    out = tmp_path / "sw"
    refused(capsys, ["sweep", *TINY, "--keep-ratios", "1.5", *FAST_PROFILE, "--out-dir", str(out)],
            "keep_ratio must be in (0, 1]", tmp_path)
    assert main(["sweep", *TINY, "--methods", "tome", "--r", "2", *FAST_PROFILE, "--out-dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["sweep", *TINY, "--methods", "pitome,none", "--keep-ratios", "0.9", *FAST_PROFILE,
                 "--out-dir", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [(p["method"], p["point"]) for p in summary["points"]] == [("none", "unmerged"), ("pitome", "keep=0.9")]
    assert sorted(p.name for p in (out / "points").iterdir()) == ["none_unmerged.json", "pitome_keep0.9.json"]


def test_shared_options_have_one_name_everywhere(capsys):
    """Finding 12: --model-kwargs on every model-building command, --num-images (not --n-images),
    -O for --out, --merge-form on profile, sweep accepts `none`."""
    from tmerge.cli.app import _register_commands, app

    _register_commands()
    import typer.main

    click_app = typer.main.get_command(app)
    names = {name: {o for p in cmd.params for o in p.opts} for name, cmd in click_app.commands.items()}
    for command in ("schedule", "export", "profile", "sweep", "visualize", "train"):
        assert {"--model", "--model-kwargs", "--checkpoint", "--json"} <= names[command], command
    for command in ("export", "profile", "visualize", "train"):
        assert {"--out", "-O"} <= names[command], command
    assert "--num-images" in names["train"] and "--n-images" not in names["train"]
    assert "--batch-size" in names["export"] and "--batch" not in names["export"]
    assert "--merge-form" in names["profile"] and "--merge-form" in names["sweep"]


def test_export_defaults_line_up_with_profile_and_record_absolute_paths(tmp_path, capsys, monkeypatch):
    """Finding 10: the default export has a dynamic batch (profile's default batch 1 can time it)
    and the manifest records the checkpoint as an absolute path."""
    pytest.importorskip("onnxruntime")
    import timm
    import torch

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", **json.loads(
        "{" + ",".join(f'"{k}": {v}' for k, v in (kv.split("=") for kv in KWARGS.split(","))) + "}"))
    torch.save(net.state_dict(), tmp_path / "w.pth")
    monkeypatch.chdir(tmp_path)
    assert main(["export", *TINY, "--checkpoint", "w.pth", "--r", "2", "--out", "m.onnx", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["dynamic_batch"] is True and manifest["checkpoint"] == str(tmp_path / "w.pth")
    monkeypatch.chdir(tmp_path.parent)  # the manifest works from anywhere
    assert main(["profile", "--onnx", str(tmp_path / "m.onnx"), "--backends", "onnxruntime", "--iters", "1",
                 "--warmup", "0", "--no-drift", "--json"]) == 0, capsys.readouterr().err


def test_offline_pretrained_fails_fast(capsys, monkeypatch):
    """Finding 10: without a reachable hub, --pretrained fails at once in one line (no retries)."""
    from tmerge.models import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(hub, "in_hub_cache", lambda name: False)
    start = time.perf_counter()
    refused(capsys, ["profile", "--model", "vit_tiny_patch16_224", "--pretrained", "--r", "2", *FAST_PROFILE],
            "is unreachable; offline, pass --checkpoint")
    assert time.perf_counter() - start < 10
