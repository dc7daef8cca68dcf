"""`tmerge profile --onnx` reports only what it has checked against the file: the manifest must
describe the very file (sha256, merge nodes) and the file must compute what the model rebuilt from
the manifest computes; the parity it reports is measured on load, never copied from the manifest."""

from __future__ import annotations

import json
import os
import shutil
import stat

from tmerge.cli import main

import pytest

pytest.importorskip("onnxruntime")

TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs",
        "img_size=32,patch_size=8,depth=2,embed_dim=48,num_heads=3,num_classes=10"]
PROFILE = ["--backends", "onnxruntime", "--batch-sizes", "2", "--warmup", "0", "--iters", "2", "--no-drift", "--json"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two exports of the same random-init backbone (r=4 and r=2), made under umask 022."""
    folder = tmp_path_factory.mktemp("exports")
    old = os.umask(0o022)
    try:
        for r in ("4", "2"):
            assert main(["export", *TINY, "--r", r, "--out", str(folder / f"r{r}.onnx"), "--json"]) == 0
    finally:
        os.umask(old)
    return folder


def _profile(path, capsys):
    code = main(["profile", "--onnx", str(path), *PROFILE])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _copy(exports, tmp_path, name="r4"):
    for suffix in (".onnx", ".onnx.json"):
        shutil.copy(exports / f"{name}{suffix}", tmp_path / f"m{suffix}")
    return tmp_path / "m.onnx"


def test_untouched_export_profiles_with_parity_measured_on_load(exports, tmp_path, capsys):
    code, out, err = _profile(_copy(exports, tmp_path), capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["schedule"] == [4, 4]
    parity = report["latency"][0]["artifacts"]["merged"]["parity"]
    assert parity["checked_by"] == "profile (on load)" and parity["verified"] and parity["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("edit, message", [
    (lambda m: [layer.update(r=2) for layer in m["layers"]], "does not compute what its manifest describes"),
    (lambda m: m.update(method="pitome"), "does not compute what its manifest describes"),
    (lambda m: m.update(file_sha256="0" * 64), "is not the file its manifest describes"),
    (lambda m: m.pop("file_sha256"), "records no file_sha256"),
    (lambda m: m["parity"].update(verified=True, max_abs_diff=0.0), None),  # harmless: parity is re-measured
])
def test_edited_manifest_is_refused(exports, tmp_path, capsys, edit, message):
    path = _copy(exports, tmp_path)
    manifest_file = tmp_path / "m.onnx.json"
    manifest = json.loads(manifest_file.read_text())
    edit(manifest)
    manifest_file.write_text(json.dumps(manifest))
    code, out, err = _profile(path, capsys)
    if message is None:
        assert code == 0 and json.loads(out)["latency"][0]["artifacts"]["merged"]["parity"]["max_abs_diff"] > 0
        return
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_reexported_file_without_its_manifest_is_refused(exports, tmp_path, capsys):
    path = _copy(exports, tmp_path)
    shutil.copy(exports / "r2.onnx", path)  # the r=2 graph beside the r=4 manifest
    code, _, err = _profile(path, capsys)
    assert code == 2 and "is not the file its manifest describes" in err


def test_random_init_exports_share_the_backbone_hash(exports):
    """Export seeds the initialisation like profile: one backbone, one hash, whatever r."""
    hashes = {json.loads((exports / f"r{r}.onnx.json").read_text())["weights_sha256"] for r in (4, 2)}
    assert len(hashes) == 1


def test_exported_files_are_readable_by_others(exports, tmp_path, capsys):
    """The atomic writer honours the umask (0644 under 022), like a plain open() would."""
    for name in ("r4.onnx", "r4.onnx.json"):
        assert stat.S_IMODE((exports / name).stat().st_mode) == 0o644, name
    old = os.umask(0o022)
    try:
        code = main(["profile", *TINY, "--r", "2", "--onnx-dir", str(tmp_path / "kept"), "--out",
                     str(tmp_path / "report.json"), *PROFILE])
    finally:
        os.umask(old)
    assert code == 0, capsys.readouterr().err
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in written), written
