"""The HTTP middlewares' shared core (idemfn/_http): the key header, the problem+json answers,
the recorded response's codec, what is recorded of a response, the default fingerprint, and
the options' validation. The drivers are tested in tests/integrations/http/."""

from __future__ import annotations

import json
import pickle
from datetime import timedelta
from typing import Any

import pytest

from idemfn import MemoryStore
from idemfn._http.exchange import (
    PROBLEMS,
    RESPONSE_CODEC,
    Recorded,
    Recorder,
    Response,
    default_fingerprint,
    describe,
    fingerprint_of,
    outcome,
    problem,
    read_key,
)
from idemfn._http.options import HttpOptions
from idemfn._http.request import Headers, Request


def options(**given: Any) -> HttpOptions[Any]:
    given.setdefault("store", MemoryStore())
    return HttpOptions(**given)


OPTIONS = options()


def key_of(*values: bytes, **given: Any) -> str | Response | None:
    return read_key(options(**given) if given else OPTIONS, list(values))


def problem_type(answer: object) -> str:
    """The problem's type slug; fails unless ``answer`` is a well-formed 400 problem."""
    assert isinstance(answer, Response), answer
    assert answer.status == 400
    body = json.loads(answer.body)
    assert body["status"] == 400
    assert "Idempotency-Key" in body["detail"]
    type_: str = body["type"]
    assert type_.startswith(PROBLEMS)
    return type_[len(PROBLEMS) :]


# -- read_key -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (b'"abc"', "abc"),  # the draft's form: an RFC 8941 sf-string
        (b'"a\\"b"', 'a"b'),  # escaped quote
        (b'"a\\\\b"', "a\\b"),  # escaped backslash
        (b'"a b, c"', "a b, c"),  # spaces and commas inside the quotes are the key's
        (b'"~!#$%&()*+/:<=>?@[]^`{|}"', "~!#$%&()*+/:<=>?@[]^`{|}"),
        (b"abc", "abc"),  # a bare token, as Stripe's clients send
        (b"8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        (b'a"b', 'a"b'),  # a token with a quote that does not open the value
        (b"  abc\t", "abc"),  # surrounding whitespace (OWS) is not the key's
        (b' \t"abc" ', "abc"),
        (b'"abc";p=1', "abc"),  # an sf-string's parameters are ignored
        (b'"abc";p="x, y";q', "abc"),
        (b'"abc"  ', "abc"),
    ],
)
def test_a_key_is_an_sf_string_or_a_bare_token(value: bytes, key: str) -> None:
    assert key_of(value) == key


def test_a_key_exactly_max_key_length_long_is_accepted_one_more_is_not() -> None:
    assert key_of(b"k" * 255) == "k" * 255
    assert problem_type(key_of(b"k" * 256)) == "key-invalid"
    # The length is the key's, not the header value's: quotes and escapes do not count.
    assert key_of(b'"' + b'\\"' * 255 + b'"') == '"' * 255
    assert problem_type(key_of(b'"' + b"k" * 256 + b'"')) == "key-invalid"
    assert key_of(b"abcd", max_key_length=4) == "abcd"
    answer = key_of(b"abcde", max_key_length=4)
    assert problem_type(answer) == "key-invalid"
    assert isinstance(answer, Response) and "5 characters long, more than 4" in answer.body.decode()


@pytest.mark.parametrize(
    "values",
    [
        [b"a", b"b"],  # the header twice
        [b"a", b"a"],  # even with the same value
        [b"a", b""],
        [b"a, b"],  # folded by a proxy or a WSGI server: "a, b"
        [b"a,b"],
        [b'"a", "b"'],
        [b'"a","b"'],
        [b'"a" , b'],
    ],
)
def test_a_header_sent_twice_or_folded_is_repeated(values: list[bytes]) -> None:
    assert problem_type(key_of(*values)) == "key-repeated"


@pytest.mark.parametrize(
    "value",
    [
        b"",  # empty
        b"   ",
        b'""',  # an empty sf-string
        b'"abc',  # no closing quote
        b'"a\\nb"',  # an escape RFC 8941 does not have
        b'"abc\\"',  # a quote escaped away: unclosed
        b'"a\tb"',  # a control character inside the quotes
        b'"caf\xc3\xa9"',  # non-ASCII inside the quotes
        b'"abc"def',  # text after the string that is not a parameter
        b'"abc" "def"',
        b"a b",  # spaces in a token
        b"a\tb",
        b"caf\xc3\xa9",  # non-ASCII in a token
        b"caf\xe9",  # latin-1 in a token
        b"a\x7fb",  # DEL
    ],
)
def test_an_empty_or_malformed_key_is_invalid(value: bytes) -> None:
    assert problem_type(key_of(value)) == "key-invalid"


def test_no_key_passes_or_is_refused_as_the_option_says() -> None:
    assert key_of() is None
    answer = key_of(required=True)
    assert problem_type(answer) == "key-missing"
    # The detail names the configured header.
    named = read_key(options(required=True, header="X-Request-Id"), [])
    assert isinstance(named, Response) and "X-Request-Id" in json.loads(named.body)["detail"]


# -- problem+json -------------------------------------------------------------------------------


def test_problems_are_rfc_9457_json_with_a_type_uri_per_case() -> None:
    answer = problem(409, "in-progress", "Request in progress", "key 'k' is busy", retry_after=1)
    assert answer.status == 409
    headers = dict(answer.headers)
    assert headers[b"content-type"] == b"application/problem+json"
    assert headers[b"content-length"] == str(len(answer.body)).encode()
    assert headers[b"retry-after"] == b"1"
    assert json.loads(answer.body) == {
        "type": "https://idemfn.readthedocs.io/en/latest/http/#in-progress",
        "title": "Request in progress",
        "status": 409,
        "detail": "key 'k' is busy",
    }
    assert b"retry-after" not in dict(problem(422, "key-reused", "t", "d").headers)


def test_the_key_header_problems_point_at_their_sections() -> None:
    seen = {
        problem_type(key_of(required=True)),
        problem_type(key_of(b"a", b"b")),
        problem_type(key_of(b"")),
    }
    assert seen == {"key-missing", "key-repeated", "key-invalid"}
    for slug in seen:
        assert PROBLEMS + slug == f"https://idemfn.readthedocs.io/en/latest/http/#{slug}"


# -- the recorded response's codec --------------------------------------------------------------


@pytest.mark.parametrize(
    "recorded",
    [
        Recorded(201, [(b"content-type", b"application/json")], b'{"id": 1}'),
        Recorded(204, [], b""),  # no headers, an empty body
        Recorded(200, [(b"x-name", b"caf\xe9 \xff\x80")], b"latin-1 header values"),
        Recorded(200, [(b"X-Spelling", b"Kept"), (b"x-twice", b"1"), (b"x-twice", b"2")], b"."),
        Recorded(200, [], bytes(range(256)) * 3),  # binary, with newlines, NUL and \x80
        Recorded(200, [], b"\n\n{\n"),  # a body that starts like a second head line
        Recorded(500, [(b"content-type", b"text/plain")], b"", kept=False),
    ],
)
def test_the_codec_round_trips_a_response(recorded: Recorded) -> None:
    data = RESPONSE_CODEC.dumps(recorded)
    assert isinstance(data, bytes)
    assert RESPONSE_CODEC.loads(data) == recorded
    # As the store holds it: through the policy's serializer, which checks it loads back.
    serializer = OPTIONS.policy.serializer
    assert not serializer.unpickles
    assert serializer.load(serializer.dump_value(recorded)) == recorded


def test_the_codec_records_only_responses() -> None:
    with pytest.raises(TypeError, match="only an HTTP response"):
        RESPONSE_CODEC.dumps({"status": 200})


class _Detonator:
    """Unpickling it has an effect: a replay must never unpickle a record."""

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_DETONATED.append, ("unpickled",))


_DETONATED: list[str] = []


def test_a_replay_never_unpickles() -> None:
    _DETONATED.clear()
    payload = pickle.dumps(_Detonator())
    with pytest.raises(ValueError):
        RESPONSE_CODEC.loads(payload)
    with pytest.raises(ValueError, match="never unpickles"):
        OPTIONS.policy.serializer.load(payload)
    assert _DETONATED == []
    # (the drivers' replay of such a record: tests/integrations/http/test_asgi_inprocess.py)


def test_a_recorded_response_is_described_in_a_line() -> None:
    serializer = OPTIONS.policy.serializer
    short = serializer.dump_value(Recorded(201, [(b"x", b"1")], b'{"id": 1}'))
    assert describe(short) == "HTTP 201 response, 1 header, body b'{\"id\": 1}'"
    long = describe(serializer.dump_value(Recorded(200, [], b"x" * 201)))
    assert long == f"HTTP 200 response, 0 headers, body {b'x' * 200!r}… (201 bytes)"
    not_kept = serializer.dump_value(Recorded(200, [], b"", kept=False))
    assert describe(not_kept) == "HTTP 200 response, its body too large to record"
    assert describe(pickle.dumps(_Detonator())) is None and _DETONATED == []
    assert describe(b"not a record") is None


# -- what is recorded of a response -------------------------------------------------------------


def recorder(
    status: int, headers: list[tuple[bytes, bytes]], *chunks: bytes, limit: int = 100
) -> Recorder:
    kept = Recorder(limit)
    kept.start(status, headers)
    for chunk in chunks:
        kept.add(chunk)
    kept.finished = True
    return kept


HOP_BY_HOP = [
    b"Connection",
    b"keep-alive",
    b"PROXY-AUTHENTICATE",
    b"Proxy-Authorization",
    b"proxy-connection",
    b"TE",
    b"trailer",
    b"Transfer-Encoding",
    b"UPGRADE",
]


@pytest.mark.parametrize("date", [b"date", b"Date", b"DATE", b"dAtE"])
def test_hop_by_hop_headers_and_date_are_not_recorded_in_any_case(date: bytes) -> None:
    headers = [(b"content-type", b"text/plain")]
    for name in HOP_BY_HOP:
        headers.append((name, b"x"))
        headers.append((b"X-Kept-" + name, b"y"))  # a name that merely contains one is kept
    headers.append((date, b"Thu, 01 Jan 2026 00:00:00 GMT"))
    headers.append((b"Set-Cookie", b"a=1"))
    headers.append((b"set-cookie", b"b=2"))
    recorded = outcome(OPTIONS, recorder(200, headers, b"he", b"llo"))
    assert recorded == Recorded(
        200,
        [(b"content-type", b"text/plain")]
        + [(b"X-Kept-" + name, b"y") for name in HOP_BY_HOP]
        + [(b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2")],  # order and spelling kept
        b"hello",
    )


def test_a_response_over_the_limit_is_recorded_as_not_kept() -> None:
    assert outcome(OPTIONS, recorder(200, [], b"12345", b"67890", limit=10)) == Recorded(
        200, [], b"1234567890"
    )
    over = recorder(200, [(b"x", b"1")], b"12345", b"67890", b"1", limit=10)
    assert over.overflowed and over.chunks == []  # never held past the limit
    assert outcome(OPTIONS, over) == Recorded(200, [(b"x", b"1")], b"", kept=False)


def test_recorded_statuses_release_the_others() -> None:
    some = options(recorded_statuses=range(200, 500))
    assert outcome(some, recorder(200, [], b"ok")) == Recorded(200, [], b"ok")
    assert outcome(some, recorder(499, [], b"no")) == Recorded(499, [], b"no")
    assert outcome(some, recorder(500, [], b"boom")) is None
    assert outcome(some, recorder(503, [], b"x" * 200, limit=10)) is None
    assert outcome(options(recorded_statuses={201}), recorder(200, [], b"")) is None
    assert outcome(options(recorded_statuses=[]), recorder(201, [], b"")) is None
    assert outcome(OPTIONS, recorder(503, [], b"")) == Recorded(503, [], b"")  # None: every status


# -- the default fingerprint --------------------------------------------------------------------


def test_the_default_fingerprint_covers_method_path_query_and_body() -> None:
    base = default_fingerprint("POST", "/orders", "a=1", b"{}")
    assert base == default_fingerprint("POST", "/orders", "a=1", b"{}")
    assert base.startswith("http1:")
    others = {
        default_fingerprint("PATCH", "/orders", "a=1", b"{}"),
        default_fingerprint("POST", "/orders/", "a=1", b"{}"),
        default_fingerprint("POST", "/Orders", "a=1", b"{}"),
        default_fingerprint("POST", "/orders", "a=2", b"{}"),
        default_fingerprint("POST", "/orders", "", b"{}"),
        default_fingerprint("POST", "/orders", "a=1", b"{ }"),
        default_fingerprint("POST", "/orders", "a=1", b""),
        default_fingerprint("POST", "/ordérs", "a=1", b"{}"),
    }
    assert base not in others
    assert len(others) == 8


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (("POST", "/a", "b", b""), ("POST", "/ab", "", b"")),  # path | query
        (("POST", "/a", "", b"b"), ("POST", "/ab", "", b"")),  # path | body
        (("POST", "/a", "q", b"b"), ("POST", "/a", "qb", b"")),  # query | body
        (("POST", "/a", "", b""), ("POS", "T/a", "", b"")),  # method | path
        (("POST", "", "/a", b""), ("POST", "/a", "", b"")),  # an empty part
        (("POST", "/a", "", b"\x00\x00\x00\x00\x00\x00\x00\x00"), ("POST", "/a", "", b"")),
    ],
)
def test_the_default_fingerprint_does_not_collide_on_boundaries(
    one: tuple[str, str, str, bytes], other: tuple[str, str, str, bytes]
) -> None:
    assert default_fingerprint(*one) != default_fingerprint(*other)


def test_a_fingerprint_callable_may_answer_str_or_bytes() -> None:
    assert fingerprint_of("account-7", "where") == "account-7"
    assert fingerprint_of("", "where") == ""  # "": nothing is compared
    as_bytes = fingerprint_of(b"account-7", "where")
    assert as_bytes.startswith("http1:") and as_bytes != fingerprint_of(b"account-8", "where")
    assert fingerprint_of(b"", "where") != ""  # empty bytes are still compared
    with pytest.raises(TypeError, match="where: fingerprint returned int"):
        fingerprint_of(7, "where")  # type: ignore[arg-type]


# -- HttpOptions --------------------------------------------------------------------------------


def _not_callable() -> object:
    return "module.function"


@pytest.mark.parametrize(
    ("given", "error", "named"),
    [
        ({"header": ""}, ValueError, "header"),
        ({"header": "Idempotency Key"}, ValueError, "header"),
        ({"header": "Idempotency-Key:"}, ValueError, "header"),
        ({"header": "Clé"}, ValueError, "header"),
        ({"header": 1}, ValueError, "header"),
        ({"header": b"Idempotency-Key"}, ValueError, "header"),
        ({"methods": "POST"}, TypeError, "methods"),  # a bare str would be {"P", "O", ...}
        ({"methods": b"POST"}, TypeError, "methods"),
        ({"methods": 5}, TypeError, "methods"),
        ({"methods": ["POST", "PO ST"]}, ValueError, "methods"),
        ({"methods": ["POST", ""]}, ValueError, "methods"),
        ({"methods": [b"POST"]}, ValueError, "methods"),
        ({"required": "yes"}, TypeError, "required"),
        ({"required": 1}, TypeError, "required"),
        ({"scope": "tenant"}, TypeError, "scope"),
        ({"fingerprint": 1}, TypeError, "fingerprint"),
        ({"deadline": _not_callable()}, TypeError, "deadline"),
        ({"ttl": 0}, ValueError, "ttl"),
        ({"ttl": -1.0}, ValueError, "ttl"),
        ({"ttl": "1"}, TypeError, "ttl"),
        ({"ttl": float("inf")}, ValueError, "ttl"),
        ({"lease": 0}, ValueError, "lease"),
        ({"lease": timedelta(0)}, ValueError, "lease"),
        ({"lease": None}, TypeError, "lease"),
        ({"wait": -0.5}, ValueError, "wait"),
        ({"wait": float("nan")}, ValueError, "wait"),
        ({"wait": True}, TypeError, "wait"),
        ({"max_key_length": 0}, ValueError, "max_key_length"),
        ({"max_key_length": 1.5}, ValueError, "max_key_length"),
        ({"max_request_body": 0}, ValueError, "max_request_body"),
        ({"max_request_body": "10"}, ValueError, "max_request_body"),
        ({"max_request_body": True}, ValueError, "max_request_body"),
        ({"max_response_body": -1}, ValueError, "max_response_body"),
        ({"max_response_body": None}, ValueError, "max_response_body"),
        ({"recorded_statuses": 200}, TypeError, "recorded_statuses"),  # not range(200, 201)
        ({"recorded_statuses": "200"}, TypeError, "recorded_statuses"),
        ({"recorded_statuses": b"200"}, TypeError, "recorded_statuses"),
        ({"recorded_statuses": object()}, TypeError, "recorded_statuses"),
        ({"store": 42}, TypeError, "store"),
        ({"store": "nosuch://host"}, ValueError, "store"),
    ],
)
def test_a_wrong_option_is_refused_by_name(
    given: dict[str, Any], error: type[Exception], named: str
) -> None:
    given.setdefault("store", MemoryStore())
    with pytest.raises(error) as raised:
        HttpOptions(where="the.Middleware", **given)
    message = str(raised.value)
    assert message.startswith("the.Middleware: ")
    assert named in message


def test_options_are_normalised_once() -> None:
    store = MemoryStore()
    given = HttpOptions(
        store=store,
        header="X-Request-Id",
        methods=["post", "Put"],
        ttl=timedelta(hours=1),
        lease=timedelta(seconds=5),
        wait=timedelta(seconds=2),
        recorded_statuses=range(200, 500),
    )
    assert given.store is store
    assert given.header_bytes == b"x-request-id"
    assert given.methods == frozenset({"POST", "PUT"})
    assert (given.policy.ttl, given.policy.lease, given.policy.wait) == (3600.0, 5.0, 2.0)
    assert given.records(201) and not given.records(503)
    assert OPTIONS.methods == frozenset({"POST", "PATCH"})
    assert OPTIONS.header == "Idempotency-Key" and OPTIONS.required is False
    assert OPTIONS.records(599)
    assert OPTIONS.policy.ttl == 86400.0 and OPTIONS.policy.wait == 0.0
    assert (OPTIONS.max_key_length, OPTIONS.max_request_body, OPTIONS.max_response_body) == (
        255,
        10 * 1024 * 1024,
        1024 * 1024,
    )
    assert HttpOptions(store=store, ttl=None).policy.ttl is None


def test_the_stored_key_keeps_tenants_apart() -> None:
    assert OPTIONS.stored_key(None, "k") == "http::k"
    # A tenant cannot end early: its ':' is quoted, so ("a", "b:c") is not ("a:b", "c").
    assert OPTIONS.stored_key("a", "b:c") != OPTIONS.stored_key("a:b", "c")
    assert OPTIONS.stored_key("a%3Ab", "c") != OPTIONS.stored_key("a:b", "c")
    assert OPTIONS.stored_key("é", "k") != OPTIONS.stored_key("e", "k")
    with pytest.raises(TypeError, match="scope returned int"):
        OPTIONS.stored_key(7, "k")  # type: ignore[arg-type]


# -- the request view ---------------------------------------------------------------------------


def test_request_headers_are_looked_up_in_any_case() -> None:
    headers = Headers([("X-Api-Key", "a"), ("content-type", "text/plain"), ("x-api-key", "b")])
    assert headers["x-api-key"] == headers["X-API-KEY"] == "a"
    assert headers.get("Content-Type") == "text/plain"
    assert headers.get("missing", "default") == "default"
    assert headers.getall("X-Api-Key") == ["a", "b"]
    assert headers.getall("missing") == []
    assert list(headers) == ["x-api-key", "content-type"]
    assert len(headers) == 2 and "CONTENT-TYPE" in headers
    with pytest.raises(KeyError):
        headers["missing"]
    request = Request("POST", "/o", "a=1", headers, b"{}", {})
    assert repr(request) == "<Request POST /o?a=1 (2 bytes)>"


def test_headers_named_by_connection_are_not_recorded() -> None:
    # RFC 9110 7.6.1: Connection names more headers that are about this connection only.
    recorder = Recorder(100)
    recorder.start(
        200,
        [
            (b"Connection", b"close, X-Hop"),
            (b"x-hop", b"1"),
            (b"X-Kept", b"2"),
        ],
    )
    recorder.add(b"ok")
    recorded = outcome(HttpOptions(store=MemoryStore()), recorder)
    assert recorded is not None and recorded.headers == [(b"X-Kept", b"2")]


@pytest.mark.parametrize("statuses", [["200"], (200, "503"), {True}])
def test_recorded_statuses_must_hold_int_statuses(statuses: object) -> None:
    with pytest.raises(TypeError, match="recorded_statuses must hold int statuses"):
        HttpOptions(store=MemoryStore(), recorded_statuses=statuses)  # type: ignore[arg-type]
