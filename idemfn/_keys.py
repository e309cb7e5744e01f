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

__all__ = [
    "SEPARATOR",
    "CallKey",
    "check_callable_option",
    "check_name",
    "default_name",
    "make_binder",
    "refuse_call",
    "refuse_unstorable",
    "unstorable",
]

_P = inspect.Parameter
_FIELD_ROOT = re.compile(r"[^.\[]*")

Arguments = dict[str, Any]


def describe(fn: Callable[..., Any], sig: inspect.Signature) -> str:
    """How errors name a decorated function: its qualified name and signature."""
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


SEPARATOR = ":"  # the stored key is f"{name}{SEPARATOR}{key}"; no name holds one (issue 13)

# A script's module: __main__, or __mp_main__ when multiprocessing re-runs the script in a
# spawned child (whose functions must keep the parent's keys).
_MAIN_MODULES = frozenset({"__main__", "__mp_main__"})
_PATH_ESCAPES = re.compile(r"[%:\ud800-\udfff]")


def unstorable(key: str) -> str | None:
    """Why no store can hold ``key`` (a NUL character, a lone surrogate), or None.

    PostgreSQL text cannot hold NUL, and a lone surrogate (text decoded with
    ``errors="surrogateescape"``, such as an undecodable file name) is not valid Unicode, so
    encoding it for SQLite, Redis or PostgreSQL fails. Callers test ``"\\x00" in key or not
    key.isascii()`` first: an ASCII key without NUL, the common case, needs no closer look.
    """
    nul = key.find("\x00")
    if nul >= 0:
        return f"it holds a NUL character ('\\x00') at index {nul}"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"it holds a lone surrogate ({key[exc.start]!r}) at index {exc.start}, which is not"
            " valid Unicode (text decoded with errors='surrogateescape', such as an undecodable"
            " file name, holds them)"
        )
    return None


def refuse_unstorable(key: str, source: str) -> None:
    """Raise the ``ValueError`` for a ``key`` no store can hold; return when it is fine.

    ``source`` names where the key came from, e.g. ``"begin(key=...)"``. Callers test
    ``"\\x00" in key or not key.isascii()`` first (see ``unstorable``).
    """
    problem = unstorable(key)
    if problem is not None:
        raise ValueError(
            f"{source} cannot be stored: {problem}. Leave the character out of the key, or key"
            " on an encoded form of the value (e.g. with a key= callable returning"
            " value.encode('utf-8', 'surrogateescape').hex())"
        )


def check_name(name: object, what: str) -> str:
    """``name=`` as given, checked: a non-empty str without the separator, NUL or surrogates."""
    if not isinstance(name, str):
        raise TypeError(f"name= for {what} must be a str, not {type(name).__name__}")
    if not name.strip():
        raise ValueError(f"name= for {what} must not be empty")
    if SEPARATOR in name:
        # Allowed, "shop:orders" + "refund" and "shop" + "orders:refund" would share the stored
        # key "shop:orders:refund", and one function would replay the other's result.
        raise ValueError(
            f"name={name!r} for {what} must not contain {SEPARATOR!r}: the stored key is"
            f" name{SEPARATOR}key, split at the first {SEPARATOR!r}, so a {SEPARATOR!r} in the"
            " name would let two functions share records. Use '.' or '/' instead, e.g."
            f" name={name.replace(SEPARATOR, '.')!r}"
        )
    problem = unstorable(name)
    if problem is not None:
        raise ValueError(f"name={name!r} for {what} cannot be stored: {problem}")
    if name == "http":
        raise ValueError(
            f"name='http' for {what} is reserved: the HTTP middlewares store their keys as"
            " 'http:<tenant>:<key>', and a function of that name would share them. Use"
            " another name, e.g. 'http.requests'"
        )
    return name


def default_name(fn: Callable[..., Any], *, process_local: bool = False) -> str:
    """The name of ``fn``'s keys when ``name=`` is not given: ``module.qualname``.

    A script's functions (module ``__main__``, ``__mp_main__`` in a process that
    multiprocessing spawned, or ``<run_path>`` under ``runpy.run_path``) are named after the
    script, so that two scripts never share keys and one script keeps its keys from run to run,
    from any working directory:

    - run as ``python -m pkg.mod``: the module's name, as if imported (``pkg.mod.step``;
      ``pkg.__main__.step`` for ``python -m pkg``);
    - run from a file: the file's real path (absolute, symlinks resolved, ``%`` and ``:``
      escaped as ``%25`` and ``%3A``), a ``/``, then the qualname (``/srv/app1/deploy.py/step``);
    - with no file (an interactive session, ``python -c``, a notebook): refused (``TypeError``
      asking for ``name=``), unless ``process_local`` (the store is a ``MemoryStore``, which no
      other process sees): then ``__main__.qualname``.

    A default name never holds the separator ``:``; one that would is refused asking for
    ``name=``.
    """
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(qualname, str):
        # A partial or a callable object: a name from its repr would hold a memory address,
        # a new key in every process.
        raise TypeError(
            f"@idempotent needs name= to decorate a {type(fn).__name__}: it has no qualified"
            " name that stays the same from one process to the next"
        )
    if module is None or module in _MAIN_MODULES or _is_placeholder(module):
        name = _script_name(fn, module, qualname, process_local)
    else:
        name = f"{module}.{qualname}"
    problem = (
        f"it holds {SEPARATOR!r}, the separator of the stored key"
        if SEPARATOR in name
        else unstorable(name)
    )
    if problem is not None:
        raise TypeError(
            f"@idempotent needs name= for {qualname}: its default name {name!r} cannot be used"
            f" ({problem}). Pass a name that identifies it, e.g. name='myapp.{qualname}'"
        )
    return name


def _is_placeholder(module: str) -> bool:
    # A module name that no import gives, such as runpy.run_path's "<run_path>": every file run
    # that way would share it, so its functions are named after their file, as a script's.
    return module.startswith("<") and module.endswith(">")


def _script_name(
    fn: Callable[..., Any], module: str | None, qualname: str, process_local: bool
) -> str:
    # The namespace the function was defined in: its globals, not sys.modules["__main__"],
    # which is the runner's own module under `python -m cProfile script.py` and the like.
    # (A decorator's wrapper has its own module's globals: look through __wrapped__.)
    try:
        target = inspect.unwrap(fn)
    except ValueError:  # a cycle of __wrapped__
        target = fn
    namespace = getattr(target, "__globals__", None)
    if not isinstance(namespace, dict):
        namespace = getattr(sys.modules.get(module or "__main__"), "__dict__", {})
    spec_name = getattr(namespace.get("__spec__"), "name", None)
    # "__main__" is the spec of a directory or zip file run as a script: named by its path.
    # "pkg.__main__" (python -m pkg) keeps its last part, as when imported: "pkg.step" is
    # pkg/__init__.py's step.
    if isinstance(spec_name, str) and spec_name and spec_name not in _MAIN_MODULES:
        return f"{spec_name}.{qualname}"
    path = namespace.get("__file__")
    if isinstance(path, str) and path and not (path.startswith("<") and path.endswith(">")):
        # Since Python 3.9 a script's __file__ is absolute, whatever the working directory;
        # realpath also makes a script run through a symlink the script it points to.
        # Escaping '%' keeps the escape of ':' (Windows drives) and of surrogates
        # (undecodable bytes) reversible, so two paths never give one name.
        real = _PATH_ESCAPES.sub(_escape, os.path.realpath(path))
        return f"{real}/{qualname}"  # a qualname holds no '/': the last one ends the path
    if process_local:
        return f"__main__.{qualname}"
    raise TypeError(
        f"@idempotent needs name= for {qualname}, defined in __main__ with no script file (an"
        " interactive session, python -c, a notebook or exec()): a default name would be the"
        " same in every such session, and they would share keys and replay each other's"
        f" results. Pass a name that identifies it, e.g. name='myapp.{qualname}' (with a"
        " MemoryStore, which no other process sees, no name is needed)"
    )


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return f"%{ord(char):02X}" if char in "%:" else f"%u{ord(char):04X}"


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


def _label(hook: Callable[..., object]) -> str:
    return getattr(hook, "__name__", None) or type(hook).__name__


def check_callable_option(
    option: str, hook: Callable[..., object], signature: inspect.Signature, what: str
) -> None:
    """Refuse a callable option (``key=``, ``fingerprint=``, ``deadline=``) whose parameters
    cannot take the function's arguments, which is what it is called with on every call.

    Two calls are tried, with every parameter and with the required ones only, each passed
    positionally or else by keyword; a callable that takes neither form of one of them fails
    every call of that shape. Callables without a signature are left to the call.
    """
    try:
        hook_signature = inspect.signature(hook)
    except (TypeError, ValueError):
        return
    variadic = (_P.VAR_POSITIONAL, _P.VAR_KEYWORD)
    params = [p for p in signature.parameters.values() if p.kind not in variadic]
    for given in (params, [p for p in params if p.default is _P.empty]):
        errors = []
        for by_keyword in (False, True):
            args = [
                p.name
                for p in given
                if p.kind is _P.POSITIONAL_ONLY
                or (p.kind is _P.POSITIONAL_OR_KEYWORD and not by_keyword)
            ]
            kwargs = {p.name: p.name for p in given if p.name not in args}
            try:
                hook_signature.bind(*args, **kwargs)
            except TypeError as exc:
                errors.append(exc)
            else:
                break
        else:
            bare = signature.replace(
                parameters=[p.replace(annotation=_P.empty) for p in signature.parameters.values()],
                return_annotation=_P.empty,
            )
            raise TypeError(
                f"{option}{_label(hook)}{hook_signature} for {what} cannot take the function's"
                f" arguments ({errors[0]}): it is called with the arguments of each call. Give"
                f" it the function's parameters, e.g. {option}lambda {str(bare)[1:-1]}: ...,"
                " or take those it ignores with *args, **kwargs"
            )


def refuse_call(
    option: str, hook: Callable[..., object], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """For a ``TypeError`` out of calling ``hook``: raise the ``TypeError`` naming ``option``
    when ``hook`` cannot take ``args`` and ``kwargs``; return when it can (the error came from
    inside it, and the caller re-raises it)."""
    try:
        inspect.signature(hook).bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(
            f"{option}{_label(hook)} cannot take this call's arguments ({exc}): it is called"
            " with the function's arguments. Give it the function's parameters, or take those"
            " it ignores with *args, **kwargs"
        ) from None
    except ValueError:  # no signature to bind to
        pass


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
        process_local: bool = False,
    ) -> None:
        what = describe(fn, signature)
        if name is None:
            name = default_name(fn, process_local=process_local)
        else:
            name = check_name(name, what)

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
            check_callable_option("fingerprint=", fingerprint, signature, what)
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
            check_callable_option("key=", key, signature, what)
            key_call = key
        else:
            raise TypeError(
                f"key= for {what} must be a str template, a callable or None, not"
                f" {type(key).__name__}"
            )
        resolve = _resolver(
            f"{name}{SEPARATOR}",
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
            try:
                value = of_call(*args, **kwargs)
            except TypeError:
                refuse_call("fingerprint=", of_call, args, kwargs)
                raise  # from inside the callable: its own error
            fingerprint = fingerprint_value(value, where="the value returned by fingerprint=")
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
            if "\x00" in key or not key.isascii():  # rare: look closer
                refuse_unstorable(key, f"the key that key={template!r} gave for this call")
        elif key_call is not None:
            try:
                key = key_call(*args, **kwargs)
            except TypeError:
                refuse_call("key=", key_call, args, kwargs)
                raise  # from inside the callable: its own error
            if not isinstance(key, str):
                raise TypeError(f"key= callable returned {type(key).__name__}, not a str")
            if not key:
                raise ValueError("key= callable returned an empty key")
            if "\x00" in key or not key.isascii():
                refuse_unstorable(key, "the key returned by the key= callable")
        return prefix + key, fingerprint

    return resolve
