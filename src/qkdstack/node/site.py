"""A multi-link site: every QKD link of one site in one process, sharing one key store and one KME front.

``qkdstack node --config DIR/SITE/site.toml`` on a site written by ``qkdstack init --topology`` runs a
:class:`Site`: one :class:`~qkdstack.node.service.Node` per ``[[links]]`` entry (transmitter on some
links, receiver on others; each with its own authentication pool, ``pending/`` and round history under
``data/links/PEER``, and its own distillation thread), one :class:`~qkdstack.kms.kme.KME` per link on
the site's single key store (each link is its own store partition, its ``link_id``), and in front of
them one :class:`~qkdstack.network.site_kme.SiteKME` that serves the consumers (ETSI 014, SKIP,
in-unit delivery) and relays keys to sites that share no link with this one, over the KME-to-KME
listener (``[network] listen``, mutual TLS from the network CA; docs/network.md).

The site writes ``data/status.json``: its links (state, QBER, key rates, store levels), totals over
them (so a two-site reader finds the same top-level fields), and the relay counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from qkdstack.certs import atomic_write
from qkdstack.errors import ConfigError
from qkdstack.kms.etsi014 import TLSFiles
from qkdstack.kms.kme import KME, KMEConfig
from qkdstack.network.topology import load_topology
from qkdstack.node.config import parse_address
from qkdstack.node.service import Node, open_site_store, serve_consumers
from qkdstack.node.site_config import SiteConfig
from qkdstack.ops.service import NodeOps

log = logging.getLogger("qkdstack.node")

STATUS_INTERVAL_S = 1.0
"""How often the site rewrites its ``status.json`` (the links write their own after every round)."""
_TOTALS = ("rounds_accepted", "rounds_aborted", "secret_bits", "stored_bits", "auth_bits_consumed", "pulses",
           "reconnections")


class Site:
    """One site of a QKD network; run it with :meth:`run`, stop it with :attr:`stop`."""

    def __init__(self, config: SiteConfig) -> None:
        assert config.network is not None, "a multi-link site has a [network] section"
        self.cfg = config
        self.name = config.name
        self.topology = load_topology(config.resolve(config.network.topology))
        self.nodes = [Node(link) for link in config.links]
        self.stop = asyncio.Event()
        self.kme: Any = None
        self.kmes: dict[str, KME] = {}
        self.ops: NodeOps | None = None
        self.status_doc: dict[str, Any] | None = None
        self.urls: dict[str, str | None] = {}

    def __repr__(self) -> str:
        return f"Site({self.name!r}, links={[n.site.peer for n in self.nodes]})"

    def _link_kme(self, node: Node, store: Any) -> KME:
        from qkdstack.network.site_kme import RELAY_SAE

        kms_cfg = self.cfg.first.kms
        return KME(KMEConfig(kme_id=self.name, peer_kme_id=node.site.peer,
                             sae_ids=frozenset(kms_cfg.sae_ids) | {RELAY_SAE}, key_size=kms_cfg.key_size_bits), store)

    async def run(self) -> None:
        """Run every link and serve keys until :attr:`stop` is set; a link's fatal error stops the site."""
        from qkdstack.network.kme_api import KMEClient, serve_kme_api
        from qkdstack.network.relay_store import RelayStore
        from qkdstack.network.site_kme import SiteKME

        net = self.cfg.network
        assert net is not None
        store = open_site_store(self.cfg.first)
        self.kmes = {node.site.peer: self._link_kme(node, store) for node in self.nodes}
        tls = TLSFiles(self.cfg.resolve(net.tls_cert), self.cfg.resolve(net.tls_key), self.cfg.resolve(net.ca_cert))
        relay_store = RelayStore(self.cfg.data_dir / "relay.db")
        client = KMEClient(tls)
        self.kme = SiteKME(self.name, self.topology, self.kmes, relay_store, client)
        tasks: list[asyncio.Task] = []
        stopper = asyncio.create_task(self.stop.wait())
        try:
            self.ops = NodeOps(self.cfg.first, lambda: self.status_doc,
                               link_rounds={n.link_id: n.data_dir / "rounds.jsonl" for n in self.nodes}).start()
            async with contextlib.AsyncExitStack() as stack:
                urls = await serve_consumers(stack, self.cfg.first, self.kme, self.ops)
                network = await stack.enter_async_context(
                    serve_kme_api(self.kme, *parse_address("network", "listen", net.listen), tls))
                self.urls = {"etsi014_url": urls.etsi_url, "skip_url": urls.skip_url, "network_url": network.url}
                await self.kme.start()
                log.info("%s: %d links (%s); key relay listener at %s", self.name, len(self.nodes),
                         ", ".join(f"{n.site.role} to {n.site.peer}" for n in self.nodes), self.urls["network_url"])
                tasks = [asyncio.create_task(node.run_in_site(self.kmes[node.site.peer]), name=f"link-{node.site.peer}")
                         for node in self.nodes]
                tasks.append(asyncio.create_task(self._status_loop(), name="site-status"))
                done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
                for task in done:  # a link that ended with an error ends the site (its error reaches the CLI)
                    if task is not stopper and not task.cancelled() and task.exception() is not None:
                        exc = task.exception()
                        if isinstance(exc, ConfigError):  # one sentence that names the link
                            raise ConfigError(f"[[links]] peer {task.get_name().removeprefix('link-')}: {exc}")
                        raise exc  # type: ignore[misc]
                await stopper
        finally:
            stopper.cancel()
            for node in self.nodes:
                node.stop.set()
            for task in tasks:
                if task.get_name() == "site-status":
                    task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for node, result in zip(self.nodes, results, strict=False):
                if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                    log.error("%s: link to %s ended with %s: %s", self.name, node.site.peer, type(result).__name__,
                              result)
            await self.write_status()
            if self.ops is not None:
                self.ops.stop()
            await self.kme.close()
            with contextlib.suppress(Exception):
                await client.aclose()
            for kme in self.kmes.values():
                await kme.close()
            relay_store.close()
            store.close()

    async def _status_loop(self) -> None:
        while True:
            try:
                await self.write_status()
            except (OSError, ValueError) as exc:  # a status file is not worth stopping the site for
                log.error("%s: status.json not written: %s", self.name, exc)
            await asyncio.sleep(STATUS_INTERVAL_S)

    async def write_status(self) -> None:
        """``data/status.json``: the site's links, totals over them, store levels and relay counters."""
        links = []
        for node in self.nodes:
            doc = dict(node.status_doc or {"site": self.name, "role": node.site.role, "link": node.link_id})
            kme = self.kmes.get(node.site.peer)
            doc["peer"] = node.site.peer
            doc["kme_link_up"] = kme is not None and kme.peer is not None
            links.append(doc)
        stored = sum(((d.get("store") or {}).get("stored_keys") or 0) for d in links)
        doc: dict[str, Any] = {
            "site": self.name,
            "updated": time.time(),
            **self.urls,
            "metrics_url": self.ops.metrics_url if self.ops else None,
            "dashboard_url": self.ops.dashboard_url if self.ops else None,
            "finished": all(node.finished for node in self.nodes),
            **{name: sum(int(d.get(name) or 0) for d in links) for name in _TOTALS},
            "store": {"stored_keys": stored, "key_size_bits": self.cfg.first.kms.key_size_bits},
            "links": links,
            "relay": dict(self.kme.counters) if self.kme is not None else None,
        }
        self.status_doc = doc
        data = json.dumps(doc, indent=1, default=str).encode()
        self.cfg.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(atomic_write, self.cfg.data_dir / "status.json", data, 0o600)
