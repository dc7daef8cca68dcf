"""TensorRT's pure-Python plugin layer on the stand-in core, once per pinned release."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from . import tensorrt_standin

VERSIONS = [line.strip() for line in (Path(__file__).with_name("tensorrt_bindings_versions.txt")).read_text().splitlines()
            if line.strip() and not line.startswith("#")]
WHEELS = Path(sys.prefix) / "share" / "tmerge" / "tensorrt-bindings"


def _wheel(version: str) -> Path:
    found = sorted(WHEELS.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
    if not found:
        pytest.fail(f"tensorrt-cu12-bindings {version} is not in {WHEELS}: run `bash install.sh` (it downloads the "
                    "pinned wheels with pip download --no-deps)")
    return found[0]


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"trt{v}" for v in VERSIONS])
def trt_layer(request, tmp_path_factory):
    """(tensorrt stand-in, TensorRT's tensorrt.plugin of that release), fresh per release."""
    version = request.param
    with tensorrt_standin.plugin_layer(_wheel(version), tmp_path_factory.mktemp(f"trt{version}"), version) as layer:
        yield layer
