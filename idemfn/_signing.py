"""Signed records: an HMAC-SHA256 over a record's bytes, checked before anything is unpickled.

A signed record is ``MAGIC + mac + record``. ``MAGIC`` starts with a byte no marshal dump starts
with, so signed and unsigned records tell themselves apart. The first key signs and every key
verifies, which is how keys rotate: add the new key first, and drop the old one once every
record it signed has expired.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence

__all__ = ["ENV_VAR", "MAGIC", "MIN_KEY_BYTES", "Signer", "SigningKey", "signer_for", "unsigned"]

#: Signing keys, comma-separated; the first signs, all verify.
ENV_VAR = "IDEMFN_SIGNING_KEY"

MAGIC = b"\xff\x01"  # 0xff is no marshal type code; 0x01: HMAC-SHA256, version 1
_MAC_BYTES = 32
_HEADER = len(MAGIC) + _MAC_BYTES
MIN_KEY_BYTES = 16

SigningKey = str | bytes | Sequence[str | bytes]


class Signer:
    """Signs with the first of ``keys`` and verifies with any of them."""

    __slots__ = ("_keys",)

    def __init__(self, keys: tuple[bytes, ...]) -> None:
        self._keys = keys

    def __repr__(self) -> str:  # never the keys themselves
        return f"<Signer of {len(self._keys)} key{'s' if len(self._keys) > 1 else ''}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Signer) and other._keys == self._keys

    def __hash__(self) -> int:
        return hash(self._keys)

    def sign(self, data: bytes) -> bytes:
        return MAGIC + hmac.digest(self._keys[0], data, hashlib.sha256) + data

    def verify(self, data: bytes) -> bytes:
        """The record inside ``data``; ``ValueError`` saying why when its signature fails."""
        if not data.startswith(MAGIC):
            raise ValueError("it is not signed")
        mac, record = data[len(MAGIC) : _HEADER], data[_HEADER:]
        for key in self._keys:
            if hmac.compare_digest(hmac.digest(key, record, hashlib.sha256), mac):
                return record
        keys = "the signing key" if len(self._keys) == 1 else f"any of the {len(self._keys)} keys"
        raise ValueError(f"its signature does not match {keys}")


def unsigned(data: bytes) -> bytes:
    """The record inside ``data``, for a store without keys (it verifies nothing)."""
    return data[_HEADER:] if data.startswith(MAGIC) else data


def signer_for(signing_key: SigningKey | None, *, option: str) -> Signer | None:
    """The signer of ``signing_key=``, or of ``IDEMFN_SIGNING_KEY`` when it is None; None when
    neither is set. Errors name ``option`` (or the environment variable)."""
    if signing_key is None:
        configured = os.environ.get(ENV_VAR, "")
        if not configured.strip():
            return None
        entries = [k.strip() for k in configured.split(",")]
        if "" in entries:
            raise ValueError(f"{ENV_VAR} has an empty entry (a stray comma?)")
        return Signer(_keys(entries, ENV_VAR))
    if isinstance(signing_key, (str, bytes)):
        return Signer(_keys([signing_key], option))
    if not isinstance(signing_key, Sequence):
        raise TypeError(
            f"{option} must be a str, bytes, or a list of them (the first signs), not"
            f" {type(signing_key).__name__}"
        )
    return Signer(_keys(list(signing_key), option))  # type: ignore[arg-type]  # not bytes


def _keys(given: Sequence[str | bytes], option: str) -> tuple[bytes, ...]:
    if not given:
        raise ValueError(f"{option} must name at least one key")
    keys = []
    for number, key in enumerate(given, 1):
        which = f"{option}: key {number}" if len(given) > 1 else option
        if isinstance(key, str):
            # Stripped, as the environment's and a key file's are: a key read from a file
            # with its newline is the same key.
            key = key.strip().encode("utf-8")
        elif not isinstance(key, bytes):
            raise TypeError(f"{which} must be a str or bytes, not {type(key).__name__}")
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(
                f"{which} is {len(key)} bytes long; a signing key needs at least"
                f" {MIN_KEY_BYTES} (make one with: python -c 'import secrets;"
                " print(secrets.token_hex(32))')"
            )
        keys.append(key)
    return tuple(keys)
