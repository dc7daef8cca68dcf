"""The method registry: built-ins are always there, user methods are added beside them."""

from __future__ import annotations

from tmerge.merging import registry
from tmerge.merging.methods.tome import ToMe


def test_register_keeps_the_builtins(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))

    class Mine(ToMe):
        name = "mine"

    registry.register(Mine)
    assert {"tome", "pitome", "dtem", "ltm", "mine"} <= set(registry.available())
    assert registry.get("mine") is Mine
