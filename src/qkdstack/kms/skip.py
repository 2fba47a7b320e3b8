"""SKIP key provider: the Secure Key Integration Protocol (IETF draft-cisco-skip) on top of the KME.

Routers and other *encryptors* ask their co-located Key Provider (KP) for keys over HTTPS with four
GET methods (draft-cisco-skip-00/-02, section 4, Table 2; the API text is the same in both):

* ``GET /capabilities`` -> ``{"entropy", "key", "algorithm", "localSystemID", "remoteSystemID"}``
* ``GET /key?remoteSystemID=B[&size=N]`` -> ``{"keyId", "key"}``: a new key shared with system ``B``
* ``GET /key/{keyId}?remoteSystemID=A`` -> ``{"keyId", "key"}``: the key system ``A`` took, by its ID
* ``GET /entropy[?minentropy=N]`` -> ``{"randomStr", "minentropy"}``: random bytes (OS CSPRNG)

Units and encodings follow the draft: ``size`` and ``minentropy`` are **bits** (default 256, a
multiple of 8 here), ``key``, ``keyId`` and ``randomStr`` are hexadecimal; ``keyId`` is the KME's key
ID (a UUID, i.e. 128 bits, the draft's default keyId length) written as 32 hex digits.

**A SKIP system ID is the SAE ID** of the caller: the subject CN of its TLS client certificate (the
certificates ``qkdstack init`` issues under ``DIR/SITE/sae/``) or its TLS-PSK identity (``[kms]
skip_psk_file``). ``localSystemID`` is the caller's own SAE ID, ``remoteSystemID`` lists the SAEs at the
peer site. SKIP uses the same :class:`~qkdstack.kms.kme.KME` calls as ETSI GS QKD 014: ``GET /key`` is
``enc_keys`` (the caller is the master SAE, ``remoteSystemID`` the slave), ``GET /key/{keyId}`` is
``dec_keys`` (the caller is the slave, ``remoteSystemID`` the master). So keys, store, one-time
delivery and key-ID agreement are ETSI 014's: a key taken with SKIP at site A is fetched once, by
SKIP (``keyId``) or by ETSI 014 ``dec_keys`` (the same ID as a UUID), at site B, and never again.

Status codes (draft Tables 3, 7 and 9): 200; 404 unknown path; 405 a method other than GET (with
``Allow: GET``); 400 a malformed request (missing or repeated parameter, ``size``/``minentropy`` not a
positive multiple of 8 or out of range, unknown ``remoteSystemID``) and, for ``/key/{keyId}``, a
malformed keyId or a key that is not found (also when it exists but was not taken by
``remoteSystemID`` for this caller: the draft has no 401/403 here, and the caller learns nothing
more); 500 an internal error reading or erasing the key. Two codes the draft does not list: 401
when the authenticated caller is not a registered SAE of this KME (no identity to serve), and 503
when no key can be delivered now (store exhausted, peer KME not connected, delivery stopped after a
rollback): retry later, as with ETSI 014. Every error has a JSON body ``{"message": ...}`` (and
``"details"`` where the KME gave some); no key bytes ever appear in errors or logs.

Proof with every key: ``qkdstack_proof=true`` in the query of ``/key`` or ``/key/{keyId}`` adds
``"key_extension": {"qkdstack_proof": [...]}`` (one entry per key block the key was cut from; see
docs/kms.md, "A proof with every key").

TLS (draft section 3, Table 1): TLS 1.2 or 1.3. Certificates: the site CA's SAE client certificates,
verified as for ETSI 014 (another CA, an expired or revoked certificate fail the handshake).
Pre-shared keys (``[kms] skip_psk_file``; identities are SAE IDs): TLS 1.2 PSK cipher suites, the
draft's ``TLS_DHE_PSK_WITH_AES_256_CBC_SHA384`` / ``..._CBC_SHA`` first (the RFC 7919 ffdhe2048 group),
then ECDHE-PSK and plain PSK suites. A TLS 1.3 external PSK is not accepted (see :func:`_peer_identity`:
the identity a TLS 1.3 handshake used cannot be learnt safely through Python's ssl); such a client gets 401
unless it also shows a certificate. Python 3.11's :mod:`ssl` has no PSK callbacks, so
PSK uses the ``sslpsk3`` package (OpenSSL's ``SSL_set_psk_server_callback``); it is imported only when
a PSK file is configured.

The server is a small threaded HTTP/1.1 server (one request per connection, ``Connection: close``):
each connection's TLS handshake runs in its own thread with a blocking socket, which is how
``sslpsk3`` installs its callbacks (asyncio's non-blocking handshake would restart its state), and
each request calls the KME in the node's event loop (:func:`asyncio.run_coroutine_threadsafe`).
At most :data:`MAX_CONNECTIONS` connections are served at once; more are closed at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import logging
import secrets
import socket
import ssl
import stat
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkdstack.errors import ConfigError
from qkdstack.kms.etsi014 import TLSFiles, _load_crls
from qkdstack.kms.kme import KME, KMEError

log = logging.getLogger(__name__)

ALGORITHM = "QKD"
"""The ``algorithm`` of ``/capabilities``: keys come from quantum key distribution (at most 16 bytes)."""
DEFAULT_ENTROPY_BITS = 256
MAX_ENTROPY_BITS = 65536
PROOF_FLAG = "qkdstack_proof"
"""Query parameter (``true``/``false``) asking for the proof of each key (docs/kms.md)."""
MAX_CONNECTIONS = 64
HANDSHAKE_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 10.0
KME_TIMEOUT_S = 30.0
MIN_PSK_BYTES = 16
MAX_PSK_BYTES = 256

# RFC 7919 ffdhe2048 (the group for the draft's TLS_DHE_PSK suites; Python's ssl has no automatic DH group).
_FFDHE2048_PEM = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

# Draft Table 1 first (server preference), then forward-secret suites, plain PSK last.
_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-PSK-AES256-CBC-SHA384", "DHE-PSK-AES256-CBC-SHA", "DHE-PSK-AES256-GCM-SHA384",
    "ECDHE-PSK-AES256-CBC-SHA384", "ECDHE-PSK-CHACHA20-POLY1305", "PSK-AES256-GCM-SHA384",
    "PSK-AES256-CBC-SHA384",
])


# --------------------------------------------------------------------------------------------
# PSK identities


def format_psk_line(identity: str, psk: bytes) -> str:
    """One ``IDENTITY:HEXKEY`` line (the format of stunnel's PSKsecrets and of ``openssl s_client -psk``)."""
    return f"{identity}:{psk.hex()}\n"


def load_psk_file(path: str | Path, where: str = "[kms] skip_psk_file") -> dict[str, bytes]:
    """Read ``IDENTITY:HEXKEY`` lines (``#`` comments, blank lines allowed); the file must be 0600 or stricter."""
    p = Path(path)
    try:
        st = p.stat()
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} ({p}) cannot be read: {getattr(exc, 'strerror', None) or 'not UTF-8 text'}") \
            from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{where} ({p}) is readable by others (mode {stat.S_IMODE(st.st_mode):o}); make it 0600")
    out: dict[str, bytes] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        identity, sep, hexkey = line.rpartition(":")
        try:
            key = bytes.fromhex(hexkey) if sep and identity else b""
        except ValueError:
            key = b""
        if not MIN_PSK_BYTES <= len(key) <= MAX_PSK_BYTES or len(identity.encode()) > 128:
            raise ConfigError(f"{where} ({p}) line {n} must be IDENTITY:HEXKEY with a key of {MIN_PSK_BYTES} to "
                              f"{MAX_PSK_BYTES} bytes and an identity of at most 128 bytes")
        if identity in out:
            raise ConfigError(f"{where} ({p}) names identity {identity!r} twice (line {n})")
        out[identity] = key
    if not out:
        raise ConfigError(f"{where} ({p}) holds no IDENTITY:HEXKEY line")
    return out


# --------------------------------------------------------------------------------------------
# TLS


class _Handshake(threading.local):
    psk_identity: str | None = None


def skip_ssl_context(tls: TLSFiles, psks: dict[str, bytes] | None = None) -> tuple[ssl.SSLContext, _Handshake]:
    """The server context: SAE client certificates of the site CA, and TLS-PSK when ``psks`` is given.

    Returns the context and the per-thread record of the PSK identity the handshake used.
    """
    for name in ("cert", "key", "ca"):
        if not Path(getattr(tls, name)).is_file():
            raise ConfigError(f"TLS file {name} ({getattr(tls, name)}) does not exist")
    state = _Handshake()
    if psks:
        try:
            from sslpsk3 import SSLPSKContext
        except ImportError:
            raise ConfigError("[kms] skip_psk_file needs the Python package sslpsk3 (pip install sslpsk3)") from None
        ctx: ssl.SSLContext = SSLPSKContext(ssl.PROTOCOL_TLS_SERVER)
        table = dict(psks)

        def server_callback(identity: str | None) -> bytes:
            key = table.get(identity or "")
            state.psk_identity = identity if key else None
            return key or b""  # empty: OpenSSL refuses the handshake (unknown identity)

        ctx.set_psk_server_callback(server_callback)  # type: ignore[attr-defined]
        with tempfile.NamedTemporaryFile(suffix=".pem") as fh:
            fh.write(_FFDHE2048_PEM)
            fh.flush()
            ctx.load_dh_params(fh.name)
        # A PSK client sends no certificate: ask for one, verify it when sent (another CA fails the
        # handshake), and refuse requests that end up with neither (401).
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_CIPHERS)
    # TLS 1.3: one session ticket after the handshake. Besides allowing resumption (the certificate of a
    # resumed session is the one verified when it was made), it carries the server's ACK of the client's
    # last handshake flight: with none, a client that writes its request separately (Nagle) waits for the
    # delayed ACK, about 40 ms per request.
    ctx.num_tickets = 1
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # a connection's identity is the one of its (only) handshake
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.load_verify_locations(str(tls.ca))
    if tls.crl:
        crl_pem = _load_crls(tls.crl, tls.ca)
        with tempfile.NamedTemporaryFile(suffix=".pem") as fh:
            fh.write(crl_pem)
            fh.flush()
            ctx.load_verify_locations(fh.name)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx, state


def _peer_identity(sock: ssl.SSLSocket, state: _Handshake) -> str | None:
    """The SAE ID of the connection: the client certificate's CN, else the PSK identity the handshake used."""
    der = sock.getpeercert(binary_form=True)
    if der:
        from qkdstack.kms.etsi014 import _cn_of_der

        try:
            return _cn_of_der(der)[0] or None
        except ValueError:
            return None
    # Only a TLS 1.2 PSK suite proves the identity: its Finished messages are keyed by the PSK of the identity
    # in this handshake's ClientKeyExchange (a resumed TLS 1.2 session has none, so no identity). In TLS 1.3
    # OpenSSL calls the callback for every offered identity it looks at, and may then skip it and resume a
    # ticket instead; Python's ssl cannot tell which PSK was used, so a TLS 1.3 PSK handshake gets no identity.
    identity = state.psk_identity
    cipher = (sock.cipher() or ("",))[0]
    if identity and "PSK" in cipher and sock.version() != "TLSv1.3":
        return identity
    return None


# --------------------------------------------------------------------------------------------
# HTTP


class SkipError(Exception):
    """A refused request: HTTP status and the JSON error body."""

    def __init__(self, status: int, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"message": message}
        if details:
            self.body["details"] = details


def _single(query: dict[str, list[str]], name: str, *, required: bool) -> str | None:
    values = query.get(name, [])
    if len(values) > 1:
        raise SkipError(400, f"parameter {name} is given more than once")
    if not values:
        if required:
            raise SkipError(400, f"parameter {name} is required")
        return None
    return values[0]


def _bits(value: str | None, name: str, default: int) -> int:
    if value is None:
        return default
    if not value.isascii() or not value.isdigit() or len(value) > 9:
        raise SkipError(400, f"{name} must be a number of bits (a positive multiple of 8)")
    bits = int(value)
    if bits <= 0 or bits % 8:
        raise SkipError(400, f"{name} must be a positive multiple of 8 bits, got {bits}")
    return bits


def _flag(query: dict[str, list[str]]) -> bool:
    value = _single(query, PROOF_FLAG, required=False)
    if value is None or value.lower() in ("false", "0", "no"):
        return False
    if value.lower() in ("true", "1", "yes", ""):
        return True
    raise SkipError(400, f"{PROOF_FLAG} must be true or false")


def _skip_key(entry: dict[str, Any], key_id: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "keyId": key_id or uuid.UUID(entry["key_ID"]).hex,
        "key": base64.b64decode(entry["key"]).hex(),
    }
    if entry.get("key_extension"):
        out["key_extension"] = entry["key_extension"]
    return out


class SkipService:
    """The SKIP methods over one KME (transport-free: :class:`_Handler` calls :meth:`answer`)."""

    def __init__(self, kme: KME, loop: asyncio.AbstractEventLoop) -> None:
        self.kme = kme
        self.loop = loop

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(KME_TIMEOUT_S)

    def answer(self, sae_id: str | None, path: str, query: dict[str, list[str]]) -> dict[str, Any]:
        """The JSON answer to ``GET path?query`` by ``sae_id``; raises :class:`SkipError`."""
        if path not in ("/capabilities", "/key", "/entropy") and not path.startswith("/key/"):
            raise SkipError(404, "no such path (SKIP has /capabilities, /key, /key/{keyId} and /entropy)")
        if not sae_id or sae_id not in self.kme.config.sae_ids:
            raise SkipError(401, "a client certificate or PSK identity of a registered SAE is required")
        try:
            if path == "/capabilities":
                return self.capabilities(sae_id)
            if path == "/entropy":
                return self.entropy(_single(query, "minentropy", required=False))
            if path == "/key":
                remote = _single(query, "remoteSystemID", required=True)
                size = _bits(_single(query, "size", required=False), "size", self.kme.config.key_size)
                return self.new_key(sae_id, remote or "", size, _flag(query))
            key_id = path[len("/key/"):]
            remote = _single(query, "remoteSystemID", required=True)
            return self.key_by_id(sae_id, remote or "", urllib.parse.unquote(key_id), _flag(query))
        except KMEError as exc:
            raise SkipError(exc.status, exc.message, exc.details) from None

    def capabilities(self, sae_id: str) -> dict[str, Any]:
        remotes = sorted(self.kme.remote_sae_ids)
        if not remotes:  # the draft requires at least one remoteSystemID
            reason = self._run(self.kme.peer_down_error()).message
            raise SkipError(503, f"no remote system is known yet: {reason}")
        return {"entropy": True, "key": True, "algorithm": ALGORITHM, "localSystemID": sae_id,
                "remoteSystemID": remotes}

    @staticmethod
    def entropy(minentropy: str | None) -> dict[str, Any]:
        bits = _bits(minentropy, "minentropy", DEFAULT_ENTROPY_BITS)
        if bits > MAX_ENTROPY_BITS:
            raise SkipError(400, f"minentropy must be at most {MAX_ENTROPY_BITS} bits")
        try:
            data = secrets.token_bytes(bits // 8)
        except OSError:
            raise SkipError(503, "the operating system's random number generator is not available") from None
        return {"randomStr": data.hex().upper(), "minentropy": bits}

    def new_key(self, sae_id: str, remote: str, size: int, proof: bool) -> dict[str, Any]:
        if remote == sae_id or remote not in self.kme.remote_sae_ids:
            if not self.kme.remote_sae_ids:
                raise SkipError(503, self._run(self.kme.peer_down_error()).message)
            raise SkipError(400, "remoteSystemID is not a system at the peer site", [{"remoteSystemID": remote}])
        ext = [{PROOF_FLAG: True}] if proof else None
        answer = self._run(self.kme.enc_keys(sae_id, remote, 1, size, extension_optional=ext))
        return _skip_key(answer["keys"][0])

    def key_by_id(self, sae_id: str, remote: str, key_id: str, proof: bool) -> dict[str, Any]:
        try:
            if len(key_id) not in (32, 36):
                raise ValueError
            uid = str(uuid.UUID(key_id))
        except ValueError:
            raise SkipError(400, "malformed keyId (32 hexadecimal digits expected)") from None
        try:
            ext = [{PROOF_FLAG: True}] if proof else None
            answer = self._run(self.kme.dec_keys(sae_id, remote, [uid], extension_optional=ext))
        except KMEError as exc:
            if exc.status in (400, 401):  # not found, or not taken by remoteSystemID for this caller
                raise SkipError(400, "key not found", [{"keyId": key_id, "remoteSystemID": remote}]) from None
            raise
        return _skip_key(answer["keys"][0], key_id)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "qkdstack-SKIP"
    timeout = REQUEST_TIMEOUT_S
    server: _SkipServer

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("SKIP %s: " + format, self.client_address[0], *args)

    def _reply(self, status: int, body: dict[str, Any], headers: tuple[tuple[str, str], ...] = ()) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        for name, value in headers:
            self.send_header(name, value)
        # Head and body in one write (one TLS record): a second small write would wait for the client's
        # delayed ACK (Nagle), about 40 ms per request.
        self._headers_buffer.append(b"\r\n" + data)
        self.flush_headers()
        self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's parser errors (400, 414, 431, 501, 505) as JSON."""
        if code == 501:  # an unsupported method: SKIP says 405
            self._reply(405, {"message": "only GET is supported"}, (("Allow", "GET"),))
            return
        self._reply(code, {"message": message or self.responses.get(code, ("error",))[0]})

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(8193)
            if not self.raw_requestline:
                self.close_connection = True
                return
            if len(self.raw_requestline) > 8192:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414, "request line too long")
                return
            if not self.parse_request():
                return
            if self.command != "GET":
                self._reply(405, {"message": "only GET is supported"}, (("Allow", "GET"),))
                return
            parts = urllib.parse.urlsplit(self.path)
            start = time.perf_counter()
            try:
                query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False,
                                              max_num_fields=16)
                body = self.server.service.answer(self.server.identity_of(self.request), parts.path, query)
                status = 200
            except SkipError as exc:
                status, body = exc.status, exc.body
            except ValueError:  # parse_qs: too many fields
                status, body = 400, {"message": "malformed query"}
            except Exception as exc:  # never a traceback or key bytes to the client
                log.error("SKIP request failed: %s", type(exc).__name__)
                status, body = 500, {"message": "internal error while reading or erasing the key"}
            self._reply(status, body)
            self.wfile.flush()
            if self.server.observer is not None:
                self.server.observer(parts.path, status, time.perf_counter() - start)
        except (TimeoutError, OSError):
            self.close_connection = True


class _SkipServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, state: _Handshake, service: SkipService) -> None:
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.ctx = ctx
        self.state = state
        self.service = service
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.identities: dict[int, str | None] = {}
        self.observer: Callable[[str, int, float], None] | None = None

    def server_bind(self) -> None:  # bound by serve_skip
        pass

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Handshake in this connection's thread, then serve its request."""
        tls_sock = None
        try:
            request.settimeout(HANDSHAKE_TIMEOUT_S)
            with contextlib.suppress(OSError):
                request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.state.psk_identity = None
            tls_sock = self.ctx.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
            tls_sock.do_handshake()
            self.identities[id(tls_sock)] = _peer_identity(tls_sock, self.state)
            self.RequestHandlerClass(tls_sock, client_address, self)
        except (ssl.SSLError, OSError) as exc:
            log.info("SKIP connection from %s refused during TLS: %s", client_address[0], type(exc).__name__)
        finally:
            if tls_sock is not None:
                self.identities.pop(id(tls_sock), None)
                with contextlib.suppress(OSError):
                    tls_sock.close()

    def identity_of(self, sock: Any) -> str | None:
        return self.identities.get(id(sock))

    def shutdown_request(self, request: Any) -> None:
        with contextlib.suppress(OSError):
            request.close()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("SKIP connection from %s failed", client_address[0])


@dataclass
class RunningSkip:
    host: str
    port: int

    @property
    def address(self) -> str:
        """``HOST:PORT`` (what ``status.json`` calls ``skip_url`` and the ``skip-qkd`` client takes)."""
        return f"{self.host}:{self.port}"


@contextlib.asynccontextmanager
async def serve_skip(
    kme: KME, host: str, port: int, tls: TLSFiles, *, psks: dict[str, bytes] | None = None,
    observer: Callable[[str, int, float], None] | None = None,
) -> AsyncIterator[RunningSkip]:
    """Serve SKIP for ``kme`` (which lives in the current event loop) during the ``async with``.

    ``port=0`` picks a free port. ``psks`` ({identity: key}) enables TLS-PSK; identities are SAE IDs.
    ``observer(path, status, seconds)`` is called after each answered request (metrics; no key bytes).
    On exit the server stops accepting and closes; requests in flight finish on their own threads.
    """
    ctx, state = skip_ssl_context(tls, psks)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"[kms] skip_listen: the SKIP server cannot listen on {host}:{port}: {exc.strerror}") \
            from None
    server = _SkipServer(sock, ctx, state, SkipService(kme, asyncio.get_running_loop()))
    server.observer = observer
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="skip-server",
                              daemon=True)
    thread.start()
    try:
        yield RunningSkip(host, sock.getsockname()[1])
    finally:
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        await asyncio.to_thread(thread.join)

