"""Method name -> class. Adding a method is one file plus one ``register`` call."""

from __future__ import annotations

from ..errors import TmergeError
from .base import MergeMethod
from .methods.dtem import DTEM
from .methods.ltm import LTM
from .methods.pitome import PiToMe
from .methods.tome import ToMe

_METHODS: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    _METHODS[cls.name] = cls
    return cls


def available() -> dict[str, type[MergeMethod]]:
    return dict(_METHODS)


def get(name: str) -> type[MergeMethod]:
    if name not in _METHODS:
        raise TmergeError(f"unknown method {name!r}; available: {', '.join(['none', *sorted(_METHODS)])}")
    return _METHODS[name]


for _builtin in (ToMe, PiToMe, DTEM, LTM):
    register(_builtin)
