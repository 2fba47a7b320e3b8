"""The node's HTTP admin listener (``[admin] listen``): metrics, the live dashboard and the status.

Paths:

* ``/metrics``: the node's Prometheus registry (:class:`~qkdstack.ops.metrics.NodeMetrics`), written by
  prometheus_client's exposition code;
* ``/`` (and ``/dashboard``): the dashboard page (:mod:`qkdstack.ops.dashboard`), which polls
* ``/status.json``: ``{"sites": [status]}``, the node's status document plus its configured thresholds
  under ``"ops"``, and
* ``/rounds.json?limit=N``: the last rounds (figures only, see :func:`~qkdstack.ops.metrics.compact_round`).

The listener serves on its own thread (a small threading HTTP server), so a scrape never waits for a
round and never delays an ETSI 014 answer on the serving loop.

Access: it listens on loopback by default. A non-loopback address is refused (:func:`check_admin`,
``ConfigError`` naming ``[admin] listen``) unless ``[admin] token`` is set; with a token, every data path
(``/metrics``, ``/status.json``, ``/rounds.json``) requires ``Authorization: Bearer TOKEN`` (compared in
constant time), on loopback too. The dashboard page itself holds no data; its script reads the token
from the page address's fragment (``/#token=...``, which browsers never send) and sends it as that
header. There is no TLS on this listener: across a network, put it behind a TLS proxy.
"""

from __future__ import annotations

import hmac
import http.server
import json
import logging
import socket
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from qkdstack.errors import ConfigError
from qkdstack.node.config import check_admin_listen

log = logging.getLogger("qkdstack.ops.admin")

check_admin = check_admin_listen
"""The ``[admin]`` checks, also applied to a server started without a configuration file."""


def _json(doc: Any) -> bytes:
    return json.dumps(doc, default=str).encode()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _AdminHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle kept-alive connection (a browser, a scraper) is closed after 30 s

    def log_message(self, *args: Any) -> None:  # no access log on stderr
        pass

    def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authorized(self) -> bool:
        token = self.server.token
        if not token:
            return True
        got = self.headers.get("Authorization", "")
        scheme, _, value = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        app = self.server.app
        try:
            if url.path in ("/", "/dashboard", "/index.html"):
                self._send(200, app.page(), "text/html; charset=utf-8",
                           {"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                                       "style-src 'unsafe-inline'; img-src 'self' data:"})
                return
            if url.path not in ("/metrics", "/status.json", "/rounds.json"):
                self._send(404, b"not found\n", "text/plain; charset=utf-8")
                return
            if not self._authorized():
                self._send(401, b"a bearer token is required ([admin] token)\n", "text/plain; charset=utf-8",
                           {"WWW-Authenticate": 'Bearer realm="qkdstack admin"'})
                return
            if url.path == "/metrics":
                self._send(200, app.metrics(), CONTENT_TYPE_LATEST)
            elif url.path == "/status.json":
                self._send(200, _json(app.status()), "application/json")
            else:
                query = urllib.parse.parse_qs(url.query)
                try:
                    limit = max(0, min(int(query.get("limit", ["200"])[0]), 2000))
                except ValueError:
                    limit = 200
                site = query.get("site", [None])[0]
                self._send(200, _json(app.rounds(site, limit)), "application/json")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # one line, never a traceback to the client
            log.error("admin listener: %s on %s: %s", type(exc).__name__, url.path, exc)
            self._send(500, b"internal error\n", "text/plain; charset=utf-8")


class AdminApp:
    """What the listener serves: four callables, so the node and ``qkdstack dashboard`` share the server."""

    def __init__(self, *, page: Callable[[], bytes], status: Callable[[], dict[str, Any]],
                 rounds: Callable[[str | None, int], dict[str, Any]],
                 metrics: Callable[[], bytes] | None = None) -> None:
        self.page = page
        self.status = status
        self.rounds = rounds
        self.metrics = metrics or (lambda: b"")


class _AdminHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: AdminApp, token: str) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        self.token = token
        super().__init__(address, _Handler)


class AdminServer:
    """The admin HTTP listener on a thread of its own; :meth:`start` binds (ConfigError if it cannot)."""

    def __init__(self, host: str, port: int, app: AdminApp, *, token: str = "") -> None:
        check_admin(f"{host}:{port}", token)
        self.host, self.port = host, port
        self.app = app
        self.token = token
        self._httpd: _AdminHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:  # never the token
        return f"AdminServer({self.host}:{self.port}, token={'set' if self.token else 'none'})"

    def start(self) -> AdminServer:
        try:
            self._httpd = _AdminHTTPServer((self.host, self.port), self.app, self.token)
        except OSError as exc:
            raise ConfigError(f"[admin] listen {self.host}:{self.port} cannot be listened on ({exc.strerror})") \
                from None
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"qkd-admin-{self.port}", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> AdminServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
