"""ONNX export: both graph forms, ToMe and PiToMe, tiny model variants, dynamic batch, manifest,
and every error path. Exports are module-scoped fixtures so each graph is built once."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import tmerge  # noqa: F401  (before timm)
import timm
from timm.models import register_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from tmerge.cli import main  # noqa: E402
from tmerge.errors import TmergeError, VerificationError  # noqa: E402
from tmerge.export import export, export_onnx  # noqa: E402
from tmerge.export import onnx as exonnx  # noqa: E402

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
MERGE_OPS = {"TopK", "ArgMax", "ScatterElements", "GatherElements", "CumSum"}


def _register():
    variants = {
        "tmt_vit": ("vit_tiny_patch16_224", {}),
        "tmt_deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
        "tmt_vit_ls": ("vit_tiny_patch16_224", {"init_values": 1e-2}),
        "tmt_vit_avg": ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False}),
    }
    for name, (arch, extra) in variants.items():
        if timm.is_model(name):
            continue

        def make(pretrained=False, _arch=arch, _extra=extra, **kwargs):
            kw = {**TINY, **_extra, **kwargs}
            return timm.create_model(_arch, pretrained=False, **kw)

        make.__name__ = name
        make.__module__ = __name__
        register_model(make)


_register()


def tiny(name: str, method: str = "tome", seed: int = 0, **apply_kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name).eval()
    if method != "none":
        tmerge.apply(model, method, **({"r": 3} | apply_kwargs))
    return model


def run_ort(path, images: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": images.numpy()})[0]


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def exported(outdir):
    """(form, method) on the plain tiny ViT -> (model, ExportResult); built lazily, once."""
    cache = {}

    def get(form: str, method: str, name: str = "tmt_vit"):
        key = (form, method, name)
        if key not in cache:
            model = tiny(name, method)
            result = export_onnx(model, outdir / f"{name}_{method}_{form}.onnx", ops=form, batch_size=2,
                                 dynamic_batch=True, model_name=name)
            cache[key] = (model, result)
        return cache[key]

    return get


FORMS_METHODS = [("portable", "tome"), ("plugin", "tome"), ("portable", "pitome"), ("plugin", "pitome")]


@pytest.mark.parametrize("form,method", FORMS_METHODS)
def test_forms_check_and_run_with_dynamic_batch(exported, form, method):
    model, result = exported(form, method)
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    for batch in (1, 5):  # exported at 2
        images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = model(images).numpy()
        out = run_ort(result.path, images)
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() <= 1e-4
    assert result.parity["verified"] and result.parity["max_abs_diff"] <= 1e-4
    assert not any(p.name.endswith(".tmp") for p in result.path.parent.iterdir())


@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_portable_graph_is_standard_ops_static_but_batch(exported, method):
    _, result = exported("portable", method)
    proto = onnx.load(str(result.path))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert not proto.functions
    ops = {n.op_type for n in proto.graph.node}
    assert {"TopK", "ScatterElements"} <= ops
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    for vi in [*inferred.graph.input, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch"
        assert all(d.HasField("dim_value") for d in dims[1:])
    assert [o.name for o in proto.graph.output] == ["output"]  # slot outputs stripped


@pytest.mark.parametrize("method,op_type", [("tome", "BipartiteMerge"), ("pitome", "PiToMeMerge")])
def test_plugin_graph_nodes_and_functions(exported, method, op_type):
    model, result = exported("plugin", method)
    proto = onnx.load(str(result.path))
    merges = [n for n in proto.graph.node if n.domain == "tmerge"]
    assert [n.op_type for n in merges] == [op_type, op_type]
    assert any(o.domain == "tmerge" for o in proto.opset_import)
    assert proto.ir_version >= 10
    # no standard merge ops left in the main graph: they live in the functions
    assert not ({n.op_type for n in proto.graph.node} & {"TopK", "ScatterElements", "ArgMax"})
    funcs = {(f.domain, f.name, f.overload): f for f in proto.functions}
    tokens = model.blocks.schedule.tokens
    for layer, node in enumerate(merges):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"tmerge" and attrs["plugin_version"] == b"1"
        assert attrs["r"] == 3 and attrs["num_tokens"] == tokens[layer] and attrs["num_prefix"] == 1
        assert attrs["class_token"] == 1 and attrs["layer"] == layer
        assert list(node.input)[1:] and len(node.input) == 3 and len(node.output) == 2
        fn = funcs[("tmerge", op_type, f"layer{layer}")]
        assert node.overload == f"layer{layer}"
        assert list(fn.input) == ["x", "size", "keys"] and list(fn.output) == ["x_out", "size_out"]
        assert set(attrs) <= set(fn.attribute)
        assert MERGE_OPS & {n.op_type for n in fn.node}
        if method == "pitome":
            assert attrs["margin"] == pytest.approx(model.blocks.method.margin(layer))
            assert attrs["bsm"] == int(model.blocks.method.uses_bsm(layer))
    assert result.manifest["plugin_nodes"][0]["op_type"] == op_type


def test_manifest(exported):
    model, result = exported("portable", "tome")
    manifest = json.loads(result.manifest_path.read_text())
    assert result.manifest_path == result.path.with_name(result.path.name + ".json")
    assert manifest["model"] == "tmt_vit"
    assert len(manifest["weights_sha256"]) == 64
    assert manifest["method"] == "tome" and manifest["schedule"] == "r=3"
    assert [l["r"] for l in manifest["layers"]] == [3, 3]
    assert manifest["tokens"] == [17, 14, 11]
    assert manifest["layers"][1] == {"layer": 1, "r": 3, "tokens_in": 14, "tokens_out": 11}
    flops = manifest["flops"]
    assert 0 < flops["merged_per_image"] < flops["unmerged_per_image"]
    assert flops["ratio"] == pytest.approx(flops["merged_per_image"] / flops["unmerged_per_image"])
    assert manifest["parity"]["max_abs_diff"] <= 1e-4 and manifest["parity"]["atol"] == 1e-4
    assert manifest["opset"] == 18 and manifest["dynamic_batch"] is True
    for pkg in ("torch", "timm", "onnx", "onnxruntime"):
        assert manifest["versions"][pkg]
    assert manifest["file_sha256"]
    # per-layer indices were compared, not only outputs
    assert all(c["slot_mismatch"] == {} for c in manifest["parity"]["checks"])


@pytest.mark.parametrize("name,method,form", [  # avg-pool: see the CLI test
    ("tmt_deit_distilled", "tome", "plugin"),
    ("tmt_vit_ls", "pitome", "portable"),
])
def test_model_variants(exported, name, method, form):
    model, result = exported(form, method, name)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(images).numpy()
    assert np.abs(run_ort(result.path, images) - ref).max() <= 1e-4
    prefix = {"tmt_deit_distilled": 2, "tmt_vit_ls": 1}[name]
    assert model.blocks.num_prefix == prefix
    if form == "plugin":
        proto = onnx.load(str(result.path))
        node = next(n for n in proto.graph.node if n.domain == "tmerge")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["num_prefix"] == prefix


# ---------------------------------------------------------------------------------------------
# verification: near-ties vs bugs


class _FakeSession:
    def __init__(self, outputs):
        self.outputs = outputs

    def run(self, _names, _feeds):
        return self.outputs


def _plans(model, images):
    from tmerge.export.verify import torch_reference

    out, plans = torch_reference(model, images)
    return out, [p.numpy().copy() for p in plans]


def test_verify_tells_near_ties_from_bugs():
    from tmerge.export.verify import compare_once, torch_replay

    model = tiny("tmt_vit", "tome")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ref, plans = _plans(model, images)
    layers = [0, 1]
    ok, _ = compare_once(model, _FakeSession([ref.numpy(), *plans]), images, layers, 1e-4)
    assert ok["verdict"] == "ok" and ok["slot_mismatch"] == {}

    # the other runtime routed two tokens of layer 0 differently (swap two merged tokens' slots)
    other = [p.copy() for p in plans]
    s = other[0][0]
    i, j = next((a, b) for a in range(2, 17, 2) for b in range(a + 2, 17, 2) if s[a] != s[b])
    s[i], s[j] = s[j], s[i]
    replay = torch_replay(model, images, {0: other[0], 1: other[1]}).numpy()
    # its layer-1 slots follow from its own layer-0 result; take them from the replay's choices
    tie, _ = compare_once(model, _FakeSession([replay, *other]), images, layers, 1e-4)
    if np.abs(replay - ref.numpy()).max() > 1e-4:
        assert tie["verdict"] == "near-tie" and 0 in tie["slot_mismatch"]
        assert tie["replay_max_abs_diff"] <= 1e-4

    bug, _ = compare_once(model, _FakeSession([ref.numpy() + 1e-2, *plans]), images, layers, 1e-4)
    assert bug["verdict"] == "bug"  # same choices, different numbers
    bug2, _ = compare_once(model, _FakeSession([replay + 1e-2, *other]), images, layers, 1e-4)
    assert bug2["verdict"] == "bug"  # different choices that do not explain the outputs


def test_parity_failure_exits_1_and_writes_nothing(exported, tmp_path, monkeypatch):
    model, result = exported("portable", "tome")
    # a broken graph: the head bias shifted (same merge choices, wrong numbers)
    proto = onnx.load(str(result.path))
    bias = next(i for i in proto.graph.initializer if i.name == "head.bias")
    arr = onnx.numpy_helper.to_array(bias) + 0.5
    bias.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), bias.name))
    monkeypatch.setattr(exonnx, "build_graph", lambda *a, **k: (proto, []))
    out = tmp_path / "broken.onnx"
    with pytest.raises(VerificationError, match="parity failed"):
        export_onnx(model, out)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(1)
    model = timm.create_model("tmt_vit_avg")
    torch.save(model.state_dict(), d / "avg.pth")
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(d / "avg.safetensors"))
    (d / "corrupt.pth").write_bytes(b"not a checkpoint")
    torch.save(timm.create_model("tmt_vit").state_dict(), d / "other.pth")
    return d


def test_cli_export_avg_pool_static_batch_with_checkpoint(checkpoint, tmp_path, capsys):
    """CLI end to end: avg-pool model without class token, .safetensors weights, static batch 3,
    one-hot merge form."""
    out = tmp_path / "cli.onnx"
    rc = main(["export", "--model", "tmt_vit_avg", "--checkpoint", str(checkpoint / "avg.safetensors"),
               "--method", "tome", "--r", "2", "--batch", "3", "--merge-form", "onehot", "--out", str(out), "--json"])
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
    reference = timm.create_model("tmt_vit_avg").eval()
    assert data["weights_sha256"] == weights_sha256(reference)
    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    reductions = [a.s for n in proto.graph.node if n.op_type == "ScatterElements" for a in n.attribute
                  if a.name == "reduction"]
    assert b"add" not in reductions  # the merge itself is a matmul, no ScatterElements(add)
    tmerge.apply(reference, "tome", r=2)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert np.abs(run_ort(out, images) - reference(images).numpy()).max() <= 1e-4

    # `tmerge profile --onnx` rebuilds the pair from the manifest's model_name (its "model" is a label)
    manifest_path = Path(str(out) + ".json")
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "model": "tmt_vit_avg (a display label)"}))
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
    import tmerge.export as exporter_pkg

    _, result = exported("plugin", "tome")
    monkeypatch.setattr(exporter_pkg, "export", lambda **kwargs: result)
    rc = main(["export", "--model", "tmt_vit", "--r", "3", "--ops", "plugin", "--out", str(tmp_path / "x.onnx")])
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
    _fails(["--model", "tmt_vit", "--method", "nope", "--r", "2", "--out", str(tmp_path / "a.onnx")], tmp_path,
           capsys, match="unknown method")


@pytest.mark.parametrize("ckpt,match", [("missing.pth", "does not exist"), ("corrupt.pth", "could not be read"),
                                        ("other.pth", "does not match")])
def test_error_checkpoints(checkpoint, tmp_path, capsys, ckpt, match):
    _fails(["--model", "tmt_vit_avg", "--checkpoint", str(checkpoint / ckpt), "--r", "2",
            "--out", str(tmp_path / "a.onnx")], tmp_path, capsys, match=match)


def test_error_unwritable_out(tmp_path, capsys):
    _fails(["--model", "tmt_vit", "--r", "2", "--out", str(tmp_path / "no" / "a.onnx")], tmp_path, capsys,
           match="does not exist")
    _fails(["--model", "tmt_vit", "--r", "2", "--out", str(tmp_path)], tmp_path, capsys, match="directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
        _fails(["--model", "tmt_vit", "--r", "2", "--out", str(ro / "a.onnx")], tmp_path, capsys,
               match="not writable")
    finally:
        ro.chmod(stat.S_IRWXU)


def test_error_unwritable_out_as_root(tmp_path, capsys, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    _fails(["--model", "tmt_vit", "--r", "2", "--out", str(tmp_path / "a.onnx")], tmp_path, capsys,
           match="not writable")


def test_error_opset_too_old(tmp_path, capsys):
    _fails(["--model", "tmt_vit", "--r", "2", "--opset", "17", "--out", str(tmp_path / "a.onnx")], tmp_path,
           capsys, match="opset 17 is too old")


@pytest.mark.parametrize("args,match", [
    (["--r", "9"], "impossible"),  # 16 patch tokens: at most 8 per block
    (["--schedule", "2,8"], "impossible"),  # block 1 has 15 tokens: at most 7
])
def test_error_impossible_r(tmp_path, capsys, args, match):
    _fails(["--model", "tmt_vit", *args, "--out", str(tmp_path / "a.onnx")], tmp_path, capsys, match=match)


def test_error_trt_without_tensorrt(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed")
    except ImportError:
        pass
    err = _fails(["--model", "tmt_vit", "--r", "2", "--format", "trt", "--out", str(tmp_path / "a.engine")],
                 tmp_path, capsys, match="TensorRT is not installed")
    assert "pip install 'tmerge[trt]'" in err and "tensorrt>=10.9" in err


def test_error_bad_flags(tmp_path, capsys):
    _fails(["--model", "tmt_vit", "--r", "2", "--ops", "fancy", "--out", str(tmp_path / "a.onnx")], tmp_path, capsys,
           match="--ops")
    _fails(["--model", "tmt_vit", "--r", "2", "--format", "tflite", "--out", str(tmp_path / "a.onnx")], tmp_path,
           capsys, match="--format")
    _fails(["--model", "tmt_vit", "--r", "2", "--fp16", "--out", str(tmp_path / "a.onnx")], tmp_path, capsys,
           match="--fp16")
    _fails(["--model", "tmt_vit", "--r", "2"], tmp_path, capsys, match="--out")


def test_python_api_errors(tmp_path):
    model = tiny("tmt_vit", "tome")
    with pytest.raises(TmergeError, match="opset"):
        export_onnx(model, tmp_path / "a.onnx", opset=13)
    with pytest.raises(TmergeError, match="batch"):
        export_onnx(model, tmp_path / "a.onnx", batch_size=0)
    with pytest.raises(TmergeError, match="unknown method"):
        export(model_name="tmt_vit", method="nope", r=2, out=tmp_path / "a.onnx")
    assert list(tmp_path.iterdir()) == []
