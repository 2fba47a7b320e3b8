"""A node's operations side: its metrics registry and its admin listener, started by ``Node.run``.

:class:`NodeOps` is all the node needs: ``start()`` before serving (binds ``[admin] listen``; a busy
port is a ConfigError naming the field), :attr:`etsi014_middleware` for the ETSI 014 server,
:attr:`metrics_url` / :attr:`dashboard_url` for ``status.json``, and ``stop()``. The status document is
read through a callback (the node keeps the last dict it wrote), so nothing is counted twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qkdstack.node.config import NodeConfig
from qkdstack.ops.admin import AdminApp, AdminServer, check_admin
from qkdstack.ops.dashboard import ops_figures, page
from qkdstack.ops.metrics import NodeMetrics, StatusSource

log = logging.getLogger("qkdstack.ops")


class StoreWatch:
    """Logs the key store's water marks as the node's status crosses them (``[kms] low/high_water_keys``).

    Levels: *low* below ``low_water_keys`` (keys are scarce for consumers), *high* at or above
    ``high_water_keys`` (the node stops generating until keys are delivered), *normal* between. Entering
    high or low is a warning, leaving it is info; the level at start is logged only if it is high.
    """

    def __init__(self, site: str, status: StatusSource, figures: dict[str, Any], interval_s: float = 1.0) -> None:
        self.site = site
        self.status = status
        self.low, self.high = figures["low_water_keys"], figures["high_water_keys"]
        self.interval_s = interval_s
        self.level: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _class(self, keys: int) -> str:
        return "high" if keys >= self.high else "low" if keys < self.low else "normal"

    def check(self) -> None:
        doc = self.status() or {}
        keys = (doc.get("store") or {}).get("stored_keys")
        if not isinstance(keys, int):
            return
        level, before = self._class(keys), self.level
        self.level = level
        if level == before or (before is None and level != "high"):
            return
        if level == "high":
            log.warning("%s: key store at %d keys, at or above its high-water mark (%d): key generation pauses "
                        "until keys are delivered", self.site, keys, self.high, extra={"event": "store.high_water"})
        elif level == "low":
            log.warning("%s: key store at %d keys, below its low-water mark (%d): keys are scarce", self.site, keys,
                        self.low, extra={"event": "store.low_water"})
        else:
            event = "store.below_high_water" if before == "high" else "store.above_low_water"
            log.info("%s: key store at %d keys, between its water marks (%d, %d) again", self.site, keys, self.low,
                     self.high, extra={"event": event})

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception as exc:  # a watcher must never take the node down
                log.error("%s: store watch: %s: %s", self.site, type(exc).__name__, exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"qkd-storewatch-{self.site}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class NodeOps:
    """Metrics and admin listener of one node."""

    def __init__(self, config: NodeConfig, status: StatusSource, link_rounds: dict[str, Path] | None = None) -> None:
        """``link_rounds``: a multi-link site's ``rounds.jsonl`` per link (its status lists ``links``)."""
        self.config = config
        self.site = config.site.name
        self._status = status
        self.figures = ops_figures(config)
        self.metrics = NodeMetrics(status, site=self.site, rounds_path=config.data_dir / "rounds.jsonl",
                                   extras=self.figures, link_rounds=link_rounds)
        self.server: AdminServer | None = None
        self.store_watch = StoreWatch(self.site, status, self.figures)

    def __repr__(self) -> str:
        return f"NodeOps({self.site!r}, admin={self.server!r})"

    def start(self) -> NodeOps:
        address = check_admin(self.config.admin.listen, self.config.admin.token)
        if address is not None:
            app = AdminApp(page=page, status=self._status_doc, rounds=self._rounds,
                           metrics=self.metrics.exposition)
            self.server = AdminServer(*address, app, token=self.config.admin.token).start()
            log.info("%s: admin listener at %s (metrics %s, dashboard %s)", self.site, self.server.url,
                     self.metrics_url, self.dashboard_url)
        self.store_watch.start()
        return self

    def stop(self) -> None:
        self.store_watch.stop()
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def etsi014_middleware(self) -> Callable[[Any], Any]:
        return self.metrics.etsi014.middleware

    @property
    def skip_observer(self) -> Callable[[str, int, float], None]:
        return self.metrics.skip.observe

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
