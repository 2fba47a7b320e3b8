"""The KME-to-KME API between the sites of a network: HTTPS with mutual TLS (docs/network.md).

Endpoints, after the draft ETSI GS QKD 020 (Interoperable Key Management System API, OpenAPI draft
0.4.1, BSD-3) where it covers the relay, and ``qkdstack`` extensions where it does not:

* ``GET  /kmapi/versions`` -> ``{"versions": [{"version": "v1", "extension": "qkdstack_relay/1"}]}``
* ``POST /kmapi/v1/ext_keys`` -> a hop of a key relay (body: :func:`~qkdstack.network.relay.build_hop_message`);
  the answer comes once the key is stored at the destination: ``{"ack_status": "relayed", "key_IDs": [...]}``
  (020 sends the acknowledgment to ``ack_callback_url``; here it is the synchronous answer, see the docs).
* ``POST /kmapi/v1/ext_keys/void`` -> ``{"key_IDs": [...], "initiator_sae_id": ...}``: the source of a relay
  that failed asks a destination to delete what it may have stored; answer ``{"ack_status": "voided", ...}``.
* ``GET  /kmapi/v1/qkdstack/link_state`` (extension) -> the link-state reports this site holds
  (:mod:`qkdstack.network.routing`).

The caller is the subject common name of its TLS client certificate, signed by the network CA
(``KME_<SITE>``, written by ``qkdstack init --topology``); a certificate of another CA fails the
handshake, and a CN that names no site of the topology gets 401. Errors are 400 / 401 / 503 with the
ETSI Error body ``{"message": ..., "details": [...]}``. The server reuses the ETSI 014 server's TLS,
certificate-in-scope and request-size machinery (kms/etsi014.py).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qkdstack.errors import ChannelError, ConfigError
from qkdstack.kms.etsi014 import RunningServer, TLSFiles, serve_asgi
from qkdstack.network.relay import RelayError

API_VERSION = "v1"
EXT_KEYS = f"/kmapi/{API_VERSION}/ext_keys"
VOID = f"/kmapi/{API_VERSION}/ext_keys/void"
LINK_STATE = f"/kmapi/{API_VERSION}/qkdstack/link_state"
VERSIONS = "/kmapi/versions"
KME_CN_PREFIX = "KME_"


def site_of_cn(cn: str) -> str:
    """The site a KME certificate's common name names: ``KME_<SITE>`` -> ``SITE`` (a bare site name is taken too)."""
    return cn.removeprefix(KME_CN_PREFIX)


class RelayHandler(Protocol):
    """What the server serves (a :class:`~qkdstack.network.site_kme.SiteKME`)."""

    def knows_site(self, site: str) -> bool: ...

    async def handle_ext_keys(self, sender: str, body: Any) -> dict[str, Any]: ...

    async def handle_void(self, sender: str, body: Any) -> dict[str, Any]: ...

    async def handle_link_state(self, sender: str) -> dict[str, Any]: ...


def _error(status: int, message: str, details: list[dict[str, Any]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"message": message}
    if details:
        body["details"] = details
    return JSONResponse(body, status_code=status)


def create_app(handler: RelayHandler) -> FastAPI:
    """The KME-to-KME application serving ``handler``."""
    app = FastAPI(
        title="qkdstack KME-to-KME API (after draft ETSI GS QKD 020, with qkdstack_relay extensions)",
        version=API_VERSION,
        docs_url=None,
        redoc_url=None,
    )

    def caller(request: Request) -> str:
        cn = (request.scope.get("extensions") or {}).get("qkdstack_sae_id")
        site = site_of_cn(cn) if cn else ""
        if not site or not handler.knows_site(site):
            raise RelayError(401, "a client certificate of a KME of this network (CN KME_<SITE>) is required")
        return site

    @app.exception_handler(RelayError)
    async def _relay_error(_request: Request, exc: RelayError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "malformed request", [{"reason": str(e.get("msg"))} for e in exc.errors()[:5]])

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code if exc.status_code in (404, 405) else 400, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return _error(503, "the KME could not process the request", [{"reason": type(exc).__name__}])

    async def json_body(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise RelayError(400, "the request body is not JSON") from None

    @app.get(VERSIONS)
    async def versions(request: Request) -> JSONResponse:
        caller(request)
        return JSONResponse({"versions": [{"version": API_VERSION, "extension": "qkdstack_relay/1"}]})

    @app.post(EXT_KEYS)
    async def ext_keys(request: Request) -> JSONResponse:
        sender = caller(request)
        return JSONResponse(await handler.handle_ext_keys(sender, await json_body(request)))

    @app.post(VOID)
    async def void(request: Request) -> JSONResponse:
        sender = caller(request)
        return JSONResponse(await handler.handle_void(sender, await json_body(request)))

    @app.get(LINK_STATE)
    async def link_state(request: Request) -> JSONResponse:
        return JSONResponse(await handler.handle_link_state(caller(request)))

    return app


@contextlib.asynccontextmanager
async def serve_kme_api(
    handler: RelayHandler, host: str, port: int, tls: TLSFiles, *, log_level: str = "warning"
) -> AsyncIterator[RunningServer]:
    """Run the KME-to-KME server in the current event loop for the duration of the ``async with``.

    ``tls``: this site's KME certificate and key (``[network] tls_cert``/``tls_key``) and the network CA
    (``[network] ca_cert``) that must sign every caller's certificate. ``port=0`` picks a free port
    (the yielded ``RunningServer.port``). On exit the server stops and lets requests in flight finish.
    """
    async with serve_asgi(create_app(handler), host, port, tls, "[network] listen: the KME-to-KME server",
                          log_level=log_level) as running:
        yield running


def client_ssl_context(tls: TLSFiles) -> ssl.SSLContext:
    """TLS >= 1.2 client context: this site's KME certificate, and the network CA for the servers."""
    for name in ("cert", "key", "ca"):
        if not Path(getattr(tls, name)).is_file():
            raise ConfigError(f"[network] {'ca_cert' if name == 'ca' else 'tls_' + name}: "
                              f"{getattr(tls, name)} does not exist")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


def _skip_sniffio_lookups() -> None:
    """httpcore imports ``sniffio`` on every request to learn the async library; when it is not installed
    each failed import searches ``sys.path`` again (~0.2 ms per request, a tenth of a relay hop's CPU).
    Recording the absence once (``sys.modules[name] = None``: later imports fail at once) changes nothing
    else: httpcore then assumes asyncio, as it does today."""
    import importlib.util
    import sys

    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


class KMEClient:
    """The client side of the KME-to-KME API: one keep-alive HTTPS client with this site's certificate.

    :meth:`post` and :meth:`get` return ``(status, body)`` for any HTTP answer and raise
    :class:`~qkdstack.errors.ChannelError` when the other KME cannot be reached or does not answer in time.
    """

    def __init__(self, tls: TLSFiles, *, timeout_s: float = 10.0, max_connections: int = 256) -> None:
        _skip_sniffio_lookups()
        self._client = httpx.AsyncClient(
            verify=client_ssl_context(tls),
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self.timeout_s = timeout_s

    async def _request(
        self, method: str, url: str, body: Any = None, timeout_s: float | None = None
    ) -> tuple[int, dict[str, Any]]:
        try:
            resp = await self._client.request(
                method, url, json=body, timeout=self.timeout_s if timeout_s is None else timeout_s
            )
        except httpx.HTTPError as exc:
            raise ChannelError(f"cannot reach the KME at {url.split('/kmapi')[0]}: {type(exc).__name__}") from None
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            data = {"message": f"HTTP {resp.status_code} without a JSON body"}
        return resp.status_code, data

    async def post(self, base_url: str, path: str, body: Any, timeout_s: float | None = None) -> tuple[int, dict]:
        return await self._request("POST", base_url.rstrip("/") + path, body, timeout_s)

    async def get(self, base_url: str, path: str, timeout_s: float | None = None) -> tuple[int, dict]:
        return await self._request("GET", base_url.rstrip("/") + path, None, timeout_s)

    async def aclose(self) -> None:
        await self._client.aclose()
