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
from collections.abc import Callable, Sequence
from typing import Any

from ._fingerprint import ArgumentsFingerprint, fingerprint_value

__all__ = ["CallKey", "default_name", "make_binder"]

_P = inspect.Parameter
_FIELD_ROOT = re.compile(r"[^.\[]*")

Arguments = dict[str, Any]


def describe(fn: Callable[..., Any], sig: inspect.Signature) -> str:
    return f"{getattr(fn, '__qualname__', repr(fn))}{sig}"


Bind = Callable[[tuple[Any, ...], dict[str, Any]], Arguments]


def make_binder(signature: inspect.Signature, name: str) -> Bind:
    """A function that binds a call's arguments to ``signature``, defaults applied, as a dict.

    Plain signatures (no ``*args``/``**kwargs``) take a fast path; anything unusual, including
    every call that is an error, goes through ``inspect.Signature.bind`` for its exact message.
    """
    params = list(signature.parameters.values())
    simple = all(p.kind not in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD) for p in params)
    positional = tuple(
        p.name for p in params if p.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)
    )
    keywords = frozenset(
        p.name for p in params if p.kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY)
    )
    defaults = {p.name: p.default for p in params if p.default is not _P.empty}
    count = len(params)
    n_positional = len(positional)

    def bind_slowly(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Arguments:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}(): {exc}") from None
        bound.apply_defaults()
        return dict(bound.arguments)

    if not simple:
        return bind_slowly

    def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Arguments:
        if len(args) > n_positional:
            return bind_slowly(args, kwargs)
        bound = dict(zip(positional, args, strict=False))
        if kwargs:
            for keyword in kwargs:
                if keyword in bound or keyword not in keywords:
                    return bind_slowly(args, kwargs)
            bound.update(kwargs)
        if len(bound) < count:
            for parameter, default in defaults.items():
                bound.setdefault(parameter, default)
            if len(bound) < count:
                return bind_slowly(args, kwargs)
        return bound

    return bind


def default_name(fn: Callable[..., Any]) -> str:
    """``module.qualname``; a script's functions use the script's file name instead of
    ``__main__``, so two scripts never share keys."""
    module = getattr(fn, "__module__", None) or "__main__"
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(qualname, str):
        # A partial or a callable object: a name from its repr would hold a memory address,
        # a new key in every process.
        raise TypeError(
            f"@idempotent needs name= to decorate a {type(fn).__name__}: it has no qualified"
            " name that stays the same from one process to the next"
        )
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


def _check_template(template: str, signature: inspect.Signature, what: str) -> None:
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


class CallKey:
    """Turns a call's arguments into its stored key and fingerprint, per the decorator options.

    Everything is checked here, once; ``resolve(args, kwargs) -> (stored key, fingerprint)`` is
    a closure over the checked options, because it runs on every call.
    """

    __slots__ = ("resolve",)

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

        params = list(signature.parameters)
        implicit = params[:1] if params[:1] in (["self"], ["cls"]) else []
        everything = ArgumentsFingerprint(p for p in params if p not in implicit)

        # The fingerprint: of the bound arguments (all, or some), of a callable's result, or off.
        of_bound: ArgumentsFingerprint | None = None
        of_call: Callable[..., object] | None = None
        if fingerprint is None or fingerprint is True:
            of_bound = everything
        elif fingerprint is False:
            pass  # off: no mismatch detection
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
            of_bound = ArgumentsFingerprint(p for p in params if p in names)
        elif callable(fingerprint):
            of_call = fingerprint
        else:
            raise TypeError(
                f"fingerprint= for {what} must be None, False, a list of argument names or a"
                f" callable, not {type(fingerprint).__name__}"
            )

        # The key: a template over the bound arguments, a callable, or the arguments' fingerprint.
        template: str | None = None
        key_call: Callable[..., str] | None = None
        if key is None:
            if implicit:
                raise ValueError(
                    f"key= is needed for the method {what}: without it the key is made of the"
                    f" arguments, which leave {implicit[0]} out, so every instance would share"
                    f" one key. Name what identifies the call, e.g. key='{{{implicit[0]}.id}}'"
                )
        elif isinstance(key, str):
            template = key
            _check_template(key, signature, what)
        elif callable(key):
            key_call = key
        else:
            raise TypeError(
                f"key= for {what} must be a str template, a callable or None, not"
                f" {type(key).__name__}"
            )
        resolve = _resolver(
            f"{name}:",
            make_binder(signature, getattr(fn, "__qualname__", "function")),
            everything,
            of_bound,
            of_call,
            template,
            key_call,
        )
        pure = key_call is None and of_call is None
        defaults = [p.default for p in signature.parameters.values() if p.default is not _P.empty]
        if pure and _MEMO_TYPES.issuperset(map(type, defaults)):
            resolve = _memoised(resolve)
        self.resolve = resolve

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str]:
        return self.resolve(args, kwargs)


# Calls whose arguments are all of these exact types map to a key and fingerprint that depend
# on the values alone: equal values of one type format and encode identically, and they cannot
# change. (Not float: -0.0 == 0.0, but they format differently in a key template.)
_MEMO_TYPES = frozenset({str, int, bytes, bool, type(None)})
_MEMO_SIZE = 256
_MEMO_MAX_LEN = 256  # longer str/bytes arguments are not kept alive by the memo

Resolve = Callable[[tuple[Any, ...], dict[str, Any]], tuple[str, str]]


def _memoised(resolve: Resolve) -> Resolve:
    """``resolve`` with a small memo for calls with positional scalar arguments.

    A process that sees a key again (a duplicate delivery, a retried request, a loop over the
    same step) skips binding, formatting and hashing. The memo holds the last ``_MEMO_SIZE``
    calls (the oldest is dropped first), so its memory is flat once full. Only options without
    user callables get one, since a callable may not be pure.
    """
    memo: dict[tuple[tuple[Any, ...], tuple[type, ...]], tuple[str, str]] = {}

    def resolve_memoised(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str]:
        if kwargs:
            return resolve(args, kwargs)
        for arg in args:
            kind = type(arg)
            if kind is str or kind is bytes:
                if len(arg) > _MEMO_MAX_LEN:
                    return resolve(args, kwargs)
            elif kind not in _MEMO_TYPES:
                return resolve(args, kwargs)
        memo_key = (args, tuple(map(type, args)))  # 1 == True, yet they fingerprint apart
        found = memo.get(memo_key)
        if found is None:
            found = resolve(args, kwargs)
            if len(memo) >= _MEMO_SIZE:
                try:  # drop the oldest (dicts keep insertion order); another thread may race
                    memo.pop(next(iter(memo)), None)
                except (RuntimeError, StopIteration):
                    pass
            memo[memo_key] = found
        return found

    return resolve_memoised


def _resolver(
    prefix: str,
    bind: Bind,
    everything: ArgumentsFingerprint,
    of_bound: ArgumentsFingerprint | None,
    of_call: Callable[..., object] | None,
    template: str | None,
    key_call: Callable[..., str] | None,
) -> Resolve:
    fingerprint_bound = None if of_bound is None else of_bound.__call__
    format_key = None if template is None else template.format_map
    memo_mode = template is None and key_call is None
    memo_key = everything.__call__
    key_is_fingerprint = memo_mode and of_bound is everything

    def resolve(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str]:
        """(stored key, fingerprint) of a call. Errors name the key or argument at fault."""
        bound = bind(args, kwargs)
        if memo_mode:
            try:
                key = memo_key(bound)
            except TypeError as exc:
                raise TypeError(
                    f"{exc}. Note: with key=None the key is made of every argument; pass"
                    " key='...' naming what identifies the call to leave some out"
                ) from None
            if key_is_fingerprint:
                return prefix + key, key
        if fingerprint_bound is not None:
            fingerprint = fingerprint_bound(bound)
        elif of_call is not None:
            fingerprint = fingerprint_value(
                of_call(*args, **kwargs), where="the value returned by fingerprint="
            )
        else:
            fingerprint = ""
        if format_key is not None:
            try:
                key = format_key(bound)
            # RecursionError: repr() of an argument nested too deeply (one that is not
            # fingerprinted, or the fingerprint would have said so first).
            except (AttributeError, LookupError, ValueError, TypeError, RecursionError) as exc:
                raise ValueError(
                    f"key={template!r} could not be formatted for this call:"
                    f" {type(exc).__name__}: {exc}"
                ) from None
            if not key:
                raise ValueError(f"key={template!r} resolved to an empty key for this call")
        elif key_call is not None:
            key = key_call(*args, **kwargs)
            if not isinstance(key, str):
                raise TypeError(f"key= callable returned {type(key).__name__}, not a str")
            if not key:
                raise ValueError("key= callable returned an empty key")
        return prefix + key, fingerprint

    return resolve
