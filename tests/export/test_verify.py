"""Export verification: near-ties in the matching told apart from export bugs, and a failed parity
check that writes nothing."""

from __future__ import annotations

from tests.helpers import tiny_export_model as tiny

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")

from tmerge.errors import VerificationError  # noqa: E402
from tmerge.export import api, export_onnx  # noqa: E402
from tmerge.export.verify import compare_once, torch_reference, torch_replay  # noqa: E402


class _FakeSession:
    def __init__(self, outputs):
        self.outputs = outputs

    def run(self, _images):
        return self.outputs


def _plans(model, images):
    out, plans = torch_reference(model, images)
    return out, [p.numpy().copy() for p in plans]


def test_verify_tells_near_ties_from_bugs():
    model = tiny("plain", "tome")
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
    monkeypatch.setattr(api, "build_graph", lambda *a, **k: (proto, []))
    out = tmp_path / "broken.onnx"
    with pytest.raises(VerificationError, match="parity failed"):
        export_onnx(model, out)
    assert list(tmp_path.iterdir()) == []
