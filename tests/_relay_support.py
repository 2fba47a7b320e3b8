"""An in-process QKD network of SiteKMEs for the relay tests and the network benchmark (no node processes).

Per site: one key store (SQLite file), one KME per link (joined to the neighbour's with ``link_pair``,
the same random key blocks added at both ends), a relay store, a :class:`SiteKME`, and the site's
KME-to-KME server on 127.0.0.1 with a certificate of a test network CA (real mutual TLS).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from qkdstack.certs import generate_key, issue_certificate, make_ca, write_certificate, write_private_key
from qkdstack.kms.etsi014 import TLSFiles
from qkdstack.kms.kme import KME, KMEConfig, link_pair
from qkdstack.kms.store import LinkLimits, open_store
from qkdstack.network.kme_api import KMEClient, serve_kme_api
from qkdstack.network.relay import RELAY_SAE
from qkdstack.network.relay_store import open_relay_store
from qkdstack.network.site_kme import SiteKME
from qkdstack.network.topology import Topology, parse_topology


def topology(sites: dict[str, list[str]], links: list[tuple[str, str]]) -> Topology:
    return parse_topology(
        {"sites": {name: {"sae": sae} for name, sae in sites.items()},
         "links": [{"transmitter": a, "receiver": b} for a, b in links]},
        "test-topology",
    )


LINE = topology({"A": ["SAE_A"], "R1": [], "R2": [], "B": ["SAE_B"]}, [("A", "R1"), ("R1", "R2"), ("R2", "B")])
RING = topology(
    {"A": ["SAE_A"], "R1": ["SAE_R1"], "R2": [], "B": ["SAE_B"], "R3": ["SAE_R3"]},
    [("A", "R1"), ("R1", "R2"), ("R2", "B"), ("B", "R3"), ("R3", "A")],
)


class Network:
    """A running in-process network; use ``async with Network(...).run() as net``."""

    def __init__(self, topo: Topology, root: Path, *, blocks: int = 2, block_bytes: int = 32 * 256,
                 key_size: int = 256, synchronous: str = "FULL", hop_timeout_s: float = 10.0,
                 unreachable_hold_s: float = 0.5) -> None:
        self.topo = topo
        self.root = root
        self.blocks = blocks
        self.block_bytes = block_bytes
        self.key_size = key_size
        self.synchronous = synchronous
        self.hop_timeout_s = hop_timeout_s
        self.unreachable_hold_s = unreachable_hold_s
        self.kmes: dict[tuple[str, str], KME] = {}  # (site, neighbour) -> KME
        self.sites: dict[str, SiteKME] = {}
        self.servers: dict[str, contextlib.AsyncExitStack] = {}
        self.tls: dict[str, TLSFiles] = {}
        self.stores = {}
        self.relay_stores = {}

    def _pki(self) -> None:
        ca_cert, ca_key = make_ca("test network CA")
        write_certificate(self.root / "ca.pem", ca_cert)
        write_private_key(self.root / "ca.key", ca_key)
        for site in self.topo.sites:
            key = generate_key("ec-p256")
            cert = issue_certificate(ca_cert, ca_key, f"KME_{site}", key.public_key(), client=True, server=True,
                                     ip_addresses=["127.0.0.1"], dns_names=["localhost"])
            write_certificate(self.root / f"kme_{site}.pem", cert)
            write_private_key(self.root / f"kme_{site}.key", key)
            self.tls[site] = TLSFiles(self.root / f"kme_{site}.pem", self.root / f"kme_{site}.key",
                                      self.root / "ca.pem")

    async def add_keys(self, a: str, b: str, blocks: int = 1) -> None:
        """The same random key blocks at both ends of link a-b."""
        for _ in range(blocks):
            block = os.urandom(self.block_bytes)
            block_id = os.urandom(8).hex()
            await self.kmes[(a, b)].add_block(block_id, block)
            await self.kmes[(b, a)].add_block(block_id, block)

    def kme(self, site: str, peer: str) -> KME:
        return self.kmes[(site, peer)]

    async def counts(self, a: str, b: str):
        """Chunk counts of link a-b at both ends: (counts at a, counts at b)."""
        ka, kb = self.kmes[(a, b)], self.kmes[(b, a)]
        return (await ka.store.counts(ka.config.link_id), await kb.store.counts(kb.config.link_id))

    async def start_server(self, site: str) -> None:
        stack = contextlib.AsyncExitStack()
        port = 0
        url = self.topo.sites[site].kme_url
        if url:
            port = int(url.rsplit(":", 1)[1])
        server = await stack.enter_async_context(serve_kme_api(self.sites[site], "127.0.0.1", port, self.tls[site]))
        self.servers[site] = stack
        self.urls[site] = server.url

    async def stop_server(self, site: str) -> None:
        await self.servers.pop(site).aclose()

    async def refresh(self, rounds: int | None = None) -> None:
        """Link-state pulls at every site, enough rounds for every report to reach every site."""
        for _ in range(rounds or len(self.topo.sites)):
            for site in self.sites.values():
                await site.refresh_link_state()

    @contextlib.asynccontextmanager
    async def run(self):
        self._pki()
        limits = LinkLimits(capacity=1 << 22, high_water=(1 << 22) - 1, low_water=0)
        for site in self.topo.sites:
            self.stores[site] = open_store(self.root / f"{site}.db", chunk_bits=self.key_size, limits=limits,
                                           synchronous=self.synchronous)
            self.relay_stores[site] = open_relay_store(self.root / f"{site}-relay.db")
        for link in self.topo.links:
            a, b = link.ends
            for s, p in ((a, b), (b, a)):
                cfg = KMEConfig(s, p, frozenset({*self.topo.sites[s].sae, RELAY_SAE}), key_size=self.key_size)
                self.kmes[(s, p)] = KME(cfg, self.stores[s])
            la, lb = link_pair(self.kmes[(a, b)], self.kmes[(b, a)])
            await self.kmes[(a, b)].attach_peer(la)
            await self.kmes[(b, a)].attach_peer(lb)
            await self.add_keys(a, b, self.blocks)
        self.clients = {}
        for site in self.topo.sites:
            self.clients[site] = KMEClient(self.tls[site], timeout_s=self.hop_timeout_s)
            links = {p: self.kmes[(site, p)] for p in self.topo.neighbours(site)}
            self.sites[site] = SiteKME(site, self.topo, links, self.relay_stores[site], self.clients[site],
                                       hop_timeout_s=self.hop_timeout_s,
                                       unreachable_hold_s=self.unreachable_hold_s)
        self.urls: dict[str, str] = {}
        try:
            for site in self.topo.sites:
                await self.start_server(site)
            self.topo = self.topo.with_kme_urls(self.urls)
            for s in self.sites.values():
                s.topology = self.topo
            yield self
        finally:
            for site in list(self.servers):
                await self.stop_server(site)
            for s in self.sites.values():
                await s.close()
            for c in self.clients.values():
                await c.aclose()
            for k in self.kmes.values():
                await k.close()
            for st in self.stores.values():
                st.close()
            for rs in self.relay_stores.values():
                rs.close()
