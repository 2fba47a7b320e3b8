# ruff: noqa: N815  (field names are the specification's)
"""ETSI GS QKD 014 V1.1.1 key delivery over HTTPS with mutual TLS (FastAPI + uvicorn).

Endpoints (all under ``/api/v1/keys``; JSON; sizes in bits; keys base64):

* ``GET {slave_SAE_ID}/status`` -> Status
* ``GET {slave_SAE_ID}/enc_keys?number=&size=`` and ``POST`` with a Key request -> Key container
* ``GET {master_SAE_ID}/dec_keys?key_ID=`` and ``POST`` with Key IDs -> Key container

**The SAE ID of a caller is the subject common name (CN) of its TLS client certificate**, which
must be signed by the site CA (verified by the TLS layer: no certificate, another CA, an expired
certificate or, with a CRL configured, a revoked one fail the handshake). A verified certificate
whose CN is not a registered SAE of this KME gets 401. Errors are 400 / 401 / 503 with the Error body
``{"message": ..., "details": [...]}``, including request validation errors (FastAPI's default would
be 422), requests over the size limits (:data:`MAX_URL_BYTES`, :data:`MAX_HEADER_BYTES`,
:data:`MAX_BODY_BYTES`) and requests the HTTP parser cannot read; a 405 carries ``Allow``.

uvicorn 0.54 does not put the TLS peer certificate into the ASGI scope, so
:class:`MTLSHttpToolsProtocol` (and its h11 twin :class:`MTLSH11Protocol`) reads it in
``connection_made`` and adds the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``, PEM) plus the parsed CN
(``"qkdstack_sae_id"``) to every request of that connection. The same classes enforce the size limits.

The OpenAPI description is served at ``/openapi.json`` (interactive docs at ``/docs``); it declares
the limits the server enforces (:func:`_declare_limits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import json
import logging
import re
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import h11
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from fastapi import Body, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from qkdstack.errors import ConfigError
from qkdstack.kms.kme import KME, KMEError

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1/keys"
MAX_SAE_ID_LENGTH = 64
"""Longest SAE ID: a certificate's common name has at most 64 characters (RFC 5280, ub-common-name)."""


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of the server: its certificate (chain), its private key, the site CA that signs SAE certs,
    and optionally the CA's certificate revocation list (PEM or DER; ``[kms] crl`` of the node)."""

    cert: Path | str
    key: Path | str
    ca: Path | str
    crl: Path | str | None = None


# --------------------------------------------------------------------------------------------
# ETSI GS QKD 014 data formats (section 6). Optional fields may be omitted in answers.


class Status(BaseModel):
    source_KME_ID: str
    target_KME_ID: str
    master_SAE_ID: str
    slave_SAE_ID: str
    key_size: int = Field(description="default key size in bits")
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int = Field(description="bits")
    min_key_size: int = Field(description="bits")
    max_SAE_ID_count: int
    status_extension: dict[str, Any] | None = None


# Request bodies are validated strictly: "5" is not a number, 1 is not a key ID (the OpenAPI types say so).


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    number: int | None = Field(None, description="number of keys (default 1)")
    size: int | None = Field(None, description="key size in bits, a multiple of 8 (default key_size)")
    additional_slave_SAE_IDs: list[str] | None = None
    extension_mandatory: list[dict[str, Any]] | None = None
    extension_optional: list[dict[str, Any]] | None = None


class Key(BaseModel):
    key_ID: str
    key_ID_extension: dict[str, Any] | None = None
    key: str = Field(description="base64")
    key_extension: dict[str, Any] | None = None


class KeyContainer(BaseModel):
    keys: list[Key]
    key_container_extension: dict[str, Any] | None = None


class KeyIDEntry(BaseModel):
    model_config = ConfigDict(strict=True)
    key_ID: str
    key_ID_extension: dict[str, Any] | None = None


class KeyIDs(BaseModel):
    model_config = ConfigDict(strict=True)
    key_IDs: list[KeyIDEntry]
    key_IDs_extension: dict[str, Any] | None = None


SaeId = Annotated[str, PathParam(min_length=1, max_length=MAX_SAE_ID_LENGTH)]
"""An SAE ID in a request path."""


class Error(BaseModel):
    message: str
    details: list[dict[str, Any]] | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "Bad request format"},
    401: {"model": Error, "description": "Unauthorized"},
    503: {"model": Error, "description": "Error on server side"},
}


# --------------------------------------------------------------------------------------------
# Request size limits, enforced in the HTTP protocol layer (before any body reaches the app).

MAX_URL_BYTES = 8 * 1024
"""Longest request target (path and query) accepted; ETSI 014 URLs are a few hundred bytes at most."""
MAX_HEADER_BYTES = 16 * 1024
"""Most bytes of request header fields accepted (each field counted as name + value + 4 for ': ' and CRLF)."""
MAX_BODY_BYTES = 64 * 1024
"""Largest request body accepted: a Key IDs body with 128 key IDs and their extensions fits easily."""
_MAX_HEAD_BYTES = MAX_URL_BYTES + MAX_HEADER_BYTES + 1024  # + method, version, line ends
LINGER_IDLE_S = 1.0
"""After refusing a request the server reads and drops what the client still sends for up to this long
without data (or :data:`LINGER_MAX_S` in all), then closes: closing at once with unread data would make
the kernel reset the connection, and the client could lose the 400 answer (the reason for nginx's
lingering close)."""
LINGER_MAX_S = 10.0


def _error_response_bytes(status: int, message: str, details: list[dict[str, Any]]) -> bytes:
    """A complete HTTP/1.1 answer with the ETSI 014 Error body, closing the connection."""
    body = json.dumps({"message": message, "details": details}, separators=(",", ":")).encode("ascii")
    phrase = {400: b"Bad Request"}.get(status, b"Error")
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        % (status, phrase, len(body))
        + body
    )


class _Refuse(Exception):
    """Raised inside a parser callback to stop parsing a request that breaks a limit."""


class _LimitsMixin:
    """Request size limits and JSON error answers for uvicorn's HTTP/1.1 protocols (httptools and h11).

    Why here and not in the ASGI app: uvicorn buffers the request line and headers before the app
    sees the request, and a body the app answers early is still read. The protocol sees every
    byte as it arrives, so an oversized request is refused after at most one TCP read past the limit:
    the server never holds more than about ``limit + 256 KiB`` of one request. The answer is 400 with
    the ETSI 014 Error body, also for requests the HTTP parser refuses (uvicorn's default is a
    ``text/plain`` 400); then the connection is closed after a lingering drain (see :data:`LINGER_IDLE_S`).
    """

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    flow: Any
    cycle: Any

    def _limits_init(self) -> None:
        self._refused = False
        self._refusal: tuple[str, list[dict[str, Any]]] | None = None
        self._body_refused = False
        self._head_open = True
        self._head_bytes = 0
        self._url_bytes = 0
        self._header_bytes = 0
        self._body_bytes = 0
        self._linger_idle: asyncio.TimerHandle | None = None
        self._linger_max: asyncio.TimerHandle | None = None

    def _new_request(self) -> None:
        self._head_open = True
        self._head_bytes = self._url_bytes = self._header_bytes = self._body_bytes = 0

    def _over(self, what: str) -> _Refuse:
        """Record which limit the request broke; the caller raises the returned exception."""
        limits = {
            "url": ("request URL too long", "max_url_bytes", MAX_URL_BYTES),
            "headers": ("request headers too large", "max_header_bytes", MAX_HEADER_BYTES),
            "body": ("request body too large", "max_body_bytes", MAX_BODY_BYTES),
        }
        message, name, limit = limits[what]
        self._refusal = (message, [{name: limit}])
        return _Refuse(message)

    def _count_url(self, n: int) -> None:
        self._url_bytes += n
        if self._url_bytes > MAX_URL_BYTES:
            raise self._over("url")

    def _count_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES:
            raise self._over("headers")

    def _check_content_length(self, headers: list[tuple[bytes, bytes]]) -> None:
        for name, value in headers:
            if name.lower() == b"content-length" and value.strip().isdigit() and int(value) > MAX_BODY_BYTES:
                raise self._over("body")

    def _count_body(self, n: int) -> None:
        self._body_bytes += n
        if self._body_bytes > MAX_BODY_BYTES:
            self._body_refused = True  # the current request's cycle exists (it may have been answered)
            raise self._over("body")

    def _feed_head(self, n: int) -> None:
        """Count bytes received while the request head is incomplete (a parser may buffer them)."""
        if self._head_open:
            self._head_bytes += n

    def _head_too_long(self) -> bool:
        return self._head_open and self._head_bytes > _MAX_HEAD_BYTES

    def send_400_response(self, msg: str) -> None:  # uvicorn calls this when its parser refuses a request
        message, details = self._refusal or ("invalid HTTP request", [{"reason": msg}])
        self._refuse(message, details)

    def _refuse(self, message: str, details: list[dict[str, Any]]) -> None:
        if self._refused:
            return
        self._refused = True
        cycle = self.cycle
        started = cycle is not None and cycle.response_started and not cycle.response_complete
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() gets http.disconnect; its answer is dropped
            cycle.message_event.set()
        if self.transport.is_closing():
            return
        if started:  # half an answer to an earlier request is on the wire: nothing sensible can follow
            self.transport.close()
            return
        answered = self._body_refused and cycle is not None and cycle.response_complete
        if not answered:  # (a body past the limit after the app already answered that request: just close)
            self.transport.write(_error_response_bytes(400, message, details))
        self.flow.resume_reading()
        self._linger_max = self.loop.call_later(LINGER_MAX_S, self._linger_close)
        self._linger_idle = self.loop.call_later(LINGER_IDLE_S, self._linger_close)

    def _linger_close(self) -> None:
        for handle in (self._linger_idle, self._linger_max):
            if handle is not None:
                handle.cancel()
        if not self.transport.is_closing():
            self.transport.close()

    def _drained(self) -> None:
        """Data after a refusal: dropped unread, and the idle timer starts again."""
        if self._linger_idle is not None:
            self._linger_idle.cancel()
            self._linger_idle = self.loop.call_later(LINGER_IDLE_S, self._linger_close)

    def eof_received(self) -> bool | None:
        if self._refused:
            self._linger_close()
        return None

    def _limits_lost(self) -> None:
        for handle in (self._linger_idle, self._linger_max):
            if handle is not None:
                handle.cancel()


# --------------------------------------------------------------------------------------------
# Mutual TLS: the client certificate into the ASGI scope.


def _cn_of_der(der: bytes) -> tuple[str, str, str]:
    cert = x509.load_der_x509_certificate(der)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    pem = cert.public_bytes(Encoding.PEM).decode("ascii")
    return cn, cert.subject.rfc4514_string(), pem


def _client_cert_app(transport: asyncio.Transport, inner: Any) -> Any:
    """Wrap the connection's ASGI app so each request's scope carries the verified client certificate."""
    tls: dict[str, Any] = {"client_cert_chain": [], "client_cert_name": None, "client_cert_error": None}
    sae_id = None
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is not None:
        der = ssl_object.getpeercert(binary_form=True)
        if der:
            try:
                sae_id, name, pem = _cn_of_der(der)
                tls.update(client_cert_chain=[pem], client_cert_name=name, tls_version=ssl_object.version())
            except ValueError:
                tls["client_cert_error"] = "unparsable client certificate"

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            ext = dict(scope.get("extensions") or {})
            ext["tls"] = tls
            ext["qkdstack_sae_id"] = sae_id
            scope = {**scope, "extensions": ext}
        await inner(scope, receive, send)

    return app


class MTLSH11Protocol(_LimitsMixin, H11Protocol):
    """uvicorn's h11 protocol with the verified client certificate in each request's scope, and size limits.

    The h11 twin of :class:`MTLSHttpToolsProtocol` (``serve_etsi014(..., http_protocol=MTLSH11Protocol)``).
    h11's own limit on an incomplete request head is set above :data:`_MAX_HEAD_BYTES` (see
    :func:`serve_etsi014`) so that these checks answer first.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._limits_init()
        super().connection_made(transport)
        self.app = _client_cert_app(transport, self.app)
        next_event = self.conn.next_event

        def checked_next_event() -> Any:
            event = next_event()
            try:
                if isinstance(event, h11.Request):
                    self._head_open = False
                    self._count_url(len(event.target))
                    for name, value in event.headers.raw_items():
                        self._count_header(name, value)
                    self._check_content_length(list(event.headers.raw_items()))
                elif isinstance(event, h11.Data):
                    self._count_body(len(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    self._new_request()
            except _Refuse as exc:
                raise h11.RemoteProtocolError(str(exc)) from None
            return event

        self.conn.next_event = checked_next_event  # type: ignore[method-assign]

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return self._drained()
        self._feed_head(len(data))
        super().data_received(data)
        if not self._refused and self._head_too_long():
            # h11 holds the whole head until it is complete: no line end yet means the request line is the culprit
            buffered = self.conn.trailing_data[0]
            self._over("headers" if b"\r\n" in buffered[:_MAX_HEAD_BYTES] else "url")
            self.send_400_response("")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._limits_lost()
        super().connection_lost(exc)


class MTLSHttpToolsProtocol(_LimitsMixin, HttpToolsProtocol):
    """uvicorn's httptools protocol with the verified client certificate in each request's scope, and size limits.

    httptools reports the URL in pieces as they arrive (counted at once) but keeps a header field
    to itself until it is complete, so :meth:`data_received` also counts every byte received while
    the head is incomplete and refuses past :data:`_MAX_HEAD_BYTES`.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._limits_init()
        super().connection_made(transport)
        self.app = _client_cert_app(transport, self.app)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return self._drained()
        self._feed_head(len(data))
        super().data_received(data)  # a callback's _Refuse comes back through send_400_response
        if not self._refused and self._head_too_long():
            self._over("headers")
            self.send_400_response("")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._limits_lost()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._refusal = None

    def on_url(self, url: bytes) -> None:
        self._count_url(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header(name, value)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._check_content_length(self.headers)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._count_body(len(body))
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._new_request()


def http_protocol_class() -> type:
    """The uvicorn HTTP/1.1 protocol the server uses: httptools (a dependency), with mTLS identity and limits."""
    return MTLSHttpToolsProtocol


def _error(status: int, message: str, details: list[dict[str, Any]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"message": message}
    if details:
        body["details"] = details
    return JSONResponse(body, status_code=status)


def caller_sae_id(request: Request) -> str:
    """The authenticated SAE ID: the CN of the verified client certificate (401 if there is none).

    Called at the top of each handler rather than as a FastAPI dependency: that halves the framework's
    CPU per request (measured with benchmarks/bench_kms.py).
    """
    ext = request.scope.get("extensions") or {}
    sae_id = ext.get("qkdstack_sae_id")
    if not sae_id:
        raise KMEError(401, "a client certificate with the SAE ID as common name is required")
    return sae_id


# --------------------------------------------------------------------------------------------


def _allowed_methods(app: FastAPI, scope: dict) -> str:
    """The methods of every route whose path matches ``scope`` (for the ``Allow`` header of a 405)."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match != Match.NONE and isinstance(route, APIRoute):
            methods |= route.methods
    return ", ".join(sorted(methods))


def _int_schema(minimum: int, maximum: int, description: str, *, multiple_of: int | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer", "minimum": minimum, "maximum": maximum, "description": description}
    if multiple_of:
        schema["multipleOf"] = multiple_of
    return schema


def _declare_limits(spec: dict[str, Any], kme: KME) -> dict[str, Any]:
    """Make the generated OpenAPI description say what the server enforces, and nothing else.

    FastAPI lists a 422 for every operation with parameters, which this server never sends (it
    answers 400, ETSI 014 section 5), and describes ``number``, ``size``, SAE IDs and key IDs as
    unbounded. This replaces those with the limits the KME and this module check: ``number`` in
    1..max_key_per_request, ``size`` a multiple of 8 in min_key_size..max_key_size, SAE IDs of at most
    :data:`MAX_SAE_ID_LENGTH` characters, key IDs as UUIDs (``key_ID`` required by GET dec_keys), at
    most max_SAE_ID_count additional slaves, no ``extension_mandatory`` (none is supported, so a
    non-empty list is refused), and the request size limits (``x-qkdstack-request-limits``).
    """
    c = kme.config
    number = _int_schema(1, c.max_key_per_request, "number of keys (default 1)")
    size = _int_schema(c.min_key_size, c.max_key_size, f"key size in bits (default {c.key_size})", multiple_of=8)
    sae_id = {"type": "string", "minLength": 1, "maxLength": MAX_SAE_ID_LENGTH}
    uuid_schema = {"type": "string", "format": "uuid", "description": "key ID (UUID)"}
    limits = {"max_url_bytes": MAX_URL_BYTES, "max_header_bytes": MAX_HEADER_BYTES, "max_body_bytes": MAX_BODY_BYTES}
    spec["x-qkdstack-request-limits"] = limits
    spec["info"]["description"] += (
        f" Requests are limited to a URL of {MAX_URL_BYTES} bytes, header fields of {MAX_HEADER_BYTES} bytes in"
        f" all and a body of {MAX_BODY_BYTES} bytes; a larger request gets 400 with the Error body."
    )
    for item in spec["paths"].values():
        for op in item.values():
            op["responses"].pop("422", None)
            for param in op.get("parameters", []):
                name = param["name"]
                if param["in"] == "path":
                    param["schema"] = {**sae_id, "title": name}
                elif name == "number":
                    param["schema"] = number
                elif name == "size":
                    param["schema"] = size
                elif name == "key_ID":
                    param["required"] = True
                    param["schema"] = uuid_schema
    schemas = spec["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    props = schemas["KeyRequest"]["properties"]
    props["number"] = {"anyOf": [number, {"type": "null"}]}
    props["size"] = {"anyOf": [size, {"type": "null"}]}
    props["additional_slave_SAE_IDs"] = {
        "anyOf": [
            {"type": "array", "items": sae_id, "maxItems": c.max_SAE_ID_count, "uniqueItems": True},
            {"type": "null"},
        ]
    }
    props["extension_mandatory"] = {
        "anyOf": [{"type": "array", "items": {"type": "object"}, "maxItems": 0}, {"type": "null"}],
        "description": "no extension is supported: a non-empty list is refused with 400",
    }
    props["extension_optional"] = {
        "anyOf": [{"type": "array", "items": {"type": "object"}}, {"type": "null"}],
        "description": 'served: {"qkdstack_proof": true} (each key\'s proof in key_extension.qkdstack_proof, '
        "docs/kms.md); other entries are ignored",
    }
    schemas["KeyIDs"]["properties"]["key_IDs"].update(minItems=1, maxItems=c.max_key_per_request)
    schemas["KeyIDEntry"]["properties"]["key_ID"] = uuid_schema
    return spec


def create_app(kme: KME) -> FastAPI:
    """The ETSI GS QKD 014 application serving ``kme``."""
    app = FastAPI(
        title="qkdstack KME — ETSI GS QKD 014 V1.1.1 key delivery",
        version="1.1.1",
        description="Key delivery to SAEs. The SAE ID of a caller is the subject CN of its TLS client certificate.",
    )
    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _declare_limits(plain_openapi(), kme)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(KMEError)
    async def _kme_error(_request: Request, exc: KMEError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Authentication comes first: an unauthenticated caller learns nothing about request formats.
        sae_id = (request.scope.get("extensions") or {}).get("qkdstack_sae_id")
        if not sae_id or sae_id not in kme.config.sae_ids:
            return _error(401, "a client certificate of a registered SAE is required")
        details = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()))
            details.append({"location": loc, "error": str(e.get("msg", "invalid"))})
        return _error(400, "bad request format", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = _error(exc.status_code, str(exc.detail))
        if exc.status_code == 405:  # RFC 9110 section 15.5.6: a 405 lists the methods the resource supports
            response.headers["Allow"] = _allowed_methods(app, request.scope)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("ETSI 014 request failed: %s", type(exc).__name__)
        return _error(503, "internal error of the KME")

    @app.get(f"{API_PREFIX}/{{slave_SAE_ID}}/status", response_model=Status, responses=ERRORS, tags=["ETSI 014"])
    async def get_status(slave_SAE_ID: SaeId, request: Request) -> JSONResponse:
        """Status of the keys shared with ``slave_SAE_ID`` (called by the master SAE)."""
        sae = caller_sae_id(request)
        return JSONResponse(await kme.status(sae, slave_SAE_ID))

    @app.get(
        f"{API_PREFIX}/{{slave_SAE_ID}}/enc_keys", response_model=KeyContainer, responses=ERRORS, tags=["ETSI 014"]
    )
    async def get_enc_keys(
        slave_SAE_ID: SaeId,
        request: Request,
        number: int | None = Query(None, description="number of keys (default 1)"),
        size: int | None = Query(None, description="key size in bits (default key_size)"),
    ) -> JSONResponse:
        """Get key: new keys for the calling master SAE, reserved for ``slave_SAE_ID``."""
        sae = caller_sae_id(request)
        return JSONResponse(await kme.enc_keys(sae, slave_SAE_ID, number, size))

    @app.post(
        f"{API_PREFIX}/{{slave_SAE_ID}}/enc_keys", response_model=KeyContainer, responses=ERRORS, tags=["ETSI 014"]
    )
    async def post_enc_keys(
        slave_SAE_ID: SaeId, request: Request, body: Annotated[KeyRequest | None, Body()] = None
    ) -> JSONResponse:
        """Get key with a Key request body (empty: defaults); extension_optional [{"qkdstack_proof": true}]: proofs."""
        sae = caller_sae_id(request)
        r = body or KeyRequest()
        return JSONResponse(
            await kme.enc_keys(
                sae,
                slave_SAE_ID,
                r.number,
                r.size,
                r.additional_slave_SAE_IDs,
                r.extension_mandatory,
                r.extension_optional,
            )
        )

    @app.get(
        f"{API_PREFIX}/{{master_SAE_ID}}/dec_keys", response_model=KeyContainer, responses=ERRORS, tags=["ETSI 014"]
    )
    async def get_dec_keys(
        master_SAE_ID: SaeId, request: Request, key_ID: str = Query(description="key ID (UUID)")
    ) -> JSONResponse:
        """Get key with key IDs: the slave SAE fetches one key the master SAE took."""
        sae = caller_sae_id(request)
        return JSONResponse(await kme.dec_keys(sae, master_SAE_ID, [key_ID]))

    @app.post(
        f"{API_PREFIX}/{{master_SAE_ID}}/dec_keys", response_model=KeyContainer, responses=ERRORS, tags=["ETSI 014"]
    )
    async def post_dec_keys(master_SAE_ID: SaeId, body: Annotated[KeyIDs, Body()], request: Request) -> JSONResponse:
        """Get key with key IDs (Key IDs body); key_IDs_extension {"qkdstack_proof": true} adds the proofs."""
        sae = caller_sae_id(request)
        ext = [body.key_IDs_extension] if body.key_IDs_extension else None
        return JSONResponse(await kme.dec_keys(sae, master_SAE_ID, [k.key_ID for k in body.key_IDs], ext))

    return app


# --------------------------------------------------------------------------------------------
# Hot path: GET enc_keys without the framework.

_ENC_KEYS_PATH = re.compile(r"/api/v1/keys/([^/]{1,64})/enc_keys")  # longer SAE IDs: FastAPI refuses
_QUERY_INT = re.compile(rb"-?[0-9]{1,40}")


def _json_body(body: dict[str, Any]) -> bytes:
    """The JSON text Starlette's JSONResponse would send (compact, UTF-8)."""
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _enc_keys_query(query: bytes) -> dict[str, int] | None:
    """``number`` / ``size`` of a GET enc_keys query string; None when the framework must parse it."""
    out: dict[str, int] = {}
    if not query:
        return out
    for item in query.split(b"&"):
        name, eq, value = item.partition(b"=")
        if not eq or name not in (b"number", b"size") or name.decode() in out or not _QUERY_INT.fullmatch(value):
            return None  # anything unusual (repeats, other fields, encodings, non-integers): FastAPI decides
        out[name.decode()] = int(value)
    return out


class EncKeysFastPath:
    """ASGI wrapper that serves ``GET .../{slave_SAE_ID}/enc_keys`` itself and hands all else to FastAPI.

    Why: FastAPI's routing, dependency resolution and middleware stack cost about a quarter of the
    server's CPU per key request (py-spy, benchmarks/bench_kms.py), more than the KME itself. The
    fast path handles only requests whose query is empty or plain decimal ``number`` / ``size``
    values; it calls the same :meth:`KME.enc_keys` with the same SAE identity (the client
    certificate's CN, 401 without it) and answers with the same status codes and bodies as the
    FastAPI route. Any other request (POST, odd query strings, other paths) goes to the framework.
    """

    def __init__(self, kme: KME, app: Any) -> None:
        self.kme = kme
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            return await self.app(scope, receive, send)
        m = _ENC_KEYS_PATH.fullmatch(scope["path"])
        query = _enc_keys_query(scope["query_string"]) if m else None
        if query is None:
            return await self.app(scope, receive, send)
        status = 200
        try:
            sae_id = (scope.get("extensions") or {}).get("qkdstack_sae_id")
            if not sae_id:
                raise KMEError(401, "a client certificate with the SAE ID as common name is required")
            body = await self.kme.enc_keys(sae_id, m.group(1), query.get("number"), query.get("size"))
        except KMEError as exc:
            status, body = exc.status, exc.body()
        except Exception as exc:  # the same answer as the framework's catch-all handler
            log.error("ETSI 014 request failed: %s", type(exc).__name__)
            status, body = 503, {"message": "internal error of the KME"}
        data = _json_body(body)
        headers = [(b"content-length", str(len(data)).encode("ascii")), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


# --------------------------------------------------------------------------------------------


def _load_crls(path: Path | str, ca_path: Path | str) -> bytes:
    """The CRLs of ``path`` (PEM, several allowed, or one DER) as PEM, each checked against the site CA.

    A CRL that no CA of the ``ca`` file signed would make OpenSSL refuse every client of that CA
    ("CRL signature failure"), and an expired one every client ("CRL has expired"): both are
    configuration errors found here rather than as refused handshakes.
    """
    where = f"[kms] crl ({path})"
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{where} does not exist or is not a file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror}") from None
    marker = b"-----BEGIN X509 CRL-----"
    try:
        if marker in data:
            crls = [x509.load_pem_x509_crl(marker + part) for part in data.split(marker)[1:]]
        else:
            crls = [x509.load_der_x509_crl(data)]
    except ValueError:
        crls = []
    if not crls:
        raise ConfigError(f"{where} holds no certificate revocation list (PEM or DER)")
    try:
        cas = x509.load_pem_x509_certificates(Path(ca_path).read_bytes())
    except (OSError, ValueError):
        cas = []
    now = datetime.datetime.now(datetime.UTC)
    for crl in crls:
        issuers = [ca for ca in cas if ca.subject == crl.issuer]
        if not any(crl.is_signature_valid(ca.public_key()) for ca in issuers):  # type: ignore[arg-type]
            raise ConfigError(f"{where} is not signed by a CA of [kms] ca_cert (issuer {crl.issuer.rfc4514_string()})")
        if crl.next_update_utc is not None and crl.next_update_utc < now:
            raise ConfigError(f"{where} has expired (next update was due {crl.next_update_utc:%Y-%m-%d %H:%M} UTC)")
    return b"".join(crl.public_bytes(Encoding.PEM) for crl in crls)


def server_ssl_context(tls: TLSFiles) -> ssl.SSLContext:
    """TLS >= 1.2 server context that requires a client certificate signed by the site CA.

    With ``tls.crl`` the SAE's certificate is also checked against the CA's revocation list
    (``VERIFY_CRL_CHECK_LEAF``): a revoked SAE fails the TLS handshake (alert ``certificate_revoked``)
    and never reaches the application. The CRL is read once, here; a new CRL takes effect on restart.
    With the check on, OpenSSL also refuses SAEs whose issuing CA has no CRL in the file, and every
    SAE once the CRL is past its next-update time (fail closed).
    """
    for name in ("cert", "key", "ca"):
        if not Path(getattr(tls, name)).is_file():
            raise ConfigError(f"TLS file {name} ({getattr(tls, name)}) does not exist")
    crl_pem = _load_crls(tls.crl, tls.ca) if tls.crl else None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.load_verify_locations(str(tls.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    if crl_pem is not None:
        # The ssl module loads CRLs only from a PEM file (cadata takes certificates only).
        with tempfile.NamedTemporaryFile(suffix=".pem") as fh:
            fh.write(crl_pem)
            fh.flush()
            ctx.load_verify_locations(fh.name)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def tune_gc_for_serving(gen0_threshold: int = 50_000) -> None:
    """Keep Python's cyclic garbage collector off the key-delivery latency (call once, after start-up).

    ``gc.freeze()`` moves every object alive now (FastAPI, pydantic and cryptography build hundreds of
    thousands at import) out of the collector's reach, and a higher generation-0 threshold makes
    collections rarer. Without it, full collections that walk all those objects stall the event loop
    and set the p99 latency: 64 clients, benchmarks/bench_kms.py, p99 ~80 -> ~40 ms. Process-wide, so
    the host (the node, the benchmark) decides; the cost is a little memory held until the next collection.
    """
    gc.collect()
    gc.freeze()
    t0, t1, t2 = gc.get_threshold()
    gc.set_threshold(max(t0, gen0_threshold), t1, t2)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the host process (node, tests) owns signal handling
        yield


@dataclass
class RunningServer:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"


@contextlib.asynccontextmanager
async def serve_etsi014(
    kme: KME,
    host: str,
    port: int,
    tls: TLSFiles,
    *,
    log_level: str = "warning",
    http_protocol: type | None = None,
    middleware: Callable[[Any], Any] | None = None,
) -> AsyncIterator[RunningServer]:
    """Run the ETSI 014 server in the current event loop for the duration of the ``async with``.

    ``port=0`` picks a free port (see the yielded ``RunningServer.port``). On exit the server stops
    accepting, lets requests in flight finish (graceful shutdown) and closes. ``http_protocol``
    chooses uvicorn's HTTP implementation (default :func:`http_protocol_class`; tests also run
    :class:`MTLSH11Protocol`). ``middleware`` wraps the whole ASGI application, fast path included (the
    node's request metrics, :class:`qkdstack.ops.metrics.Etsi014Metrics`).
    """
    app: Any = EncKeysFastPath(kme, create_app(kme))
    async with serve_asgi(middleware(app) if middleware is not None else app, host, port, tls, "the ETSI 014 server",
                          log_level=log_level, http_protocol=http_protocol,
                          # our request limits answer first (h11 only)
                          h11_max_incomplete_event_size=_MAX_HEAD_BYTES + 256 * 1024) as running:
        yield running


@contextlib.asynccontextmanager
async def serve_asgi(
    app: Any,
    host: str,
    port: int,
    tls: TLSFiles,
    what: str,
    *,
    log_level: str = "warning",
    http_protocol: type | None = None,
    **uvicorn_options: Any,
) -> AsyncIterator[RunningServer]:
    """Serve an ASGI ``app`` over mutual TLS (``tls``) with uvicorn in the current loop, for the ``async with``.

    Shared by the ETSI 014 server and the KME-to-KME server (network/kme_api.py). ``what`` names the
    server in errors (a busy port is a ConfigError: uvicorn itself would call ``sys.exit()``, which
    would stop the host's event loop). On exit the server stops accepting, drops idle keep-alive
    connections (an idle client never answers the TLS close, which would hold the graceful shutdown)
    and lets requests in flight finish.
    """
    ctx = server_ssl_context(tls)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=http_protocol or http_protocol_class(),
        ssl_certfile=str(tls.cert),
        ssl_keyfile=str(tls.key),
        ssl_context_factory=lambda _config, _default: ctx,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        ws="none",  # no WebSocket upgrades: plain HTTP/1.1
        proxy_headers=False,  # callers are identified by their certificates, never by forwarded headers
        timeout_keep_alive=30,
        timeout_graceful_shutdown=5,
        **uvicorn_options,
    )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{what} cannot listen on {host}:{port}: {exc.strerror}") from None
    server = _Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                raise ConfigError(f"{what} on {host}:{port} failed to start")
            await asyncio.sleep(0.01)
        yield RunningServer(host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        while not task.done():
            for conn in list(server.server_state.connections):
                cycle = getattr(conn, "cycle", None)
                transport = getattr(conn, "transport", None)
                if (cycle is None or cycle.response_complete) and transport is not None:
                    transport.abort()
            await asyncio.wait([task], timeout=0.05)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()
