"""The record commands: ``ls``, ``show``, ``forget``, ``prune`` and ``stats``."""

from __future__ import annotations

import argparse
import base64
import json
import shlex
import shutil
import sys
from collections import Counter
from datetime import datetime, timezone
from typing import Any

from .. import _owner
from .._errors import StoreError
from .._lease import abandoned_kind, abandoned_reason
from .._outcome import load
from .._record import Entry, Status
from .._stores import Store
from .._stores.base import TamperedRecord
from ..events import halted_reason
from . import command_outcome
from .parser import CORRUPT, KEY_WIDTH, PROG, TAMPERED, CliError, Exit, say
from .store import command_store

__all__ = ["forget", "ls", "prune", "record_json", "show", "stats"]


def _unreadable(error: StoreError) -> str:
    return TAMPERED if isinstance(error, TamperedRecord) else CORRUPT


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def _span(seconds: float) -> str:
    """A duration for people: 42s, 5m, 3h, 12d."""
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _state(entry: Entry, now: float) -> str:
    """The status, with what the store alone does not say: expired, or abandoned."""
    if entry.is_expired(now):
        return "expired"
    if entry.status == Status.PROCESSING and abandoned_reason(entry, now) is not None:
        return "abandoned"
    return entry.status


def _why_gone(entry: Entry, now: float) -> str | None:
    """Why a processing record's owner is known to be gone (None while it may run)."""
    if abandoned_reason(entry, now) is None:
        return None
    return _owner.gone_reason(entry.owner) or f"its lease ran out at {_iso(entry.lease_until)}"


def _shown(key: str) -> str:
    """A key as a table cell: control characters escaped, never sent to the terminal."""
    return key if key.isprintable() else key.encode("unicode_escape").decode("ascii")


def _owner_short(owner: str) -> str:
    parsed = _owner.parse(owner)
    return f"{parsed[0]}:{parsed[2]}" if parsed else owner


def _changed_at(entry: Entry) -> float:
    return entry.finished_at if entry.finished_at is not None else entry.started_at


def record_json(entry: Entry, now: float) -> dict[str, Any]:
    """Every field of a record, as JSON values (times as ISO 8601 UTC)."""
    processing = entry.status == Status.PROCESSING
    return {
        "key": entry.key,
        "status": entry.status,
        "state": _state(entry, now),
        "fingerprint": entry.fingerprint,
        "owner": entry.owner,
        "owner_gone": _why_gone(entry, now) if processing else None,
        "token": entry.token,
        "attempt": entry.attempt,
        "started_at": _iso(entry.started_at),
        "finished_at": _iso(entry.finished_at),
        "expires_at": _iso(entry.expires_at),
        "lease_expires_at": _iso(entry.lease_until) if processing else None,
        "ttl": entry.ttl,
        "reason": entry.reason,
        "exc_type": entry.exc_type,
        "message": entry.message,
        "traceback": entry.traceback,
    }


def _expiry(entry: Entry, now: float) -> str:
    if entry.status == Status.PROCESSING:
        if abandoned_reason(entry, now) is not None:
            return "owner gone"
        if entry.lease_until is None:
            return "-"
        return f"lease {_span(entry.lease_until - now)}"
    if entry.expires_at is None:
        return "never"
    if entry.expires_at <= now:
        return f"expired {_span(now - entry.expires_at)} ago"
    return f"in {_span(entry.expires_at - now)}"


def _print_json(value: object) -> None:
    if sys.stdout is not None:  # None: closed (`>&-`)
        json.dump(value, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")


def _table(rows: list[list[str]], header: list[str], *, wide: bool) -> int:
    """Print ``rows`` in columns under ``header``; return how many keys were shortened.

    The first column (the keys) is at most as wide as a terminal leaves beside the others (at
    least 12), or ``KEY_WIDTH`` when stdout is no terminal; with ``wide``, as wide as its widest.
    """
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    if not wide:
        if sys.stdout is not None and sys.stdout.isatty():
            room = shutil.get_terminal_size().columns - sum(widths[1:]) - 2 * (len(widths) - 1)
            limit = max(room, 12)
        else:
            limit = KEY_WIDTH
        widths[0] = max(min(widths[0], limit), len(header[0]))
    shortened = 0
    for row in [header, *rows]:
        key = row[0]
        if len(key) > widths[0]:
            key = _shorten(key, widths[0])
            shortened += 1
        cells = [key, *row[1:]]
        line = "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
        print(line.rstrip())
    return shortened


def _shorten(key: str, width: int) -> str:
    """``key`` in ``width`` characters: its start and its end, with "…" for the middle (keys
    that share a function's name differ at the end)."""
    tail = (width - 1) // 3
    return key[: width - 1 - tail] + "…" + key[len(key) - tail :]


def ls(args: argparse.Namespace) -> Exit:
    store = command_store(args)
    now = store.time()
    status: str | None = args.status
    broken: list[tuple[str, StoreError]] = []
    found = list(store.scan(args.prefix, corrupt=lambda key, error: broken.append((key, error))))
    scanned = [e for e in found if args.all or status == "expired" or not e.is_expired(now)]
    # The filter is on what the STATUS column shows (abandoned, expired), not the stored status.
    entries = [e for e in scanned if status is None or _state(e, now) == status]
    entries.sort(key=_changed_at, reverse=True)
    listed_broken = [b for b in broken if status is None or _unreadable(b[1]) == status]
    if args.limit is not None:
        entries = entries[: args.limit]
        listed_broken = listed_broken[: max(0, args.limit - len(entries))]
    if getattr(args, "json", False):
        _print_json(
            [record_json(e, now) for e in entries]
            + [
                {"key": key, "status": _unreadable(error), "error": str(error)}
                for key, error in listed_broken
            ]
        )
        return Exit.OK
    rows = [
        [
            _shown(e.key),
            _state(e, now),
            _span(now - _changed_at(e)),
            _owner_short(e.owner),
            _expiry(e, now),
        ]
        for e in entries
    ] + [[_shown(key), _unreadable(err), "-", "-", "-"] for key, err in listed_broken]
    if not rows:
        hidden = len(found) - len(scanned)
        print(_nothing_listed(args, store, len(scanned) + len(broken), hidden), file=sys.stderr)
        return Exit.OK
    shortened = _table(rows, ["KEY", "STATUS", "AGE", "OWNER", "EXPIRES"], wide=args.wide)
    if listed_broken:
        say(
            f"{len(listed_broken)} record{'' if len(listed_broken) == 1 else 's'} cannot be"
            f" read: `{PROG} show KEY` says why, `{PROG} forget --force KEY` deletes one unread"
        )
    if shortened:
        say(
            f"{shortened} key{' was' if shortened == 1 else 's were'} shortened with …:"
            f" `{PROG} ls --wide` or `--json` shows keys whole"
        )
    return Exit.OK


def _nothing_listed(args: argparse.Namespace, store: Store, scanned: int, hidden: int) -> str:
    """Why ls lists nothing: no records (of the prefix), or a --status that matches none of
    them; never "no records" for a store that has some."""
    where = f" starting with {args.prefix!r}" if args.prefix else ""
    expired = f"{hidden} expired record{'' if hidden == 1 else 's'}"
    if args.status is None or scanned == 0:
        also = f" but {expired}: `{PROG} ls --all` lists them" if hidden else ""
        return f"no records in {store!r}{where}{also}"
    also = f", and {expired}" if hidden else ""
    return (
        f"no records match --status {args.status} in {store!r}, which holds {scanned}"
        f" record{'' if scanned == 1 else 's'}{where}{also}: `{PROG} stats` counts them by status"
    )


def _forget_hint(error: StoreError, key: str) -> str:
    """How to delete an unreadable record, unless the error says so already."""
    if isinstance(error, TamperedRecord) or "forget --force" in str(error):
        return ""
    return f"; `{PROG} forget --force {key}` deletes it unread"


def _ignore(key: str, error: StoreError) -> None:
    """A ``corrupt=`` for look-ups that only need the readable records."""


def _find(store: Store, key: str) -> Entry:
    """``key``'s record, expired or not; ``CliError`` naming close keys when there is none, or
    saying why it cannot be read."""
    broken: dict[str, StoreError] = {}
    for entry in store.scan(key, corrupt=broken.__setitem__):
        if entry.key == key:
            return entry
    if key in broken:
        raise CliError(f"{broken[key]}{_forget_hint(broken[key], key)}", Exit.STORE_ERROR)
    raise _no_record(store, key)


def _no_record(store: Store, key: str) -> CliError:
    keys = [e.key for e in store.scan(corrupt=_ignore)]
    similar = sorted(k for k in keys if k.endswith(key) or key in k)[:5]
    hint = f"; keys like it: {', '.join(map(repr, similar))}" if similar else ""
    return CliError(f"no record for key {key!r} in {store!r}{hint}", Exit.NO_RECORD)


def _value(entry: Entry) -> dict[str, Any]:
    """What ``show`` says of a record's payload (loaded once, as a replay loads it)."""
    if entry.payload is None:
        return {}
    if entry.key.startswith("http:") and entry.status == Status.OK:  # the HTTP middlewares'
        from .._http.exchange import describe

        response = describe(entry.payload)
        if response is not None:
            return {"value_repr": response}
    try:
        value = load(entry.payload)
    except Exception as exc:
        if entry.status != Status.OK:
            return {}  # an exception that no longer loads: its type and message are shown
        return {
            "value_error": f"{type(exc).__name__}: {exc} (run idemfn where the value's classes"
            " import: from your project's directory, or with PYTHONPATH set)"
        }
    command = command_outcome.outcome_in(value)
    if command is not None:
        streams: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        for fd, data in command["output"]:
            streams[fd].extend(data)
        return {
            "command": {
                "argv": command["argv"],
                "exit_status": command_outcome.status_of(command),
                "ended": command_outcome.ending(command),
                "interrupted_by": command["interrupted_by"],
                "dropped": command["dropped"],
                "stdout": streams[1].decode("utf-8", "backslashreplace"),
                "stderr": streams[2].decode("utf-8", "backslashreplace"),
                # The text above is for people; these are the bytes, unambiguous.
                "stdout_base64": base64.b64encode(streams[1]).decode("ascii"),
                "stderr_base64": base64.b64encode(streams[2]).decode("ascii"),
            }
        }
    if entry.status != Status.OK:
        return {}
    try:
        text = repr(value)
    except Exception as exc:
        text = f"<repr() failed: {type(exc).__name__}: {exc}>"
    return {"value_repr": text}


def show(args: argparse.Namespace) -> Exit:
    store = command_store(args)
    now = store.time()
    entry = _find(store, args.key)
    fields = record_json(entry, now) | _value(entry)
    if getattr(args, "json", False):
        _print_json(fields)
        return Exit.OK
    since = f" ({_span(now - entry.started_at)} ago)"
    state = fields["state"]
    status = state if state == entry.status else f"{entry.status} ({state})"
    lines = [
        ("key", _shown(entry.key)),
        ("status", status),
        ("attempt", str(entry.attempt)),
        ("started", f"{fields['started_at']}{since}"),
    ]
    if entry.finished_at is not None:
        ago = _span(now - entry.finished_at)
        lines.append(("finished", f"{fields['finished_at']} ({ago} ago)"))
        expires = "never" if entry.expires_at is None else f"{fields['expires_at']}"
        lines.append(
            (
                "expires",
                expires if entry.expires_at is None else f"{expires} ({_expiry(entry, now)})",
            )
        )
    owner = f"{entry.owner}"
    if entry.status == Status.PROCESSING:
        gone = fields["owner_gone"]
        owner += f" (gone: {gone})" if gone else " (running)"
        lines.append(("lease until", f"{fields['lease_expires_at']} ({_expiry(entry, now)})"))
    lines += [
        ("owner", owner),
        ("ttl", "forever" if entry.ttl is None else f"{entry.ttl:g}s"),
        ("fingerprint", entry.fingerprint or "-"),
        ("token", entry.token),
    ]
    command = fields.get("command")
    if entry.reason and command is None:  # a command's ending says it better
        lines.append(("reason", entry.reason))
    if entry.exc_type and command is None:
        lines.append(("exception", f"{entry.exc_type}: {entry.message}"))
    if "value_repr" in fields:
        lines.append(("value", fields["value_repr"]))
    if "value_error" in fields:
        lines.append(("value", f"(cannot load it: {fields['value_error']})"))
    if command is not None:
        lines += [
            ("command", shlex.join(command["argv"])),
            ("exit status", f"{command['exit_status']} ({command['ended']})"),
        ]
        if command["dropped"]:
            lines.append(("not recorded", f"{command['dropped']} bytes of output (--max-output)"))
    for name, text in lines:
        print(f"{name + ':':<13}{text}")
    blocks = [("stdout", command["stdout"]), ("stderr", command["stderr"])] if command else []
    if entry.traceback and not command:
        blocks.append(("traceback", entry.traceback))
    for name, text in blocks:
        print(f"{name}:" + ("" if text else " (empty)"))
        for line in text.splitlines():
            print(f"  {line}")
    return Exit.OK


def forget(args: argparse.Namespace) -> int:
    store = command_store(args)
    removed: list[dict[str, Any]] = []
    problems: list[CliError] = []
    for key in dict.fromkeys(args.keys):  # each key once, in the order given
        try:
            removed.append(_forget_one(store, key, args.status, args.force))
        except CliError as error:
            problems.append(error)
    if getattr(args, "json", False):
        _print_json(
            {
                "removed": removed,
                "not_removed": [{"error": str(p), "exit_status": int(p.status)} for p in problems],
            }
        )
    else:
        for record in removed:
            print(f"forgot {record['key']} (was {record['state']})")
    for problem in problems:
        say(str(problem))
    return problems[0].status if problems else Exit.OK


def _forget_one(store: Store, key: str, status: str | None, force: bool) -> dict[str, Any]:
    for _ in range(5):  # the record may change between the look and the delete: look again
        try:
            entry = store.get(key)
        except StoreError as exc:  # a record that cannot be read can still be deleted
            if not force or status is not None:
                raise CliError(f"{exc}{_forget_hint(exc, key)}", Exit.STORE_ERROR) from None
            if store.delete(key):
                return {"key": key, "state": "unreadable", "error": str(exc)}
            raise _no_record(store, key) from None
        now = store.time()
        if entry is None:  # absent, or expired: `ls --all` lists those, so tidy them too
            entry = next((e for e in store.scan(key, corrupt=_ignore) if e.key == key), None)
            if entry is None or (status is not None and entry.status != status):
                raise _no_record(store, key)
        if status is not None and entry.status != status:
            raise CliError(
                f"key {key!r} is {entry.status}, not {status}: left alone", Exit.NO_RECORD
            )
        state = _state(entry, now)
        if state == Status.PROCESSING and not force:
            raise CliError(
                f"key {key!r} is running: its owner {entry.owner} started it at"
                f" {_iso(entry.started_at)} and is alive. Forgetting it would let a second call"
                " start while it runs; wait for it, or pass --force",
                Exit.RUNNING,
            )
        if store.delete(key, entry.token):
            return record_json(entry, now)
    raise CliError(f"key {key!r} kept changing while being forgotten: try again", Exit.RUNNING)


def prune(args: argparse.Namespace) -> Exit:
    store = command_store(args)
    removed = store.prune()
    if getattr(args, "json", False):
        _print_json({"removed": removed})
    else:
        print(f"removed {removed} expired record{'' if removed == 1 else 's'} from {store!r}")
    return Exit.OK


#: The ``reason`` words of halted records, as the ``halted`` event and the metrics' ``reason``
#: label name them (``idemfn.events.halted_reason``), in the order ``stats`` shows them.
HALTED_REASONS = ("raised", "unstorable", "interrupted", "abandoned", "incomplete", "other")


def stats(args: argparse.Namespace) -> Exit:
    store = command_store(args)
    now = store.time()
    counts: Counter[str] = Counter()
    halted: Counter[str] = Counter()
    oldest: Entry | None = None
    newest: Entry | None = None
    running: Entry | None = None  # the oldest processing claim, abandoned or not
    for entry in store.scan(corrupt=lambda key, error: counts.update([_unreadable(error)])):
        counts[_state(entry, now)] += 1
        if entry.is_expired(now):
            continue
        if entry.status == Status.HALTED:
            halted[halted_reason(entry.reason, entry.exc_type)] += 1
        elif entry.status == Status.PROCESSING and (
            running is None or entry.started_at < running.started_at
        ):
            running = entry
        if oldest is None or entry.started_at < oldest.started_at:
            oldest = entry
        if newest is None or entry.started_at > newest.started_at:
            newest = entry
    states = ["ok", "halted", "processing", "abandoned", "expired", CORRUPT, TAMPERED]
    size = store.bytes_used()
    summary: dict[str, Any] = {
        "store": repr(store),
        "records": sum(counts[s] for s in states if s != "expired"),
        "by_state": {s: counts[s] for s in states},
        "halted_by_reason": {r: halted[r] for r in HALTED_REASONS},
        "bytes": size,
        "oldest": None
        if oldest is None
        else {"key": oldest.key, "started_at": _iso(oldest.started_at)},
        "newest": None
        if newest is None
        else {"key": newest.key, "started_at": _iso(newest.started_at)},
        "oldest_processing": None if running is None else _processing_json(running, now),
    }
    if getattr(args, "json", False):
        _print_json(summary)
        return Exit.OK
    detail = ", ".join(f"{s} {counts[s]}" for s in states)
    lines = [
        ("store", repr(store)),
        ("records", f"{summary['records']} ({detail})"),
        ("halted", f"{counts['halted']} ({', '.join(f'{r} {halted[r]}' for r in HALTED_REASONS)})"),
        ("size", "unknown" if size is None else _bytes(size)),
    ]
    for name, record in (("oldest", oldest), ("newest", newest)):
        if record is not None:
            ago = _span(now - record.started_at)
            lines.append((name, f"{record.key} (started {_iso(record.started_at)}, {ago} ago)"))
    if running is not None:
        claim = summary["oldest_processing"]
        if claim["abandoned"]:
            state = f"abandoned, {claim['abandoned_reason']}: {claim['owner_gone']}"
        elif running.lease_until is None:
            state = "running"
        else:
            state = f"running, lease ends in {_span(running.lease_until - now)}"
        lines.append(
            (
                "oldest processing",
                f"{running.key} (owner {_owner_short(running.owner)}, attempt {running.attempt},"
                f" started {claim['started_at']}, {_span(now - running.started_at)} ago; {state})",
            )
        )
    width = max(len(name) for name, _ in lines) + 2
    for name, text in lines:
        print(f"{name + ':':<{width}}{text}")
    return Exit.OK


def _processing_json(entry: Entry, now: float) -> dict[str, Any]:
    """What ``stats`` says of a processing claim: whose it is, how old, whether (and how) its
    owner is known to be gone, in the ``abandoned`` event's words."""
    gone = abandoned_reason(entry, now)
    return {
        "key": entry.key,
        "owner": entry.owner,
        "attempt": entry.attempt,
        "started_at": _iso(entry.started_at),
        "age_seconds": round(max(0.0, now - entry.started_at), 3),
        "lease_expires_at": _iso(entry.lease_until),
        "abandoned": gone is not None,
        "abandoned_reason": None if gone is None else abandoned_kind(gone),
        "owner_gone": _why_gone(entry, now),
    }


def _bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover
