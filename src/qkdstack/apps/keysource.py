"""The key consumer's view of the key management entity (KME).

A key consumer (a *secure application entity*, SAE, in ETSI GS QKD 014 terms) sees
QKD keys through two calls, mirroring ETSI GS QKD 014 V1.1.1 §5.2–5.5:

* the **master** SAE asks for fresh keys (``enc_keys``): :meth:`KeySource.get_new_keys`;
* the **slave** SAE fetches the same keys by their IDs (``dec_keys``):
  :meth:`KeySource.get_keys_by_id`.

Each key is handed out once at each end. A key ID that is unknown, or that was already
fetched, fails closed with :class:`~qkdstack.errors.KeyStoreError`: the consumer must
abort rather than fall back to weaker keying.

Implementations here:

* :class:`Etsi014Client`: the real thing, HTTPS with mutual TLS to the site's KME
  (the SAE ID is the subject common name of the client certificate).
* :class:`InMemoryKeySource`: a pair of ends sharing one in-process pool; the reference
  semantics and the key source of tests and benchmarks. Keys come from the OS CSPRNG.

A source may expose ``max_key_bits`` and ``max_keys_per_request`` (ETSI 014 Status
fields ``max_key_size`` and ``max_key_per_request``); :func:`source_limits` reads them
with conservative defaults.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import httpx

from qkdstack.errors import AuthenticationError, ChannelError, ConfigError, KeyStoreError

DEFAULT_MAX_KEY_BITS = 8192
DEFAULT_MAX_KEYS_PER_REQUEST = 128


@dataclass(frozen=True, slots=True)
class QKDKey:
    """One QKD key as delivered to a consumer: its ID (a UUID string) and its bytes.

    The repr shows the ID and the length only, never the key bytes.
    """

    key_id: str
    key: bytes = field(repr=False)

    @property
    def size_bits(self) -> int:
        return 8 * len(self.key)

    def __repr__(self) -> str:
        return f"QKDKey(key_id={self.key_id!r}, size_bits={self.size_bits})"


@runtime_checkable
class KeySource(Protocol):
    """Where a key consumer gets QKD keys (master side: new keys; slave side: keys by ID)."""

    async def get_new_keys(self, number: int, size_bits: int) -> list[QKDKey]:
        """``number`` fresh keys of ``size_bits`` each (ETSI 014 ``enc_keys``); all or none."""
        ...

    async def get_keys_by_id(self, key_ids: Sequence[str]) -> list[QKDKey]:
        """The keys with these IDs, in order (ETSI 014 ``dec_keys``); all or none."""
        ...


def source_limits(source: object) -> tuple[int, int]:
    """(max key size in bits, max keys per request) that ``source`` accepts."""
    return (
        int(getattr(source, "max_key_bits", DEFAULT_MAX_KEY_BITS)),
        int(getattr(source, "max_keys_per_request", DEFAULT_MAX_KEYS_PER_REQUEST)),
    )


def check_request(number: int, size_bits: int, max_key_bits: int, max_keys: int) -> None:
    """Validate an enc_keys request the way an ETSI 014 KME does (ConfigError naming the field)."""
    if not isinstance(number, int) or number < 1:
        raise ConfigError(f"number must be a positive integer, got {number!r}")
    if number > max_keys:
        raise ConfigError(f"number must be at most {max_keys} keys per request, got {number}")
    if not isinstance(size_bits, int) or size_bits <= 0 or size_bits % 8:
        raise ConfigError(f"size must be a positive multiple of 8 bits, got {size_bits!r}")
    if size_bits > max_key_bits:
        raise ConfigError(f"size must be at most {max_key_bits} bits, got {size_bits}")


def plan_request(nbytes: int, max_key_bits: int, max_keys: int) -> tuple[int, int]:
    """(number, size_bits) of one enc_keys request that covers ``nbytes`` with least waste.

    Keys are as long as allowed; the request is split evenly so at most ``number - 1``
    bytes are left over. Raises KeyStoreError if one request cannot cover ``nbytes``
    (callers need all-or-nothing semantics, which only a single request gives).
    """
    if nbytes <= 0:
        raise ConfigError(f"key material length must be positive, got {nbytes}")
    max_key_bytes = max_key_bits // 8
    number = -(-nbytes // max_key_bytes)
    if number > max_keys:
        raise KeyStoreError(
            f"{nbytes} bytes of key exceed one request ({max_keys} keys of {max_key_bits} bits); refusing"
        )
    size_bytes = -(-nbytes // number)
    return number, 8 * size_bytes


# --------------------------------------------------------------------------------------
# In-memory reference implementation
# --------------------------------------------------------------------------------------


class _SharedPool:
    """The state two in-memory ends share: remaining capacity and keys awaiting the slave."""

    def __init__(self, capacity_bits: int | None) -> None:
        self.remaining_bits = capacity_bits
        self.awaiting_slave: dict[str, bytes] = {}
        self.delivered_master_bits = 0
        self.delivered_slave_bits = 0
        self.issued_ids: set[str] = set()


class InMemoryKeySource:
    """One end of an in-process key source pair (see :meth:`pair`).

    Reference semantics of a KME for tests and benchmarks: the master end draws fresh keys
    from the OS CSPRNG while the pool's capacity lasts (all or none per request) and
    reserves them for the slave; the slave end gets each key once by ID, after which the
    key is erased. Unknown and already-fetched IDs raise KeyStoreError; a request the
    capacity cannot cover raises KeyStoreError and consumes nothing.
    """

    def __init__(
        self,
        pool: _SharedPool,
        role: str,
        max_key_bits: int = 65536,
        max_keys_per_request: int = DEFAULT_MAX_KEYS_PER_REQUEST,
    ) -> None:
        self._pool = pool
        self.role = role
        self.max_key_bits = max_key_bits
        self.max_keys_per_request = max_keys_per_request
        self.requests = 0

    @classmethod
    def pair(
        cls,
        capacity_bits: int | None = None,
        max_key_bits: int = 65536,
        max_keys_per_request: int = DEFAULT_MAX_KEYS_PER_REQUEST,
    ) -> tuple[InMemoryKeySource, InMemoryKeySource]:
        """(master end, slave end) sharing one pool of at most ``capacity_bits`` (None: unlimited)."""
        pool = _SharedPool(capacity_bits)
        return (
            cls(pool, "master", max_key_bits, max_keys_per_request),
            cls(pool, "slave", max_key_bits, max_keys_per_request),
        )

    @property
    def remaining_bits(self) -> int | None:
        """Key bits the pool can still issue (None: unlimited)."""
        return self._pool.remaining_bits

    @property
    def delivered_bits(self) -> int:
        """Key bits handed out at this end so far."""
        return self._pool.delivered_master_bits if self.role == "master" else self._pool.delivered_slave_bits

    @property
    def awaiting_slave(self) -> int:
        """Keys issued to the master that the slave has not fetched yet."""
        return len(self._pool.awaiting_slave)

    async def get_new_keys(self, number: int, size_bits: int) -> list[QKDKey]:
        if self.role != "master":
            raise KeyStoreError("only the master end may request new keys")
        check_request(number, size_bits, self.max_key_bits, self.max_keys_per_request)
        self.requests += 1
        total = number * size_bits
        pool = self._pool
        if pool.remaining_bits is not None and total > pool.remaining_bits:
            raise KeyStoreError(f"not enough key: {total} bits requested, {pool.remaining_bits} bits available")
        keys = []
        for _ in range(number):
            key_id = str(uuid.UUID(bytes=secrets.token_bytes(16), version=4))
            keys.append(QKDKey(key_id, secrets.token_bytes(size_bits // 8)))
        if pool.remaining_bits is not None:
            pool.remaining_bits -= total
        for k in keys:
            pool.awaiting_slave[k.key_id] = k.key
            pool.issued_ids.add(k.key_id)
        pool.delivered_master_bits += total
        return keys

    async def get_keys_by_id(self, key_ids: Sequence[str]) -> list[QKDKey]:
        if self.role != "slave":
            raise KeyStoreError("only the slave end may fetch keys by ID")
        self.requests += 1
        ids = list(key_ids)
        if not ids:
            raise ConfigError("key_IDs must name at least one key")
        if len(set(ids)) != len(ids):
            raise KeyStoreError("the same key ID was requested twice")
        pool = self._pool
        for key_id in ids:
            if key_id not in pool.awaiting_slave:
                state = "already delivered" if key_id in pool.issued_ids else "not found"
                raise KeyStoreError(f"key {key_id} is {state}")
        keys = [QKDKey(key_id, pool.awaiting_slave.pop(key_id)) for key_id in ids]
        pool.delivered_slave_bits += sum(k.size_bits for k in keys)
        return keys


# --------------------------------------------------------------------------------------
# ETSI GS QKD 014 client
# --------------------------------------------------------------------------------------


def _tls_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"ca: cannot load the CA certificate file {ca!r} ({exc})") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cert/key: cannot load the client certificate {cert!r} with key {key!r} ({exc})") from None
    return ctx


class Etsi014Client:
    """ETSI GS QKD 014 V1.1.1 client over HTTPS with mutual TLS.

    ``base_url`` is the KME's address (``https://host:port``; the ``/api/v1/keys`` prefix
    is added). ``peer_sae_id`` is the *other* SAE: the slave SAE ID when this consumer is
    the master (``enc_keys``), the master SAE ID when it is the slave (``dec_keys``). This
    consumer's own SAE ID is the common name of its client certificate ``cert``.

    HTTP errors become qkdstack errors carrying the KME's ``message``: 401 ->
    AuthenticationError; 400 and 503 (and any other non-200) -> KeyStoreError; a KME
    that cannot be reached -> ChannelError. ``max_key_bits`` and
    ``max_keys_per_request`` come from the KME's Status on first use (:meth:`status`).
    A 503 (the KME cannot serve *now*: no key yet, the peer KME not connected yet, a block still on
    its way into the peer's store) is retried with back-off for up to ``busy_retry_s`` seconds
    before it becomes a KeyStoreError.
    """

    def __init__(
        self,
        base_url: str,
        peer_sae_id: str,
        cert: str,
        key: str,
        ca: str,
        timeout_s: float = 10.0,
        busy_retry_s: float = 5.0,
    ) -> None:
        if not base_url.startswith("https://"):
            raise ConfigError(f"kme-url must be an https:// URL, got {base_url!r}")
        if not peer_sae_id or "/" in peer_sae_id:
            raise ConfigError(f"peer-sae must be a non-empty SAE ID without '/', got {peer_sae_id!r}")
        self.base_url = base_url.rstrip("/")
        self.peer_sae_id = peer_sae_id
        self._client = httpx.AsyncClient(
            base_url=f"{self.base_url}/api/v1/keys/", verify=_tls_context(cert, key, ca), timeout=timeout_s
        )
        self.busy_retry_s = busy_retry_s
        self.max_key_bits = DEFAULT_MAX_KEY_BITS
        self.max_keys_per_request = DEFAULT_MAX_KEYS_PER_REQUEST
        self._status_read = False

    async def __aenter__(self) -> Etsi014Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"{self.peer_sae_id}/{path}"
        deadline = time.monotonic() + self.busy_retry_s
        delay = 0.05
        while True:
            try:
                resp = await self._client.request(method, url, json=body)
            except httpx.TransportError as exc:
                raise ChannelError(f"cannot reach the KME at {self.base_url}: {type(exc).__name__}: {exc}") from None
            if resp.status_code != 503 or time.monotonic() + delay > deadline:
                break
            await asyncio.sleep(delay)
            delay = min(2 * delay, 1.0)
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code == 200 and isinstance(data, dict):
            return data
        message = data.get("message") if isinstance(data, dict) else None
        message = str(message) if message else f"HTTP {resp.status_code}"
        text = f"KME refused {path} for SAE {self.peer_sae_id!r}: {message} (HTTP {resp.status_code})"
        if resp.status_code == 401:
            raise AuthenticationError(text)
        raise KeyStoreError(text)

    async def status(self) -> dict[str, Any]:
        """The KME's Status object for the link to ``peer_sae_id``; updates the request limits."""
        data = await self._request("GET", "status")
        if isinstance(data.get("max_key_size"), int):
            self.max_key_bits = data["max_key_size"]
        if isinstance(data.get("max_key_per_request"), int):
            self.max_keys_per_request = data["max_key_per_request"]
        self._status_read = True
        return data

    async def ensure_limits(self) -> None:
        """Read the KME's Status once so :func:`source_limits` reports its real limits."""
        if not self._status_read:
            await self.status()

    @staticmethod
    def _parse_container(data: dict[str, Any], expect: int) -> list[QKDKey]:
        keys = data.get("keys")
        if not isinstance(keys, list) or len(keys) != expect:
            raise KeyStoreError(f"KME answered with a malformed key container (expected {expect} keys)")
        out = []
        for item in keys:
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("key_ID"), str)
                or not isinstance(item.get("key"), str)
            ):
                raise KeyStoreError("KME answered with a malformed key in its key container")
            try:
                raw = base64.b64decode(item["key"], validate=True)
            except (binascii.Error, ValueError):
                raise KeyStoreError(f"KME sent key {item['key_ID']} that is not valid base64") from None
            out.append(QKDKey(item["key_ID"], raw))
        return out

    async def get_new_keys(self, number: int, size_bits: int) -> list[QKDKey]:
        check_request(number, size_bits, self.max_key_bits, self.max_keys_per_request)
        data = await self._request("POST", "enc_keys", {"number": number, "size": size_bits})
        keys = self._parse_container(data, number)
        if any(k.size_bits != size_bits for k in keys):
            raise KeyStoreError(f"KME sent keys of the wrong size (asked for {size_bits} bits)")
        return keys

    async def get_keys_by_id(self, key_ids: Sequence[str]) -> list[QKDKey]:
        ids = list(key_ids)
        if not ids:
            raise ConfigError("key_IDs must name at least one key")
        data = await self._request("POST", "dec_keys", {"key_IDs": [{"key_ID": k} for k in ids]})
        keys = self._parse_container(data, len(ids))
        by_id = {k.key_id: k for k in keys}
        if set(by_id) != set(ids):
            raise KeyStoreError("KME answered with keys other than those requested")
        return [by_id[k] for k in ids]
