"""Shared fixtures of the KMS tests: key stores on both backends (SQLite file, PostgreSQL schema).

PostgreSQL runs when QKDSTACK_TEST_PG_URL is set (``make test`` starts a throw-away server with
scripts/pg-test-server.sh); otherwise those parameters skip with the reason.
"""

from __future__ import annotations

import os
import secrets
import urllib.parse

import pytest

from qkdstack.kms.store import KeyStore, LinkLimits, open_store

PG_URL = os.environ.get("QKDSTACK_TEST_PG_URL")
BACKENDS = [
    "sqlite",
    pytest.param(
        "postgres",
        marks=[
            pytest.mark.postgres,
            pytest.mark.skipif(
                not PG_URL, reason="QKDSTACK_TEST_PG_URL is unset (run `make test` to start PostgreSQL)"
            ),
        ],
    ),
]


def pg_schema_url(base: str) -> str:
    """Create a fresh schema and return a URL whose connections use it (isolates each store)."""
    import psycopg

    name = "kms_" + secrets.token_hex(6)
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=" + urllib.parse.quote(f"-csearch_path={name}")


class StoreFactory:
    """Makes stores of one backend; a name opens the same database again (restart)."""

    def __init__(self, backend: str, tmp_path) -> None:
        self.backend = backend
        self.tmp_path = tmp_path
        self.locations: dict[str, str] = {}
        self.opened: list[KeyStore] = []

    def location(self, name: str) -> str:
        if name not in self.locations:
            if self.backend == "sqlite":
                self.locations[name] = str(self.tmp_path / f"{name}.db")
            else:
                assert PG_URL
                self.locations[name] = pg_schema_url(PG_URL)
        return self.locations[name]

    def __call__(self, name: str = "a", **kw) -> KeyStore:
        kw.setdefault("limits", LinkLimits(capacity=100_000, high_water=90_000, low_water=10_000))
        store = open_store(self.location(name), **kw)
        self.opened.append(store)
        return store

    def close_all(self) -> None:
        for s in self.opened:
            s.close()


def factory_fixture(backend: str, tmp_path):
    """Body of the ``store_factory`` fixture each KMS test module declares with ``params=BACKENDS``."""
    f = StoreFactory(backend, tmp_path)
    yield f
    f.close_all()


# ---------------------------------------------------------------------------------------------
# PKI for the mTLS tests: one CA per site, server certs for both KMEs, SAE client certs.


class PKI:
    """Certificates on disk: ``tls(site)`` server files, ``client(name)`` -> (cert, key, ca) paths."""

    def __init__(self, root) -> None:
        import datetime

        from qkdstack.certs import generate_key, issue_certificate, make_ca, write_certificate, write_private_key

        self.root = root
        self.files: dict[str, tuple[str, str, str]] = {}
        cas = {site: make_ca(f"site {site} CA") for site in ("A", "B", "rogue")}
        for site, (cert, _key) in cas.items():
            write_certificate(root / f"ca_{site}.pem", cert)

        def issue(name: str, site: str, cn: str, *, server: bool = False, **kw) -> None:
            ca_cert, ca_key = cas[site]
            key = generate_key("ec-p256")
            cert = issue_certificate(
                ca_cert,
                ca_key,
                cn,
                key.public_key(),
                client=not server,
                server=server,
                ip_addresses=["127.0.0.1"] if server else (),
                dns_names=["localhost"] if server else (),
                **kw,
            )
            write_certificate(root / f"{name}.pem", cert)
            write_private_key(root / f"{name}.key", key)
            self.files[name] = (str(root / f"{name}.pem"), str(root / f"{name}.key"), str(root / f"ca_{site}.pem"))

        issue("kme_A", "A", "KME_A", server=True)
        issue("kme_B", "B", "KME_B", server=True)
        issue("SAE_A", "A", "SAE_A")
        issue("SAE_A2", "A", "SAE_A2")
        issue("SAE_B", "B", "SAE_B")
        issue("SAE_C", "B", "SAE_C")
        issue("SAE_X", "A", "SAE_X")  # valid certificate of site A, but not a registered SAE
        issue("rogue", "rogue", "SAE_A")  # right name, wrong CA
        now = datetime.datetime.now(datetime.UTC)
        issue(
            "expired",
            "A",
            "SAE_A",
            not_before=now - datetime.timedelta(days=10),
            not_after=now - datetime.timedelta(days=1),
        )

    def tls(self, site: str):
        from qkdstack.kms.etsi014 import TLSFiles

        cert, key, ca = self.files[f"kme_{site}"]
        return TLSFiles(cert, key, ca)

    def client_context(self, name: str | None, server_site: str):
        """An SSL context for a client named ``name`` (None: no client certificate) of ``server_site``."""
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.root / f"ca_{server_site}.pem"))
        if name is not None:
            cert, key, _ = self.files[name]
            ctx.load_cert_chain(cert, key)
        return ctx


class Sites:
    """Two KMEs (A and B) on stores of one backend, linked in process, optionally serving ETSI 014."""

    def __init__(
        self,
        factory: StoreFactory,
        *,
        key_size: int = 256,
        blocks: int = 4,
        block_bytes: int = 32 * 64,
        orphan_grace_s: float = 30.0,
    ):
        self.factory = factory
        self.key_size = key_size
        self.blocks = blocks
        self.block_bytes = block_bytes
        self.orphan_grace_s = orphan_grace_s
        self.one_site_chunks: set[str] = set()  # chunks of blocks stored at one site only (add_orphan)

    async def start(self, pki: PKI | None = None) -> Sites:
        import contextlib

        from qkdstack.kms.etsi014 import serve_etsi014
        from qkdstack.kms.kme import KME, KMEConfig, link_pair

        grace = self.orphan_grace_s
        self.a = KME(
            KMEConfig("KME_A", "KME_B", frozenset({"SAE_A", "SAE_A2"}), key_size=self.key_size, orphan_grace_s=grace),
            self.factory("a", chunk_bits=self.key_size),
        )
        self.b = KME(
            KMEConfig("KME_B", "KME_A", frozenset({"SAE_B", "SAE_C"}), key_size=self.key_size, orphan_grace_s=grace),
            self.factory("b", chunk_bits=self.key_size),
        )
        self.link_ab, self.link_ba = link_pair(self.a, self.b)
        await self.a.attach_peer(self.link_ab)
        await self.b.attach_peer(self.link_ba)
        self.blocks_added = []
        for i in range(self.blocks):
            await self.add_block(f"round-{i}")
        self._stack = contextlib.AsyncExitStack()
        if pki is not None:
            self.srv_a = await self._stack.enter_async_context(serve_etsi014(self.a, "127.0.0.1", 0, pki.tls("A")))
            self.srv_b = await self._stack.enter_async_context(serve_etsi014(self.b, "127.0.0.1", 0, pki.tls("B")))
        return self

    async def add_block(self, block_id: str) -> None:
        block = secrets.token_bytes(self.block_bytes)
        await self.a.add_block(block_id, block)
        await self.b.add_block(block_id, block)
        self.blocks_added.append(block_id)

    async def add_orphan(self, at_a: bool, block_id: str, n_chunks: int) -> None:
        """A key block stored at one site only (the other site's add_block failed or was lost)."""
        from qkdstack.kms.store import chunk_id

        kme = self.a if at_a else self.b
        await kme.add_block(block_id, secrets.token_bytes(self.key_size // 8 * n_chunks))
        self.one_site_chunks.update(chunk_id(kme.config.link_id, block_id, i) for i in range(n_chunks))

    async def agree(self) -> None:
        """Both stores hold the same chunks, and every chunk's state is consistent across the sites.

        Chunks of blocks stored at one site only (:meth:`add_orphan`) are at that site only.
        """
        link = self.a.config.link_id
        sa, sb = await self.a.store.chunk_states(link), await self.b.store.chunk_states(link)
        assert set(sa) ^ set(sb) <= self.one_site_chunks
        for cid in set(sa) & set(sb):
            (st_a, k_a), (st_b, k_b) = sa[cid], sb[cid]
            if st_a == 0 or st_b == 0:
                assert st_a == st_b == 0, (cid, sa[cid], sb[cid])
            elif k_a and k_b:
                assert k_a == k_b
        for kme in (self.a, self.b):
            assert await kme.store.pending(link) == []
            assert await kme.store.counts(link) == await kme.store.recount(link)

    async def stop(self) -> None:
        await self._stack.aclose()
        await self.a.close()
        await self.b.close()
