"""A name → plug-in class registry: cache strategies (``cache_type=``) and decoders (``decoding=``) use one each."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes registered under their unique ``name``, looked up by the keyword argument ``option``."""

    def __init__(self, option: str) -> None:
        self.option = option
        self.classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Add ``cls`` under ``cls.name``; a second class with the same name is a ValueError."""
        name = cls.name  # type: ignore[attr-defined]
        if name in self.classes and self.classes[name] is not cls:
            raise ValueError(f"{self.option}={name!r} is already registered by {self.classes[name].__qualname__}")
        self.classes[name] = cls
        return cls

    def get(self, name: str) -> type[T]:
        """The class registered as ``name`` (a ValueError naming the allowed ones otherwise)."""
        if name not in self.classes:
            raise ValueError(f"diffusion_generate: {self.option}={name!r} is invalid; allowed: {sorted(self.classes)}")
        return self.classes[name]
