"""Optional dependencies: one line naming the extra to install."""

from __future__ import annotations

from tmerge._optional import missing_extra, require
from tmerge.errors import TmergeError

import pytest


def test_missing_module_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(TmergeError, match=r"^matplotlib is not installed: pip install 'tmerge\[report\]'$"):
        require("matplotlib")
    assert str(missing_extra("skimage")) == "scikit-image is not installed: pip install 'tmerge[data]'"
    assert str(missing_extra("tensorrt")) == "tensorrt is not installed: pip install 'tmerge[trt]'"


def test_present_module_is_returned():
    import json

    assert require("json") is json
