"""One request's way through an HTTP middleware, framework-neutral.

The drivers (``idemfn.asgi``, ``idemfn.wsgi``, ``idemfn.django``) read the key header
(``read_key``), the body, the tenant and the fingerprint, then ask ``start`` (``astart``) for a
``Claim`` to run the app under or a ``Response`` to send instead: a replay, or a problem. While the
app answers, a ``Recorder`` keeps its status, headers and body (up to a limit); ``outcome`` then
says what to record, and ``settle`` (``asettle``) records it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from .._engine import OK, Claim, Due, Finished, abegin_with, begin_with
from .._errors import (
    AlreadyRunning,
    DeadlineExceeded,
    FingerprintMismatch,
    IdempotencyError,
    StoreError,
)
from .._logs import about, failed
from ..events import REPLAYED as REPLAYED_EVENT
from ..events import STORE_ERROR, log_fields

if TYPE_CHECKING:
    from .options import HttpOptions

__all__ = [
    "GUARDED",
    "PROBLEMS",
    "RESPONSE_CODEC",
    "HeldBack",
    "Recorded",
    "Recorder",
    "Response",
    "asettle",
    "astart",
    "default_fingerprint",
    "describe",
    "incomplete",
    "not_settled",
    "outcome",
    "problem",
    "read_key",
    "settle",
    "start",
]

logger = logging.getLogger("idemfn")

Header = tuple[bytes, bytes]

# Set in a request's ASGI scope, WSGI environ or Django META by the middleware that claimed its
# key: a second middleware on the same request (an app wrapped twice) lets it through.
GUARDED = "idemfn.guarded"
# Where each problem's `type` points: the HTTP page's section on it.
PROBLEMS = "https://idemfn.readthedocs.io/en/latest/http/#"
REPLAYED: Header = (b"idempotent-replayed", b"true")
# Never recorded, so never replayed: they describe one connection (RFC 9110 7.6.1), or a moment.
_NOT_REPLAYED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"date",
    }
)


class Response(NamedTuple):
    """A response the middleware sends itself: a replay or a problem. ``reason``: the
    recorded reason phrase ("" for the standard one); ``trailers``: recorded ASGI trailers."""

    status: int
    headers: list[Header]
    body: bytes
    reason: str = ""
    trailers: tuple[Header, ...] = ()


def problem(
    status: int, slug: str, title: str, detail: str, *, retry_after: int | None = None
) -> Response:
    """An RFC 9457 ``application/problem+json`` response; ``type`` points at the docs."""
    body = json.dumps(
        {"type": PROBLEMS + slug, "title": title, "status": status, "detail": detail}
    ).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    return Response(status, headers, body)


def read_key(options: HttpOptions[Any], values: list[bytes]) -> str | Response | None:
    """The idempotency key in the header's ``values`` (each time the header came), or the 400
    to answer, or None when there is none and none is required.

    A value is an RFC 8941 sf-string (``"abc"``, the draft's form) or a bare token, as
    Stripe's clients send; a value folded from two headers (``a, b``) counts as two."""
    name = options.header
    if not values:
        if not options.required:
            return None
        return problem(
            400,
            "key-missing",
            "Idempotency key missing",
            f"this request needs an {name} header (a unique value per operation, reused when"
            " the request is retried)",
        )
    if len(values) > 1:
        return _repeated(name)
    raw = values[0].strip(b" \t")
    if raw[:1] == b'"':
        key, rest = _sf_string(raw)
        if key is None:
            return _invalid(name, "it is not a valid quoted string")
        if rest.strip(b" \t")[:1] == b",":
            return _repeated(name)
        if rest.strip(b" \t")[:1] not in (b"", b";"):  # parameters after ';' are ignored
            return _invalid(name, "it holds more than one quoted string")
    else:
        if b"," in raw:
            return _repeated(name)
        if not _VISIBLE.match(raw):
            return _invalid(name, "it holds spaces or characters outside visible ASCII")
        key = raw.decode("ascii")
    if not key:
        return _invalid(name, "it is empty")
    if len(key) > options.max_key_length:
        return _invalid(
            name, f"it is {len(key)} characters long, more than {options.max_key_length}"
        )
    return key


_VISIBLE = re.compile(rb"[\x21-\x7e]*\Z")  # a bare token: visible ASCII, no space


def _sf_string(raw: bytes) -> tuple[str | None, bytes]:
    """RFC 8941 3.3.3: a quoted string of visible ASCII and spaces, with ``\\"`` and ``\\\\``."""
    out = bytearray()
    i = 1
    while i < len(raw):
        byte = raw[i]
        if byte == 0x5C:  # backslash
            if i + 1 >= len(raw) or raw[i + 1] not in (0x22, 0x5C):
                return None, b""
            out.append(raw[i + 1])
            i += 2
            continue
        if byte == 0x22:
            return out.decode("ascii"), raw[i + 1 :]
        if byte < 0x20 or byte > 0x7E:
            return None, b""
        out.append(byte)
        i += 1
    return None, b""  # no closing quote


def _repeated(name: str) -> Response:
    return problem(
        400,
        "key-repeated",
        "Idempotency key repeated",
        f"the {name} header came more than once: send it once, with one value",
    )


def _invalid(name: str, why: str) -> Response:
    return problem(
        400,
        "key-invalid",
        "Idempotency key invalid",
        f"the {name} header's value is not a usable key: {why}. Send a quoted string or a"
        " token of visible ASCII characters, such as a UUID",
    )


def too_large(
    options: HttpOptions[Any], key: str, size: int | None, limit: int | None = None
) -> Response:
    """413: the body is over ``limit`` (default ``max_request_body``); the app does not run."""
    what = "" if size is None else f" ({size} bytes)"
    return problem(
        413,
        "request-too-large",
        "Request body too large",
        f"the request body{what} with key {key!r} is larger than the"
        f" {options.max_request_body if limit is None else limit} bytes this server reads to"
        " fingerprint it; nothing was run or recorded",
    )


def incomplete(key: str, got: int, expected: int) -> Response:
    """400: the body ended before its ``Content-Length`` (the client left); nothing ran."""
    return problem(
        400,
        "request-incomplete",
        "Request body incomplete",
        f"the request body with key {key!r} ended after {got} of its {expected} bytes (the"
        " connection was closed?); nothing was run or recorded",
    )


def default_fingerprint(method: str, path: str, query: str, body: bytes) -> str:
    """The default fingerprint: the method, path, query and body (so the same key sent with
    another body, or to another route, is refused with 422)."""
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode("utf-8", "surrogateescape"), query.encode()):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    digest.update(body)
    return "http1:" + digest.hexdigest()


def fingerprint_of(given: str | bytes, where: str) -> str:
    """A user ``fingerprint`` callable's answer as the stored fingerprint."""
    if isinstance(given, bytes):
        return "http1:" + hashlib.sha256(given).hexdigest()
    if not isinstance(given, str):
        raise TypeError(f"{where}: fingerprint returned {type(given).__name__}, not str or bytes")
    return given


class Recorded(NamedTuple):
    """A response as recorded: replayed as it was, or, when ``kept`` is False (its body was
    over ``max_response_body``), answered with a problem saying it cannot be replayed."""

    status: int
    headers: list[Header]
    body: bytes
    kept: bool = True
    reason: str = ""  # the app's reason phrase, where the server has one (WSGI, Django)
    trailers: tuple[Header, ...] = ()  # ASGI's http.response.trailers


class _ResponseCodec:
    """Recorded responses as payloads: a JSON line (status, headers) and the body's bytes.

    Never a pickle: a record read back from a shared store is parsed, not executed."""

    __name__ = "http-response"

    @staticmethod
    def dumps(value: object) -> bytes:
        if not isinstance(value, Recorded):
            raise TypeError(f"only an HTTP response is recorded here, not {type(value).__name__}")
        head: dict[str, Any] = {
            "status": value.status,
            "headers": [[name.decode("latin-1"), v.decode("latin-1")] for name, v in value.headers],
            "kept": value.kept,
        }
        if value.reason:
            head["reason"] = value.reason
        if value.trailers:
            head["trailers"] = [
                [n.decode("latin-1"), v.decode("latin-1")] for n, v in value.trailers
            ]
        return json.dumps(head, separators=(",", ":")).encode() + b"\n" + value.body

    @staticmethod
    def loads(data: bytes) -> Recorded:
        line, _, body = data.partition(b"\n")
        head = json.loads(line)
        headers = [(name.encode("latin-1"), v.encode("latin-1")) for name, v in head["headers"]]
        trailers = tuple(
            (n.encode("latin-1"), v.encode("latin-1")) for n, v in head.get("trailers", ())
        )
        return Recorded(
            int(head["status"]), headers, body, bool(head["kept"]), head.get("reason", ""), trailers
        )


RESPONSE_CODEC = _ResponseCodec()


def describe(payload: bytes) -> str | None:
    """A recorded response in a line, for ``idemfn show``; None when ``payload`` is not one."""
    from .._outcome import serializer_of

    try:
        recorded = serializer_of(RESPONSE_CODEC).load(payload)
    except Exception:
        return None
    if not isinstance(recorded, Recorded):
        return None
    if not recorded.kept:
        return f"HTTP {recorded.status} response, its body too large to record"
    body = recorded.body[:200]
    more = f"… ({len(recorded.body)} bytes)" if len(recorded.body) > 200 else ""
    count = len(recorded.headers)
    headers = f"{count} header" if count == 1 else f"{count} headers"
    return f"HTTP {recorded.status} response, {headers}, body {body!r}{more}"


class Recorder:
    """Keeps the app's response as it goes out: status, headers, and the body up to ``limit``
    bytes (past it, ``overflowed`` and the body is dropped: it is never buffered unbounded)."""

    __slots__ = (
        "chunks",
        "finished",
        "headers",
        "limit",
        "overflowed",
        "reason",
        "size",
        "status",
        "trailers",
    )

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.status = 0
        self.headers: list[Header] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.overflowed = False
        self.finished = False  # the app sent its response's end
        self.reason = ""
        self.trailers: list[Header] = []

    def start(self, status: int, headers: Iterable[Header], reason: str = "") -> None:
        self.status = status
        self.headers = list(headers)
        self.reason = reason

    def add(self, chunk: bytes) -> None:
        if self.overflowed or not chunk:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.overflowed = True
            self.chunks.clear()
        else:
            self.chunks.append(chunk)


class HeldBack:
    """A streamed response's chunks as the server iterates them, from ``pull()`` (the next
    chunk, or None at the end, where the subclass settles the claim).

    With ``hold`` (the response has a ``Content-Length``, so its client knows it has the whole
    response from its last byte, and may retry at once) one chunk is held back until the next
    is known: the claim is settled before the last goes out, and that retry is replayed, never
    told 409. Without it (the response's end goes out after the claim is settled anyway) no
    chunk waits for the next, so a stream of events reaches its client as it comes."""

    __slots__ = ("_held", "_hold")

    def __init__(self, hold: bool) -> None:
        self._hold = hold
        self._held: bytes | None = None  # the chunk to send next, once the one after is known

    def pull(self) -> bytes | None:
        raise NotImplementedError

    def __iter__(self) -> HeldBack:
        return self

    def __next__(self) -> bytes:
        if not self._hold:
            chunk = self.pull()
            if chunk is None:
                raise StopIteration
            return chunk
        if self._held is None:
            self._held = self.pull()
            if self._held is None:
                raise StopIteration
        following = self.pull()
        chunk, self._held = self._held, following
        return chunk


def outcome(options: HttpOptions[Any], recorder: Recorder) -> Recorded | None:
    """What to record for the app's finished response: None releases the key (a status
    outside ``recorded_statuses``)."""
    if not options.records(recorder.status):
        return None
    dropped = _NOT_REPLAYED
    for name, value in recorder.headers:
        if name.lower() == b"connection":  # it names more headers about this connection only
            dropped = dropped | {part.strip().lower() for part in value.split(b",")}
    headers = [header for header in recorder.headers if header[0].lower() not in dropped]
    if recorder.overflowed:
        return Recorded(recorder.status, headers, b"", kept=False, reason=recorder.reason)
    return Recorded(
        recorder.status,
        headers,
        b"".join(recorder.chunks),
        reason=recorder.reason,
        trailers=tuple(recorder.trailers),
    )


def settle(claim: Claim, recorded: Recorded | None) -> None:
    """Record the app's response (or release the key). The response goes out either way: a
    store that fails here is logged, and the key is judged abandoned once its lease runs out."""
    try:
        if recorded is None:
            claim.release()
        else:
            claim.complete(recorded)
    except IdempotencyError as exc:  # StoreError, OwnershipLost
        not_settled(claim, exc)


async def asettle(claim: Claim, recorded: Recorded | None) -> None:
    """``settle`` on the store's awaitable primitives."""
    try:
        if recorded is None:
            await claim.arelease()
        else:
            await claim.acomplete(recorded)
    except IdempotencyError as exc:
        not_settled(claim, exc)


def not_settled(claim: Claim, exc: IdempotencyError) -> None:
    """Log that the app's response went out unrecorded."""
    logger.error(
        "idemfn: the response to key %r was sent but could not be recorded (%s: %s)",
        claim.key,
        type(exc).__name__,
        exc,
        extra=log_fields(claim.key, failed(exc)),
    )


def start(
    options: HttpOptions[Any], key: str, stored: str, fingerprint: str, deadline: Due | None
) -> Claim | Response:
    """The decision on ``stored``: a ``Claim`` (run the app) or the ``Response`` to send."""
    try:
        step = begin_with(options.store, stored, fingerprint, options.policy, deadline)
    except IdempotencyError as exc:
        return refusal(options, key, exc)
    if isinstance(step, Finished):
        return replay(key, step)
    return step


async def astart(
    options: HttpOptions[Any], key: str, stored: str, fingerprint: str, deadline: Due | None
) -> Claim | Response:
    """``start`` on the store's awaitable primitives: never blocks the event loop."""
    try:
        step = await abegin_with(options.store, stored, fingerprint, options.policy, deadline)
    except IdempotencyError as exc:
        return refusal(options, key, exc)
    if isinstance(step, Finished):
        return replay(key, step)
    return step


def refusal(options: HttpOptions[Any], key: str, exc: IdempotencyError) -> Response:
    """The answer when the key cannot be claimed or replayed now."""
    if isinstance(exc, AlreadyRunning):
        return problem(
            409,
            "in-progress",
            "Request in progress",
            f"a request with key {key!r} is still being processed: retry later",
            retry_after=1,
        )
    if isinstance(exc, FingerprintMismatch):
        return problem(
            422,
            "key-reused",
            "Idempotency key reused",
            f"key {key!r} was first used with another request (method, path, query or body):"
            " use a new key for a new request",
        )
    if isinstance(exc, DeadlineExceeded):
        return problem(
            400,
            "request-expired",
            "Request expired",
            f"the request with key {key!r} came after its deadline and was never processed:"
            " it will not be",
        )
    if isinstance(exc, StoreError):
        logger.error(
            "idemfn: the store failed on key %r: %s",
            exc.key,
            exc,
            extra=about(exc.key, STORE_ERROR),
        )
        return problem(
            503,
            "store-unavailable",
            "Idempotency store unavailable",
            f"the request with key {key!r} was not processed: the server could not check"
            " whether it already was. Retry later",
            retry_after=1,
        )
    raise exc


def replay(key: str, finished: Finished) -> Response:
    """The recorded response again, marked ``Idempotent-Replayed: true``; a problem when the
    first request was interrupted, or its response was too large to keep."""
    entry = finished.entry
    if entry.status == OK:
        try:
            recorded: Recorded = finished.replay()
        except StoreError as exc:
            logger.error(
                "idemfn: the response recorded for %r does not load: %s",
                entry.key,
                exc,
                extra=log_fields(entry.key, REPLAYED_EVENT),
            )
        else:
            if recorded.kept:
                return Response(
                    recorded.status,
                    [*recorded.headers, REPLAYED],
                    recorded.body,
                    recorded.reason,
                    recorded.trailers,
                )
            return problem(
                500,
                "response-not-recorded",
                "Response not recorded",
                f"the request with key {key!r} was processed, but its response was too large"
                " to record, so it can't be sent again",
            )
    return problem(
        500,
        "interrupted",
        "Request interrupted",
        f"the request with key {key!r} was interrupted and can't be recovered: it may have"
        " had effects, so it will not run again. Use a new key to try again",
    )
