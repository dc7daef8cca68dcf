"""Method name -> class. Adding a method is one file plus one ``register`` call."""

from __future__ import annotations

from ..errors import TmergeError
from .base import MergeMethod

_METHODS: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    _METHODS[cls.name] = cls
    return cls


def available() -> dict[str, type[MergeMethod]]:
    _load_builtin()
    return dict(_METHODS)


def get(name: str) -> type[MergeMethod]:
    methods = available()
    if name not in methods:
        raise TmergeError(f"unknown method {name!r}; available: {', '.join(['none', *sorted(methods)])}")
    return methods[name]


def _load_builtin() -> None:
    if _METHODS:
        return
    from .methods.dtem import DTEM
    from .methods.ltm import LTM
    from .methods.pitome import PiToMe
    from .methods.tome import ToMe

    for cls in (ToMe, PiToMe, DTEM, LTM):
        register(cls)
