# ruff: noqa: N815  (field names are the specification's)
"""ETSI GS QKD 014 V1.1.1 key delivery over HTTPS with mutual TLS (FastAPI + uvicorn).

Endpoints (all under ``/api/v1/keys``; JSON; sizes in bits; keys base64):

* ``GET {slave_SAE_ID}/status`` -> Status
* ``GET {slave_SAE_ID}/enc_keys?number=&size=`` and ``POST`` with a Key request -> Key container
* ``GET {master_SAE_ID}/dec_keys?key_ID=`` and ``POST`` with Key IDs -> Key container

**The SAE ID of a caller is the subject common name (CN) of its TLS client certificate**, which
must be signed by the site CA (verified by the TLS layer: no certificate, another CA or an expired
certificate fail the handshake). A verified certificate whose CN is not a registered SAE of this
KME gets 401. Errors are 400 / 401 / 503 with the Error body ``{"message": ..., "details": [...]}``,
including request validation errors (FastAPI's default would be 422).

uvicorn 0.54 does not put the TLS peer certificate into the ASGI scope, so
:class:`MTLSH11Protocol` (or its httptools twin when httptools is installed) reads it in
``connection_made`` and adds the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``, PEM) plus the parsed CN
(``"qkdstack_sae_id"``) to every request of that connection.

The OpenAPI description is served at ``/openapi.json`` (interactive docs at ``/docs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from qkdstack.errors import ConfigError
from qkdstack.kms.kme import KME, KMEError

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1/keys"


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of the server: its certificate (chain), its private key, and the site CA that signs SAE certs."""

    cert: Path | str
    key: Path | str
    ca: Path | str


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


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
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
    key_ID: str
    key_ID_extension: dict[str, Any] | None = None


class KeyIDs(BaseModel):
    key_IDs: list[KeyIDEntry]
    key_IDs_extension: dict[str, Any] | None = None


class Error(BaseModel):
    message: str
    details: list[dict[str, Any]] | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "Bad request format"},
    401: {"model": Error, "description": "Unauthorized"},
    503: {"model": Error, "description": "Error on server side"},
}


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


class MTLSH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, adding the verified client certificate to each request's scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = _client_cert_app(transport, self.app)


def http_protocol_class() -> type:
    """The fastest available uvicorn HTTP/1.1 protocol (httptools if installed, else h11), with mTLS identity."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return MTLSH11Protocol

    class MTLSHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.app = _client_cert_app(transport, self.app)

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


def create_app(kme: KME) -> FastAPI:
    """The ETSI GS QKD 014 application serving ``kme``."""
    app = FastAPI(
        title="qkdstack KME — ETSI GS QKD 014 V1.1.1 key delivery",
        version="1.1.1",
        description="Key delivery to SAEs. The SAE ID of a caller is the subject CN of its TLS client certificate.",
    )

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
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("ETSI 014 request failed: %s", type(exc).__name__)
        return _error(503, "internal error of the KME")

    @app.get(f"{API_PREFIX}/{{slave_SAE_ID}}/status", response_model=Status, responses=ERRORS, tags=["ETSI 014"])
    async def get_status(slave_SAE_ID: str, request: Request) -> JSONResponse:
        """Status of the keys shared with ``slave_SAE_ID`` (called by the master SAE)."""
        sae = caller_sae_id(request)
        return JSONResponse(await kme.status(sae, slave_SAE_ID))

    @app.get(
        f"{API_PREFIX}/{{slave_SAE_ID}}/enc_keys", response_model=KeyContainer, responses=ERRORS, tags=["ETSI 014"]
    )
    async def get_enc_keys(
        slave_SAE_ID: str,
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
        slave_SAE_ID: str, request: Request, body: Annotated[KeyRequest | None, Body()] = None
    ) -> JSONResponse:
        """Get key with a Key request body (an empty body means the defaults)."""
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
        master_SAE_ID: str, request: Request, key_ID: str | None = Query(None, description="key ID (UUID)")
    ) -> JSONResponse:
        """Get key with key IDs: the slave SAE fetches one key the master SAE took."""
        sae = caller_sae_id(request)
        return JSONResponse(await kme.dec_keys(sae, master_SAE_ID, [key_ID] if key_ID is not None else []))

    @app.post(
        f"{API_PREFIX}/{{master_SAE_ID}}/dec_keys", response_model=KeyContainer, responses=ERRORS, tags=["ETSI 014"]
    )
    async def post_dec_keys(master_SAE_ID: str, body: Annotated[KeyIDs, Body()], request: Request) -> JSONResponse:
        """Get key with key IDs (Key IDs body)."""
        sae = caller_sae_id(request)
        return JSONResponse(await kme.dec_keys(sae, master_SAE_ID, [k.key_ID for k in body.key_IDs]))

    return app


# --------------------------------------------------------------------------------------------
# Hot path: GET enc_keys without the framework.

_ENC_KEYS_PATH = re.compile(r"/api/v1/keys/([^/]+)/enc_keys")
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


def server_ssl_context(tls: TLSFiles) -> ssl.SSLContext:
    """TLS >= 1.2 server context that requires a client certificate signed by the site CA."""
    for name in ("cert", "key", "ca"):
        if not Path(getattr(tls, name)).is_file():
            raise ConfigError(f"TLS file {name} ({getattr(tls, name)}) does not exist")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.load_verify_locations(str(tls.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
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
    kme: KME, host: str, port: int, tls: TLSFiles, *, log_level: str = "warning"
) -> AsyncIterator[RunningServer]:
    """Run the ETSI 014 server in the current event loop for the duration of the ``async with``.

    ``port=0`` picks a free port (see the yielded ``RunningServer.port``). On exit the server stops
    accepting, lets requests in flight finish (graceful shutdown) and closes.
    """
    ctx = server_ssl_context(tls)
    config = uvicorn.Config(
        EncKeysFastPath(kme, create_app(kme)),
        host=host,
        port=port,
        http=http_protocol_class(),
        ssl_certfile=str(tls.cert),
        ssl_keyfile=str(tls.key),
        ssl_context_factory=lambda _config, _default: ctx,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        proxy_headers=False,  # the SAE is identified by its certificate, never by forwarded headers
        timeout_keep_alive=30,
        timeout_graceful_shutdown=5,
    )
    # Bind here: uvicorn would call sys.exit() on a busy port, which would stop the host's event loop.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"the ETSI 014 server cannot listen on {host}:{port}: {exc.strerror}") from None
    server = _Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                raise ConfigError(f"the ETSI 014 server on {host}:{port} failed to start")
            await asyncio.sleep(0.01)
        yield RunningServer(host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()
