"""``--method NAME`` -> a :class:`~pyprotoclip.losses.base.Method` subclass."""

from __future__ import annotations

from pyprotoclip.losses.base import Method

_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``--method cls.name``."""
    if not cls.name:
        raise ValueError(f"method: {cls.__name__} has no name")
    _METHODS[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def get_method(name: str) -> type[Method]:
    if name not in _METHODS:
        raise ValueError(f"method: expected one of {', '.join(_METHODS)}, got {name!r}")
    return _METHODS[name]
