"""One lookup door for named functions: advantage estimators, policy losses, KL estimators.

Built-ins register when their module is imported (each Ray actor imports `drpt_ray.algorithms`,
so the registry is populated wherever it is read; nothing is registered from the driver only).
A user function is named in config by import path, `"package.module:function"`, and resolved by
`get` where it runs; registered names therefore may not contain ':'.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Name -> function map of one kind, refusing clashes and listing valid names on a miss."""

    def __init__(self, kind: str) -> None:
        """Args: kind: what is registered, used in error messages ("advantage estimator")."""
        self.kind = kind
        self._fns: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator adding a function under `name`; returns the function unchanged.

        Raises:
            ValueError: `name` is empty, contains ':' (reserved for import paths) or is taken.
        """
        if not name or ":" in name:
            raise ValueError(f"invalid {self.kind} name {name!r}: must be non-empty and contain no ':'")
        if name in self._fns:
            raise ValueError(f"{self.kind} {name!r} is already registered")

        def add(fn: F) -> F:
            self._fns[name] = fn
            return fn

        return add

    def get(self, name: str) -> F:
        """The function registered as `name`, or the one at import path "module:attr".

        Raises:
            ValueError: unknown name (the message lists the valid names) or unresolvable path.
        """
        if ":" in name:
            return self._resolve(name)
        try:
            return self._fns[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {self.names()} or 'module:function'") from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._fns)

    def _resolve(self, path: str) -> F:
        module_name, _, attr = path.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot resolve {self.kind} {path!r}: {e}") from None
        if not callable(fn):
            raise ValueError(f"{self.kind} {path!r} is not callable")
        return fn
