"""A node's operations side: its metrics registry and its admin listener, started by ``Node.run``.

:class:`NodeOps` is all the node needs: ``start()`` before serving (binds ``[admin] listen``; a busy
port is a ConfigError naming the field), :attr:`etsi014_middleware` for the ETSI 014 server,
:attr:`metrics_url` / :attr:`dashboard_url` for ``status.json``, and ``stop()``. The status document is
read through a callback (the node keeps the last dict it wrote), so nothing is counted twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from qkdstack.node.config import NodeConfig
from qkdstack.ops.admin import AdminApp, AdminServer, check_admin
from qkdstack.ops.dashboard import ops_figures, page
from qkdstack.ops.metrics import NodeMetrics, StatusSource

log = logging.getLogger("qkdstack.ops")


class NodeOps:
    """Metrics and admin listener of one node."""

    def __init__(self, config: NodeConfig, status: StatusSource) -> None:
        self.config = config
        self.site = config.site.name
        self._status = status
        self.figures = ops_figures(config)
        self.metrics = NodeMetrics(status, site=self.site, rounds_path=config.data_dir / "rounds.jsonl",
                                   extras=self.figures)
        self.server: AdminServer | None = None

    def __repr__(self) -> str:
        return f"NodeOps({self.site!r}, admin={self.server!r})"

    def start(self) -> NodeOps:
        address = check_admin(self.config.admin.listen, self.config.admin.token)
        if address is None:
            return self
        app = AdminApp(page=page, status=self._status_doc, rounds=self._rounds, metrics=self.metrics.exposition)
        self.server = AdminServer(*address, app, token=self.config.admin.token).start()
        log.info("%s: admin listener at %s (metrics %s, dashboard %s)", self.site, self.server.url,
                 self.metrics_url, self.dashboard_url)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def etsi014_middleware(self) -> Callable[[Any], Any]:
        return self.metrics.etsi014.middleware

    @property
    def metrics_url(self) -> str | None:
        return f"{self.server.url}/metrics" if self.server else None

    @property
    def dashboard_url(self) -> str | None:
        return f"{self.server.url}/" if self.server else None

    def _status_doc(self) -> dict[str, Any]:
        doc = self._status()
        return {"sites": [{**doc, "ops": self.figures}] if doc else []}

    def _rounds(self, _site: str | None, limit: int) -> dict[str, Any]:
        history = self.metrics.history
        return {"site": self.site, "rounds": history.last(limit) if history is not None else []}
