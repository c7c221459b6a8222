"""One lookup door for named entries: advantage estimators, policy losses, KL estimators, target
objectives (drpt_ray.algorithms) and feasible sets (drpt_ray.feasible_sets). No torch, no config:
the schema reads the names of a registry at its own import.

Built-ins register when their module is imported (each Ray actor imports `drpt_ray.algorithms`,
so the registry is populated wherever it is read; nothing is registered from the driver only).
Where a registry takes user code (`paths=True`), a user function is named in config by import path,
`"package.module:function"`, and resolved by `get` where it runs; registered names therefore may
not contain ':'.

An entry may carry metadata, what the rest of the job needs to know about it (an advantage
estimator that needs a critic). It is stored as attributes of the function, so a user function
declares it the same way (`my_estimator.needs_critic = True`), and `meta` fills in the safe
defaults of the registry's metadata dataclass for whatever a function leaves out.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Generic, TypeVar

F = TypeVar("F")


class Registry(Generic[F]):
    """Name -> function map of one kind, refusing clashes and listing valid names on a miss."""

    def __init__(self, kind: str, meta: type | None = None, paths: bool = True) -> None:
        """Args:
        kind: what is registered, used in error messages ("advantage estimator").
        meta: dataclass of the metadata each entry may declare; its field defaults are the safe ones.
        paths: a name may be a 'module:function' import path (user code); False: registered names only.
        """
        self.kind = kind
        self.meta_type = meta
        self.paths = paths
        self._fns: dict[str, F] = {}

    def add(self, name: str, entry: F) -> F:
        """Register `entry` under `name` (the non-decorator form, for entries that are data)."""
        return self.register(name)(entry)

    def register(self, name: str, **meta: Any) -> Callable[[F], F]:
        """Decorator adding a function under `name`; `meta` (fields of the registry's metadata
        dataclass) is set on the function as attributes. Returns the function.

        Raises:
            ValueError: `name` is empty, contains ':' (reserved for import paths) or is taken.
            TypeError: `meta` names a field the metadata dataclass does not have.
        """
        if not name or ":" in name:
            raise ValueError(f"invalid {self.kind} name {name!r}: must be non-empty and contain no ':'")
        if name in self._fns:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if meta:
            self.meta_type(**meta)  # an unknown field fails here, at import

        def add(fn: F) -> F:
            vars(fn).update(meta)
            self._fns[name] = fn
            return fn

        return add

    def get(self, name: str) -> F:
        """The function registered as `name`, or the one at import path "module:attr".

        Raises:
            ValueError: unknown name (the message lists the valid names) or unresolvable path.
        """
        if ":" in name and self.paths:
            return self._resolve(name)
        try:
            return self._fns[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {self.names()}"
                             + (" or 'module:function'" if self.paths else "")) from None

    def check(self, name: str) -> None:
        """Refuse what `get` could never return, importing nothing: an unknown registered name, or an
        import path that is not `package.module:function` in form. A spec is validated where it is
        submitted (the control plane's API process), and a request must never make that process
        import a module it names: whether the path resolves is checked where the job runs
        (`drpt_ray.job.preflight`).

        Raises:
            ValueError: as `get`, for the same names (a malformed path: naming the expected form).
        """
        if ":" in name and self.paths:
            module, _, attr = name.partition(":")
            if not (all(p.isidentifier() for p in module.split(".")) and attr.isidentifier()):
                raise ValueError(f"{self.kind} {name!r} must look like 'package.module:function'")
            return
        self.get(name)

    def meta(self, name: str) -> Any:
        """The metadata of `name` (as `get` finds it): the fields its function carries as
        attributes, the dataclass defaults for the rest.

        Raises:
            ValueError: as `get`.
        """
        fn = self.get(name)
        fields = dataclasses.fields(self.meta_type)
        return self.meta_type(**{f.name: getattr(fn, f.name) for f in fields if hasattr(fn, f.name)})

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
