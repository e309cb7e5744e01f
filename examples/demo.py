"""idemfn demo: run this script twice. The first run charges; the second replays.

    python examples/demo.py     # "charging order-1001 ..." then "replayed: ..."
    python examples/demo.py     # both calls replay: the record lives in the default store

Records live in the default DiskStore (your state directory, or IDEMFN_STORE), shared by every
process on this machine, for a day (ttl). `python examples/demo.py --forget` clears them.
"""

from __future__ import annotations

import sys
import time

from idemfn import AlreadyRunning, FingerprintMismatch, idempotent

ran = []


@idempotent(key="charge:{order_id}", name="idemfn.demo.charge")
def charge(order_id: str, amount_cents: int) -> dict[str, object]:
    ran.append(order_id)
    print(f"  charging {order_id}: {amount_cents} cents (the body runs: money moves)")
    return {"order": order_id, "charged": amount_cents, "at": time.strftime("%H:%M:%S")}


@idempotent(key="refund:{order_id}", name="idemfn.demo.refund")
def refund(order_id: str) -> None:
    print(f"  refunding {order_id} fails (the body runs)")
    raise RuntimeError(f"the payment provider refused the refund of {order_id}")


def main() -> int:
    if "--forget" in sys.argv:
        removed = charge.forget("order-1001", 2500) + refund.forget("order-1001")
        print(f"forgot {removed} record(s)")
        return 0
    print(f"store: {charge.store!r}")
    for attempt in (1, 2):
        before = len(ran)
        receipt = charge("order-1001", 2500)
        how = "ran the body" if len(ran) > before else "replayed, body not run"
        print(f"call {attempt}: {receipt} ({how})")
    record = charge.status("order-1001", 2500)
    assert record is not None
    print(
        f"record: status={record.status.value} attempt={record.attempt}"
        f" finished_at={record.finished_at:%Y-%m-%d %H:%M:%S}Z"
        f" expires_at={record.expires_at:%Y-%m-%d %H:%M:%S}Z"
    )
    try:
        charge("order-1001", 9999)
    except FingerprintMismatch as exc:
        stored, given = exc.stored[:12], exc.given[:12]
        print(f"same key, other amount: FingerprintMismatch ({stored}… != {given}…)")
    for attempt in (1, 2):
        try:
            refund("order-1001")
        except RuntimeError as exc:
            notes = " | ".join(getattr(exc, "__notes__", [])) or "raised by the body itself"
            print(f"refund call {attempt}: RuntimeError: {exc} [{notes}]")
        except AlreadyRunning as exc:  # pragma: no cover - another demo runs right now
            print(f"refund call {attempt}: {exc}")
    print("run this script again: every call replays from the store.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
