"""Hop-by-hop key relay through trusted nodes: the hop message and its one-time cryptography.

A key ``K`` travels from the source site to a destination site along a path of QKD links
(docs/network.md, "Key relay"). On every hop ``X -> Y`` the sender takes fresh key of *that* link
through the link's KME (``enc_keys`` with the reserved :data:`RELAY_SAE` as master and slave, so the
store's reserve/erase machinery guarantees each link key is used once), and sends

* ``K ⊕ pad`` (one-time pad, Shannon 1949: perfectly secret when ``pad`` is uniform and used once), and
* a Poly1305 tag over the whole message under a fresh 32-byte one-time key of the same link
  (Wegman–Carter authentication: Poly1305 is ε-almost-Δ-universal with ε ≤ 8⌈L/16⌉/2^106 for an
  L-byte message, Bernstein, "The Poly1305-AES message-authentication code", FSE 2005, Thm 3.3; used
  once with a uniform key ``(r, s)``, a forgery succeeds with at most that probability).

The receiver fetches the pad and MAC key by their IDs from its end of the link (``dec_keys``, which
erases them there), checks the tag in constant time, and recovers ``K``. On the first hop of a path
``K`` may *be* the pad (``key`` absent): the end-to-end key is then fresh QKD key of the first link and
nothing but key IDs crosses that hop.

This module holds the message format and the pure cryptography; the network side (taking link keys,
sending, routing) is in :mod:`qkdstack.network.site_kme`. Key bytes never appear in reprs, logs or
error messages.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

from qkdstack.errors import AuthenticationError, QKDError

RELAY_SAE = "qkdstack-relay"
"""The reserved SAE ID under which the relay takes link keys at both ends of a link (never a consumer's)."""

MAC_KEY_BITS = 256
"""A one-time Poly1305 key: r (16 bytes, clamped by Poly1305) and s (16 bytes)."""

TAG_BYTES = 16
RELAY_FIELD = "qkdstack_relay"
"""The extension of the hop message that carries what ETSI GS QKD 020's ``ext_keys`` has no field for; it
goes in ``extension_mandatory`` (``[{"qkdstack_relay": {...}}]``), so a KME that does not know it refuses
the message rather than take the ciphertexts for keys."""
VERSION = 1


class RelayError(QKDError):
    """A relay failed; ``status`` is the HTTP status the KME-to-KME answer carries, ``hop`` the failed hop."""

    def __init__(self, status: int, message: str, hop: tuple[str, str] | None = None, code: str = "refused") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.hop = hop
        self.code = code
        """``unreachable`` (the next KME did not answer), ``no_key`` (a link short of key), ``auth`` (a tag
        failed), ``no_path``, ``refused`` (anything else)."""

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message}
        detail: dict[str, Any] = {"reason": self.code}
        if self.hop is not None:
            detail["failed_hop"] = list(self.hop)
        out["details"] = [detail]
        return out

    @classmethod
    def from_answer(cls, status: int, body: dict[str, Any], hop: tuple[str, str]) -> RelayError:
        """The error a downstream KME answered with (its message, and the hop it names if any)."""
        message = str(body.get("message") or f"HTTP {status}")
        details = body.get("details")
        detail = details[0] if isinstance(details, list) and details and isinstance(details[0], dict) else {}
        failed = detail.get("failed_hop")
        if isinstance(failed, list) and len(failed) == 2 and all(isinstance(s, str) for s in failed):
            hop = (failed[0], failed[1])
        code = detail.get("reason") if isinstance(detail.get("reason"), str) else "refused"
        return cls(status, message, hop, code)


class RelayAuthError(RelayError, AuthenticationError):
    """A hop message failed its one-time MAC check: the relay is aborted."""


def xor(a: bytes, b: bytes) -> bytes:
    """``a ⊕ b`` (equal lengths)."""
    if len(a) != len(b):
        raise ValueError("one-time pad and message differ in length")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def relay_part(message: Any) -> dict[str, Any] | None:
    """The ``qkdstack_relay`` object of a hop message (in ``extension_mandatory``), or None."""
    ext = message.get("extension_mandatory") if isinstance(message, dict) else None
    if isinstance(ext, list):
        for item in ext:
            if isinstance(item, dict) and isinstance(item.get(RELAY_FIELD), dict):
                return item[RELAY_FIELD]
    return None


def canonical(message: dict[str, Any]) -> bytes:
    """The bytes the tag covers: the message without its ``tag``, as sorted compact JSON (ASCII).

    Both ends compute this from the parsed JSON object, so white space or key order in transit do not
    matter, while every field value does.
    """
    body = json.loads(json.dumps(message))
    relay = relay_part(body)
    if relay is not None:
        relay.pop("tag", None)
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def tag(mac_key: bytes, data: bytes) -> bytes:
    """The Poly1305 tag of ``data`` under a one-time 32-byte key."""
    if len(mac_key) != MAC_KEY_BITS // 8:
        raise ValueError("a Poly1305 key has 32 bytes")
    return Poly1305.generate_tag(mac_key, data)


def tag_ok(mac_key: bytes, data: bytes, received: bytes) -> bool:
    """Whether ``received`` is the tag of ``data``; constant time (``Poly1305.verify_tag``)."""
    if len(mac_key) != MAC_KEY_BITS // 8 or len(received) != TAG_BYTES:
        return False
    try:
        Poly1305.verify_tag(mac_key, data, received)
    except InvalidSignature:
        return False
    return True


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise RelayError(400, f"malformed relay message: {what} must be base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RelayError(400, f"malformed relay message: {what} is not valid base64") from None


def _uuid(text: Any, what: str) -> str:
    try:
        return str(uuid.UUID(str(text)))
    except ValueError:
        raise RelayError(400, f"malformed relay message: {what} is not a UUID") from None


@dataclass(frozen=True)
class HopMessage:
    """One hop of a relay, as parsed (no key material: ciphertexts only).

    ``key_ids``: the end-to-end key IDs; ``ciphertexts``: ``K ⊕ pad`` per key, or None when the key is
    the pad itself (first hop only); ``pad_ids``: the link-key IDs of the pads on this hop; ``mac_id``:
    the link-key ID of the one-time MAC key; ``path``: the sites from source to destination; ``hop``:
    the index in ``path`` of the sender.
    """

    relay_id: str
    key_ids: tuple[str, ...]
    ciphertexts: tuple[bytes, ...] | None = field(repr=False)
    size: int
    master: str
    slaves: tuple[str, ...]
    path: tuple[str, ...]
    hop: int
    link_id: str
    pad_ids: tuple[str, ...]
    mac_id: str
    received_tag: bytes = field(repr=False)
    signed: bytes = field(repr=False)

    @property
    def sender(self) -> str:
        return self.path[self.hop]

    @property
    def receiver(self) -> str:
        return self.path[self.hop + 1]

    @property
    def last(self) -> bool:
        return self.hop + 2 == len(self.path)

    def open(self, pads: Sequence[bytes], mac_key: bytes) -> list[bytes]:
        """Check the tag (constant time) and return the end-to-end keys. Raises :class:`RelayAuthError`."""
        if not tag_ok(mac_key, self.signed, self.received_tag):
            raise RelayAuthError(
                400, f"relay message failed authentication on hop {self.sender}->{self.receiver} (aborted; "
                "its link keys are spent)", (self.sender, self.receiver), "auth",
            )
        if len(pads) != len(self.key_ids) or any(len(p) * 8 != self.size for p in pads):
            raise RelayError(400, "relay link keys do not match the message", (self.sender, self.receiver))
        if self.ciphertexts is None:
            return list(pads)
        return [xor(c, p) for c, p in zip(self.ciphertexts, pads, strict=True)]


def build_hop_message(
    *,
    relay_id: str,
    key_ids: Sequence[str],
    keys: Sequence[bytes] | None,
    pads: Sequence[bytes],
    pad_ids: Sequence[str],
    mac_key: bytes,
    mac_id: str,
    size: int,
    master: str,
    slaves: Sequence[str],
    path: Sequence[str],
    hop: int,
    link_id: str,
) -> dict[str, Any]:
    """The JSON body of ``POST /kmapi/v1/ext_keys`` for one hop (docs/network.md, "Message formats").

    ``keys`` None: the keys are the pads themselves (allowed on hop 0 only); no key bytes are sent.
    """
    if keys is None and hop != 0:
        raise ValueError("only the first hop may use its pads as the keys")
    if len(pad_ids) != len(key_ids) or len(pads) != len(key_ids) or (keys is not None and len(keys) != len(pads)):
        raise ValueError("one pad per key")
    entries: list[dict[str, Any]] = []
    for i, kid in enumerate(key_ids):
        entry: dict[str, Any] = {"key_ID": kid}
        if keys is not None:
            entry["key"] = _b64(xor(keys[i], pads[i]))
        entries.append(entry)
    message: dict[str, Any] = {
        "keys": entries,
        "initiator_sae_id": master,
        "target_sae_ids": list(slaves),
        "extension_mandatory": [{RELAY_FIELD: {
            "version": VERSION,
            "relay_ID": relay_id,
            "size": size,
            "path": list(path),
            "hop": hop,
            "link_ID": link_id,
            "pad_key_IDs": list(pad_ids),
            "mac_key_ID": mac_id,
        }}],
    }
    relay = relay_part(message)
    assert relay is not None
    relay["tag"] = _b64(tag(mac_key, canonical(message)))
    return message


def parse_hop_message(message: Any, max_keys: int = 1024) -> HopMessage:
    """Validate the shape of a hop message (no cryptography yet). :class:`RelayError` 400 when malformed."""
    r = relay_part(message)
    if r is None:
        raise RelayError(400, f"malformed relay message: no {RELAY_FIELD} object in extension_mandatory")
    others = sorted({str(k) for e in message["extension_mandatory"] if isinstance(e, dict) for k in e} - {RELAY_FIELD})
    if others or len(message["extension_mandatory"]) != 1:
        raise RelayError(400, "not all extension_mandatory parameters are supported",
                         code="unsupported_extension")
    if r.get("version") != VERSION:
        raise RelayError(400, f"unsupported relay message version {r.get('version')!r} (this KME speaks {VERSION})")
    keys = message.get("keys")
    if not isinstance(keys, list) or not 1 <= len(keys) <= max_keys or not all(isinstance(k, dict) for k in keys):
        raise RelayError(400, "malformed relay message: keys must be a non-empty list of objects")
    key_ids = tuple(_uuid(k.get("key_ID"), "key_ID") for k in keys)
    if len(set(key_ids)) != len(key_ids):
        raise RelayError(400, "malformed relay message: repeated key_ID")
    has_ct = ["key" in k for k in keys]
    if any(has_ct) and not all(has_ct):
        raise RelayError(400, "malformed relay message: some keys carry a ciphertext and some do not")
    ciphertexts = tuple(_unb64(k["key"], "key") for k in keys) if all(has_ct) else None
    size = r.get("size")
    path = r.get("path")
    hop = r.get("hop")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 8:
        raise RelayError(400, "malformed relay message: size must be a positive multiple of 8")
    if (
        not isinstance(path, list) or len(path) < 2 or not all(isinstance(p, str) and p for p in path)
        or len(set(path)) != len(path)
    ):
        raise RelayError(400, "malformed relay message: path must list at least two distinct sites")
    if isinstance(hop, bool) or not isinstance(hop, int) or not 0 <= hop < len(path) - 1:
        raise RelayError(400, "malformed relay message: hop is not an index of the path")
    if ciphertexts is None and hop != 0:
        raise RelayError(400, "malformed relay message: only the first hop may omit the ciphertexts")
    if ciphertexts is not None and any(len(c) * 8 != size for c in ciphertexts):
        raise RelayError(400, "malformed relay message: a ciphertext does not have the stated size")
    pad_ids = r.get("pad_key_IDs")
    if not isinstance(pad_ids, list) or len(pad_ids) != len(key_ids):
        raise RelayError(400, "malformed relay message: one pad_key_ID per key is required")
    master = message.get("initiator_sae_id")
    slaves = message.get("target_sae_ids")
    if not isinstance(master, str) or not master:
        raise RelayError(400, "malformed relay message: initiator_sae_id is required")
    if not isinstance(slaves, list) or not slaves or not all(isinstance(s, str) and s for s in slaves):
        raise RelayError(400, "malformed relay message: target_sae_ids must be a non-empty list")
    link_id = r.get("link_ID")
    if not isinstance(link_id, str):
        raise RelayError(400, "malformed relay message: link_ID is required")
    received = _unb64(r.get("tag"), "tag")
    return HopMessage(
        relay_id=_uuid(r.get("relay_ID"), "relay_ID"),
        key_ids=key_ids,
        ciphertexts=ciphertexts,
        size=size,
        master=master,
        slaves=tuple(slaves),
        path=tuple(path),
        hop=hop,
        link_id=link_id,
        pad_ids=tuple(_uuid(p, "pad_key_ID") for p in pad_ids),
        mac_id=_uuid(r.get("mac_key_ID"), "mac_key_ID"),
        received_tag=received,
        signed=canonical(message),
    )
