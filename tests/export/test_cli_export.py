"""``tmerge export`` end to end and its exit codes: 0 written, 2 bad input (one line on stderr,
nothing written), plus the Python API's input errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import tmerge
from tests.helpers import EXPORT_ARCH as ARCH
from tests.helpers import EXPORT_MODEL_KWARGS as MODEL_KWARGS
from tests.helpers import TINY_EXPORT, run_ort
from tests.helpers import tiny_export_model as tiny
from tmerge import MergeConfig, ModelSpec

import numpy as np
import pytest
import timm
import torch

onnx = pytest.importorskip("onnx")

from tmerge.cli import main  # noqa: E402
from tmerge.errors import TmergeError  # noqa: E402
from tmerge.export import export, export_onnx  # noqa: E402

AVG = dict(global_pool="avg", class_token=False)
TINY_ARGS = ["--model", ARCH, "--model-kwargs", MODEL_KWARGS]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(1)
    model = timm.create_model(ARCH, **TINY_EXPORT, **AVG)
    torch.save(model.state_dict(), d / "avg.pth")
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(d / "avg.safetensors"))
    (d / "corrupt.pth").write_bytes(b"not a checkpoint")
    torch.save(timm.create_model(ARCH, **TINY_EXPORT).state_dict(), d / "other.pth")
    return d


def test_cli_export_avg_pool_static_batch_with_checkpoint(checkpoint, tmp_path, capsys):
    """CLI end to end: avg-pool model without class token, .safetensors weights, static batch 3,
    one-hot merge form."""
    out = tmp_path / "cli.onnx"
    rc = main(["export", "--model", ARCH, "--model-kwargs", f"{MODEL_KWARGS},global_pool=avg,class_token=false",
               "--checkpoint", str(checkpoint / "avg.safetensors"),
               "--method", "tome", "--r", "2", "--batch-size", "3", "--static-batch", "--merge-form", "onehot", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads(captured.out)
    assert data["path"] == str(out) and out.is_file() and Path(str(out) + ".json").is_file()
    assert data["checkpoint"].endswith("avg.safetensors") and data["method"] == "tome"
    assert data["dynamic_batch"] is False and data["parity"]["batches"] == [3]
    assert data["tokens"] == [16, 14, 12]  # no class token: 16 patches, 2 merged per block
    assert data["merge_form"] == "onehot"
    from tmerge.models import weights_sha256

    torch.manual_seed(1)
    reference = timm.create_model(ARCH, **TINY_EXPORT, **AVG).eval()
    assert data["weights_sha256"] == weights_sha256(reference)
    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    reductions = [a.s for n in proto.graph.node if n.op_type == "ScatterElements" for a in n.attribute
                  if a.name == "reduction"]
    assert b"add" not in reductions  # the merge itself is a matmul, no ScatterElements(add)
    tmerge.apply(reference, MergeConfig.of("tome", r=2))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert np.abs(run_ort(out, images) - reference(images).numpy()).max() <= 1e-4

    # `tmerge profile --onnx` rebuilds the pair from the manifest's model_name and model_kwargs (its
    # "model" is a label)
    manifest_path = Path(str(out) + ".json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["model_kwargs"] == {**TINY_EXPORT, **AVG}
    manifest_path.write_text(json.dumps({**manifest, "model": f"{ARCH} (a display label)"}))
    args = ["profile", "--onnx", str(out), "--backends", "onnxruntime", "--warmup", "1", "--iters", "2", "--no-drift"]
    assert main([*args, "--batch-sizes", "1"]) == 2
    assert "exported with a static batch of 3: use --batch-sizes 3" in capsys.readouterr().err
    rc = main([*args, "--batch-sizes", "3", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    assert report["schedule"] == [2, 2] and report["latency"][0]["ratio_p50"] > 0


def test_cli_export_rich_summary(exported, tmp_path, capsys, monkeypatch):
    """The human summary renders from an export result (export itself reused from a fixture)."""
    import tmerge.cli.commands.export as export_command

    _, result = exported("plugin", "tome")
    monkeypatch.setattr(export_command, "export", lambda merge, **kwargs: result)
    rc = main(["export", *TINY_ARGS, "--r", "3", "--graph", "plugin", "--out", str(tmp_path / "x.onnx")])
    out = capsys.readouterr().out
    assert rc == 0 and "ONNX parity" in out and "tmerge::BipartiteMerge" in out and "GFLOPs" in out


def _fails(args, tmp_path, capsys, code=2, match=None):
    before = sorted(tmp_path.rglob("*"))
    rc = main(["export", *args])
    err = capsys.readouterr().err
    assert rc == code, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    if match:
        assert match in err, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
    return err


def test_error_unknown_model(tmp_path, capsys):
    _fails(["--model", "vit_nope_xyz", "--r", "2", "--out", str(tmp_path / "a.onnx")], tmp_path, capsys,
           match="unknown model")


def test_error_unknown_method(tmp_path, capsys):
    _fails([*TINY_ARGS, "--method", "nope", "--r", "2", "--out", str(tmp_path / "a.onnx")], tmp_path,
           capsys, match="unknown method")


@pytest.mark.parametrize("ckpt,match", [("missing.pth", "does not exist"), ("corrupt.pth", "could not be read"),
                                        ("other.pth", "does not match")])
def test_error_checkpoints(checkpoint, tmp_path, capsys, ckpt, match):
    _fails(["--model", ARCH, "--model-kwargs", f"{MODEL_KWARGS},global_pool=avg,class_token=false", "--checkpoint", str(checkpoint / ckpt), "--r", "2",
            "--out", str(tmp_path / "a.onnx")], tmp_path, capsys, match=match)


def test_error_unwritable_out(tmp_path, capsys):
    _fails([*TINY_ARGS, "--r", "2", "--out", str(tmp_path / "no" / "a.onnx")], tmp_path, capsys,
           match="does not exist")
    _fails([*TINY_ARGS, "--r", "2", "--out", str(tmp_path)], tmp_path, capsys, match="directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
        _fails([*TINY_ARGS, "--r", "2", "--out", str(ro / "a.onnx")], tmp_path, capsys,
               match="not writable")
    finally:
        ro.chmod(stat.S_IRWXU)


def test_error_unwritable_out_as_root(tmp_path, capsys, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    _fails([*TINY_ARGS, "--r", "2", "--out", str(tmp_path / "a.onnx")], tmp_path, capsys,
           match="not writable")


def test_error_opset_too_old(tmp_path, capsys):
    _fails([*TINY_ARGS, "--r", "2", "--opset", "17", "--out", str(tmp_path / "a.onnx")], tmp_path,
           capsys, match="opset 17 is too old")


@pytest.mark.parametrize("args,match", [
    (["--r", "9"], "impossible"),  # 16 patch tokens: at most 8 per block
    (["--schedule", "2,8"], "impossible"),  # block 1 has 15 tokens: at most 7
])
def test_error_impossible_r(tmp_path, capsys, args, match):
    _fails([*TINY_ARGS, *args, "--out", str(tmp_path / "a.onnx")], tmp_path, capsys, match=match)


def test_error_trt_without_tensorrt(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed")
    except ImportError:
        pass
    err = _fails([*TINY_ARGS, "--r", "2", "--format", "trt", "--out", str(tmp_path / "a.engine")],
                 tmp_path, capsys, match="TensorRT is not installed")
    assert "pip install 'tmerge[trt]'" in err and "tensorrt>=10.9" in err


def test_error_bad_flags(tmp_path, capsys):
    _fails([*TINY_ARGS, "--r", "2", "--graph", "fancy", "--out", str(tmp_path / "a.onnx")], tmp_path, capsys,
           match="--graph")
    _fails([*TINY_ARGS, "--r", "2", "--ops", "fancy", "--out", str(tmp_path / "a.onnx")], tmp_path, capsys,
           match="--graph")  # the old name of --graph
    _fails([*TINY_ARGS, "--r", "2", "--format", "tflite", "--out", str(tmp_path / "a.onnx")], tmp_path,
           capsys, match="--format")
    _fails([*TINY_ARGS, "--r", "2", "--fp16", "--out", str(tmp_path / "a.onnx")], tmp_path, capsys,
           match="--fp16")
    _fails([*TINY_ARGS, "--r", "2"], tmp_path, capsys, match="--out")


def test_python_api_errors(tmp_path):
    model = tiny("plain", "tome")
    with pytest.raises(TmergeError, match="opset"):
        export_onnx(model, tmp_path / "a.onnx", opset=13)
    with pytest.raises(TmergeError, match="batch"):
        export_onnx(model, tmp_path / "a.onnx", batch_size=0)
    with pytest.raises(TmergeError, match="unknown method"):
        export(MergeConfig.of("nope", r=2), model=ModelSpec(ARCH, TINY_EXPORT), out=tmp_path / "a.onnx")
    with pytest.raises(TmergeError, match="^merge_form must be one of gather, scatter, onehot, got 'bogus'$"):
        export(MergeConfig.of("tome", r=2), model=ModelSpec(ARCH, TINY_EXPORT), out=tmp_path / "a.onnx",
               merge_form="bogus")
    with pytest.raises(TmergeError, match="^--merge-form applies to merged models"):
        export_onnx(tiny("plain", "none"), tmp_path / "a.onnx", merge_form="onehot")
    assert list(tmp_path.iterdir()) == []
