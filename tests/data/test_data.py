"""Image sources (sample photos, folders, Fashion-MNIST) and the cached linear probe."""

from __future__ import annotations

import gzip
import json

import tmerge  # noqa: F401  (before timm)
from tmerge import data
from tmerge.errors import TmergeError

import numpy as np
import pytest
import timm
import torch
from PIL import Image

HAS_FASHION_MNIST = (data.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file()
needs_fashion_mnist = pytest.mark.skipif(
    not HAS_FASHION_MNIST, reason=f"apt-get install -y {data.FASHION_MNIST_PACKAGE}")


@pytest.fixture(scope="module")
def model():
    """A random 2-block ViT on 32x32 inputs (its timm config says 224: data_config must fix that)."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8).eval()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TMERGE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_class_folders(root, colours: dict[str, tuple[int, int, int]], per_class: int = 3, size=(20, 14)):
    """root/<class>/<i>.png: noisy images around one colour per class."""
    rng = np.random.default_rng(0)
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


# ----------------------------------------------------------------------------------------------
# sample photos


def test_sample_images_are_real_colour_photos():
    photos = data.sample_images()
    names = [name for name, _ in photos]
    assert {"astronaut", "chelsea", "coffee", "rocket"} <= set(names)
    for _name, image in photos:
        assert image.mode == "RGB" and min(image.size) >= 200
        assert np.asarray(image).std() > 20  # a photo, not a flat placeholder


def test_sample_views_are_deterministic_and_differ_between_seeds(model):
    a = data.sample_views(10, model, seed=0)
    assert a.shape == (10, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, data.sample_views(10, model, seed=0))
    assert not torch.allclose(a, data.sample_views(10, model, seed=1))
    flat = a.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(10) * 1e9).min() > 1.0  # ten distinct views


def test_load_images_samples_has_no_labels(model):
    images, labels, class_names = data.load_images("samples", model, n=3)
    assert images.shape == (3, 3, 32, 32) and labels is None and class_names is None


def test_data_config_follows_the_model_size(model):
    assert data.data_config(model)["input_size"] == (3, 32, 32)


# ----------------------------------------------------------------------------------------------
# folders


def test_image_folder_with_class_dirs_gives_labels(tmp_path, model):
    root = write_class_folders(tmp_path / "set", {"red": (220, 30, 30), "blue": (30, 30, 220)})
    (root / "notes.txt").write_text("not an image")
    images, labels, class_names = data.load_images(root, model)
    assert class_names == ["blue", "red"]  # sorted, as ImageFolder does
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert images.shape == (6, 3, 32, 32)
    # the colour survives preprocessing: red images have more red than blue
    assert (images[3:, 0].mean() > images[3:, 2].mean()) and (images[:3, 2].mean() > images[:3, 0].mean())


def test_folder_subset_is_seeded(tmp_path, model):
    root = write_class_folders(tmp_path / "set", {"a": (200, 0, 0), "b": (0, 200, 0)}, per_class=5)
    first = data.load_images(root, model, n=4, seed=3)
    again = data.load_images(root, model, n=4, seed=3)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    with pytest.raises(TmergeError, match="has 10 images, asked for 11"):
        data.load_images(root, model, n=11)
    with pytest.raises(TmergeError, match="at least 1, got 0"):
        data.load_images(root, model, n=0)


def test_flat_folder_has_no_labels(tmp_path, model):
    for i in range(3):
        Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.jpg")
    images, labels, class_names = data.load_images(tmp_path, model)
    assert images.shape == (3, 3, 32, 32) and labels is None and class_names is None


def test_empty_folder_is_an_error(tmp_path, model):
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "readme.md").write_text("no images here")
    with pytest.raises(TmergeError, match="no images"):
        data.load_images(tmp_path, model)


def test_unreadable_image_names_the_file(tmp_path, model):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(TmergeError, match="cannot read image .*broken.png"):
        data.load_images(tmp_path, model)


def test_unknown_source(model):
    with pytest.raises(TmergeError, match="unknown image source 'imagenet'"):
        data.load_images("imagenet", model)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST


@needs_fashion_mnist
def test_fashion_mnist_loads_with_labels(model):
    images, labels, class_names = data.load_images("fashion-mnist:test", model, n=40, seed=0)
    assert images.shape == (40, 3, 32, 32)
    assert class_names[0] == "T-shirt/top" and len(class_names) == 10
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() <= 9
    assert len(set(labels.tolist())) >= 5
    assert torch.equal(images[:, 0], images[:, 1])  # greyscale turned RGB (mean/std are equal per channel)
    assert torch.equal(labels, data.load_images("fashion-mnist:test", model, n=40, seed=0).labels)
    assert not torch.equal(labels, data.load_images("fashion-mnist:test", model, n=40, seed=1).labels)


@needs_fashion_mnist
def test_fashion_mnist_raw_arrays():
    pixels, labels = data.fashion_mnist("test")
    assert pixels.shape == (10000, 28, 28) and pixels.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10


def test_fashion_mnist_missing_names_the_apt_package(tmp_path, monkeypatch, model):
    monkeypatch.setattr(data.mnist, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(TmergeError, match="apt-get install -y dataset-fashion-mnist"):
        data.load_images("fashion-mnist", model, n=5)


def test_fashion_mnist_unknown_split(model):
    with pytest.raises(TmergeError, match="splits 'train' and 'test'"):
        data.load_images("fashion-mnist:val", model, n=5)


def test_read_idx_plain_and_gzipped(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], ">i4").tobytes() + array.tobytes()
    (tmp_path / "x-idx3-ubyte").write_bytes(raw)
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as f:
        f.write(raw)
    assert np.array_equal(data.read_idx(tmp_path / "x-idx3-ubyte"), array)
    assert np.array_equal(data.read_idx(tmp_path / "x-idx3-ubyte.gz"), array)
    (tmp_path / "cut").write_bytes(raw[:-5])
    with pytest.raises(TmergeError, match="truncated"):
        data.read_idx(tmp_path / "cut")
    (tmp_path / "cut.gz").write_bytes((tmp_path / "x-idx3-ubyte.gz").read_bytes()[:-9])
    with pytest.raises(TmergeError, match="cannot read"):
        data.read_idx(tmp_path / "cut.gz")


# ----------------------------------------------------------------------------------------------
# linear probe


def test_fit_linear_probe_is_deterministic_and_fits_separable_data():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=generator) * 3
    labels = torch.arange(3).repeat_interleave(40)
    features = centres[labels] + torch.randn(120, 16, generator=generator) + 100  # far from the origin
    a = data.fit_linear_probe(features, labels, ["x", "y", "z"])
    b = data.fit_linear_probe(features, labels, ["x", "y", "z"])
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.accuracy(features, labels) > 0.95 and a.info["train_accuracy"] > 0.95
    assert a.logits(features).shape == (120, 3)


def test_fit_linear_probe_binary_and_missing_classes():
    features = torch.cat([torch.zeros(5, 2), torch.ones(5, 2)])
    labels = torch.tensor([0] * 5 + [1] * 5)
    assert data.fit_linear_probe(features, labels).accuracy(features, labels) == 1.0
    with pytest.raises(TmergeError, match=r"lack classes \[2\]"):
        data.fit_linear_probe(features, labels, ["a", "b", "c"])


def test_probe_cache_round_trip(tmp_path, cache, model):
    root = write_class_folders(tmp_path / "set", {"red": (220, 30, 30), "blue": (30, 30, 220)}, per_class=4)
    probe = data.cached_linear_probe(model, root, n=8)
    (saved,) = (cache / "probes").glob("*.safetensors")
    assert probe.class_names == ["blue", "red"] and probe.info["n"] == 8
    features = data.extract_features(model, data.load_images(root, model).images)
    assert features.shape == (8, 192)
    for image in root.rglob("*.png"):  # the second call must not need the images: it reads the cache
        image.unlink()
    again = data.cached_linear_probe(model, root, n=8)
    assert torch.equal(again.weight, probe.weight) and torch.equal(again.bias, probe.bias)
    assert again.info == probe.info and torch.equal(again.logits(features), probe.logits(features))
    saved.write_bytes(b"corrupt")
    with pytest.raises(TmergeError, match="no images"):  # a corrupt probe is retrained, from the data
        data.cached_linear_probe(model, root, n=8)


def test_probe_needs_labels(cache, model):
    with pytest.raises(TmergeError, match="needs labelled images"):
        data.cached_linear_probe(model, "samples", n=4)


def test_loading_a_non_probe_file(tmp_path):
    (tmp_path / "p.safetensors").write_bytes(b"nope")
    with pytest.raises(TmergeError, match="not a tmerge linear probe"):
        data.LinearProbe.load(tmp_path / "p.safetensors")


@needs_fashion_mnist
def test_fashion_mnist_probe_beats_chance_on_held_out_images(cache, model):
    probe = data.cached_linear_probe(model, "fashion-mnist", n=300)
    test = data.load_images("fashion-mnist:test", model, n=200)
    accuracy = probe.accuracy(data.extract_features(model, test.images), test.labels)
    assert accuracy > 0.3  # ten classes: chance is 0.1, even for a random tiny ViT


def _rcc(files: dict[str, bytes], compress: bool) -> bytes:
    """A Qt resource file (format 1): root -> folder "a" -> the files."""
    import struct
    import zlib

    names, data, name_at = b"", b"", {}
    for name in ["a", *files]:
        name_at[name] = len(names)
        names += struct.pack(">HI", len(name), 0) + name.encode("utf-16-be")
    nodes = [struct.pack(">IHII", 0, 2, 1, 1), struct.pack(">IHII", name_at["a"], 2, len(files), 2)]
    for name, blob in files.items():
        payload = struct.pack(">I", len(blob)) + zlib.compress(blob) if compress else blob
        nodes.append(struct.pack(">IHHHI", name_at[name], 1 if compress else 0, 0, 0, len(data)))
        data += struct.pack(">I", len(payload)) + payload
    tree = b"".join(nodes)
    header = 20
    return b"qres" + struct.pack(">IIII", 1, header, header + len(tree), header + len(tree) + len(data)) + tree + data + names


@pytest.mark.parametrize("compress", [False, True])
def test_read_rcc(compress):
    from tmerge.data.corpus import read_rcc

    files = {"x.webp": b"first file", "y.png": b"\x00second" * 20}
    assert dict(read_rcc(_rcc(files, compress))) == {f"a/{k}": v for k, v in files.items()}
    with pytest.raises(TmergeError, match="not a Qt resource"):
        list(read_rcc(b"nope"))


def test_photo_score_and_missing_corpus(tmp_path):

    from tmerge.data.corpus import corpus_entries, photo_score

    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    assert photo_score(Image.fromarray(noise)) == 1.0
    assert photo_score(Image.new("RGB", (96, 96), (200, 10, 10))) < 0.01
    with pytest.raises(TmergeError, match="not built"):
        corpus_entries("eval", root=tmp_path)
    with pytest.raises(TmergeError, match="split must be one of"):
        corpus_entries("test", root=tmp_path)


def write_corpus(root, per_split: int = 3):
    """A corpus folder with ``per_split`` noise photos per split and its manifest."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for split in ("train", "tune", "eval"):
        for i in range(per_split):
            name = f"{split}{i}.jpg"
            Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(root / name)
            images.append({"file": name, "split": split, "source": f"{split}-source", "group": "g", "sha256": name})
    (root / "manifest.json").write_text(json.dumps({"images": images}))


def test_corpus_source(model, cache):
    from tmerge.data.corpus import corpus_dir, corpus_entries, corpus_views
    from tmerge.data.preprocess import model_transform

    with pytest.raises(TmergeError, match="not built"):
        data.load_images("corpus:eval", model)
    write_corpus(corpus_dir())
    tune = data.load_images("corpus:tune", model)
    whole = torch.stack([model_transform(model)(Image.open(corpus_dir() / f"tune{i}.jpg").convert("RGB")) for i in range(3)])
    assert tune.labels is None and torch.equal(tune.images, whole)  # tune/eval photos: whole, in order
    train = data.load_images("corpus:train", model, seed=3).images  # training photos: one seeded random crop each
    assert torch.equal(train, corpus_views(corpus_entries("train"), model, views_per_photo=1, seed=3))
    assert not torch.equal(train, data.load_images("corpus:train", model, seed=4).images)
    assert data.load_images("corpus:eval", model, n=2).images.shape[0] == 2
    with pytest.raises(TmergeError, match="has 3 images, asked for 5"):
        data.load_images("corpus:eval", model, n=5)
    with pytest.raises(TmergeError, match="split must be one of"):
        data.load_images("corpus:test", model)
