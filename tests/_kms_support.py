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
