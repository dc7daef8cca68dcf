"""Exports shared by the export tests: each (graph form, method, model variant) is built once."""

from __future__ import annotations

from tests.helpers import tiny_export_model as tiny

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from tmerge.export import export_onnx  # noqa: E402


@pytest.fixture(scope="session")
def outdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="session")
def exported(outdir):
    """(graph form, method[, variant]) -> (model, ExportResult); built lazily, once per session."""
    cache = {}

    def get(form: str, method: str, variant: str = "plain"):
        key = (form, method, variant)
        if key not in cache:
            model = tiny(variant, method)
            result = export_onnx(model, outdir / f"{variant}_{method}_{form}.onnx", graph=form, batch_size=2,
                                 dynamic_batch=True, model_name=f"tiny-{variant}")
            cache[key] = (model, result)
        return cache[key]

    return get
