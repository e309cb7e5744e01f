"""From a call's arguments to its stored key and fingerprint.

Everything that can be checked against the signature is checked once, when the function is
decorated; what runs per call is a fast argument binder, a ``str.format_map`` and a fingerprint.
"""

from __future__ import annotations

import inspect
import os
import re
import string
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._fingerprint import ArgumentsFingerprint, fingerprint_value

__all__ = ["Binder", "CallKey", "default_name"]

_P = inspect.Parameter
_FIELD_ROOT = re.compile(r"[^.\[]*")

Arguments = dict[str, Any]


def describe(fn: Callable[..., Any], sig: inspect.Signature) -> str:
    return f"{getattr(fn, '__qualname__', repr(fn))}{sig}"


class Binder:
    """Binds a call's arguments to the signature, with defaults applied, as a dict.

    Plain signatures (no ``*args``/``**kwargs``) take a fast path; anything unusual, including
    every call that is an error, goes through ``inspect.Signature.bind`` for its exact message.
    """

    __slots__ = ("_count", "_defaults", "_keywords", "_name", "_positional", "_signature",
                 "_simple")  # fmt: skip

    def __init__(self, signature: inspect.Signature, name: str) -> None:
        params = list(signature.parameters.values())
        self._signature = signature
        self._name = name
        self._simple = all(p.kind not in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD) for p in params)
        self._positional = tuple(
            p.name for p in params if p.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)
        )
        self._keywords = frozenset(
            p.name for p in params if p.kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY)
        )
        self._defaults = {p.name: p.default for p in params if p.default is not _P.empty}
        self._count = len(params)

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Arguments:
        if self._simple and len(args) <= len(self._positional):
            bound = dict(zip(self._positional, args, strict=False))
            if kwargs:
                for name in kwargs:
                    if name in bound or name not in self._keywords:
                        return self._bind(args, kwargs)
                bound.update(kwargs)
            if len(bound) < self._count:
                for name, default in self._defaults.items():
                    bound.setdefault(name, default)
                if len(bound) < self._count:
                    return self._bind(args, kwargs)
            return bound
        return self._bind(args, kwargs)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Arguments:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self._name}(): {exc}") from None
        bound.apply_defaults()
        return dict(bound.arguments)


def default_name(fn: Callable[..., Any]) -> str:
    """``module.qualname``; a script's functions use the script's file name instead of
    ``__main__``, so two scripts never share keys."""
    module = getattr(fn, "__module__", None) or "__main__"
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", repr(fn))
    if module == "__main__":
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        path = getattr(main, "__file__", None)
        if spec is not None and getattr(spec, "name", None):
            module = spec.name.removesuffix(".__main__")
        elif path:
            module = os.path.splitext(os.path.basename(path))[0]
    return f"{module}.{qualname}"


def _template_fields(template: str) -> list[str]:
    fields = []
    for _, field, spec, conversion in string.Formatter().parse(template):
        if conversion not in (None, "r", "s", "a"):
            raise ValueError(f"unknown conversion !{conversion} (use !r, !s or !a)")
        if field is not None:
            fields.append(field)
        if spec:
            fields.extend(_template_fields(spec))
    return fields


def _compile_template(template: str, signature: inspect.Signature, what: str) -> Callable[
    [Mapping[str, Any]], str
]:
    if not template:
        raise ValueError(f"key='' for {what}: a key template must not be empty")
    try:
        fields = _template_fields(template)
    except ValueError as exc:
        raise ValueError(
            f"key={template!r} for {what} is not a valid str.format template: {exc}"
        ) from None
    params = signature.parameters
    for field in fields:
        root = _FIELD_ROOT.match(field).group()  # type: ignore[union-attr]  # always matches
        if root == "" or root.isdigit():
            raise ValueError(
                f"key={template!r} for {what}: positional field {{{field}}}; name a parameter,"
                f" e.g. {{{next(iter(params), 'name')}}}"
            )
        if root not in params:
            raise ValueError(
                f"key={template!r} for {what}: field {{{field}}} names no parameter;"
                f" the parameters are {', '.join(params) or '(none)'}"
            )
    return template.format_map


class CallKey:
    """Turns a call's arguments into its stored key and fingerprint, per the decorator options."""

    __slots__ = ("_fingerprint", "_key", "_key_kind", "_prefix", "_template", "bind",
                 "fingerprint_kind")  # fmt: skip

    def __init__(
        self,
        fn: Callable[..., Any],
        signature: inspect.Signature,
        *,
        key: str | Callable[..., str] | None,
        name: str | None,
        fingerprint: Sequence[str] | Callable[..., object] | bool | None,
    ) -> None:
        what = describe(fn, signature)
        if name is None:
            name = default_name(fn)
        elif not isinstance(name, str):
            raise TypeError(f"name= for {what} must be a str, not {type(name).__name__}")
        elif not name.strip():
            raise ValueError(f"name= for {what} must not be empty")
        self._prefix = f"{name}:"
        self.bind = Binder(signature, getattr(fn, "__qualname__", "function"))

        params = list(signature.parameters)
        implicit = params[:1] if params[:1] in (["self"], ["cls"]) else []
        everything = ArgumentsFingerprint(p for p in params if p not in implicit)

        self._fingerprint: Callable[[Arguments, tuple[Any, ...], dict[str, Any]], str]
        if fingerprint is None or fingerprint is True:
            self.fingerprint_kind = "arguments"
            self._fingerprint = lambda bound, a, kw: everything(bound)
        elif fingerprint is False:
            self.fingerprint_kind = "off"
            self._fingerprint = lambda bound, a, kw: ""
        elif isinstance(fingerprint, str):
            raise TypeError(
                f"fingerprint={fingerprint!r} for {what}: pass a list of argument names,"
                f" e.g. fingerprint=[{fingerprint!r}]"
            )
        elif isinstance(fingerprint, (list, tuple, set, frozenset)):
            names = list(fingerprint)
            for n in names:
                if not isinstance(n, str) or n not in signature.parameters:
                    raise ValueError(
                        f"fingerprint= for {what} names {n!r}, which is not a parameter;"
                        f" the parameters are {', '.join(params) or '(none)'}"
                    )
            chosen = ArgumentsFingerprint(p for p in params if p in names)
            self.fingerprint_kind = "some"
            self._fingerprint = lambda bound, a, kw: chosen(bound)
        elif callable(fingerprint):
            hook = fingerprint
            self.fingerprint_kind = "callable"
            self._fingerprint = lambda bound, a, kw: fingerprint_value(
                hook(*a, **kw), where="the value returned by fingerprint="
            )
        else:
            raise TypeError(
                f"fingerprint= for {what} must be None, False, a list of argument names or a"
                f" callable, not {type(fingerprint).__name__}"
            )

        self._template: str | None = None
        self._key: Callable[..., str] | None = None
        if key is None:
            self._key_kind = "memo"
            if fingerprint is not None and fingerprint is not True:
                self._key = lambda bound, a, kw: everything(bound)
        elif isinstance(key, str):
            self._key_kind = "template"
            self._template = key
            self._key = _compile_template(key, signature, what)
        elif callable(key):
            self._key_kind = "callable"
            self._key = key
        else:
            raise TypeError(
                f"key= for {what} must be a str template, a callable or None, not"
                f" {type(key).__name__}"
            )

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str]:
        """(stored key, fingerprint) of a call. Errors name the key or argument at fault."""
        bound = self.bind(args, kwargs)
        fingerprint = self._fingerprint(bound, args, kwargs)
        kind = self._key_kind
        if kind == "template":
            try:
                key = self._key(bound)  # type: ignore[misc]
            except (AttributeError, LookupError, ValueError, TypeError) as exc:
                raise ValueError(
                    f"key={self._template!r} could not be formatted for this call:"
                    f" {type(exc).__name__}: {exc}"
                ) from None
        elif kind == "callable":
            key = self._key(*args, **kwargs)  # type: ignore[misc]
            if not isinstance(key, str):
                raise TypeError(f"key= callable returned {type(key).__name__}, not a str")
        elif self._key is None:
            key = fingerprint
        else:
            key = self._key(bound, args, kwargs)
        if not key:
            raise ValueError(
                f"key={self._template!r} resolved to an empty key for this call"
                if kind == "template"
                else "key= callable returned an empty key"
            )
        return self._prefix + key, fingerprint
